package analytics_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

// TestCircuitBreaker: a crash spike among the sessions of a gray release
// pauses it; a freeze spike on one model turns a switch off for that
// model only; the trips record their evidence, once per rule version.
func TestCircuitBreaker(t *testing.T) {
	now := time.Now()
	in, l := newIngestor(t, time.Now)
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: l, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	stopAg := oplogtest.RunUntilCleanup(t, "aggregates", ag.Run)
	t.Cleanup(func() { stopAg(); _ = ag.Close() })
	d := deliverytest.MustRun(t, delivery.Config{Log: l}, false)
	c := ctx(t)
	for _, v := range []string{"1.0", "2.0"} {
		if _, err := d.Upload(c, delivery.Upload{Package: "shop-h5", Kind: deliverypb.PackageKind_PACKAGE_KIND_H5, Version: v, Data: []byte("bundle " + v)}, "ci"); err != nil {
			t.Fatal(err)
		}
	}
	p100 := 100.0
	if _, err := d.Gray(c, "shop-h5", "1.0", &deliverypb.Rule{Percent: &p100}, "ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Full(c, "shop-h5", "1.0", "ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Gray(c, "shop-h5", "2.0", &deliverypb.Rule{Percent: &p100}, "ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Upload(c, delivery.Upload{Package: "maps", Kind: deliverypb.PackageKind_PACKAGE_KIND_RESOURCE, Version: "1", Data: []byte("tiles")}, "ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Gray(c, "maps", "1", &deliverypb.Rule{Percent: &p100}, "ci"); err != nil {
		t.Fatal(err)
	}
	// Tiles 2 is out to everyone (full), after tiles 1.
	for _, v := range []string{"1", "2"} {
		if _, err := d.Upload(c, delivery.Upload{Package: "tiles", Kind: deliverypb.PackageKind_PACKAGE_KIND_RESOURCE, Version: v, Data: []byte("tiles " + v)}, "ci"); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Gray(c, "tiles", v, &deliverypb.Rule{Percent: &p100}, "ci"); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Full(c, "tiles", v, "ci"); err != nil {
			t.Fatal(err)
		}
	}
	bv := func(b bool) *deliverypb.Value {
		return &deliverypb.Value{Kind: &deliverypb.Value_BoolValue{BoolValue: b}}
	}
	if _, err := d.SetSwitch(c, &deliverypb.Switch{Key: "new-feed", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: bv(true)}, "ci", 0); err != nil {
		t.Fatal(err)
	}
	br, err := analytics.OpenBreakers(c, analytics.BreakersConfig{Log: l, Aggregates: ag, Actions: d, Interval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	oplogtest.RunUntilCleanup(t, "breakers", br.Run)
	for _, r := range []*analyticspb.BreakerRule{
		{Id: "h5-crashes", App: "shop", Package: "shop-h5", Version: "2.0", Metric: analyticspb.Metric_METRIC_CRASH_RATE,
			Threshold: 0.2, MinSessions: 20, WindowMs: (10 * time.Minute).Milliseconds(), Action: analyticspb.Action_ACTION_PAUSE},
		{Id: "feed-freezes", App: "shop", SwitchKey: "new-feed", SwitchVariant: "", Model: "Pixel 8", Metric: analyticspb.Metric_METRIC_FREEZE_RATE,
			Threshold: 0.3, MinSessions: 10, WindowMs: (10 * time.Minute).Milliseconds(), Action: analyticspb.Action_ACTION_SWITCH_OFF},
		{Id: "maps-moto", App: "shop", Package: "maps", Version: "1", Model: "Moto", Metric: analyticspb.Metric_METRIC_CRASH_RATE,
			Threshold: 0.5, MinSessions: 10, WindowMs: (10 * time.Minute).Milliseconds(), Action: analyticspb.Action_ACTION_PAUSE},
		{Id: "tiles-moto", App: "shop", Package: "tiles", Version: "2", Model: "Moto", Metric: analyticspb.Metric_METRIC_CRASH_RATE,
			Threshold: 0.5, MinSessions: 10, WindowMs: (10 * time.Minute).Milliseconds(), Action: analyticspb.Action_ACTION_PAUSE},
	} {
		if _, err := br.SetRule(c, r, "sre"); err != nil {
			t.Fatal(err)
		}
	}
	// 30 devices on 2.0 start sessions; 10 crash (33%, over 20%). On
	// Pixel 8, 12 devices with the feed; 5 freeze (42%, over 30%).
	n := 0
	send := func(dev, model string, typ analyticspb.Type, rel map[string]string, sw map[string]string) {
		n++
		e := &analyticspb.Event{Id: fmt.Sprint("e", n), Type: typ, TimeMs: now.UnixMilli(), App: "shop", Model: model, Releases: rel, Switches: sw}
		if r, err := in.Ingest(c, analytics.Identity{Device: dev}, &analyticspb.Batch{Events: []*analyticspb.Event{e}}); err != nil || r.Accepted != 1 {
			t.Fatalf("ingest: %v %v", r, err)
		}
	}
	rel := map[string]string{"shop-h5": "2.0"}
	for i := range 30 {
		send(fmt.Sprint("r", i), "Galaxy", analyticspb.Type_TYPE_SESSION_START, rel, nil)
		if i < 10 {
			send(fmt.Sprint("r", i), "Galaxy", analyticspb.Type_TYPE_CRASH, rel, nil)
		}
	}
	feed := map[string]string{"new-feed": ""}
	for i := range 12 {
		send(fmt.Sprint("p", i), "Pixel 8", analyticspb.Type_TYPE_SESSION_START, nil, feed)
		if i < 5 {
			send(fmt.Sprint("p", i), "Pixel 8", analyticspb.Type_TYPE_FREEZE, nil, feed)
		}
	}
	// Maps crashes on Moto only: 10 sessions, 6 crash; 10 on Galaxy, none.
	mapsRel := map[string]string{"maps": "1"}
	for i := range 10 {
		send(fmt.Sprint("m", i), "Moto", analyticspb.Type_TYPE_SESSION_START, mapsRel, nil)
		if i < 6 {
			send(fmt.Sprint("m", i), "Moto", analyticspb.Type_TYPE_CRASH, mapsRel, nil)
		}
		send(fmt.Sprint("g", i), "Galaxy", analyticspb.Type_TYPE_SESSION_START, mapsRel, nil)
	}
	// And so does the full release of tiles 2.
	tilesRel := map[string]string{"tiles": "2"}
	for i := range 10 {
		send(fmt.Sprint("tm", i), "Moto", analyticspb.Type_TYPE_SESSION_START, tilesRel, nil)
		if i < 7 {
			send(fmt.Sprint("tm", i), "Moto", analyticspb.Type_TYPE_CRASH, tilesRel, nil)
		}
		send(fmt.Sprint("tg", i), "Galaxy", analyticspb.Type_TYPE_SESSION_START, tilesRel, nil)
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		rel, _ := d.Release("shop-h5", "2.0")
		trips := br.Trips()
		done := 0
		for _, tr := range trips {
			if tr.Result == "done" {
				done++
			}
		}
		if rel.Paused && done == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("release paused %v; trips %v", rel.Paused, trips)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, tr := range br.Trips() {
		switch tr.Rule {
		case "h5-crashes":
			if tr.Sessions != 30 || tr.Affected != 10 || tr.Slice != "r:shop-h5=2.0" {
				t.Errorf("trip %v: want 30 sessions, 10 crashed", tr)
			}
		case "feed-freezes":
			if tr.Sessions != 12 || tr.Affected != 5 || tr.Slice != "s:new-feed=|m:Pixel 8" {
				t.Errorf("trip %v: want 12 sessions, 5 frozen", tr)
			}
		}
	}
	// The switch is off for Pixel 8 only.
	value := func(model string) bool {
		for _, sv := range d.View(&delivery.Device{ID: "x", Attrs: oplog.Attrs{Model: model}}).Switches {
			if sv.Key == "new-feed" {
				return sv.Value.GetBoolValue()
			}
		}
		t.Fatal("no new-feed switch in the view")
		return false
	}
	if value("Pixel 8") || !value("Galaxy") {
		t.Fatalf("new-feed: Pixel 8 %v, Galaxy %v; want off only on Pixel 8", value("Pixel 8"), value("Galaxy"))
	}
	// Maps is still gray, but no longer offered to Moto devices.
	offered := func(model string) bool {
		for _, sm := range d.View(&delivery.Device{ID: "y", Attrs: oplog.Attrs{Model: model}}).Releases {
			if m, err := delivery.VerifyManifest(sm, d.PublicKey()); err == nil && m.Package == "maps" {
				return true
			}
		}
		return false
	}
	if rel, _ := d.Release("maps", "1"); rel.Paused || offered("Moto") || !offered("Galaxy") {
		t.Fatalf("maps: paused %v, offered to Moto %v, to Galaxy %v; want gray, Galaxy only", rel.Paused, offered("Moto"), offered("Galaxy"))
	}
	// Tiles 2 stays full; Moto devices are offered tiles 1, as under a
	// pause (one that has 2 keeps it: a pause does not downgrade).
	offeredTiles := func(model string) *deliverypb.Manifest {
		for _, sm := range d.View(&delivery.Device{ID: "z", Attrs: oplog.Attrs{Model: model}}).Releases {
			if m, err := delivery.VerifyManifest(sm, d.PublicKey()); err == nil && m.Package == "tiles" {
				return m
			}
		}
		return nil
	}
	moto, galaxy := offeredTiles("Moto"), offeredTiles("Galaxy")
	if rel, _ := d.Release("tiles", "2"); rel.Stage != deliverypb.Stage_STAGE_FULL || rel.Paused || !slices.Equal(rel.ExcludedModels, []string{"Moto"}) ||
		moto.GetVersion() != "1" || galaxy.GetVersion() != "2" {
		t.Fatalf("tiles 2: %v paused %v excluded %v; offered to Moto %v, to Galaxy %v; want full, Moto offered 1, Galaxy 2",
			rel.Stage, rel.Paused, rel.ExcludedModels, moto, galaxy)
	}
	// Once per version: no second trip while the rule stays as it is.
	time.Sleep(300 * time.Millisecond)
	for _, tr := range br.Trips() {
		if tr.Result != "done" {
			t.Fatalf("a rule tripped again: %v", tr)
		}
	}
	if _, err := br.SetRule(c, &analyticspb.BreakerRule{Id: "bad", App: "shop", Package: "p", Version: "1", Metric: analyticspb.Metric_METRIC_CRASH_RATE,
		Threshold: 2, WindowMs: 60_000, Action: analyticspb.Action_ACTION_PAUSE}, "sre"); err == nil {
		t.Fatal("a threshold over 1 was accepted")
	}
}

// flakyActions is delivery with its first rollbacks failing as a
// stream that cannot be written would (fault injection: the real
// delivery does the work).
type flakyActions struct {
	*delivery.Delivery
	mu    sync.Mutex
	fails int
}

func (f *flakyActions) RollbackRelease(ctx context.Context, pkg, version, actor string) error {
	f.mu.Lock()
	fail := f.fails > 0
	f.fails--
	f.mu.Unlock()
	if fail {
		return fmt.Errorf("control stream: %w", oplog.ErrUnavailable)
	}
	return f.Delivery.RollbackRelease(ctx, pkg, version, actor)
}

// TestBreakerRollbackRetried: a rollback rule on a full version trips on
// a crash spike; the first action fails (the stream is unavailable) and
// is tried again; the version and the gray one after it are rolled back
// to the full version before; the trip records two attempts.
func TestBreakerRollbackRetried(t *testing.T) {
	now := time.Now()
	in, l := newIngestor(t, time.Now)
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: l, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	stopAg := oplogtest.RunUntilCleanup(t, "aggregates", ag.Run)
	t.Cleanup(func() { stopAg(); _ = ag.Close() })
	d := deliverytest.MustRun(t, delivery.Config{Log: l}, false)
	c := ctx(t)
	p100 := 100.0
	for _, v := range []string{"1", "2", "3"} {
		if _, err := d.Upload(c, delivery.Upload{Package: "cart", Kind: deliverypb.PackageKind_PACKAGE_KIND_H5, Version: v, Data: []byte("cart " + v)}, "ci"); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Gray(c, "cart", v, &deliverypb.Rule{Percent: &p100}, "ci"); err != nil {
			t.Fatal(err)
		}
		if v != "3" {
			if _, err := d.Full(c, "cart", v, "ci"); err != nil {
				t.Fatal(err)
			}
		}
	}
	actions := &flakyActions{Delivery: d, fails: 1}
	br, err := analytics.OpenBreakers(c, analytics.BreakersConfig{Log: l, Aggregates: ag, Actions: actions,
		Interval: 50 * time.Millisecond, RetryAfter: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	oplogtest.RunUntilCleanup(t, "breakers", br.Run)
	if _, err := br.SetRule(c, &analyticspb.BreakerRule{Id: "cart-2", App: "shop", Package: "cart", Version: "2", Metric: analyticspb.Metric_METRIC_CRASH_RATE,
		Threshold: 0.2, MinSessions: 10, WindowMs: (10 * time.Minute).Milliseconds(), Action: analyticspb.Action_ACTION_ROLLBACK}, "sre"); err != nil {
		t.Fatal(err)
	}
	rel := map[string]string{"cart": "2"}
	n := 0
	for i := range 10 {
		evs := []*analyticspb.Event{{Id: fmt.Sprint("s", n), Type: analyticspb.Type_TYPE_SESSION_START, TimeMs: now.UnixMilli(), App: "shop", Releases: rel}}
		if i < 4 {
			evs = append(evs, &analyticspb.Event{Id: fmt.Sprint("c", n), Type: analyticspb.Type_TYPE_CRASH, TimeMs: now.UnixMilli(), App: "shop", Releases: rel})
		}
		n++
		if r, err := in.Ingest(c, analytics.Identity{Device: fmt.Sprint("d", i)}, &analyticspb.Batch{Events: evs}); err != nil || int(r.Accepted) != len(evs) {
			t.Fatalf("ingest: %v %v", r, err)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	var tr *analyticspb.BreakerTrip
	for {
		if trips := br.Trips(); len(trips) == 1 && trips[0].Result == "done" {
			tr = trips[0]
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("trips %v", br.Trips())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if tr.Attempts != 2 || tr.Sessions != 10 || tr.Affected != 4 {
		t.Fatalf("trip %v: want 2 attempts, 10 sessions, 4 crashed", tr)
	}
	for v, want := range map[string]deliverypb.Stage{"1": deliverypb.Stage_STAGE_FULL, "2": deliverypb.Stage_STAGE_ROLLED_BACK, "3": deliverypb.Stage_STAGE_ROLLED_BACK} {
		if r, _ := d.Release("cart", v); r.Stage != want {
			t.Fatalf("cart %s: %v, want %v", v, r.Stage, want)
		}
	}
	// Done is done: no more attempts.
	time.Sleep(500 * time.Millisecond)
	if trips := br.Trips(); trips[0].Attempts != 2 {
		t.Fatalf("tried again after done: %v", trips[0])
	}
}
