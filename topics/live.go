package topics

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
)

// Live delivery.
//
// Topic messages reach watchers from the messages projection: once it has
// committed a batch, its Committed hook decodes each new message once and
// hands it to the topic's watchers, in id order. A gateway node holds one
// Watch per session and followed topic (and one on Everyone) and fans the
// message out in process: one delivery per node, no NATS subscription per
// follower or session.
//
// The watchers of a topic are a slice read without copying: dispatch takes
// one read lock per message to find it, none per watcher, so 15,000
// watchers of one topic cost 15,000 calls and an atomic load each. A
// registration appends in place (readers hold shorter slice headers and
// never look past them); a Stop marks the watch stopped at once (dispatch
// skips it) and the slice is compacted into a new one when half of it is
// stopped. Both are amortized O(1), so a reconnect storm of 15,000 sessions
// on one topic does not copy a 15,000-entry slice per session.
//
// Follow relations reach WatchFollows watchers the same way, from the
// follows projection, so a gateway learns of a follow or unfollow made on
// any node once its own index holds it.

// Watch is a registration made by Topics.Watch; Stop ends it.
type Watch struct {
	s       *Topics
	key     string // topic
	fn      func(*oplogpb.Entry)
	stopped atomic.Bool
}

// FollowWatch is a registration made by Topics.WatchFollows; Stop ends it.
type FollowWatch struct {
	s       *Topics
	key     string // user
	fn      func(Follow)
	wants   func(user string) bool // WatchAllFollows': nil for every user
	stopped atomic.Bool
}

func (w *Watch) isStopped() bool       { return w.stopped.Load() }
func (w *FollowWatch) isStopped() bool { return w.stopped.Load() }

// live is a Topics's registry of watchers.
type live struct {
	mu     sync.RWMutex
	topics registry[*Watch]
	users  registry[*FollowWatch]
	nt, nu atomic.Int64 // len(topics), len(users), read without the lock

	// delivered is the highest topic stream sequence handed to watchers,
	// deliveredFollows the follows stream's: records applied again by a
	// rebuild are not delivered again. Each is touched only by its
	// projection's goroutine.
	delivered, deliveredFollows uint64

	// last bounds, per topic, the sequence of its newest message: no
	// message of the topic up to through is above it. A Backlog skips a
	// topic whose cursor is at or above the bound without reading it.
	// Missing topics are unknown (read, and learnt from the read).
	lastMu  sync.RWMutex
	last    map[string]uint64
	through atomic.Uint64
}

func newLive() *live {
	return &live{topics: registry[*Watch]{}, users: registry[*FollowWatch]{}, last: map[string]uint64{}}
}

// Watch calls fn with every message of topic committed to this node's
// store after the call, once, in id order, with Topic, Id and Epoch set;
// expired messages are left out, conditions are for the caller to match
// (oplog.Match). A reader that watches first and reads the backlog second
// misses nothing (it may see a message twice, and dedupes by id).
//
// fn runs on the messages projection's goroutine: it must be quick and
// must never block — it holds up the projection and every other watcher
// (hand the message to a bounded queue, and drop the reader on
// overflow). It may call Watch, WatchFollows and Stop. The entry is
// shared by every watcher: do not modify it.
func (s *Topics) Watch(topic string, fn func(*oplogpb.Entry)) (*Watch, error) {
	if err := checkID("topic", topic); err != nil {
		return nil, err
	}
	w := &Watch{s: s, key: topic, fn: fn}
	lv := s.live
	lv.mu.Lock()
	lv.topics.add(topic, w)
	lv.nt.Store(int64(len(lv.topics)))
	lv.mu.Unlock()
	return w, nil
}

// WatchFollows calls fn with every follow and unfollow of user (a new
// Follow state: Following, or ended with its Until) once this node's
// follows projection has committed it, in order. A gateway uses it to
// start or stop delivering a topic to the user's sessions — a message is
// for the user when the Follow Covers its id; test Following, not Until,
// to tell an unfollow (Until is 0 when the topic stream was empty) — and
// to run a sync round for a new follow. The same rules as for Watch apply
// to fn.
func (s *Topics) WatchFollows(user string, fn func(Follow)) (*FollowWatch, error) {
	if err := checkID("user", user); err != nil {
		return nil, err
	}
	w := &FollowWatch{s: s, key: user, fn: fn}
	lv := s.live
	lv.mu.Lock()
	lv.users.add(user, w)
	lv.nu.Store(int64(len(lv.users)))
	lv.mu.Unlock()
	return w, nil
}

// allUsers is the registry key of WatchAllFollows: not a valid user id.
const allUsers = "*"

// WatchAllFollows is WatchFollows for every user wants accepts: one
// registration for a node that routes follow events to its own sessions (a
// gateway), rather than one per online user. wants is asked of each
// relation's user before the relation is decoded, on the follows
// projection's goroutine: a node decodes only the relations of users it
// routes somewhere, not every follow written in the cluster. It must be
// quick and must not block; the rules of Watch apply to fn.
func (s *Topics) WatchAllFollows(wants func(user string) bool, fn func(Follow)) (*FollowWatch, error) {
	if wants == nil {
		return nil, errors.New("topics: WatchAllFollows: wants is required")
	}
	w := &FollowWatch{s: s, key: allUsers, fn: fn, wants: wants}
	lv := s.live
	lv.mu.Lock()
	lv.users.add(allUsers, w)
	lv.nu.Store(int64(len(lv.users)))
	lv.mu.Unlock()
	return w, nil
}

// Stop ends the watch; fn is not called after Stop returns, except by a
// delivery already under way. Idempotent.
func (w *Watch) Stop() {
	if w.stopped.Swap(true) {
		return
	}
	lv := w.s.live
	lv.mu.Lock()
	lv.topics.drop(w.key)
	lv.nt.Store(int64(len(lv.topics)))
	lv.mu.Unlock()
}

// Stop ends the watch; fn is not called after Stop returns, except by a
// delivery already under way. Idempotent.
func (w *FollowWatch) Stop() {
	if w.stopped.Swap(true) {
		return
	}
	lv := w.s.live
	lv.mu.Lock()
	lv.users.drop(w.key)
	lv.nu.Store(int64(len(lv.users)))
	lv.mu.Unlock()
}

// registry maps a key to its watchers. The caller holds live.mu to change
// it, or to read a list; a list read is never changed in the part its
// reader sees.
type registry[W interface {
	comparable
	isStopped() bool
}] map[string]*watchList[W]

type watchList[W any] struct {
	list    []W // append-only until compacted into a new slice
	stopped int // stopped watches still in list
}

func (r registry[W]) add(key string, w W) {
	l := r[key]
	if l == nil {
		l = &watchList[W]{}
		r[key] = l
	}
	// In place when there is room: readers hold headers of at most the
	// current length and never read the new slot.
	l.list = append(l.list, w)
}

// drop accounts for a watch of key that was just stopped, compacting the
// list once half of it is stopped.
func (r registry[W]) drop(key string) {
	l := r[key]
	if l == nil {
		return
	}
	l.stopped++
	if 2*l.stopped < len(l.list) {
		return
	}
	var live []W
	for _, w := range l.list {
		if !w.isStopped() {
			live = append(live, w)
		}
	}
	if len(live) == 0 {
		delete(r, key)
		return
	}
	l.list, l.stopped = live, 0 // a new array: readers of the old one are undisturbed
}

// watchers returns the current watchers of a topic; the caller skips
// stopped ones.
func (lv *live) watchers(topic string) []*Watch {
	lv.mu.RLock()
	defer lv.mu.RUnlock()
	if l := lv.topics[topic]; l != nil {
		return l.list
	}
	return nil
}

// followWatchers returns the current follow watchers of a user.
func (lv *live) followWatchers(user string) []*FollowWatch {
	lv.mu.RLock()
	defer lv.mu.RUnlock()
	if l := lv.users[user]; l != nil {
		return l.list
	}
	return nil
}

// stopAll ends every open watch.
func (lv *live) stopAll() {
	lv.mu.RLock()
	var ws []*Watch
	var fws []*FollowWatch
	for _, l := range lv.topics {
		ws = append(ws, l.list...)
	}
	for _, l := range lv.users {
		fws = append(fws, l.list...)
	}
	lv.mu.RUnlock()
	for _, w := range ws {
		w.Stop()
	}
	for _, w := range fws {
		w.Stop()
	}
}

// bound returns what is known of the newest message of topic.
func (lv *live) bound(topic string) (uint64, bool) {
	lv.lastMu.RLock()
	defer lv.lastMu.RUnlock()
	v, ok := lv.last[topic]
	return v, ok
}

// learn raises the bound of topic to at least seq.
func (lv *live) learn(topic string, seq uint64) {
	lv.lastMu.Lock()
	if cur, ok := lv.last[topic]; !ok || seq > cur {
		lv.last[topic] = seq
	}
	lv.lastMu.Unlock()
}

// committedMessages is the messages projection's Committed hook: it
// raises the per-topic bounds, then hands each message not delivered yet
// to its topic's watchers.
func (s *Topics) committedMessages(recs []oplog.Record) {
	if len(recs) == 0 {
		return
	}
	lv := s.live
	lv.lastMu.Lock()
	for i := range recs {
		if topic, ok := parseTopicSubject(recs[i].Subject); ok && recs[i].Seq > lv.last[topic] {
			lv.last[topic] = recs[i].Seq
		}
	}
	lv.lastMu.Unlock()
	if end := recs[len(recs)-1].Seq; end > lv.through.Load() {
		lv.through.Store(end)
	}
	if lv.nt.Load() == 0 {
		lv.delivered = max(lv.delivered, recs[len(recs)-1].Seq)
		return
	}
	// No unfollow may read its Until while these are dispatched, and every
	// relation event already written reaches the watchers first: a
	// follower's watchers know of an unfollow whose Until is below a
	// message before they get the message.
	s.unfollowing.RLock()
	defer s.unfollowing.RUnlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := s.follows.CatchUp(ctx); err != nil {
		s.log.Warn().Err(err).Msg("live topic messages dispatched before the follows caught up")
	}
	cancel()
	now := time.Now()
	for i := range recs {
		r := &recs[i]
		if r.Seq <= lv.delivered {
			continue
		}
		lv.delivered = r.Seq
		topic, ok := parseTopicSubject(r.Subject)
		if !ok {
			continue // logged by applyMessage
		}
		ws := lv.watchers(topic)
		if len(ws) == 0 {
			continue
		}
		e := new(oplogpb.Entry)
		if err := proto.Unmarshal(r.Data, e); err != nil {
			s.log.Error().Err(err).Uint64("seq", r.Seq).Str("topic", topic).Msg("undecodable topic message not delivered live")
			continue
		}
		if e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(now) {
			continue
		}
		e.Topic, e.Id, e.Epoch = topic, r.Seq, s.epoch
		for _, w := range ws {
			if !w.stopped.Load() {
				w.fn(e)
			}
		}
	}
}

// committedFollows is the follows projection's Committed hook: it hands
// each relation not delivered yet to its user's watchers, decoding it only
// once one of them wants it.
func (s *Topics) committedFollows(recs []oplog.Record) {
	lv := s.live
next:
	for i := range recs {
		r := &recs[i]
		if r.Seq <= lv.deliveredFollows {
			continue
		}
		lv.deliveredFollows = r.Seq
		if lv.nu.Load() == 0 {
			continue
		}
		topic, user, ok := parseFollowSubject(r.Subject)
		if !ok || user == "" {
			continue
		}
		var fl Follow
		decoded := false
		for _, list := range [2][]*FollowWatch{lv.followWatchers(user), lv.followWatchers(allUsers)} {
			for _, w := range list {
				if w.stopped.Load() || (w.wants != nil && !w.wants(user)) {
					continue
				}
				if !decoded {
					f := new(topicspb.Follow)
					if err := proto.Unmarshal(r.Data, f); err != nil || f.User != user || f.Topic != topic {
						continue next // logged by applyFollows
					}
					fl, decoded = followOf(f), true
					fl.Seq = r.Seq
				}
				w.fn(fl)
			}
		}
	}
}
