package oplog

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// DefaultAtomicBatch is the AtomicBatch sluiced uses when the server
// fsyncs every write: from this many queued entries up, one atomic batch
// beats separate publishes here.
const DefaultAtomicBatch = 32

// Config configures a Log. A zero field takes the default in its comment.
type Config struct {
	// Conn is the NATS connection. Required.
	Conn *nats.Conn
	// Shards is the number of oplog streams targets are spread over by a
	// hash of their id. Default 1. Fixed for the life of a deployment.
	Shards int
	// Replicas of every stream. Default 1 (the embedded single node).
	Replicas int
	// DuplicateWindow is how long a producer message id is remembered: the
	// same id within it yields the original entry. Default 2 minutes.
	DuplicateWindow time.Duration
	// DeadLetterMaxAge is how long dead letters are kept. Default 7 days.
	DeadLetterMaxAge time.Duration
	// AtomicBatch is the fewest messages of one shard written together as one
	// JetStream atomic batch (one commit, one fsync) rather than as separate
	// publishes; 0 never uses atomic batches. Worth it when the server
	// fsyncs every write (sluiced sets 32 with --fsync always); with lazy
	// fsync, separate pipelined publishes are faster. Needs NATS 2.12+.
	AtomicBatch int
	// Limits on producer input.
	Limits Limits
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Log appends events to the oplog streams. It owns the stream definitions,
// the epochs and the business registry. Safe for concurrent use.
type Log struct {
	nc        *nats.Conn
	js        jetstream.JetStream
	shards    int
	replicas  int
	dupes     time.Duration
	dlqAge    time.Duration
	lim       Limits
	log       zerolog.Logger
	epochs    []uint64
	writers   []*writer
	atomicMin int
	kv        jetstream.KeyValue
	watcher   jetstream.KeyWatcher

	mu   sync.RWMutex
	biz  map[string]*oplogpb.Business
	once sync.Once
}

// metaEpoch is the stream metadata key that holds a stream's epoch.
const metaEpoch = "sluice_epoch"

// Open creates or updates every stream and the business bucket
// (idempotently), reads the epochs and loads the business registry. Run
// keeps the registry current; Close releases the watcher.
func Open(ctx context.Context, cfg Config) (*Log, error) {
	if cfg.Conn == nil {
		return nil, errors.New("oplog: Config.Conn is required")
	}
	l := &Log{
		nc:        cfg.Conn,
		shards:    max(cfg.Shards, 1),
		replicas:  max(cfg.Replicas, 1),
		dupes:     cfg.DuplicateWindow,
		dlqAge:    cfg.DeadLetterMaxAge,
		lim:       cfg.Limits.withDefaults(),
		atomicMin: max(cfg.AtomicBatch, 0),
		log:       zerolog.Nop(),
		biz:       make(map[string]*oplogpb.Business),
	}
	if l.dupes <= 0 {
		l.dupes = 2 * time.Minute
	}
	if l.dlqAge <= 0 {
		l.dlqAge = 7 * 24 * time.Hour
	}
	if cfg.Logger != nil {
		l.log = cfg.Logger.With().Str("component", "oplog").Logger()
	}
	js, err := jetstream.New(cfg.Conn, jetstream.WithPublishAsyncMaxPending(4096), jetstream.WithPublishAsyncTimeout(commitTimeout))
	if err != nil {
		return nil, fmt.Errorf("oplog: jetstream: %w", err)
	}
	l.js = js
	for range l.shards {
		l.writers = append(l.writers, newWriter(l))
	}
	if err := l.ensureStreams(ctx); err != nil {
		return nil, err
	}
	if err := l.loadBusinesses(ctx); err != nil {
		return nil, err
	}
	return l, nil
}

// JetStream returns the JetStream context the log publishes with.
func (l *Log) JetStream() jetstream.JetStream { return l.js }

// Conn returns the NATS connection.
func (l *Log) Conn() *nats.Conn { return l.nc }

// Shards returns the number of oplog shards.
func (l *Log) Shards() int { return l.shards }

// Replicas returns the replica count of the streams the Log creates, for
// packages that create their own beside them.
func (l *Log) Replicas() int { return l.replicas }

// Epoch returns the epoch of a shard's stream: it changes when the stream is
// recreated, and ids are only comparable within one epoch.
func (l *Log) Epoch(shard uint32) uint64 { return l.epochs[shard] }

// Limits returns the effective input limits.
func (l *Log) Limits() Limits { return l.lim }

func (l *Log) ensureStreams(ctx context.Context) error {
	l.epochs = make([]uint64, l.shards)
	for i := range l.shards {
		shard := uint32(i)
		cfg := jetstream.StreamConfig{
			Name:               StreamOplog(shard),
			Description:        "Sluice oplog shard " + strconv.Itoa(i) + ": the source of truth of per-user and per-device inboxes",
			Subjects:           []string{fmt.Sprintf("sluice.oplog.%d.>", shard)},
			Storage:            jetstream.FileStorage,
			Replicas:           l.replicas,
			Duplicates:         l.dupes,
			DenyDelete:         true,
			DenyPurge:          true,
			AllowMsgTTL:        true,
			AllowAtomicPublish: l.atomicMin > 0,
		}
		epoch, err := l.ensureStream(ctx, cfg)
		if err != nil {
			return err
		}
		l.epochs[shard] = epoch
	}
	others := []jetstream.StreamConfig{{
		Name:        StreamIngest,
		Description: "Sluice ingest: fire-and-forget producer events, routed into the oplog",
		Subjects:    []string{SubjectIngest + ".>"},
		Storage:     jetstream.FileStorage,
		Replicas:    l.replicas,
		Retention:   jetstream.WorkQueuePolicy,
		Duplicates:  l.dupes,
		DenyDelete:  true,
		DenyPurge:   true,
	}, {
		Name:        StreamDeadLetter,
		Description: "Sluice dead letters: ingested events that failed validation",
		Subjects:    []string{"sluice.dlq.>"},
		Storage:     jetstream.FileStorage,
		Replicas:    l.replicas,
		MaxAge:      l.dlqAge,
		Duplicates:  l.dupes,
	}, {
		Name:              StreamAcks,
		Description:       "Sluice sync points: the last ack of every device and business",
		Subjects:          []string{"sluice.ack.>"},
		Storage:           jetstream.FileStorage,
		Replicas:          l.replicas,
		MaxMsgsPerSubject: 1,
		DenyDelete:        true,
		DenyPurge:         true,
	}, {
		Name:        StreamControl,
		Description: "Sluice control events: buckets, business assignments and other run-time settings",
		Subjects:    []string{"sluice.control.>"},
		Storage:     jetstream.FileStorage,
		Replicas:    l.replicas,
		Duplicates:  l.dupes,
		DenyDelete:  true,
		DenyPurge:   true,
	}}
	for _, cfg := range others {
		if _, err := l.ensureStream(ctx, cfg); err != nil {
			return err
		}
	}
	kv, err := l.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketBusinesses,
		Description: "Sluice business registry",
		History:     1,
		Storage:     jetstream.FileStorage,
		Replicas:    l.replicas,
	})
	if err != nil {
		return fmt.Errorf("oplog: bucket %s: %w", BucketBusinesses, err)
	}
	l.kv = kv
	return nil
}

// EnsureStream creates a stream with a new epoch, or updates it keeping its
// epoch, and returns the epoch (kept in the stream's metadata). Other
// packages create the streams they own with it, so that ids of every
// stream come with an epoch the same way. Replicas default to the log's.
func (l *Log) EnsureStream(ctx context.Context, cfg jetstream.StreamConfig) (uint64, error) {
	if cfg.Replicas == 0 {
		cfg.Replicas = l.replicas
	}
	return l.ensureStream(ctx, cfg)
}

// ensureStream creates the stream with a new epoch, or updates it keeping
// its epoch, and returns the epoch.
func (l *Log) ensureStream(ctx context.Context, cfg jetstream.StreamConfig) (uint64, error) {
	s, err := l.js.Stream(ctx, cfg.Name)
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		epoch := uint64(time.Now().UnixNano())
		cfg.Metadata = map[string]string{metaEpoch: strconv.FormatUint(epoch, 10)}
		if _, err := l.js.CreateStream(ctx, cfg); err != nil {
			return 0, fmt.Errorf("oplog: create stream %s: %w", cfg.Name, err)
		}
		l.log.Info().Str("stream", cfg.Name).Uint64("epoch", epoch).Msg("stream created")
		return epoch, nil
	case err != nil:
		return 0, fmt.Errorf("oplog: stream %s: %w", cfg.Name, err)
	}
	info := s.CachedInfo()
	epoch, perr := strconv.ParseUint(info.Config.Metadata[metaEpoch], 10, 64)
	if perr != nil || epoch == 0 {
		// Created outside Sluice: its creation time is its epoch.
		epoch = uint64(info.Created.UnixNano())
	}
	cfg.Metadata = map[string]string{metaEpoch: strconv.FormatUint(epoch, 10)}
	if _, err := l.js.UpdateStream(ctx, cfg); err != nil {
		return 0, fmt.Errorf("oplog: update stream %s: %w", cfg.Name, err)
	}
	return epoch, nil
}

// Append validates ev and appends one entry per target. It returns once
// every entry is durable (as durable as the stream's fsync policy makes an
// ack), with one result per target in order. A refused event writes
// nothing. A repeated message id within the duplicate window yields the
// original ids with Duplicate set.
func (l *Log) Append(ctx context.Context, ev *oplogpb.Event) ([]*oplogpb.Appended, error) {
	r := l.AppendBatch(ctx, []*oplogpb.Event{ev})[0]
	if r.Error != nil {
		return nil, ErrorFromPB(r.Error)
	}
	return r.Results, nil
}

// slot ties a written message to the result it fills.
type slot struct {
	reply  *oplogpb.AppendReply
	result *oplogpb.Appended
}

// AppendBatch appends several events, and answers one reply per event, in
// order. Events are validated one by one: a bad event is refused alone and
// writes nothing. The entries are written through each shard's group
// commit (see writer.go), together with concurrent appends.
func (l *Log) AppendBatch(ctx context.Context, evs []*oplogpb.Event) []*oplogpb.AppendReply {
	now := time.Now()
	replies := make([]*oplogpb.AppendReply, len(evs))
	msgs := make([][]*nats.Msg, l.shards)
	slots := make([][]slot, l.shards)
	for i, ev := range evs {
		r := &oplogpb.AppendReply{}
		replies[i] = r
		if ev == nil {
			r.Error = ErrorPB(fmt.Errorf("nil event: %w", ErrMalformed))
			continue
		}
		if err := validate(ev, l.Business, l.lim, now); err != nil {
			r.Error = ErrorPB(err)
			l.log.Debug().Err(err).Str("business", clip(ev.Business)).Msg("event refused")
			continue
		}
		// Build every message of the event before queueing any, so an event
		// is either refused whole or written whole.
		evMsgs := make([]*nats.Msg, 0, len(ev.Targets))
		base, err := proto.Marshal(entryFor(ev, ""))
		for _, target := range ev.Targets {
			if err != nil {
				break
			}
			evMsgs = append(evMsgs, l.message(ev, withTarget(base, target), target, ShardOf(target, l.shards), now))
		}
		if err != nil {
			r.Error = ErrorPB(err)
			continue
		}
		for k, target := range ev.Targets {
			shard := ShardOf(target, l.shards)
			res := &oplogpb.Appended{Target: target, Shard: shard, Epoch: l.epochs[shard]}
			r.Results = append(r.Results, res)
			if ev.Transient {
				if err := l.nc.PublishMsg(evMsgs[k]); err != nil && r.Error == nil {
					r.Error = ErrorPB(fmt.Errorf("publish: %v: %w", err, ErrUnavailable))
				}
				continue
			}
			msgs[shard] = append(msgs[shard], evMsgs[k])
			slots[shard] = append(slots[shard], slot{r, res})
		}
	}
	for shard := range l.shards {
		if len(msgs[shard]) == 0 {
			continue
		}
		results, err := l.writers[shard].write(ctx, msgs[shard])
		for i, s := range slots[shard] {
			switch {
			case s.reply.Error != nil:
			case err != nil:
				s.reply.Error = ErrorPB(err)
			case results[i].err != nil:
				l.log.Warn().Err(results[i].err).Str("target", s.result.Target).Msg("append failed")
				s.reply.Error = ErrorPB(results[i].err)
			default:
				s.result.Id, s.result.Duplicate = results[i].seq, results[i].dup
			}
		}
	}
	for _, r := range replies {
		if r.Error != nil {
			r.Results = nil
		}
	}
	return replies
}

// withTarget returns the entry of one target: the encoded entry without
// a target, with the target field appended. Protobuf decoders take fields
// in any order, and an event to a thousand targets is marshalled once
// rather than a thousand times (the fanout path's largest cost after the
// store itself).
func withTarget(base []byte, target string) []byte {
	data := make([]byte, 0, len(base)+2+len(target))
	data = append(data, base...)
	data = protowire.AppendTag(data, entryTargetField, protowire.BytesType)
	return protowire.AppendString(data, target)
}

// entryTargetField is oplogpb.Entry's target field number.
const entryTargetField = 4

// message builds the stored or transient message of ev for one target,
// its entry encoded as data.
func (l *Log) message(ev *oplogpb.Event, data []byte, target string, shard uint32, now time.Time) *nats.Msg {
	if ev.Transient {
		m := nats.NewMsg(SubjectLive(shard, ev.Dimension, target, ev.Business))
		m.Data = data
		m.Header.Set(HeaderTransient, "1")
		m.Header.Set(HeaderEpoch, strconv.FormatUint(l.epochs[shard], 10))
		return m
	}
	// The header map is built in one go: this runs for every entry, and
	// a fanout writes a million of them.
	m := &nats.Msg{Subject: SubjectOplog(shard, ev.Dimension, target, ev.Business), Data: data, Header: nats.Header{}}
	if ev.MessageId != "" {
		m.Header = nats.Header{jetstream.MsgIDHeader: []string{ev.MessageId + "/" + target}}
	}
	if ev.CollapseKey != "" {
		m.Header.Set(HeaderCollapse, ev.CollapseKey)
	}
	if ev.ExpiresAt != nil {
		// Nats-TTL counts whole seconds; round up so storage never drops an
		// entry before its validity ends. Reads also skip expired entries.
		ttl := ev.ExpiresAt.AsTime().Sub(now)
		if ev.CollapseKey != "" {
			// A collapsing entry stays stored CollapseGrace past its
			// validity, so that a rebuild still sees which older entries
			// it replaced (those valid up to that long after it).
			ttl += CollapseGrace
		}
		ttl = max((ttl + time.Second - 1).Truncate(time.Second), time.Second)
		m.Header.Set(jetstream.MsgTTLHeader, ttl.String())
	}
	return m
}

// Business returns a registered business.
func (l *Log) Business(code string) (*oplogpb.Business, bool) {
	l.mu.RLock()
	b, ok := l.biz[code]
	l.mu.RUnlock()
	return b, ok
}

// Businesses returns every registered business.
func (l *Log) Businesses() []*oplogpb.Business {
	l.mu.RLock()
	defer l.mu.RUnlock()
	out := make([]*oplogpb.Business, 0, len(l.biz))
	for _, b := range l.biz {
		out = append(out, b)
	}
	return out
}

// RegisterBusiness adds or replaces a business in the registry. Every Log
// on the cluster sees it through its watcher; this one at once.
func (l *Log) RegisterBusiness(ctx context.Context, b *oplogpb.Business) error {
	if !ValidBusiness(b.Code) {
		return fmt.Errorf("business %q: want 1-%d of [a-z0-9_-]: %w", clip(b.Code), MaxBusinessLen, ErrInvalidID)
	}
	if b.Dimension == oplogpb.Dimension_DIMENSION_UNSPECIFIED {
		b.Dimension = oplogpb.Dimension_DIMENSION_USER
	}
	if b.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED {
		b.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_MULTI
	}
	if b.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_SINGLE && b.Dimension != oplogpb.Dimension_DIMENSION_USER {
		return fmt.Errorf("business %q: single-device mode needs the user dimension: %w", b.Code, ErrInvalid)
	}
	if old, ok := l.Business(b.Code); ok && old.Dimension != b.Dimension {
		return fmt.Errorf("business %q: dimension cannot change from %s: %w", b.Code, old.Dimension, ErrInvalid)
	}
	data, err := proto.Marshal(b)
	if err != nil {
		return fmt.Errorf("oplog: marshal business: %w", err)
	}
	if _, err := l.kv.Put(ctx, b.Code, data); err != nil {
		return fmt.Errorf("oplog: register business %s: %w", b.Code, err)
	}
	l.mu.Lock()
	l.biz[b.Code] = proto.Clone(b).(*oplogpb.Business)
	l.mu.Unlock()
	return nil
}

// EnsureBusinesses registers each of bs (a copy: RegisterBusiness fills
// defaults in) that the registry does not hold yet, and leaves the others
// as an operator may have set them. Components that write to businesses
// of their own call it when they open.
func (l *Log) EnsureBusinesses(ctx context.Context, bs ...*oplogpb.Business) error {
	for _, b := range bs {
		if _, ok := l.Business(b.Code); ok {
			continue
		}
		if err := l.RegisterBusiness(ctx, proto.Clone(b).(*oplogpb.Business)); err != nil {
			return err
		}
	}
	return nil
}

func (l *Log) loadBusinesses(ctx context.Context) error {
	w, err := l.kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("oplog: watch businesses: %w", err)
	}
	l.watcher = w
	for {
		select {
		case e := <-w.Updates():
			if e == nil { // initial values done
				return nil
			}
			l.applyBusiness(e)
		case <-ctx.Done():
			_ = w.Stop()
			return ctx.Err()
		}
	}
}

func (l *Log) applyBusiness(e jetstream.KeyValueEntry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.Operation() != jetstream.KeyValuePut {
		delete(l.biz, e.Key())
		return
	}
	b := new(oplogpb.Business)
	if err := proto.Unmarshal(e.Value(), b); err != nil || b.Code != e.Key() {
		l.log.Error().Str("business", clip(e.Key())).Msg("unreadable business record skipped")
		return
	}
	l.biz[b.Code] = b
}

// Run keeps the business registry current until ctx ends.
func (l *Log) Run(ctx context.Context) error {
	for {
		select {
		case e, ok := <-l.watcher.Updates():
			if !ok {
				return nil
			}
			if e != nil {
				l.applyBusiness(e)
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// Close stops the registry watcher. Idempotent.
func (l *Log) Close() error {
	l.once.Do(func() {
		if l.watcher != nil {
			_ = l.watcher.Stop()
		}
	})
	return nil
}
