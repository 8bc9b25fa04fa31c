package client

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"reflect"
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
	if st, err := loadPoints(dir); err != nil || len(st.Points) != 0 || len(st.Topics) != 0 || st.Topics == nil || st.User != "" {
		t.Fatalf("empty dir: %+v, %v", st, err)
	}
	want := map[string]SyncPoint{"chat": {ID: 7, Epoch: 3}, "config": {ID: 9, Epoch: 4}}
	wantTopics := map[string]SyncPoint{"news": {ID: 12, Epoch: 5}, "_all": {ID: 2, Epoch: 5}}
	if err := savePoints(dir, "ann", want, wantTopics); err != nil {
		t.Fatal(err)
	}
	// A crash's leftover is removed at load.
	if err := os.WriteFile(filepath.Join(dir, stateFile+".tmp-123"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := loadPoints(dir)
	if err != nil || st.User != "ann" || !maps.Equal(st.Points, want) || !maps.Equal(st.Topics, wantTopics) {
		t.Fatalf("got %+v, %v; want %v and topics %v of ann", st, err, want, wantTopics)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.tmp-*")); len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
	for _, bad := range []string{"{", `{"version":2,"points":{}}`, `{"version":1,"points":{},"topics":[]}`} {
		if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := New(Config{URL: "tcp://127.0.0.1:1", StateDir: dir, Token: func(ctx context.Context) (string, error) { return "", nil }}); !errors.Is(err, ErrBadState) {
			t.Fatalf("state %q: New returned %v, want ErrBadState", bad, err)
		}
	}
}

// TestPointsFileCompatible: the topic cursors are an optional field of
// format version 1. A file of an older client, without them, loads; a
// client without topic cursors writes what an older client wrote; and
// what the client wrote carries the cursors under "topics".
func TestPointsFileCompatible(t *testing.T) {
	dir := t.TempDir()
	const old = `{"version":1,"user":"ann","points":{"chat":{"id":7,"epoch":3}}}`
	if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := New(Config{URL: "tcp://127.0.0.1:1", StateDir: dir, Token: func(ctx context.Context) (string, error) { return "", nil }})
	if err != nil {
		t.Fatalf("New with an older file: %v", err)
	}
	if p, tc := c.Points(), c.TopicCursors(); !maps.Equal(p, map[string]SyncPoint{"chat": {ID: 7, Epoch: 3}}) || len(tc) != 0 || tc == nil {
		t.Fatalf("older file: points %v, topic cursors %v", p, tc)
	}

	if err := savePoints(dir, "ann", map[string]SyncPoint{"chat": {ID: 7, Epoch: 3}}, map[string]SyncPoint{}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, stateFile)); string(b) != old {
		t.Fatalf("without topic cursors the file is %s, want %s", b, old)
	}

	if err := savePoints(dir, "", nil, map[string]SyncPoint{"news": {ID: 1, Epoch: 2}}); err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	b, _ := os.ReadFile(filepath.Join(dir, stateFile))
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"version": 1.0, "user": "", "points": nil, "topics": map[string]any{"news": map[string]any{"id": 1.0, "epoch": 2.0}}}
	if !reflect.DeepEqual(doc, want) {
		t.Fatalf("file %s, want %v", b, want)
	}
	st, err := loadPoints(dir)
	if err != nil || st.Points == nil || len(st.Points) != 0 || st.Topics["news"] != (SyncPoint{ID: 1, Epoch: 2}) {
		t.Fatalf("loaded %+v, %v", st, err)
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
