package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"google.golang.org/protobuf/proto"
)

// AnalyticsConfig turns on tracking: events recorded with Track are sent
// in batches over the link (never one request per event), each answered by
// the server once stored; unanswered batches are sent again on the next
// link (the server drops duplicates by event id). Events not yet stored
// are kept in StateDir (analytics.pb), written every Interval while Run
// runs and when it returns, and loaded by New: a restart loses at most
// the events of the last Interval before a crash.
type AnalyticsConfig struct {
	// App names the app in every event. Required.
	App string
	// Interval is the most time an event waits before its batch is sent.
	// Default 10 s.
	Interval time.Duration
	// MaxQueue bounds the events waiting (in memory); beyond it the oldest
	// are dropped (Stats.AnalyticsDropped). Default 10,000.
	MaxQueue int
	// Switch is the bool switch that turns reporting on or off for this
	// device (Config.Views must be on to receive it): while the client's
	// view has it off, Track drops events (Stats.AnalyticsOff). Its
	// variants set who reports: a sticky percentage samples devices, other
	// rules pick versions, OSes, regions... No such switch: reporting is
	// on. Default "analytics-<App>".
	Switch string
}

// Tracking batches.
const (
	analyticsBatch     = 500 // events in one batch
	analyticsKickAt    = 100 // queued events that send a batch at once
	defaultTrackPeriod = 10 * time.Second
)

// tracker queues events and tracks the batches in flight on the link.
type tracker struct {
	cfg  AnalyticsConfig
	kick chan struct{} // a batch is worth sending now

	mu       sync.Mutex
	queue    []*analyticspb.Event
	inflight map[uint64][]*analyticspb.Event
	next     uint64
	releases map[string]string // package → version the app runs (SetRelease)
	page     string            // the last page viewed in the session
	dirty    bool              // the events waiting changed since they were saved
	saveMu   sync.Mutex        // one save at a time
}

// trackFile holds the events not yet stored, in StateDir.
const trackFile = "analytics.pb"

// load reads the events a previous run left unsent (at most MaxQueue,
// the newest). A damaged file is dropped with a log line.
func (t *tracker) load(c *Client) {
	b, err := os.ReadFile(filepath.Join(c.cfg.StateDir, trackFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	batch := &analyticspb.Batch{}
	if err == nil {
		err = proto.Unmarshal(b, batch)
	}
	if err != nil {
		c.log.Warn().Err(err).Msg("unsent tracking events unreadable: dropped")
		return
	}
	evs := batch.Events
	if over := len(evs) - t.cfg.MaxQueue; over > 0 {
		evs = evs[over:]
		c.count(func(s *Stats) { s.AnalyticsDropped += int64(over) })
	}
	t.queue = evs
}

// save writes the events not yet stored (in flight, by batch, then
// queued) if they changed since the last save; none removes the file.
func (t *tracker) save(c *Client) {
	t.saveMu.Lock()
	defer t.saveMu.Unlock()
	t.mu.Lock()
	if !t.dirty {
		t.mu.Unlock()
		return
	}
	t.dirty = false
	nos := slices.Sorted(maps.Keys(t.inflight))
	batch := &analyticspb.Batch{}
	for _, no := range nos {
		batch.Events = append(batch.Events, t.inflight[no]...)
	}
	batch.Events = append(batch.Events, t.queue...)
	t.mu.Unlock()
	// Marshalled outside the lock (Track never waits for a save): queued
	// events are not changed once queued.
	var b []byte
	var err error
	if len(batch.Events) > 0 {
		b, err = proto.Marshal(batch)
	}
	if err == nil {
		if len(b) == 0 {
			err = os.Remove(filepath.Join(c.cfg.StateDir, trackFile))
			if errors.Is(err, fs.ErrNotExist) {
				err = nil
			}
		} else {
			err = writeFileAtomic(c.cfg.StateDir, trackFile, b)
		}
	}
	if err != nil {
		t.mu.Lock()
		t.dirty = true // next time
		t.mu.Unlock()
		c.log.Warn().Err(err).Msg("saving unsent tracking events")
	}
}

// keep saves the waiting events every Interval until ctx ends (Run saves
// them once more when its loop has ended).
func (t *tracker) keep(ctx context.Context, c *Client) {
	tick := time.NewTicker(t.cfg.Interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			t.save(c)
		}
	}
}

func newTracker(cfg AnalyticsConfig) *tracker {
	if cfg.Interval <= 0 {
		cfg.Interval = defaultTrackPeriod
	}
	if cfg.MaxQueue <= 0 {
		cfg.MaxQueue = 10_000
	}
	if cfg.Switch == "" {
		cfg.Switch = "analytics-" + cfg.App
	}
	return &tracker{cfg: cfg, kick: make(chan struct{}, 1), inflight: map[uint64][]*analyticspb.Event{}}
}

// Track records a tracking event (a page view, a session start or end, a
// custom event, a crash, a freeze, a performance sample). It fills what
// the event leaves empty: its id, its time, the app, the client's
// attributes, the releases recorded with SetRelease, the variants of the
// switches the client holds, a page view's referrer (the page viewed
// before it in the session) and other events' page (the current one). It never
// blocks; without Config.Analytics it does nothing.
func (c *Client) Track(ev *analyticspb.Event) {
	t := c.tracker
	if t == nil || ev == nil {
		return
	}
	if !c.SwitchBool(t.cfg.Switch, true) {
		c.count(func(s *Stats) { s.AnalyticsOff++ })
		return
	}
	if ev.Id == "" {
		var b [12]byte
		_, _ = rand.Read(b[:])
		ev.Id = hex.EncodeToString(b[:])
	}
	if ev.TimeMs == 0 {
		ev.TimeMs = time.Now().UnixMilli()
	}
	if ev.App == "" {
		ev.App = t.cfg.App
	}
	if a := c.attrs; a != nil && ev.AppVersion == "" && ev.Os == "" {
		ev.AppVersion, ev.Os, ev.OsVersion, ev.Model, ev.Region, ev.Network = a.AppVersion, a.Os, a.OsVersion, a.Model, a.Region, a.Network
	}
	t.mu.Lock()
	if ev.Releases == nil && len(t.releases) > 0 {
		ev.Releases = maps.Clone(t.releases)
	}
	// Page paths: a page view's referrer is the page viewed before it in
	// the session; other events happen on the current page.
	switch ev.Type {
	case analyticspb.Type_TYPE_SESSION_START, analyticspb.Type_TYPE_SESSION_END:
		t.page = ""
	case analyticspb.Type_TYPE_PAGE_VIEW:
		if ev.Referrer == "" {
			ev.Referrer = t.page
		}
		t.page = ev.Page
	default:
		if ev.Page == "" {
			ev.Page = t.page
		}
	}
	t.mu.Unlock()
	if v := c.View(); v != nil && ev.Switches == nil && len(v.Switches) > 0 {
		ev.Switches = make(map[string]string, len(v.Switches))
		for k, sv := range v.Switches {
			ev.Switches[k] = sv.Variant
		}
	}
	t.mu.Lock()
	t.queue = append(t.queue, ev)
	t.dirty = true
	if over := len(t.queue) - t.cfg.MaxQueue; over > 0 {
		t.queue = t.queue[over:]
		c.count(func(s *Stats) { s.AnalyticsDropped += int64(over) })
	}
	n := len(t.queue)
	t.mu.Unlock()
	if n >= analyticsKickAt {
		select {
		case t.kick <- struct{}{}:
		default:
		}
	}
}

// SetRelease records that the app runs version of package (a release
// installed with Install, or the app itself); "" forgets the package.
// Track stamps the releases recorded on every event that names none, so
// that crash rates and circuit breakers see each release's share. Call it
// at start and after each install. Without Config.Analytics it does
// nothing.
func (c *Client) SetRelease(pkg, version string) {
	t := c.tracker
	if t == nil || pkg == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if version == "" {
		delete(t.releases, pkg)
		return
	}
	if t.releases == nil {
		t.releases = map[string]string{}
	}
	t.releases[pkg] = version
}

// send sends the queued events on l, in batches, keeping them in flight
// until acked.
func (t *tracker) send(r *run, l *link) {
	for {
		t.mu.Lock()
		if len(t.queue) == 0 {
			t.mu.Unlock()
			return
		}
		n := min(len(t.queue), analyticsBatch)
		batch := t.queue[:n:n]
		t.queue = t.queue[n:]
		t.next++
		no := t.next
		t.inflight[no] = batch
		t.mu.Unlock()
		ev := &gatewaypb.ClientEvent{Analytics: &analyticspb.Batch{Events: batch}, AnalyticsBatch: no}
		if err := l.send(context.Background(), &gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: ev}}); err != nil {
			t.requeue(no)
			return
		}
		r.c.count(func(s *Stats) { s.AnalyticsSent += int64(len(batch)) })
	}
}

// acked handles the server's answer to a batch.
func (t *tracker) acked(c *Client, a *gatewaypb.AnalyticsAck) {
	if a.Error != nil {
		if a.Error.Code == gatewaypb.Error_CODE_UNAVAILABLE {
			t.requeue(a.Batch) // not stored: again later
			return
		}
		c.log.Warn().Str("error", a.Error.Message).Msg("tracking batch refused")
	}
	t.mu.Lock()
	batch, ok := t.inflight[a.Batch]
	delete(t.inflight, a.Batch)
	t.dirty = t.dirty || ok
	t.mu.Unlock()
	if a.Error == nil {
		r := a.Reply
		c.count(func(s *Stats) { s.AnalyticsStored += int64(r.GetAccepted() + r.GetDuplicates()) })
		if n := len(r.GetRejected()); n > 0 {
			c.log.Warn().Int("rejected", n).Str("first", r.Rejected[0].Message).Int("batch", len(batch)).Msg("tracking events refused")
		}
	}
}

// requeue puts a batch in flight back at the head of the queue.
func (t *tracker) requeue(no uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if batch, ok := t.inflight[no]; ok {
		delete(t.inflight, no)
		t.queue = append(batch, t.queue...)
	}
}

// linkEnded puts every batch in flight back: their answers are lost with
// the link; sending them again is safe.
func (t *tracker) linkEnded() {
	t.mu.Lock()
	nos := make([]uint64, 0, len(t.inflight))
	for no := range t.inflight {
		nos = append(nos, no)
	}
	t.mu.Unlock()
	for _, no := range nos {
		t.requeue(no)
	}
}
