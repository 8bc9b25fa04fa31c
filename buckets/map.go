package buckets

import (
	"context"
	"errors"
	"fmt"
	"maps"

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
// stream held in memory (an oplog.Control). Open replays the stream; Run
// follows it. Define, Remove and Assign write events and return once this
// Map has applied them.
//
// Map is safe for concurrent use. Reads (Plan, BucketOf, Buckets, ...) load
// an immutable snapshot and take no lock.
type Map struct {
	log *oplog.Log
	ctl *oplog.Control[*snapshot]
}

// Open replays the bucket events of the control stream from the start
// until it has applied every one stored, so the Map answers with the
// current state from the first call. Run keeps it current.
func Open(ctx context.Context, cfg Config) (*Map, error) {
	if cfg.Log == nil {
		return nil, errors.New("buckets: Config.Log is required")
	}
	ctl, err := oplog.OpenControl(ctx, oplog.ControlConfig{Log: cfg.Log, Name: "buckets", Filters: filters, Logger: cfg.Logger}, newModel())
	if err != nil {
		return nil, err
	}
	return &Map{log: cfg.Log, ctl: ctl}, nil
}

// Run follows the control stream, applying each bucket event as it is
// stored, until ctx ends; then it returns nil. Transient NATS or JetStream
// failures are logged and retried.
func (m *Map) Run(ctx context.Context) error { return m.ctl.Run(ctx) }

// Close marks the Map closed: a Run that has not started yet returns at
// once (a running one stops when its ctx ends). Reads keep answering with
// the last state. Idempotent.
func (m *Map) Close() error { return m.ctl.Close() }

// write stores a control event and waits until this Map has applied it.
func (m *Map) write(ctx context.Context, subject string, ev proto.Message) (uint64, *snapshot, error) {
	return m.ctl.Write(ctx, subject, ev)
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
	if _, ok := m.ctl.Snapshot().pos[name]; !ok {
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
	if _, ok := m.ctl.Snapshot().pos[bucket]; bucket != "" && !ok {
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
	return m.ctl.Snapshot().plan(businesses)
}

// BucketOf returns the name of a business's bucket: its assignment, or the
// default rule (DefaultRule).
func (m *Map) BucketOf(b *oplogpb.Business) string {
	s := m.ctl.Snapshot()
	return s.order[s.index(b)].Name
}

// Bucket returns the current settings of a bucket.
func (m *Map) Bucket(name string) (Bucket, bool) {
	s := m.ctl.Snapshot()
	i, ok := s.pos[name]
	if !ok {
		return Bucket{}, false
	}
	return s.order[i], true
}

// Buckets returns every bucket, by priority then name.
func (m *Map) Buckets() []Bucket {
	return append([]Bucket(nil), m.ctl.Snapshot().order...)
}

// Assignments returns the explicit assignments, business → bucket.
// Businesses not in it follow the default rule.
func (m *Map) Assignments() map[string]string {
	return maps.Clone(m.ctl.Snapshot().names)
}

// Applied returns the stream sequence of the last control event this Map
// has applied (0 before any).
func (m *Map) Applied() uint64 { return m.ctl.Applied() }

// Version returns a counter that changes whenever the buckets or the
// business→bucket map change, for callers that cache what they derive
// from them. It counts the changes made by the events applied, so two Maps
// that have applied the same sequence have the same version.
func (m *Map) Version() uint64 { return m.ctl.Snapshot().version }
