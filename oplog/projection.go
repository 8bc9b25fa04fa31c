package oplog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// Projections of other streams.
//
// The inbox is one projection; topics, segments and other indexes are
// more, built the same way: a Projection applies one stream to badger in
// stream order, writes the sequence it has applied in the same transaction
// as the data, resumes from it after a crash, and can be dropped and
// rebuilt by replay with the same result (Digest proves it).

// ProjectionConfig configures a Projection. A zero field takes the default.
type ProjectionConfig struct {
	// Stream is the stream projected. Required.
	Stream string
	// DB is the badger store the projection writes to; several projections
	// may share one (their key prefixes must not overlap). Required.
	DB *badger.DB
	// JetStream reads the stream. Required.
	JetStream jetstream.JetStream
	// Prefixes are the keys the projection owns: a rebuild from zero drops
	// them. Its progress is kept under "a/<Stream>".
	Prefixes [][]byte
	// Transient are prefixes among Prefixes whose keys expire by the wall
	// clock (a TTL counted from when they were written): a live
	// projection and a rebuild hold different ones, so Digest leaves them
	// out. Apply must give the same results whichever of them exist.
	Transient [][]byte
	// Apply writes the projection of one record into txn. It runs on the
	// projection's goroutine only. An error stops the batch, which is
	// retried; a record that can never apply should be logged and skipped
	// (return nil), or the projection stalls.
	Apply func(txn *badger.Txn, r *Record) error
	// Committed, if set, is called on the projection's goroutine after each
	// commit with the records of that commit, in sequence order, before
	// Applied moves past them (so WaitFor and CatchUp return after it); a
	// record may be passed again after a rebuild or a restart of the
	// consumer. It must not block, nor wait for its own projection: live
	// delivery hangs off it.
	Committed func([]Record)
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Projection is a badger projection of one stream. Safe for concurrent use.
type Projection struct{ p *projector }

// NewProjection opens a projection: it reads the sequence applied so far;
// Run applies the stream from there.
func NewProjection(cfg ProjectionConfig) (*Projection, error) {
	if cfg.Stream == "" || cfg.DB == nil || cfg.JetStream == nil || cfg.Apply == nil {
		return nil, errors.New("oplog: ProjectionConfig.Stream, DB, JetStream and Apply are required")
	}
	log := zerolog.Nop()
	if cfg.Logger != nil {
		log = *cfg.Logger
	}
	p, err := newProjector(cfg.Stream, cfg.Prefixes, cfg.DB, cfg.JetStream, cfg.Apply, log)
	if err != nil {
		return nil, err
	}
	p.committed = cfg.Committed
	p.transient = cfg.Transient
	return &Projection{p: p}, nil
}

// Name is the projection's name: its stream's.
func (pr *Projection) Name() string { return pr.p.name }

// Run applies the stream until ctx ends; failures are logged and retried.
func (pr *Projection) Run(ctx context.Context) error { return pr.p.run(ctx) }

// Applied is the last stream sequence applied.
func (pr *Projection) Applied() uint64 { return pr.p.applied.Load() }

// CatchUp blocks until the projection holds everything the stream held at
// the call (one STREAM.INFO round trip).
func (pr *Projection) CatchUp(ctx context.Context) error { return pr.p.catchUp(ctx) }

// WaitFor blocks until the projection has applied seq: a writer that got
// seq in its publish ack reads its own write after WaitFor.
func (pr *Projection) WaitFor(ctx context.Context, seq uint64) error { return pr.p.waitFor(ctx, seq) }

// SoleWriter declares that this process writes every message of the
// stream and reports each through Stored: CatchUp then waits for what was
// stored rather than asking the stream (see InboxConfig.SoleWriter). Call
// before Run; wrong with other writers.
func (pr *Projection) SoleWriter() error { return pr.p.soleWriter() }

// Stored records that the stream holds seq (from a publish ack).
func (pr *Projection) Stored(seq uint64) { pr.p.stored(seq) }

// Rebuild replays the projection from sequence from (0 or 1: drop it and
// replay everything); see Inbox.Rebuild. Run must be running.
func (pr *Projection) Rebuild(ctx context.Context, from uint64, interval time.Duration, progress func(Progress)) (*RebuildSummary, error) {
	return pr.p.rebuild(ctx, from, interval, progress)
}

// Digest is a SHA-256 over every key and value the projection owns but
// its Transient ones.
func (pr *Projection) Digest(ctx context.Context) (string, error) { return pr.p.digest(ctx) }

// OpenStore opens (or creates) a badger store for projections, tuned as
// the inbox's: no fsync (projections are rebuilt from their streams), no
// compression, no conflict detection (one writer per projection), and
// values over 64 bytes in the value log.
func OpenStore(dir string, log zerolog.Logger) (*badger.DB, error) {
	opts := badger.DefaultOptions(dir).
		WithLogger(badgerLogger{log}).
		WithSyncWrites(false).
		WithMemTableSize(32 << 20).
		WithNumMemtables(3).
		WithBlockCacheSize(64 << 20).
		WithIndexCacheSize(32 << 20).
		WithCompression(options.None).
		WithDetectConflicts(false).
		WithValueThreshold(64)
	db, err := badger.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("oplog: open store %s: %w", dir, err)
	}
	return db, nil
}

// rebuild replays from sequence from, reporting progress about every
// interval, until it has applied everything the stream held at the call.
func (p *projector) rebuild(ctx context.Context, from uint64, interval time.Duration, progress func(Progress)) (*RebuildSummary, error) {
	name := p.name
	target, err := p.lastSeq(ctx)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	if err := p.requestReset(ctx, from); err != nil {
		return nil, err
	}
	if interval <= 0 {
		interval = time.Second
	}
	base := p.applied.Load()
	t := time.NewTicker(interval)
	defer t.Stop()
	for p.applied.Load() < target {
		select {
		case <-t.C:
			if progress != nil {
				a := p.applied.Load()
				progress(Progress{Projection: name, Applied: a, Target: target, Rate: float64(a-base) / time.Since(start).Seconds()})
			}
		case <-p.wait():
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if progress != nil {
		progress(Progress{Projection: name, Applied: p.applied.Load(), Target: target, Rate: float64(p.applied.Load()-base) / time.Since(start).Seconds()})
	}
	digest, err := p.digest(ctx)
	if err != nil {
		return nil, err
	}
	p.log.Info().Uint64("from", from).Uint64("seq", p.applied.Load()).Dur("took", time.Since(start)).Msg("projection rebuilt")
	return &RebuildSummary{Projection: name, From: from, Applied: p.applied.Load(), Messages: p.applied.Load() - base, Took: time.Since(start), Digest: digest}, nil
}

// digest hashes every key and value the projection owns, in key order.
func (p *projector) digest(ctx context.Context) (string, error) {
	h := sha256.New()
	err := p.db.View(func(txn *badger.Txn) error {
		for _, prefix := range p.prefixes {
			if slices.ContainsFunc(p.transient, func(t []byte) bool { return bytes.Equal(t, prefix) }) {
				continue
			}
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 256})
			for it.Rewind(); it.Valid(); it.Next() {
				if err := ctx.Err(); err != nil {
					it.Close()
					return err
				}
				k := it.Item().Key()
				h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(k))))
				h.Write(k)
				if err := it.Item().Value(func(v []byte) error {
					h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(v))))
					h.Write(v)
					return nil
				}); err != nil {
					it.Close()
					return err
				}
			}
			it.Close()
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("oplog: digest %s: %w", p.name, err)
	}
	return fmt.Sprintf("%x", h.Sum(nil)), nil
}

// ProjectionSet is a package's projections, addressed by name (their
// streams'), for the admin's rebuilds and digests.
type ProjectionSet []*Projection

// Projections lists the names of the projections.
func (s ProjectionSet) Projections() []string {
	names := make([]string, 0, len(s))
	for _, p := range s {
		names = append(names, p.Name())
	}
	return names
}

func (s ProjectionSet) find(name string) (*Projection, error) {
	for _, p := range s {
		if p.Name() == name {
			return p, nil
		}
	}
	return nil, fmt.Errorf("projection %q: want one of %v: %w", clip(name), s.Projections(), ErrInvalid)
}

// Rebuild replays the named projection from sequence from (0 or 1: drop
// it and replay everything), reporting progress about every interval,
// until it has applied everything the stream held at the call. The
// projection's Run must be running.
func (s ProjectionSet) Rebuild(ctx context.Context, name string, from uint64, interval time.Duration, progress func(Progress)) (*RebuildSummary, error) {
	p, err := s.find(name)
	if err != nil {
		return nil, err
	}
	return p.Rebuild(ctx, from, interval, progress)
}

// Digest returns a SHA-256 over every key and value the named projection
// owns, in key order: two rebuilds of the same stream give the same
// digest.
func (s ProjectionSet) Digest(ctx context.Context, name string) (string, error) {
	p, err := s.find(name)
	if err != nil {
		return "", err
	}
	return p.Digest(ctx)
}

// Applied returns the stream sequence each projection has applied.
func (s ProjectionSet) Applied() map[string]uint64 {
	out := make(map[string]uint64, len(s))
	for _, p := range s {
		out[p.Name()] = p.Applied()
	}
	return out
}

// CatchUp blocks until every projection holds what its stream held at the
// call.
func (s ProjectionSet) CatchUp(ctx context.Context) error {
	for _, p := range s {
		if err := p.CatchUp(ctx); err != nil {
			return err
		}
	}
	return nil
}
