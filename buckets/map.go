package buckets

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// Config configures a Map. A zero field takes the default in its comment.
type Config struct {
	// Log is the oplog: its JetStream context, its control stream (created
	// by oplog.Open) and its business registry. Required.
	Log *oplog.Log
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Map is the bucket state of this node: the bucket settings and the
// business→bucket map, a projection of the bucket events of the control
// stream held in memory. Open replays the stream; Run follows it. Define,
// Remove and Assign write events and return once this Map has applied them.
//
// Map is safe for concurrent use. Reads (Plan, BucketOf, Buckets, ...) load
// an immutable snapshot and take no lock.
type Map struct {
	log *oplog.Log
	js  jetstream.JetStream
	lg  zerolog.Logger

	// reader is held by the one goroutine that reads the stream into
	// model: Run for its whole life, or a catch-up (Open, or a writer
	// waiting for its own event while Run is not running). Two readers at
	// once could each skip an event the other applied out of turn.
	reader sync.Mutex
	model  *model // owned by the holder of reader

	snap   atomic.Pointer[snapshot]
	closed atomic.Bool
}

// Open replays the bucket events of the control stream from the start
// with an ordered consumer until it has applied every one stored, so the
// Map answers with the current state from the first call. Run keeps it
// current.
func Open(ctx context.Context, cfg Config) (*Map, error) {
	if cfg.Log == nil {
		return nil, errors.New("buckets: Config.Log is required")
	}
	m := &Map{log: cfg.Log, js: cfg.Log.JetStream(), lg: zerolog.Nop(), model: newModel()}
	if cfg.Logger != nil {
		m.lg = cfg.Logger.With().Str("component", "buckets").Logger()
	}
	m.snap.Store(m.model.snapshot())
	m.reader.Lock()
	err := m.follow(ctx, false)
	m.unlockReader()
	if err != nil {
		return nil, err
	}
	m.lg.Debug().Uint64("seq", m.Applied()).Int("buckets", len(m.Buckets())).Msg("bucket map loaded")
	return m, nil
}

// Run follows the control stream, applying each bucket event as it is
// stored, until ctx ends; then it returns nil. Transient NATS or JetStream
// failures are logged and retried.
func (m *Map) Run(ctx context.Context) error {
	m.reader.Lock()
	defer m.unlockReader()
	backoff := 100 * time.Millisecond
	for !m.closed.Load() {
		err := m.follow(ctx, true)
		if ctx.Err() != nil {
			return nil
		}
		m.lg.Error().Err(err).Dur("retry_in", backoff).Msg("following the control stream failed")
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return nil
		}
		backoff = min(2*backoff, 10*time.Second)
	}
	return nil
}

// Close marks the Map closed: a Run that has not started yet returns at
// once (a running one stops when its ctx ends). Reads keep answering with
// the last state. Idempotent.
func (m *Map) Close() error {
	m.closed.Store(true)
	return nil
}

// follow reads the bucket events after the last applied one into the
// model, publishing a snapshot after each batch. With forever it returns
// only when ctx ends or on an error; otherwise it returns once every event
// the stream held when it started has been applied. The caller holds
// m.reader.
func (m *Map) follow(ctx context.Context, forever bool) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := m.js.Stream(cctx, oplog.StreamControl)
	if err != nil {
		return fmt.Errorf("buckets: stream %s: %w", oplog.StreamControl, err)
	}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: filters, DeliverPolicy: jetstream.DeliverAllPolicy}
	if start := m.model.applied + 1; start > 1 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, start
	}
	cons, err := stream.OrderedConsumer(cctx, cfg)
	if err != nil {
		return fmt.Errorf("buckets: consumer: %w", err)
	}
	const maxBatch = 256
	msgs := make(chan jetstream.Msg, maxBatch)
	sampled := m.lg.Sample(&zerolog.BurstSampler{Burst: 1, Period: 10 * time.Second})
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		select {
		case msgs <- msg:
		case <-cctx.Done():
		}
	}, jetstream.PullMaxMessages(maxBatch), jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
		sampled.Warn().Err(err).Msg("control stream consumer")
	}))
	if err != nil {
		return fmt.Errorf("buckets: consume: %w", err)
	}
	defer func() {
		cc.Stop()
		// Ordered consumers outlive Stop until their inactivity threshold
		// (5 minutes); catch-ups are frequent enough to clean up after.
		if info := cons.CachedInfo(); info != nil {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			_ = m.js.DeleteConsumer(dctx, oplog.StreamControl, info.Name)
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
			return fmt.Errorf("buckets: reading the control stream: %w", ctx.Err())
		case msg = <-msgs:
		}
		var pending uint64
		changed := false
		for n := 1; ; n++ {
			md, err := msg.Metadata()
			if err != nil {
				return fmt.Errorf("buckets: message metadata: %w", err)
			}
			pending = md.NumPending
			c, err := m.model.apply(md.Sequence.Stream, msg.Subject(), msg.Data())
			if err != nil {
				m.lg.Warn().Err(err).Uint64("seq", md.Sequence.Stream).Str("subject", msg.Subject()).Msg("bucket event skipped")
			}
			changed = changed || c
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
		m.publish(m.model.snapshot())
		if changed {
			m.lg.Debug().Uint64("seq", m.model.applied).Uint64("version", m.model.version).Msg("bucket map changed")
		}
		if !forever && pending == 0 {
			return nil
		}
	}
}

// publish makes s the current snapshot and wakes the waiters of the old one.
func (m *Map) publish(s *snapshot) {
	if old := m.snap.Swap(s); old != nil {
		close(old.next)
	}
}

// unlockReader releases m.reader and wakes every waiter, so that one of
// them takes over reading if its event is not applied yet.
func (m *Map) unlockReader() {
	m.reader.Unlock()
	old := m.snap.Load()
	cp := *old
	cp.next = make(chan struct{})
	// If another reader published in between, it woke everyone already.
	if m.snap.CompareAndSwap(old, &cp) {
		close(old.next)
	}
}

// waitApplied returns the first snapshot that has applied seq. If nobody
// reads the stream (Run is not running), it catches up itself.
func (m *Map) waitApplied(ctx context.Context, seq uint64) (*snapshot, error) {
	for {
		s := m.snap.Load()
		if s.applied >= seq {
			return s, nil
		}
		if m.reader.TryLock() {
			err := m.follow(ctx, false)
			m.unlockReader()
			if err != nil {
				return nil, err
			}
			continue
		}
		select {
		case <-s.next:
		case <-ctx.Done():
			return nil, fmt.Errorf("buckets: waiting for control event %d: %w", seq, ctx.Err())
		}
	}
}

// write publishes a control event with JetStream (the ack means it is
// stored) and waits until this Map has applied it.
func (m *Map) write(ctx context.Context, subject string, ev proto.Message) (uint64, *snapshot, error) {
	data, err := proto.Marshal(ev)
	if err != nil {
		return 0, nil, fmt.Errorf("buckets: marshal: %w", err)
	}
	ack, err := m.js.Publish(ctx, subject, data)
	if err != nil {
		return 0, nil, fmt.Errorf("buckets: publish %s: %v: %w", subject, err, oplog.ErrUnavailable)
	}
	if ack.Stream != oplog.StreamControl {
		return 0, nil, fmt.Errorf("buckets: %s stored in stream %s, not %s", subject, ack.Stream, oplog.StreamControl)
	}
	s, err := m.waitApplied(ctx, ack.Sequence)
	return ack.Sequence, s, err
}

// Define creates a bucket or replaces its settings (a default bucket's
// too). It returns once the definition is stored and applied here: the next
// Plan on this node uses it; other nodes' Maps apply it as their Run reads
// it, within milliseconds.
//
// Errors: oplog.ErrInvalidID for a bad name; oplog.ErrInvalid for a
// priority outside 0–9, a negative or non-finite rate, a negative burst,
// a description over MaxDescriptionLen, or Removed set (use Remove).
// Nothing is written when the definition is refused.
func (m *Map) Define(ctx context.Context, b *bucketspb.Bucket) error {
	if b == nil {
		return fmt.Errorf("buckets: nil bucket: %w", oplog.ErrInvalid)
	}
	if b.Removed {
		return fmt.Errorf("buckets: bucket %s: a definition cannot remove, use Remove: %w", clip(b.Name), oplog.ErrInvalid)
	}
	if err := checkDefinition(b); err != nil {
		return err
	}
	_, _, err := m.write(ctx, oplog.SubjectControl("bucket", b.Name), b)
	return err
}

// Remove removes a custom bucket. Its businesses go back to the default
// rule from the next Plan; they stay there if a bucket of that name is
// defined again. It returns once the removal is applied here.
//
// Errors: oplog.ErrInvalidID for a bad name, oplog.ErrInvalid for a
// default bucket (define it again to change its settings), oplog.ErrNotFound
// for a bucket that does not exist. Nothing is written when it is refused.
func (m *Map) Remove(ctx context.Context, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	if IsDefault(name) {
		return fmt.Errorf("buckets: bucket %s is a default bucket and cannot be removed: %w", name, oplog.ErrInvalid)
	}
	if _, ok := m.snap.Load().pos[name]; !ok {
		return fmt.Errorf("buckets: bucket %s: %w", name, oplog.ErrNotFound)
	}
	_, _, err := m.write(ctx, oplog.SubjectControl("bucket", name), &bucketspb.Bucket{Name: name, Removed: true})
	return err
}

// Assign moves a registered business into a bucket; bucket "" puts it back
// under the default rule. It returns once the move is applied here: the
// next Plan on this node uses it.
//
// Errors: oplog.ErrInvalidID for a bad business code or bucket name,
// oplog.ErrUnknownBusiness for a business not in the registry,
// oplog.ErrNotFound for a bucket that does not exist (also when a
// concurrent Remove wins the race: the stored assignment then has no
// effect). Nothing is written when it is refused.
func (m *Map) Assign(ctx context.Context, business, bucket string) error {
	if !oplog.ValidBusiness(business) {
		return fmt.Errorf("buckets: business %q: want 1-%d of [a-z0-9_-]: %w", clip(business), oplog.MaxBusinessLen, oplog.ErrInvalidID)
	}
	if bucket != "" {
		if err := checkName(bucket); err != nil {
			return err
		}
	}
	if _, ok := m.log.Business(business); !ok {
		return fmt.Errorf("buckets: business %s: %w", business, oplog.ErrUnknownBusiness)
	}
	if _, ok := m.snap.Load().pos[bucket]; bucket != "" && !ok {
		return fmt.Errorf("buckets: bucket %s: %w", bucket, oplog.ErrNotFound)
	}
	seq, s, err := m.write(ctx, oplog.SubjectControl("assign", business), &bucketspb.Assignment{Business: business, Bucket: bucket})
	if err != nil {
		return err
	}
	if s.wasRejected(seq) {
		return fmt.Errorf("buckets: bucket %s was removed before the assignment of %s: %w", bucket, business, oplog.ErrNotFound)
	}
	return nil
}

// Plan groups businesses by bucket for one computation: one Group per
// non-empty bucket, by priority (0 first) then name, each with the
// bucket's settings and its businesses in the order given. Nil entries are
// skipped. The gateway adds the topic read to the Global bucket itself,
// whether or not Plan returns a group for it.
//
// Plan takes no lock and allocates two slices whatever the number of
// businesses: about 2µs for 80 businesses (BenchmarkPlan_80Businesses).
// The groups' business lists share one array; do not append to them.
func (m *Map) Plan(businesses []*oplogpb.Business) []Group {
	return m.snap.Load().plan(businesses)
}

// BucketOf returns the name of a business's bucket: its assignment, or the
// default rule (DefaultRule).
func (m *Map) BucketOf(b *oplogpb.Business) string {
	s := m.snap.Load()
	return s.order[s.index(b)].Name
}

// Bucket returns the current settings of a bucket.
func (m *Map) Bucket(name string) (Bucket, bool) {
	s := m.snap.Load()
	i, ok := s.pos[name]
	if !ok {
		return Bucket{}, false
	}
	return s.order[i], true
}

// Buckets returns every bucket, by priority then name.
func (m *Map) Buckets() []Bucket {
	return append([]Bucket(nil), m.snap.Load().order...)
}

// Assignments returns the explicit assignments, business → bucket.
// Businesses not in it follow the default rule.
func (m *Map) Assignments() map[string]string {
	return maps.Clone(m.snap.Load().names)
}

// Applied returns the stream sequence of the last control event this Map
// has applied (0 before any).
func (m *Map) Applied() uint64 { return m.snap.Load().applied }

// Version returns a counter that changes whenever the buckets or the
// business→bucket map change, for callers that cache what they derive
// from them. It counts the changes made by the events applied, so two Maps
// that have applied the same sequence have the same version.
func (m *Map) Version() uint64 { return m.snap.Load().version }
