package analytics

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
)

// StreamAnalytics holds the tracking events, one message per event on
// sluice.analytics.<app>.<type>, with message id "<device>:<event id>".
const StreamAnalytics = "SLUICE_ANALYTICS"

const subjectAnalytics = "sluice.analytics."

// Limits of one event and one batch.
const (
	MaxBatchEvents = 1000
	MaxEventBytes  = 64 << 10 // an encoded event, stack text included
	MaxStackBytes  = 32 << 10
	maxFieldLen    = 256 // page, referrer, name, property values
	maxAttrLen     = 64  // device attributes
	maxMapEntries  = 64  // properties, releases, switches
)

// typeTokens name the event types in subjects.
var typeTokens = map[analyticspb.Type]string{
	analyticspb.Type_TYPE_PAGE_VIEW:     "page",
	analyticspb.Type_TYPE_SESSION_START: "session-start",
	analyticspb.Type_TYPE_SESSION_END:   "session-end",
	analyticspb.Type_TYPE_CUSTOM:        "custom",
	analyticspb.Type_TYPE_CRASH:         "crash",
	analyticspb.Type_TYPE_FREEZE:        "freeze",
	analyticspb.Type_TYPE_PERF:          "perf",
}

// TypeToken names an event type in subjects ("page", "crash", ...); ""
// for a type Ingest refuses.
func TypeToken(t analyticspb.Type) string { return typeTokens[t] }

// Config configures an Ingestor. A zero field takes the default in its
// comment.
type Config struct {
	// Log is the oplog: its JetStream context and replica count. Required.
	Log *oplog.Log
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// LateWindow is how old an event may be and still be accepted (apps
	// upload what they collected offline). Default 7 days.
	LateWindow time.Duration
	// FutureSkew is how far ahead of the server's clock an event's time
	// may be; later ones are clamped to the server's time. Default 5 min.
	FutureSkew time.Duration
	// Retention is how long the stream keeps events: aggregates rebuild
	// from what it keeps. Default 90 days.
	Retention time.Duration
	// DedupeWindow is JetStream's duplicate window on event ids; the
	// aggregations drop later duplicates themselves. Default 10 min.
	DedupeWindow time.Duration
}

// Identity is who uploads: set from the device's token, it overrides the
// events' device and user.
type Identity struct {
	Device, User string
}

// Ingestor validates batches of tracking events and stores them in
// StreamAnalytics; a batch is answered once every accepted event is
// stored (acknowledged = durable). Safe for concurrent use.
type Ingestor struct {
	cfg Config
	js  jetstream.JetStream
	lg  zerolog.Logger
}

// Open creates (or updates) the analytics stream.
func Open(ctx context.Context, cfg Config) (*Ingestor, error) {
	if cfg.Log == nil {
		return nil, errors.New("analytics: Config.Log is required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.LateWindow <= 0 {
		cfg.LateWindow = 7 * 24 * time.Hour
	}
	if cfg.FutureSkew <= 0 {
		cfg.FutureSkew = 5 * time.Minute
	}
	if cfg.Retention <= 0 {
		cfg.Retention = 90 * 24 * time.Hour
	}
	if cfg.DedupeWindow <= 0 {
		cfg.DedupeWindow = 10 * time.Minute
	}
	in := &Ingestor{cfg: cfg, js: cfg.Log.JetStream(), lg: zerolog.Nop()}
	if cfg.Logger != nil {
		in.lg = cfg.Logger.With().Str("component", "analytics").Logger()
	}
	if _, err := cfg.Log.EnsureStream(ctx, jetstream.StreamConfig{
		Name:        StreamAnalytics,
		Description: "Sluice tracking events uploaded by apps",
		Subjects:    []string{subjectAnalytics + ">"},
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Log.Replicas(),
		MaxAge:      cfg.Retention,
		Duplicates:  cfg.DedupeWindow,
	}); err != nil {
		return nil, err
	}
	return in, nil
}

// Ingest validates a batch and stores its valid events. Each event is
// accepted (stored now), a duplicate (its id was stored before for this
// device) or rejected with its reason in the reply; the batch as a whole
// fails only when the stream cannot be written (oplog.ErrUnavailable: the
// client retries the same batch, duplicates are dropped) or the batch is
// over MaxBatchEvents (oplog.ErrTooManyTargets).
//
// Event times in the future (beyond FutureSkew) are clamped to the
// server's time; events older than LateWindow are rejected
// (oplog.ErrExpired).
func (in *Ingestor) Ingest(ctx context.Context, who Identity, b *analyticspb.Batch) (*analyticspb.IngestReply, error) {
	if n := len(b.GetEvents()); n > MaxBatchEvents {
		return nil, fmt.Errorf("analytics: %d events in a batch, at most %d: %w", n, MaxBatchEvents, oplog.ErrTooManyTargets)
	}
	now := in.cfg.Now()
	reply := &analyticspb.IngestReply{}
	type pending struct {
		index int
		fut   jetstream.PubAckFuture
	}
	var futs []pending
	for i, ev := range b.GetEvents() {
		clamped, err := in.check(ev, who, now)
		if err != nil {
			reply.Rejected = append(reply.Rejected, &analyticspb.Rejected{Index: uint32(i), Id: clip(ev.GetId()),
				Code: oplog.CodeOf(err).String(), Message: err.Error()})
			continue
		}
		hint := 192 + len(ev.Stack) + len(ev.Page) + len(ev.Referrer) + 48*(len(ev.Properties)+len(ev.Releases)+len(ev.Switches))
		data := appendEvent(make([]byte, 0, hint), ev)
		if len(data) > MaxEventBytes {
			err := fmt.Errorf("event of %d bytes, at most %d: %w", len(data), MaxEventBytes, oplog.ErrPayloadTooLarge)
			reply.Rejected = append(reply.Rejected, &analyticspb.Rejected{Index: uint32(i), Id: ev.Id,
				Code: oplog.CodeOf(err).String(), Message: err.Error()})
			continue
		}
		if clamped {
			reply.Clamped++
		}
		fut, err := in.js.PublishAsync(subjectAnalytics+ev.App+"."+typeTokens[ev.Type], data,
			jetstream.WithMsgID(ev.Device+":"+ev.Id))
		if err != nil {
			return nil, fmt.Errorf("analytics: publish: %v: %w", err, oplog.ErrUnavailable)
		}
		futs = append(futs, pending{i, fut})
	}
	for _, p := range futs {
		select {
		case ack := <-p.fut.Ok():
			if ack.Duplicate {
				reply.Duplicates++
			} else {
				reply.Accepted++
			}
		case err := <-p.fut.Err():
			return nil, fmt.Errorf("analytics: event %d not stored: %v: %w", p.index, err, oplog.ErrUnavailable)
		case <-ctx.Done():
			return nil, fmt.Errorf("analytics: waiting for acks: %v: %w", ctx.Err(), oplog.ErrUnavailable)
		}
	}
	if len(reply.Rejected) > 0 {
		in.lg.Info().Str("device", who.Device).Int("rejected", len(reply.Rejected)).Str("first", reply.Rejected[0].Message).Msg("analytics events refused")
	}
	return reply, nil
}

// check validates one event in place: identity fields from the token,
// the receive time, the clamped event time. It reports whether the time
// was clamped.
func (in *Ingestor) check(ev *analyticspb.Event, who Identity, now time.Time) (bool, error) {
	if ev == nil {
		return false, fmt.Errorf("empty event: %w", oplog.ErrMalformed)
	}
	if !oplog.ValidID(ev.Id) {
		return false, fmt.Errorf("event id %q: want 1-%d of [A-Za-z0-9_-]: %w", clip(ev.Id), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	if _, ok := typeTokens[ev.Type]; !ok {
		return false, fmt.Errorf("event %s: type %v: %w", ev.Id, ev.Type, oplog.ErrUnknownKind)
	}
	if who.Device != "" {
		ev.Device, ev.User = who.Device, who.User
	}
	if !oplog.ValidID(ev.Device) || (ev.User != "" && !oplog.ValidID(ev.User)) {
		return false, fmt.Errorf("event %s: device %q or user %q: %w", ev.Id, clip(ev.Device), clip(ev.User), oplog.ErrInvalidID)
	}
	if !oplog.ValidID(ev.App) {
		return false, fmt.Errorf("event %s: app %q: want 1-%d of [A-Za-z0-9_-]: %w", ev.Id, clip(ev.App), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	for _, f := range []string{ev.AppVersion, ev.Os, ev.OsVersion, ev.Model, ev.Region, ev.Network, ev.Session} {
		if len(f) > maxAttrLen {
			return false, fmt.Errorf("event %s: an attribute over %d bytes: %w", ev.Id, maxAttrLen, oplog.ErrInvalid)
		}
	}
	for _, f := range []string{ev.Page, ev.Referrer, ev.Name} {
		if len(f) > maxFieldLen {
			return false, fmt.Errorf("event %s: page, referrer or name over %d bytes: %w", ev.Id, maxFieldLen, oplog.ErrInvalid)
		}
	}
	if len(ev.Stack) > MaxStackBytes {
		return false, fmt.Errorf("event %s: stack over %d bytes: %w", ev.Id, MaxStackBytes, oplog.ErrPayloadTooLarge)
	}
	for _, m := range []map[string]string{ev.Properties, ev.Releases, ev.Switches} {
		if len(m) > maxMapEntries {
			return false, fmt.Errorf("event %s: over %d properties, releases or switches: %w", ev.Id, maxMapEntries, oplog.ErrInvalid)
		}
		for k, v := range m {
			if k == "" || len(k) > maxAttrLen || len(v) > maxFieldLen {
				return false, fmt.Errorf("event %s: property %q: %w", ev.Id, clip(k), oplog.ErrInvalid)
			}
		}
	}
	if ev.DurationMs < 0 {
		return false, fmt.Errorf("event %s: negative duration: %w", ev.Id, oplog.ErrInvalid)
	}
	ev.ReceivedMs = now.UnixMilli()
	clamped := false
	switch t := ev.TimeMs; {
	case t == 0:
		ev.TimeMs = ev.ReceivedMs
	case t > now.Add(in.cfg.FutureSkew).UnixMilli():
		ev.TimeMs, clamped = ev.ReceivedMs, true
	case t < now.Add(-in.cfg.LateWindow).UnixMilli():
		return false, fmt.Errorf("event %s: at %s, older than %v: %w", ev.Id, time.UnixMilli(t).UTC().Format(time.RFC3339), in.cfg.LateWindow, oplog.ErrExpired)
	}
	return clamped, nil
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return strings.ToValidUTF8(s, "?")
}
