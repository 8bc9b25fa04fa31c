package oplog

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// applyFunc writes the projection of one stream message into txn.
type applyFunc func(txn *badger.Txn, seq uint64, m jetstream.Msg) error

// projector projects one stream into badger, in stream order. It records
// the sequence it has applied under its progress key in the same
// transaction as the data, so a restart resumes exactly where the last
// commit left off. Its goroutine (run) owns all its writes; a reset is a
// request to that goroutine.
type projector struct {
	name     string   // stream name, also the projection's name
	prefixes [][]byte // keys the projection owns, dropped on a rebuild from zero
	db       *badger.DB
	js       jetstream.JetStream
	apply    applyFunc
	log      zerolog.Logger

	applied atomic.Uint64
	resets  chan resetRequest

	mu     sync.Mutex
	notify chan struct{} // closed and replaced whenever applied advances
}

type resetRequest struct {
	from uint64 // replay from this sequence; 0 or 1 drops the data first
	done chan error
}

func newProjector(name string, prefixes [][]byte, db *badger.DB, js jetstream.JetStream, apply applyFunc, log zerolog.Logger) (*projector, error) {
	p := &projector{
		name: name, prefixes: prefixes, db: db, js: js, apply: apply,
		log:    log.With().Str("projection", name).Logger(),
		resets: make(chan resetRequest),
		notify: make(chan struct{}),
	}
	seq, err := p.loadApplied()
	if err != nil {
		return nil, err
	}
	p.applied.Store(seq)
	return p, nil
}

func (p *projector) progressKey() []byte { return []byte("a/" + p.name) }

func (p *projector) loadApplied() (uint64, error) {
	var seq uint64
	err := p.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(p.progressKey())
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error {
			if len(v) >= 8 {
				seq = binary.BigEndian.Uint64(v)
			}
			return nil
		})
	})
	if err != nil {
		return 0, fmt.Errorf("oplog: read progress of %s: %w", p.name, err)
	}
	return seq, nil
}

// wait returns a channel closed at the next advance.
func (p *projector) wait() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.notify
}

func (p *projector) advanced(seq uint64) {
	p.applied.Store(seq)
	p.mu.Lock()
	close(p.notify)
	p.notify = make(chan struct{})
	p.mu.Unlock()
}

// waitFor blocks until the projection has applied seq.
func (p *projector) waitFor(ctx context.Context, seq uint64) error {
	for {
		ch := p.wait()
		if p.applied.Load() >= seq {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("oplog: waiting for %s to apply %d (at %d): %w", p.name, seq, p.applied.Load(), ctx.Err())
		}
	}
}

// lastSeq returns the stream's last sequence now.
func (p *projector) lastSeq(ctx context.Context) (uint64, error) {
	s, err := p.js.Stream(ctx, p.name)
	if err != nil {
		return 0, fmt.Errorf("oplog: stream %s: %w", p.name, err)
	}
	return s.CachedInfo().State.LastSeq, nil
}

// catchUp blocks until the projection has applied everything the stream
// held when it was called.
func (p *projector) catchUp(ctx context.Context) error {
	last, err := p.lastSeq(ctx)
	if err != nil {
		return err
	}
	return p.waitFor(ctx, last)
}

// maxBatch is the most messages applied in one transaction.
const maxBatch = 1024

// run projects until ctx ends; a failed consumer is restarted with backoff.
func (p *projector) run(ctx context.Context) error {
	retry(ctx, p.log, "projection consumer failed", p.consume)
	return nil
}

// retry runs fn until ctx ends. A failure is logged with msg and fn runs
// again after an exponential backoff (100ms to 5s); a clean return runs it
// again at once and resets the backoff.
func retry(ctx context.Context, log zerolog.Logger, msg string, fn func(context.Context) error) {
	const first, last = 100 * time.Millisecond, 5 * time.Second
	backoff := first
	for ctx.Err() == nil {
		err := fn(ctx)
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			backoff = first
			continue
		}
		log.Error().Err(err).Dur("retry_in", backoff).Msg(msg)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return
		}
		backoff = min(2*backoff, last)
	}
}

// consume runs one ordered consumer from the applied sequence until ctx
// ends, a reset arrives (handled, then returns nil to restart) or it fails.
func (p *projector) consume(ctx context.Context) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cfg := jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy}
	if start := p.applied.Load() + 1; start > 1 {
		cfg = jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start}
	}
	stream, err := p.js.Stream(cctx, p.name)
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	cons, err := stream.OrderedConsumer(cctx, cfg)
	if err != nil {
		return fmt.Errorf("consumer: %w", err)
	}
	msgs := make(chan jetstream.Msg, maxBatch)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		select {
		case msgs <- m:
		case <-cctx.Done():
		}
	}, jetstream.PullMaxMessages(maxBatch))
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	defer cc.Stop()

	batch := make([]jetstream.Msg, 0, maxBatch)
	for {
		select {
		case <-ctx.Done():
			return nil
		case r := <-p.resets:
			cc.Stop()
			r.done <- p.reset(r.from)
			return nil
		case m := <-msgs:
			batch = append(batch[:0], m)
		drain:
			for len(batch) < maxBatch {
				select {
				case m := <-msgs:
					batch = append(batch, m)
				default:
					break drain
				}
			}
			if err := p.write(batch); err != nil {
				return err
			}
		}
	}
}

// write applies a batch in as few transactions as badger allows, each
// carrying the progress key of its last message.
func (p *projector) write(batch []jetstream.Msg) error {
	txn := p.db.NewTransaction(true)
	defer func() { txn.Discard() }()
	var last uint64
	commit := func() error {
		if err := txn.Set(p.progressKey(), binary.BigEndian.AppendUint64(nil, last)); err != nil {
			return err
		}
		if err := txn.Commit(); err != nil {
			return fmt.Errorf("commit: %w", err)
		}
		p.advanced(last)
		txn = p.db.NewTransaction(true)
		return nil
	}
	for _, m := range batch {
		md, err := m.Metadata()
		if err != nil {
			return fmt.Errorf("metadata: %w", err)
		}
		seq := md.Sequence.Stream
		if seq <= p.applied.Load() || seq <= last {
			continue // redelivered after a consumer reset
		}
		err = p.apply(txn, seq, m)
		if errors.Is(err, badger.ErrTxnTooBig) {
			if err := commit(); err != nil {
				return err
			}
			err = p.apply(txn, seq, m)
		}
		if err != nil {
			return fmt.Errorf("apply %d: %w", seq, err)
		}
		last = seq
	}
	if last == 0 {
		return nil
	}
	return commit()
}

// reset runs on the projector's goroutine with no consumer running.
func (p *projector) reset(from uint64) error {
	if from <= 1 {
		if err := p.db.DropPrefix(append(p.prefixes, p.progressKey())...); err != nil {
			return fmt.Errorf("oplog: drop %s: %w", p.name, err)
		}
		p.applied.Store(0)
		p.log.Info().Msg("projection dropped, replaying from the start")
		return nil
	}
	err := p.db.Update(func(txn *badger.Txn) error {
		return txn.Set(p.progressKey(), binary.BigEndian.AppendUint64(nil, from-1))
	})
	if err != nil {
		return fmt.Errorf("oplog: reset %s: %w", p.name, err)
	}
	p.applied.Store(from - 1)
	p.log.Info().Uint64("seq", from).Msg("projection replaying from a point")
	return nil
}

// requestReset asks the running projector to reset, and waits.
func (p *projector) requestReset(ctx context.Context, from uint64) error {
	r := resetRequest{from: from, done: make(chan error, 1)}
	select {
	case p.resets <- r:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}
