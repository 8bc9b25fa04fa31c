package gateway

import (
	"context"
	"errors"
	"slices"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/topics"
)

// Sync rounds.
//
// A round computes what the client lacks, bucket by bucket (package
// buckets): each non-empty bucket is one backlog read over its
// businesses, in priority order, and the global bucket also reads the
// user's topics (read diffusion). Under load the scheduler defers
// lower-priority buckets: their businesses get nothing in this round and
// nothing live until a later round has read them, and the round's last
// frame tells the client when to ask again. The round ends with one Sync
// frame with done set.

// computation is one read of a round: a bucket's businesses (nil: every
// business) and, for the global bucket, the topics.
type computation struct {
	bucket     buckets.Bucket
	businesses []string
	topics     bool
}

// plan returns the computations of a round, in the order they run.
func (s *Server) plan() []computation {
	cfg := &s.cfg
	if cfg.Buckets == nil {
		return []computation{{bucket: buckets.Bucket{Name: "all"}, topics: cfg.Topics != nil}}
	}
	groups := cfg.Buckets.Plan(cfg.Inbox.Log().Businesses())
	out := make([]computation, 0, len(groups)+1)
	global := false
	for _, g := range groups {
		codes := make([]string, len(g.Businesses))
		for i, b := range g.Businesses {
			codes[i] = b.Code
		}
		isGlobal := g.Bucket.Name == buckets.Global
		if isGlobal {
			global = true
		}
		if cfg.PerBusiness {
			// The baseline the buckets are measured against: one read
			// per business.
			for i, code := range codes {
				out = append(out, computation{bucket: g.Bucket, businesses: []string{code}, topics: isGlobal && i == 0 && cfg.Topics != nil})
			}
			continue
		}
		out = append(out, computation{bucket: g.Bucket, businesses: codes, topics: isGlobal && cfg.Topics != nil})
	}
	if !global && cfg.Topics != nil {
		// Topics are computed in the global bucket even when no business
		// is in it.
		b, _ := cfg.Buckets.Bucket(buckets.Global)
		c := computation{bucket: b, businesses: []string{}, topics: true}
		i := 0
		for i < len(out) && out[i].bucket.Priority <= b.Priority {
			i++
		}
		out = slices.Insert(out, i, c)
	}
	return out
}

// startRound starts a sync round, or asks the running one for another.
func (ss *session) startRound() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.startRoundLocked()
}

func (ss *session) startRoundLocked() {
	if ss.closing {
		return
	}
	if ss.syncing {
		ss.again = true
		return
	}
	ss.syncing = true
	ss.roundDone = make(chan struct{})
	go ss.syncRounds(ss.roundDone)
}

// syncRounds sends the backlog after the session's points, then the live
// entries held meanwhile, and repeats while another round was asked for.
func (ss *session) syncRounds(done chan struct{}) {
	defer close(done)
	for {
		err := ss.syncRound()
		if errors.Is(err, errStaleRound) {
			// The user changed: drop what was held (the previous user's)
			// and run the round the change asked for.
			ss.mu.Lock()
			ss.held, ss.again = nil, false
			ss.mu.Unlock()
			continue
		}
		if err != nil {
			if !ss.isClosing() {
				ss.logAt(zerolog.ErrorLevel).Err(err).Msg("sync round failed")
				ss.fail(gatewaypb.Error_CODE_UNAVAILABLE, gatewaypb.GoAway_REASON_SHUTDOWN, "sync failed; reconnect")
			}
			return
		}
		ss.mu.Lock()
		if ss.closing {
			ss.mu.Unlock()
			return
		}
		held := ss.held
		ss.held = nil
		if ss.again {
			ss.again = false
			ss.mu.Unlock()
			continue // what was held is read again by the next round
		}
		for _, e := range held {
			if e.Topic != "" {
				ss.sendTopicLocked(e)
			} else {
				ss.sendLiveLocked(e)
			}
		}
		if ss.again { // an epoch change among the held entries
			ss.again = false
			ss.mu.Unlock()
			continue
		}
		ss.syncing = false
		ss.mu.Unlock()
		return
	}
}

// round is the state of one sync round: where each business and topic
// starts, and the Sync frame not yet queued (the last one gets done).
type round struct {
	ss      *session
	gen     uint64
	user    string
	attrs   oplog.Attrs
	points  map[string]oplog.SyncPoint
	stored  map[string]oplog.SyncPoint // the device's recorded points, read once per round
	cursors map[string]topics.Cursor
	resets  []string // businesses to report in the first frame
	tresets []string // topics likewise
	told    bool     // the resets went out
	pending *gatewaypb.Sync
	sched   *buckets.Scheduler
	readFor time.Duration // store time of the computation under way
}

// read runs one store read of the round, counted in flight by the
// scheduler only while it reads: time spent waiting for a slow client's
// queue to drain is not load on the node.
func (r *round) read(fn func() error) error {
	if r.sched == nil {
		return fn()
	}
	r.sched.Begin()
	start := time.Now()
	err := fn()
	r.readFor += time.Since(start)
	r.sched.End()
	return err
}

// errClosing ends a round whose session is closing.
var errClosing = errors.New("gateway: session closing")

// syncRound reads the backlog bucket by bucket, in pages, and queues it as
// Sync frames, waiting for queue space rather than overflowing it.
func (ss *session) syncRound() error {
	cfg := &ss.srv.cfg
	ss.mu.Lock()
	r := &round{ss: ss, gen: ss.gen, user: ss.user, attrs: ss.attrs.Value(), resets: ss.resets}
	ss.resets = nil
	if ss.topics != nil {
		r.tresets, ss.topics.resets = ss.topics.resets, nil
	}
	r.points = make(map[string]oplog.SyncPoint, len(ss.points)+len(ss.sent))
	for b, p := range ss.points {
		r.points[b] = p
	}
	for b, p := range ss.sent {
		if cur, ok := r.points[b]; !ok || cur.Epoch != p.Epoch || cur.ID < p.ID {
			r.points[b] = p
		}
	}
	r.cursors = ss.topicCursorsLocked()
	ss.mu.Unlock()
	// Shutting the session cancels the round's reads (no context is kept
	// per idle session: a cancel context costs one more allocation there).
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ss.mu.Lock()
	if ss.closing {
		ss.mu.Unlock()
		return nil
	}
	ss.roundCancel = cancel
	ss.mu.Unlock()
	defer func() {
		ss.mu.Lock()
		ss.roundCancel = nil
		ss.mu.Unlock()
	}()

	// The device's recorded sync points: one read for the whole round.
	sched := cfg.Scheduler
	r.sched = sched
	if err := r.read(func() (err error) {
		r.stored, err = cfg.Inbox.SyncPoints(ctx, ss.device)
		return err
	}); err != nil {
		return r.end(err)
	}
	total := 1
	var deferred []string
	deferredBiz := map[string]bool{}
	deferTopics := false
	var retry time.Duration
	for _, c := range ss.srv.plan() {
		if sched != nil {
			if ok, after := sched.Admit(c.bucket, time.Now()); !ok {
				deferred = append(deferred, c.bucket.Name)
				for _, b := range c.businesses {
					deferredBiz[b] = true
				}
				deferTopics = deferTopics || c.topics
				retry = max(retry, after)
				continue
			}
		}
		r.readFor = 0
		reads, err := r.businesses(ctx, c.businesses)
		if err == nil && c.topics {
			var n int
			n, err = r.topics(ctx)
			reads += n
		}
		if sched != nil && err == nil {
			sched.Record(c.bucket.Name, reads, r.readFor)
		}
		total += reads
		if err != nil {
			return r.end(err)
		}
	}
	if sched != nil {
		sched.Computation(total)
	}
	last := r.pending
	if last == nil {
		last = &gatewaypb.Sync{}
	}
	r.pending = nil
	last.Done = true
	slices.Sort(deferred)
	last.Deferred = slices.Compact(deferred)
	if len(deferred) > 0 {
		last.RetryAfterMs = uint32(max(retry, 100*time.Millisecond) / time.Millisecond)
	}
	if err := r.queue(last); err != nil {
		return r.end(err)
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.gen != r.gen {
		return errStaleRound
	}
	ss.points = r.points
	ss.setTopicCursorsLocked(r.cursors)
	ss.deferLocked(deferredBiz, deferTopics, retry)
	return nil
}

// end turns a round's error into syncRounds' terms.
func (r *round) end(err error) error {
	switch {
	case errors.Is(err, errClosing):
		return nil
	case errors.Is(err, errStaleRound):
		if !r.told && (len(r.resets) > 0 || len(r.tresets) > 0) {
			// Not told yet: the next round tells them.
			r.ss.mu.Lock()
			r.ss.resets = append(r.resets, r.ss.resets...)
			if r.ss.topics != nil {
				r.ss.topics.resets = append(r.tresets, r.ss.topics.resets...)
			}
			r.ss.mu.Unlock()
		}
	}
	return err
}

// businesses reads the backlog of some businesses (nil: all) in pages and
// emits it; it returns the inbox reads it took.
func (r *round) businesses(ctx context.Context, codes []string) (int, error) {
	if codes != nil && len(codes) == 0 {
		return 0, nil
	}
	cfg := &r.ss.srv.cfg
	reads := 0
	for first := true; ; first = false {
		var bl *oplog.Backlog
		err := r.read(func() (err error) {
			bl, err = cfg.Inbox.Backlog(ctx, oplog.BacklogRequest{User: r.user, Device: r.ss.device, Points: r.points,
				Attrs: r.attrs, Limit: 4 * cfg.SyncBatch, Businesses: codes, Recorded: r.stored})
			return err
		})
		if err != nil {
			return reads, err
		}
		reads += bl.Reads
		if first {
			for _, b := range bl.Reset {
				// The client's point was of an old epoch: the business
				// restarts from this epoch's beginning, reported once.
				r.points[b] = oplog.SyncPoint{}
			}
			r.resets = append(r.resets, bl.Reset...)
		}
		items := make([]*gatewaypb.Item, 0, len(bl.Entries))
		for _, e := range bl.Entries {
			if !r.ss.srv.suppressed(e) {
				items = append(items, itemOf(e))
				r.ss.sentPush(e)
			}
			r.points[e.Business] = oplog.SyncPoint{ID: e.Id, Epoch: e.Epoch}
		}
		if err := r.emit(items); err != nil {
			return reads, err
		}
		if !bl.More {
			return reads, nil
		}
	}
}

// emit splits items into Sync frames; each frame is queued once the next
// one exists, so that the round's last frame can carry done.
func (r *round) emit(items []*gatewaypb.Item) error {
	for len(items) > 0 {
		n := r.ss.batchLen(items)
		if r.pending != nil {
			if err := r.queue(r.pending); err != nil {
				return err
			}
		}
		r.pending = &gatewaypb.Sync{Items: items[:n]}
		items = items[n:]
	}
	return nil
}

// queue queues one Sync frame, carrying the resets if none went out yet.
func (r *round) queue(s *gatewaypb.Sync) error {
	if !r.told {
		resets := slices.Clone(r.resets)
		slices.Sort(resets)
		s.Resets = slices.Compact(resets)
		tresets := slices.Clone(r.tresets)
		slices.Sort(tresets)
		s.TopicResets = slices.Compact(tresets)
	}
	switch r.ss.enqueueWait(&gatewaypb.Frame{Body: &gatewaypb.Frame_Sync{Sync: s}}, s.Items, r.gen) {
	case queueClosing:
		return errClosing
	case queueStale:
		return errStaleRound
	}
	r.told = true
	return nil
}

// batchLen is how many of items go in one frame: at most SyncBatch, and
// at most half the frame limit of payload (at least one item).
func (ss *session) batchLen(items []*gatewaypb.Item) int {
	limit := ss.srv.codec.MaxFrame() / 2
	size := 0
	for i, it := range items {
		size += itemSize(it)
		if i > 0 && (i == ss.srv.cfg.SyncBatch || size > limit) {
			return i
		}
	}
	return len(items)
}

func itemSize(it *gatewaypb.Item) int {
	return 64 + len(it.Payload) + len(it.Business) + len(it.ContentType) + len(it.MessageId) + len(it.Topic)
}

// enqueueWait queues a Sync frame once there is room, recording its items
// as sent.
func (ss *session) enqueueWait(f *gatewaypb.Frame, items []*gatewaypb.Item, gen uint64) queueResult {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for !ss.closing && ss.gen == gen && (len(ss.queue) >= ss.srv.cfg.SendQueue/2 || ss.queued >= ss.srv.cfg.SendBytes/2) {
		ss.room.Wait()
	}
	switch {
	case ss.closing:
		return queueClosing
	case ss.gen != gen:
		return queueStale
	}
	for _, it := range items {
		if it.Topic != "" {
			ss.topicSentLocked(it.Topic, topics.Cursor{ID: it.Id, Epoch: it.Epoch})
			continue
		}
		ss.sent[it.Business] = oplog.SyncPoint{ID: it.Id, Epoch: it.Epoch}
	}
	ss.enqueueLocked(f, false)
	return queued
}

// queueResult is what enqueueWait did with a frame.
type queueResult int

const (
	queued       queueResult = iota
	queueClosing             // the session is closing: nothing queued
	queueStale               // the bound user changed since the round began
)

// errStaleRound ends a round read for a user no longer bound.
var errStaleRound = errors.New("gateway: sync round of a previous user")

// deferral is what a round deferred: the businesses (and whether the
// topics) whose live entries wait for a later round, and the timer that
// runs that round if the client does not ask for it. Allocated only when
// a round defers something: an idle session keeps a nil pointer.
type deferral struct {
	businesses map[string]bool
	topics     bool
	retry      *time.Timer
}

// deferredLocked reports whether a business's bucket was deferred.
func (ss *session) deferredLocked(business string) bool {
	return ss.deferral != nil && ss.deferral.businesses[business]
}

// deferLocked records the businesses (and topics) a round deferred: their
// live entries are dropped until a later round reads them. The client is
// told when to come back (it adds up to a quarter of jitter); if it does
// not, a round runs by itself half as late again.
func (ss *session) deferLocked(biz map[string]bool, topics bool, retry time.Duration) {
	if ss.closing {
		return
	}
	if len(biz) == 0 && !topics {
		if ss.deferral != nil {
			ss.deferral.retry.Stop()
			ss.deferral = nil
		}
		return
	}
	after := max(retry, 100*time.Millisecond)
	after += after / 2
	if ss.deferral == nil {
		ss.deferral = &deferral{retry: time.AfterFunc(after, ss.startRound)}
	} else {
		ss.deferral.retry.Reset(after)
	}
	ss.deferral.businesses, ss.deferral.topics = biz, topics
}
