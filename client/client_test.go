package client_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// attrs are the test clients' attributes.
var attrs = &gatewaypb.Attrs{AppVersion: "2.0.0", Os: "android"}

// TestEndToEnd runs a client on each transport: the backlog, then live
// items, in id order per business and once; sync points on disk and on
// the server; then a restart with the same StateDir gets only what is new.
func TestEndToEnd(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(nil)
	for _, tc := range []struct {
		name string
		url  string
		json bool
	}{
		{"tcp", n.tcp, false},
		{"ws", n.ws, false},
		{"ws-json", n.ws, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			user, device := "u-"+tc.name, "d-"+tc.name
			// Over the compression threshold: zstd on the wire (not on JSON).
			big := bytes.Repeat([]byte("sluice "), 2000)
			c1 := e.append("chat", user, big...)
			d1 := e.append("config", device)
			c2 := e.append("chat", user)
			dir := t.TempDir()
			cfg := client.Config{URL: tc.url, JSON: tc.json, Token: tokens(e.token(user, device)), StateDir: dir, Attrs: attrs}
			rec := newRecorder()
			handlers := func(r *recorder) func(*client.Client) {
				return func(c *client.Client) {
					c.Handle("chat", r.handle)
					c.HandleDefault(r.handle) // config
				}
			}
			r := start(t, cfg, handlers(rec))
			rec.waitIDs(t, "chat", c1, c2)
			rec.waitIDs(t, "config", d1)
			if got := rec.item("chat", 0).Payload; !bytes.Equal(got, big) {
				t.Fatalf("payload of %d bytes, want %d", len(got), len(big))
			}
			c3 := e.append("chat", user)
			d2 := e.append("config", device)
			rec.waitIDs(t, "chat", c1, c2, c3)
			rec.waitIDs(t, "config", d1, d2)

			// Persisted, then acked: the server's points follow.
			waitFor(t, "persisted points", func() bool {
				p := r.Points()
				return p["chat"].ID == c3 && p["config"].ID == d2
			})
			waitFor(t, "server sync points", func() bool {
				sp := e.serverPoints(device)
				return sp["chat"].ID == c3 && sp["config"].ID == d2
			})
			st := r.Stats()
			if !st.Connected || st.Connects != 1 || st.Delivered != 5 || st.Duplicates != 0 || st.Acks == 0 || st.Rounds != 1 {
				t.Fatalf("stats %+v", st)
			}
			if err := r.stop(t); err != nil {
				t.Fatalf("Run: %v", err)
			}

			// The file holds what the handlers processed.
			again, err := client.New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if p := again.Points(); p["chat"].ID != c3 || p["config"].ID != d2 || p["chat"].Epoch == 0 {
				t.Fatalf("points on disk %v", p)
			}

			// A restart gets only what came since.
			c4 := e.append("chat", user)
			d3 := e.append("config", device)
			rec2 := newRecorder()
			r2 := start(t, cfg, handlers(rec2))
			rec2.waitIDs(t, "chat", c4)
			rec2.waitIDs(t, "config", d3)
			time.Sleep(100 * time.Millisecond)
			rec2.waitIDs(t, "chat", c4)
			if st := r2.Stats(); st.Duplicates != 0 || st.Delivered != 2 {
				t.Fatalf("after restart: stats %+v", st)
			}
			if err := r2.stop(t); err != nil {
				t.Fatalf("Run: %v", err)
			}
		})
	}
}

// TestFailover drains the node a client is on: it follows the GoAway to
// the next URL (after skipping one that refuses connections) and gets
// what was appended meanwhile, without loss or duplicates.
func TestFailover(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	a := e.node(func(c *gateway.Config) { c.DrainHint = 200 * time.Millisecond })
	b := e.node(nil)
	dead := deadAddr(t)
	ids := []uint64{e.append("chat", "fay"), e.append("chat", "fay")}
	rec := newRecorder()
	r := start(t, client.Config{
		URLs: []string{dead, a.tcp, b.ws}, Token: tokens(e.token("fay", "fphone")), StateDir: t.TempDir(),
		MinBackoff: 10 * time.Millisecond,
	}, func(c *client.Client) { c.Handle("chat", rec.handle) })
	rec.waitIDs(t, "chat", ids...)
	if st := r.Stats(); st.URL != a.tcp || st.DialFailures != 1 {
		t.Fatalf("first link: stats %+v, want on %s after one failure", st, a.tcp)
	}
	a.stop() // drains: GoAway(SHUTDOWN) with a hint of 50-200 ms
	for range 5 {
		ids = append(ids, e.append("chat", "fay"))
	}
	rec.waitIDs(t, "chat", ids...)
	st := r.Stats()
	if st.URL != b.ws || st.Connects != 2 || st.LastGoAway != gatewaypb.GoAway_REASON_SHUTDOWN || st.Duplicates != 0 {
		t.Fatalf("after the drain: stats %+v", st)
	}
	waitFor(t, "server sync point", func() bool { return e.serverPoints("fphone")["chat"].ID == ids[len(ids)-1] })
}

// deadAddr returns a tcp:// address where nothing listens.
func deadAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "tcp://" + addr
}

// TestHandlerErrorRedelivers: an item whose handler fails is not acked
// past; it comes again after the reconnect, and what follows it too.
func TestHandlerErrorRedelivers(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(nil)
	c1, bad, c3 := e.append("chat", "gil"), e.append("chat", "gil"), e.append("chat", "gil")
	rec := newRecorder()
	var failed atomic.Bool
	rec.fail = func(it *client.Item) error {
		if it.Id == bad && failed.CompareAndSwap(false, true) {
			return errors.New("disk full")
		}
		return nil
	}
	r := start(t, client.Config{URL: n.ws, Token: tokens(e.token("gil", "gphone")), StateDir: t.TempDir(), MinBackoff: 10 * time.Millisecond},
		func(c *client.Client) { c.Handle("chat", rec.handle) })
	rec.waitIDs(t, "chat", c1, bad, bad, c3)
	c4 := e.append("chat", "gil")
	rec.waitIDs(t, "chat", c1, bad, bad, c3, c4)
	st := r.Stats()
	if st.HandlerErrors != 1 || st.Connects != 2 || st.Delivered != 4 || st.Duplicates != 0 {
		t.Fatalf("stats %+v", st)
	}
	waitFor(t, "server sync point", func() bool { return e.serverPoints("gphone")["chat"].ID == c4 })
}

// TestRefusedTokens: a forged token ends Run at once with
// ErrUnauthenticated; an expired one is replaced by calling Token again.
func TestRefusedTokens(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(nil)
	_, otherKey, _ := ed25519.GenerateKey(nil)
	forged, err := gateway.NewSigner(otherKey).Issue(gateway.Claims{Device: "hal", App: "app", Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	for _, url := range []string{n.tcp, n.ws} {
		begin := time.Now()
		r := start(t, client.Config{URL: url, Token: tokens(forged), StateDir: t.TempDir()}, nil)
		err := r.wait(t, 3*time.Second)
		var se *client.ServerError
		if !errors.Is(err, client.ErrUnauthenticated) || !errors.As(err, &se) || se.Code != gatewaypb.Error_CODE_UNAUTHENTICATED || se.Message == "" {
			t.Fatalf("%s: Run returned %v, want ErrUnauthenticated", url, err)
		}
		if st := r.Stats(); st.Connects != 0 || st.DialFailures != 1 {
			t.Fatalf("%s: stats %+v", url, st)
		}
		t.Logf("%s: %v after %v", url, err, time.Since(begin).Round(time.Millisecond))
	}

	var calls atomic.Int32
	expired, valid := e.tokenTTL("", "ida", -time.Minute), e.token("", "ida")
	r := start(t, client.Config{URL: n.tcp, StateDir: t.TempDir(), MinBackoff: 10 * time.Millisecond,
		Token: func(context.Context) (string, error) {
			if calls.Add(1) == 1 {
				return expired, nil
			}
			return valid, nil
		}}, nil)
	waitFor(t, "connected", func() bool { return r.Stats().Connected })
	st := r.Stats()
	if calls.Load() != 2 || st.LastError == nil || st.LastError.Code != gatewaypb.Error_CODE_TOKEN_EXPIRED || st.LastGoAway != gatewaypb.GoAway_REASON_AUTH {
		t.Fatalf("after an expired token: %d Token calls, stats %+v", calls.Load(), st)
	}
}

// TestLoginLogout binds a user on a link opened without one, then unbinds
// it.
func TestLoginLogout(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(nil)
	cfg := client.Config{URL: n.tcp, Token: tokens(e.token("", "jphone")), StateDir: t.TempDir()}
	idle, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := idle.Login(context.Background(), e.token("jo", "jphone")); !errors.Is(err, client.ErrNotConnected) {
		t.Fatalf("Login before Run: %v, want ErrNotConnected", err)
	}

	early := e.append("chat", "jo")
	d1 := e.append("config", "jphone")
	rec := newRecorder()
	var resets []string // of the handler goroutine; read once Rounds says it ran
	r := start(t, cfg, func(c *client.Client) {
		c.HandleDefault(rec.handle)
		c.HandleReset(func(_ context.Context, biz string) error {
			resets = append(resets, biz)
			return nil
		})
	})
	rec.waitIDs(t, "config", d1)
	waitFor(t, "first round", func() bool { return r.Stats().Rounds == 1 })
	if got := rec.ids("chat"); len(got) != 0 {
		t.Fatalf("without a user: chat %v", got)
	}
	ctx := context.Background()
	if err := r.Login(ctx, e.token("jo", "jphone")); err != nil {
		t.Fatal(err)
	}
	rec.waitIDs(t, "chat", early)
	late := e.append("chat", "jo")
	rec.waitIDs(t, "chat", early, late)

	if err := r.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	// A round asked for after the logout ends once the server handled it.
	rounds := r.Stats().Rounds
	if err := r.Foreground(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "round after foreground", func() bool { return r.Stats().Rounds > rounds })
	// The user's businesses were reset by that round, before its items.
	if st := r.Stats(); st.Resets != 1 || !slices.Equal(resets, []string{"chat"}) {
		t.Fatalf("after logout: resets %v, stats %+v", resets, st)
	}
	waitFor(t, "chat point dropped", func() bool { _, ok := r.Points()["chat"]; return !ok })
	e.append("chat", "jo")
	d2 := e.append("config", "jphone")
	rec.waitIDs(t, "config", d1, d2)
	time.Sleep(100 * time.Millisecond)
	if got := rec.ids("chat"); !slices.Equal(got, []uint64{early, late}) {
		t.Fatalf("after logout: chat %v, want [%d %d]", got, early, late)
	}
}

// TestLinkHealth: on a server with a 200 ms heartbeat, a client that pings
// and one that only answers probes both stay on their first link.
func TestLinkHealth(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(func(c *gateway.Config) {
		c.Heartbeat = 200 * time.Millisecond
		c.ProbeTimeout = 200 * time.Millisecond
	})
	pinger := start(t, client.Config{URL: n.tcp, Token: tokens(e.token("", "kpinger")), StateDir: t.TempDir()}, nil)
	echoer := start(t, client.Config{URL: n.ws, Token: tokens(e.token("", "kechoer")), StateDir: t.TempDir()},
		func(c *client.Client) { client.DisablePings(c) })
	time.Sleep(2200 * time.Millisecond)
	for name, r := range map[string]*running{"pinger": pinger, "echoer": echoer} {
		st := r.Stats()
		if !st.Connected || st.Connects != 1 || st.LastGoAway != gatewaypb.GoAway_REASON_UNSPECIFIED {
			t.Errorf("%s: stats %+v", name, st)
		}
		t.Logf("%s: %d probes echoed, rtt %v", name, st.ProbesEchoed, st.RTT)
	}
	if st := echoer.Stats(); st.ProbesEchoed < 3 {
		t.Errorf("echoer answered %d probes in 2.2 s", st.ProbesEchoed)
	}
	if st := pinger.Stats(); st.ProbesEchoed != 0 || st.RTT == 0 {
		t.Errorf("pinger: %d probes, rtt %v: pings did not keep the link busy", st.ProbesEchoed, st.RTT)
	}
}

// TestReplaced: a second link of the same device replaces the first,
// whose Run returns ErrReplaced.
func TestReplaced(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(nil)
	cfg := client.Config{URL: n.tcp, Token: tokens(e.token("", "lphone"))}
	cfg.StateDir = t.TempDir()
	first := start(t, cfg, nil)
	waitFor(t, "first connected", func() bool { return first.Stats().Connected })
	cfg.StateDir = t.TempDir()
	second := start(t, cfg, nil)
	if err := first.wait(t, 5*time.Second); !errors.Is(err, client.ErrReplaced) {
		t.Fatalf("replaced Run returned %v, want ErrReplaced", err)
	}
	waitFor(t, "second connected", func() bool { return second.Stats().Connected })
}

// TestSilentServerIsDead: a server that says Welcome and then nothing is
// taken for dead after three heartbeats, and the client reconnects. The
// peer is scripted with the wire codec: no real server goes silent.
func TestSilentServerIsDead(t *testing.T) {
	noLeaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	codec, _ := wire.NewCodec(wire.Options{})
	accepted := make(chan time.Time, 8)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- time.Now()
			go func() {
				defer c.Close()
				hdr := make([]byte, wire.HeaderSize)
				if f, _, err := codec.ReadTLV(c, hdr); err != nil || f.GetHello() == nil {
					return
				}
				w := &gatewaypb.Frame{Body: &gatewaypb.Frame_Welcome{Welcome: &gatewaypb.Welcome{SessionId: "s", HeartbeatMs: 100, Version: 1}}}
				b, _ := codec.AppendTLV(nil, w, false)
				if _, err := c.Write(b); err != nil {
					return
				}
				for { // swallow pings, answer nothing
					if _, _, err := codec.ReadTLV(c, hdr); err != nil {
						return
					}
				}
			}()
		}
	}()
	r := start(t, client.Config{URL: "tcp://" + ln.Addr().String(), Token: tokens("t"), StateDir: t.TempDir(), MinBackoff: time.Millisecond}, nil)
	first := <-accepted
	select {
	case second := <-accepted:
		if d := second.Sub(first); d < 250*time.Millisecond || d > 2*time.Second {
			t.Fatalf("reconnected after %v, want about 3 heartbeats (300 ms)", d)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no reconnect from a silent server")
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
}

// TestTLS: wss:// and tls:// with the app's roots.
func TestTLS(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n, roots := e.nodeTLS(nil)
	for i, url := range []string{n.ws, n.tcp} {
		device := fmt.Sprintf("mphone%d", i)
		id := e.append("config", device)
		rec := newRecorder()
		r := start(t, client.Config{URL: url, Token: tokens(e.token("", device)), StateDir: t.TempDir(), TLS: &tls.Config{RootCAs: roots}},
			func(c *client.Client) { c.HandleDefault(rec.handle) })
		rec.waitIDs(t, "config", id)
		if err := r.stop(t); err != nil {
			t.Fatal(err)
		}
	}
	// Without the roots the certificate is refused, and the client retries.
	r := start(t, client.Config{URL: n.tcp, Token: tokens(e.token("", "mphone9")), StateDir: t.TempDir(), MinBackoff: time.Millisecond}, nil)
	waitFor(t, "failed dials", func() bool { return r.Stats().DialFailures >= 2 })
	if st := r.Stats(); st.Connects != 0 {
		t.Fatalf("untrusted server: stats %+v", st)
	}
}

// TestUserSwitchOnReconnect: a client whose points were earned under one
// user connects with a token for another. The points it holds say nothing
// about the new user's inbox: it drops them and says Hello again without
// them, so the new user's items are not skipped (the server resumes each
// business from its recorded points: device ones as acked, user ones for
// that user only).
func TestUserSwitchOnReconnect(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	n := e.node(nil)
	dir := t.TempDir()
	// One shard: bob's item has a lower id than ann's.
	b1 := e.append("chat", "bob")
	a1, a2 := e.append("chat", "ann"), e.append("chat", "ann")
	d1 := e.append("config", "ophone")
	rec := newRecorder()
	r := start(t, client.Config{URL: n.tcp, Token: tokens(e.token("ann", "ophone")), StateDir: dir},
		func(c *client.Client) { c.HandleDefault(rec.handle) })
	rec.waitIDs(t, "chat", a1, a2)
	rec.waitIDs(t, "config", d1)
	waitFor(t, "acked", func() bool { return e.serverPoints("ophone")["config"].ID == d1 })
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	rec2 := newRecorder()
	r2 := start(t, client.Config{URL: n.tcp, Token: tokens(e.token("bob", "ophone")), StateDir: dir},
		func(c *client.Client) { c.HandleDefault(rec2.handle) })
	rec2.waitIDs(t, "chat", b1)
	d2 := e.append("config", "ophone")
	rec2.waitIDs(t, "config", d2) // d1 is not sent again
	if st := r2.Stats(); st.Connects != 1 || st.DialFailures != 0 || st.Duplicates != 0 {
		t.Fatalf("stats %+v", st)
	}
	waitFor(t, "bob's points persisted", func() bool {
		p := r2.Points()
		return p["chat"].ID == b1 && p["config"].ID == d2
	})
}
