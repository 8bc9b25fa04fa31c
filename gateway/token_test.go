package gateway_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/gateway"
)

// now is the verifiers' clock in these tests; the fuzz seeds depend on it.
var now = time.Unix(1_800_000_000, 0)

// MustKey returns a deterministic Ed25519 key: the same seed byte, the same
// key, so committed fuzz seeds stay valid.
func MustKey(tb testing.TB, seed byte) ed25519.PrivateKey {
	tb.Helper()
	return ed25519.NewKeyFromSeed(bytes32(seed))
}

func bytes32(b byte) []byte {
	s := make([]byte, ed25519.SeedSize)
	for i := range s {
		s[i] = b
	}
	return s
}

func pub(k ed25519.PrivateKey) ed25519.PublicKey { return k.Public().(ed25519.PublicKey) }

// signRaw signs arbitrary claims bytes the way Issue signs its JSON, to
// test what Verify makes of authentic but unusual claims.
func signRaw(key ed25519.PrivateKey, claims []byte) string {
	signed := "v1." + base64.RawURLEncoding.EncodeToString(claims)
	return signed + "." + base64.RawURLEncoding.EncodeToString(ed25519.Sign(key, []byte(signed)))
}

// MustIssue issues a token for c or fails the test.
func MustIssue(tb testing.TB, s *gateway.Signer, c gateway.Claims) string {
	tb.Helper()
	tok, err := s.Issue(c)
	if err != nil {
		tb.Fatalf("Issue(%+v): %v", c, err)
	}
	return tok
}

func sameClaims(a, b gateway.Claims) bool {
	return a.User == b.User && a.Device == b.Device && a.App == b.App &&
		a.IssuedAt.Equal(b.IssuedAt) && a.Expires.Equal(b.Expires)
}

func TestTokenRoundTrip(t *testing.T) {
	key := MustKey(t, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	for _, want := range []gateway.Claims{
		{User: "alice", Device: "phone-1", App: "chat_app", IssuedAt: now, Expires: now.Add(time.Hour)},
		{Device: "kiosk", App: "demo", IssuedAt: now.Add(-time.Hour), Expires: now.Add(time.Second)},
		{User: strings.Repeat("u", 64), Device: strings.Repeat("D", 64), App: strings.Repeat("-", 64),
			IssuedAt: now, Expires: time.Unix(1<<62, 0)},
	} {
		tok := MustIssue(t, s, want)
		if len(tok) > gateway.MaxTokenLen/2 {
			t.Errorf("token is %d bytes, want at most %d", len(tok), gateway.MaxTokenLen/2)
		}
		got, err := v.Verify(tok, now)
		if err != nil {
			t.Fatalf("Verify(%q): %v", tok, err)
		}
		if !sameClaims(got, want) {
			t.Errorf("Verify gave %+v, want %+v", got, want)
		}
	}
}

func TestTokenIssuedAtDefaultsToNow(t *testing.T) {
	key := MustKey(t, 1)
	before := time.Now().Truncate(time.Second)
	tok := MustIssue(t, gateway.NewSigner(key), gateway.Claims{Device: "d", App: "a", Expires: time.Now().Add(time.Hour)})
	got, err := gateway.NewVerifier(pub(key)).Verify(tok, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if got.IssuedAt.Before(before) || got.IssuedAt.After(time.Now()) {
		t.Errorf("IssuedAt %v, want about now (%v)", got.IssuedAt, before)
	}
}

func TestTokenTruncatesToSeconds(t *testing.T) {
	key := MustKey(t, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	tok := MustIssue(t, s, gateway.Claims{Device: "d", App: "a", IssuedAt: now.Add(900 * time.Millisecond), Expires: now.Add(1500 * time.Millisecond)})
	got, err := v.Verify(tok, now)
	if err != nil {
		t.Fatal(err)
	}
	if !got.IssuedAt.Equal(now) || !got.Expires.Equal(now.Add(time.Second)) {
		t.Errorf("times %v, %v; want %v, %v", got.IssuedAt, got.Expires, now, now.Add(time.Second))
	}
	// Within one second after truncation there is no validity left.
	if _, err := s.Issue(gateway.Claims{Device: "d", App: "a", IssuedAt: now.Add(100 * time.Millisecond), Expires: now.Add(900 * time.Millisecond)}); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Errorf("Issue with expiry in the same second: %v, want ErrTokenInvalid", err)
	}
}

func TestTokenExpired(t *testing.T) {
	key := MustKey(t, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	want := gateway.Claims{User: "alice", Device: "phone", App: "demo", IssuedAt: now.Add(-time.Hour), Expires: now}
	tok := MustIssue(t, s, want)
	for _, at := range []time.Time{now, now.Add(time.Nanosecond), now.Add(24 * time.Hour)} {
		got, err := v.Verify(tok, at)
		if !errors.Is(err, gateway.ErrTokenExpired) || errors.Is(err, gateway.ErrTokenInvalid) {
			t.Fatalf("Verify at %v: %v, want ErrTokenExpired only", at, err)
		}
		if !sameClaims(got, want) {
			t.Errorf("expired token's claims %+v, want %+v", got, want)
		}
	}
	if _, err := v.Verify(tok, now.Add(-time.Nanosecond)); err != nil {
		t.Errorf("Verify just before expiry: %v", err)
	}
	// An expired token that is also forged is invalid, not expired.
	forged := tok[:len(tok)-2] + flip(tok[len(tok)-2])
	if _, err := v.Verify(forged, now); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Errorf("forged expired token: %v, want ErrTokenInvalid", err)
	}
}

func TestTokenIssuedInTheFuture(t *testing.T) {
	key := MustKey(t, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	for _, tc := range []struct {
		ahead time.Duration
		ok    bool
	}{
		{30 * time.Second, true},
		{gateway.MaxClockSkew, true},
		{gateway.MaxClockSkew + time.Second, false},
		{24 * time.Hour, false},
	} {
		tok := MustIssue(t, s, gateway.Claims{Device: "d", App: "a", IssuedAt: now.Add(tc.ahead), Expires: now.Add(tc.ahead + time.Hour)})
		_, err := v.Verify(tok, now)
		if tc.ok && err != nil || !tc.ok && !errors.Is(err, gateway.ErrTokenInvalid) {
			t.Errorf("issued %v ahead: %v, want ok=%v", tc.ahead, err, tc.ok)
		}
	}
}

// flip returns a base64url character other than c.
func flip(c byte) string {
	if c == 'A' {
		return "B"
	}
	return "A"
}

func TestTokenTampered(t *testing.T) {
	key := MustKey(t, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	tok := MustIssue(t, s, gateway.Claims{User: "alice", Device: "phone", App: "demo", IssuedAt: now, Expires: now.Add(time.Hour)})
	// Every single-character change, in the prefix, the claims or the
	// signature, is refused as invalid.
	for i := range len(tok) {
		bad := tok[:i] + flip(tok[i]) + tok[i+1:]
		if _, err := v.Verify(bad, now); !errors.Is(err, gateway.ErrTokenInvalid) {
			t.Fatalf("token with byte %d changed (%q): %v, want ErrTokenInvalid", i, bad, err)
		}
	}
	// So is a flipped bit in the decoded signature.
	dot := strings.LastIndexByte(tok, '.')
	sig, err := base64.RawURLEncoding.DecodeString(tok[dot+1:])
	if err != nil {
		t.Fatal(err)
	}
	sig[10] ^= 1
	if _, err := v.Verify(tok[:dot+1]+base64.RawURLEncoding.EncodeToString(sig), now); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Errorf("flipped signature bit: %v, want ErrTokenInvalid", err)
	}
}

func TestTokenOtherKey(t *testing.T) {
	tok := MustIssue(t, gateway.NewSigner(MustKey(t, 2)), gateway.Claims{Device: "d", App: "a", IssuedAt: now, Expires: now.Add(time.Hour)})
	if _, err := gateway.NewVerifier(pub(MustKey(t, 1))).Verify(tok, now); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Errorf("token of another key: %v, want ErrTokenInvalid", err)
	}
	for _, v := range []*gateway.Verifier{gateway.NewVerifier(), gateway.NewVerifier(ed25519.PublicKey("short"), nil)} {
		if _, err := v.Verify(tok, now); !errors.Is(err, gateway.ErrTokenInvalid) {
			t.Errorf("verifier without usable keys: %v, want ErrTokenInvalid", err)
		}
	}
}

func TestTokenRotation(t *testing.T) {
	oldKey, newKey := MustKey(t, 1), MustKey(t, 2)
	c := gateway.Claims{Device: "d", App: "a", IssuedAt: now, Expires: now.Add(time.Hour)}
	oldTok := MustIssue(t, gateway.NewSigner(oldKey), c)
	newTok := MustIssue(t, gateway.NewSigner(newKey), c)
	both := gateway.NewVerifier(pub(oldKey), pub(newKey))
	for name, tok := range map[string]string{"old": oldTok, "new": newTok} {
		if _, err := both.Verify(tok, now); err != nil {
			t.Errorf("rotating verifier refused the %s key's token: %v", name, err)
		}
	}
	after := gateway.NewVerifier(pub(newKey))
	if _, err := after.Verify(oldTok, now); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Errorf("retired key's token: %v, want ErrTokenInvalid", err)
	}
	if _, err := after.Verify(newTok, now); err != nil {
		t.Errorf("new key's token: %v", err)
	}
}

func TestIssueRefuses(t *testing.T) {
	s := gateway.NewSigner(MustKey(t, 1))
	ok := gateway.Claims{User: "u", Device: "d", App: "a", IssuedAt: now, Expires: now.Add(time.Hour)}
	for name, mod := range map[string]func(*gateway.Claims){
		"bad user":        func(c *gateway.Claims) { c.User = "a.b" },
		"long user":       func(c *gateway.Claims) { c.User = strings.Repeat("u", 65) },
		"no device":       func(c *gateway.Claims) { c.Device = "" },
		"bad device":      func(c *gateway.Claims) { c.Device = "ph one" },
		"no app":          func(c *gateway.Claims) { c.App = "" },
		"bad app":         func(c *gateway.Claims) { c.App = "com.example.app" },
		"no expiry":       func(c *gateway.Claims) { c.Expires = time.Time{} },
		"expiry at issue": func(c *gateway.Claims) { c.Expires = c.IssuedAt },
		"expiry before":   func(c *gateway.Claims) { c.Expires = c.IssuedAt.Add(-time.Hour) },
		"issued in 1970":  func(c *gateway.Claims) { c.IssuedAt = time.Unix(0, 0) },
	} {
		c := ok
		mod(&c)
		if tok, err := s.Issue(c); !errors.Is(err, gateway.ErrTokenInvalid) {
			t.Errorf("%s: Issue gave %q, %v; want ErrTokenInvalid", name, tok, err)
		}
	}
	if _, err := gateway.NewSigner(ed25519.PrivateKey("short")).Issue(ok); err == nil {
		t.Error("Issue with a short key succeeded")
	}
}

func TestVerifyMalformed(t *testing.T) {
	key := MustKey(t, 1)
	v := gateway.NewVerifier(pub(key))
	good := MustIssue(t, gateway.NewSigner(key), gateway.Claims{Device: "d", App: "a", IssuedAt: now, Expires: now.Add(time.Hour)})
	body := strings.TrimPrefix(good, "v1.")
	claimsEnc, sigEnc, _ := strings.Cut(body, ".")
	signed := func(json string) string { return signRaw(key, []byte(json)) }
	for name, tok := range map[string]string{
		"empty":               "",
		"prefix only":         "v1.",
		"no dots":             "v1" + claimsEnc + sigEnc,
		"one dot":             "v1." + claimsEnc + sigEnc,
		"three parts":         good + "." + sigEnc,
		"empty claims":        "v1.." + sigEnc,
		"empty signature":     "v1." + claimsEnc + ".",
		"bad base64":          "v1." + claimsEnc[:4] + "*+/" + claimsEnc[7:] + "." + sigEnc,
		"padding":             "v1." + claimsEnc + "=." + sigEnc,
		"newline in claims":   "v1." + claimsEnc[:5] + "\n" + claimsEnc[5:] + "." + sigEnc,
		"short signature":     "v1." + claimsEnc + "." + sigEnc[:80],
		"long signature":      good + "AAAA",
		"huge":                "v1." + strings.Repeat("A", 1<<20) + "." + sigEnc,
		"just over the limit": "v1." + strings.Repeat("A", gateway.MaxTokenLen-len(sigEnc)-3) + "." + sigEnc,
		"version 2":           "v2." + body,
		"upper-case version":  "V1." + body,
		"no version":          body,
		"leading space":       " " + good,
		"trailing newline":    good + "\n",
		"bad user":            signed(`{"u":"a/b","d":"d","a":"a","iat":1800000000,"exp":1800003600}`),
		"bad device":          signed(`{"u":"","d":"d d","a":"a","iat":1800000000,"exp":1800003600}`),
		"long device":         signed(`{"u":"","d":"` + strings.Repeat("d", 65) + `","a":"a","iat":1800000000,"exp":1800003600}`),
		"bad app":             signed(`{"u":"","d":"d","a":"com.example","iat":1800000000,"exp":1800003600}`),
		"missing device":      signed(`{"u":"alice","a":"a","iat":1800000000,"exp":1800003600}`),
		"null device":         signed(`{"u":"alice","d":null,"a":"a","iat":1800000000,"exp":1800003600}`),
		"missing app":         signed(`{"u":"alice","d":"d","iat":1800000000,"exp":1800003600}`),
		"missing iat":         signed(`{"d":"d","a":"a","exp":1800003600}`),
		"missing exp":         signed(`{"d":"d","a":"a","iat":1800000000}`),
		"exp before iat":      signed(`{"d":"d","a":"a","iat":1800000000,"exp":1799999999}`),
		"float time":          signed(`{"d":"d","a":"a","iat":1800000000.5,"exp":1800003600}`),
		"string time":         signed(`{"d":"d","a":"a","iat":"1800000000","exp":1800003600}`),
		"time overflow":       signed(`{"d":"d","a":"a","iat":1800000000,"exp":99999999999999999999}`),
		"unknown field":       signed(`{"d":"d","a":"a","iat":1800000000,"exp":1800003600,"admin":true}`),
		"trailing data":       signed(`{"d":"d","a":"a","iat":1800000000,"exp":1800003600}{}`),
		"not an object":       signed(`["d","a"]`),
		"not json":            signed(`hello`),
		"empty json":          signed(``),
		"invalid utf-8":       signed("{\"d\":\"\xff\",\"a\":\"a\",\"iat\":1800000000,\"exp\":1800003600}"),
	} {
		t.Run(name, func(t *testing.T) {
			got, err := v.Verify(tok, now)
			if !errors.Is(err, gateway.ErrTokenInvalid) {
				t.Fatalf("Verify: %+v, %v; want ErrTokenInvalid", got, err)
			}
			if got != (gateway.Claims{}) {
				t.Errorf("refused token gave claims %+v", got)
			}
		})
	}
	// The same shapes, done right, are accepted: the table above fails for
	// the stated reason, not a typo.
	if _, err := v.Verify(signed(`{"u":"alice","d":"d","a":"a","iat":1800000000,"exp":1800003600}`), now); err != nil {
		t.Errorf("hand-signed valid claims: %v", err)
	}
	if _, err := v.Verify(signed(` {"exp":1800003600, "iat":1800000000,"a":"a","d":"d"} `), now); err != nil {
		t.Errorf("hand-signed valid claims in another order: %v", err)
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data", "keys")
	path := filepath.Join(dir, "token.key")
	key, err := gateway.LoadOrCreateKey(path)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	for p, want := range map[string]os.FileMode{path: 0o600, dir: 0o700} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Errorf("%s has mode %v, want %v", p, got, want)
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("key directory holds %d files, want only the key (no temporary file left)", len(entries))
	}
	again, err := gateway.LoadOrCreateKey(path)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if !key.Equal(again) {
		t.Error("second LoadOrCreateKey returned another key")
	}

	// The public key, read from the private key file or from a PKIX file,
	// verifies what the private key signs.
	der, err := x509.MarshalPKIXPublicKey(pub(key))
	if err != nil {
		t.Fatal(err)
	}
	pubPath := filepath.Join(dir, "token.pub")
	if err := os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	tok := MustIssue(t, gateway.NewSigner(key), gateway.Claims{Device: "d", App: "a", IssuedAt: now, Expires: now.Add(time.Hour)})
	for _, p := range []string{path, pubPath} {
		pk, err := gateway.LoadPublicKey(p)
		if err != nil {
			t.Fatalf("LoadPublicKey(%s): %v", p, err)
		}
		if _, err := gateway.NewVerifier(pk).Verify(tok, now); err != nil {
			t.Errorf("public key from %s: %v", p, err)
		}
	}
}

func TestLoadKeyRefuses(t *testing.T) {
	dir := t.TempDir()
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ecDER, err := x509.MarshalPKCS8PrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	ecPubDER, err := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ecPriv := write("ec.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ecDER}))
	ecPub := write("ec.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: ecPubDER}))
	garbage := write("garbage.key", []byte("not a key"))
	wrongBlock := write("cert.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1, 2, 3}}))
	badDER := write("bad.key", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}}))

	for _, p := range []string{ecPriv, ecPub, garbage, wrongBlock, badDER} {
		before, _ := os.ReadFile(p)
		if _, err := gateway.LoadOrCreateKey(p); err == nil {
			t.Errorf("LoadOrCreateKey(%s) accepted it", filepath.Base(p))
		}
		if after, _ := os.ReadFile(p); string(after) != string(before) {
			t.Errorf("LoadOrCreateKey(%s) changed the file", filepath.Base(p))
		}
		if _, err := gateway.LoadPublicKey(p); err == nil {
			t.Errorf("LoadPublicKey(%s) accepted it", filepath.Base(p))
		}
	}
	if _, err := gateway.LoadPublicKey(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("LoadPublicKey of a missing file: %v, want os.ErrNotExist", err)
	}
}

// FuzzVerify feeds arbitrary tokens to Verify, and arbitrary claims bytes
// signed with the trusted key (random tokens almost never get past the
// signature, so the second input is what exercises the claims decoder).
// Verify must never panic, must refuse with one of its two sentinels, and
// a token it accepts must verify again to identical claims and survive
// re-issuing. Seeds: testdata/fuzz/FuzzVerify.
func FuzzVerify(f *testing.F) {
	key := MustKey(f, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	valid, err := s.Issue(gateway.Claims{User: "alice", Device: "phone", App: "demo", IssuedAt: now, Expires: now.Add(time.Hour)})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid, []byte(`{"u":"alice","d":"phone","a":"demo","iat":1800000000,"exp":1800003600}`))
	f.Add("", []byte{})
	check := func(t *testing.T, tok string) {
		c, err := v.Verify(tok, now)
		if err != nil {
			if !errors.Is(err, gateway.ErrTokenInvalid) && !errors.Is(err, gateway.ErrTokenExpired) {
				t.Fatalf("Verify(%q): untyped error %v", tok, err)
			}
			return
		}
		if len(tok) > gateway.MaxTokenLen {
			t.Fatalf("accepted a %d-byte token", len(tok))
		}
		again, err := v.Verify(tok, now)
		if err != nil || again != c {
			t.Fatalf("accepted token re-verifies to %+v, %v; first %+v", again, err, c)
		}
		reissued, err := s.Issue(c)
		if err != nil {
			t.Fatalf("re-issue accepted claims %+v: %v", c, err)
		}
		back, err := v.Verify(reissued, now)
		if err != nil || back != c {
			t.Fatalf("re-issued token verifies to %+v, %v; want %+v", back, err, c)
		}
	}
	f.Fuzz(func(t *testing.T, tok string, claims []byte) {
		check(t, tok)
		check(t, signRaw(key, claims))
	})
}

// A gateway verifies the token an app presents; sluiced signs it.
func ExampleVerifier_Verify() {
	key := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)) // use LoadOrCreateKey
	issued := time.Date(2027, 1, 15, 8, 0, 0, 0, time.UTC)
	tok, err := gateway.NewSigner(key).Issue(gateway.Claims{
		User: "alice", Device: "phone-1", App: "chat", IssuedAt: issued, Expires: issued.Add(24 * time.Hour),
	})
	if err != nil {
		panic(err)
	}
	v := gateway.NewVerifier(key.Public().(ed25519.PublicKey))
	c, err := v.Verify(tok, issued.Add(time.Hour))
	fmt.Println(c.User, c.Device, c.App, c.Expires, err)
	_, err = v.Verify(tok, issued.Add(48*time.Hour))
	fmt.Println(errors.Is(err, gateway.ErrTokenExpired))
	// Output:
	// alice phone-1 chat 2027-01-16 08:00:00 +0000 UTC <nil>
	// true
}

// TestVerifiedTokensStillExpire: a token verified once is remembered, and
// still expires (and is still refused as issued in the future) on time.
func TestVerifiedTokensStillExpire(t *testing.T) {
	key := MustKey(t, 1)
	s, v := gateway.NewSigner(key), gateway.NewVerifier(pub(key))
	want := gateway.Claims{User: "alice", Device: "phone", App: "demo", IssuedAt: now, Expires: now.Add(time.Minute)}
	tok := MustIssue(t, s, want)
	for range 3 { // the first call verifies, the others hit the cache
		if got, err := v.Verify(tok, now); err != nil || !sameClaims(got, want) {
			t.Fatalf("Verify: %+v, %v", got, err)
		}
	}
	if _, err := v.Verify(tok, now.Add(time.Minute)); !errors.Is(err, gateway.ErrTokenExpired) {
		t.Fatalf("remembered token after expiry: %v, want ErrTokenExpired", err)
	}
	if _, err := v.Verify(tok, now.Add(-2*gateway.MaxClockSkew)); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Fatalf("remembered token before its issue time: %v, want ErrTokenInvalid", err)
	}
	// Another verifier (other keys) does not share what this one saw.
	other := gateway.NewVerifier(pub(MustKey(t, 2)))
	if _, err := other.Verify(tok, now); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Fatalf("other verifier: %v", err)
	}
}
