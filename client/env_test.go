package client_test

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicstest"
)

var (
	chat   = &oplogpb.Business{Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER}
	config = &oplogpb.Business{Code: "config", Dimension: oplogpb.Dimension_DIMENSION_DEVICE}
)

// env is a real oplog, inbox and embedded JetStream, with a token signer;
// gateway nodes on loopback are started with node.
type env struct {
	t      *testing.T
	log    *oplog.Log
	in     *oplog.Inbox
	tp     *topics.Topics     // set by withTopics: the nodes serve topics
	bm     *buckets.Map       // set by withBuckets: the nodes plan rounds by bucket
	sched  *buckets.Scheduler // likewise
	pub    ed25519.PublicKey
	signer *gateway.Signer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat, config)
	in := oplogtest.MustRunInbox(t, l, "")
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, log: l, in: in, pub: pub, signer: gateway.NewSigner(priv)}
}

// withTopics runs a topic store on e's log; the nodes started afterwards
// serve topics.
func (e *env) withTopics() *env {
	e.t.Helper()
	e.tp = topicstest.MustRun(e.t, topics.Config{Log: e.log})
	return e
}

// withBuckets runs a bucket map on e's log and a scheduler; the nodes
// started afterwards plan their rounds by bucket and may defer some.
func (e *env) withBuckets() *env {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	bm, err := buckets.Open(ctx, buckets.Config{Log: e.log})
	if err != nil {
		e.t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- bm.Run(runCtx) }()
	e.t.Cleanup(func() {
		stop()
		if err := <-done; err != nil {
			e.t.Errorf("buckets run: %v", err)
		}
		_ = bm.Close()
	})
	e.bm, e.sched = bm, buckets.NewScheduler(buckets.SchedulerConfig{})
	return e
}

func (e *env) node(mod func(*gateway.Config)) *node {
	e.t.Helper()
	return e.startNode(mod, false)
}

// nodeTLS is a node speaking TLS 1.3 on both listeners, with the
// httptest certificate; roots trusts it.
func (e *env) nodeTLS(mod func(*gateway.Config)) (n *node, roots *x509.CertPool) {
	e.t.Helper()
	n = e.startNode(mod, true)
	roots = x509.NewCertPool()
	roots.AddCert(n.cert)
	return n, roots
}

// node is one gateway server with a TCP listener and a WebSocket server.
type node struct {
	srv  *gateway.Server
	tcp  string // tcp://host:port (tls:// with TLS)
	ws   string // ws://host:port/v1/ws (wss://)
	cert *x509.Certificate
	stop func() // shuts the node down (drain), once
}

func (e *env) startNode(mod func(*gateway.Config), withTLS bool) *node {
	e.t.Helper()
	cfg := gateway.Config{Inbox: e.in, Tokens: gateway.NewVerifier(e.pub), Topics: e.tp}
	if e.bm != nil {
		cfg.Buckets, cfg.Scheduler = e.bm, e.sched
	}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := gateway.NewServer(cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(srv.WebSocketHandler(nil))
	var ln net.Listener
	if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		e.t.Fatal(err)
	}
	n := &node{srv: srv, tcp: "tcp://" + ln.Addr().String()}
	if withTLS {
		hs.TLS = &tls.Config{MinVersion: tls.VersionTLS13}
		hs.StartTLS()
		n.cert = hs.Certificate()
		ln = tls.NewListener(ln, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: hs.TLS.Certificates})
		n.tcp = "tls" + strings.TrimPrefix(n.tcp, "tcp")
	} else {
		hs.Start()
	}
	n.ws = "ws" + strings.TrimPrefix(hs.URL, "http") + "/v1/ws"
	served := make(chan error, 1)
	go func() { served <- srv.ServeTCP(ln) }()
	var once sync.Once
	n.stop = func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := srv.Shutdown(ctx); err != nil {
				e.t.Errorf("shutdown: %v", err)
			}
			if err := <-served; err != nil {
				e.t.Errorf("ServeTCP: %v", err)
			}
			hs.Close()
		})
	}
	e.t.Cleanup(n.stop)
	return n
}

func (e *env) token(user, device string) string {
	e.t.Helper()
	return e.tokenTTL(user, device, time.Hour)
}

func (e *env) tokenTTL(user, device string, ttl time.Duration) string {
	e.t.Helper()
	c := gateway.Claims{User: user, Device: device, App: "app", Expires: time.Now().Add(ttl)}
	if ttl < 0 {
		c.IssuedAt = c.Expires.Add(-time.Hour)
	}
	tok, err := e.signer.Issue(c)
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

// tokens returns a Config.Token that always returns tok.
func tokens(tok string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) { return tok, nil }
}

// append stores one event for target and returns its id.
func (e *env) append(biz, target string, payload ...byte) uint64 {
	e.t.Helper()
	if payload == nil {
		payload = []byte("p")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := e.log.Append(ctx, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: biz, Targets: []string{target}, Payload: payload})
	if err != nil {
		e.t.Fatal(err)
	}
	return r[0].Id
}

// serverPoints returns the sync points the server recorded for device.
func (e *env) serverPoints(device string) map[string]oplog.SyncPoint {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sp, err := e.in.SyncPoints(ctx, device)
	if err != nil {
		e.t.Fatal(err)
	}
	return sp
}

// recorder keeps the items handlers received, by business; topic items
// by "#" and their topic.
type recorder struct {
	mu    sync.Mutex
	items map[string][]*client.Item
	fail  func(it *client.Item) error // optional: a handler's verdict
}

func newRecorder() *recorder { return &recorder{items: map[string][]*client.Item{}} }

func (r *recorder) handle(_ context.Context, it *client.Item) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	key := it.Business
	if it.Topic != "" {
		key = "#" + it.Topic
	}
	r.items[key] = append(r.items[key], it)
	if r.fail != nil {
		return r.fail(it)
	}
	return nil
}

func (r *recorder) item(biz string, i int) *client.Item {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.items[biz][i]
}

func (r *recorder) ids(biz string) []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []uint64
	for _, it := range r.items[biz] {
		out = append(out, it.Id)
	}
	return out
}

// waitIDs waits until the ids received of biz are want, failing if more
// or others arrive.
func (r *recorder) waitIDs(t *testing.T, biz string, want ...uint64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s ids %v", biz, want), func() bool {
		got := r.ids(biz)
		if len(got) > len(want) || !slices.Equal(got, want[:len(got)]) {
			t.Fatalf("%s: got ids %v, want %v", biz, got, want)
		}
		return len(got) == len(want)
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// running is a Client whose Run runs in a goroutine.
type running struct {
	*client.Client
	cancel context.CancelFunc
	done   chan error
}

// start makes a Client of cfg (with a test logger), lets setup register
// handlers, and runs it until stop or the end of the test.
func start(t *testing.T, cfg client.Config, setup func(*client.Client)) *running {
	t.Helper()
	if cfg.Logger == nil {
		lg := testLogger(t)
		cfg.Logger = &lg
	}
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(c)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{Client: c, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- c.Run(ctx) }()
	t.Cleanup(func() { _ = r.stop(t) })
	return r
}

// stop cancels Run and returns its result, failing if it does not
// return within 5 s.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	return r.wait(t, 5*time.Second)
}

// wait waits for Run to return.
func (r *running) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err // for a later stop
		return err
	case <-time.After(d):
		t.Fatalf("Run did not return within %v", d)
		return nil
	}
}

// testLogger writes to the test log at debug level when -v is given.
func testLogger(t *testing.T) zerolog.Logger {
	if !testing.Verbose() {
		return zerolog.Nop()
	}
	return zerolog.New(zerolog.ConsoleWriter{Out: testWriter{t}, NoColor: true}).Level(zerolog.DebugLevel).With().Timestamp().Logger()
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// noLeaks fails t if goroutines of this package outlive it (registered
// first, so it runs after every other cleanup).
func noLeaks(t *testing.T) {
	t.Cleanup(func() {
		var stacks string
		deadline := time.Now().Add(3 * time.Second)
		for {
			stacks = leaked("sluicehq/sluice/client.")
			if stacks == "" {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("goroutines of the client left:\n%s", stacks)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// leaked returns the stacks of goroutines that mention any of marks.
func leaked(marks ...string) string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		for _, m := range marks {
			if strings.Contains(g, m) {
				out = append(out, g)
				break
			}
		}
	}
	return strings.Join(out, "\n\n")
}

// TestMain checks, once every test's servers are down, that no WebSocket,
// zstd or HTTP transport goroutine is left.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		deadline := time.Now().Add(5 * time.Second)
		for {
			s := leaked("coder/websocket", "klauspost/compress", "net/http.(*persistConn)", "sluicehq/sluice/client.")
			if s == "" {
				break
			}
			if time.Now().After(deadline) {
				fmt.Fprintf(os.Stderr, "goroutines left after the tests:\n%s\n", s)
				code = 1
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	os.Exit(code)
}
