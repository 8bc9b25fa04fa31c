package topics

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/topics/topicspb"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Everyone is the topic every device follows implicitly, with no follow
// event: read diffusion for "send to everyone". Open creates its
// definition.
const Everyone = "_all"

// Limits of a topic definition.
const (
	// MaxBackfill is the largest Topic.Backfill.
	MaxBackfill = 10_000
	// MaxDescriptionLen is the longest description, in bytes.
	MaxDescriptionLen = 256
	// DefaultEveryoneBackfill is the backfill of Everyone unless
	// Config.EveryoneBackfill says otherwise.
	DefaultEveryoneBackfill = 100
)

// Config configures a Topics. A zero field takes the default in its comment.
type Config struct {
	// Log supplies the NATS connection, the stream epochs (EnsureStream),
	// the business registry and the input limits. Required.
	Log *oplog.Log
	// Dir is the badger directory of the projections. Required.
	Dir string
	// SoleWriter declares that this process writes every message of the
	// three topic streams, through this Topics (sluiced with its embedded
	// server, producers reaching it through the API only). Readers then
	// wait for what this process stored instead of asking each stream for
	// its last sequence: no STREAM.INFO round trip per Backlog. Wrong with
	// other writers: their messages would not be waited for. Default false.
	SoleWriter bool
	// EveryoneBackfill is how many of the last Everyone messages a device
	// with no cursor for it gets. Default DefaultEveryoneBackfill; negative
	// for none (a new device gets only what is published after it
	// connects). Open writes it into Everyone's definition.
	EveryoneBackfill int
	// DuplicateWindow is how long a producer message id is remembered by
	// the topic stream. Default 2 minutes.
	DuplicateWindow time.Duration
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Topics is read diffusion: topic messages stored once, follow relations and
// device cursors, and their badger projections. Safe for concurrent use.
type Topics struct {
	lg    *oplog.Log
	js    jetstream.JetStream
	db    *badger.DB
	log   zerolog.Logger
	epoch uint64 // of StreamTopics
	sole  bool

	msgs    *oplog.Projection // StreamTopics → m/
	follows *oplog.Projection // StreamFollows → d/ t/ f/ n/
	acks    *oplog.Projection // StreamTopicAcks → c/
	live    *live

	// unfollowing orders an unfollow against live delivery: Unfollow
	// holds it from reading Until to applying its event, live delivery of
	// a batch of messages holds it for reading. So a message is either
	// dispatched before Until is read (and Until covers it), or after the
	// unfollow reached the watchers (which then filter it out).
	unfollowing sync.RWMutex

	closeOnce sync.Once
	closeErr  error
}

// Open creates or updates the three streams, opens the badger store in
// cfg.Dir and makes sure Everyone is defined. Run applies the streams to
// the store; Close closes it.
func Open(ctx context.Context, cfg Config) (*Topics, error) {
	if cfg.Log == nil || cfg.Dir == "" {
		return nil, errors.New("topics: Config.Log and Dir are required")
	}
	s := &Topics{lg: cfg.Log, log: zerolog.Nop(), sole: cfg.SoleWriter, live: newLive()}
	if cfg.Logger != nil {
		s.log = cfg.Logger.With().Str("component", "topics").Logger()
	}
	dupes := cfg.DuplicateWindow
	if dupes <= 0 {
		dupes = 2 * time.Minute
	}
	backfill := cfg.EveryoneBackfill
	switch {
	case backfill == 0:
		backfill = DefaultEveryoneBackfill
	case backfill < 0:
		backfill = 0
	case backfill > MaxBackfill:
		return nil, fmt.Errorf("topics: EveryoneBackfill %d over %d: %w", backfill, MaxBackfill, oplog.ErrInvalid)
	}
	epoch, err := cfg.Log.EnsureStream(ctx, jetstream.StreamConfig{
		Name:        StreamTopics,
		Description: "Sluice topic messages: each stored once, read by every follower",
		Subjects:    []string{subjectTopicPrefix + ">"},
		Storage:     jetstream.FileStorage,
		Duplicates:  dupes,
		DenyDelete:  true,
		DenyPurge:   true,
		AllowMsgTTL: true,
	})
	if err != nil {
		return nil, err
	}
	s.epoch = epoch
	for _, sc := range []jetstream.StreamConfig{{
		Name:              StreamFollows,
		Description:       "Sluice topic definitions and follow relations: the last state of each",
		Subjects:          []string{subjectFollowPrefix + ">"},
		Storage:           jetstream.FileStorage,
		MaxMsgsPerSubject: 1,
		DenyDelete:        true,
		DenyPurge:         true,
	}, {
		Name:              StreamTopicAcks,
		Description:       "Sluice topic cursors: the last ack of every device and topic",
		Subjects:          []string{subjectAckPrefix + ">"},
		Storage:           jetstream.FileStorage,
		MaxMsgsPerSubject: 1,
		DenyDelete:        true,
		DenyPurge:         true,
	}} {
		if _, err := cfg.Log.EnsureStream(ctx, sc); err != nil {
			return nil, err
		}
	}
	// A context of our own: FollowMany keeps thousands of publishes in
	// flight without eating into the oplog writers' async window.
	s.js, err = jetstream.New(cfg.Log.Conn(), jetstream.WithPublishAsyncMaxPending(2*manyWindow), jetstream.WithPublishAsyncTimeout(30*time.Second))
	if err != nil {
		return nil, fmt.Errorf("topics: jetstream: %w", err)
	}
	if err := s.ensureEveryone(ctx, uint32(backfill)); err != nil {
		return nil, err
	}
	db, err := oplog.OpenStore(cfg.Dir, s.log)
	if err != nil {
		return nil, fmt.Errorf("topics: %w", err)
	}
	s.db = db
	if err := s.openProjections(); err != nil {
		_ = db.Close()
		return nil, err
	}
	return s, nil
}

func (s *Topics) openProjections() error {
	js := s.lg.JetStream()
	var err error
	if s.msgs, err = oplog.NewProjection(oplog.ProjectionConfig{
		Stream: StreamTopics, DB: s.db, JetStream: js, Logger: &s.log,
		Prefixes: [][]byte{prefixMessages}, Apply: s.applyMessage, Committed: s.committedMessages,
	}); err != nil {
		return err
	}
	if s.follows, err = oplog.NewProjection(oplog.ProjectionConfig{
		Stream: StreamFollows, DB: s.db, JetStream: js, Logger: &s.log,
		Prefixes: [][]byte{prefixStatus, prefixDefinitions, prefixFollows, prefixCounts}, Apply: s.applyFollows, Committed: s.committedFollows,
	}); err != nil {
		return err
	}
	if s.acks, err = oplog.NewProjection(oplog.ProjectionConfig{
		Stream: StreamTopicAcks, DB: s.db, JetStream: js, Logger: &s.log,
		Prefixes: [][]byte{prefixCursors}, Apply: s.applyCursor,
	}); err != nil {
		return err
	}
	s.live.delivered = s.msgs.Applied()
	s.live.deliveredFollows = s.follows.Applied()
	if s.sole {
		for _, p := range s.projections() {
			if err := p.SoleWriter(); err != nil {
				return err
			}
		}
	}
	return nil
}

// ensureEveryone defines Everyone if it is not, or updates its backfill.
// It reads the stream directly: the projection does not run yet.
func (s *Topics) ensureEveryone(ctx context.Context, backfill uint32) error {
	stream, err := s.js.Stream(ctx, StreamFollows)
	if err != nil {
		return fmt.Errorf("topics: stream %s: %w", StreamFollows, err)
	}
	now := timestamppb.Now()
	def := &topicspb.Topic{Name: Everyone, Backfill: backfill, Description: "every device", CreatedAt: now, UpdatedAt: now}
	var last uint64
	m, err := stream.GetLastMsgForSubject(ctx, subjectDefinition(Everyone))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		return fmt.Errorf("topics: read the definition of %s: %w", Everyone, err)
	default:
		cur := new(topicspb.Topic)
		if proto.Unmarshal(m.Data, cur) == nil && cur.Name == Everyone && !cur.Deleted {
			if cur.Backfill == backfill {
				return nil
			}
			def.CreatedAt, def.Description = cur.CreatedAt, cur.Description
		}
		last = m.Sequence
	}
	_, err = s.write(ctx, subjectDefinition(Everyone), def, &last)
	if errors.Is(err, errConflict) {
		return nil // another node wrote it meanwhile
	}
	return err
}

// Epoch is the epoch of the topic stream: message ids, follow bounds and
// cursors are only comparable within one epoch.
func (s *Topics) Epoch() uint64 { return s.epoch }

// Log is the oplog the store takes its connection, registry and limits
// from.
func (s *Topics) Log() *oplog.Log { return s.lg }

// Run applies the three streams to the store until ctx ends.
func (s *Topics) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, p := range s.projections() {
		g.Go(func() error { return p.Run(ctx) })
	}
	g.Go(func() error { return s.gc(ctx) })
	return g.Wait()
}

// gc runs badger's value-log garbage collection now and then.
func (s *Topics) gc(ctx context.Context) error {
	t := time.NewTicker(5 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			for s.db.RunValueLogGC(0.5) == nil {
			}
		}
	}
}

// Close ends every watch and closes the store. Idempotent; call after Run
// has returned.
func (s *Topics) Close() error {
	s.closeOnce.Do(func() {
		s.live.stopAll()
		if s.db != nil {
			s.closeErr = s.db.Close()
		}
	})
	return s.closeErr
}

func (s *Topics) projections() oplog.ProjectionSet {
	return oplog.ProjectionSet{s.msgs, s.follows, s.acks}
}

// Projections lists the names of the projections Rebuild takes: the
// names of their streams.
func (s *Topics) Projections() []string { return s.projections().Projections() }

// Rebuild replays a projection from sequence from (0 or 1: drop it and
// replay everything), reporting progress about every interval, until it
// has applied everything the stream held at the call. Live traffic goes on
// meanwhile; watchers get nothing twice. Run must be running.
func (s *Topics) Rebuild(ctx context.Context, name string, from uint64, interval time.Duration, progress func(oplog.Progress)) (*oplog.RebuildSummary, error) {
	return s.projections().Rebuild(ctx, name, from, interval, progress)
}

// Digest returns a SHA-256 over every key and value a projection owns, in
// key order: two rebuilds of the same stream give the same digest.
func (s *Topics) Digest(ctx context.Context, name string) (string, error) {
	return s.projections().Digest(ctx, name)
}

// Applied returns the stream sequence each projection has applied.
func (s *Topics) Applied() map[string]uint64 { return s.projections().Applied() }

// CatchUp blocks until every projection holds what its stream held at the
// call.
func (s *Topics) CatchUp(ctx context.Context) error { return s.projections().CatchUp(ctx) }

// errConflict: a publish expecting the last sequence of its subject found
// another (a concurrent change); the caller reads again and retries.
var errConflict = errors.New("topics: concurrent change")

// maxAttempts bounds the retries of a read-check-write that keeps meeting
// concurrent changes.
const maxAttempts = 8

// write publishes m on subject and returns its sequence once stored. With
// expect, the subject's last sequence must be *expect (0: no message yet),
// else errConflict. The sequence is reported to the projection that reads
// the subject's stream.
func (s *Topics) write(ctx context.Context, subject string, m proto.Message, expect *uint64) (uint64, error) {
	data, err := proto.Marshal(m)
	if err != nil {
		return 0, fmt.Errorf("topics: marshal: %w", err)
	}
	var opts []jetstream.PublishOpt
	if expect != nil {
		opts = append(opts, jetstream.WithExpectLastSequencePerSubject(*expect))
	}
	msg := nats.NewMsg(subject)
	msg.Data = data
	ack, err := s.js.PublishMsg(ctx, msg, opts...)
	if err != nil {
		if oplog.WrongLastSequence(err) {
			return 0, errConflict
		}
		return 0, fmt.Errorf("topics: publish: %v: %w", err, oplog.ErrUnavailable)
	}
	s.stored(subject, ack.Sequence)
	return ack.Sequence, nil
}

// stored tells the projection of the subject's stream that it holds seq
// (SoleWriter).
func (s *Topics) stored(subject string, seq uint64) {
	if !s.sole || s.msgs == nil {
		return
	}
	switch {
	case strings.HasPrefix(subject, subjectTopicPrefix):
		s.msgs.Stored(seq)
	case strings.HasPrefix(subject, subjectFollowPrefix):
		s.follows.Stored(seq)
	case strings.HasPrefix(subject, subjectAckPrefix):
		s.acks.Stored(seq)
	}
}

// validName reports whether s is a valid topic, user or device id.
func validName(s string) bool { return oplog.ValidID(s) }

func checkID(what, s string) error {
	if !oplog.ValidID(s) {
		return fmt.Errorf("%s %q: want 1-%d of [A-Za-z0-9_-]: %w", what, clip(s), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	return nil
}

// clip shortens untrusted strings quoted in errors and logs.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
