package oplog

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"
)

// ControlModel is a projection of some subjects of the control stream
// (StreamControl) held in memory: bucket settings, releases, switches.
//
// Apply is fed every event on the followed subjects in stream order, by one
// goroutine at a time, each sequence once. It must be deterministic and do
// no I/O, so that replaying the stream from the start builds the same
// model. An event it cannot apply is skipped with an error (it still
// counts as applied). Snapshot returns an immutable view of the model for
// lock-free readers; it is called after each batch of events.
type ControlModel[S any] interface {
	Apply(seq uint64, subject string, data []byte) (changed bool, err error)
	Snapshot() S
}

// ControlConfig configures a Control.
type ControlConfig struct {
	// Log is the oplog: its JetStream context and control stream. Required.
	Log *Log
	// Name names the projection in logs and errors ("buckets"). Required.
	Name string
	// Filters are the control subjects followed, e.g.
	// SubjectControl("bucket")+".>". Required.
	Filters []string
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Control keeps a ControlModel current: OpenControl replays the followed
// subjects of the control stream from the start, Run follows them, and
// Write stores an event and returns once the model has applied it. Readers
// load the latest snapshot without a lock.
//
// Control is safe for concurrent use.
type Control[S any] struct {
	cfg ControlConfig
	js  jetstream.JetStream
	lg  zerolog.Logger

	// reader is held by the one goroutine that reads the stream into the
	// model: Run for its whole life, or a catch-up (OpenControl, or a writer
	// waiting for its own event while Run is not running). Two readers at
	// once could each skip an event the other applied out of turn.
	reader  sync.Mutex
	model   ControlModel[S] // owned by the holder of reader
	applied uint64          // owned by the holder of reader

	view   atomic.Pointer[controlView[S]]
	closed atomic.Bool
}

// controlView is a published snapshot; next is closed when a newer one
// replaces it.
type controlView[S any] struct {
	s       S
	applied uint64
	next    chan struct{}
}

// OpenControl replays the followed subjects of the control stream from the
// start with an ordered consumer until it has applied every event stored,
// so that Snapshot answers with the current state from the first call.
// Run keeps it current.
func OpenControl[S any](ctx context.Context, cfg ControlConfig, model ControlModel[S]) (*Control[S], error) {
	if cfg.Log == nil || cfg.Name == "" || len(cfg.Filters) == 0 || model == nil {
		return nil, errors.New("oplog: ControlConfig needs Log, Name and Filters, and a model")
	}
	c := &Control[S]{cfg: cfg, js: cfg.Log.JetStream(), lg: zerolog.Nop(), model: model}
	if cfg.Logger != nil {
		c.lg = cfg.Logger.With().Str("component", cfg.Name).Logger()
	}
	c.view.Store(&controlView[S]{s: model.Snapshot(), next: make(chan struct{})})
	c.reader.Lock()
	err := c.follow(ctx, false)
	c.unlockReader()
	if err != nil {
		return nil, err
	}
	c.lg.Debug().Uint64("seq", c.Applied()).Msg("control state loaded")
	return c, nil
}

// WrongLastSequence reports whether a publish was refused because an
// expected last sequence (of the stream or of the subject) did not hold:
// someone else wrote first.
func WrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// Run follows the control stream, applying each event as it is stored,
// until ctx ends; then it returns nil. Transient NATS or JetStream failures
// are logged and retried.
func (c *Control[S]) Run(ctx context.Context) error {
	c.reader.Lock()
	defer c.unlockReader()
	if c.closed.Load() {
		return nil
	}
	retry(ctx, c.lg, "following the control stream failed", func(ctx context.Context) error { return c.follow(ctx, true) })
	return nil
}

// Close marks the Control closed: a Run that has not started yet returns at
// once (a running one stops when its ctx ends). Reads keep answering with
// the last state. Idempotent.
func (c *Control[S]) Close() error {
	c.closed.Store(true)
	return nil
}

// Snapshot returns the latest snapshot.
func (c *Control[S]) Snapshot() S { return c.view.Load().s }

// Applied returns the stream sequence of the last control event applied
// (0 before any).
func (c *Control[S]) Applied() uint64 { return c.view.Load().applied }

// Changed returns a channel closed when a snapshot newer than the current
// one is published.
func (c *Control[S]) Changed() <-chan struct{} { return c.view.Load().next }

// follow reads the events after the last applied one into the model,
// publishing a snapshot after each batch. With forever it returns only when
// ctx ends or on an error; otherwise it returns once every event the stream
// held when it started has been applied. The caller holds c.reader.
func (c *Control[S]) follow(ctx context.Context, forever bool) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.js.Stream(cctx, StreamControl)
	if err != nil {
		return fmt.Errorf("%s: stream %s: %w", c.cfg.Name, StreamControl, err)
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: c.cfg.Filters, DeliverPolicy: jetstream.DeliverAllPolicy}
	if start := c.applied + 1; start > 1 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, start
	}
	cons, err := stream.OrderedConsumer(cctx, cfg)
	if err != nil {
		return fmt.Errorf("%s: consumer: %w", c.cfg.Name, err)
	}
	const maxBatch = 256
	msgs := make(chan jetstream.Msg, maxBatch)
	sampled := c.lg.Sample(&zerolog.BurstSampler{Burst: 1, Period: 10 * time.Second})
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		select {
		case msgs <- msg:
		case <-cctx.Done():
		}
	}, jetstream.PullMaxMessages(maxBatch), jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		sampled.Warn().Err(err).Msg("control stream consumer")
	}))
	if err != nil {
		return fmt.Errorf("%s: consume: %w", c.cfg.Name, err)
	}
	defer func() {
		cc.Stop()
		// Ordered consumers outlive Stop until their inactivity threshold
		// (5 minutes); catch-ups are frequent enough to clean up after.
		if info := cons.CachedInfo(); info != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = c.js.DeleteConsumer(dctx, StreamControl, info.Name)
			cancel()
		}
	}()
	// The consumer was created with Consume: its info counts the events
	// stored then and not yet applied.
	if info := cons.CachedInfo(); !forever && info != nil && info.NumPending == 0 {
		return nil
	}
	for {
		var msg jetstream.Msg
		select {
		case <-ctx.Done():
			if forever {
				return nil
			}
			return fmt.Errorf("%s: reading the control stream: %w", c.cfg.Name, ctx.Err())
		case msg = <-msgs:
		}
		var pending uint64
		changed := false
		for n := 1; ; n++ {
			md, err := msg.Metadata()
			if err != nil {
				return fmt.Errorf("%s: message metadata: %w", c.cfg.Name, err)
			}
			pending = md.NumPending
			if seq := md.Sequence.Stream; seq > c.applied {
				c.applied = seq
				ch, err := c.model.Apply(seq, msg.Subject(), msg.Data())
				if err != nil {
					c.lg.Warn().Err(err).Uint64("seq", seq).Str("subject", msg.Subject()).Msg("control event skipped")
				}
				changed = changed || ch
			}
			if n == maxBatch {
				break
			}
			select {
			case msg = <-msgs:
				continue
			default:
			}
			break
		}
		c.publish(&controlView[S]{s: c.model.Snapshot(), applied: c.applied, next: make(chan struct{})})
		if changed {
			c.lg.Debug().Uint64("seq", c.applied).Msg("control state changed")
		}
		if !forever && pending == 0 {
			return nil
		}
	}
}

// publish makes v the current view and wakes the waiters of the old one.
func (c *Control[S]) publish(v *controlView[S]) {
	if old := c.view.Swap(v); old != nil {
		close(old.next)
	}
}

// unlockReader releases c.reader and wakes every waiter, so that one of
// them takes over reading if its event is not applied yet.
func (c *Control[S]) unlockReader() {
	c.reader.Unlock()
	old := c.view.Load()
	cp := *old
	cp.next = make(chan struct{})
	// If another reader published in between, it woke everyone already.
	if c.view.CompareAndSwap(old, &cp) {
		close(old.next)
	}
}

// WaitApplied returns the first snapshot that has applied seq. If nobody
// reads the stream (Run is not running), it catches up itself.
func (c *Control[S]) WaitApplied(ctx context.Context, seq uint64) (S, error) {
	for {
		v := c.view.Load()
		if v.applied >= seq {
			return v.s, nil
		}
		if c.reader.TryLock() {
			err := c.follow(ctx, false)
			c.unlockReader()
			if err != nil {
				var zero S
				return zero, err
			}
			continue
		}
		select {
		case <-v.next:
		case <-ctx.Done():
			var zero S
			return zero, fmt.Errorf("%s: waiting for control event %d: %w", c.cfg.Name, seq, ctx.Err())
		}
	}
}

// Write stores a control event with JetStream (the ack means it is stored)
// and waits until the model has applied it. It returns the event's
// sequence and the first snapshot that includes it. A failed publish is
// ErrUnavailable; one refused because an expectation in opts (e.g.
// jetstream.WithExpectLastSequencePerSubject) did not hold is ErrConflict.
func (c *Control[S]) Write(ctx context.Context, subject string, ev proto.Message, opts ...jetstream.PublishOpt) (uint64, S, error) {
	var zero S
	data, err := proto.Marshal(ev)
	if err != nil {
		return 0, zero, fmt.Errorf("%s: marshal: %w", c.cfg.Name, err)
	}
	ack, err := c.js.Publish(ctx, subject, data, opts...)
	if WrongLastSequence(err) {
		return 0, zero, fmt.Errorf("%s: %s changed meanwhile: %w", c.cfg.Name, subject, ErrConflict)
	}
	if err != nil {
		return 0, zero, fmt.Errorf("%s: publish %s: %v: %w", c.cfg.Name, subject, err, ErrUnavailable)
	}
	if ack.Stream != StreamControl {
		return 0, zero, fmt.Errorf("%s: %s stored in stream %s, not %s", c.cfg.Name, subject, ack.Stream, StreamControl)
	}
	s, err := c.WaitApplied(ctx, ack.Sequence)
	return ack.Sequence, s, err
}
