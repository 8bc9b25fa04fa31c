package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
)

// TestTrackToFiguresEndToEnd runs sluiced and six apps (the Go SDK over
// WebSocket) that record their events with Track: batches over their
// links, answered once stored. The admin API's active users, sessions,
// pages, retention and crash figures (all, per version, per release)
// count exactly those events, and a rebuild of the aggregates by replay
// of the stream gives the same digest and the same figures.
func TestTrackToFiguresEndToEnd(t *testing.T) {
	d, addr := newTestDaemon(t)
	if _, err := d.start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	fleet := newAppFleet(t, ctx, d, addr)
	type app struct {
		device, user, os, version, release string
		end                                analyticspb.Type // how the session ends
	}
	apps := []app{
		{"ann-phone", "ann", "android", "5.1", "2", analyticspb.Type_TYPE_SESSION_END},
		{"ann-tablet", "ann", "ios", "5.1", "2", analyticspb.Type_TYPE_CRASH},
		{"bob-phone", "bob", "android", "5.0", "1", analyticspb.Type_TYPE_CRASH},
		{"cid-phone", "cid", "ios", "5.1", "2", analyticspb.Type_TYPE_SESSION_END},
		{"dan-phone", "dan", "android", "5.1", "2", analyticspb.Type_TYPE_FREEZE},
		{"kiosk-1", "", "android", "5.0", "1", analyticspb.Type_TYPE_SESSION_END}, // no user: counted as its device
	}
	type running struct {
		c      *client.Client
		cancel context.CancelFunc
		done   chan error
		events int64
	}
	var runs []*running
	defer func() {
		for _, r := range runs {
			r.cancel()
			if err := <-r.done; err != nil {
				t.Errorf("run: %v", err)
			}
		}
	}()
	for _, a := range apps {
		tok, err := fleet.signer.Issue(gateway.Claims{Device: a.device, User: a.user, App: "shop", Expires: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.New(client.Config{URL: fleet.ws, StateDir: filepath.Join(fleet.dir, a.device), Logger: &fleet.lg,
			Token:     func(context.Context) (string, error) { return tok, nil },
			Attrs:     &gatewaypb.Attrs{Os: a.os, AppVersion: a.version, Model: "Pixel 8", Region: "eu-west", Network: "wifi"},
			Analytics: &client.AnalyticsConfig{App: "shop", Interval: 100 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		c.SetRelease("shop", a.release)
		rctx, rcancel := context.WithCancel(context.Background())
		r := &running{c: c, cancel: rcancel, done: make(chan error, 1)}
		runs = append(runs, r)
		go func() { r.done <- c.Run(rctx) }()
		for _, ev := range []*analyticspb.Event{
			{Type: analyticspb.Type_TYPE_SESSION_START},
			{Type: analyticspb.Type_TYPE_PAGE_VIEW, Page: "home"},
			{Type: analyticspb.Type_TYPE_PAGE_VIEW, Page: "cart"}, // the SDK fills the referrer
			{Type: analyticspb.Type_TYPE_CUSTOM, Name: "add_to_cart", Properties: map[string]string{"sku": "sku-1"}},
			{Type: a.end, Stack: "java.lang.IllegalStateException\n\tat Cart.total(Cart.kt:88)"},
		} {
			c.Track(ev)
			r.events++
		}
	}
	for i, r := range runs {
		for r.c.Stats().AnalyticsStored < r.events {
			if ctx.Err() != nil {
				t.Fatalf("%s: %+v, want %d stored", apps[i].device, r.c.Stats(), r.events)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	now := time.Now().UTC()
	today := now.Format("20060102")
	y, w := now.ISOWeek()
	week := fmt.Sprintf("%04dW%02d", y, w)
	type figures struct {
		day, week, month map[string]uint64
		retention        []uint64
		crashes          map[string]analytics.CrashRate
	}
	read := func() figures {
		t.Helper()
		var f figures
		for _, p := range []struct {
			period string
			into   *map[string]uint64
		}{{today, &f.day}, {week, &f.week}, {now.Format("200601"), &f.month}} {
			var got struct {
				Counters map[string]uint64 `json:"counters"`
			}
			if err := d.doJSON(ctx, http.MethodGet, "/v1/analytics/shop/periods/"+p.period, &got); err != nil {
				t.Fatal(err)
			}
			*p.into = got.Counters
		}
		var ret struct {
			Active []uint64 `json:"active"`
		}
		if err := d.doJSON(ctx, http.MethodGet, "/v1/analytics/shop/retention/"+today+"?days=0", &ret); err != nil {
			t.Fatal(err)
		}
		f.retention = ret.Active
		var cr struct {
			Slices map[string]analytics.CrashRate `json:"slices"`
		}
		if err := d.doJSON(ctx, http.MethodGet, "/v1/analytics/shop/crashes/"+today, &cr); err != nil {
			t.Fatal(err)
		}
		f.crashes = cr.Slices
		return f
	}
	f := read()
	// Five users: ann (two devices), bob, cid, dan and the kiosk.
	for metric, want := range map[string]uint64{"dau": 5, "new": 5, "sessions@": 6, "crashes@": 2, "freezes@": 1,
		"page:home": 6, "page:cart": 6, "path:home > cart": 6, "event:add_to_cart": 6,
		"dau:version=5.1": 3, "dau:version=5.0": 2, "dau:release=shop=2": 3, "dau:release=shop=1": 2, "dau:model=Pixel 8": 5,
		"sessions@v:5.0": 2, "sessions@r:shop=2": 4, "crashed-sessions@r:shop=2": 1, "crashed-sessions@r:shop=1": 1} {
		if got := f.day[metric]; got != want {
			t.Errorf("today's %q: %d, want %d (all: %v)", metric, got, want, f.day)
		}
	}
	if f.week["wau"] != 5 || f.month["mau"] != 5 {
		t.Errorf("wau %d, mau %d: want 5 and 5", f.week["wau"], f.month["mau"])
	}
	if len(f.retention) != 1 || f.retention[0] != 5 {
		t.Errorf("retention of today's cohort: %v, want [5]", f.retention)
	}
	near := func(a, b float64) bool { return math.Abs(a-b) < 1e-9 }
	all, r2, r1 := f.crashes[""], f.crashes["r:shop=2"], f.crashes["r:shop=1"]
	if all.Sessions != 6 || all.CrashedSessions != 2 || !near(all.Rate, 2.0/6) || all.CrashedUsers != 2 || !near(all.CrashFreeUsers, 0.6) || all.Freezes != 1 {
		t.Errorf("crash figures of all sessions: %+v; want 6 sessions, 2 crashed (rate 1/3), 2 crashed users of 5 (crash-free 0.6), 1 freeze", all)
	}
	if !near(r2.Rate, 0.25) || !near(r1.Rate, 0.5) || !near(r2.CrashFreeUsers, 2.0/3) {
		t.Errorf("per release: shop 2 %+v (want rate 0.25, crash-free users 2/3), shop 1 %+v (want rate 0.5)", r2, r1)
	}
	// Freezes: dan's session (android, 5.1, release 2) froze.
	if all.FrozenSessions != 1 || !near(all.FreezeRate, 1.0/6) || !near(r2.FreezeRate, 0.25) || r1.FrozenSessions != 0 || f.crashes["v:5.1"].FrozenSessions != 1 {
		t.Errorf("freeze figures: all %+v, release 2 %+v, release 1 %+v", all, r2, r1)
	}
	// Breakdowns by OS and model: the iOS sessions are ann's tablet
	// (crashed) and cid's.
	if ios, android := f.crashes["os:ios"], f.crashes["os:android"]; ios.Sessions != 2 || !near(ios.Rate, 0.5) || android.Sessions != 4 || !near(android.Rate, 0.25) ||
		!near(android.FreezeRate, 0.25) || f.crashes["model:Pixel 8"].Sessions != 6 || f.crashes["region:eu-west"].CrashedSessions != 2 {
		t.Errorf("by os: ios %+v, android %+v; by model %+v", ios, android, f.crashes["model:Pixel 8"])
	}
	t.Logf("figures after Track: dau %d, sessions %d, crash rate %.3f, crash-free users %.2f; release 2: %.2f, release 1: %.2f",
		f.day["dau"], all.Sessions, all.Rate, all.CrashFreeUsers, r2.Rate, r1.Rate)

	// A rebuild by replay gives the same digest and the same figures.
	var before struct {
		Digest string `json:"digest"`
	}
	if err := d.doJSON(ctx, http.MethodGet, "/v1/digest?projection="+analytics.StreamAnalytics, &before); err != nil {
		t.Fatal(err)
	}
	body, err := d.request(ctx, http.MethodPost, "/v1/rebuild?projection="+analytics.StreamAnalytics, nil)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(body)), "\n")
	var sum struct {
		Summary *struct {
			Digest  string `json:"digest"`
			Applied uint64 `json:"applied"`
		} `json:"summary"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &sum); err != nil || sum.Summary == nil {
		t.Fatalf("rebuild answered %s (%v)", body, err)
	}
	if sum.Summary.Digest != before.Digest || before.Digest == "" {
		t.Fatalf("rebuilt digest %s, before %s", sum.Summary.Digest, before.Digest)
	}
	if again := read(); !sameFigures(again.day, f.day) || !sameFigures(again.week, f.week) || again.crashes[""] != all {
		t.Fatalf("figures after the rebuild differ:\n%v\n%v", again.day, f.day)
	}
	t.Logf("rebuild of %s: %d events applied, digest %s… as before", analytics.StreamAnalytics, sum.Summary.Applied, before.Digest[:12])
}

func sameFigures(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
