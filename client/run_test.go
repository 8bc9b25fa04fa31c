package client

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// The tests in this file drive a run over the real link and TLV code,
// with a scripted server on the other end of a net.Pipe: what the server
// side of topics and buckets sends is written out here, frame by frame.

// newTestClient is a Client on dir that never dials (its links are made
// by pipeLink) and does not ping.
func newTestClient(t *testing.T, dir string) *Client {
	t.Helper()
	c, err := New(Config{URL: "tcp://127.0.0.1:1", StateDir: dir, Token: func(context.Context) (string, error) { return "t", nil }})
	if err != nil {
		t.Fatal(err)
	}
	c.noPings = true
	return c
}

// received is a frame the scripted server read, and when.
type received struct {
	f  *gatewaypb.Frame
	at time.Time
}

// peer is the server's end of a link made by pipeLink.
type peer struct {
	nc    net.Conn
	codec *wire.Codec

	mu  sync.Mutex
	got []received
}

// send writes f to the client; it returns once the client's reader took
// it.
func (p *peer) send(t *testing.T, f *gatewaypb.Frame) {
	t.Helper()
	b, err := p.codec.AppendTLV(nil, f, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.nc.Write(b); err != nil {
		t.Fatalf("peer write: %v", err)
	}
}

func (p *peer) sync(t *testing.T, s *gatewaypb.Sync) {
	t.Helper()
	p.send(t, &gatewaypb.Frame{Body: &gatewaypb.Frame_Sync{Sync: s}})
}

// frames returns the frames of the client read so far that keep says to.
func (p *peer) frames(keep func(*gatewaypb.Frame) bool) []received {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []received
	for _, r := range p.got {
		if keep(r.f) {
			out = append(out, r)
		}
	}
	return out
}

func isForeground(f *gatewaypb.Frame) bool {
	return f.GetEvent().GetType() == gatewaypb.ClientEvent_TYPE_FOREGROUND
}

func isAck(f *gatewaypb.Frame) bool { return f.GetAck() != nil }

// testLink is a link of a run served over net.Pipe, as Run serves one.
type testLink struct {
	*peer
	srv    net.Conn
	cancel context.CancelFunc
	served chan linkResult
	read   chan struct{} // closed when the peer's reader ends
	once   sync.Once
	result linkResult
}

// pipeLink serves a new link of r in a goroutine (stop or hangUp waits for
// it). onFrame, if not nil, sees each frame the client sends as it
// arrives, on the peer's reader goroutine.
func pipeLink(t *testing.T, r *run, onFrame func(*gatewaypb.Frame)) *testLink {
	t.Helper()
	cli, srv := net.Pipe()
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		t.Fatal(err)
	}
	tl := &testLink{peer: &peer{nc: srv, codec: codec}, srv: srv, served: make(chan linkResult, 1), read: make(chan struct{})}
	go func() {
		defer close(tl.read)
		hdr := make([]byte, wire.HeaderSize)
		for {
			f, _, err := codec.ReadTLV(srv, hdr)
			if err != nil {
				return
			}
			if onFrame != nil {
				onFrame(f)
			}
			tl.mu.Lock()
			tl.got = append(tl.got, received{f, time.Now()})
			tl.mu.Unlock()
		}
	}()
	cn := &tcpConn{nc: cli, br: bufio.NewReader(cli), codec: r.c.codec}
	l, res := r.newLink(cn, endpoint{raw: "pipe"}, &gatewaypb.Welcome{SessionId: "s", HeartbeatMs: 3_600_000, Version: 1})
	if l == nil {
		t.Fatalf("newLink: %s", res.reason)
	}
	var ctx context.Context
	ctx, tl.cancel = context.WithCancel(context.Background())
	go func() { tl.served <- r.serve(ctx, l) }()
	t.Cleanup(func() { tl.stop() }) // on failure too: synctest.Test waits for the goroutines
	return tl
}

// stop ends the link as the end of Run does, and waits for its goroutines.
func (tl *testLink) stop() linkResult {
	return tl.end(tl.cancel, func() { tl.srv.Close() })
}

// hangUp ends the link from the server's side, and waits for its
// goroutines.
func (tl *testLink) hangUp() linkResult {
	return tl.end(func() { tl.srv.Close() }, tl.cancel)
}

// end runs first, waits for the link to be served, then runs then and
// waits for the peer's reader; once.
func (tl *testLink) end(first, then func()) linkResult {
	tl.once.Do(func() {
		first()
		tl.result = <-tl.served
		then()
		<-tl.read
	})
	return tl.result
}

func topicItem(topic string, id, epoch uint64) *Item {
	return &Item{Topic: topic, Id: id, Epoch: epoch, Kind: 6, Payload: []byte(topic)}
}

func bizItem(biz string, id, epoch uint64) *Item {
	return &Item{Business: biz, Id: id, Epoch: epoch, Kind: 1, Payload: []byte(biz)}
}

// TestMarks: a stored item is a duplicate at or below its mark of the
// same epoch only.
func TestMarks(t *testing.T) {
	m := newMarks(map[string]SyncPoint{"news": {ID: 5, Epoch: 1}})
	for _, tc := range []struct {
		name      string
		id, epoch uint64
		dup       bool
	}{
		{"news", 4, 1, true},
		{"news", 5, 1, true},
		{"news", 6, 1, false},
		{"news", 1, 2, false}, // another epoch: not comparable
		{"news", 9, 0, false},
		{"other", 1, 1, false},
	} {
		if got := m.has(tc.name, tc.id, tc.epoch); got != tc.dup {
			t.Errorf("has(%s, %d, %d) = %v, want %v", tc.name, tc.id, tc.epoch, got, tc.dup)
		}
	}
	m.advance("other", 3, 7)
	if !m.has("other", 3, 7) || !slices.Equal(m.pending(), []string{"other"}) {
		t.Fatalf("after advance: %+v", m)
	}
	m.drop("other")
	if m.has("other", 3, 7) || len(m.pending()) != 0 {
		t.Fatalf("after drop: %+v", m)
	}
}

// TestDeliverTopics routes items by topic, then business, then the
// default handler; dedupes topic items by their topic's cursor (and
// business items by their point, independently of a topic of the same
// name); and advances the cursor over items without a handler.
func TestDeliverTopics(t *testing.T) {
	dir := t.TempDir()
	if err := savePoints(dir, "", map[string]SyncPoint{"chat": {ID: 10, Epoch: 1}, "news": {ID: 100, Epoch: 1}},
		map[string]SyncPoint{"news": {ID: 5, Epoch: 1}}); err != nil {
		t.Fatal(err)
	}
	c := newTestClient(t, dir)
	var got []string
	rec := func(who string) Handler {
		return func(_ context.Context, it *Item) error {
			got = append(got, fmt.Sprintf("%s:%s/%s#%d", who, it.Topic, it.Business, it.Id))
			return nil
		}
	}
	c.HandleTopic("news", rec("news"))
	c.Handle("chat", rec("chat"))
	c.HandleDefault(rec("default"))
	r := newRun(c)
	defer r.timer.Stop()
	items := []*Item{
		topicItem("news", 5, 1), // duplicate of the cursor
		topicItem("news", 6, 1),
		bizItem("news", 6, 1), // a business named news: its point is 100, a duplicate
		bizItem("chat", 11, 1),
		{Topic: "sports", Business: "chat", Id: 1, Epoch: 1}, // to the business's handler
		{Topic: "news", Business: "chat", Id: 7, Epoch: 1},   // the topic's handler first
		topicItem("_all", 3, 2),                              // default
		{Topic: "news", Business: "chat"},                    // transient: no cursor
		topicItem("news", 7, 1),                              // duplicate of the one before
	}
	if err := r.deliver(context.Background(), &link{}, items); err != nil {
		t.Fatal(err)
	}
	want := []string{"news:news/#6", "chat:/chat#11", "chat:sports/chat#1", "news:news/chat#7", "default:_all/#3", "news:news/chat#0"}
	if !slices.Equal(got, want) {
		t.Fatalf("delivered\n%q, want\n%q", got, want)
	}
	wantTopics := map[string]SyncPoint{"news": {ID: 7, Epoch: 1}, "sports": {ID: 1, Epoch: 1}, "_all": {ID: 3, Epoch: 2}}
	if !maps.Equal(r.topics.at, wantTopics) || !slices.Equal(r.topics.pending(), []string{"_all", "news", "sports"}) {
		t.Fatalf("topic cursors %v (unacked %v), want %v", r.topics.at, r.topics.pending(), wantTopics)
	}
	if want := (map[string]SyncPoint{"chat": {ID: 11, Epoch: 1}, "news": {ID: 100, Epoch: 1}}); !maps.Equal(r.points.at, want) || !slices.Equal(r.points.pending(), []string{"chat"}) {
		t.Fatalf("sync points %v (unacked %v), want %v", r.points.at, r.points.pending(), want)
	}
	if st := c.Stats(); st.Delivered != 6 || st.TopicItems != 5 || st.Duplicates != 3 {
		t.Fatalf("stats %+v", st)
	}

	// Without a handler, a topic item is dropped and its cursor advances.
	c = newTestClient(t, t.TempDir())
	r = newRun(c)
	defer r.timer.Stop()
	if err := r.deliver(context.Background(), &link{}, []*Item{topicItem("news", 2, 1)}); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.Unhandled != 1 || r.topics.at["news"] != (SyncPoint{ID: 2, Epoch: 1}) {
		t.Fatalf("unhandled: stats %+v, cursors %v", st, r.topics.at)
	}

	// A failing topic handler stops delivery before the cursor advances.
	c.HandleTopic("news", func(context.Context, *Item) error { return errors.New("full") })
	err := r.deliver(context.Background(), &link{}, []*Item{topicItem("news", 3, 1), topicItem("news", 4, 1)})
	if err == nil || !strings.Contains(err.Error(), "topic news") || r.topics.at["news"].ID != 2 {
		t.Fatalf("failing handler: %v, cursors %v", err, r.topics.at)
	}
}

// TestHelloTopics: the Hello presents the topic cursors, sorted and at most
// maxTopics; a change of user drops the sync points but keeps them, and
// needs no second Hello when there were no points.
func TestHelloTopics(t *testing.T) {
	dir := t.TempDir()
	topics := map[string]SyncPoint{}
	for i := range maxTopics + 5 {
		topics[fmt.Sprintf("t%04d", i)] = SyncPoint{ID: uint64(i + 1), Epoch: 9}
	}
	if err := savePoints(dir, "ann", map[string]SyncPoint{"chat": {ID: 4, Epoch: 1}}, topics); err != nil {
		t.Fatal(err)
	}
	c := newTestClient(t, dir)
	r := newRun(c)
	defer r.timer.Stop()
	h := r.hello(c.endpoints[0], "tok").GetHello()
	if len(h.Topics) != maxTopics || len(h.Points) != 1 || h.PointsUser != "ann" {
		t.Fatalf("hello: %d topics, %d points, user %q", len(h.Topics), len(h.Points), h.PointsUser)
	}
	if tc := h.Topics[0]; tc.Topic != "t0000" || tc.Id != 1 || tc.Epoch != 9 || h.Topics[maxTopics-1].Topic != "t0999" {
		t.Fatalf("hello topics start with %v, end with %v", tc, h.Topics[maxTopics-1])
	}

	if again := r.switchUser("bob"); !again {
		t.Fatal("switch from ann's points: no second hello")
	}
	h = r.hello(c.endpoints[0], "tok").GetHello()
	if len(h.Points) != 0 || len(h.Topics) != maxTopics || h.PointsUser != "bob" {
		t.Fatalf("hello after the switch: %d points, %d topics, user %q", len(h.Points), len(h.Topics), h.PointsUser)
	}
	if p, tc := c.Points(), c.TopicCursors(); len(p) != 0 || !maps.Equal(tc, topics) {
		t.Fatalf("persisted after the switch: points %v, %d topic cursors", p, len(tc))
	}
	if again := r.switchUser(""); again {
		t.Fatal("switch with topic cursors only: a second hello")
	}
}

// TestSyncTopics runs a round with topic resets, topic and business items
// and an empty done frame over a link: the reset goes to the topic reset
// handler before the items, and the round's end persists, then acks, the
// points and the cursors.
func TestSyncTopics(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		dir := t.TempDir()
		if err := savePoints(dir, "", nil, map[string]SyncPoint{"old": {ID: 50, Epoch: 1}, "news": {ID: 5, Epoch: 1}}); err != nil {
			t.Fatal(err)
		}
		c := newTestClient(t, dir)
		var events []string
		c.HandleDefault(func(_ context.Context, it *Item) error {
			events = append(events, fmt.Sprintf("item %s/%s#%d", it.Topic, it.Business, it.Id))
			return nil
		})
		c.HandleReset(func(_ context.Context, biz string) error {
			events = append(events, "business reset "+biz)
			return nil
		})
		c.HandleTopicReset(func(_ context.Context, topic string) error {
			events = append(events, "topic reset "+topic)
			return nil
		})
		r := newRun(c)
		defer r.timer.Stop()

		// What the state file held when each Ack arrived.
		var onDisk []stateDoc
		tl := pipeLink(t, r, func(f *gatewaypb.Frame) {
			if f.GetAck() != nil {
				var st stateDoc
				b, err := os.ReadFile(filepath.Join(dir, stateFile))
				if err == nil {
					err = json.Unmarshal(b, &st)
				}
				if err != nil {
					t.Error(err)
				}
				onDisk = append(onDisk, st)
			}
		})
		tl.sync(t, &gatewaypb.Sync{TopicResets: []string{"old"}, Items: []*gatewaypb.Item{
			topicItem("old", 1, 2), topicItem("news", 5, 1), topicItem("news", 6, 1), bizItem("chat", 3, 1),
		}})
		tl.sync(t, &gatewaypb.Sync{Done: true})
		synctest.Wait()

		want := []string{"topic reset old", "item old/#1", "item news/#6", "item /chat#3"}
		if !slices.Equal(events, want) {
			t.Fatalf("events %q, want %q", events, want)
		}
		acks := tl.frames(isAck)
		if len(acks) != 1 {
			t.Fatalf("%d acks, want 1", len(acks))
		}
		ack := acks[0].f.GetAck()
		if len(ack.Points) != 1 || ack.Points[0].Business != "chat" || ack.Points[0].Id != 3 ||
			len(ack.Topics) != 2 || ack.Topics[0].Topic != "news" || ack.Topics[0].Id != 6 ||
			ack.Topics[1].Topic != "old" || ack.Topics[1].Id != 1 || ack.Topics[1].Epoch != 2 {
			t.Fatalf("ack %v", ack)
		}
		wantTopics := map[string]SyncPoint{"old": {ID: 1, Epoch: 2}, "news": {ID: 6, Epoch: 1}}
		if len(onDisk) != 1 || !maps.Equal(onDisk[0].Topics, wantTopics) || onDisk[0].Points["chat"] != (SyncPoint{ID: 3, Epoch: 1}) {
			t.Fatalf("state file when the ack arrived: %+v, want topics %v", onDisk, wantTopics)
		}
		if st := c.Stats(); st.Rounds != 1 || st.TopicResets != 1 || st.Resets != 0 || st.TopicItems != 2 || st.Duplicates != 1 || st.Acks != 1 {
			t.Fatalf("stats %+v", st)
		}
		tl.stop()
		if tc := c.TopicCursors(); !maps.Equal(tc, wantTopics) {
			t.Fatalf("topic cursors %v, want %v", tc, wantTopics)
		}
	})
}

// TestDeferralRetry: a round's done frame listing deferred buckets makes
// the client send one FOREGROUND after retry_after_ms plus at most 25%;
// another deferral re-arms the wait, a round without deferrals and the end
// of the link cancel it.
func TestDeferralRetry(t *testing.T) {
	deferral := func(ms uint32) *gatewaypb.Sync {
		return &gatewaypb.Sync{Done: true, Deferred: []string{"low"}, RetryAfterMs: ms}
	}
	// within checks that the FOREGROUND events the peer got are one, sent
	// within [lo, hi] after from.
	within := func(t *testing.T, tl *testLink, from time.Time, lo, hi time.Duration) {
		t.Helper()
		fg := tl.frames(isForeground)
		if len(fg) != 1 {
			t.Fatalf("%d FOREGROUND events, want 1", len(fg))
		}
		if d := fg[0].at.Sub(from); d < lo || d > hi {
			t.Fatalf("FOREGROUND after %v, want within [%v, %v]", d, lo, hi)
		}
	}

	t.Run("once", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := newTestClient(t, t.TempDir())
			r := newRun(c)
			defer r.timer.Stop()
			tl := pipeLink(t, r, nil)
			tl.sync(t, deferral(2000))
			from := time.Now()
			time.Sleep(1999 * time.Millisecond)
			synctest.Wait()
			if n := len(tl.frames(isForeground)); n != 0 {
				t.Fatalf("%d FOREGROUND before retry_after_ms", n)
			}
			time.Sleep(time.Minute)
			within(t, tl, from, 2000*time.Millisecond, 2500*time.Millisecond)
			if st := c.Stats(); st.Deferrals != 1 || st.DeferRetries != 1 || st.Rounds != 1 {
				t.Fatalf("stats %+v", st)
			}
			tl.stop()
		})
	})

	t.Run("rearmed", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := newTestClient(t, t.TempDir())
			r := newRun(c)
			defer r.timer.Stop()
			tl := pipeLink(t, r, nil)
			tl.sync(t, deferral(1000))
			time.Sleep(500 * time.Millisecond)
			tl.sync(t, deferral(3000))
			from := time.Now()
			time.Sleep(time.Minute)
			within(t, tl, from, 3000*time.Millisecond, 3750*time.Millisecond)
			if st := c.Stats(); st.Deferrals != 2 || st.DeferRetries != 1 {
				t.Fatalf("stats %+v", st)
			}
			tl.stop()
		})
	})

	t.Run("default delay", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			r := newRun(newTestClient(t, t.TempDir()))
			defer r.timer.Stop()
			tl := pipeLink(t, r, nil)
			tl.sync(t, deferral(0))
			from := time.Now()
			time.Sleep(time.Minute)
			within(t, tl, from, DefaultDeferRetry, DefaultDeferRetry*5/4)
			tl.stop()
		})
	})

	t.Run("round without deferrals", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := newTestClient(t, t.TempDir())
			r := newRun(c)
			defer r.timer.Stop()
			tl := pipeLink(t, r, nil)
			tl.sync(t, deferral(1000))
			time.Sleep(500 * time.Millisecond)
			tl.sync(t, &gatewaypb.Sync{Done: true}) // the server's own round read them
			time.Sleep(time.Minute)
			if n := len(tl.frames(isForeground)); n != 0 {
				t.Fatalf("%d FOREGROUND after a round without deferrals", n)
			}
			if st := c.Stats(); st.Deferrals != 1 || st.DeferRetries != 0 || st.Rounds != 2 {
				t.Fatalf("stats %+v", st)
			}
			tl.stop()
		})
	})

	t.Run("link ends", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			c := newTestClient(t, t.TempDir())
			r := newRun(c)
			defer r.timer.Stop()
			tl := pipeLink(t, r, nil)
			tl.sync(t, deferral(1000))
			time.Sleep(500 * time.Millisecond)
			tl.hangUp()
			// The next link of the same run: its Hello's round reads the
			// deferred buckets, so the old deferral must not fire on it.
			next := pipeLink(t, r, nil)
			time.Sleep(time.Minute)
			if n := len(tl.frames(isForeground)) + len(next.frames(isForeground)); n != 0 {
				t.Fatalf("%d FOREGROUND after the link ended", n)
			}
			if st := c.Stats(); st.Deferrals != 1 || st.DeferRetries != 0 {
				t.Fatalf("stats %+v", st)
			}
			// A deferral on the new link still works.
			next.sync(t, deferral(100))
			time.Sleep(time.Minute)
			if n := len(next.frames(isForeground)); n != 1 {
				t.Fatalf("%d FOREGROUND on the new link, want 1", n)
			}
			next.stop()
		})
	})
}

// TestDeferDelay: uniform in [d, 1.25 d].
func TestDeferDelay(t *testing.T) {
	lo, hi := time.Duration(1<<62), time.Duration(0)
	for range 2000 {
		d := deferDelay(4000)
		if d < 4*time.Second || d > 5*time.Second {
			t.Fatalf("deferDelay(4000) = %v, want within [4s, 5s]", d)
		}
		lo, hi = min(lo, d), max(hi, d)
	}
	if lo > 4100*time.Millisecond || hi < 4900*time.Millisecond {
		t.Errorf("2000 draws within [%v, %v], want spread over [4s, 5s]", lo, hi)
	}
}
