package buckets

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// Control subjects of the bucket events.
var (
	subjectBucket = oplog.SubjectControl("bucket") + "."
	subjectAssign = oplog.SubjectControl("assign") + "."
	// filters are the subjects a Map follows in the control stream.
	filters = []string{subjectBucket + ">", subjectAssign + ">"}
)

// maxRejected is how many rejected assignment sequences a model remembers,
// so that the Assign that wrote one can report it.
const maxRejected = 64

// errRejected marks a stored assignment that names a bucket that did not
// exist when it was applied (it was removed between Assign's check and the
// write). The assignment has no effect.
var errRejected = errors.New("assignment to a missing bucket")

// model is the projection of the bucket subjects of the control stream. It
// is fed every event in stream order by apply, which is deterministic and
// does no I/O: replaying the same events from the start builds the same
// model. It is not safe for concurrent use; a Map lets one goroutine at a
// time (the holder of Map.reader) feed it.
type model struct {
	defined  map[string]Bucket // definitions, including overrides of defaults
	assign   map[string]string // business → bucket; every bucket named exists
	applied  uint64            // stream sequence of the last event applied
	version  uint64            // changes whenever the buckets or the map change
	rejected []uint64          // the last maxRejected rejected assignments
}

func newModel() *model {
	return &model{defined: make(map[string]Bucket), assign: make(map[string]string)}
}

// exists reports whether a bucket exists: a default or a defined one.
func (m *model) exists(name string) bool {
	_, ok := m.defined[name]
	return ok || IsDefault(name)
}

// apply applies the event stored at seq on subject. An event that is not a
// valid bucket event is skipped with an error (it still counts as applied):
// only Map writes these subjects, after validating, so a bad event is a
// foreign writer's, and skipping it is as deterministic as applying it.
func (m *model) Apply(seq uint64, subject string, data []byte) (changed bool, err error) {
	if seq <= m.applied {
		return false, nil // redelivered
	}
	m.applied = seq
	switch {
	case strings.HasPrefix(subject, subjectBucket):
		changed, err = m.applyBucket(subject[len(subjectBucket):], data)
	case strings.HasPrefix(subject, subjectAssign):
		changed, err = m.applyAssign(subject[len(subjectAssign):], data)
		if errors.Is(err, errRejected) {
			m.rejected = append(m.rejected, seq)
			if len(m.rejected) > maxRejected {
				m.rejected = slices.Delete(m.rejected, 0, len(m.rejected)-maxRejected)
			}
		}
	default:
		err = fmt.Errorf("subject %q: not a bucket event", clip(subject))
	}
	if changed {
		m.version++
	}
	return changed, err
}

func (m *model) applyBucket(key string, data []byte) (bool, error) {
	pb := new(bucketspb.Bucket)
	if err := proto.Unmarshal(data, pb); err != nil {
		return false, fmt.Errorf("bucket %q: decode: %w", clip(key), err)
	}
	if pb.Name != key {
		return false, fmt.Errorf("bucket %q on subject of %q", clip(pb.Name), clip(key))
	}
	if pb.Removed {
		if err := checkName(pb.Name); err != nil {
			return false, err
		}
		if _, ok := m.defined[pb.Name]; !ok {
			return false, nil
		}
		delete(m.defined, pb.Name)
		// A default bucket cannot disappear: removing it (which Remove
		// refuses) reverts it to its built-in settings and keeps its
		// businesses. A custom bucket's businesses go back to the default
		// rule, and stay there if a bucket of that name comes back.
		if !IsDefault(pb.Name) {
			maps.DeleteFunc(m.assign, func(_, bucket string) bool { return bucket == pb.Name })
		}
		return true, nil
	}
	if err := checkDefinition(pb); err != nil {
		return false, err
	}
	b := bucketOf(pb)
	if old, ok := m.defined[b.Name]; ok && old == b {
		return false, nil
	}
	m.defined[b.Name] = b
	return true, nil
}

func (m *model) applyAssign(key string, data []byte) (bool, error) {
	pb := new(bucketspb.Assignment)
	if err := proto.Unmarshal(data, pb); err != nil {
		return false, fmt.Errorf("assignment of %q: decode: %w", clip(key), err)
	}
	if pb.Business != key || !oplog.ValidBusiness(pb.Business) {
		return false, fmt.Errorf("assignment of %q on subject of %q", clip(pb.Business), clip(key))
	}
	old, had := m.assign[pb.Business]
	if pb.Bucket == "" {
		delete(m.assign, pb.Business)
		return had, nil
	}
	if !m.exists(pb.Bucket) {
		return false, fmt.Errorf("business %s to bucket %q: %w", pb.Business, clip(pb.Bucket), errRejected)
	}
	if had && old == pb.Bucket {
		return false, nil
	}
	m.assign[pb.Business] = pb.Bucket
	return true, nil
}

// snapshot is an immutable view of a model, published by a Map for
// lock-free reads.
type snapshot struct {
	version  uint64
	order    []Bucket          // every bucket, by priority then name
	pos      map[string]int    // bucket name → index in order
	assign   map[string]int    // business → index in order (assigned only)
	names    map[string]string // business → bucket (assigned only), as written
	rejected []uint64
	// Indexes of the default rule's buckets in order.
	device, user, multi int
}

// snapshot builds the immutable view of the model.
func (m *model) Snapshot() *snapshot {
	s := &snapshot{
		version:  m.version,
		order:    make([]Bucket, 0, len(defaults)+len(m.defined)),
		pos:      make(map[string]int, len(defaults)+len(m.defined)),
		assign:   make(map[string]int, len(m.assign)),
		names:    maps.Clone(m.assign),
		rejected: slices.Clone(m.rejected),
	}
	for _, b := range defaults {
		if _, ok := m.defined[b.Name]; !ok {
			s.order = append(s.order, b)
		}
	}
	for _, b := range m.defined {
		s.order = append(s.order, b)
	}
	slices.SortFunc(s.order, func(a, b Bucket) int {
		return cmp.Or(cmp.Compare(a.Priority, b.Priority), strings.Compare(a.Name, b.Name))
	})
	for i, b := range s.order {
		s.pos[b.Name] = i
	}
	for business, bucket := range m.assign {
		s.assign[business] = s.pos[bucket]
	}
	s.device, s.user, s.multi = s.pos[Device], s.pos[User], s.pos[MultiDevice]
	if s.names == nil {
		s.names = map[string]string{}
	}
	return s
}

// index returns the position in s.order of a business's bucket.
func (s *snapshot) index(b *oplogpb.Business) int {
	if i, ok := s.assign[b.GetCode()]; ok {
		return i
	}
	switch DefaultRule(b) {
	case Device:
		return s.device
	case User:
		return s.user
	default:
		return s.multi
	}
}

// wasRejected reports whether the assignment stored at seq was rejected.
func (s *snapshot) wasRejected(seq uint64) bool {
	return slices.Contains(s.rejected, seq)
}

// Group is one bucket computation: the bucket's settings when the plan was
// made and the businesses it serves, in the order they were given.
type Group struct {
	Bucket     Bucket
	Businesses []*oplogpb.Business
}

// planStack is how many businesses plan sorts without a heap allocation
// for its scratch space.
const planStack = 256

// plan groups businesses by bucket: non-empty groups only, by priority
// then name. It makes two allocations whatever the number of businesses:
// the groups, and one backing array their business lists share (plus
// scratch space past planStack businesses or 32 buckets).
func (s *snapshot) plan(businesses []*oplogpb.Business) []Group {
	var idxBuf [planStack]int32
	var idx []int32
	if len(businesses) <= planStack {
		idx = idxBuf[:len(businesses)]
	} else {
		idx = make([]int32, len(businesses))
	}
	var countBuf [32]int
	var counts []int
	if len(s.order) <= len(countBuf) {
		counts = countBuf[:len(s.order)]
	} else {
		counts = make([]int, len(s.order))
	}
	n, groups := 0, 0
	for i, b := range businesses {
		if b == nil {
			idx[i] = -1
			continue
		}
		k := s.index(b)
		idx[i] = int32(k)
		if counts[k] == 0 {
			groups++
		}
		counts[k]++
		n++
	}
	if groups == 0 {
		return nil
	}
	// counts becomes each bucket's start in backing, then its fill cursor,
	// which ends at the next non-empty bucket's start.
	start := 0
	for k, c := range counts {
		counts[k] = start
		start += c
	}
	backing := make([]*oplogpb.Business, n)
	for i, b := range businesses {
		if k := idx[i]; k >= 0 {
			backing[counts[k]] = b
			counts[k]++
		}
	}
	out := make([]Group, 0, groups)
	start = 0
	for k, end := range counts {
		if end > start {
			out = append(out, Group{Bucket: s.order[k], Businesses: backing[start:end:end]})
		}
		start = end
	}
	return out
}
