package gateway

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
)

// Topics (read diffusion).
//
// A session follows the topics of its user plus topics.Everyone. Each
// topic message is stored once; the node's topics projection hands it to
// the watches of its topic (one registration per session and topic, no
// NATS subscription per session), and the session sends it if the user's
// follow covers its id (topics.Follow.Covers: from < id, and id <= until
// once unfollowed). Follow and unfollow events of the user reach the
// session through a follow watch once the follows projection has applied
// them; a follow registers the topic's watch and then starts a round (its
// backfill and anything published before the watch existed), an unfollow
// starts one too (what is left up to until). The topics package hands an
// unfollow to the watchers before any message past its until, so a
// session never sends one.
//
// Topic ids are the topic stream's, shared by every user: a cursor is the
// device's, and needs no reset when the user changes.
//
// Everyone's messages reach every session through one watch of the
// server's (Server.onEveryone). An idle session pays for Everyone two
// cursors; the maps of followed topics are allocated when the user follows
// something.

// topicState is a session's topic bookkeeping, allocated when the server
// serves topics. Guarded by the session's mutex.
type topicState struct {
	allPoint topics.Cursor // Everyone's cursor: the next round starts there
	allSent  topics.Cursor // Everyone's highest id sent

	// Other topics; nil until used.
	points  map[string]topics.Cursor // the next round's starting cursors
	sent    map[string]topics.Cursor // highest id sent per topic
	follows map[string]topics.Follow // the bound user's follows
	watches map[string]*topics.Watch

	fuser  string      // the user whose follow events reach the session (Server.watchUser)
	gate   *followGate // its gate
	resets []string    // topics to report reset in the next round
}

// cursor returns where the next round starts a topic.
func (ts *topicState) cursor(topic string) (topics.Cursor, bool) {
	if topic == topics.Everyone {
		return ts.allPoint, ts.allPoint != topics.Cursor{}
	}
	c, ok := ts.points[topic]
	return c, ok
}

// sentOf returns the highest id sent of a topic.
func (ts *topicState) sentOf(topic string) (topics.Cursor, bool) {
	if topic == topics.Everyone {
		return ts.allSent, ts.allSent != topics.Cursor{}
	}
	c, ok := ts.sent[topic]
	return c, ok
}

func (ts *topicState) setSent(topic string, c topics.Cursor) {
	if topic == topics.Everyone {
		ts.allSent = c
		return
	}
	if ts.sent == nil {
		ts.sent = map[string]topics.Cursor{}
	}
	ts.sent[topic] = c
}

// covers reports whether the session delivers a live message of a topic:
// Everyone's always, another topic's when the user's follow covers it. A
// follow of another epoch (the topic stream was recreated) covers the new
// epoch while it lasts: the backlog reads it from the start.
func (ts *topicState) covers(e *oplogpb.Entry) bool {
	if e.Topic == topics.Everyone {
		return true
	}
	f, ok := ts.follows[e.Topic]
	if !ok {
		return false
	}
	if f.Epoch != e.Epoch {
		return f.Following
	}
	return f.Covers(e.Id)
}

// newTopicState starts a session's topic state from its Hello's cursors.
func newTopicState(cursors map[string]topics.Cursor) *topicState {
	ts := &topicState{}
	for t, c := range cursors {
		if t == topics.Everyone {
			ts.allPoint = c
			continue
		}
		if ts.points == nil {
			ts.points = make(map[string]topics.Cursor, len(cursors))
		}
		ts.points[t] = c
	}
	return ts
}

// topicPlan is what a session needs to follow a user's topics, prepared
// before the critical section that binds the user (see bindUser). Follow
// events that arrive before it is applied are kept in pending and applied
// after the snapshot, newest (by Seq) winning.
type topicPlan struct {
	ss      *session
	user    string                   // whose follow events are routed to the session, if any
	follows map[string]topics.Follow // the snapshot: Following's answer
	names   []string                 // new registrations, by topic
	watches []*topics.Watch
	gate    *followGate
}

// followGate holds a follow watch's events until its plan is applied. The
// watch's callback keeps it (not the plan) for the life of the session.
type followGate struct {
	applied bool
	pending []topics.Follow
}

// prepareTopics registers what following user's topics (and
// topics.Everyone) takes: the follow watch first, so a follow made while
// the index is read is not missed (it is kept in the plan until applied);
// then the index (one prefix scan); then a watch per followed topic the
// session does not watch yet. Until applyTopicsLocked swaps the session's
// follows, the new topics' messages are filtered out, and with it a round
// starts: nothing is sent live ahead of the round that reads it.
func (ss *session) prepareTopics(user string) (*topicPlan, error) {
	tp := ss.srv.cfg.Topics
	if tp == nil {
		return nil, nil
	}
	plan := &topicPlan{ss: ss, gate: &followGate{}}
	if user != "" {
		plan.user = user
		ss.srv.watchUser(user, ss, plan.gate)
		ctx, cancel := context.WithTimeout(context.Background(), ss.srv.cfg.WriteTimeout)
		list, err := tp.Following(ctx, user)
		cancel()
		if err != nil {
			plan.release()
			return nil, fmt.Errorf("following: %w", err)
		}
		for _, f := range list {
			if plan.follows == nil {
				plan.follows = make(map[string]topics.Follow, len(list))
			}
			plan.follows[f.Topic] = f
		}
	}
	ss.mu.Lock()
	var watching map[string]*topics.Watch
	if ss.topics != nil {
		watching = ss.topics.watches
	}
	for name, f := range plan.follows {
		if _, ok := watching[name]; !ok && f.Following {
			plan.names = append(plan.names, name)
		}
	}
	ss.mu.Unlock()
	for _, name := range plan.names {
		w, err := tp.Watch(name, ss.onTopic)
		if err != nil {
			plan.release()
			return nil, fmt.Errorf("watch topic %s: %w", name, err)
		}
		plan.watches = append(plan.watches, w)
	}
	return plan, nil
}

// release stops what a plan registered.
func (p *topicPlan) release() {
	if p == nil {
		return
	}
	if p.user != "" {
		p.ss.srv.unwatchUser(p.user, p.gate)
	}
	for _, w := range p.watches {
		w.Stop()
	}
}

// applyTopicsLocked makes plan the session's topics (ss.topics exists: the
// server serves topics). It returns what the caller must release after
// unlocking (the previous user's registrations), and the topics followed
// by events that came while the plan was prepared: the caller registers
// their watches after unlocking, then asks for a round.
func (ss *session) applyTopicsLocked(plan *topicPlan) (old *topicPlan, late []string) {
	if plan == nil {
		return nil, nil
	}
	ts := ss.topics
	old = &topicPlan{ss: ss, user: ts.fuser, gate: ts.gate}
	ts.fuser, ts.follows, ts.gate = plan.user, plan.follows, plan.gate
	for name, w := range ts.watches {
		if f, ok := plan.follows[name]; !ok || !f.Following {
			old.watches = append(old.watches, w)
			delete(ts.watches, name)
		}
	}
	for i, name := range plan.names {
		if _, dup := ts.watches[name]; dup {
			old.watches = append(old.watches, plan.watches[i])
			continue
		}
		if ts.watches == nil {
			ts.watches = map[string]*topics.Watch{}
		}
		ts.watches[name] = plan.watches[i]
	}
	plan.gate.applied = true
	for _, f := range plan.gate.pending {
		if ss.followLocked(f) {
			late = append(late, f.Topic)
		}
	}
	plan.gate.pending = nil
	return old, late
}

// followLocked applies a follow event to the session's follows unless a
// newer state of the relation is known. It reports whether the topic now
// needs a watch the session does not have.
func (ss *session) followLocked(f topics.Follow) bool {
	ts := ss.topics
	if cur, ok := ts.follows[f.Topic]; ok && f.Seq != 0 && cur.Seq >= f.Seq {
		return false // a state at least as new is known
	}
	if ts.follows == nil {
		ts.follows = map[string]topics.Follow{}
	}
	ts.follows[f.Topic] = f
	if f.Following {
		if _, ok := ts.sent[f.Topic]; !ok {
			// The device gets the topic from the follow point on: that is
			// its cursor, so an unfollow's remainder is read for it even
			// if nothing was sent before.
			ts.setSent(f.Topic, topics.Cursor{ID: f.From, Epoch: f.Epoch})
		}
	}
	_, watching := ts.watches[f.Topic]
	return f.Following && !watching
}

// watchTopic registers the session for a topic's live messages, unless it
// no longer needs to: the user changed, or no longer follows the topic.
func (ss *session) watchTopic(user, name string) error {
	w, err := ss.srv.cfg.Topics.Watch(name, ss.onTopic)
	if err != nil {
		return fmt.Errorf("watch topic %s: %w", name, err)
	}
	ss.mu.Lock()
	ts := ss.topics
	_, have := ts.watches[name]
	if !have && !ss.closing && ss.user == user && ts.follows[name].Following {
		if ts.watches == nil {
			ts.watches = map[string]*topics.Watch{}
		}
		ts.watches[name] = w
		w = nil
	}
	ss.mu.Unlock()
	if w != nil {
		w.Stop()
	}
	return nil
}

// stopTopicWatches ends every topic registration of the session.
func (ss *session) stopTopicWatches() {
	ss.mu.Lock()
	ts := ss.topics
	var ws []*topics.Watch
	var user string
	var gate *followGate
	if ts != nil {
		for _, w := range ts.watches {
			ws = append(ws, w)
		}
		clear(ts.watches)
		user, gate, ts.fuser, ts.gate = ts.fuser, ts.gate, "", nil
	}
	ss.mu.Unlock()
	for _, w := range ws {
		w.Stop()
	}
	if user != "" {
		ss.srv.unwatchUser(user, gate)
	}
}

// onFollow receives a follow or unfollow of the plan's user, on the
// follows projection's goroutine, after the follows projection applied it
// and before any topic message past an unfollow's until is dispatched. It
// never blocks. A follow registers the topic's watch first, then starts a
// round: the round reads what was published before the watch existed.
func (ss *session) onFollow(gate *followGate, f topics.Follow) {
	ss.mu.Lock()
	if ss.closing || ss.topics == nil {
		ss.mu.Unlock()
		return
	}
	if !gate.applied {
		gate.pending = append(gate.pending, f) // applied with the plan
		ss.mu.Unlock()
		return
	}
	if ss.topics.gate != gate || f.User != ss.user {
		ss.mu.Unlock()
		return // a previous user's
	}
	need := ss.followLocked(f)
	var stop *topics.Watch
	if !f.Following {
		stop = ss.topics.watches[f.Topic]
		delete(ss.topics.watches, f.Topic)
	}
	if !need {
		ss.startRoundLocked() // an unfollow's remainder up to until
	}
	ss.mu.Unlock()
	if stop != nil {
		stop.Stop()
	}
	if need {
		// Registering takes the topics hub's lock, never held while it
		// calls out, so it is safe on the projection's goroutine.
		if err := ss.watchTopic(f.User, f.Topic); err != nil {
			ss.logAt(zerolog.ErrorLevel).Err(err).Str("topic", f.Topic).Msg("topic not followed live")
		}
		ss.startRound()
	}
}

// onTopic receives a topic message from the topics projection: filtered
// for this client and queued, or held while a round runs. It never blocks.
func (ss *session) onTopic(e *oplogpb.Entry) {
	if ss.srv.dropLive(e) {
		return
	}
	ss.offerTopic(e)
}

// dropLive reports whether a live topic message is for no session: expired,
// or suppressed.
func (s *Server) dropLive(e *oplogpb.Entry) bool {
	return (e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(time.Now())) || s.suppressed(e)
}

// offerTopic is onTopic past the checks that hold for every session
// (dropLive).
func (ss *session) offerTopic(e *oplogpb.Entry) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closing || ss.topics == nil || (e.Conditions != nil && !oplog.Match(e.Conditions, ss.attrs.Value())) || !ss.topics.covers(e) {
		return
	}
	if ss.holdLocked(e) {
		return
	}
	ss.sendTopicLocked(e)
}

// sendTopicLocked queues a live topic message unless the client has it.
func (ss *session) sendTopicLocked(e *oplogpb.Entry) {
	ts := ss.topics
	if ts == nil || (ss.deferral != nil && ss.deferral.topics) {
		return // deferred: a later round reads it
	}
	if !ts.covers(e) {
		return // held before an unfollow or a change of user
	}
	last, ok := ts.sentOf(e.Topic)
	if ok && last.Epoch != e.Epoch && last.ID != 0 {
		ss.startRoundLocked() // the topic stream was recreated: resync
		return
	}
	if ok && e.Id <= last.ID {
		return
	}
	if p, ok := ts.cursor(e.Topic); ok && p.Epoch == e.Epoch && e.Id <= p.ID {
		return
	}
	ts.setSent(e.Topic, topics.Cursor{ID: e.Id, Epoch: e.Epoch})
	ss.enqueueLocked(liveFrame(e), true)
	ss.sentPush(e)
}

// topicCursorsLocked returns where the next round starts each topic.
func (ss *session) topicCursorsLocked() map[string]topics.Cursor {
	ts := ss.topics
	if ts == nil {
		return nil
	}
	out := make(map[string]topics.Cursor, len(ts.points)+len(ts.sent)+1)
	for t, c := range ts.points {
		out[t] = c
	}
	for t, c := range ts.sent {
		if cur, ok := out[t]; !ok || cur.Epoch != c.Epoch || cur.ID < c.ID {
			out[t] = c
		}
	}
	all := ts.allPoint
	if s := ts.allSent; s != (topics.Cursor{}) && (all.Epoch != s.Epoch || all.ID < s.ID) {
		all = s
	}
	if all != (topics.Cursor{}) {
		out[topics.Everyone] = all
	}
	return out
}

// setTopicCursorsLocked records where a round left each topic.
func (ss *session) setTopicCursorsLocked(c map[string]topics.Cursor) {
	ts := ss.topics
	if ts == nil || c == nil {
		return
	}
	ts.allPoint = c[topics.Everyone]
	delete(c, topics.Everyone)
	if len(c) == 0 {
		c = nil
	}
	ts.points = c
}

func (ss *session) topicSentLocked(topic string, c topics.Cursor) {
	if ss.topics != nil {
		ss.topics.setSent(topic, c)
	}
}

// topics reads the topic backlog in pages and emits it; it returns the
// reads it took.
func (r *round) topics(ctx context.Context) (int, error) {
	cfg := &r.ss.srv.cfg
	reads := 0
	for first := true; ; first = false {
		var bl *topics.Backlog
		err := r.read(func() (err error) {
			bl, err = cfg.Topics.Backlog(ctx, topics.BacklogRequest{User: r.user, Device: r.ss.device, Cursors: r.cursors,
				Attrs: r.attrs, Limit: 4 * cfg.SyncBatch})
			return err
		})
		if err != nil {
			return reads, err
		}
		reads += bl.Reads
		if first {
			for _, t := range bl.Reset {
				r.cursors[t] = topics.Cursor{}
			}
			r.tresets = append(r.tresets, bl.Reset...)
		}
		items := make([]*gatewaypb.Item, 0, len(bl.Entries))
		for _, e := range bl.Entries {
			if !r.ss.srv.suppressed(e) {
				items = append(items, itemOf(e))
				r.ss.sentPush(e)
			}
			r.cursors[e.Topic] = topics.Cursor{ID: e.Id, Epoch: e.Epoch}
		}
		if err := r.emit(items); err != nil {
			return reads, err
		}
		if !bl.More {
			return reads, nil
		}
	}
}

// topicCursors converts and checks client topic cursors.
func topicCursors(in []*gatewaypb.TopicCursor) (map[string]topics.Cursor, error) {
	if len(in) > maxTopics {
		return nil, fmt.Errorf("%d topic cursors, at most %d", len(in), maxTopics)
	}
	var out map[string]topics.Cursor
	for _, c := range in {
		if !oplog.ValidID(c.Topic) {
			return nil, fmt.Errorf("cursor of topic %.40q: bad name", c.Topic)
		}
		if out == nil {
			out = make(map[string]topics.Cursor, len(in))
		}
		out[c.Topic] = topics.Cursor{ID: c.Id, Epoch: c.Epoch}
	}
	return out, nil
}
