package analytics_test

import (
	"fmt"
	"math"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/proto"
)

// TestAggregates goes from client batches to the active-user, retention,
// session, page and crash-rate figures, and checks that a rebuild gives
// the same aggregates.
func TestAggregates(t *testing.T) {
	at := func(d, h, m int) time.Time { return time.Date(2026, 11, d, h, m, 0, 0, time.UTC) }
	now := at(22, 23, 0)
	in, l := newIngestor(t, func() time.Time { return now })
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: l, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	stop := oplogtest.RunUntilCleanup(t, "aggregates", ag.Run)
	t.Cleanup(func() {
		stop()
		_ = ag.Close()
	})
	n := 0
	ev := func(typ analyticspb.Type, when time.Time, mod ...func(*analyticspb.Event)) *analyticspb.Event {
		n++
		e := event(fmt.Sprint("e", n), typ, when)
		for _, m := range mod {
			m(e)
		}
		return e
	}
	page := func(p, from string) func(*analyticspb.Event) {
		return func(e *analyticspb.Event) { e.Page, e.Referrer = p, from }
	}
	v52 := func(e *analyticspb.Event) { e.AppVersion, e.Releases = "5.2", map[string]string{"shop-h5": "2.1"} }
	upload := func(user, device string, evs ...*analyticspb.Event) {
		t.Helper()
		r, err := in.Ingest(ctx(t), analytics.Identity{Device: device, User: user}, &analyticspb.Batch{Events: evs})
		if err != nil || int(r.Accepted) != len(evs) {
			t.Fatalf("ingest: %v, %v", r, err)
		}
	}
	// Day 20: four users. u1 has two sessions (a 50-minute gap); u2, on
	// 5.2 with release shop-h5 2.1, crashes; u4 has no user id.
	upload("u1", "d1",
		ev(analyticspb.Type_TYPE_SESSION_START, at(20, 10, 0)),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(20, 10, 1), page("home", "")),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(20, 10, 10), page("cart", "home")),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(20, 11, 0), page("home", "")))
	upload("u2", "d2",
		ev(analyticspb.Type_TYPE_SESSION_START, at(20, 9, 0), v52),
		ev(analyticspb.Type_TYPE_CRASH, at(20, 9, 5), v52),
		ev(analyticspb.Type_TYPE_CRASH, at(20, 9, 6), v52))
	upload("u3", "d3", ev(analyticspb.Type_TYPE_PAGE_VIEW, at(20, 12, 0), page("home", "")))
	upload("", "d4", ev(analyticspb.Type_TYPE_CUSTOM, at(20, 13, 0), func(e *analyticspb.Event) { e.Name = "share" }))
	// Day 21: u1 and u2 come back, u5 is new. Day 22: u1 again.
	upload("u1", "d1", ev(analyticspb.Type_TYPE_PAGE_VIEW, at(21, 8, 0), page("home", "")))
	upload("u2", "d2", ev(analyticspb.Type_TYPE_SESSION_START, at(21, 8, 0), v52))
	upload("u5", "d5", ev(analyticspb.Type_TYPE_SESSION_START, at(21, 9, 0)))
	upload("u1", "d1", ev(analyticspb.Type_TYPE_SESSION_START, at(22, 7, 0)))
	// A duplicate past JetStream's window, and a malformed record, written
	// straight to the stream: neither may count.
	dup, _ := proto.Marshal(&analyticspb.Event{Id: "e1", Type: analyticspb.Type_TYPE_SESSION_START, Device: "d1", User: "u1", App: "shop",
		TimeMs: at(20, 10, 0).UnixMilli()})
	for _, data := range [][]byte{dup, []byte("\xff\xfenot an event")} {
		if _, err := l.JetStream().Publish(ctx(t), "sluice.analytics.shop.session-start", data); err != nil {
			t.Fatal(err)
		}
	}

	c, err := ag.Counters(ctx(t), "shop", "20261120")
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]uint64{
		"dau": 4, "new": 4, "sessions@": 5, "sessions@v:5.1": 4, "sessions@v:5.2": 1, "sessions@r:shop-h5=2.1": 1,
		"crashes@": 2, "crashes@v:5.2": 2, "crashes-users@": 1, "crashed-sessions@": 1, "crashed-sessions@r:shop-h5=2.1": 1,
		"page:home": 3, "page:cart": 1, "path:home > cart": 1, "event:share": 1,
		"dau:version=5.1": 3, "dau:version=5.2": 1, "dau:os=android": 4,
		// u1's first (10 min) and second (one event), u2's (6 min), u3's and
		// u4's (one event each).
		"session-ms": uint64((16 * time.Minute).Milliseconds()),
	}
	for k, v := range want {
		if c[k] != v {
			t.Errorf("day 20 %s = %d, want %d", k, c[k], v)
		}
	}
	if c21, _ := ag.Counters(ctx(t), "shop", "20261121"); c21["dau"] != 3 || c21["new"] != 1 {
		t.Errorf("day 21: dau %d new %d, want 3 and 1", c21["dau"], c21["new"])
	}
	if w, _ := ag.Counters(ctx(t), "shop", "2026W47"); w["wau"] != 5 {
		t.Errorf("week 47 wau %d, want 5", w["wau"])
	}
	if m, _ := ag.Counters(ctx(t), "shop", "202611"); m["mau"] != 5 {
		t.Errorf("November mau %d, want 5", m["mau"])
	}
	ret, err := ag.Retention(ctx(t), "shop", "20261120", 2)
	if err != nil || !slices.Equal(ret, []uint64{4, 2, 1}) {
		t.Errorf("retention of the 20th: %v, %v; want [4 2 1]", ret, err)
	}
	rates, err := ag.CrashRates(ctx(t), "shop", "20261120")
	if err != nil {
		t.Fatal(err)
	}
	if r := rates["r:shop-h5=2.1"]; r.Sessions != 1 || r.CrashedSessions != 1 || r.Rate != 1 {
		t.Errorf("release shop-h5 2.1: %+v, want 1 session, crashed", r)
	}
	if r := rates[""]; r.Sessions != 5 || math.Abs(r.Rate-0.2) > 1e-9 || math.Abs(r.CrashFree-0.8) > 1e-9 || r.ActiveUsers != 4 ||
		math.Abs(r.CrashFreeUsers-0.75) > 1e-9 {
		t.Errorf("all: %+v, want 5 sessions, crash rate 0.2, 4 active users, 75%% crash-free", r)
	}

	// A rebuild gives the same aggregates.
	p := ag.Projection()
	before, err := p.Digest(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Rebuild(ctx(t), 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	after, _ := p.Digest(ctx(t))
	if before != after {
		t.Fatalf("digest %s after a rebuild, %s before", after, before)
	}
	if c2, _ := ag.Counters(ctx(t), "shop", "20261120"); c2["dau"] != 4 || c2["crashes@"] != 2 {
		t.Fatalf("after a rebuild: %v", c2)
	}
}

// TestDuplicatePastTheWindow: an event stored twice (the second copy past
// JetStream's duplicate window, as when a client sends a batch again much
// later) counts once live, and once again in a rebuild made after
// DedupeKeep has passed since both were applied.
func TestDuplicatePastTheWindow(t *testing.T) {
	in, l := newIngestor(t, time.Now)
	const keep = 2 * time.Second // badger's TTLs count whole seconds
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: l, Dir: t.TempDir(), DedupeKeep: keep})
	if err != nil {
		t.Fatal(err)
	}
	stop := oplogtest.RunUntilCleanup(t, "aggregates", ag.Run)
	t.Cleanup(func() {
		stop()
		_ = ag.Close()
	})
	e := event("p1", analyticspb.Type_TYPE_PAGE_VIEW, time.Now())
	e.Page = "home"
	if r, err := in.Ingest(ctx(t), analytics.Identity{Device: "d1", User: "u1"}, &analyticspb.Batch{Events: []*analyticspb.Event{e}}); err != nil || r.Accepted != 1 {
		t.Fatalf("upload: %v %v", r, err)
	}
	// The second copy: the same message under another message id, as
	// JetStream stores it once its duplicate window has passed.
	s, err := l.JetStream().Stream(ctx(t), analytics.StreamAnalytics)
	if err != nil {
		t.Fatal(err)
	}
	first, err := s.GetMsg(ctx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.JetStream().Publish(ctx(t), first.Subject, first.Data, jetstream.WithMsgID("later")); err != nil {
		t.Fatal(err)
	}
	today := time.Now().UTC().Format("20060102")
	pages := func(when string) {
		t.Helper()
		c, err := ag.Counters(ctx(t), "shop", today)
		if err != nil {
			t.Fatal(err)
		}
		if c["page:home"] != 1 {
			t.Fatalf("%s: page:home %d, want 1 (the duplicate dropped)", when, c["page:home"])
		}
	}
	pages("live")
	live, err := ag.Projection().Digest(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(keep + 1100*time.Millisecond)
	sum, err := ag.Projection().Rebuild(ctx(t), 0, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	pages("rebuilt")
	if sum.Digest != live {
		t.Fatalf("rebuilt digest %s, live %s", sum.Digest, live)
	}
}

// TestSessionsOutOfOrder: a session whose batches are stored out of order
// (the later one, with the session end, first) is one session of the
// right length; events that come late join the session they belong to.
func TestSessionsOutOfOrder(t *testing.T) {
	at := func(h, m int) time.Time { return time.Date(2026, 11, 20, h, m, 0, 0, time.UTC) }
	in, l := newIngestor(t, func() time.Time { return at(23, 0) })
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: l, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	stop := oplogtest.RunUntilCleanup(t, "aggregates", ag.Run)
	t.Cleanup(func() {
		stop()
		_ = ag.Close()
	})
	n := 0
	ev := func(typ analyticspb.Type, h, m int) *analyticspb.Event {
		n++
		return event(fmt.Sprint("e", n), typ, at(h, m))
	}
	check := func(step string, sessions uint64, length time.Duration, crashed uint64) {
		t.Helper()
		c, err := ag.Counters(ctx(t), "shop", "20261120")
		if err != nil {
			t.Fatal(err)
		}
		if c["sessions@"] != sessions || c["session-ms"] != uint64(length.Milliseconds()) || c["crashed-sessions@"] != crashed {
			t.Fatalf("%s: %d sessions, %v long in all, %d crashed; want %d, %v, %d", step, c["sessions@"],
				time.Duration(c["session-ms"])*time.Millisecond, c["crashed-sessions@"], sessions, length, crashed)
		}
	}
	upload := func(evs ...*analyticspb.Event) {
		t.Helper()
		if r, err := in.Ingest(ctx(t), analytics.Identity{Device: "d9", User: "u9"}, &analyticspb.Batch{Events: evs}); err != nil || int(r.Accepted) != len(evs) {
			t.Fatalf("ingest: %v %v", r, err)
		}
	}
	start, early := ev(analyticspb.Type_TYPE_SESSION_START, 10, 0), ev(analyticspb.Type_TYPE_PAGE_VIEW, 10, 2)
	upload(ev(analyticspb.Type_TYPE_PAGE_VIEW, 10, 5), ev(analyticspb.Type_TYPE_SESSION_END, 10, 10))
	check("the later batch", 1, 5*time.Minute, 0)
	upload(start, early)
	check("then the earlier one", 1, 10*time.Minute, 0)
	upload(ev(analyticspb.Type_TYPE_CRASH, 10, 7))
	check("a crash inside the ended session", 1, 10*time.Minute, 1)
	upload(ev(analyticspb.Type_TYPE_PAGE_VIEW, 11, 0))
	check("an event after the session ended", 2, 10*time.Minute, 1)
	upload(ev(analyticspb.Type_TYPE_PAGE_VIEW, 10, 40))
	check("an event 20 minutes before the second session", 2, 30*time.Minute, 1)
	upload(ev(analyticspb.Type_TYPE_SESSION_START, 12, 0))
	check("a session start after the second session", 3, 30*time.Minute, 1)
}
