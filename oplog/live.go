package oplog

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// Live delivery.
//
// Stored entries reach watchers from the projection itself: once a
// projector has committed a batch to badger, it hands the entries of
// watched targets to their watchers, in id order. So an entry is delivered
// live only once a backlog read would also return it, and every node that
// runs an Inbox (each projects every shard) can serve every target without
// another trip through NATS. This replaces the stream's RePublish, which
// cost the stream a last-message lookup per stored message (to fill
// Nats-Last-Sequence): 14% of the producer path's CPU at 1,000,000 users.
//
// Transient entries are never stored; the Log publishes them on the
// target's live subject (SubjectLive). An Inbox holds one core NATS
// subscription to every live subject and hands each transient entry to
// the watchers of its target, if any. One subscription per node rather
// than one per watched target: per-target subscriptions cost each
// connection about 2 KiB (client and server side) and a SUB at every
// connect, measured with 10,000 links (README, Performance); the price is
// that with several nodes each receives every transient entry.

// transientQueue is the capacity of the transient channel; beyond it NATS
// drops entries (slow consumer), which is what transient means.
const transientQueue = 1 << 16

// Watch is a registration made by Inbox.Watch; Stop ends it.
type Watch struct {
	in   *Inbox
	key  liveKey
	fn   func(*oplogpb.Entry)
	once sync.Once
}

type liveKey struct {
	shard  uint32
	dim    oplogpb.Dimension
	target string
}

// liveTarget is the watchers of one target.
type liveTarget struct {
	watches []*Watch
}

// live is an Inbox's registry of watchers.
type live struct {
	mu      sync.RWMutex
	targets map[liveKey]*liveTarget
	n       atomic.Int64 // len(targets), read without the lock on the apply path

	transient chan *nats.Msg
	sub       *nats.Subscription // to every live subject
	// delivered is, per shard, the highest stored sequence handed to
	// watchers; entries re-applied by a rebuild are not delivered again.
	// Each element is touched only by its shard's projector goroutine.
	delivered []uint64
}

func newLive(shards int) *live {
	return &live{
		targets:   map[liveKey]*liveTarget{},
		transient: make(chan *nats.Msg, transientQueue),
		delivered: make([]uint64, shards),
	}
}

// Watch calls fn with every entry of one target (a user or device inbox)
// that becomes readable after the call: each stored entry once the
// projection has applied it, in id order, with Id, Epoch and Shard set; and
// each transient entry published for the target while the watch is open,
// with Id 0. Stored entries are delivered after a backlog read would also
// return them, so a reader that watches first and reads the backlog second
// misses nothing; it may see an entry twice and dedupes by id.
//
// Watch leaves out only entries expired already; the caller matches
// conditions (Match) against its client. (Single-device marks need no
// check here: no device can have acked an entry that is only now being
// delivered.) fn runs on the projection's goroutine (stored entries) or
// the transient dispatcher, possibly concurrently; it must be quick and
// must not block (it holds up the projection). The entry is shared with
// the target's other watchers: do not modify it.
func (in *Inbox) Watch(dim oplogpb.Dimension, target string, fn func(*oplogpb.Entry)) (*Watch, error) {
	if err := checkID("target", target); err != nil {
		return nil, err
	}
	if dim != oplogpb.Dimension_DIMENSION_USER && dim != oplogpb.Dimension_DIMENSION_DEVICE {
		return nil, fmt.Errorf("oplog: watch: dimension %v: %w", dim, ErrInvalid)
	}
	key := liveKey{shard: ShardOf(target, in.lg.Shards()), dim: dim, target: target}
	w := &Watch{in: in, key: key, fn: fn}
	lv := in.live
	lv.mu.Lock()
	defer lv.mu.Unlock()
	t := lv.targets[key]
	if t == nil {
		t = &liveTarget{}
		lv.targets[key] = t
		lv.n.Store(int64(len(lv.targets)))
	}
	t.watches = append(t.watches, w)
	return w, nil
}

// Stop ends the watch; fn is not called after Stop returns, except by a
// delivery already under way. Idempotent.
func (w *Watch) Stop() {
	w.once.Do(func() {
		lv := w.in.live
		lv.mu.Lock()
		defer lv.mu.Unlock()
		t := lv.targets[w.key]
		if t == nil {
			return
		}
		t.watches = slices.DeleteFunc(t.watches, func(x *Watch) bool { return x == w })
		if len(t.watches) == 0 {
			delete(lv.targets, w.key)
			lv.n.Store(int64(len(lv.targets)))
		}
	})
}

// subscribe starts receiving transient entries (OpenInbox calls it, so
// that a watch made before Run misses none published after it).
func (in *Inbox) subscribeTransient() error {
	sub, err := in.lg.nc.ChanSubscribe("sluice.live.>", in.live.transient)
	if err != nil {
		return fmt.Errorf("oplog: subscribe to live subjects: %w", err)
	}
	in.live.sub = sub
	return nil
}

// watchers returns a copy of the watches of key, or nil.
func (lv *live) watchers(key liveKey) []*Watch {
	lv.mu.RLock()
	defer lv.mu.RUnlock()
	if t := lv.targets[key]; t != nil {
		return slices.Clone(t.watches)
	}
	return nil
}

// committed hands the newly applied entries of watched targets to their
// watchers. The shard's projector calls it after each commit, with the
// records of that commit in sequence order (some may have been applied
// before: they are skipped).
func (in *Inbox) committed(shard uint32, recs []Record) {
	lv := in.live
	if len(recs) == 0 {
		return
	}
	if lv.n.Load() == 0 {
		lv.delivered[shard] = max(lv.delivered[shard], recs[len(recs)-1].Seq)
		return
	}
	now := time.Now()
	for i := range recs {
		r := &recs[i]
		if r.Seq <= lv.delivered[shard] {
			continue
		}
		lv.delivered[shard] = r.Seq
		_, dim, target, _, err := ParseOplogSubject(r.Subject)
		if err != nil {
			continue // logged by applyEntry
		}
		ws := lv.watchers(liveKey{shard: shard, dim: dim, target: target})
		if len(ws) == 0 {
			continue
		}
		e := new(oplogpb.Entry)
		if err := proto.Unmarshal(r.Data, e); err != nil {
			in.log.Error().Err(err).Uint64("seq", r.Seq).Str("stream", StreamOplog(shard)).Msg("undecodable oplog entry not delivered live")
			continue
		}
		if e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(now) {
			continue
		}
		e.Id, e.Epoch, e.Shard = r.Seq, in.lg.Epoch(shard), shard
		for _, w := range ws {
			w.fn(e)
		}
	}
}

// dispatchTransient hands transient entries to their watchers until ctx
// ends.
func (in *Inbox) dispatchTransient(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-in.live.transient:
			in.deliverTransient(m)
		}
	}
}

func (in *Inbox) deliverTransient(m *nats.Msg) {
	shard, dim, target, _, err := ParseOplogSubject(m.Subject)
	if err != nil {
		in.log.Warn().Err(err).Msg("transient entry on a bad subject dropped")
		return
	}
	ws := in.live.watchers(liveKey{shard: shard, dim: dim, target: target})
	if len(ws) == 0 {
		return
	}
	e := new(oplogpb.Entry)
	if err := proto.Unmarshal(m.Data, e); err != nil {
		in.log.Warn().Err(err).Str("subject", m.Subject).Msg("undecodable transient entry dropped")
		return
	}
	epoch, _ := strconv.ParseUint(m.Header.Get(HeaderEpoch), 10, 64)
	e.Id, e.Epoch, e.Shard = 0, epoch, shard
	for _, w := range ws {
		w.fn(e)
	}
}

// all returns every open watch.
func (lv *live) all() []*Watch {
	lv.mu.RLock()
	defer lv.mu.RUnlock()
	var all []*Watch
	for _, t := range lv.targets {
		all = append(all, t.watches...)
	}
	return all
}
