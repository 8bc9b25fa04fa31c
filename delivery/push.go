package delivery

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The businesses that carry pushes: Open registers them if absent.
var (
	// BusinessPush carries pushes to users: every device of the user
	// gets them (multi-device), including a device that binds the user
	// within the validity period.
	BusinessPush = &oplogpb.Business{Code: "push", Dimension: oplogpb.Dimension_DIMENSION_USER,
		DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_MULTI}
	// BusinessPushDevice carries pushes to devices.
	BusinessPushDevice = &oplogpb.Business{Code: "push-device", Dimension: oplogpb.Dimension_DIMENSION_DEVICE}
)

// Push settings.
const (
	// ContentTypeNotification is the content type of a push entry's
	// payload: a deliverypb.Notification in protojson.
	ContentTypeNotification = "application/vnd.sluice.push+json"
	DefaultPushValidity     = 72 * time.Hour
	MaxPushValidity         = 30 * 24 * time.Hour
	MaxPushData             = 32 << 10
	// MaxPushTargets bounds a users or devices audience; above the oplog's
	// targets per event it is sent through a fanout list job.
	MaxPushTargets = 1_000_000
	// pushPrefix starts the message id of a push's entries ("push-<id>");
	// a fanout job's entries carry fanout.MessageID("push-<id>").
	pushPrefix = "push-"
)

// PushIDOf returns the push id an entry of a push carries, or "" for an
// entry that is not a push's.
func PushIDOf(e *oplogpb.Entry) string {
	if e.Kind != oplogpb.Kind_KIND_PUSH {
		return ""
	}
	id, ok := strings.CutPrefix(e.MessageId, fanout.MessageID(pushPrefix))
	if !ok {
		id, ok = strings.CutPrefix(e.MessageId, pushPrefix)
	}
	if !ok {
		return ""
	}
	return id
}

// Push sends a push notification: to users or devices (entries of the push
// businesses; big lists through a fanout list job), to a segment (a
// fanout segment job) or to everyone (one message of the topic every
// device reads). Each recipient's notification is rendered from the
// title and body templates with the push's variables, over the
// recipient's own (target_vars, users and devices audiences only). A push
// id is an idempotency key: sending it again sends nothing new.
//
// Errors: oplog.ErrInvalidID (push id, targets, collapse key),
// oplog.ErrInvalid (templates, variables, action URI, conditions, data),
// oplog.ErrExpired, oplog.ErrNoTargets, oplog.ErrTooManyTargets,
// oplog.ErrUnavailable; and without a Fanout in Config, ErrInvalid for
// audiences that need one.
func (d *Delivery) Push(ctx context.Context, p *deliverypb.Push, actor string) (*deliverypb.PushResult, error) {
	now := d.cfg.Now()
	n, cond, err := d.checkPush(p, now)
	if err != nil {
		return nil, err
	}
	res := &deliverypb.PushResult{PushId: p.Id, ExpiresMs: n.ExpiresMs}
	ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_PUSH, ContentType: ContentTypeNotification,
		ExpiresAt: timestamppb.New(time.UnixMilli(n.ExpiresMs)), CreatedAt: timestamppb.New(now),
		Conditions: cond, CollapseKey: p.CollapseKey}
	if err := d.beforePush(ctx, p, n, now); err != nil {
		return nil, err
	}
	pl := &payloads{p: p, n: n}
	log := d.lg.Info().Str("push", p.Id).Str("actor", actor)
	switch a := p.Audience.(type) {
	case *deliverypb.Push_Users:
		ev.Business, ev.Dimension = BusinessPush.Code, BusinessPush.Dimension
		err = d.pushTo(ctx, p, pl, ev, a.Users.GetIds(), res)
		log = log.Str("audience", "users")
	case *deliverypb.Push_Devices:
		ev.Business, ev.Dimension = BusinessPushDevice.Code, BusinessPushDevice.Dimension
		err = d.pushTo(ctx, p, pl, ev, a.Devices.GetIds(), res)
		log = log.Str("audience", "devices")
	case *deliverypb.Push_Segment:
		ev.Business, ev.Dimension = BusinessPush.Code, BusinessPush.Dimension
		err = d.pushJob(ctx, p, pl, ev, &fanoutpb.Job{Audience: &fanoutpb.Job_Segment{Segment: a.Segment}}, res)
		log = log.Str("audience", "segment:"+a.Segment)
	case *deliverypb.Push_Everyone:
		if !a.Everyone {
			return nil, fmt.Errorf("push %s: everyone must be true: %w", p.Id, oplog.ErrNoTargets)
		}
		ev.Business, ev.Dimension = BusinessPush.Code, BusinessPush.Dimension
		err = d.pushJob(ctx, p, pl, ev, &fanoutpb.Job{Audience: &fanoutpb.Job_Everyone{Everyone: &fanoutpb.Everyone{}}}, res)
		log = log.Str("audience", "everyone")
	default:
		return nil, fmt.Errorf("push %s: no audience (users, devices, segment or everyone): %w", p.Id, oplog.ErrNoTargets)
	}
	if err != nil {
		return nil, err
	}
	if err := d.afterPush(ctx, p, pl, res, now); err != nil {
		return nil, err
	}
	log.Uint64("targets", res.Targets).Str("job", res.Job).Bool("duplicate", res.Duplicate).Msg("push sent")
	return res, nil
}

// beforePush stores the push's record, what its funnel counts against,
// before any of its entries: receipts count only for pushes with a
// record. Targeted is the devices of the audience the registry knows and
// the conditions match, or without a registry the targets addressed.
// Idempotent (message id), so a producer retrying a push loses nothing.
func (d *Delivery) beforePush(ctx context.Context, p *deliverypb.Push, n *deliverypb.Notification, now time.Time) error {
	if d.rc == nil {
		return nil
	}
	rec := &deliverypb.PushRecord{PushId: p.Id, ExpiresMs: n.ExpiresMs, SentMs: now.UnixMilli()}
	switch a := p.Audience.(type) {
	case *deliverypb.Push_Users:
		rec.Audience, rec.Targeted = "users", uint64(len(a.Users.GetIds()))
	case *deliverypb.Push_Devices:
		rec.Audience, rec.Targeted = "devices", uint64(len(a.Devices.GetIds()))
	case *deliverypb.Push_Segment:
		rec.Audience = "segment"
	case *deliverypb.Push_Everyone:
		rec.Audience = "everyone"
	}
	if d.cfg.Registry != nil {
		dry, err := d.DryRunPush(ctx, d.cfg.Registry, p)
		if err != nil {
			return fmt.Errorf("push %s: counting its devices: %w", p.Id, err)
		}
		rec.Targeted, rec.TargetedDevices = dry.Matching, true
	}
	return d.recordPush(ctx, rec)
}

// afterPush schedules the push's offline check: idempotent (message id).
// It reuses the payloads the push rendered.
func (d *Delivery) afterPush(ctx context.Context, p *deliverypb.Push, pl *payloads, res *deliverypb.PushResult, now time.Time) error {
	if d.rc == nil {
		return nil
	}
	n := pl.n
	pc := &deliverypb.PushCheck{PushId: p.Id, ExpiresMs: n.ExpiresMs, Conditions: p.Conditions}
	switch a := p.Audience.(type) {
	case *deliverypb.Push_Users:
		if res.Job == "" { // a list too big for one event is not carried: no offline check
			pc.Users = a.Users.GetIds()
		}
	case *deliverypb.Push_Devices:
		if res.Job == "" {
			pc.Devices = a.Devices.GetIds()
		}
	case *deliverypb.Push_Segment:
		pc.Segment = a.Segment
	case *deliverypb.Push_Everyone:
		pc.Everyone = true
	}
	after := d.cfg.OfflineAfter
	if p.OfflineAfterMs != 0 {
		// Past the validity a check sends nothing: cap it there (which
		// also keeps the duration from overflowing).
		after = time.Duration(min(p.OfflineAfterMs, n.ExpiresMs-now.UnixMilli())) * time.Millisecond
	}
	if d.off == nil || after < 0 || (len(pc.Users) == 0 && len(pc.Devices) == 0 && pc.Segment == "" && !pc.Everyone) {
		return nil
	}
	var err error
	if pc.Notification, err = pl.common(); err != nil {
		return err
	}
	for target, v := range p.TargetVars {
		if len(v.GetVars()) == 0 {
			continue
		}
		payload, err := pl.target(target)
		if err != nil {
			return err
		}
		if pc.TargetNotifications == nil {
			pc.TargetNotifications = map[string][]byte{}
		}
		pc.TargetNotifications[target] = payload
	}
	return d.off.schedule(ctx, pc, after)
}

// checkPush validates a push and builds its notification (templates not
// rendered yet) and oplog conditions.
func (d *Delivery) checkPush(p *deliverypb.Push, now time.Time) (*deliverypb.Notification, *oplogpb.Conditions, error) {
	if p == nil {
		return nil, nil, fmt.Errorf("push: none given: %w", oplog.ErrInvalid)
	}
	if !oplog.ValidID(p.Id) || len(pushPrefix)+len(fanout.MessageID(pushPrefix))+len(p.Id) > oplog.MaxMessageIDLen {
		return nil, nil, fmt.Errorf("push id %q: want 1-%d of the id alphabet: %w", clip(p.Id), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	if p.Title == "" && p.Body == "" && len(p.Data) == 0 {
		return nil, nil, fmt.Errorf("push %s: no title, body or data: %w", p.Id, oplog.ErrInvalid)
	}
	if len(p.Title) > MaxTitleLen || len(p.Body) > MaxBodyLen {
		return nil, nil, fmt.Errorf("push %s: title over %d or body over %d bytes: %w", p.Id, MaxTitleLen, MaxBodyLen, oplog.ErrInvalid)
	}
	if err := checkVars(p.Vars); err != nil {
		return nil, nil, fmt.Errorf("push %s: %w", p.Id, err)
	}
	if len(p.TargetVars) > 0 {
		if _, ok := p.Audience.(*deliverypb.Push_Users); !ok {
			if _, ok := p.Audience.(*deliverypb.Push_Devices); !ok {
				return nil, nil, fmt.Errorf("push %s: target variables need a users or devices audience: %w", p.Id, oplog.ErrInvalid)
			}
		}
		for t, v := range p.TargetVars {
			if err := checkVars(v.GetVars()); err != nil {
				return nil, nil, fmt.Errorf("push %s: target %s: %w", p.Id, clip(t), err)
			}
		}
	}
	if len(p.ActionUri) > 2048 || (p.ActionUri != "" && !strings.Contains(p.ActionUri, ":")) {
		return nil, nil, fmt.Errorf("push %s: action URI %q: want a URI with a scheme, up to 2048 bytes: %w", p.Id, clip(p.ActionUri), oplog.ErrInvalid)
	}
	if p.CollapseKey != "" && !oplog.ValidID(p.CollapseKey) {
		return nil, nil, fmt.Errorf("push %s: collapse key %q: %w", p.Id, clip(p.CollapseKey), oplog.ErrInvalidID)
	}
	if len(p.Data) > MaxPushData || len(p.DataType) > 128 {
		return nil, nil, fmt.Errorf("push %s: data over %d bytes or data type over 128: %w", p.Id, MaxPushData, oplog.ErrPayloadTooLarge)
	}
	if deliverypb.Priority_name[int32(p.Priority)] == "" {
		return nil, nil, fmt.Errorf("push %s: priority %v: %w", p.Id, p.Priority, oplog.ErrInvalid)
	}
	expires := p.ExpiresMs
	switch {
	case expires == 0:
		expires = now.Add(d.cfg.PushValidity).UnixMilli()
	case expires <= now.UnixMilli():
		return nil, nil, fmt.Errorf("push %s: validity ended at %s: %w", p.Id, time.UnixMilli(expires).UTC().Format(time.RFC3339), oplog.ErrExpired)
	case expires > now.Add(MaxPushValidity).UnixMilli():
		return nil, nil, fmt.Errorf("push %s: validity over %v: %w", p.Id, MaxPushValidity, oplog.ErrInvalid)
	}
	cond, err := conditionsOf(p.Conditions)
	if err != nil {
		return nil, nil, fmt.Errorf("push %s: %w", p.Id, err)
	}
	n := &deliverypb.Notification{PushId: p.Id, ActionUri: p.ActionUri, Priority: p.Priority,
		CollapseKey: p.CollapseKey, Data: p.Data, DataType: p.DataType, ExpiresMs: expires}
	return n, cond, nil
}

// conditionsOf turns a push's conditions into the oplog's: attribute
// predicates only, those of the compiled rule.
func conditionsOf(r *deliverypb.Rule) (*oplogpb.Conditions, error) {
	if r == nil {
		return nil, nil
	}
	if len(r.Users) > 0 || len(r.Devices) > 0 || r.Percent != nil || r.NotBeforeMs != 0 || r.NotAfterMs != 0 || r.Salt != "" || r.Except != nil {
		return nil, fmt.Errorf("conditions: attribute predicates only (no whitelist, percent, window or except): %w", oplog.ErrInvalid)
	}
	c, err := Compile(r, "")
	if err != nil {
		return nil, err
	}
	return c.cond, nil
}

// render renders the notification for one recipient's variables.
func render(p *deliverypb.Push, n *deliverypb.Notification, own map[string]string) ([]byte, error) {
	vars := p.Vars
	if len(own) > 0 {
		vars = maps.Clone(p.Vars)
		if vars == nil {
			vars = map[string]string{}
		}
		maps.Copy(vars, own)
	}
	title, err := Render(p.Title, vars, MaxTitleLen)
	if err != nil {
		return nil, fmt.Errorf("push %s: title: %w", p.Id, err)
	}
	body, err := Render(p.Body, vars, MaxBodyLen)
	if err != nil {
		return nil, fmt.Errorf("push %s: body: %w", p.Id, err)
	}
	m := proto.Clone(n).(*deliverypb.Notification)
	m.Title, m.Body = title, body
	return protojson.Marshal(m)
}

// payloads renders a push's notification once per distinct variables
// (render): the common payload and each target's own, kept for the
// offline check after the push is sent.
type payloads struct {
	p   *deliverypb.Push
	n   *deliverypb.Notification
	all []byte            // the common payload; nil: not rendered yet
	own map[string][]byte // by target (target_vars)
}

// common returns the payload of the recipients without variables of
// their own.
func (pl *payloads) common() ([]byte, error) {
	if pl.all == nil {
		b, err := render(pl.p, pl.n, nil)
		if err != nil {
			return nil, err
		}
		pl.all = b
	}
	return pl.all, nil
}

// target returns the payload of a target with variables of its own.
func (pl *payloads) target(id string) ([]byte, error) {
	if b, ok := pl.own[id]; ok {
		return b, nil
	}
	b, err := render(pl.p, pl.n, pl.p.TargetVars[id].GetVars())
	if err != nil {
		return nil, err
	}
	if pl.own == nil {
		pl.own = map[string][]byte{}
	}
	pl.own[id] = b
	return b, nil
}

// pushTo sends a push to user or device ids: one event per distinct
// rendering, appended as a batch; a list over the oplog's targets per
// event without per-target variables goes through a fanout list job.
func (d *Delivery) pushTo(ctx context.Context, p *deliverypb.Push, pl *payloads, ev *oplogpb.Event, ids []string, res *deliverypb.PushResult) error {
	if len(ids) == 0 {
		return fmt.Errorf("push %s: no targets: %w", p.Id, oplog.ErrNoTargets)
	}
	if len(ids) > MaxPushTargets {
		return fmt.Errorf("push %s: %d targets, over %d: %w", p.Id, len(ids), MaxPushTargets, oplog.ErrTooManyTargets)
	}
	for _, id := range ids {
		if !oplog.ValidID(id) {
			return fmt.Errorf("push %s: target %q: %w", p.Id, clip(id), oplog.ErrInvalidID)
		}
	}
	res.Targets = uint64(len(ids))
	common, err := pl.common()
	if err != nil {
		return err
	}
	if maxTargets := d.cfg.Log.Limits().MaxTargets; len(ids) > maxTargets {
		if len(p.TargetVars) > 0 {
			return fmt.Errorf("push %s: target variables work for up to %d targets: %w", p.Id, maxTargets, oplog.ErrTooManyTargets)
		}
		ev.Payload = common
		return d.pushList(ctx, p, ev, ids, res)
	}
	// Group the targets by payload: those without variables of their own
	// share the common one.
	ev.MessageId = pushPrefix + p.Id
	var events []*oplogpb.Event
	shared := proto.Clone(ev).(*oplogpb.Event)
	shared.Payload = common
	for _, id := range ids {
		if len(p.TargetVars[id].GetVars()) == 0 {
			shared.Targets = append(shared.Targets, id)
			continue
		}
		payload, err := pl.target(id)
		if err != nil {
			return err
		}
		one := proto.Clone(ev).(*oplogpb.Event)
		one.Payload, one.Targets = payload, []string{id}
		events = append(events, one)
	}
	if len(shared.Targets) > 0 {
		events = append(events, shared)
	}
	for start := 0; start < len(events); start += 1000 {
		batch := events[start:min(start+1000, len(events))]
		for _, r := range d.cfg.Log.AppendBatch(ctx, batch) {
			if r.Error != nil {
				return fmt.Errorf("push %s: %w", p.Id, oplog.ErrorFromPB(r.Error))
			}
			for _, a := range r.Results {
				if a.Duplicate {
					res.Duplicate = true
				}
			}
		}
	}
	return nil
}

// pushList sends a push to a big list of ids through a fanout list job.
func (d *Delivery) pushList(ctx context.Context, p *deliverypb.Push, ev *oplogpb.Event, ids []string, res *deliverypb.PushResult) error {
	if err := d.pushJob(ctx, p, nil, ev, &fanoutpb.Job{Audience: &fanoutpb.Job_List{List: &fanoutpb.List{}}}, res); err != nil || res.Duplicate {
		return err
	}
	chunks := 0
	for start := 0; start < len(ids); start += fanout.DefaultChunkSize {
		if err := d.cfg.Fanout.AddRecipients(ctx, res.Job, chunks, ids[start:min(start+fanout.DefaultChunkSize, len(ids))]); err != nil {
			return fmt.Errorf("push %s: %w", p.Id, err)
		}
		chunks++
	}
	if _, err := d.cfg.Fanout.Seal(ctx, res.Job, chunks); err != nil {
		return fmt.Errorf("push %s: %w", p.Id, err)
	}
	return nil
}

// pushJob creates the fanout job of a push (pl nil: ev has its payload).
func (d *Delivery) pushJob(ctx context.Context, p *deliverypb.Push, pl *payloads, ev *oplogpb.Event, job *fanoutpb.Job, res *deliverypb.PushResult) error {
	if d.cfg.Fanout == nil {
		return fmt.Errorf("push %s: this audience needs fanout, which this node does not run: %w", p.Id, oplog.ErrInvalid)
	}
	if pl != nil {
		payload, err := pl.common()
		if err != nil {
			return err
		}
		ev.Payload = payload
	}
	job.Id, job.Event = pushPrefix+p.Id, ev
	res.Job = job.Id
	if _, err := d.cfg.Fanout.Status(ctx, job.Id); err == nil {
		res.Duplicate = true // sent before: the job exists
		return nil
	} else if !errors.Is(err, oplog.ErrNotFound) {
		return fmt.Errorf("push %s: %w", p.Id, err)
	}
	if _, err := d.cfg.Fanout.Create(ctx, job); err != nil {
		return fmt.Errorf("push %s: %w", p.Id, err)
	}
	return nil
}

// Recall withdraws a push: entries of it not yet delivered are not sent
// (devices that have it keep it), and its fanout job, if still running, is
// cancelled. Errors: oplog.ErrInvalidID, oplog.ErrUnavailable.
func (d *Delivery) Recall(ctx context.Context, push, actor string) error {
	if !oplog.ValidID(push) {
		return fmt.Errorf("push id %q: %w", clip(push), oplog.ErrInvalidID)
	}
	if _, _, err := d.ctl.Write(ctx, subjectRecall+push, &deliverypb.Recall{Push: push, AtMs: d.cfg.Now().UnixMilli(), Actor: actor}); err != nil {
		return err
	}
	if d.cfg.Fanout != nil {
		if _, err := d.cfg.Fanout.Cancel(ctx, pushPrefix+push); err != nil && !errors.Is(err, oplog.ErrNotFound) {
			d.lg.Warn().Err(err).Str("push", push).Msg("recall: the fanout job was not cancelled")
		}
	}
	d.lg.Info().Str("push", push).Str("actor", actor).Msg("push recalled")
	return nil
}

// Suppressed reports whether an entry must not be sent: it belongs to a
// recalled push. Gateways ask it for every entry they send; it takes no
// lock.
func (d *Delivery) Suppressed(e *oplogpb.Entry) bool {
	if e.Kind != oplogpb.Kind_KIND_PUSH {
		return false
	}
	id := PushIDOf(e)
	return id != "" && d.ctl.Snapshot().recalled[id]
}

// Recalled returns the recalled push ids, sorted.
func (d *Delivery) Recalled() []string {
	return slices.Sorted(maps.Keys(d.ctl.Snapshot().recalled))
}

// maxDryRunSegment bounds the segment a push dry run reads into memory.
const maxDryRunSegment = 5_000_000

// DryRunPush counts the known devices a push would reach now: those of its
// audience (a device bound to one of the users, one of the devices, a
// member of the segment, any device) matching its conditions.
func (d *Delivery) DryRunPush(ctx context.Context, reg *Registry, p *deliverypb.Push) (*deliverypb.DryRun, error) {
	cond, err := conditionsOf(p.GetConditions())
	if err != nil {
		return nil, err
	}
	if out, ok, err := dryRunFew(reg, p, cond); ok || err != nil {
		return out, err
	}
	var in func(*Device) bool
	switch a := p.GetAudience().(type) {
	case *deliverypb.Push_Users:
		set := idSetOf(a.Users.GetIds())
		in = func(dev *Device) bool { _, ok := set[dev.User]; return ok }
	case *deliverypb.Push_Devices:
		set := idSetOf(a.Devices.GetIds())
		in = func(dev *Device) bool { _, ok := set[dev.ID]; return ok }
	case *deliverypb.Push_Segment:
		if d.cfg.Fanout == nil {
			return nil, fmt.Errorf("dry run: segments need fanout, which this node does not run: %w", oplog.ErrInvalid)
		}
		set, err := d.cfg.Fanout.SegmentMembers(ctx, a.Segment, maxDryRunSegment)
		if err != nil {
			return nil, err
		}
		in = func(dev *Device) bool { _, ok := set[dev.User]; return ok }
	case *deliverypb.Push_Everyone:
		in = func(*Device) bool { return true }
	default:
		return nil, fmt.Errorf("dry run: no audience: %w", oplog.ErrNoTargets)
	}
	return reg.Count(ctx, func(dev *Device) bool { return in(dev) && oplog.Match(cond, dev.Attrs) })
}

// maxFewTargets is the largest users or devices audience counted by
// looking its devices up rather than by walking the registry.
const maxFewTargets = 1000

// dryRunFew counts the devices of a small users or devices audience by
// lookups (ok false: not such an audience).
func dryRunFew(reg *Registry, p *deliverypb.Push, cond *oplogpb.Conditions) (*deliverypb.DryRun, bool, error) {
	var devs []*deliverypb.Device
	switch a := p.GetAudience().(type) {
	case *deliverypb.Push_Users:
		if len(a.Users.GetIds()) > maxFewTargets {
			return nil, false, nil
		}
		for _, u := range slices.Compact(slices.Sorted(slices.Values(a.Users.GetIds()))) {
			ds, err := reg.DevicesOf(u)
			if err != nil {
				return nil, true, err
			}
			devs = append(devs, ds...)
		}
	case *deliverypb.Push_Devices:
		if len(a.Devices.GetIds()) > maxFewTargets {
			return nil, false, nil
		}
		for _, id := range slices.Compact(slices.Sorted(slices.Values(a.Devices.GetIds()))) {
			if dev, ok, err := reg.Get(id); err != nil {
				return nil, true, err
			} else if ok {
				devs = append(devs, dev)
			}
		}
	default:
		return nil, false, nil
	}
	known, err := reg.Known()
	if err != nil {
		return nil, true, err
	}
	out := &deliverypb.DryRun{Known: known}
	for _, dev := range devs {
		if oplog.Match(cond, attrsOfRecord(dev)) {
			tally(out, dev.Device)
		}
	}
	return out, true, nil
}

// attrsOfRecord returns the attributes of a registry record.
func attrsOfRecord(dev *deliverypb.Device) oplog.Attrs {
	return oplog.Attrs{AppVersion: dev.AppVersion, OS: dev.Os, OSVersion: dev.OsVersion, Model: dev.Model,
		Region: dev.Region, Network: dev.Network, Channel: dev.Channel, CPU: dev.Cpu}
}

func idSetOf(ids []string) map[string]struct{} {
	set := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		set[id] = struct{}{}
	}
	return set
}
