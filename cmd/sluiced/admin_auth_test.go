package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

const (
	aliceToken = "alice-token-0123456789"
	bobToken   = "bob-token-0123456789ab"
)

// writeTokens writes a tokens file for alice and bob.
func writeTokens(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "admins")
	body := "# admins of the test\n\nalice " + aliceToken + "\n  bob\t" + bobToken + "  \n"
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// send makes one request with an Authorization header (none if empty).
func send(t *testing.T, method, url, authz, body string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestAdminAuthHandler(t *testing.T) {
	a, err := loadAdminAuth(Config{AdminTokens: writeTokens(t)}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(a.names(), ","); got != "alice,bob" {
		t.Fatalf("admins %q, want alice,bob", got)
	}
	mux := http.NewServeMux()
	for _, p := range []string{"/healthz", "/readyz", "/v1/whoami"} {
		mux.HandleFunc("GET "+p, func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, actor(r)) })
	}
	srv := httptest.NewServer(a.wrap(mux))
	defer srv.Close()
	for _, tc := range []struct {
		name, path, authz string
		status            int
		body              string
	}{
		{"healthz is open", "/healthz", "", 200, "admin"},
		{"readyz is open", "/readyz", "", 200, "admin"},
		{"no header", "/v1/whoami", "", 401, "no authorization header"},
		{"wrong token", "/v1/whoami", "Bearer " + aliceToken + "x", 401, "wrong token"},
		{"a prefix of a token", "/v1/whoami", "Bearer " + aliceToken[:16], 401, "wrong token"},
		{"another scheme", "/v1/whoami", "Basic " + aliceToken, 401, "not a bearer token"},
		{"bearer without a token", "/v1/whoami", "Bearer ", 401, "not a bearer token"},
		{"a huge token", "/v1/whoami", "Bearer " + strings.Repeat("x", 2000), 401, "wrong token"},
		{"alice", "/v1/whoami", "Bearer " + aliceToken, 200, "alice"},
		{"bob, scheme in lower case", "/v1/whoami", "bearer " + bobToken, 200, "bob"},
		{"unknown route without a token", "/v1/nosuch", "", 401, "no authorization header"},
		{"unknown route with a token", "/v1/nosuch", "Bearer " + bobToken, 404, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := send(t, http.MethodGet, srv.URL+tc.path, tc.authz, "")
			if resp.StatusCode != tc.status || !strings.Contains(body, tc.body) {
				t.Fatalf("got %d %q, want %d with %q", resp.StatusCode, body, tc.status, tc.body)
			}
			if tc.status != http.StatusUnauthorized {
				return
			}
			if h := resp.Header.Get("WWW-Authenticate"); !strings.HasPrefix(h, "Bearer ") {
				t.Errorf("WWW-Authenticate %q, want a Bearer challenge", h)
			}
			var e struct{ Error, Code string }
			if err := json.Unmarshal([]byte(body), &e); err != nil || e.Code != codeUnauthenticated || e.Error == "" {
				t.Errorf("body %q (%v), want JSON with an error and code %s", body, err, codeUnauthenticated)
			}
			if strings.Contains(body, aliceToken) || strings.Contains(body, bobToken) {
				t.Errorf("body %q shows a token", body)
			}
		})
	}
}

func TestLoadAdminAuth(t *testing.T) {
	t.Run("generated in the data directory", func(t *testing.T) {
		dir := t.TempDir()
		a, err := loadAdminAuth(Config{DataDir: dir}, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, adminTokenFile)
		if !strings.HasSuffix(a.source, path+" (generated)") {
			t.Errorf("source %q, want %s (generated)", a.source, path)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", path, fi.Mode().Perm())
		}
		raw, _ := os.ReadFile(path)
		tok := strings.TrimSpace(string(raw))
		if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(tok) {
			t.Fatalf("token %q, want 32 bytes in hex", tok)
		}
		// The next start reads the same token.
		b, err := loadAdminAuth(Config{DataDir: dir}, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		if b.source != path {
			t.Errorf("second source %q, want %s", b.source, path)
		}
		if name, _ := b.authenticate("Bearer " + tok); name != defaultAdmin {
			t.Errorf("the file's token authenticates %q, want %q", name, defaultAdmin)
		}
		entries, _ := os.ReadDir(dir)
		if len(entries) != 1 {
			t.Errorf("data directory holds %v, want only %s", entries, adminTokenFile)
		}
	})
	t.Run("given", func(t *testing.T) {
		dir := t.TempDir()
		a, err := loadAdminAuth(Config{DataDir: dir, AdminToken: aliceToken}, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		if name, _ := a.authenticate("Bearer " + aliceToken); name != defaultAdmin || a.source != "--admin-token" {
			t.Errorf("name %q, source %q; want %q, --admin-token", name, a.source, defaultAdmin)
		}
		if _, err := os.Stat(filepath.Join(dir, adminTokenFile)); !os.IsNotExist(err) {
			t.Errorf("a token file was written: %v", err)
		}
	})
	for name, body := range map[string]string{
		"empty":           "# nobody\n",
		"one field":       "alice\n",
		"three fields":    "alice " + aliceToken + " extra\n",
		"short token":     "alice short\n",
		"bad name":        "al.ice " + aliceToken + "\n",
		"name twice":      "alice " + aliceToken + "\nalice " + bobToken + "\n",
		"token twice":     "alice " + aliceToken + "\nbob " + aliceToken + "\n",
		"control in text": "alice " + aliceToken + "\x01\n",
	} {
		t.Run("tokens file: "+name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "admins")
			if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := loadAdminAuth(Config{AdminTokens: path}, zerolog.Nop())
			if err == nil {
				t.Fatalf("accepted %q", body)
			}
			if strings.Contains(err.Error(), aliceToken) || strings.Contains(err.Error(), bobToken) {
				t.Errorf("error %q shows a token", err)
			}
		})
	}
	if _, err := loadAdminAuth(Config{AdminTokens: filepath.Join(t.TempDir(), "missing")}, zerolog.Nop()); err == nil {
		t.Error("a missing tokens file accepted")
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, adminTokenFile), []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadAdminAuth(Config{DataDir: dir}, zerolog.Nop()); err == nil {
		t.Error("an empty admin.token accepted")
	}
}

// TestAdminAPIAuth runs sluiced in-process with a tokens file: the admin
// API refuses requests without a right token, serves the right ones, and
// records the admin's name in the changes it makes.
func TestAdminAPIAuth(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	admin := "http://" + ln.Addr().String()
	ln.Close()
	data := t.TempDir()
	cfg, err := parseConfig([]string{"--data", data, "--nats-listen", "127.0.0.1:0", "--admin", strings.TrimPrefix(admin, "http://"),
		"--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0", "--admin-tokens", writeTokens(t)}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	m := NewMain(cfg, zerolog.Nop())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		m.Close()
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(admin + "/readyz") // open: no token
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if resp, body := send(t, http.MethodGet, admin+"/healthz", "", ""); resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz without a token: %d %s", resp.StatusCode, body)
	}
	for authz, want := range map[string]int{"": 401, "Bearer wrong-token-0123456789": 401, "Bearer " + aliceToken: 200} {
		if resp, body := send(t, http.MethodGet, admin+"/v1/info", authz, ""); resp.StatusCode != want {
			t.Errorf("GET /v1/info with %q: %d %s, want %d", authz, resp.StatusCode, body, want)
		}
	}
	if _, err := os.Stat(filepath.Join(data, adminTokenFile)); !os.IsNotExist(err) {
		t.Errorf("with --admin-tokens, %s was written: %v", adminTokenFile, err)
	}
	// The actor of a change is the admin whose token made it.
	sw := `{"type":"SWITCH_TYPE_BOOL","defaultValue":{"boolValue":true},"description":"new checkout"}`
	if resp, body := send(t, http.MethodPut, admin+"/v1/switches/checkout", "", sw); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("PUT a switch without a token: %d %s", resp.StatusCode, body)
	}
	for _, step := range []struct{ method, path, authz, body, by string }{
		{http.MethodPut, "/v1/switches/checkout", "Bearer " + aliceToken, sw, "alice"},
		{http.MethodPost, "/v1/switches/checkout/kill", "Bearer " + bobToken, "", "bob"},
		{http.MethodGet, "/v1/switches/checkout", "Bearer " + aliceToken, "", "bob"},
	} {
		resp, body := send(t, step.method, admin+step.path, step.authz, step.body)
		var got struct {
			UpdatedBy string `json:"updated_by"`
		}
		if resp.StatusCode != http.StatusOK || json.Unmarshal([]byte(body), &got) != nil || got.UpdatedBy != step.by {
			t.Fatalf("%s %s: %d %s; want 200 with updated_by %q", step.method, step.path, resp.StatusCode, body, step.by)
		}
	}
}
