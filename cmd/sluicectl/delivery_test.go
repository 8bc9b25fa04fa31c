package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sluicehq/sluice/gateway"
)

// TestDelivery drives switches, package releases, producer keys and pushes
// through sluicectl against the real sluiced binary, authenticated with the
// token sluiced generated in its data directory.
func TestDelivery(t *testing.T) {
	t.Setenv("SLUICE_ADMIN_TOKEN", "") // the token comes from the data directory
	data := startSluiced(t)
	tmp := t.TempDir()
	write := func(name string, b []byte) string {
		t.Helper()
		p := filepath.Join(tmp, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	must := func(want string, args ...string) string {
		t.Helper()
		out, err := ctl(t, append([]string{"--data", data}, args...)...)
		if err != nil {
			t.Fatalf("sluicectl %v: %v\n%s", args, err, out)
		}
		if !regexp.MustCompile(want).MatchString(out) {
			t.Fatalf("sluicectl %v printed:\n%s\nwant %q", args, out, want)
		}
		return out
	}
	fails := func(want string, args ...string) {
		t.Helper()
		out, err := ctl(t, append([]string{"--data", data}, args...)...)
		if err == nil || !regexp.MustCompile(want).MatchString(err.Error()) {
			t.Fatalf("sluicectl %v: %v\n%s\nwant an error matching %q", args, err, out, want)
		}
	}

	// Authentication: the right token is found in the data directory; a
	// wrong one, or none, is an error that says so.
	out, err := ctl(t, "--data", data, "--admin-token", "wrong-token-0123456789", "switch", "list")
	if !errors.Is(err, errUnauthenticated) || !strings.Contains(err.Error(), "--admin-token") {
		t.Fatalf("a wrong token: %v\n%s", err, out)
	}
	raw, err := os.ReadFile(filepath.Join(data, "endpoints.json"))
	if err != nil {
		t.Fatal(err)
	}
	adminURL := regexp.MustCompile(`"admin": "([^"]+)"`).FindStringSubmatch(string(raw))
	if adminURL == nil {
		t.Fatalf("no admin URL in %s", raw)
	}
	if out, err := ctl(t, "--data", t.TempDir(), "--admin", adminURL[1], "switch", "list"); !errors.Is(err, errUnauthenticated) ||
		!strings.Contains(err.Error(), "no admin token") {
		t.Fatalf("no token at all: %v\n%s", err, out)
	}
	tok, _ := os.ReadFile(filepath.Join(data, "admin.token"))
	must(`(?m)^KEY\s+TYPE`, "--data", t.TempDir(), "--admin", adminURL[1], "--admin-token", strings.TrimSpace(string(tok)), "switch", "list")

	// The manifest key apps pin.
	must(`(?m)^public_key [0-9a-f]{64}\nkey_id [0-9a-f]{16}$`, "delivery", "key")

	// Switches.
	sw := write("switch.json", []byte(`{"type":"SWITCH_TYPE_BOOL","defaultValue":{"boolValue":true},"description":"new checkout",
		"variants":[{"name":"beta","rule":{"users":["alice"],"percent":0},"value":{"boolValue":false}}]}`))
	must(`switch checkout type=bool default=true state=live version=\d+ updated_by=admin`, "switch", "set", "checkout", "--file", sw)
	must(`(?s)switch checkout type=bool default=true state=live.*description: new checkout.*variant beta = false when percent=0 users=alice`,
		"switch", "get", "checkout")
	must(`(?m)^checkout\s+bool\s+true\s+live\s+1\s+\d+\s+admin$`, "switch", "list")
	must(`(?m)^view of device phone digest=\S+\nswitch checkout = true variant=- version=\d+$`, "delivery", "view", "phone", "--os", "ios")
	must(`switch checkout = false variant=beta`, "delivery", "view", "phone", "--user", "alice")
	must(`switch checkout .*state=killed→false`, "switch", "kill", "checkout")
	must(`switch checkout .*state=live`, "switch", "unkill", "checkout")
	fails(`ERROR_CODE_CONFLICT`, "switch", "set", "checkout", "--file", sw, "--expect", "1")
	must(`switch checkout removed`, "switch", "rm", "checkout")
	fails(`not found.*ERROR_CODE_NOT_FOUND`, "switch", "get", "checkout")

	// Two versions of a package: gray, full, pause, resume, rollback.
	v1 := make([]byte, 8192)
	_, _ = rand.Read(v1[:1024])
	v2 := append([]byte("version two\n"), v1...)
	f1, f2 := write("app-1.bin", v1), write("app-2.bin", v2)
	must(`uploaded app 1\.0 kind=app stage=draft size=8192 sha256=[0-9a-f]{64} diffs=0`, "package", "upload", "app", "--kind", "app", "--version", "1.0", "--file", f1, "--notes", "first")
	must(`app 1\.0 kind=app stage=gray size=8192 gray=\[percent=20\]`, "package", "gray", "app", "1.0", "--percent", "20")
	must(`app 1\.0 kind=app stage=full`, "package", "full", "app", "1.0")
	must(`uploaded app 2\.0 kind=app stage=draft size=8204`, "package", "upload", "app", "--kind", "app", "--version", "2.0", "--file", f2,
		"--audience-json", `{"os":["ios","android"]}`, "--fallback-url", "https://cdn.example.com/app-2.bin")
	fails(`ERROR_CODE_CONFLICT`, "package", "upload", "app", "--kind", "app", "--version", "1.5", "--file", f2)
	must(`app 2\.0 kind=app stage=gray size=8204 gray=\[percent=10 os=ios\]`, "package", "gray", "app", "2.0", "--percent", "10", "--os", "ios")
	must(`app 2\.0 kind=app stage=gray size=8204 gray=\[percent=5 users=bob\]`, "package", "gray", "app", "2.0", "--rule-json", `{"users":["bob"],"percent":5}`)
	must(`matching=0 known=0 sample=-`, "package", "dry-run", "app", "2.0")
	must(`matching=0 known=0`, "delivery", "dry-run", "--os", "ios")
	must(`app 2\.0 kind=app stage=gray,paused`, "package", "pause", "app", "2.0")
	fails(`ERROR_CODE_CONFLICT`, "package", "full", "app", "2.0")
	must(`app 2\.0 kind=app stage=gray size`, "package", "resume", "app", "2.0")
	must(`app 2\.0 kind=app stage=full`, "package", "full", "app", "2.0")
	must(`(?m)^app\s+app\s+1\.0\s+full\s+8192\s+-.*\n^app\s+app\s+2\.0\s+full\s+8204`, "package", "list")
	must(`(?s)app 2\.0 kind=app stage=full.*audience: os=ios,android.*fallback: https://cdn.example.com/app-2.bin`, "package", "show", "app")
	must(`rolled back app to 1\.0\napp 1\.0 kind=app stage=full`, "package", "rollback", "app")
	must(`(?m)^app 2\.0 kind=app stage=rolled_back`, "package", "show", "app")
	fails(`ERROR_CODE_NOT_FOUND`, "package", "show", "nosuch")

	// Producer keys and signed hot patches.
	keyFile := filepath.Join(tmp, "keys", "producer.key")
	out = must(`^[0-9a-f]{64}\n`, "producer-key", "gen", keyFile)
	pubHex := strings.Fields(out)[0]
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, %v; want mode 0600", fi, err)
	}
	if pub, err := gateway.LoadPublicKey(keyFile); err != nil || hex.EncodeToString(pub) != pubHex {
		t.Fatalf("gen printed %s, the file holds %x (%v)", pubHex, pub, err)
	}
	fails(`exists`, "producer-key", "gen", keyFile)
	must(`producer key ci registered`, "producer-key", "add", "ci", "--key-file", keyFile)
	otherPub, _, _ := ed25519.GenerateKey(rand.Reader)
	must(`producer key old registered`, "producer-key", "add", "old", "--public-key", hex.EncodeToString(otherPub))
	must(`producer key old revoked`, "producer-key", "revoke", "old")
	must(`(?m)^ci\s+`+pubHex+`\s+active\s.*\n^old\s+[0-9a-f]{64}\s+revoked`, "producer-key", "list")
	patch := write("patch.bin", []byte("a hot patch"))
	must(`uploaded patch 1 kind=hot_patch stage=draft size=11`, "package", "upload", "patch", "--kind", "hot_patch", "--version", "1",
		"--file", patch, "--producer-key", "ci", "--sign-with", keyFile)
	must(`signed by producer key ci`, "package", "show", "patch")
	fails(`must be signed.*ERROR_CODE_SIGNATURE`, "package", "upload", "patch", "--kind", "hot_patch", "--version", "2", "--file", patch)
	fails(`ERROR_CODE_SIGNATURE`, "package", "upload", "patch", "--kind", "hot_patch", "--version", "2", "--file", patch,
		"--producer-key", "ci", "--signature", hex.EncodeToString(make([]byte, 64)))
	fails(`ERROR_CODE_SIGNATURE`, "package", "upload", "patch", "--kind", "hot_patch", "--version", "2", "--file", patch,
		"--producer-key", "old", "--sign-with", keyFile)

	// Pushes.
	must(`matching=0 known=0`, "push", "dry-run", "--users", "alice,bob", "--title", "hi")
	must(`push p1 sent targets=2 expires=`, "push", "send", "--id", "p1", "--users", "alice,bob", "--title", "Hi {{name}}", "--var", "name=you",
		"--ttl", "1h", "--priority", "high", "--action", "app://inbox", "--collapse", "news")
	must(`push p1 sent .*duplicate`, "push", "send", "--id", "p1", "--users", "alice,bob", "--title", "Hi {{name}}", "--var", "name=you")
	must(`push p1 targeted=0 sent=\d+ delivered=0 opened=0 expired=0 offline=0 recalled=false`, "push", "funnel", "p1")
	must(`push p1 recalled`, "push", "recall", "p1")
	must(`push p1 .*recalled=true`, "push", "funnel", "p1")
	must(`(?m)^p1$`, "push", "recalled")
	pushFile := write("push.json", []byte(`{"id":"p2","title":"for everyone","everyone":true}`))
	must(`push p2 sent targets=0 job=\S+`, "push", "send", "--file", pushFile)
	fails(`--file excludes --title`, "push", "send", "--file", pushFile, "--title", "x")
	fails(`ERROR_CODE_NO_TARGETS|ERROR_CODE_INVALID`, "push", "send", "--id", "p3", "--users", ",", "--title", "x")

	// The device registry knows no device: none has connected.
	fails(`ERROR_CODE_NOT_FOUND`, "device", "show", "phone")
}
