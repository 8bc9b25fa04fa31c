package gateway

// Client tokens: signed, expiring credentials an app presents when it
// connects. They are verified with public keys alone, so the gateway needs
// no store lookup per connection.
//
// Format (all parts ASCII, at most MaxTokenLen bytes):
//
//	v1.<claims>.<signature>
//
// <claims> is the base64url encoding, without padding, of a compact JSON
// object {"u":user,"d":device,"a":app,"iat":issued,"exp":expires} (times
// in Unix seconds; "u" is empty for a device nobody is signed in on).
// <signature> is the base64url encoding, without padding, of the Ed25519
// signature over the bytes "v1." + <claims>. The signature covers the
// encoded claims exactly as sent, so the JSON is never re-serialised before
// checking it.
//
// Keys: sluiced keeps one Ed25519 private key (LoadOrCreateKey). A Verifier
// may hold several public keys so a key can be rotated: verifiers learn the
// new public key first, then signers switch, and the old key is dropped once
// every token it signed has expired.

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/sluicehq/sluice/oplog"
)

// Token errors. Callers branch on them with errors.Is; both mean the client
// must obtain a new token, but only ErrTokenExpired is a normal event.
var (
	// ErrTokenInvalid: the token is malformed, too long, of an unknown
	// version, not signed by a trusted key, carries ids outside the oplog id
	// alphabet, or was issued more than MaxClockSkew in the future.
	ErrTokenInvalid = errors.New("gateway: token invalid")
	// ErrTokenExpired: the token is authentic but its expiry has passed.
	ErrTokenExpired = errors.New("gateway: token expired")
)

const (
	// MaxTokenLen is the longest token Verify decodes; longer input is
	// refused before any decoding. Tokens Issue produces are under 512
	// bytes.
	MaxTokenLen = 1024

	// MaxClockSkew is how far in the future, by the verifier's clock, a
	// token's issue time may be: it absorbs clock differences between the
	// host that issued the token and the gateway. Expiry gets no such
	// allowance: a token is expired as soon as exp <= now.
	MaxClockSkew = time.Minute

	// tokenPrefix is the version tag; it is also signed.
	tokenPrefix = "v1."
)

// b64 is the token's base64 flavour: URL alphabet, no padding, and no
// non-zero trailing bits, so every decodable segment has exactly one
// encoding.
var b64 = base64.RawURLEncoding.Strict()

// sigLen is the length of an encoded Ed25519 signature.
var sigLen = b64.EncodedLen(ed25519.SignatureSize)

// Claims are the facts a token vouches for. Verify returns the times in
// UTC.
type Claims struct {
	// User is the signed-in user id; empty when the device has no user.
	User string
	// Device is the device id; required.
	Device string
	// App is the app id; required.
	App string
	// IssuedAt is when the token was issued, in whole seconds. Issue uses
	// the current time when it is zero.
	IssuedAt time.Time
	// Expires is the end of validity, in whole seconds: the token is
	// expired once the verifier's clock reaches it. Required, and after
	// IssuedAt.
	Expires time.Time
}

// wireClaims is the JSON form of Claims.
type wireClaims struct {
	User    string `json:"u"`
	Device  string `json:"d"`
	App     string `json:"a"`
	Issued  int64  `json:"iat"`
	Expires int64  `json:"exp"`
}

// check reports why w cannot be a token's claims, or nil. Both Issue and
// Verify apply it, so no token Issue produces is refused by Verify for its
// content.
func (w wireClaims) check() error {
	switch {
	case w.User != "" && !oplog.ValidID(w.User):
		return invalid("user id outside [A-Za-z0-9_-]{1,64}")
	case !oplog.ValidID(w.Device):
		return invalid("device id missing or outside [A-Za-z0-9_-]{1,64}")
	case !oplog.ValidID(w.App):
		return invalid("app id missing or outside [A-Za-z0-9_-]{1,64}")
	case w.Issued <= 0:
		return invalid("issue time missing or before 1970")
	case w.Expires <= w.Issued:
		return invalid("expiry not after issue time")
	}
	return nil
}

func (w wireClaims) claims() Claims {
	return Claims{
		User: w.User, Device: w.Device, App: w.App,
		IssuedAt: time.Unix(w.Issued, 0).UTC(),
		Expires:  time.Unix(w.Expires, 0).UTC(),
	}
}

// invalid wraps ErrTokenInvalid with the reason.
func invalid(reason string) error {
	return fmt.Errorf("%s: %w", reason, ErrTokenInvalid)
}

// Signer issues tokens with one private key. It is immutable and safe for
// concurrent use.
type Signer struct {
	key ed25519.PrivateKey
}

// NewSigner returns a Signer that signs with key. The key is used as given,
// not copied; Issue fails if it is not an Ed25519 private key of the right
// size.
func NewSigner(key ed25519.PrivateKey) *Signer {
	return &Signer{key: key}
}

// Issue returns a token for c. A zero c.IssuedAt means now; both times are
// truncated to whole seconds. It refuses, with an error wrapping
// ErrTokenInvalid, claims that Verify would refuse: ids outside the oplog id
// alphabet, a missing device or app, or an expiry not after the issue time.
func (s *Signer) Issue(c Claims) (string, error) {
	if len(s.key) != ed25519.PrivateKeySize {
		return "", fmt.Errorf("gateway: signing key is %d bytes, want %d", len(s.key), ed25519.PrivateKeySize)
	}
	if c.Expires.IsZero() {
		return "", invalid("no expiry")
	}
	if c.IssuedAt.IsZero() {
		c.IssuedAt = time.Now()
	}
	w := wireClaims{User: c.User, Device: c.Device, App: c.App, Issued: c.IssuedAt.Unix(), Expires: c.Expires.Unix()}
	if err := w.check(); err != nil {
		return "", err
	}
	raw, err := json.Marshal(w)
	if err != nil {
		return "", fmt.Errorf("gateway: encode claims: %w", err)
	}
	signed := tokenPrefix + b64.EncodeToString(raw)
	sig := ed25519.Sign(s.key, []byte(signed))
	return signed + "." + b64.EncodeToString(sig), nil
}

// Verifier checks tokens against a fixed set of public keys. It is
// immutable and safe for concurrent use.
type Verifier struct {
	keys []ed25519.PublicKey

	// verified remembers tokens whose signature and claims checked out,
	// so that a client reconnecting with the same token costs a map
	// lookup, not an Ed25519 verification (a quarter of the server's CPU
	// when 1,000 clients reconnect at once). Bounded: emptied when full.
	mu       sync.Mutex
	verified map[string]Claims
}

// verifiedMax bounds the verified-token cache.
const verifiedMax = 1 << 16

// NewVerifier returns a Verifier that accepts tokens signed by any of keys;
// give several during a key rotation. Keys of the wrong size are ignored,
// so a Verifier without a usable key refuses every token.
func NewVerifier(keys ...ed25519.PublicKey) *Verifier {
	v := &Verifier{}
	for _, k := range keys {
		if len(k) == ed25519.PublicKeySize {
			v.keys = append(v.keys, bytes.Clone(k))
		}
	}
	return v
}

// Verify checks token at time now and returns its claims. Checks run in
// this order: length and shape, signature, claims, issue time (at most
// MaxClockSkew after now), expiry. So the error is ErrTokenExpired only for
// an authentic, well-formed token whose expiry is at or before now; then
// the returned Claims are the token's, so callers may log whose token it
// was. Any other failure wraps ErrTokenInvalid and returns zero Claims.
func (v *Verifier) Verify(token string, now time.Time) (Claims, error) {
	if len(token) > MaxTokenLen {
		return Claims{}, invalid(fmt.Sprintf("longer than %d bytes", MaxTokenLen))
	}
	v.mu.Lock()
	c, seen := v.verified[token]
	v.mu.Unlock()
	if seen {
		return checkTimes(c, now)
	}
	rest, ok := strings.CutPrefix(token, tokenPrefix)
	if !ok {
		return Claims{}, invalid("not a v1 token")
	}
	enc, sigEnc, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(sigEnc, ".") {
		return Claims{}, invalid("want v1.<claims>.<signature>")
	}
	// The base64 decoder skips CR and LF; checking the alphabet first keeps
	// each token's spelling unique.
	if enc == "" || !base64URL(enc) || len(sigEnc) != sigLen || !base64URL(sigEnc) {
		return Claims{}, invalid("bad encoding")
	}
	sig, err := b64.DecodeString(sigEnc)
	if err != nil || len(sig) != ed25519.SignatureSize {
		return Claims{}, invalid("bad signature encoding")
	}
	signed := []byte(token[:len(tokenPrefix)+len(enc)])
	trusted := false
	for _, k := range v.keys {
		if ed25519.Verify(k, signed, sig) {
			trusted = true
			break
		}
	}
	if !trusted {
		return Claims{}, invalid("signature does not match a trusted key")
	}
	raw, err := b64.DecodeString(enc)
	if err != nil {
		return Claims{}, invalid("bad claims encoding")
	}
	var w wireClaims
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&w); err != nil {
		return Claims{}, invalid("bad claims")
	}
	if _, err := dec.Token(); err != io.EOF {
		return Claims{}, invalid("data after the claims")
	}
	if err := w.check(); err != nil {
		return Claims{}, err
	}
	c = w.claims()
	c, err = checkTimes(c, now)
	if err == nil {
		v.mu.Lock()
		if len(v.verified) >= verifiedMax || v.verified == nil {
			v.verified = make(map[string]Claims)
		}
		v.verified[token] = c
		v.mu.Unlock()
	}
	return c, err
}

// checkTimes refuses authentic claims issued in the future or expired.
func checkTimes(c Claims, now time.Time) (Claims, error) {
	if c.IssuedAt.After(now.Add(MaxClockSkew)) {
		return Claims{}, invalid("issued in the future")
	}
	if !c.Expires.After(now) {
		return c, fmt.Errorf("expired at %s: %w", c.Expires.Format(time.RFC3339), ErrTokenExpired)
	}
	return c, nil
}

// base64URL reports whether s holds only base64url characters.
func base64URL(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// PEM block types of key files.
const (
	pemPrivateKey = "PRIVATE KEY" // PKCS #8
	pemPublicKey  = "PUBLIC KEY"  // PKIX
)

// LoadOrCreateKey returns the Ed25519 private key in the PEM file at path
// (a "PRIVATE KEY" block, PKCS #8). If the file does not exist it generates
// a key and writes it atomically (temporary file, then rename) with mode
// 0600, creating the directory with mode 0700 if needed. It refuses a file
// that holds another type of key. Two processes creating the same missing
// file at once may each return a different key; the data directory has one
// owner, so this does not arise in sluiced.
func LoadOrCreateKey(path string) (ed25519.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		return parsePrivateKey(path, data)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("gateway: read key: %w", err)
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("gateway: generate key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("gateway: encode key: %w", err)
	}
	if err := writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der})); err != nil {
		return nil, fmt.Errorf("gateway: write key: %w", err)
	}
	return key, nil
}

// LoadPublicKey returns the Ed25519 public key in the PEM file at path: a
// "PUBLIC KEY" block (PKIX), or a "PRIVATE KEY" block (PKCS #8) whose
// public half it takes, so verifiers can read sluiced's key file directly.
func LoadPublicKey(path string) (ed25519.PublicKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gateway: read key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("gateway: %s: no PEM block", path)
	}
	switch block.Type {
	case pemPrivateKey:
		key, err := parsePrivateKey(path, data)
		if err != nil {
			return nil, err
		}
		return key.Public().(ed25519.PublicKey), nil
	case pemPublicKey:
		k, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("gateway: %s: %w", path, err)
		}
		pub, ok := k.(ed25519.PublicKey)
		if !ok {
			return nil, fmt.Errorf("gateway: %s: %T, want an Ed25519 key", path, k)
		}
		return pub, nil
	}
	return nil, fmt.Errorf("gateway: %s: PEM block %q, want %q or %q", path, block.Type, pemPublicKey, pemPrivateKey)
}

// parsePrivateKey decodes the first PEM block of data as a PKCS #8 Ed25519
// private key.
func parsePrivateKey(path string, data []byte) (ed25519.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("gateway: %s: no PEM block", path)
	}
	if block.Type != pemPrivateKey {
		return nil, fmt.Errorf("gateway: %s: PEM block %q, want %q", path, block.Type, pemPrivateKey)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("gateway: %s: %w", path, err)
	}
	key, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("gateway: %s: %T, want an Ed25519 key", path, k)
	}
	return key, nil
}

// writeFileAtomic writes data to path with mode 0600 through a temporary
// file in the same directory and a rename, so readers see either no file or
// the whole file. It creates the directory with mode 0700 if needed.
func writeFileAtomic(path string, data []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*") // mode 0600
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // fails harmlessly after the rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	// Make the rename durable. Some file systems cannot sync a directory;
	// the file itself is already synced, so that is not an error.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
