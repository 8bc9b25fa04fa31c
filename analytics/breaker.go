package analytics

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// Actions is what a tripped circuit breaker does to delivery
// (delivery.Delivery, wired in cmd): pause a release, roll a version back
// (with the releases after it), turn a switch off; the pause and the
// switch for the devices of one model when a rule is limited to it
// (model != ""). Errors wrapping oplog.ErrConflict, ErrNotFound or
// ErrInvalid are final; others are tried again.
type Actions interface {
	PauseRelease(ctx context.Context, pkg, version, model, actor string) error
	RollbackRelease(ctx context.Context, pkg, version, actor string) error
	SwitchOff(ctx context.Context, key, model, actor string) error
}

// Control subjects of the circuit breakers.
var (
	subjectBreaker     = oplog.SubjectControl("breaker") + "."
	subjectBreakerTrip = oplog.SubjectControl("breakertrip") + "."
)

// breakerActor is the actor circuit breakers act as.
const breakerActor = "circuit-breaker"

// BreakersConfig configures Breakers.
type BreakersConfig struct {
	// Log is the oplog (control stream). Required.
	Log *oplog.Log
	// Aggregates are watched. Required.
	Aggregates *Aggregates
	// Actions act on delivery. Required.
	Actions Actions
	// Interval between evaluations. Default 2 s.
	Interval time.Duration
	// RetryAfter is how long a trip whose action failed (or whose node
	// went quiet while acting) waits before it is tried again, doubling
	// with each attempt up to 10 minutes; MaxAttempts actions are tried
	// at most. Default 30 s.
	RetryAfter time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Breakers are the circuit breakers: rules and trips are control events
// (replayed into memory like the delivery state), evaluated every
// Interval against the aggregates' per-minute counters. A rule trips once
// per version: its trip is written (with the expected last sequence of
// its subject, so one node wins) before the action is taken, and written
// again with the result.
type Breakers struct {
	cfg BreakersConfig
	ctl *oplog.Control[*breakerModel]
	lg  zerolog.Logger
}

// breakerModel is the replayed state; Snapshot hands readers a copy of
// its maps.
type breakerModel struct {
	rules   map[string]*analyticspb.BreakerRule
	trips   map[string]*analyticspb.BreakerTrip
	lastSeq map[string]uint64
}

func (m *breakerModel) Apply(seq uint64, subject string, data []byte) (bool, error) {
	m.lastSeq[subject] = seq
	switch {
	case strings.HasPrefix(subject, subjectBreakerTrip):
		tr := &analyticspb.BreakerTrip{}
		if err := proto.Unmarshal(data, tr); err != nil || tr.Rule != subject[len(subjectBreakerTrip):] {
			return false, fmt.Errorf("breaker trip on %s: malformed", subject)
		}
		m.trips[tr.Rule] = tr
		return true, nil
	case strings.HasPrefix(subject, subjectBreaker):
		r := &analyticspb.BreakerRule{}
		if err := proto.Unmarshal(data, r); err != nil || r.Id != subject[len(subjectBreaker):] {
			return false, fmt.Errorf("breaker rule on %s: malformed", subject)
		}
		if r.Removed {
			delete(m.rules, r.Id)
			return true, nil
		}
		if err := checkRule(r); err != nil {
			return false, err
		}
		r.VersionSeq = seq
		m.rules[r.Id] = r
		return true, nil
	}
	return false, fmt.Errorf("subject %q: not a breaker event", subject)
}

func (m *breakerModel) Snapshot() *breakerModel {
	return &breakerModel{rules: maps.Clone(m.rules), trips: maps.Clone(m.trips), lastSeq: maps.Clone(m.lastSeq)}
}

// checkRule validates a rule.
func checkRule(r *analyticspb.BreakerRule) error {
	bad := func(what string) error { return fmt.Errorf("breaker %s: %s: %w", clip(r.Id), what, oplog.ErrInvalid) }
	switch {
	case !validName(r.Id):
		return fmt.Errorf("breaker id %q: want 1-64 of [a-z0-9_-]: %w", clip(r.Id), oplog.ErrInvalidID)
	case !oplog.ValidID(r.App):
		return fmt.Errorf("breaker %s: app %q: %w", r.Id, clip(r.App), oplog.ErrInvalidID)
	case (r.Package == "") == (r.SwitchKey == ""):
		return bad("name a release (package and version) or a switch, not both")
	case r.Package != "" && r.Version == "":
		return bad("a release needs its version")
	case r.Metric != analyticspb.Metric_METRIC_CRASH_RATE && r.Metric != analyticspb.Metric_METRIC_FREEZE_RATE:
		return bad("metric")
	case math.IsNaN(r.Threshold) || r.Threshold <= 0 || r.Threshold > 1:
		return bad("threshold: want a rate in (0, 1]")
	case r.WindowMs < time.Minute.Milliseconds() || r.WindowMs > WindowKeep.Milliseconds():
		return bad("window: want 1 minute to 24 hours")
	case r.Package != "" && r.Action != analyticspb.Action_ACTION_PAUSE && r.Action != analyticspb.Action_ACTION_ROLLBACK:
		return bad("a release's action is pause or rollback")
	case r.SwitchKey != "" && r.Action != analyticspb.Action_ACTION_SWITCH_OFF:
		return bad("a switch's action is switch off")
	case r.Package != "" && r.Model != "" && r.Action != analyticspb.Action_ACTION_PAUSE:
		return bad("a release's breaker limited to a model pauses it for that model (a rollback is for everyone)")
	case len(r.Model) > maxAttrLen || strings.ContainsAny(r.Package+r.Version+r.SwitchKey+r.SwitchVariant+r.Model, "/|="):
		return bad("names may not contain / | =")
	}
	return nil
}

func validName(s string) bool { return oplog.ValidName(s, 64) }

// ruleSlice is the aggregates' slice a rule watches.
func ruleSlice(r *analyticspb.BreakerRule) string {
	s := "r:" + r.Package + "=" + r.Version
	if r.SwitchKey != "" {
		s = "s:" + r.SwitchKey + "=" + r.SwitchVariant
	}
	if r.Model != "" {
		s += "|m:" + r.Model
	}
	return s
}

// OpenBreakers replays the breaker events of the control stream.
func OpenBreakers(ctx context.Context, cfg BreakersConfig) (*Breakers, error) {
	if cfg.Log == nil || cfg.Aggregates == nil || cfg.Actions == nil {
		return nil, errors.New("analytics: BreakersConfig.Log, Aggregates and Actions are required")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 2 * time.Second
	}
	if cfg.RetryAfter <= 0 {
		cfg.RetryAfter = 30 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	b := &Breakers{cfg: cfg, lg: zerolog.Nop()}
	if cfg.Logger != nil {
		b.lg = cfg.Logger.With().Str("component", "breakers").Logger()
	}
	m := &breakerModel{rules: map[string]*analyticspb.BreakerRule{}, trips: map[string]*analyticspb.BreakerTrip{}, lastSeq: map[string]uint64{}}
	var err error
	b.ctl, err = oplog.OpenControl(ctx, oplog.ControlConfig{Log: cfg.Log, Name: "breakers",
		Filters: []string{subjectBreaker + ">", subjectBreakerTrip + ">"}, Logger: cfg.Logger}, m)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Run follows the control stream and evaluates the rules every Interval
// until ctx ends.
func (b *Breakers) Run(ctx context.Context) error {
	done := make(chan error, 1)
	go func() { done <- b.ctl.Run(ctx) }()
	t := time.NewTicker(b.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return <-done
		case <-t.C:
			b.Evaluate(ctx)
		}
	}
}

// SetRule stores a rule (a new version re-arms it). Errors wrap
// oplog.ErrInvalid or oplog.ErrInvalidID.
func (b *Breakers) SetRule(ctx context.Context, r *analyticspb.BreakerRule, actor string) (*analyticspb.BreakerRule, error) {
	r = proto.Clone(r).(*analyticspb.BreakerRule)
	r.Removed, r.VersionSeq, r.UpdatedMs, r.UpdatedBy = false, 0, b.cfg.Now().UnixMilli(), actor
	if err := checkRule(r); err != nil {
		return nil, err
	}
	_, s, err := b.ctl.Write(ctx, subjectBreaker+r.Id, r)
	if err != nil {
		return nil, err
	}
	if got, ok := s.rules[r.Id]; ok {
		return got, nil
	}
	return nil, fmt.Errorf("breaker %s: removed meanwhile: %w", r.Id, oplog.ErrConflict)
}

// RemoveRule removes a rule. Errors: oplog.ErrNotFound.
func (b *Breakers) RemoveRule(ctx context.Context, id, actor string) error {
	if _, ok := b.ctl.Snapshot().rules[id]; !ok {
		return fmt.Errorf("breaker %s: %w", clip(id), oplog.ErrNotFound)
	}
	_, _, err := b.ctl.Write(ctx, subjectBreaker+id, &analyticspb.BreakerRule{Id: id, Removed: true, UpdatedBy: actor, UpdatedMs: b.cfg.Now().UnixMilli()})
	return err
}

// Rules returns the rules, by id.
func (b *Breakers) Rules() []*analyticspb.BreakerRule {
	s := b.ctl.Snapshot()
	out := make([]*analyticspb.BreakerRule, 0, len(s.rules))
	for _, id := range slices.Sorted(maps.Keys(s.rules)) {
		out = append(out, s.rules[id])
	}
	return out
}

// Trips returns the last trip of every rule that tripped, by rule id.
func (b *Breakers) Trips() []*analyticspb.BreakerTrip {
	s := b.ctl.Snapshot()
	out := make([]*analyticspb.BreakerTrip, 0, len(s.trips))
	for _, id := range slices.Sorted(maps.Keys(s.trips)) {
		out = append(out, s.trips[id])
	}
	return out
}

// Evaluate checks every armed rule once, tripping those over their
// threshold.
func (b *Breakers) Evaluate(ctx context.Context) {
	if err := b.cfg.Aggregates.CatchUp(ctx); err != nil {
		b.lg.Warn().Err(err).Msg("aggregates not caught up: evaluation skipped")
		return
	}
	s := b.ctl.Snapshot()
	now := b.cfg.Now()
	for _, r := range s.rules {
		if tr := s.trips[r.Id]; tr != nil && tr.RuleVersion == r.VersionSeq {
			// Tripped already at this version: act again only if the
			// action failed for a while or its node went quiet.
			if b.retryDue(tr, now) {
				retry := proto.Clone(tr).(*analyticspb.BreakerTrip)
				b.trip(ctx, s, r, retry)
			}
			continue
		}
		slice := ruleSlice(r)
		sessions, crashed, frozen, err := b.cfg.Aggregates.Window(r.App, slice, now, time.Duration(r.WindowMs)*time.Millisecond)
		if err != nil {
			b.lg.Warn().Err(err).Str("rule", r.Id).Msg("reading the window failed")
			continue
		}
		affected := crashed
		if r.Metric == analyticspb.Metric_METRIC_FREEZE_RATE {
			affected = frozen
		}
		if sessions == 0 || sessions < r.MinSessions {
			continue
		}
		// Sessions count in the minute they started, crashes in the
		// minute they happened: sessions started before the window can
		// crash in it, so the share is capped at 1.
		rate := min(float64(affected)/float64(sessions), 1)
		if rate <= r.Threshold {
			continue
		}
		b.trip(ctx, s, r, &analyticspb.BreakerTrip{Rule: r.Id, RuleVersion: r.VersionSeq, AtMs: now.UnixMilli(),
			Sessions: sessions, Affected: affected, Rate: rate, Slice: slice, Action: r.Action.String()})
	}
}

// MaxAttempts bounds the actions a trip tries.
const MaxAttempts = 8

// retryDue reports whether a trip's action should be tried again: it is
// retrying, or pending (its node may have died while acting), and the
// back-off since its last attempt has passed.
func (b *Breakers) retryDue(tr *analyticspb.BreakerTrip, now time.Time) bool {
	if tr.Attempts >= MaxAttempts || (tr.Result != "pending" && !strings.HasPrefix(tr.Result, "retrying")) {
		return false
	}
	wait := min(b.cfg.RetryAfter<<min(max(tr.Attempts, 1)-1, 20), 10*time.Minute)
	return now.Sub(time.UnixMilli(tr.AttemptedMs)) >= wait
}

// trip claims the trip (one node wins: the write expects the subject's
// last sequence), acts, and records the result.
func (b *Breakers) trip(ctx context.Context, s *breakerModel, r *analyticspb.BreakerRule, tr *analyticspb.BreakerTrip) {
	subject := subjectBreakerTrip + r.Id
	tr.Result, tr.Attempts, tr.AttemptedMs = "pending", tr.Attempts+1, b.cfg.Now().UnixMilli()
	if _, _, err := b.ctl.Write(ctx, subject, tr, jetstream.WithExpectLastSequencePerSubject(s.lastSeq[subject])); err != nil {
		if !errors.Is(err, oplog.ErrConflict) {
			b.lg.Error().Err(err).Str("rule", r.Id).Msg("recording a trip failed")
		}
		return // another node tripped it, or we retry next time
	}
	var err error
	switch r.Action {
	case analyticspb.Action_ACTION_PAUSE:
		err = b.cfg.Actions.PauseRelease(ctx, r.Package, r.Version, r.Model, breakerActor)
	case analyticspb.Action_ACTION_ROLLBACK:
		err = b.cfg.Actions.RollbackRelease(ctx, r.Package, r.Version, breakerActor)
	case analyticspb.Action_ACTION_SWITCH_OFF:
		err = b.cfg.Actions.SwitchOff(ctx, r.SwitchKey, r.Model, breakerActor)
	}
	switch {
	case err == nil:
		tr.Result = "done"
	case errors.Is(err, oplog.ErrConflict), errors.Is(err, oplog.ErrNotFound), errors.Is(err, oplog.ErrInvalid):
		tr.Result = "failed: " + err.Error()
	default:
		tr.Result = "retrying: " + err.Error()
	}
	b.lg.Warn().Str("rule", r.Id).Str("slice", tr.Slice).Uint64("sessions", tr.Sessions).Uint64("affected", tr.Affected).
		Float64("rate", tr.Rate).Str("action", tr.Action).Str("result", tr.Result).Msg("circuit breaker tripped")
	if _, _, err := b.ctl.Write(ctx, subject, tr); err != nil {
		b.lg.Error().Err(err).Str("rule", r.Id).Msg("recording a trip's result failed")
	}
}
