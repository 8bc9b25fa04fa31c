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

// Record is one stored stream message, as a projection applies it.
type Record struct {
	Seq     uint64    // stream sequence
	Subject string    //
	Data    []byte    // the message body, shared: do not modify it
	TTL     string    // the Nats-TTL header, if any
	Stored  time.Time // when the stream stored it (fed records: when its ack came)
	// Collapse is the Sluice-Collapse header, if any: the entry's collapse key.
	Collapse string
}

// recordOf reads a Record and the consumer's pending count off a message.
func recordOf(m jetstream.Msg) (Record, uint64, error) {
	md, err := m.Metadata()
	if err != nil {
		return Record{}, 0, fmt.Errorf("metadata: %w", err)
	}
	return Record{
		Seq:      md.Sequence.Stream,
		Subject:  m.Subject(),
		Data:     m.Data(),
		TTL:      m.Headers().Get(jetstream.MsgTTLHeader),
		Stored:   md.Timestamp,
		Collapse: m.Headers().Get(HeaderCollapse),
	}, md.NumPending, nil
}

// applyFunc writes the projection of one stream Record into txn.
type applyFunc = func(txn *badger.Txn, r *Record) error

// projector projects one stream into badger, in stream order. It records
// the sequence it has applied under its progress key in the same
// transaction as the data, so a restart resumes exactly where the last
// commit left off. Its goroutine (run) owns all its writes; a reset is a
// request to that goroutine.
//
// Without a local feed it follows its stream through an ordered consumer.
// With one, the writer of this process hands it every message it stored,
// and the projector applies them in sequence order straight from memory,
// saving the second trip of every entry through NATS. The stream stays the
// authority: the projector catches up through an ordered consumer at start,
// after a reset, when a gap in the fed sequences outlasts gapGrace (another
// process wrote, or an ack was lost), and when a reader waits for a
// sequence beyond what the feed has brought. Then it follows the feed
// again.
type projector struct {
	name      string   // stream name, also the projection's name
	prefixes  [][]byte // keys the projection owns, dropped on a rebuild from zero
	transient [][]byte // of prefixes, those left out of the digest (ProjectionConfig.Transient)
	db        *badger.DB
	js        jetstream.JetStream
	apply     applyFunc
	log       zerolog.Logger
	// committed, if set, is called on the projector's goroutine after each
	// commit with the records of that commit (in sequence order; some may
	// have been applied before).
	committed func([]Record)

	applied atomic.Uint64
	resets  chan resetRequest

	// With a sole writer (this process), known is the highest sequence the
	// stream holds as far as this process knows: readers wait for it
	// rather than ask the stream.
	sole  bool
	known atomic.Uint64

	mu     sync.Mutex
	notify chan struct{} // closed and replaced whenever applied advances

	// The local feed; nil when the projection follows its stream only.
	feed    chan []Record
	fed     atomic.Uint64     // highest sequence handed to feed
	want    atomic.Uint64     // highest sequence a reader waits for
	kick    chan struct{}     // a reader raised want
	pending map[uint64]Record // fed records above applied; run's own
}

const (
	// gapGrace is how long a gap in the fed sequences may last before the
	// projector reads it from the stream (concurrent commits can hand over
	// their records out of order).
	gapGrace = 50 * time.Millisecond
	// maxPending bounds the fed records held while catching up; beyond it
	// they are dropped and read from the stream instead.
	maxPending = 1 << 16
)

// withFeed turns on the local feed; call before run.
func (p *projector) withFeed() {
	p.feed = make(chan []Record, 1024)
	p.kick = make(chan struct{}, 1)
	p.pending = make(map[uint64]Record)
}

// offer hands stored records to the projector without ever blocking: if
// its queue is full they are left to the stream.
func (p *projector) offer(recs []Record) {
	if p.feed == nil || len(recs) == 0 {
		return
	}
	select {
	case p.feed <- recs:
		for _, r := range recs {
			for {
				f := p.fed.Load()
				if r.Seq <= f || p.fed.CompareAndSwap(f, r.Seq) {
					break
				}
			}
		}
	default:
	}
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

// soleWriter declares this process the stream's only writer: readers wait
// for what it stored. The stream's last sequence now is the start.
func (p *projector) soleWriter() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	last, err := p.lastSeq(ctx)
	if err != nil {
		return err
	}
	p.sole = true
	p.stored(last)
	return nil
}

// stored records that the stream holds seq.
func (p *projector) stored(seq uint64) {
	for {
		k := p.known.Load()
		if seq <= k || p.known.CompareAndSwap(k, seq) {
			return
		}
	}
}

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
	last := p.known.Load()
	if !p.sole {
		var err error
		if last, err = p.lastSeq(ctx); err != nil {
			return err
		}
	}
	if p.applied.Load() >= last {
		return nil
	}
	if p.feed != nil {
		for {
			w := p.want.Load()
			if last <= w || p.want.CompareAndSwap(w, last) {
				break
			}
		}
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}
	return p.waitFor(ctx, last)
}

// maxBatch is the most messages applied in one transaction.
const maxBatch = 1024

// run projects until ctx ends; a failure is retried with backoff.
func (p *projector) run(ctx context.Context) error {
	retry(ctx, p.log, "projection failed", p.cycle)
	return nil
}

// cycle catches up through the stream, then follows the local feed until a
// gap, a reader or a reset sends it back to the stream.
func (p *projector) cycle(ctx context.Context) error {
	if p.feed == nil {
		return p.consume(ctx, true)
	}
	if err := p.consume(ctx, false); err != nil || ctx.Err() != nil {
		return err
	}
	return p.follow(ctx)
}

// follow applies fed records in sequence order. It returns nil when the
// stream must be read: a gap outlasting gapGrace, a reader waiting beyond
// the feed, or a reset (handled first).
func (p *projector) follow(ctx context.Context) error {
	grace := time.NewTimer(time.Hour)
	grace.Stop()
	defer grace.Stop()
	waiting := false
	for {
		if run := p.consecutive(); len(run) > 0 {
			if err := p.write(run); err != nil {
				return err
			}
			if waiting {
				grace.Stop()
				waiting = false
			}
			continue
		}
		if w := p.want.Load(); w > p.applied.Load() && w > p.fed.Load() {
			return nil
		}
		if len(p.pending) > 0 && !waiting {
			grace.Reset(gapGrace)
			waiting = true
		}
		select {
		case <-ctx.Done():
			return nil
		case r := <-p.resets:
			r.done <- p.reset(r.from)
			return nil
		case recs := <-p.feed:
			p.stash(recs)
		case <-p.kick:
		case <-grace.C:
			p.log.Debug().Uint64("seq", p.applied.Load()+1).Msg("gap in the local feed, reading the stream")
			return nil
		}
	}
}

// stash keeps fed records above the applied sequence.
func (p *projector) stash(recs []Record) {
	applied := p.applied.Load()
	for _, r := range recs {
		if r.Seq > applied {
			p.pending[r.Seq] = r
		}
	}
	if len(p.pending) > maxPending {
		clear(p.pending) // the stream has them all
	}
}

// consecutive takes the fed records that continue the applied sequence.
func (p *projector) consecutive() []Record {
	var run []Record
	for next := p.applied.Load() + 1; len(run) < maxBatch; next++ {
		r, ok := p.pending[next]
		if !ok {
			break
		}
		delete(p.pending, next)
		run = append(run, r)
	}
	return run
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

// consume applies the stream through an ordered consumer from the applied
// sequence. With forever it runs until ctx ends or a reset arrives (handled,
// then it returns nil to restart); otherwise it returns as soon as the
// projection holds what the stream held when it started.
func (p *projector) consume(ctx context.Context, forever bool) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := p.js.Stream(cctx, p.name) // one STREAM.INFO: also the target
	if err != nil {
		return fmt.Errorf("stream: %w", err)
	}
	target := stream.CachedInfo().State.LastSeq
	p.stored(target)
	if !forever && p.applied.Load() >= target {
		return nil
	}
	if err := p.skipDeleted(cctx, stream, target); err != nil {
		return err
	}
	if !forever && p.applied.Load() >= target {
		return nil
	}
	cfg := jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy}
	if start := p.applied.Load() + 1; start > 1 {
		cfg = jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start}
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

	batch := make([]Record, 0, maxBatch)
	for {
		select {
		case <-ctx.Done():
			return nil
		case r := <-p.resets:
			cc.Stop()
			r.done <- p.reset(r.from)
			return nil
		case recs := <-p.feed: // nil without a feed
			p.stash(recs)
		case m := <-msgs:
			batch = batch[:0]
			var pending uint64
			for {
				r, n, err := recordOf(m)
				if err != nil {
					return err
				}
				pending = n
				batch = append(batch, r)
				if len(batch) == maxBatch {
					break
				}
				select {
				case m = <-msgs:
					continue
				default:
				}
				break
			}
			if err := p.write(batch); err != nil {
				return err
			}
			if pending == 0 && p.applied.Load() < target {
				// Nothing follows in the stream: the sequences up to the
				// target that were not delivered no longer exist.
				if err := p.advanceTo(target); err != nil {
					return err
				}
			}
			if !forever && p.applied.Load() >= target {
				return nil
			}
		}
	}
}

// skipDeleted advances the projection over the sequences up to target when
// none of them exists any more: entries that expired (per-message TTL)
// before they were applied. Without it a reader waiting for the stream's
// last sequence would wait for a message that will never come.
func (p *projector) skipDeleted(ctx context.Context, stream jetstream.Stream, target uint64) error {
	from := p.applied.Load() + 1
	if from > target {
		return nil
	}
	_, err := stream.GetMsg(ctx, from, jetstream.WithGetMsgSubject(">"))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		p.log.Debug().Uint64("seq", from).Uint64("target", target).Msg("expired tail skipped")
		return p.advanceTo(target)
	case err != nil:
		return fmt.Errorf("next message from %d: %w", from, err)
	}
	return nil
}

// advanceTo records seq as applied, with no data: every sequence up to it
// was applied or no longer exists.
func (p *projector) advanceTo(seq uint64) error {
	if seq <= p.applied.Load() {
		return nil
	}
	err := p.db.Update(func(txn *badger.Txn) error {
		return txn.Set(p.progressKey(), binary.BigEndian.AppendUint64(nil, seq))
	})
	if err != nil {
		return fmt.Errorf("oplog: advance %s: %w", p.name, err)
	}
	p.advanced(seq)
	return nil
}

// write applies a batch in as few transactions as badger allows, each
// carrying the progress key of its last Record. When a transaction grows
// too big (badger's ErrTxnTooBig) it is dropped, not committed with part
// of a Record in it: the Records it held are applied again in new
// transactions (commitFresh), and the Record that did not fit starts the
// next one. Apply is deterministic, so the result is as if the cuts had
// been made there in the first place.
func (p *projector) write(batch []Record) error {
	start := 0    // first index of batch not yet committed
	var idx []int // indices of the Records applied in the open transaction
	var last uint64
	txn := p.db.NewTransaction(true)
	defer func() { txn.Discard() }()
	for i := range batch {
		r := &batch[i]
		if r.Seq <= p.applied.Load() || r.Seq <= last {
			continue // already applied (a consumer restarted, or fed twice)
		}
		err := p.apply(txn, r)
		if errors.Is(err, badger.ErrTxnTooBig) && len(idx) > 0 {
			txn.Discard()
			if err := p.commitFresh(batch, idx, start, i, len(idx)); err != nil {
				return err
			}
			start, idx = i, idx[:0]
			txn = p.db.NewTransaction(true)
			err = p.apply(txn, r)
		}
		if err != nil {
			return fmt.Errorf("apply %d: %w", r.Seq, err)
		}
		idx = append(idx, i)
		last = r.Seq
	}
	if len(idx) == 0 {
		return nil
	}
	err := txn.Set(p.progressKey(), binary.BigEndian.AppendUint64(nil, last))
	if errors.Is(err, badger.ErrTxnTooBig) {
		// The Records filled the transaction to the last entry: all of
		// them with the progress key do not fit, so start with one less.
		txn.Discard()
		return p.commitFresh(batch, idx, start, len(batch), max(len(idx)-1, 1))
	}
	if err != nil {
		return err
	}
	if err := txn.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	p.committedUpTo(batch[start:], last)
	return nil
}

// commitFresh applies the Records batch[idx...] again in new transactions,
// as many in each as fit with the progress key (trying first, then
// fewer), and commits them; the last commit covers batch[...:end] for the
// commit hook.
func (p *projector) commitFresh(batch []Record, idx []int, start, end, first int) error {
	for len(idx) > 0 {
		n := min(first, len(idx))
		for {
			txn := p.db.NewTransaction(true)
			var err error
			for _, k := range idx[:n] {
				if err = p.apply(txn, &batch[k]); err != nil {
					break
				}
			}
			seq := batch[idx[n-1]].Seq
			if err == nil {
				err = txn.Set(p.progressKey(), binary.BigEndian.AppendUint64(nil, seq))
			}
			if errors.Is(err, badger.ErrTxnTooBig) && n > 1 {
				txn.Discard()
				n--
				continue
			}
			if err != nil {
				txn.Discard()
				return fmt.Errorf("apply %d again: %w", seq, err)
			}
			if err := txn.Commit(); err != nil {
				return fmt.Errorf("commit: %w", err)
			}
			upTo := end
			if n < len(idx) {
				upTo = idx[n]
			}
			p.committedUpTo(batch[start:upTo], seq)
			start, idx = upTo, idx[n:]
			break
		}
	}
	return nil
}

// committedUpTo runs after a commit of recs (some may have been skipped as
// applied before) whose last applied sequence is seq.
func (p *projector) committedUpTo(recs []Record, seq uint64) {
	// Hooks first: whoever waits for this sequence (WaitFor, CatchUp)
	// then finds its live watchers told already. Topics rely on it: an
	// unfollow returns only once the follower's sessions know.
	if p.committed != nil {
		p.committed(recs)
	}
	p.advanced(seq)
}

// reset runs on the projector's goroutine with no consumer running.
func (p *projector) reset(from uint64) error {
	clear(p.pending)
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
