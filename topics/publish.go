package topics

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// Publish stores a topic message once, whatever the topic's follower
// count, and returns its id (the topic stream sequence) and epoch, with
// Target set to the topic. The event names the topic (ev.Topic) and no
// targets; its kind is KIND_TOPIC_MESSAGE (set when unspecified). The
// business is optional; if set it must be registered: it tells the app
// which component handles the message. A message id makes the publish
// idempotent within the duplicate window: a retry gets the original id
// with Duplicate set. Publishing to Everyone reaches every device.
//
// Refusals write nothing: an unknown or deleted topic is
// oplog.ErrUnknownTopic; a bad topic, business or message id
// oplog.ErrInvalidID; an unregistered business oplog.ErrUnknownBusiness;
// a payload over Limits().MaxPayload oplog.ErrPayloadTooLarge; a validity
// already over oplog.ErrExpired; targets, a dimension, single-device
// mode, transient or bad conditions oplog.ErrInvalid; another kind
// oplog.ErrUnknownKind.
func (s *Topics) Publish(ctx context.Context, ev *oplogpb.Event) (*oplogpb.Appended, error) {
	now := time.Now()
	if err := s.validate(ev, now); err != nil {
		return nil, err
	}
	if _, _, err := s.definition(ctx, ev.Topic); err != nil {
		return nil, err
	}
	data, err := proto.Marshal(&oplogpb.Entry{
		Kind:        ev.Kind,
		Business:    ev.Business,
		Topic:       ev.Topic,
		Payload:     ev.Payload,
		ContentType: ev.ContentType,
		MessageId:   ev.MessageId,
		CreatedAt:   ev.CreatedAt,
		ExpiresAt:   ev.ExpiresAt,
		Conditions:  ev.Conditions,
	})
	if err != nil {
		return nil, fmt.Errorf("topics: marshal entry: %w", err)
	}
	m := nats.NewMsg(SubjectTopic(ev.Topic))
	m.Data = data
	if ev.MessageId != "" {
		m.Header.Set(jetstream.MsgIDHeader, ev.MessageId+"/"+ev.Topic)
	}
	if ev.ExpiresAt != nil {
		// Nats-TTL counts whole seconds; round up so storage never drops a
		// message before its validity ends. Reads also skip expired ones.
		ttl := ev.ExpiresAt.AsTime().Sub(now)
		ttl = max((ttl + time.Second - 1).Truncate(time.Second), time.Second)
		m.Header.Set(jetstream.MsgTTLHeader, ttl.String())
	}
	ack, err := s.js.PublishMsg(ctx, m)
	if err != nil {
		return nil, fmt.Errorf("topics: publish to %s: %v: %w", ev.Topic, err, oplog.ErrUnavailable)
	}
	if !ack.Duplicate {
		s.stored(m.Subject, ack.Sequence)
	}
	return &oplogpb.Appended{Target: ev.Topic, Id: ack.Sequence, Epoch: s.epoch, Duplicate: ack.Duplicate}, nil
}

// validate checks a topic message event and fills its defaults (kind,
// created_at). It does not look at the topic's existence.
func (s *Topics) validate(ev *oplogpb.Event, now time.Time) error {
	if ev == nil {
		return fmt.Errorf("nil event: %w", oplog.ErrMalformed)
	}
	switch ev.Kind {
	case oplogpb.Kind_KIND_UNSPECIFIED:
		ev.Kind = oplogpb.Kind_KIND_TOPIC_MESSAGE
	case oplogpb.Kind_KIND_TOPIC_MESSAGE, oplogpb.Kind_KIND_SYNC, oplogpb.Kind_KIND_PUSH,
		oplogpb.Kind_KIND_RELEASE, oplogpb.Kind_KIND_SWITCH, oplogpb.Kind_KIND_COMMAND:
		// A push, release or switch to every follower (or to Everyone)
		// keeps its kind: the topic says how it is stored, the kind what
		// it is.
	default:
		return fmt.Errorf("kind %s: not a kind a topic carries: %w", ev.Kind, oplog.ErrUnknownKind)
	}
	if err := checkID("topic", ev.Topic); err != nil {
		return err
	}
	if len(ev.Targets) > 0 {
		return fmt.Errorf("a topic message names no targets: %w", oplog.ErrInvalid)
	}
	if ev.Business != "" {
		if !oplog.ValidBusiness(ev.Business) {
			return fmt.Errorf("business %q: want 1-%d of [a-z0-9_-]: %w", clip(ev.Business), oplog.MaxBusinessLen, oplog.ErrInvalidID)
		}
		if _, ok := s.lg.Business(ev.Business); !ok {
			return fmt.Errorf("business %q: %w", ev.Business, oplog.ErrUnknownBusiness)
		}
	}
	if ev.Dimension != oplogpb.Dimension_DIMENSION_UNSPECIFIED {
		return fmt.Errorf("a topic message has no dimension: %w", oplog.ErrInvalid)
	}
	if ev.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_SINGLE {
		return fmt.Errorf("a topic message has no single-device mode: %w", oplog.ErrInvalid)
	}
	if ev.Transient {
		return fmt.Errorf("transient topic messages are not supported: %w", oplog.ErrInvalid)
	}
	return oplog.CheckContent(ev, s.lg.Limits(), now)
}
