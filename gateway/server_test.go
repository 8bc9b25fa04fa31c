package gateway_test

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
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

// env is a gateway on a real oplog, inbox and embedded JetStream, with a
// TCP listener and a WebSocket server on loopback.
type env struct {
	t      *testing.T
	l      *oplog.Log
	in     *oplog.Inbox
	tp     *topics.Topics     // set by the topics option
	bm     *buckets.Map       // set by the buckets option
	sched  *buckets.Scheduler // likewise
	srv    *gateway.Server
	signer *gateway.Signer
	tcp    string
	ws     string
	codec  *wire.Codec
}

func newEnv(t *testing.T, mod func(*gateway.Config)) *env {
	return newEnvWith(t, envOptions{}, mod)
}

// envOptions adds the optional parts of a gateway.
type envOptions struct {
	topics     bool
	buckets    bool
	businesses []*oplogpb.Business // registered besides chat and config
	scheduler  buckets.SchedulerConfig
}

func newEnvWith(t *testing.T, o envOptions, mod func(*gateway.Config)) *env {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, append([]*oplogpb.Business{chat, config}, o.businesses...)...)
	in := oplogtest.MustRunInbox(t, l, "")
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := gateway.Config{Inbox: in, Tokens: gateway.NewVerifier(pub)}
	var tp *topics.Topics
	var bm *buckets.Map
	var sched *buckets.Scheduler
	if o.topics {
		tp = topicstest.MustRun(t, topics.Config{Log: l})
		cfg.Topics = tp
	}
	if o.buckets {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if bm, err = buckets.Open(ctx, buckets.Config{Log: l}); err != nil {
			t.Fatal(err)
		}
		runCtx, stop := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- bm.Run(runCtx) }()
		t.Cleanup(func() {
			stop()
			if err := <-done; err != nil {
				t.Errorf("buckets run: %v", err)
			}
			_ = bm.Close()
		})
		sched = buckets.NewScheduler(o.scheduler)
		cfg.Buckets, cfg.Scheduler = bm, sched
	}
	if mod != nil {
		mod(&cfg)
	}
	srv, err := gateway.NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTCP(ln) }()
	hs := httptest.NewServer(srv.WebSocketHandler(nil))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("ServeTCP: %v", err)
		}
		hs.Close()
	})
	codec, _ := wire.NewCodec(wire.Options{})
	return &env{t: t, l: l, in: in, tp: tp, bm: bm, sched: sched, srv: srv, signer: gateway.NewSigner(priv), tcp: ln.Addr().String(),
		ws: "ws" + strings.TrimPrefix(hs.URL, "http") + "/", codec: codec}
}

func (e *env) token(user, device string, ttl time.Duration) string {
	e.t.Helper()
	tok, err := e.signer.Issue(gateway.Claims{User: user, Device: device, App: "app", Expires: time.Now().Add(ttl)})
	if err != nil {
		e.t.Fatal(err)
	}
	return tok
}

func (e *env) append(biz, target string, mod ...func(*oplogpb.Event)) uint64 {
	e.t.Helper()
	ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: biz, Targets: []string{target}, Payload: []byte("p")}
	for _, m := range mod {
		m(ev)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := e.l.Append(ctx, ev)
	if err != nil {
		e.t.Fatal(err)
	}
	return r[0].Id
}

// client is a raw protocol client: it sends and reads frames, nothing
// more.
type client struct {
	t     *testing.T
	codec *wire.Codec
	tcp   net.Conn
	ws    *websocket.Conn
	json  bool
	hdr   []byte
}

func (e *env) dialTCP() *client {
	e.t.Helper()
	c, err := net.Dial("tcp", e.tcp)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { c.Close() })
	return &client{t: e.t, codec: e.codec, tcp: c, hdr: make([]byte, wire.HeaderSize)}
}

func (e *env) dialWS(subprotocol string) *client {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, e.ws, &websocket.DialOptions{Subprotocols: []string{subprotocol}})
	if err != nil {
		e.t.Fatal(err)
	}
	c.SetReadLimit(8 << 20)
	e.t.Cleanup(func() { c.CloseNow() })
	return &client{t: e.t, codec: e.codec, ws: c, json: c.Subprotocol() == wire.SubprotocolJSON}
}

func (c *client) send(f *gatewaypb.Frame) {
	c.t.Helper()
	if c.tcp != nil {
		b, err := c.codec.AppendTLV(nil, f, false)
		if err != nil {
			c.t.Fatal(err)
		}
		if _, err := c.tcp.Write(b); err != nil {
			c.t.Fatal(err)
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var err error
	if c.json {
		b, _ := c.codec.EncodeJSON(f)
		err = c.ws.Write(ctx, websocket.MessageText, b)
	} else {
		b, _ := c.codec.EncodeBinary(f, false)
		err = c.ws.Write(ctx, websocket.MessageBinary, b)
	}
	if err != nil {
		c.t.Fatal(err)
	}
}

// read returns the next frame, or an error (io.EOF when the server closed
// the link).
func (c *client) read(timeout time.Duration) (*gatewaypb.Frame, error) {
	if c.tcp != nil {
		_ = c.tcp.SetReadDeadline(time.Now().Add(timeout))
		f, _, err := c.codec.ReadTLV(c.tcp, c.hdr)
		return f, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	typ, b, err := c.ws.Read(ctx)
	if err != nil {
		if websocket.CloseStatus(err) != -1 {
			return nil, io.EOF
		}
		return nil, err
	}
	if typ == websocket.MessageText {
		return c.codec.DecodeJSON(b)
	}
	return c.codec.DecodeBinary(b)
}

func (c *client) must(timeout time.Duration) *gatewaypb.Frame {
	c.t.Helper()
	f, err := c.read(timeout)
	if err != nil {
		c.t.Fatalf("read: %v", err)
	}
	return f
}

func hello(token string, points ...*gatewaypb.SyncPoint) *gatewaypb.Frame {
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Hello{Hello: &gatewaypb.Hello{Version: 1, Token: token, Points: points,
		Attrs: &gatewaypb.Attrs{AppVersion: "2.0.0", Os: "android"}}}}
}

// syncAll reads Welcome and the Sync frames of the first round, returning
// the items.
func (c *client) syncAll() (*gatewaypb.Welcome, []*gatewaypb.Item, []string) {
	c.t.Helper()
	w := c.must(5 * time.Second).GetWelcome()
	if w == nil {
		c.t.Fatal("first frame is not welcome")
	}
	var items []*gatewaypb.Item
	var resets []string
	for {
		f := c.must(5 * time.Second)
		s := f.GetSync()
		if s == nil {
			c.t.Fatalf("got %v during the sync round", f)
		}
		items = append(items, s.Items...)
		resets = append(resets, s.Resets...)
		if s.Done {
			return w, items, resets
		}
	}
}

// live reads until n live items arrived.
func (c *client) live(n int) []*gatewaypb.Item {
	c.t.Helper()
	var items []*gatewaypb.Item
	for len(items) < n {
		f := c.must(5 * time.Second)
		if l := f.GetLive(); l != nil {
			items = append(items, l.Items...)
		}
	}
	return items
}

// expectEnd reads until the server closes the link, returning the Error
// and GoAway it sent.
func (c *client) expectEnd() (*gatewaypb.Error, *gatewaypb.GoAway) {
	c.t.Helper()
	var e *gatewaypb.Error
	var g *gatewaypb.GoAway
	for {
		f, err := c.read(5 * time.Second)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "connection reset") {
				c.t.Fatalf("waiting for the end: %v", err)
			}
			return e, g
		}
		if x := f.GetError(); x != nil {
			e = x
		}
		if x := f.GetGoaway(); x != nil {
			g = x
		}
	}
}

func ids(items []*gatewaypb.Item) []uint64 {
	var out []uint64
	for _, it := range items {
		out = append(out, it.Id)
	}
	return out
}

func TestSyncBacklogThenLiveThenAck(t *testing.T) {
	e := newEnv(t, nil)
	for _, transport := range []string{"tcp", wire.SubprotocolProto, wire.SubprotocolJSON} {
		t.Run(transport, func(t *testing.T) {
			user, device := "u-"+strings.ReplaceAll(transport, ".", "-"), "d-"+strings.ReplaceAll(transport, ".", "-")
			b1 := e.append("chat", user)
			b2 := e.append("config", device)
			b3 := e.append("chat", user)
			dial := func() *client {
				if transport == "tcp" {
					return e.dialTCP()
				}
				return e.dialWS(transport)
			}
			c := dial()
			c.send(hello(e.token(user, device, time.Hour)))
			w, items, _ := c.syncAll()
			if w.User != user || w.Device != device || w.HeartbeatMs == 0 || w.Version != 1 {
				t.Fatalf("welcome %v", w)
			}
			if got := ids(items); len(got) != 3 || got[0] != b1 || got[1] != b3 || got[2] != b2 {
				// Backlog order: by inbox (user first), id order within.
				t.Fatalf("backlog ids %v, want [%d %d %d]", got, b1, b3, b2)
			}
			l1 := e.append("chat", user)
			l2 := e.append("config", device)
			live := c.live(2)
			if live[0].Id != l1 || live[1].Id != l2 || live[0].Business != "chat" || string(live[0].Payload) != "p" {
				t.Fatalf("live %v, want ids %d, %d", live, l1, l2)
			}
			epoch := e.l.Epoch(0)
			c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Ack{Ack: &gatewaypb.Ack{Points: []*gatewaypb.SyncPoint{
				{Business: "chat", Id: l1, Epoch: epoch}, {Business: "config", Id: l2, Epoch: epoch}}}}})
			waitFor(t, func() bool {
				sp, err := e.in.SyncPoints(context.Background(), device)
				return err == nil && sp["chat"].ID == l1 && sp["config"].ID == l2
			})
			// A new link without points resumes from the recorded sync
			// points: only what came since.
			l3 := e.append("chat", user)
			c2 := dial()
			c2.send(hello(e.token(user, device, time.Hour)))
			_, items, _ = c2.syncAll()
			if got := ids(items); len(got) != 1 || got[0] != l3 {
				t.Fatalf("resumed backlog %v, want [%d]", got, l3)
			}
			// The first link was replaced: drained, then told so.
			if _, g := c.expectEnd(); g == nil || g.Reason != gatewaypb.GoAway_REASON_REPLACED {
				t.Fatalf("old link got goaway %v, want REPLACED", g)
			}
		})
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRefusedHellos(t *testing.T) {
	e := newEnv(t, nil)
	_, otherKey, _ := ed25519.GenerateKey(nil)
	forged, _ := gateway.NewSigner(otherKey).Issue(gateway.Claims{Device: "d1", App: "app", Expires: time.Now().Add(time.Hour)})
	expired, _ := e.signer.Issue(gateway.Claims{Device: "d1", App: "app", IssuedAt: time.Now().Add(-2 * time.Hour), Expires: time.Now().Add(-time.Hour)})
	for _, tc := range []struct {
		name  string
		first *gatewaypb.Frame
		code  gatewaypb.Error_Code
	}{
		{"expired token", hello(expired), gatewaypb.Error_CODE_TOKEN_EXPIRED},
		{"forged token", hello(forged), gatewaypb.Error_CODE_UNAUTHENTICATED},
		{"no token", hello(""), gatewaypb.Error_CODE_UNAUTHENTICATED},
		{"ping first", &gatewaypb.Frame{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{}}}, gatewaypb.Error_CODE_BAD_FRAME},
		{"version 2", &gatewaypb.Frame{Body: &gatewaypb.Frame_Hello{Hello: &gatewaypb.Hello{Version: 2, Token: e.token("", "d1", time.Hour)}}}, gatewaypb.Error_CODE_UNSUPPORTED_VERSION},
		{"bad business", hello(e.token("", "d1", time.Hour), &gatewaypb.SyncPoint{Business: "No Such"}), gatewaypb.Error_CODE_INVALID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, c := range []*client{e.dialTCP(), e.dialWS(wire.SubprotocolProto)} {
				c.send(tc.first)
				er, g := c.expectEnd()
				if er == nil || er.Code != tc.code || !er.Fatal || g == nil {
					t.Fatalf("got error %v and goaway %v, want fatal %v", er, g, tc.code)
				}
			}
		})
	}
	// Bytes that are no frame at all, and a frame declared too large.
	for name, raw := range map[string][]byte{
		"unknown type": {99, 0, 0, 0, 0},
		"too large":    {1, 0x7f, 0xff, 0xff, 0xff},
	} {
		c := e.dialTCP()
		if _, err := c.tcp.Write(raw); err != nil {
			t.Fatal(err)
		}
		er, _ := c.expectEnd()
		want := gatewaypb.Error_CODE_BAD_FRAME
		if name == "too large" {
			want = gatewaypb.Error_CODE_FRAME_TOO_LARGE
		}
		if er == nil || er.Code != want {
			t.Fatalf("%s: got %v, want %v", name, er, want)
		}
	}
}

func TestLiveFiltersAndTransient(t *testing.T) {
	e := newEnv(t, nil)
	c := e.dialTCP()
	c.send(hello(e.token("fay", "fphone", time.Hour)))
	c.syncAll()
	// Not for an android 2.0.0 client, expired already, then transient,
	// then a match.
	e.append("chat", "fay", func(ev *oplogpb.Event) { ev.Conditions = &oplogpb.Conditions{Os: []string{"ios"}} })
	tr := e.append("chat", "fay", func(ev *oplogpb.Event) { ev.Transient = true; ev.Payload = []byte("typing") })
	ok := e.append("chat", "fay", func(ev *oplogpb.Event) { ev.Conditions = &oplogpb.Conditions{AppVersionMin: "1.5"} })
	got := c.live(2)
	// Transient items are not ordered with stored ones.
	if got[0].Id != 0 {
		got[0], got[1] = got[1], got[0]
	}
	if tr != 0 || got[0].Id != 0 || string(got[0].Payload) != "typing" || got[1].Id != ok {
		t.Fatalf("live %v, want the transient item and %d", got, ok)
	}
}

func TestLoginBindsUser(t *testing.T) {
	e := newEnv(t, nil)
	early := e.append("chat", "gus")
	c := e.dialWS(wire.SubprotocolProto)
	c.send(hello(e.token("", "gphone", time.Hour)))
	if _, items, _ := c.syncAll(); len(items) != 0 {
		t.Fatalf("device without user got %v", items)
	}
	// A login token for another device is refused without closing.
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: e.token("gus", "other", time.Hour)}}})
	if f := c.must(5 * time.Second); f.GetError().GetCode() != gatewaypb.Error_CODE_UNAUTHENTICATED || f.GetError().GetFatal() {
		t.Fatalf("login for another device: %v", f)
	}
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: e.token("gus", "gphone", time.Hour)}}})
	var items []*gatewaypb.Item
	for done := false; !done; {
		s := c.must(5 * time.Second).GetSync()
		if s == nil {
			t.Fatal("login did not start a sync round")
		}
		items, done = append(items, s.Items...), s.Done
	}
	if len(items) != 1 || items[0].Id != early {
		t.Fatalf("after login: %v, want [%d]", ids(items), early)
	}
	late := e.append("chat", "gus")
	if got := c.live(1); got[0].Id != late {
		t.Fatalf("live after login: %v", ids(got))
	}
}

func TestDeadLink(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) {
		c.Heartbeat = 200 * time.Millisecond
		c.ProbeTimeout = 200 * time.Millisecond
	})
	// A client that answers probes, and sends nothing else, stays: six
	// heartbeats pass with probes and echoes.
	c := e.dialTCP()
	c.send(hello(e.token("", "hank", time.Hour)))
	c.syncAll()
	start := time.Now()
	probes := 0
	for time.Since(start) < 1200*time.Millisecond {
		f, err := c.read(time.Second)
		if err != nil {
			t.Fatalf("echoing client: %v after %v", err, time.Since(start))
		}
		if p := f.GetProbe(); p != nil {
			probes++
			c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_ProbeEcho{ProbeEcho: &gatewaypb.ProbeEcho{Seq: p.Seq}}})
			continue
		}
		t.Fatalf("echoing client got %v", f)
	}
	if probes < 2 {
		t.Fatalf("%d probes in six heartbeats", probes)
	}
	// Once it stops answering, the link is cut as dead: heartbeat and a
	// half of silence, then the probe timeout.
	deadStart := time.Now()
	_, g := c.expectEnd()
	if g == nil || g.Reason != gatewaypb.GoAway_REASON_DEAD_LINK {
		t.Fatalf("unanswered probe: goaway %v, want DEAD_LINK", g)
	}
	// A client that never answers is cut the same way.
	d := e.dialTCP()
	d.send(hello(e.token("", "ivan", time.Hour)))
	d.syncAll()
	if _, g := d.expectEnd(); g == nil || g.Reason != gatewaypb.GoAway_REASON_DEAD_LINK {
		t.Fatalf("silent client: goaway %v, want DEAD_LINK", g)
	}
	t.Logf("%d probes answered; cut %v after the last echo", probes, time.Since(deadStart).Round(time.Millisecond))
}

func TestSlowConsumerIsDisconnected(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) {
		c.SendQueue = 8
		c.SendBytes = 64 << 10
	})
	c := e.dialTCP()
	c.send(hello(e.token("jo", "jphone", time.Hour)))
	c.syncAll()
	// The client stops reading; the server's socket buffers fill, then its
	// queue: it must cut the link rather than grow.
	big := make([]byte, 60<<10)
	for i := 0; i < 200; i++ {
		e.append("chat", "jo", func(ev *oplogpb.Event) { ev.Payload = big })
		if st := e.srv.Stats(); st.Sessions == 0 {
			break
		}
	}
	waitFor(t, func() bool { return e.srv.Stats().Sessions == 0 })
	if st := e.srv.Stats(); st.SlowConsumers != 1 {
		t.Fatalf("stats %+v, want one slow consumer", st)
	}
	// The client reads what its buffers hold, then the end of the link.
	// The GoAway is best effort: a socket full enough to overflow the queue
	// may have no room left for it.
	for {
		f, err := c.read(5 * time.Second)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !strings.Contains(err.Error(), "reset") {
				t.Fatalf("the link did not end: %v", err)
			}
			break
		}
		if g := f.GetGoaway(); g != nil && g.Reason != gatewaypb.GoAway_REASON_SLOW_CONSUMER {
			t.Fatalf("goaway %v, want SLOW_CONSUMER", g)
		}
	}
}

func TestInboundRateLimit(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) { c.InboundRate = 10 })
	c := e.dialTCP()
	c.send(hello(e.token("", "kim", time.Hour)))
	c.syncAll()
	for range 100 {
		c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{}}})
	}
	er, g := c.expectEnd()
	if er == nil || er.Code != gatewaypb.Error_CODE_RATE_LIMITED || g == nil {
		t.Fatalf("flood: error %v, goaway %v", er, g)
	}
}

func TestMaxConnsAndDrain(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) { c.MaxConns = 2 })
	a, b := e.dialTCP(), e.dialWS(wire.SubprotocolProto)
	a.send(hello(e.token("", "la", time.Hour)))
	b.send(hello(e.token("", "lb", time.Hour)))
	a.syncAll()
	b.syncAll()
	over := e.dialTCP()
	if er, _ := over.expectEnd(); er == nil || er.Code != gatewaypb.Error_CODE_TOO_MANY_CONNECTIONS {
		t.Fatalf("third link: %v", er)
	}
	// Shutdown waits for the links' goodbyes, which the clients read.
	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		shut <- e.srv.Shutdown(ctx)
	}()
	for _, c := range []*client{a, b} {
		_, g := c.expectEnd()
		if g == nil || g.Reason != gatewaypb.GoAway_REASON_SHUTDOWN || g.ReconnectAfterMs == 0 {
			t.Fatalf("drain: goaway %v, want SHUTDOWN with a reconnect hint", g)
		}
	}
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	// A WebSocket upgrade during the drain is refused.
	resp, err := http.Get("http" + strings.TrimPrefix(e.ws, "ws"))
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("upgrade while draining: %d", resp.StatusCode)
		}
	}
}

// TestUserSwitchResetsUserBusinesses: a login as another user on the same
// link restarts the user businesses (reported in resets) from the new
// user's inbox, whatever ids the previous user had.
func TestUserSwitchResetsUserBusinesses(t *testing.T) {
	e := newEnv(t, nil)
	old := e.append("chat", "nina") // lower id than what oscar acks below
	o1 := e.append("chat", "oscar")
	c := e.dialTCP()
	epoch := e.l.Epoch(0)
	h := hello(e.token("oscar", "shared", time.Hour), &gatewaypb.SyncPoint{Business: "chat", Id: o1, Epoch: epoch})
	h.GetHello().PointsUser = "oscar"
	c.send(h)
	if _, items, _ := c.syncAll(); len(items) != 0 {
		t.Fatalf("oscar up to date, got %v", ids(items))
	}
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: e.token("nina", "shared", time.Hour)}}})
	var items []*gatewaypb.Item
	var resets []string
	for done := false; !done; {
		f := c.must(5 * time.Second)
		s := f.GetSync()
		if s == nil {
			t.Fatalf("login did not start a sync round: got %v", f)
		}
		items, resets, done = append(items, s.Items...), append(resets, s.Resets...), s.Done
	}
	if len(resets) != 1 || resets[0] != "chat" || len(items) != 1 || items[0].Id != old {
		t.Fatalf("after switching to nina: resets %v, items %v; want [chat] and [%d]", resets, ids(items), old)
	}
}

// TestLargeRoundsSplitByBytes: a backlog whose items exceed a frame is
// sent in several frames, each within the limit.
func TestLargeRoundsSplitByBytes(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) { c.MaxFrame = 64 << 10 })
	big := make([]byte, 8<<10)
	var want []uint64
	for range 20 {
		want = append(want, e.append("chat", "pam", func(ev *oplogpb.Event) { ev.Payload = big }))
	}
	c := e.dialTCP()
	c.send(hello(e.token("pam", "pdev", time.Hour)))
	c.must(5 * time.Second) // welcome
	var got []uint64
	frames := 0
	for done := false; !done; {
		s := c.must(5 * time.Second).GetSync()
		if s == nil {
			t.Fatal("expected sync frames")
		}
		frames++
		got, done = append(got, ids(s.Items)...), s.Done
	}
	if len(got) != len(want) || got[0] != want[0] || got[len(got)-1] != want[len(want)-1] || frames < 4 {
		t.Fatalf("got %d items in %d frames, want %d items in at least 4 frames", len(got), frames, len(want))
	}
}

// TestHelloPointsOfAnotherUser: points presented as another user's are
// ignored for user businesses (and reported reset); device businesses
// keep theirs.
func TestHelloPointsOfAnotherUser(t *testing.T) {
	e := newEnv(t, nil)
	epoch := e.l.Epoch(0)
	r1 := e.append("chat", "rita")
	q1 := e.append("chat", "quinn") // above rita's entry
	d1 := e.append("config", "qdev")
	c := e.dialTCP()
	h := hello(e.token("rita", "qdev", time.Hour), &gatewaypb.SyncPoint{Business: "chat", Id: q1, Epoch: epoch},
		&gatewaypb.SyncPoint{Business: "config", Id: d1, Epoch: epoch})
	h.GetHello().PointsUser = "quinn"
	c.send(h)
	_, items, resets := c.syncAll()
	if len(resets) != 1 || resets[0] != "chat" || len(items) != 1 || items[0].Id != r1 {
		t.Fatalf("resets %v, items %v; want [chat] and rita's %d only", resets, ids(items), r1)
	}
}

// TestWebSocketPipelinedHello: a client that sends its Hello right behind
// its upgrade request, before the 101 answer, is served: the bytes net/http
// read ahead are kept.
func TestWebSocketPipelinedHello(t *testing.T) {
	e := newEnv(t, nil)
	id := e.append("chat", "vera")
	hostport := strings.TrimSuffix(strings.TrimPrefix(e.ws, "ws://"), "/")
	c, err := net.Dial("tcp", hostport)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	frame, _ := e.codec.EncodeBinary(hello(e.token("vera", "vdev", time.Hour)), false)
	// A masked client frame: FIN+binary, mask bit, length, key, payload.
	msg := []byte{0x82}
	switch n := len(frame); {
	case n < 126:
		msg = append(msg, 0x80|byte(n))
	default:
		msg = append(msg, 0x80|126, byte(n>>8), byte(n))
	}
	key := []byte{1, 2, 3, 4}
	msg = append(msg, key...)
	for i, b := range frame {
		msg = append(msg, b^key[i%4])
	}
	req := "GET / HTTP/1.1\r\nHost: " + hostport + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: sluice.v1.proto\r\n\r\n"
	if _, err := c.Write(append([]byte(req), msg...)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	// Server frames are unmasked: read Welcome and the first Sync.
	var got []*gatewaypb.Frame
	for len(got) < 2 {
		h := make([]byte, 2)
		if _, err := io.ReadFull(br, h); err != nil {
			t.Fatalf("frame header: %v (got %d frames)", err, len(got))
		}
		n := int(h[1] & 0x7f)
		if n == 126 {
			ext := make([]byte, 2)
			io.ReadFull(br, ext)
			n = int(ext[0])<<8 | int(ext[1])
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(br, body); err != nil {
			t.Fatal(err)
		}
		f, err := e.codec.DecodeBinary(body)
		if err != nil {
			t.Fatalf("frame %d: %v", len(got), err)
		}
		got = append(got, f)
	}
	if got[0].GetWelcome() == nil || len(got[1].GetSync().GetItems()) != 1 || got[1].GetSync().Items[0].Id != id {
		t.Fatalf("got %v", got)
	}
}

// TestTCPFramesSplitAndBatched: frames cut anywhere across writes, and
// several frames in one write, are read the same, with the poller (idle
// links without a goroutine) and without.
func TestTCPFramesSplitAndBatched(t *testing.T) {
	for _, noPoller := range []bool{false, true} {
		e := newEnv(t, func(c *gateway.Config) { c.NoPoller = noPoller })
		c := e.dialTCP()
		c.send(hello(e.token("", "split", time.Hour)))
		c.syncAll()
		var stream []byte
		for i := range 5 {
			stream, _ = e.codec.AppendTLV(stream, &gatewaypb.Frame{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{ClientTimeMs: int64(i + 1)}}}, false)
		}
		// Byte by byte for the first frame, then the rest at once.
		for i := range 9 {
			if _, err := c.tcp.Write(stream[i : i+1]); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Millisecond)
		}
		if _, err := c.tcp.Write(stream[9:]); err != nil {
			t.Fatal(err)
		}
		for want := int64(1); want <= 5; want++ {
			if p := c.must(5 * time.Second).GetPong(); p == nil || p.ClientTimeMs != want {
				t.Fatalf("poller off %v: pong %v, want client time %d", noPoller, p, want)
			}
		}
	}
}

// TestEpochMismatchResets: a sync point of another epoch (the stream was
// recreated) is reported in resets, and the business restarts from the
// current epoch's beginning.
func TestEpochMismatchResets(t *testing.T) {
	e := newEnv(t, nil)
	a := e.append("chat", "wes")
	b := e.append("chat", "wes")
	c := e.dialTCP()
	h := hello(e.token("wes", "wdev", time.Hour), &gatewaypb.SyncPoint{Business: "chat", Id: b, Epoch: e.l.Epoch(0) + 1})
	h.GetHello().PointsUser = "wes"
	c.send(h)
	_, items, resets := c.syncAll()
	if len(resets) != 1 || resets[0] != "chat" || len(items) != 2 || items[0].Id != a || items[1].Id != b || items[0].Epoch != e.l.Epoch(0) {
		t.Fatalf("resets %v, items %v; want [chat] and [%d %d] of epoch %d", resets, ids(items), a, b, e.l.Epoch(0))
	}
}

// TestLiveOverflowDuringRoundRereads: live entries arriving during a long
// sync round overflow what the link holds; the round is run again from the
// inbox, and the client gets every entry once, in order.
func TestLiveOverflowDuringRoundRereads(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) {
		c.HeldLive = 2
		c.SyncBatch = 1
		c.SendQueue = 4 // the round waits for the client to read
	})
	var want []uint64
	for range 300 {
		want = append(want, e.append("chat", "xia"))
	}
	c := e.dialTCP()
	c.send(hello(e.token("xia", "xdev", time.Hour)))
	c.must(5 * time.Second) // welcome
	// The first Sync frame: the watch is on, and the round now waits for
	// us to read.
	var got []uint64
	rounds := 0
	first := c.must(5 * time.Second).GetSync()
	got = append(got, ids(first.GetItems())...)
	for range 20 {
		want = append(want, e.append("chat", "xia"))
	}
	for len(got) < len(want) {
		f := c.must(5 * time.Second)
		switch {
		case f.GetSync() != nil:
			got = append(got, ids(f.GetSync().Items)...)
			if f.GetSync().Done {
				rounds++
			}
		case f.GetLive() != nil:
			got = append(got, ids(f.GetLive().Items)...)
		}
		time.Sleep(100 * time.Microsecond) // a slow reader
	}
	// The round the overflow asked for ends with a frame of its own.
	for rounds < 2 {
		f, err := c.read(2 * time.Second)
		if err != nil {
			break
		}
		if s := f.GetSync(); s != nil {
			got = append(got, ids(s.Items)...)
			if s.Done {
				rounds++
			}
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("got %d ids (%v…), want %d in order without repeats", len(got), got[:min(len(got), 8)], len(want))
	}
	if rounds < 2 {
		t.Fatalf("%d sync rounds, want a second one after the overflow", rounds)
	}
}

// TestLoginDuringRound: a login as another user while a round of the
// previous user's backlog is still going ends that round; the client is
// told to reset, then gets exactly the new user's entries (lower ids
// included), and no live entry of the previous user after the switch.
func TestLoginDuringRound(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) {
		c.SyncBatch = 1
		c.SendQueue = 4 // the round waits for the client to read
	})
	var bob []uint64
	for range 5 {
		bob = append(bob, e.append("chat", "bob"))
	}
	for range 300 {
		e.append("chat", "amy")
	}
	c := e.dialTCP()
	h := hello(e.token("amy", "shared2", time.Hour))
	h.GetHello().PointsUser = "amy"
	c.send(h)
	c.must(5 * time.Second) // welcome
	for range 3 {
		if c.must(5*time.Second).GetSync() == nil {
			t.Fatal("want amy's round")
		}
	}
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: e.token("bob", "shared2", time.Hour)}}})
	// Frames already queued for amy may still come; then the reset.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if time.Now().After(deadline) {
			t.Fatal("no reset after the login")
		}
		s := c.must(5 * time.Second).GetSync()
		if s != nil && len(s.Resets) > 0 {
			if s.Resets[0] != "chat" {
				t.Fatalf("resets %v", s.Resets)
			}
			got := ids(s.Items)
			for !s.Done {
				f := c.must(5 * time.Second)
				if s = f.GetSync(); s == nil {
					t.Fatalf("want the rest of bob's round, got %v", f)
				}
				got = append(got, ids(s.Items)...)
			}
			if !slices.Equal(got, bob) {
				t.Fatalf("after the reset: %v, want bob's %v", got, bob)
			}
			break
		}
	}
	e.append("chat", "amy")
	late := e.append("chat", "bob")
	if got := c.live(1); len(got) != 1 || got[0].Id != late {
		t.Fatalf("live after the switch: %v, want bob's %d only", ids(got), late)
	}
}
