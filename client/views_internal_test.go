package client

import (
	"context"
	"crypto/ed25519"
	"errors"
	"slices"
	"testing"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// TestVerifyManifest checks manifests signed by the server's Signer:
// the client's verdict is the server's (delivery.VerifyManifest) on good
// and damaged ones.
func TestVerifyManifest(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	m := &deliverypb.Manifest{Package: "app", Version: "2", Serial: 4, Url: "/v1/packages/app/2", ExpiresMs: 1 << 50}
	good, err := delivery.NewSigner(priv).Sign(m)
	if err != nil {
		t.Fatal(err)
	}
	damage := func(f func(sm *deliverypb.SignedManifest)) *deliverypb.SignedManifest {
		sm := proto.Clone(good).(*deliverypb.SignedManifest)
		f(sm)
		return sm
	}
	for _, tc := range []struct {
		name string
		sm   *deliverypb.SignedManifest
		keys []ed25519.PublicKey
		ok   bool
	}{
		{"good", good, []ed25519.PublicKey{pub}, true},
		{"good, second of two keys", good, []ed25519.PublicKey{other, pub}, true},
		{"untrusted key", good, []ed25519.PublicKey{other}, false},
		{"no keys", good, nil, false},
		{"manifest altered", damage(func(sm *deliverypb.SignedManifest) { sm.Manifest[len(sm.Manifest)-1] ^= 1 }), []ed25519.PublicKey{pub}, false},
		{"signature altered", damage(func(sm *deliverypb.SignedManifest) { sm.Signature[0] ^= 1 }), []ed25519.PublicKey{pub}, false},
		{"signature truncated", damage(func(sm *deliverypb.SignedManifest) { sm.Signature = sm.Signature[:63] }), []ed25519.PublicKey{pub}, false},
		{"key id of another key", damage(func(sm *deliverypb.SignedManifest) { sm.KeyId = delivery.KeyID(other) }), []ed25519.PublicKey{pub, other}, false},
		{"nil", nil, []ed25519.PublicKey{pub}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := verifyManifest(tc.sm, tc.keys)
			_, serverErr := delivery.VerifyManifest(tc.sm, tc.keys...)
			if (err == nil) != tc.ok || (serverErr == nil) != tc.ok {
				t.Fatalf("verifyManifest: %v; delivery.VerifyManifest: %v; want ok %v", err, serverErr, tc.ok)
			}
			if tc.ok && !proto.Equal(got, m) {
				t.Fatalf("manifest %v, want %v", got, m)
			}
			if !tc.ok && !errors.Is(err, ErrSignature) {
				t.Fatalf("error %v, want ErrSignature", err)
			}
		})
	}
}

// TestCompareVersions checks the client's version order against the
// server's (oplog.CompareVersions) on every pair of a set of versions.
func TestCompareVersions(t *testing.T) {
	vs := []string{"", "0", "1", "1.0", "1.0.0", "1.2", "1.2.1", "1.10", "1.9", "2", "2.0.0-alpha", "2.0.0-beta",
		"2.0.0-rc1", "2.0.1", "9.8", "10.2", "10.2.1", "18446744073709551615", "18446744073709551614",
		"99999999999999999999", "1.a", "1.b", "a", "007", "7"}
	for _, a := range vs {
		for _, b := range vs {
			if got, want := compareVersions(a, b), oplog.CompareVersions(a, b); got != want {
				t.Errorf("compareVersions(%q, %q) = %d, oplog says %d", a, b, got, want)
			}
		}
	}
	sorted := []string{"1", "1.2", "1.2.1", "1.9", "1.10", "2.0.1", "9.8", "10.2", "10.2.1"}
	if !slices.IsSortedFunc(sorted, compareVersions) {
		t.Errorf("%v not sorted by compareVersions", sorted)
	}
}

// TestNewChecksViewConfig: New refuses a bad HTTP base or manifest key,
// and derives the HTTP base from ws:// and wss:// URLs.
func TestNewChecksViewConfig(t *testing.T) {
	tok := func(context.Context) (string, error) { return "t", nil }
	base := Config{URL: "ws://gw.example:7481/v1/ws", StateDir: t.TempDir(), Token: tok}
	for _, tc := range []struct {
		name string
		mod  func(c *Config)
	}{
		{"HTTPBase without scheme", func(c *Config) { c.HTTPBase = "gw.example:7481" }},
		{"HTTPBase of another scheme", func(c *Config) { c.HTTPBase = "ws://gw.example:7481" }},
		{"HTTPBase with a query", func(c *Config) { c.HTTPBase = "https://gw.example/?a=b" }},
		{"short manifest key", func(c *Config) { c.ManifestKeys = []ed25519.PublicKey{make([]byte, 31)} }},
	} {
		cfg := base
		tc.mod(&cfg)
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New succeeded", tc.name)
		}
	}
	for _, tc := range []struct {
		url, httpBase, want string
	}{
		{"ws://gw.example:7481/v1/ws", "", "http://gw.example:7481"},
		{"wss://gw.example/v1/ws", "", "https://gw.example"},
		{"tcp://gw.example:7480", "", ""},
		{"tls://gw.example:7480", "https://gw.example/sluice/", "https://gw.example/sluice"},
	} {
		cfg := base
		cfg.URL, cfg.HTTPBase = tc.url, tc.httpBase
		c, err := New(cfg)
		if err != nil {
			t.Fatalf("%s: %v", tc.url, err)
		}
		if got := c.httpBase(); got != tc.want {
			t.Errorf("%s with HTTPBase %q: HTTP base %q, want %q", tc.url, tc.httpBase, got, tc.want)
		}
	}
}
