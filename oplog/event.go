package oplog

import (
	"fmt"
	"time"

	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Limits on producer input. A zero field takes the default.
type Limits struct {
	// MaxPayload is the largest payload in bytes. Default 64 KiB.
	MaxPayload int
	// MaxTargets is the most targets one event may name. Default 1000;
	// larger audiences belong to fanout.
	MaxTargets int
	// MaxBody is the largest encoded event or batch. Default
	// MaxPayload*2 + 64 KiB.
	MaxBody int
	// MaxBatch is the most events in one batch request. Default 1000.
	MaxBatch int
}

func (l Limits) withDefaults() Limits {
	if l.MaxPayload <= 0 {
		l.MaxPayload = 64 << 10
	}
	if l.MaxTargets <= 0 {
		l.MaxTargets = 1000
	}
	if l.MaxBody <= 0 {
		l.MaxBody = 2*l.MaxPayload + 64<<10
	}
	if l.MaxBatch <= 0 {
		l.MaxBatch = 1000
	}
	return l
}

// DecodeEvent decodes one event, as protobuf or, when contentType is
// ContentTypeJSON, as protojson. It checks the body size but not the fields:
// see Log.Validate.
func DecodeEvent(contentType string, body []byte, maxBody int) (*oplogpb.Event, error) {
	ev := new(oplogpb.Event)
	if err := decode(contentType, body, maxBody, ev); err != nil {
		return nil, err
	}
	return ev, nil
}

// DecodeBatch decodes an EventBatch like DecodeEvent.
func DecodeBatch(contentType string, body []byte, maxBody int) (*oplogpb.EventBatch, error) {
	b := new(oplogpb.EventBatch)
	if err := decode(contentType, body, maxBody, b); err != nil {
		return nil, err
	}
	return b, nil
}

func decode(contentType string, body []byte, maxBody int, m proto.Message) error {
	if maxBody > 0 && len(body) > maxBody {
		return fmt.Errorf("body of %d bytes over the limit of %d: %w", len(body), maxBody, ErrPayloadTooLarge)
	}
	var err error
	if contentType == ContentTypeJSON {
		err = protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(body, m)
	} else {
		err = proto.Unmarshal(body, m)
	}
	if err != nil {
		return fmt.Errorf("%v: %w", err, ErrMalformed)
	}
	return nil
}

// Encode marshals m as protobuf or, for ContentTypeJSON, as protojson.
func Encode(contentType string, m proto.Message) ([]byte, error) {
	if contentType == ContentTypeJSON {
		return protojson.Marshal(m)
	}
	return proto.Marshal(m)
}

// validateKind checks an event's kind, business, dimension and device
// mode, filling the defaults taken from its business.
func validateKind(ev *oplogpb.Event, biz func(string) (*oplogpb.Business, bool)) error {
	switch ev.Kind {
	case oplogpb.Kind_KIND_SYNC, oplogpb.Kind_KIND_PUSH, oplogpb.Kind_KIND_RELEASE,
		oplogpb.Kind_KIND_SWITCH, oplogpb.Kind_KIND_COMMAND:
	case oplogpb.Kind_KIND_UNSPECIFIED:
		return fmt.Errorf("kind missing: %w", ErrUnknownKind)
	case oplogpb.Kind_KIND_TOPIC_MESSAGE, oplogpb.Kind_KIND_FOLLOW, oplogpb.Kind_KIND_UNFOLLOW, oplogpb.Kind_KIND_CONTROL:
		return fmt.Errorf("kind %s is not accepted by the oplog API yet: %w", ev.Kind, ErrUnknownKind)
	default:
		return fmt.Errorf("kind %d: %w", int32(ev.Kind), ErrUnknownKind)
	}
	if !ValidBusiness(ev.Business) {
		return fmt.Errorf("business %q: want 1-%d of [a-z0-9_-]: %w", clip(ev.Business), MaxBusinessLen, ErrInvalidID)
	}
	b, ok := biz(ev.Business)
	if !ok {
		return fmt.Errorf("business %q: %w", ev.Business, ErrUnknownBusiness)
	}
	switch ev.Dimension {
	case oplogpb.Dimension_DIMENSION_UNSPECIFIED:
		ev.Dimension = businessDim(b)
	case oplogpb.Dimension_DIMENSION_USER, oplogpb.Dimension_DIMENSION_DEVICE:
		if ev.Dimension != businessDim(b) {
			return fmt.Errorf("business %q is %s, event is %s: %w", b.Code, businessDim(b), ev.Dimension, ErrInvalid)
		}
	default:
		return fmt.Errorf("dimension %d: %w", int32(ev.Dimension), ErrInvalid)
	}
	switch ev.DeviceMode {
	case oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED:
		ev.DeviceMode = b.DeviceMode
		if ev.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED {
			ev.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_MULTI
		}
	case oplogpb.DeviceMode_DEVICE_MODE_MULTI, oplogpb.DeviceMode_DEVICE_MODE_SINGLE:
	default:
		return fmt.Errorf("device mode %d: %w", int32(ev.DeviceMode), ErrInvalid)
	}
	if ev.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_SINGLE && ev.Dimension != oplogpb.Dimension_DIMENSION_USER {
		return fmt.Errorf("single-device mode needs the user dimension: %w", ErrInvalid)
	}
	return nil
}

// validate checks ev against the registry and limits, fills the defaults
// taken from its business, and returns the resolved business. It never
// changes anything outside ev.
func validate(ev *oplogpb.Event, biz func(string) (*oplogpb.Business, bool), lim Limits, now time.Time) error {
	if err := validateKind(ev, biz); err != nil {
		return err
	}
	if len(ev.Targets) == 0 {
		return ErrNoTargets
	}
	if len(ev.Targets) > lim.MaxTargets {
		return fmt.Errorf("%d targets, limit %d: %w", len(ev.Targets), lim.MaxTargets, ErrTooManyTargets)
	}
	seen := make(map[string]struct{}, len(ev.Targets))
	for _, t := range ev.Targets {
		if err := checkID("target", t); err != nil {
			return err
		}
		if _, dup := seen[t]; dup {
			return fmt.Errorf("target %q named twice: %w", t, ErrInvalid)
		}
		seen[t] = struct{}{}
	}
	if ev.Topic != "" {
		return fmt.Errorf("topic is only for topic events: %w", ErrInvalid)
	}
	return CheckContent(ev, lim, now)
}

// CheckTemplate checks an event that names no targets yet (a fanout's
// template: the audience supplies them) by the rules of Append: kind,
// business, dimension and device mode (defaults filled from the
// business), no topic, and CheckContent.
func (l *Log) CheckTemplate(ev *oplogpb.Event, now time.Time) error {
	if err := validateKind(ev, l.Business); err != nil {
		return err
	}
	if ev.Topic != "" {
		return fmt.Errorf("topic is only for topic events: %w", ErrInvalid)
	}
	return CheckContent(ev, l.lim, now)
}

// CheckContent checks what every stored event carries whatever its
// audience (inbox entries, topic messages, fanout templates): payload
// size, content type, message id, timestamps (created_at defaults to now;
// an expires_at not after now is ErrExpired) and delivery conditions.
func CheckContent(ev *oplogpb.Event, lim Limits, now time.Time) error {
	lim = lim.withDefaults()
	if len(ev.Payload) > lim.MaxPayload {
		return fmt.Errorf("payload of %d bytes, limit %d: %w", len(ev.Payload), lim.MaxPayload, ErrPayloadTooLarge)
	}
	if len(ev.ContentType) > 128 {
		return fmt.Errorf("content type longer than 128: %w", ErrInvalid)
	}
	if ev.MessageId != "" && !ValidMessageID(ev.MessageId) {
		return fmt.Errorf("message id %q: want 1-%d printable ASCII without spaces: %w", clip(ev.MessageId), MaxMessageIDLen, ErrInvalidID)
	}
	if ev.CollapseKey != "" && !ValidID(ev.CollapseKey) {
		return fmt.Errorf("collapse key %q: want 1-64 of the id alphabet: %w", clip(ev.CollapseKey), ErrInvalidID)
	}
	if ev.CreatedAt == nil {
		ev.CreatedAt = timestamppb.New(now)
	} else if err := ev.CreatedAt.CheckValid(); err != nil {
		return fmt.Errorf("created_at: %v: %w", err, ErrInvalid)
	}
	if ev.ExpiresAt != nil {
		if err := ev.ExpiresAt.CheckValid(); err != nil {
			return fmt.Errorf("expires_at: %v: %w", err, ErrInvalid)
		}
		if !ev.ExpiresAt.AsTime().After(now) {
			return fmt.Errorf("expired at %s: %w", ev.ExpiresAt.AsTime().Format(time.RFC3339), ErrExpired)
		}
	}
	return checkConditions(ev.Conditions)
}

func businessDim(b *oplogpb.Business) oplogpb.Dimension {
	if b.Dimension == oplogpb.Dimension_DIMENSION_DEVICE {
		return oplogpb.Dimension_DIMENSION_DEVICE
	}
	return oplogpb.Dimension_DIMENSION_USER
}

// entryFor returns the entry of ev for one target.
func entryFor(ev *oplogpb.Event, target string) *oplogpb.Entry {
	return &oplogpb.Entry{
		Kind:        ev.Kind,
		Business:    ev.Business,
		Dimension:   ev.Dimension,
		Target:      target,
		Payload:     ev.Payload,
		ContentType: ev.ContentType,
		MessageId:   ev.MessageId,
		CreatedAt:   ev.CreatedAt,
		ExpiresAt:   ev.ExpiresAt,
		Transient:   ev.Transient,
		DeviceMode:  ev.DeviceMode,
		Conditions:  ev.Conditions,
		CollapseKey: ev.CollapseKey,
	}
}
