package analytics

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// SessionGap is the inactivity that ends a session.
const SessionGap = 30 * time.Minute

// Dimensions of the breakdowns.
var Dimensions = []string{"version", "os", "model", "region", "network"}

// Aggregates is the badger projection of StreamAnalytics: per app and day
// (UTC), counters of active users, new users, sessions, crashes, freezes,
// pages and custom events, with breakdowns by version, OS, model, region
// and network and per release; active users per week and month; day-N
// retention per cohort. Replaying the stream rebuilds it to the same
// digest. Keys:
//
//	x/<device>/<event id>            an event seen (drops duplicates past JetStream's window), kept DedupeKeep; not in the digest
//	a/<app>/<period>/<uid>           a user active in a day (20261121), ISO week (2026W47) or month (202611)
//	f/<app>/<uid>                    → the day the user was first seen (their cohort)
//	s/<app>/<device>                 → the device's recent sessions: first and last event, counting day, flags
//	u/<app>/<day>/<kind>@<slice>/<uid> a user who crashed (kind crashes) or froze (freezes) in a day, per slice
//	n/<app>/<period>/<metric>        → a counter (big-endian uint64)
//	r/<app>/<cohort>/<n>             → users of a cohort active n days after it
//	w/<app>/<slice>/<minute>/<metric> → sessions, crashed and frozen sessions per minute of
//	                                   watched slices (releases r:…, switch variants s:key=variant,
//	                                   each also per model: …|m:<model>), kept WindowKeep
//
// A user (uid) is the event's user, or "~<device>" for a device without
// one. Sessions, crashes and freezes are counted per slice: "" (all),
// "v:<version>", "os:<os>", "model:<model>", "region:<region>",
// "network:<network>" and "r:<package>=<version>"; active users per
// dimension (dau:<dimension>=<value>, by the user's first event of the
// day) and per release (dau:release=<package>=<version>).
type Aggregates struct {
	db         *badger.DB
	proj       *oplog.Projection
	lg         zerolog.Logger
	dedupeKeep time.Duration
}

// AggregatesConfig configures Aggregates.
type AggregatesConfig struct {
	// Log is the oplog (its JetStream context). Required.
	Log *oplog.Log
	// Dir is the badger directory. Required.
	Dir string
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
	// DedupeKeep is how long an event's id is kept (from when it is
	// applied, or from the event's time if later) to drop duplicates
	// that come past JetStream's duplicate window. It must exceed the
	// Ingestor's LateWindow. Default DefaultDedupeKeep.
	DedupeKeep time.Duration
}

// DefaultDedupeKeep outlasts the Ingestor's default LateWindow (7 days)
// by a day.
const DefaultDedupeKeep = 8 * 24 * time.Hour

var aggregatePrefixes = [][]byte{[]byte("x/"), []byte("a/"), []byte("f/"), []byte("s/"), []byte("u/"), []byte("n/"), []byte("r/"), []byte("w/")}

// WindowKeep is how long per-minute counters are kept: the longest
// circuit-breaker window.
const WindowKeep = 24 * time.Hour

// OpenAggregates opens the projection; Run applies the stream.
func OpenAggregates(cfg AggregatesConfig) (*Aggregates, error) {
	if cfg.Log == nil || cfg.Dir == "" {
		return nil, errors.New("analytics: AggregatesConfig.Log and Dir are required")
	}
	ag := &Aggregates{lg: zerolog.Nop(), dedupeKeep: cfg.DedupeKeep}
	if ag.dedupeKeep <= 0 {
		ag.dedupeKeep = DefaultDedupeKeep
	}
	if cfg.Logger != nil {
		ag.lg = cfg.Logger.With().Str("component", "analytics").Logger()
	}
	db, err := oplog.OpenStore(cfg.Dir, ag.lg)
	if err != nil {
		return nil, err
	}
	ag.db = db
	ag.proj, err = oplog.NewProjection(oplog.ProjectionConfig{Stream: StreamAnalytics, DB: db, JetStream: cfg.Log.JetStream(),
		Prefixes: aggregatePrefixes, Transient: [][]byte{[]byte("x/")}, Apply: ag.apply, Logger: &ag.lg})
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return ag, nil
}

// Run applies the stream until ctx ends.
func (ag *Aggregates) Run(ctx context.Context) error { return ag.proj.Run(ctx) }

// Close closes the store; call it after Run returned.
func (ag *Aggregates) Close() error { return ag.db.Close() }

// Projection is the projection, for rebuilds and digests.
func (ag *Aggregates) Projection() *oplog.Projection { return ag.proj }

// CatchUp waits until every event stored when it was called is counted.
func (ag *Aggregates) CatchUp(ctx context.Context) error { return ag.proj.CatchUp(ctx) }

// day, week and month name the periods of a time.
func day(ms int64) string { return time.UnixMilli(ms).UTC().Format("20060102") }

func week(ms int64) string {
	y, w := time.UnixMilli(ms).UTC().ISOWeek()
	return fmt.Sprintf("%04dW%02d", y, w)
}

func month(ms int64) string { return time.UnixMilli(ms).UTC().Format("200601") }

// txn wraps a badger transaction with the projection's key operations.
type aggTxn struct{ *badger.Txn }

// once sets key if absent and reports whether it did.
func (t aggTxn) once(key string) (bool, error) {
	_, err := t.Get([]byte(key))
	if err == nil {
		return false, nil
	}
	if !errors.Is(err, badger.ErrKeyNotFound) {
		return false, err
	}
	return true, t.Set([]byte(key), nil)
}

// seen records the event's id and reports whether it is new. The key is
// kept for keep after it is written (or after the event's time, if
// later). Ingest refuses events older than its LateWindow, so a duplicate
// is stored in the stream at most LateWindow after its first copy, and
// reaches the projection (live, or replaying in a rebuild, which goes
// faster than the stream was written) while the key is there. The keys
// are transient: left out of the digest, as a live projection and a
// rebuild hold different ones.
func (t aggTxn) seen(ev *analyticspb.EventHead, keep time.Duration) (bool, error) {
	key := []byte("x/" + ev.Device + "/" + ev.Id)
	_, err := t.Get(key)
	if err == nil {
		return false, nil
	}
	if !errors.Is(err, badger.ErrKeyNotFound) {
		return false, err
	}
	ttl := max(time.Until(time.UnixMilli(ev.TimeMs).Add(keep)), keep)
	return true, t.SetEntry(badger.NewEntry(key, nil).WithTTL(ttl))
}

// add adds delta to a counter.
func (t aggTxn) add(key string, delta uint64) error {
	n, err := oplog.GetUint64(t.Txn, []byte(key))
	if err != nil {
		return err
	}
	return t.Set([]byte(key), binary.BigEndian.AppendUint64(nil, n+delta))
}

func (t aggTxn) count(app, period, metric string) error {
	return t.add("n/"+app+"/"+period+"/"+metric, 1)
}

// headDecoder decodes a stored Event as an EventHead, dropping the
// fields the aggregates do not read.
var headDecoder = proto.UnmarshalOptions{DiscardUnknown: true}

// apply counts one event. Malformed records (not written by Ingest) are
// skipped with a log line: nothing malformed reaches the aggregates.
func (ag *Aggregates) apply(btxn *badger.Txn, r *oplog.Record) error {
	ev := &analyticspb.EventHead{} // properties and stack skipped
	if err := headDecoder.Unmarshal(r.Data, ev); err != nil || !oplog.ValidID(ev.Id) || !oplog.ValidID(ev.Device) || !oplog.ValidID(ev.App) || ev.TimeMs <= 0 {
		ag.lg.Warn().Uint64("seq", r.Seq).Str("subject", r.Subject).Msg("analytics event skipped: malformed")
		return nil
	}
	t := aggTxn{btxn}
	if fresh, err := t.seen(ev, ag.dedupeKeep); err != nil || !fresh {
		return err
	}
	app, d := ev.App, day(ev.TimeMs)
	uid := ev.User
	if uid == "" {
		uid = "~" + ev.Device
	}
	if err := ag.active(t, ev, app, d, uid); err != nil {
		return err
	}
	if err := ag.session(t, ev, app); err != nil {
		return err
	}
	switch ev.Type {
	case analyticspb.Type_TYPE_PAGE_VIEW:
		if ev.Page != "" {
			if err := t.count(app, d, "page:"+ev.Page); err != nil {
				return err
			}
			if ev.Referrer != "" {
				if err := t.count(app, d, "path:"+ev.Referrer+" > "+ev.Page); err != nil {
					return err
				}
			}
		}
	case analyticspb.Type_TYPE_CUSTOM:
		if err := t.count(app, d, "event:"+ev.Name); err != nil {
			return err
		}
	case analyticspb.Type_TYPE_CRASH, analyticspb.Type_TYPE_FREEZE:
		kind := "crashes"
		if ev.Type == analyticspb.Type_TYPE_FREEZE {
			kind = "freezes"
		}
		for _, s := range countedSlices(ev) {
			if err := t.count(app, d, kind+"@"+s); err != nil {
				return err
			}
			fresh, err := t.once("u/" + app + "/" + d + "/" + kind + "@" + s + "/" + uid)
			if err != nil {
				return err
			}
			if fresh {
				if err := t.count(app, d, kind+"-users@"+s); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// active counts the user active in the event's day, week and month, as a
// new user on the first day seen, in its cohort's retention, and in the
// day's breakdowns (by the attributes of its first event of the day).
func (ag *Aggregates) active(t aggTxn, ev *analyticspb.EventHead, app, d, uid string) error {
	// Most events are not a user's first of the day: one read settles
	// them. A user active in a day was counted in its week and month in
	// the same transaction.
	fresh, err := t.once("a/" + app + "/" + d + "/" + uid)
	if err != nil || !fresh {
		return err
	}
	for _, p := range []struct{ period, metric string }{{week(ev.TimeMs), "wau"}, {month(ev.TimeMs), "mau"}} {
		fresh, err := t.once("a/" + app + "/" + p.period + "/" + uid)
		if err != nil {
			return err
		}
		if fresh {
			if err := t.count(app, p.period, p.metric); err != nil {
				return err
			}
		}
	}
	if err := t.count(app, d, "dau"); err != nil {
		return err
	}
	for i, v := range []string{ev.AppVersion, ev.Os, ev.Model, ev.Region, ev.Network} {
		if v != "" {
			if err := t.count(app, d, "dau:"+Dimensions[i]+"="+v); err != nil {
				return err
			}
		}
	}
	for pkg, ver := range ev.Releases {
		if err := t.count(app, d, "dau:release="+pkg+"="+ver); err != nil {
			return err
		}
	}
	// The cohort: the first day seen, in stream order.
	cohort := d
	firstKey := []byte("f/" + app + "/" + uid)
	if it, err := t.Get(firstKey); err == nil {
		if err := it.Value(func(v []byte) error { cohort = string(v); return nil }); err != nil {
			return err
		}
	} else if errors.Is(err, badger.ErrKeyNotFound) {
		if err := t.Set(firstKey, []byte(d)); err != nil {
			return err
		}
		if err := t.count(app, d, "new"); err != nil {
			return err
		}
	} else {
		return err
	}
	n := daysBetween(cohort, d)
	if n < 0 {
		return nil // a late event from before the cohort: not a retention day
	}
	return t.add("r/"+app+"/"+cohort+"/"+strconv.Itoa(n), 1)
}

func daysBetween(from, to string) int {
	a, err1 := time.Parse("20060102", from)
	b, err2 := time.Parse("20060102", to)
	if err1 != nil || err2 != nil {
		return -1
	}
	return int(b.Sub(a).Hours() / 24)
}

// Sessions. A device's recent sessions (at most maxSessions) are kept
// under s/<app>/<device>, so that events arriving out of order (a batch
// sent again after later ones were stored) join the session they belong
// to instead of opening another.
const maxSessions = 4

// Session flags.
const (
	sessionCrashed = 1 << iota
	sessionFrozen
	sessionEnded // a session end was seen: later events open a new one
)

// sessionRec is one session of a device: its first and last event times
// and the day it is counted on (that of the first event seen of it).
type sessionRec struct {
	start, last, origin int64
	flags               byte
}

const sessionRecSize = 25

func decodeSessions(v []byte) []sessionRec {
	var out []sessionRec
	for ; len(v) >= sessionRecSize; v = v[sessionRecSize:] {
		out = append(out, sessionRec{start: int64(binary.BigEndian.Uint64(v)), last: int64(binary.BigEndian.Uint64(v[8:])),
			origin: int64(binary.BigEndian.Uint64(v[16:])), flags: v[24]})
	}
	return out
}

func encodeSessions(ss []sessionRec) []byte {
	v := make([]byte, 0, len(ss)*sessionRecSize)
	for _, r := range ss {
		v = binary.BigEndian.AppendUint64(v, uint64(r.start))
		v = binary.BigEndian.AppendUint64(v, uint64(r.last))
		v = binary.BigEndian.AppendUint64(v, uint64(r.origin))
		v = append(v, r.flags)
	}
	return v
}

// belongs reports whether an event at ms of type typ is part of session r:
// within SessionGap before its first event, or up to its last (and, while
// it has not ended, within SessionGap after). A session start belongs only
// before the session's first event (it arrived after the events that
// followed it); after it, it opens a new session.
func (r sessionRec) belongs(ms int64, typ analyticspb.Type) bool {
	gap := SessionGap.Milliseconds()
	if ms < r.start-gap {
		return false
	}
	if typ == analyticspb.Type_TYPE_SESSION_START {
		return ms <= r.start
	}
	return ms <= r.last || (r.flags&sessionEnded == 0 && ms-r.last <= gap)
}

// countedSlices are the slices an event's sessions, crashes and freezes
// are counted under: everything (""), its version, OS, model, region and
// network, and each release active on the device. Built only when an
// event counts something under them (a new session, a crash or a
// freeze), not for every event.
func countedSlices(ev *analyticspb.EventHead) []string {
	out := []string{"", "v:" + ev.AppVersion}
	for i, v := range []string{ev.Os, ev.Model, ev.Region, ev.Network} {
		if v != "" {
			out = append(out, Dimensions[i+1]+":"+v)
		}
	}
	for pkg, ver := range ev.Releases {
		out = append(out, "r:"+pkg+"="+ver)
	}
	return out
}

// session puts the event in its session: one of the device's recent
// sessions it belongs to, or a new one, counted (per slice) on the day of
// its first event. Session length (n/…/session-ms, per counting day) grows
// as events extend a session at either end, so it needs no closing: the
// average length is session-ms over sessions@. A crash or a freeze marks
// its session once (crashed-sessions@, frozen-sessions@), and is counted
// per minute for the circuit breakers.
func (ag *Aggregates) session(t aggTxn, ev *analyticspb.EventHead, app string) error {
	key := []byte("s/" + app + "/" + ev.Device)
	var recs []sessionRec
	if it, err := t.Get(key); err == nil {
		if err := it.Value(func(v []byte) error { recs = decodeSessions(v); return nil }); err != nil {
			return err
		}
	} else if !errors.Is(err, badger.ErrKeyNotFound) {
		return err
	}
	at := ev.TimeMs
	k := -1
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i].belongs(at, ev.Type) {
			k = i
			break
		}
	}
	if k < 0 {
		r := sessionRec{start: at, last: at, origin: at}
		for _, s := range countedSlices(ev) {
			if err := t.count(app, day(at), "sessions@"+s); err != nil {
				return err
			}
		}
		if err := t.window(app, watchedSlices(ev), at, "sessions"); err != nil {
			return err
		}
		k = len(recs)
		for k > 0 && recs[k-1].start > at {
			k--
		}
		recs = slices.Insert(recs, k, r)
		if len(recs) > maxSessions {
			recs = recs[1:]
			k--
		}
	}
	r := &recs[k]
	d := day(r.origin)
	if at < r.start {
		if err := t.add("n/"+app+"/"+d+"/session-ms", uint64(r.start-at)); err != nil {
			return err
		}
		r.start = at
	}
	if at > r.last {
		if err := t.add("n/"+app+"/"+d+"/session-ms", uint64(at-r.last)); err != nil {
			return err
		}
		r.last = at
	}
	for _, m := range []struct {
		typ     analyticspb.Type
		flag    byte
		counter string
		window  string
	}{{analyticspb.Type_TYPE_CRASH, sessionCrashed, "crashed-sessions@", "crashed"}, {analyticspb.Type_TYPE_FREEZE, sessionFrozen, "frozen-sessions@", "frozen"}} {
		if ev.Type != m.typ || r.flags&m.flag != 0 {
			continue
		}
		r.flags |= m.flag
		for _, s := range countedSlices(ev) {
			if err := t.count(app, d, m.counter+s); err != nil {
				return err
			}
		}
		if err := t.window(app, watchedSlices(ev), at, m.window); err != nil {
			return err
		}
	}
	if ev.Type == analyticspb.Type_TYPE_SESSION_END {
		r.flags |= sessionEnded
	}
	return t.Set(key, encodeSessions(recs))
}

// watchedSlices are the slices circuit breakers watch an event's session
// under: each release and switch variant active on the device, alone and
// with the device's model.
func watchedSlices(ev *analyticspb.EventHead) []string {
	var out []string
	add := func(s string) {
		out = append(out, s)
		if ev.Model != "" {
			out = append(out, s+"|m:"+ev.Model)
		}
	}
	for pkg, ver := range ev.Releases {
		add("r:" + pkg + "=" + ver)
	}
	for key, variant := range ev.Switches {
		add("s:" + key + "=" + variant)
	}
	return out
}

// window counts metric in the minute of ms for each slice. The counters
// expire WindowKeep after their minute (an absolute time, so a rebuild
// keeps the same ones).
func (t aggTxn) window(app string, slices []string, ms int64, metric string) error {
	minute := ms / 60_000
	ttl := time.Until(time.UnixMilli((minute + 1) * 60_000).Add(WindowKeep))
	if ttl <= 0 {
		return nil
	}
	for _, s := range slices {
		key := []byte("w/" + app + "/" + s + "/" + strconv.FormatInt(minute, 10) + "/" + metric)
		n, err := oplog.GetUint64(t.Txn, key)
		if err != nil {
			return err
		}
		if err := t.SetEntry(badger.NewEntry(key, binary.BigEndian.AppendUint64(nil, n+1)).WithTTL(ttl)); err != nil {
			return err
		}
	}
	return nil
}

// Window sums a slice's per-minute counters over the minutes from
// (until - window) to until: sessions started, and crashed and frozen
// sessions.
func (ag *Aggregates) Window(app, slice string, until time.Time, window time.Duration) (sessions, crashed, frozen uint64, err error) {
	last := until.UnixMilli() / 60_000
	first := until.Add(-window).UnixMilli() / 60_000
	// One scan over the counters that exist (a quiet slice has few), not
	// three reads for every minute of the window. Keys that do not parse
	// as <minute>/<metric> after the prefix belong to another slice whose
	// name extends this one past a "/": skipped.
	prefix := "w/" + app + "/" + slice + "/"
	err = ag.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefix), PrefetchValues: false})
		defer it.Close()
		for it.Seek([]byte(prefix + strconv.FormatInt(first, 10))); it.Valid(); it.Next() {
			m, metric, ok := strings.Cut(string(it.Item().Key()[len(prefix):]), "/")
			minute, err := strconv.ParseInt(m, 10, 64)
			if !ok || err != nil || minute < first || minute > last {
				continue
			}
			var to *uint64
			switch metric {
			case "sessions":
				to = &sessions
			case "crashed":
				to = &crashed
			case "frozen":
				to = &frozen
			default:
				continue
			}
			if err := it.Item().Value(func(v []byte) error {
				if len(v) == 8 {
					*to += binary.BigEndian.Uint64(v)
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	})
	return sessions, crashed, frozen, err
}

// Counters returns every counter of an app in a period (a day 20261121,
// an ISO week 2026W47 or a month 202611), by metric name, once the
// projection holds every event stored before the call.
func (ag *Aggregates) Counters(ctx context.Context, app, period string) (map[string]uint64, error) {
	if err := ag.proj.CatchUp(ctx); err != nil {
		return nil, fmt.Errorf("analytics: %v: %w", err, oplog.ErrUnavailable)
	}
	out := map[string]uint64{}
	prefix := []byte("n/" + app + "/" + period + "/")
	err := ag.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if err := it.Item().Value(func(v []byte) error {
				if len(v) == 8 {
					out[string(it.Item().Key()[len(prefix):])] = binary.BigEndian.Uint64(v)
				}
				return nil
			}); err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}

// Retention returns, for the users first seen on cohort day, how many were
// active n days later, for n from 0 to days.
func (ag *Aggregates) Retention(ctx context.Context, app, cohort string, days int) ([]uint64, error) {
	if err := ag.proj.CatchUp(ctx); err != nil {
		return nil, fmt.Errorf("analytics: %v: %w", err, oplog.ErrUnavailable)
	}
	out := make([]uint64, days+1)
	err := ag.db.View(func(txn *badger.Txn) error {
		for n := range out {
			v, err := oplog.GetUint64(txn, []byte("r/"+app+"/"+cohort+"/"+strconv.Itoa(n)))
			if err != nil {
				return err
			}
			out[n] = v
		}
		return nil
	})
	return out, err
}

// CrashRate is the crash and freeze figures of one slice in a day: ""
// (all), "v:<version>", "os:<os>", "model:<model>", "region:<region>",
// "network:<network>" or "r:<package>=<version>".
type CrashRate struct {
	Sessions        uint64 `json:"sessions"`
	CrashedSessions uint64 `json:"crashed_sessions"`
	Crashes         uint64 `json:"crashes"`
	CrashedUsers    uint64 `json:"crashed_users"`
	FrozenSessions  uint64 `json:"frozen_sessions"`
	Freezes         uint64 `json:"freezes"`
	FrozenUsers     uint64 `json:"frozen_users"`
	ActiveUsers     uint64 `json:"active_users"`
	// Rate is crashed sessions over sessions; CrashFree its complement.
	Rate      float64 `json:"rate"`
	CrashFree float64 `json:"crash_free"`
	// FreezeRate is frozen sessions over sessions.
	FreezeRate float64 `json:"freeze_rate"`
	// CrashFreeUsers is the share of the slice's active users (by their
	// first event of the day) who did not crash.
	CrashFreeUsers float64 `json:"crash_free_users"`
}

// CrashRates returns the crash figures of every slice of an app in a day.
func (ag *Aggregates) CrashRates(ctx context.Context, app, day string) (map[string]CrashRate, error) {
	c, err := ag.Counters(ctx, app, day)
	if err != nil {
		return nil, err
	}
	out := map[string]CrashRate{}
	for k, v := range c {
		metric, slice, ok := strings.Cut(k, "@")
		if !ok {
			continue
		}
		r := out[slice]
		switch metric {
		case "sessions":
			r.Sessions = v
		case "crashed-sessions":
			r.CrashedSessions = v
		case "crashes":
			r.Crashes = v
		case "crashes-users":
			r.CrashedUsers = v
		case "freezes":
			r.Freezes = v
		case "frozen-sessions":
			r.FrozenSessions = v
		case "freezes-users":
			r.FrozenUsers = v
		}
		out[slice] = r
	}
	for s, r := range out {
		if r.Sessions > 0 {
			r.Rate = float64(r.CrashedSessions) / float64(r.Sessions)
			r.CrashFree = 1 - r.Rate
			r.FreezeRate = float64(r.FrozenSessions) / float64(r.Sessions)
		}
		switch dim, val, _ := strings.Cut(s, ":"); dim {
		case "":
			r.ActiveUsers = c["dau"]
		case "v":
			r.ActiveUsers = c["dau:version="+val]
		case "r":
			r.ActiveUsers = c["dau:release="+val]
		default: // os, model, region, network
			r.ActiveUsers = c["dau:"+dim+"="+val]
		}
		if r.ActiveUsers > 0 && r.CrashedUsers <= r.ActiveUsers {
			r.CrashFreeUsers = 1 - float64(r.CrashedUsers)/float64(r.ActiveUsers)
		}
		out[s] = r
	}
	return out, nil
}
