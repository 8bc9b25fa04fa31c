package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

// mustJetStream starts an embedded JetStream for the test.
func mustJetStream(tb testing.TB) jetstream.JetStream {
	tb.Helper()
	_, nc := oplogtest.RunJetStream(tb, oplogtest.Options{})
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatal(err)
	}
	return js
}

// mustOpenRegistry opens a registry for a node with a WebSocket and a TCP
// address derived from id.
func mustOpenRegistry(tb testing.TB, js jetstream.JetStream, id string, ttl time.Duration) *Registry {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	log := zerolog.New(zerolog.NewTestWriter(tb)).With().Timestamp().Logger()
	r, err := OpenRegistry(ctx, RegistryConfig{JetStream: js, Node: testNode(id), TTL: ttl, Logger: &log})
	if err != nil {
		tb.Fatalf("open registry %s: %v", id, err)
	}
	return r
}

func testNode(id string) Node {
	return Node{ID: id, WebSocket: "ws://" + id + ".test:7481/v1/ws", TCP: id + ".test:7482", TLS: true}
}

// mustRun runs r until the returned stop is called or the test ends; stop
// waits for Run to return (withdrawal included). Idempotent.
func mustRun(tb testing.TB, r *Registry) (stop func()) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var err error
	finished := false
	stop = func() {
		cancel()
		if !finished {
			err, finished = <-done, true
			if err != nil {
				tb.Errorf("registry run: %v", err)
			}
		}
	}
	tb.Cleanup(stop)
	return stop
}

// putFake announces a node straight into the bucket, as a node that then
// crashes (never refreshes, never withdraws) would have.
func putFake(tb testing.TB, js jetstream.JetStream, n Node) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	kv, err := js.KeyValue(ctx, BucketGateways)
	if err != nil {
		tb.Fatal(err)
	}
	data, err := json.Marshal(n)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := kv.Put(ctx, n.ID, data); err != nil {
		tb.Fatal(err)
	}
}

// waitFor polls cond until it holds or timeout passes, and returns how
// long it took.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) time.Duration {
	tb.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			tb.Fatalf("%s: not after %v", what, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return time.Since(start)
}

func ids(nodes []Node) []string {
	out := make([]string, len(nodes))
	for i, n := range nodes {
		out[i] = n.ID
	}
	return out
}

func TestRegistrySeeEachOther(t *testing.T) {
	t.Parallel()
	js := mustJetStream(t)
	a := mustOpenRegistry(t, js, "node-a", 2*time.Second)
	b := mustOpenRegistry(t, js, "node-b", 2*time.Second)
	// b loaded a at open; a learns of b through its watcher.
	if got, want := ids(b.Nodes()), []string{"node-a", "node-b"}; !slices.Equal(got, want) {
		t.Errorf("b.Nodes() after open = %v, want %v", got, want)
	}
	mustRun(t, a)
	stopB := mustRun(t, b)
	waitFor(t, 3*time.Second, "a sees b", func() bool { return slices.Equal(ids(a.Nodes()), []string{"node-a", "node-b"}) })
	if got := a.Nodes()[1]; got != b.self {
		t.Errorf("a's view of b = %+v, want %+v", got, b.self)
	}

	// Refreshes keep both alive past the TTL.
	time.Sleep(2500 * time.Millisecond)
	for name, r := range map[string]*Registry{"a": a, "b": b} {
		if got, want := ids(r.Nodes()), []string{"node-a", "node-b"}; !slices.Equal(got, want) {
			t.Errorf("%s.Nodes() after 1.25 TTL = %v, want %v", name, got, want)
		}
	}

	// A clean stop withdraws the node at once.
	stopB()
	took := waitFor(t, time.Second, "b withdrawn", func() bool { return slices.Equal(ids(a.Nodes()), []string{"node-a"}) })
	t.Logf("withdrawal seen after %v", took)
}

func TestRegistryCrashedNodeExpires(t *testing.T) {
	t.Parallel()
	const ttl = time.Second
	js := mustJetStream(t)
	a := mustOpenRegistry(t, js, "node-a", ttl)
	mustRun(t, a)
	put := time.Now()
	putFake(t, js, testNode("crashed"))
	// b opens after the crash and never runs: it must drop the entry by
	// age alone, with no watcher to tell it.
	b := mustOpenRegistry(t, js, "node-b", ttl)
	waitFor(t, time.Second, "a sees crashed", func() bool { return slices.Contains(ids(a.Nodes()), "crashed") })
	if got := ids(b.Nodes()); !slices.Contains(got, "crashed") {
		t.Fatalf("b.Nodes() after open = %v, want crashed in it", got)
	}

	waitFor(t, ttl+time.Second, "crashed expires for a", func() bool { return !slices.Contains(ids(a.Nodes()), "crashed") })
	t.Logf("a dropped crashed %v after its put (ttl %v)", time.Since(put), ttl)
	if got := ids(a.Nodes()); !slices.Contains(got, "node-a") {
		t.Errorf("a.Nodes() = %v, want node-a in it (it refreshes)", got)
	}
	waitFor(t, 100*time.Millisecond, "crashed expires for b", func() bool { return !slices.Contains(ids(b.Nodes()), "crashed") })
	t.Logf("b (not running) dropped crashed %v after its put", time.Since(put))
	// The bucket has limit markers, so a's watcher is told of the expiry
	// too and forgets the entry (the age test alone would only hide it
	// until the prune at 2 TTL).
	waitFor(t, time.Second, "a's watcher sees the expiry marker", func() bool {
		a.mu.RLock()
		defer a.mu.RUnlock()
		_, ok := a.nodes["crashed"]
		return !ok
	})
	t.Logf("a's watcher saw the expiry marker %v after the put", time.Since(put))
}

func TestRegistrySetDraining(t *testing.T) {
	t.Parallel()
	const ttl = 2 * time.Second
	js := mustJetStream(t)
	a := mustOpenRegistry(t, js, "node-a", ttl)
	b := mustOpenRegistry(t, js, "node-b", ttl)
	mustRun(t, a)
	mustRun(t, b)
	waitFor(t, 2*time.Second, "a sees b", func() bool { return len(a.Nodes()) == 2 })

	if err := b.SetDraining(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := ids(b.Nodes()); !slices.Equal(got, []string{"node-a"}) {
		t.Errorf("b.Nodes() right after SetDraining = %v, want [node-a]", got)
	}
	waitFor(t, time.Second, "a hides b", func() bool { return slices.Equal(ids(a.Nodes()), []string{"node-a"}) })
	// Refreshes (every ttl/3) keep it draining, and keep it from expiring
	// into a state where a later refresh would bring it back.
	time.Sleep(ttl + 200*time.Millisecond)
	if got := ids(a.Nodes()); !slices.Equal(got, []string{"node-a"}) {
		t.Errorf("a.Nodes() after refreshes = %v, want [node-a]", got)
	}
	if got := a.Pick("dev1", 0); len(got) != 1 || got[0].ID != "node-a" {
		t.Errorf("a.Pick = %v, want [node-a]", ids(got))
	}
}

func TestPickStableAndSpread(t *testing.T) {
	t.Parallel()
	js := mustJetStream(t)
	mustOpenRegistry(t, js, "node-a", 30*time.Second) // creates the bucket
	putFake(t, js, testNode("node-b"))
	putFake(t, js, testNode("node-c"))
	r := mustOpenRegistry(t, js, "node-a", 30*time.Second) // loads all three
	if got := ids(r.Nodes()); !slices.Equal(got, []string{"node-a", "node-b", "node-c"}) {
		t.Fatalf("Nodes() = %v, want three", got)
	}

	const devices = 1000
	first := map[string]int{}
	for i := range devices {
		dev := fmt.Sprintf("device-%d", i)
		p := ids(r.Pick(dev, 0))
		if len(p) != 3 {
			t.Fatalf("Pick(%s, 0) = %v, want 3 nodes", dev, p)
		}
		if again := ids(r.Pick(dev, 0)); !slices.Equal(again, p) {
			t.Fatalf("Pick(%s) = %v then %v: not stable", dev, p, again)
		}
		if two := ids(r.Pick(dev, 2)); !slices.Equal(two, p[:2]) {
			t.Fatalf("Pick(%s, 2) = %v, want %v", dev, two, p[:2])
		}
		first[p[0]]++
	}
	t.Logf("first choice over %d devices: %v", devices, first)
	for _, id := range []string{"node-a", "node-b", "node-c"} {
		if share := float64(first[id]) / devices; share < 0.20 || share > 0.46 {
			t.Errorf("node %s first for %.1f%% of devices, want 20%%-46%%", id, 100*share)
		}
	}
}

// Rendezvous hashing: removing a node leaves the others in the same order.
func TestPickRemovalKeepsOrder(t *testing.T) {
	all := []Node{testNode("n1"), testNode("n2"), testNode("n3"), testNode("n4")}
	for i := range 200 {
		dev := fmt.Sprintf("dev%d", i)
		full := ids(rank(dev, slices.Clone(all)))
		for _, gone := range all {
			rest := slices.DeleteFunc(slices.Clone(all), func(n Node) bool { return n.ID == gone.ID })
			want := slices.DeleteFunc(slices.Clone(full), func(id string) bool { return id == gone.ID })
			if got := ids(rank(dev, rest)); !slices.Equal(got, want) {
				t.Fatalf("%s without %s: %v, want %v", dev, gone.ID, got, want)
			}
		}
	}
}

func TestDispatchHandler(t *testing.T) {
	t.Parallel()
	js := mustJetStream(t)
	r := mustOpenRegistry(t, js, "node-a", 30*time.Second)
	putFake(t, js, Node{ID: "ws-only", WebSocket: "wss://ws-only.test/v1/ws"})
	putFake(t, js, Node{ID: "tcp-only", TCP: "tcp-only.test:7482", TLS: true})
	mustRun(t, r)
	waitFor(t, 2*time.Second, "three nodes", func() bool { return len(r.Nodes()) == 3 })

	mux := http.NewServeMux()
	mux.Handle("/v1/dispatch", r.Handler())
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	type answer struct {
		Nodes []struct {
			ID        string `json:"id"`
			WebSocket string `json:"websocket"`
			TCP       string `json:"tcp"`
			TLS       bool   `json:"tls"`
		} `json:"nodes"`
		TTLSeconds int    `json:"ttl_seconds"`
		Error      string `json:"error"`
		Code       string `json:"code"`
	}
	do := func(method, query string) (int, http.Header, answer) {
		t.Helper()
		req, err := http.NewRequest(method, srv.URL+"/v1/dispatch"+query, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var a answer
		if method != http.MethodHead {
			if err := json.NewDecoder(resp.Body).Decode(&a); err != nil {
				t.Fatalf("%s %s: decode: %v", method, query, err)
			}
		}
		return resp.StatusCode, resp.Header, a
	}

	t.Run("ok", func(t *testing.T) {
		for _, dev := range []string{"dev-1", "dev-2", "dev-3", "Z_9"} {
			status, h, a := do(http.MethodGet, "?device="+dev)
			if status != http.StatusOK {
				t.Fatalf("status = %d, want 200 (%+v)", status, a)
			}
			if got := h.Get("Cache-Control"); got != "no-store" {
				t.Errorf("Cache-Control = %q, want no-store", got)
			}
			var got []string
			for _, n := range a.Nodes {
				got = append(got, n.ID)
			}
			if want := ids(r.Pick(dev, 0)); !slices.Equal(got, want) {
				t.Errorf("%s: nodes = %v, want Pick order %v", dev, got, want)
			}
			if a.TTLSeconds != 30 {
				t.Errorf("ttl_seconds = %d, want 30", a.TTLSeconds)
			}
			for _, n := range a.Nodes {
				if n.ID == "node-a" && (n.WebSocket != "ws://node-a.test:7481/v1/ws" || n.TCP != "node-a.test:7482" || !n.TLS) {
					t.Errorf("node-a = %+v, want its addresses", n)
				}
			}
		}
	})
	t.Run("transport", func(t *testing.T) {
		for transport, want := range map[string][]string{
			"ws":  {"node-a", "ws-only"},
			"tcp": {"node-a", "tcp-only"},
			"any": {"node-a", "tcp-only", "ws-only"},
		} {
			status, _, a := do(http.MethodGet, "?device=dev-1&transport="+transport)
			if status != http.StatusOK {
				t.Fatalf("%s: status = %d, want 200", transport, status)
			}
			var got []string
			for _, n := range a.Nodes {
				got = append(got, n.ID)
			}
			pick := slices.DeleteFunc(ids(r.Pick("dev-1", 0)), func(id string) bool { return !slices.Contains(want, id) })
			if !slices.Equal(got, pick) {
				t.Errorf("transport %s: nodes = %v, want %v", transport, got, pick)
			}
		}
	})
	t.Run("head", func(t *testing.T) {
		if status, _, _ := do(http.MethodHead, "?device=dev-1"); status != http.StatusOK {
			t.Errorf("HEAD status = %d, want 200", status)
		}
	})
	t.Run("invalid", func(t *testing.T) {
		for _, q := range []string{"", "?device=", "?device=bad.id", "?device=a%20b", "?device=dev-1&transport=udp"} {
			status, h, a := do(http.MethodGet, q)
			if status != http.StatusBadRequest || a.Code != "INVALID" || a.Error == "" {
				t.Errorf("%q: %d %+v, want 400 INVALID", q, status, a)
			}
			if got := h.Get("Content-Type"); got != "application/json" {
				t.Errorf("%q: Content-Type = %q, want application/json", q, got)
			}
		}
	})
	t.Run("method", func(t *testing.T) {
		status, h, _ := do(http.MethodPost, "?device=dev-1")
		if status != http.StatusMethodNotAllowed {
			t.Errorf("POST status = %d, want 405", status)
		}
		if got := h.Get("Allow"); got != "GET, HEAD" {
			t.Errorf("Allow = %q, want GET, HEAD", got)
		}
	})
}

func TestDispatchUnavailable(t *testing.T) {
	t.Parallel()
	js := mustJetStream(t)
	r := mustOpenRegistry(t, js, "only", 30*time.Second)
	if err := r.SetDraining(context.Background()); err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	// Mount-agnostic: any path works.
	r.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/somewhere/else?device=dev-1", nil))
	var a struct{ Error, Code string }
	if err := json.Unmarshal(rec.Body.Bytes(), &a); err != nil {
		t.Fatalf("decode %q: %v", rec.Body, err)
	}
	if rec.Code != http.StatusServiceUnavailable || a.Code != "UNAVAILABLE" || a.Error == "" {
		t.Errorf("got %d %+v, want 503 UNAVAILABLE", rec.Code, a)
	}
	if got := rec.Header().Get("Cache-Control"); got != "no-store" {
		t.Errorf("Cache-Control = %q, want no-store", got)
	}
}

func TestRegistryConfigInvalid(t *testing.T) {
	t.Parallel()
	js := mustJetStream(t)
	for name, cfg := range map[string]RegistryConfig{
		"no jetstream": {Node: testNode("a")},
		"no id":        {JetStream: js, Node: Node{TCP: "h:1"}},
		"bad id":       {JetStream: js, Node: Node{ID: "a.b", TCP: "h:1"}},
		"no address":   {JetStream: js, Node: Node{ID: "a"}},
		"bad ws":       {JetStream: js, Node: Node{ID: "a", WebSocket: "http://h/v1/ws"}},
		"bad tcp":      {JetStream: js, Node: Node{ID: "a", TCP: "nohostport"}},
	} {
		if _, err := OpenRegistry(context.Background(), cfg); err == nil {
			t.Errorf("%s: OpenRegistry succeeded, want an error", name)
		}
	}
}
