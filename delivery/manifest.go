package delivery

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// Signer signs release manifests with the server's ed25519 key. Clients
// pin its public key and install nothing a manifest it signed does not
// name.
type Signer struct {
	key ed25519.PrivateKey
	id  string
}

// NewSigner returns a Signer for key.
func NewSigner(key ed25519.PrivateKey) *Signer {
	return &Signer{key: key, id: KeyID(key.Public().(ed25519.PublicKey))}
}

// PublicKey returns the key clients verify manifests with.
func (s *Signer) PublicKey() ed25519.PublicKey { return s.key.Public().(ed25519.PublicKey) }

// KeyID names a public key in SignedManifest.key_id: the hex of its first
// 8 bytes.
func KeyID(pub ed25519.PublicKey) string { return hex.EncodeToString(pub[:8]) }

// Sign marshals m deterministically and signs the bytes.
func (s *Signer) Sign(m *deliverypb.Manifest) (*deliverypb.SignedManifest, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("manifest: marshal: %w", err)
	}
	return &deliverypb.SignedManifest{Manifest: b, Signature: ed25519.Sign(s.key, b), KeyId: s.id}, nil
}

// VerifyManifest checks a signed manifest against the trusted keys and
// returns the manifest. It does not judge expiry or serial: that is the
// installer's (see the client's checks). Errors wrap oplog.ErrSignature.
func VerifyManifest(sm *deliverypb.SignedManifest, keys ...ed25519.PublicKey) (*deliverypb.Manifest, error) {
	if sm == nil || len(sm.Signature) != ed25519.SignatureSize {
		return nil, fmt.Errorf("manifest: no signature: %w", oplog.ErrSignature)
	}
	for _, k := range keys {
		if len(k) == ed25519.PublicKeySize && KeyID(k) == sm.KeyId && ed25519.Verify(k, sm.Manifest, sm.Signature) {
			m := &deliverypb.Manifest{}
			if err := proto.Unmarshal(sm.Manifest, m); err != nil {
				return nil, fmt.Errorf("manifest: %v: %w", err, oplog.ErrSignature)
			}
			return m, nil
		}
	}
	return nil, fmt.Errorf("manifest: signature does not verify with a trusted key: %w", oplog.ErrSignature)
}

// SignPackage is what a producer does to a hot patch before uploading it:
// an ed25519 signature over deliverypb.HotPatchMessage of the package,
// the version and the SHA-256 of the bytes.
func SignPackage(key ed25519.PrivateKey, pkg, version string, sha256 []byte) []byte {
	return ed25519.Sign(key, deliverypb.HotPatchMessage(pkg, version, sha256))
}

// checkProducerKey validates a producer key event.
func checkProducerKey(k *deliverypb.ProducerKey) error {
	if !validName(k.Id) {
		return fmt.Errorf("producer key id %q: want 1-%d of [a-z0-9_-]: %w", clip(k.Id), maxNameLen, oplog.ErrInvalidID)
	}
	if len(k.PublicKey) != ed25519.PublicKeySize {
		return fmt.Errorf("producer key %s: want a %d-byte ed25519 public key: %w", k.Id, ed25519.PublicKeySize, oplog.ErrInvalid)
	}
	return nil
}

// verifyProducer checks a hot patch's producer signature against the
// registered keys. Errors wrap oplog.ErrSignature.
func verifyProducer(pkg string, v *deliverypb.Version, keys map[string]*deliverypb.ProducerKey) error {
	if v.ProducerKey == "" || len(v.ProducerSignature) == 0 {
		return fmt.Errorf("a hot patch must be signed by a registered producer key: %w", oplog.ErrSignature)
	}
	k, ok := keys[v.ProducerKey]
	if !ok || k.Revoked {
		return fmt.Errorf("producer key %q is not registered, or revoked: %w", clip(v.ProducerKey), oplog.ErrSignature)
	}
	if !ed25519.Verify(k.PublicKey, deliverypb.HotPatchMessage(pkg, v.Version, v.Sha256), v.ProducerSignature) {
		return fmt.Errorf("producer signature does not verify with key %s: %w", k.Id, oplog.ErrSignature)
	}
	return nil
}

// manifestCache holds the signed manifests of one state snapshot, so that
// a manifest is signed once per state and rollback set, not per device.
type manifestCache struct {
	m sync.Map // string → *signedEntry
}

type signedEntry struct {
	sm     *deliverypb.SignedManifest
	issued int64 // unix ms
}

func newManifestCache() *manifestCache { return &manifestCache{} }

// b64 is the encoding of the object store's digests.
func b64(b []byte) string { return base64.URLEncoding.EncodeToString(b) }

// b64std is the encoding of HTTP Digest headers.
func b64std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
