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
// follow covers its id: from < id <= until (until 0 while following).
// Follow and unfollow events of the user reach the session through
// WatchFollows once the follows projection has applied them; a follow
// starts a round (its backfill and anything published before the watch
// existed), an unfollow too (what is left up to until).
//
// Topic ids are the topic stream's, shared by every user: a cursor is the
// device's, and needs no reset when the user changes.

// topicState is a session's topic bookkeeping, allocated when the server
// serves topics.
type topicState struct {
	points  map[string]topics.Cursor // the next round's starting cursors
	sent    map[string]topics.Cursor // highest id sent per topic
	follows map[string]topics.Follow
	watches map[string]*topics.Watch
	fwatch  *topics.FollowWatch
}

// topicPlan is what a session needs to follow a user's topics, prepared
// before the critical section that binds the user (see bindUser).
type topicPlan struct {
	fwatch  *topics.FollowWatch
	follows map[string]topics.Follow
	watches []*topics.Watch // new registrations, by topic in names
	names   []string
}

// prepareTopics registers what following user's topics (and
// topics.Everyone) takes: the follow watch first, so a follow made while
// the index is read is not missed; then the index (one prefix scan); then
// a watch per followed topic the session does not watch yet. Until
// applyTopicsLocked swaps the session's follows, the new topics' messages
// are filtered out, and with it a round starts: nothing is sent live ahead
// of the round that reads it.
func (ss *session) prepareTopics(user string) (*topicPlan, error) {
	tp := ss.srv.cfg.Topics
	if tp == nil {
		return nil, nil
	}
	plan := &topicPlan{follows: map[string]topics.Follow{topics.Everyone: {Topic: topics.Everyone, Following: true}}}
	if user != "" {
		var err error
		if plan.fwatch, err = tp.WatchFollows(user, ss.onFollow); err != nil {
			return nil, fmt.Errorf("watch follows: %w", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), ss.srv.cfg.WriteTimeout)
		list, err := tp.Following(ctx, user)
		cancel()
		if err != nil {
			plan.release()
			return nil, fmt.Errorf("following: %w", err)
		}
		for _, f := range list {
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
	if p.fwatch != nil {
		p.fwatch.Stop()
	}
	for _, w := range p.watches {
		w.Stop()
	}
}

// applyTopicsLocked makes plan the session's topics. It returns what the
// caller must release after unlocking: the previous user's registrations.
func (ss *session) applyTopicsLocked(plan *topicPlan) (old *topicPlan) {
	if plan == nil {
		return nil
	}
	if ss.topics == nil {
		ss.topics = &topicState{points: map[string]topics.Cursor{}, sent: map[string]topics.Cursor{}, watches: map[string]*topics.Watch{}}
	}
	ts := ss.topics
	old = &topicPlan{fwatch: ts.fwatch}
	ts.fwatch, ts.follows = plan.fwatch, plan.follows
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
		ts.watches[name] = plan.watches[i]
	}
	return old
}

// watchTopic registers the session for a topic's live messages.
func (ss *session) watchTopic(name string) error {
	w, err := ss.srv.cfg.Topics.Watch(name, ss.onTopic)
	if err != nil {
		return fmt.Errorf("watch topic %s: %w", name, err)
	}
	ss.mu.Lock()
	ts := ss.topics
	_, have := ts.watches[name]
	if !have && !ss.closing {
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
	var fw *topics.FollowWatch
	if ts != nil {
		for _, w := range ts.watches {
			ws = append(ws, w)
		}
		clear(ts.watches)
		fw, ts.fwatch = ts.fwatch, nil
	}
	ss.mu.Unlock()
	for _, w := range ws {
		w.Stop()
	}
	if fw != nil {
		fw.Stop()
	}
}

// onFollow receives a follow or unfollow of the session's user, on the
// follows projection's goroutine. It never blocks.
func (ss *session) onFollow(f topics.Follow) {
	ss.mu.Lock()
	if ss.closing || ss.topics == nil || f.User != ss.user {
		ss.mu.Unlock()
		return
	}
	ts := ss.topics
	ts.follows[f.Topic] = f
	w, watching := ts.watches[f.Topic]
	if !f.Following && watching {
		delete(ts.watches, f.Topic)
	}
	// A new follow reads its backfill and whatever was published before
	// the watch existed; an unfollow, what is left up to until.
	ss.startRoundLocked()
	ss.mu.Unlock()
	switch {
	case !f.Following && watching:
		w.Stop()
	case f.Following && !watching:
		// Registering takes the topics hub's lock, never held while it
		// calls out, so it is safe on the projection's goroutine.
		if err := ss.watchTopic(f.Topic); err != nil {
			ss.logAt(zerolog.ErrorLevel).Err(err).Str("topic", f.Topic).Msg("topic not followed live")
		}
	}
}

// onTopic receives a topic message from the topics projection: filtered
// for this client and queued, or held while a round runs. It never blocks.
func (ss *session) onTopic(e *oplogpb.Entry) {
	if e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(time.Now()) {
		return
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closing || ss.topics == nil || !oplog.Match(e.Conditions, ss.attrs) {
		return
	}
	if f, ok := ss.topics.follows[e.Topic]; !ok || !f.Covers(e.Id) {
		return
	}
	if ss.syncing {
		if len(ss.held) >= ss.srv.cfg.HeldLive {
			ss.held = ss.held[:0]
			ss.again = true
			return
		}
		ss.held = append(ss.held, e)
		return
	}
	ss.sendTopicLocked(e)
}

// sendTopicLocked queues a live topic message unless the client has it.
func (ss *session) sendTopicLocked(e *oplogpb.Entry) {
	ts := ss.topics
	if ts == nil || ss.deferTopics {
		return // deferred: a later round reads it
	}
	if f, ok := ts.follows[e.Topic]; !ok || !f.Covers(e.Id) {
		return // held before an unfollow or a change of user
	}
	last, ok := ts.sent[e.Topic]
	if ok && last.Epoch != e.Epoch && last.ID != 0 {
		ss.again = true // the topic stream was recreated: resync
		ss.startRoundLocked()
		return
	}
	if ok && e.Id <= last.ID {
		return
	}
	if p, ok := ts.points[e.Topic]; ok && p.Epoch == e.Epoch && e.Id <= p.ID {
		return
	}
	ts.sent[e.Topic] = topics.Cursor{ID: e.Id, Epoch: e.Epoch}
	ss.enqueueLocked(liveFrame(e), true)
}

// topicCursorsLocked returns where the next round starts each topic.
func (ss *session) topicCursorsLocked() map[string]topics.Cursor {
	ts := ss.topics
	if ts == nil {
		return nil
	}
	out := make(map[string]topics.Cursor, len(ts.points)+len(ts.sent))
	for t, c := range ts.points {
		out[t] = c
	}
	for t, c := range ts.sent {
		if cur, ok := out[t]; !ok || cur.Epoch != c.Epoch || cur.ID < c.ID {
			out[t] = c
		}
	}
	return out
}

func (ss *session) setTopicCursorsLocked(c map[string]topics.Cursor) {
	if ss.topics != nil && c != nil {
		ss.topics.points = c
	}
}

func (ss *session) topicSentLocked(topic string, c topics.Cursor) {
	if ss.topics != nil {
		ss.topics.sent[topic] = c
	}
}

// topics reads the topic backlog in pages and emits it; it returns the
// reads it took.
func (r *round) topics(ctx context.Context) (int, error) {
	cfg := &r.ss.srv.cfg
	reads := 0
	for first := true; ; first = false {
		bl, err := cfg.Topics.Backlog(ctx, topics.BacklogRequest{User: r.user, Device: r.ss.device, Cursors: r.cursors,
			Attrs: r.attrs, Limit: 4 * cfg.SyncBatch})
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
			it := itemOf(e)
			items = append(items, it)
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
	out := make(map[string]topics.Cursor, len(in))
	for _, c := range in {
		if !oplog.ValidID(c.Topic) && c.Topic != topics.Everyone {
			return nil, fmt.Errorf("cursor of topic %.40q: bad name", c.Topic)
		}
		out[c.Topic] = topics.Cursor{ID: c.Id, Epoch: c.Epoch}
	}
	return out, nil
}
