package fanout

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"golang.org/x/sync/errgroup"
)

// Names on NATS.
const (
	// StreamFanout is the work queue of chunks: chunk n of job J on
	// SubjectChunk(J) with Nats-Msg-Id "J/n".
	StreamFanout = "SLUICE_FANOUT"
	// StreamSegments holds segment membership, the last change per user and
	// segment, on SubjectSegment(segment, user).
	StreamSegments = "SLUICE_SEGMENTS"
	// BucketJobs is the KV bucket of jobs: "<job>.spec" and "<job>.state".
	BucketJobs = "sluice_fanout_jobs"
	// BucketDone is the KV bucket of chunk markers: "<job>.<n>" once chunk n
	// is written, "<job>.<n>.started" at its first attempt.
	BucketDone = "sluice_fanout_done"
	// Consumer is the durable pull consumer on StreamFanout that the
	// workers of every node share.
	Consumer = "sluice-fanout"
	// MessageIDPrefix starts the message id of every entry a job writes:
	// MessageID(job).
	MessageIDPrefix = "fanout-"
)

// Defaults and bounds.
const (
	// DefaultChunkSize is the most ids in one chunk unless Config.ChunkSize
	// says otherwise.
	DefaultChunkSize = 1000
	// MaxChunkSize bounds Config.ChunkSize: a chunk of that many 64-byte
	// ids is well within the NATS default message size of 1 MiB.
	MaxChunkSize = 10_000
	// DefaultConcurrency is the number of chunks a node writes at once.
	DefaultConcurrency = 2
	// DefaultRetention is how long job records and chunk markers are kept.
	DefaultRetention = 7 * 24 * time.Hour
	// MaxChunks bounds the chunks of one job: 4,194,304, over 4 billion
	// recipients at the default chunk size. Progress keeps a bit per chunk.
	MaxChunks = 1 << 22
)

// SubjectChunk is the subject of every chunk of a job.
func SubjectChunk(job string) string { return "sluice.fanout.chunk." + job }

// SubjectSegment is the subject of a user's membership in a segment.
func SubjectSegment(segment, user string) string { return "sluice.segment." + segment + "." + user }

// MessageID is the message id of every entry job writes: each recipient's
// entry is stored with Nats-Msg-Id "fanout-<job>/<recipient>".
func MessageID(job string) string { return MessageIDPrefix + job }

// Global publishes an event once, as a global entry every device reads
// (read diffusion). The topics package implements it with its built-in
// "_all" topic. Publish must be idempotent on ev.MessageId: fanout may
// call it again with the same message id after a crash.
type Global interface {
	Publish(ctx context.Context, ev *oplogpb.Event) (*oplogpb.Appended, error)
}

// Config configures a Fanout. A zero field takes the default in its
// comment.
type Config struct {
	// Log is the oplog written to. Required.
	Log *oplog.Log
	// Inbox is this node's projection of the oplog. Required by Run: a
	// chunk retried after the duplicate window looks its recipients up in
	// it. Create records its applied sequences (without an Inbox, the
	// streams' last sequences).
	Inbox *oplog.Inbox
	// Global stores everyone jobs. Default none: everyone jobs are refused.
	Global Global
	// Dir is the badger directory of the segment projection. Required.
	Dir string
	// Concurrency is the number of chunks this node writes at once.
	// Default 2 (DefaultConcurrency).
	Concurrency int
	// ChunkSize is the most ids in one chunk: AddRecipients refuses more,
	// and segments are expanded in chunks of this size. Default 1,000;
	// at most MaxChunkSize.
	ChunkSize int
	// Retention is how long job records and chunk markers are kept: a job
	// must end within it. Default 7 days.
	Retention time.Duration
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Fanout expands jobs into per-recipient oplog entries. Safe for
// concurrent use; see the package doc.
type Fanout struct {
	lg        *oplog.Log
	in        *oplog.Inbox
	global    Global
	js        jetstream.JetStream
	jobs      jetstream.KeyValue
	done      jetstream.KeyValue
	db        *badger.DB
	seg       *oplog.Projection
	conc      int
	chunkSize int
	dupes     time.Duration // the oplog's duplicate window
	node      string        // this instance, as a lease owner
	log       zerolog.Logger
	running   atomic.Bool

	// Tunables, fixed after Open; tests shorten them.
	ackWait    time.Duration // of the chunk consumer
	lease      time.Duration // of a segment or everyone expander
	retryDelay time.Duration // before a failed chunk is retried
	// afterAppend, when set (tests), runs after a chunk's appends and
	// before its done marker; an error abandons the attempt as a crash
	// there would.
	afterAppend func(job string, n uint32) error

	specs sync.Map // job id -> *fanoutpb.Job (specs never change)

	closeOnce sync.Once
	closeErr  error
}

// Open creates or updates the fanout streams and buckets, and opens the
// segment projection in cfg.Dir. It starts nothing: Run does. Close
// releases the store.
func Open(ctx context.Context, cfg Config) (*Fanout, error) {
	if cfg.Log == nil || cfg.Dir == "" {
		return nil, errors.New("fanout: Config.Log and Dir are required")
	}
	if cfg.ChunkSize > MaxChunkSize {
		return nil, fmt.Errorf("fanout: Config.ChunkSize %d over %d", cfg.ChunkSize, MaxChunkSize)
	}
	f := &Fanout{
		lg:         cfg.Log,
		in:         cfg.Inbox,
		global:     cfg.Global,
		js:         cfg.Log.JetStream(),
		conc:       cfg.Concurrency,
		chunkSize:  cfg.ChunkSize,
		node:       nuid.Next(),
		log:        zerolog.Nop(),
		ackWait:    time.Minute,
		lease:      20 * time.Second,
		retryDelay: 2 * time.Second,
	}
	if f.conc <= 0 {
		f.conc = DefaultConcurrency
	}
	if f.chunkSize <= 0 {
		f.chunkSize = DefaultChunkSize
	}
	retention := cfg.Retention
	if retention <= 0 {
		retention = DefaultRetention
	}
	if cfg.Logger != nil {
		f.log = cfg.Logger.With().Str("component", "fanout").Logger()
	}
	// The oplog's duplicate window and replicas are those of its streams.
	s, err := f.js.Stream(ctx, oplog.StreamOplog(0))
	if err != nil {
		return nil, fmt.Errorf("fanout: oplog stream: %w", err)
	}
	oc := s.CachedInfo().Config
	f.dupes = oc.Duplicates
	if f.dupes <= 0 {
		f.dupes = 2 * time.Minute
	}
	streams := []jetstream.StreamConfig{{
		Name:        StreamFanout,
		Description: "Sluice fanout chunks: recipient lists waiting to be written",
		Subjects:    []string{SubjectChunk(">")},
		Storage:     jetstream.FileStorage,
		Replicas:    oc.Replicas,
		Retention:   jetstream.WorkQueuePolicy,
		Duplicates:  f.dupes,
		MaxAge:      retention,
	}, {
		Name:              StreamSegments,
		Description:       "Sluice segment membership: the last change per segment and user",
		Subjects:          []string{"sluice.segment.>"},
		Storage:           jetstream.FileStorage,
		Replicas:          oc.Replicas,
		MaxMsgsPerSubject: 1,
		DenyDelete:        true,
		DenyPurge:         true,
	}}
	for _, sc := range streams {
		if _, err := f.lg.EnsureStream(ctx, sc); err != nil {
			return nil, err
		}
	}
	for _, b := range []struct {
		name, desc string
		kv         *jetstream.KeyValue
	}{
		{BucketJobs, "Sluice fanout jobs: spec and state", &f.jobs},
		{BucketDone, "Sluice fanout chunk markers", &f.done},
	} {
		kv, err := f.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket: b.name, Description: b.desc, History: 1, TTL: retention,
			Storage: jetstream.FileStorage, Replicas: oc.Replicas,
		})
		if err != nil {
			return nil, fmt.Errorf("fanout: bucket %s: %w", b.name, err)
		}
		*b.kv = kv
	}
	db, err := oplog.OpenStore(cfg.Dir, f.log)
	if err != nil {
		return nil, fmt.Errorf("fanout: %w", err)
	}
	f.db = db
	f.seg, err = oplog.NewProjection(oplog.ProjectionConfig{
		Stream:    StreamSegments,
		DB:        db,
		JetStream: f.js,
		Prefixes:  [][]byte{[]byte(keyMember), []byte(keyCount)},
		Apply:     f.applyMembership,
		Logger:    &f.log,
	})
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return f, nil
}

// Run writes chunks (Concurrency at a time), expands segment and everyone
// jobs (taking over those whose node stopped), finishes sealed jobs whose
// chunks are all written, and applies the segment stream to the
// projection, until ctx ends. Several nodes may run it against the same
// NATS: they share the work. Run once per Fanout.
func (f *Fanout) Run(ctx context.Context) error {
	if f.in == nil {
		return errors.New("fanout: Run needs Config.Inbox")
	}
	if !f.running.CompareAndSwap(false, true) {
		return errors.New("fanout: Run called twice")
	}
	defer f.running.Store(false)
	cons, err := f.js.CreateOrUpdateConsumer(ctx, StreamFanout, jetstream.ConsumerConfig{
		Durable:     Consumer,
		Description: "Sluice fanout workers",
		AckPolicy:   jetstream.AckExplicitPolicy,
		AckWait:     f.ackWait,
		// The consumer is shared: each node bounds its own share by its
		// worker count; this only caps the cluster.
		MaxAckPending: 1024,
		MaxDeliver:    -1,
	})
	if ctx.Err() != nil {
		return nil // stopped while starting: not a failure
	}
	if err != nil {
		return fmt.Errorf("fanout: consumer: %w", err)
	}
	// Chunks a crashed node held are redelivered now rather than after the
	// ack wait. A chunk another node is writing may be delivered twice:
	// harmless (see doc.go), and only at a node's start.
	if _, err := f.js.ResetConsumer(ctx, StreamFanout, Consumer); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("fanout: reset consumer: %w", err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return f.seg.Run(gctx) })
	g.Go(func() error { return f.manage(gctx) })
	for range f.conc {
		g.Go(func() error { return f.work(gctx, cons) })
	}
	return g.Wait()
}

// Close closes the segment store. Idempotent; call after Run returned.
func (f *Fanout) Close() error {
	f.closeOnce.Do(func() {
		if f.db != nil {
			f.closeErr = f.db.Close()
		}
	})
	return f.closeErr
}

// Projections lists the projections Rebuild takes: the segment index.
func (f *Fanout) Projections() []string { return oplog.ProjectionSet{f.seg}.Projections() }

// Rebuild replays a projection from sequence from (0 or 1: from scratch),
// reporting progress about every interval. Run must be running.
func (f *Fanout) Rebuild(ctx context.Context, name string, from uint64, interval time.Duration, progress func(oplog.Progress)) (*oplog.RebuildSummary, error) {
	return oplog.ProjectionSet{f.seg}.Rebuild(ctx, name, from, interval, progress)
}

// Digest is a SHA-256 over everything a projection holds: a rebuild gives
// the same digest.
func (f *Fanout) Digest(ctx context.Context, name string) (string, error) {
	return oplog.ProjectionSet{f.seg}.Digest(ctx, name)
}

// CatchUp blocks until the segment projection holds what its stream held
// at the call.
func (f *Fanout) CatchUp(ctx context.Context) error { return f.seg.CatchUp(ctx) }

// Applied returns the stream sequence each projection has applied.
func (f *Fanout) Applied() map[string]uint64 { return oplog.ProjectionSet{f.seg}.Applied() }

// Keys of the done bucket.
func doneKey(job string, n uint32) string    { return job + "." + strconv.FormatUint(uint64(n), 10) }
func startedKey(job string, n uint32) string { return doneKey(job, n) + ".started" }

// Keys of the jobs bucket.
func specKey(job string) string  { return job + ".spec" }
func stateKey(job string) string { return job + ".state" }

// clip shortens untrusted strings quoted in errors and logs.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// sleep waits d or until ctx ends; it reports whether ctx is still live.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// terminal reports whether a job state is final.
func terminal(s fanoutpb.State) bool {
	return s == fanoutpb.State_STATE_DONE || s == fanoutpb.State_STATE_FAILED || s == fanoutpb.State_STATE_CANCELLED
}
