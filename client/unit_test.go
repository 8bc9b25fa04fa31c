package client

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestBackoff(t *testing.T) {
	lo, hi := 100*time.Millisecond, 30*time.Second
	for _, tc := range []struct {
		n    int
		ceil time.Duration
	}{{0, lo}, {1, 2 * lo}, {4, 16 * lo}, {9, hi}, {62, hi}, {1000, hi}} {
		var top time.Duration
		for range 2000 {
			d := backoff(tc.n, lo, hi)
			if d < 0 || d > tc.ceil {
				t.Fatalf("backoff(%d) = %v, want within [0, %v]", tc.n, d, tc.ceil)
			}
			top = max(top, d)
		}
		if top < tc.ceil/2 {
			t.Errorf("backoff(%d): largest of 2000 draws %v, want near %v (full jitter)", tc.n, top, tc.ceil)
		}
	}
}

func TestPointsFile(t *testing.T) {
	dir := t.TempDir()
	if st, err := loadPoints(dir); err != nil || len(st.Points) != 0 || st.User != "" {
		t.Fatalf("empty dir: %+v, %v", st, err)
	}
	want := map[string]SyncPoint{"chat": {ID: 7, Epoch: 3}, "config": {ID: 9, Epoch: 4}}
	if err := savePoints(dir, "ann", want); err != nil {
		t.Fatal(err)
	}
	// A crash's leftover is removed at load.
	if err := os.WriteFile(filepath.Join(dir, stateFile+".tmp-123"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := loadPoints(dir)
	if got := st.Points; err != nil || st.User != "ann" || len(got) != 2 || got["chat"] != want["chat"] || got["config"] != want["config"] {
		t.Fatalf("got %+v, %v; want %v of ann", st, err, want)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.tmp-*")); len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
	for _, bad := range []string{"{", `{"version":2,"points":{}}`} {
		if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := New(Config{URL: "tcp://127.0.0.1:1", StateDir: dir, Token: func(ctx context.Context) (string, error) { return "", nil }}); !errors.Is(err, ErrBadState) {
			t.Fatalf("state %q: New returned %v, want ErrBadState", bad, err)
		}
	}
}

func TestNewChecksConfig(t *testing.T) {
	tok := func(ctx context.Context) (string, error) { return "", nil }
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"no url", Config{Token: tok, StateDir: dir}},
		{"bad scheme", Config{URL: "http://h:1", Token: tok, StateDir: dir}},
		{"tcp without port", Config{URL: "tcp://h", Token: tok, StateDir: dir}},
		{"tcp with path", Config{URL: "tcp://h:1/x", Token: tok, StateDir: dir}},
		{"no token", Config{URL: "tcp://h:1", StateDir: dir}},
		{"no state dir", Config{URL: "tcp://h:1", Token: tok}},
		{"backoff bounds", Config{URL: "tcp://h:1", Token: tok, StateDir: dir, MinBackoff: time.Second, MaxBackoff: time.Millisecond}},
	} {
		if _, err := New(tc.cfg); err == nil {
			t.Errorf("%s: New accepted %+v", tc.name, tc.cfg)
		}
	}
	c, err := New(Config{URLs: []string{"ws://h:1/v1/ws", "wss://h/v1/ws", "tls://h:2"}, Token: tok, StateDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if c.tls.MinVersion != 0x0304 || c.attrs.Sdk != sdkName || len(c.endpoints) != 3 || !c.endpoints[1].tls || c.endpoints[2].hostport != "h:2" {
		t.Fatalf("client %+v", c)
	}
}
