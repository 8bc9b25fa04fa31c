package client_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway"
	"google.golang.org/protobuf/proto"
)

// TestTrack: events recorded with Track go over the link in a batch,
// filled with the app, the client's attributes and an id, and the server
// stores each once; events tracked while offline go when a link is up.
func TestTrack(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	in, err := analytics.Open(testCtx(t), analytics.Config{Log: e.log})
	if err != nil {
		t.Fatal(err)
	}
	n := e.node(func(c *gateway.Config) { c.Analytics = in })
	cfg := client.Config{URL: n.tcp, Token: tokens(e.token("u1", "dev-t")), StateDir: t.TempDir(), Attrs: attrs,
		Analytics: &client.AnalyticsConfig{App: "shop", Interval: 100 * time.Millisecond}}
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.SetRelease("shop", "2.0")
	c.SetRelease("h5-cart", "7")
	c.SetRelease("h5-cart", "") // uninstalled
	// Tracked before any link: they wait.
	c.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_SESSION_START})
	c.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_PAGE_VIEW, Page: "home"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	for i := range 150 { // over the size that sends a batch at once
		c.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_CUSTOM, Name: "tap", Properties: map[string]string{"n": string(rune('a' + i%26))}})
	}
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().AnalyticsStored < 152 {
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v: want 152 stored", c.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The stream holds each event once, with the link's device and user.
	s, err := e.log.JetStream().Stream(testCtx(t), analytics.StreamAnalytics)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(testCtx(t))
	if err != nil || info.State.Msgs != 152 {
		t.Fatalf("stream holds %v events (%v), want 152", info.State.Msgs, err)
	}
	if st := c.Stats(); st.AnalyticsDropped != 0 {
		t.Fatalf("dropped %d", st.AnalyticsDropped)
	}
	m, err := s.GetMsg(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	ev := &analyticspb.Event{}
	if err := proto.Unmarshal(m.Data, ev); err != nil {
		t.Fatal(err)
	}
	if ev.Device != "dev-t" || ev.User != "u1" || ev.App != "shop" || ev.Os != attrs.Os || len(ev.Releases) != 1 || ev.Releases["shop"] != "2.0" {
		t.Fatalf("stored event %v: want device dev-t, user u1, app shop, os %s, releases {shop: 2.0}", ev, attrs.Os)
	}
	// The custom events happened on the page viewed before them.
	if m, err = s.GetMsg(testCtx(t), 3); err == nil {
		err = proto.Unmarshal(m.Data, ev)
	}
	if err != nil || ev.Type != analyticspb.Type_TYPE_CUSTOM || ev.Page != "home" {
		t.Fatalf("third event %v (%v): want a custom event on page home", ev, err)
	}
}

// TestReportingSwitch: the server's reporting switch, delivered with the
// view, turns a device's tracking off and on again.
func TestReportingSwitch(t *testing.T) {
	noLeaks(t)
	de := newDeliveryEnv(t, nil)
	de.setBool(t, "analytics-shop", false)
	cfg := de.config(t, "d-report")
	cfg.Analytics = &client.AnalyticsConfig{App: "shop", Interval: 50 * time.Millisecond}
	rec := &viewRecorder{}
	r := start(t, cfg, func(c *client.Client) { c.HandleView(rec.handle) })
	rec.wait(t, "the reporting switch", func(v *client.View) bool { _, _, ok := boolOf(v, "analytics-shop"); return ok })
	r.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_PAGE_VIEW, Page: "home"})
	if st := r.Stats(); st.AnalyticsOff != 1 || st.AnalyticsSent != 0 {
		t.Fatalf("switch off: %+v", st)
	}
	de.setBool(t, "analytics-shop", true)
	rec.wait(t, "reporting on", func(v *client.View) bool { on, _, _ := boolOf(v, "analytics-shop"); return on })
	r.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_PAGE_VIEW, Page: "home"})
	deadline := time.Now().Add(5 * time.Second)
	for r.Stats().AnalyticsStored != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("switch on: %+v", r.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTrackSurvivesRestart: events tracked while no server is reachable
// are kept in StateDir when Run returns; the next client on that
// directory sends them, and once they are stored nothing is left to send.
// A damaged file is dropped, not fatal.
func TestTrackSurvivesRestart(t *testing.T) {
	noLeaks(t)
	e := newEnv(t)
	in, err := analytics.Open(testCtx(t), analytics.Config{Log: e.log})
	if err != nil {
		t.Fatal(err)
	}
	n := e.node(func(c *gateway.Config) { c.Analytics = in })
	dir := t.TempDir()
	newClient := func(url string) *client.Client {
		c, err := client.New(client.Config{URL: url, Token: tokens(e.token("u1", "dev-r")), StateDir: dir, Attrs: attrs,
			Analytics: &client.AnalyticsConfig{App: "shop", Interval: 50 * time.Millisecond}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	runFor := func(c *client.Client, until func() bool) {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		deadline := time.Now().Add(10 * time.Second)
		for !until() {
			if time.Now().After(deadline) {
				cancel()
				<-done
				t.Fatalf("stats %+v", c.Stats())
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	file := filepath.Join(dir, "analytics.pb")

	// Offline: nothing listens there.
	off := newClient("tcp://127.0.0.1:1")
	for i := range 5 {
		off.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_CUSTOM, Name: fmt.Sprint("offline-", i)})
	}
	start := time.Now()
	runFor(off, func() bool { return time.Since(start) > 200*time.Millisecond })
	if _, err := os.Stat(file); err != nil {
		t.Fatalf("after Run returned: %v", err)
	}

	// Restarted, online: the five go, once each.
	on := newClient(n.tcp)
	runFor(on, func() bool { return on.Stats().AnalyticsStored == 5 })
	s, err := e.log.JetStream().Stream(testCtx(t), analytics.StreamAnalytics)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := s.Info(testCtx(t)); err != nil || info.State.Msgs != 5 {
		t.Fatalf("stream holds %v events (%v), want 5", info.State.Msgs, err)
	}
	if _, err := os.Stat(file); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("every event stored, yet the file is there: %v", err)
	}
	again := newClient(n.tcp)
	start = time.Now()
	runFor(again, func() bool { return time.Since(start) > 200*time.Millisecond })
	if st := again.Stats(); st.AnalyticsSent != 0 {
		t.Fatalf("a third client sent %d events: %+v", st.AnalyticsSent, st)
	}

	// A damaged file: dropped; the client starts and tracks.
	if err := os.WriteFile(file, []byte{0xff, 0xff, 0xff}, 0o600); err != nil {
		t.Fatal(err)
	}
	fresh := newClient(n.tcp)
	fresh.Track(&analyticspb.Event{Type: analyticspb.Type_TYPE_CUSTOM, Name: "after-damage"})
	runFor(fresh, func() bool { return fresh.Stats().AnalyticsStored == 1 })
	if st := fresh.Stats(); st.AnalyticsSent != 1 {
		t.Fatalf("after a damaged file: %+v, want the one new event sent", st)
	}
}
