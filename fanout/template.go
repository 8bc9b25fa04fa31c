package fanout

import (
	"fmt"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// checkTemplate validates a job's event template as the oplog validates an
// event (same rules, same errors), minus the targets, which come from the
// audience, and resolves its defaults from the business so that every
// entry of the job is the same. created_at, if missing, is set now: every
// recipient's entry carries the same one.
//
// It repeats oplog's rules because oplog exports no check without an
// append; keep the two in step (oplog/event.go, validate).
func (f *Fanout) checkTemplate(ev *oplogpb.Event, now time.Time) error {
	switch ev.Kind {
	case oplogpb.Kind_KIND_SYNC, oplogpb.Kind_KIND_PUSH, oplogpb.Kind_KIND_RELEASE,
		oplogpb.Kind_KIND_SWITCH, oplogpb.Kind_KIND_COMMAND:
	case oplogpb.Kind_KIND_UNSPECIFIED:
		return fmt.Errorf("kind missing: %w", oplog.ErrUnknownKind)
	default:
		return fmt.Errorf("kind %s cannot be fanned out: %w", ev.Kind, oplog.ErrUnknownKind)
	}
	if !oplog.ValidBusiness(ev.Business) {
		return fmt.Errorf("business %q: want 1-%d of [a-z0-9_-]: %w", clip(ev.Business), oplog.MaxBusinessLen, oplog.ErrInvalidID)
	}
	b, ok := f.lg.Business(ev.Business)
	if !ok {
		return fmt.Errorf("business %q: %w", ev.Business, oplog.ErrUnknownBusiness)
	}
	dim := oplogpb.Dimension_DIMENSION_USER
	if b.Dimension == oplogpb.Dimension_DIMENSION_DEVICE {
		dim = oplogpb.Dimension_DIMENSION_DEVICE
	}
	switch ev.Dimension {
	case oplogpb.Dimension_DIMENSION_UNSPECIFIED:
		ev.Dimension = dim
	case oplogpb.Dimension_DIMENSION_USER, oplogpb.Dimension_DIMENSION_DEVICE:
		if ev.Dimension != dim {
			return fmt.Errorf("business %q is %s, event is %s: %w", b.Code, dim, ev.Dimension, oplog.ErrInvalid)
		}
	default:
		return fmt.Errorf("dimension %d: %w", int32(ev.Dimension), oplog.ErrInvalid)
	}
	switch ev.DeviceMode {
	case oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED:
		ev.DeviceMode = b.DeviceMode
		if ev.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED {
			ev.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_MULTI
		}
	case oplogpb.DeviceMode_DEVICE_MODE_MULTI, oplogpb.DeviceMode_DEVICE_MODE_SINGLE:
	default:
		return fmt.Errorf("device mode %d: %w", int32(ev.DeviceMode), oplog.ErrInvalid)
	}
	if ev.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_SINGLE && ev.Dimension != oplogpb.Dimension_DIMENSION_USER {
		return fmt.Errorf("single-device mode needs the user dimension: %w", oplog.ErrInvalid)
	}
	if len(ev.Targets) > 0 {
		return fmt.Errorf("the template names targets: recipients come from the audience: %w", oplog.ErrInvalid)
	}
	if ev.MessageId != "" {
		return fmt.Errorf("the template names a message id: a job's entries carry %q: %w", MessageIDPrefix+"<job>", oplog.ErrInvalid)
	}
	if ev.Transient {
		return fmt.Errorf("transient events are never stored, so never fanned out: %w", oplog.ErrInvalid)
	}
	if ev.Topic != "" {
		return fmt.Errorf("topic is only for topic events: %w", oplog.ErrInvalid)
	}
	return oplog.CheckContent(ev, f.lg.Limits(), now)
}
