package topics

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Follow is the state of a user's relation to a topic. The follower gets
// exactly the topic messages with From < id, and id <= Until once it
// unfollowed (Following false): Covers says which.
type Follow struct {
	User  string `json:"user"`
	Topic string `json:"topic"`
	// From is the topic stream sequence the follow starts after: the
	// stream's last sequence when the user followed, or, for a topic with
	// a backfill of N, the sequence just before its Nth-last message.
	From uint64 `json:"from"`
	// Until is the topic stream's last sequence when the user unfollowed;
	// 0 while following.
	Until uint64 `json:"until,omitempty"`
	// Epoch of the topic stream From and Until belong to.
	Epoch     uint64    `json:"epoch"`
	At        time.Time `json:"at"`
	Following bool      `json:"following"`
	// Seq is the follows-stream sequence of the event that set this state
	// (0 when unknown, as in answers of the remote API): of two states of
	// one relation, the higher Seq is the newer.
	Seq uint64 `json:"seq,omitempty"`
}

// Covers reports whether the follower gets the topic message id.
func (f Follow) Covers(id uint64) bool {
	return id > f.From && (f.Following || id <= f.Until)
}

// relation is a follow state as the index keeps it under f/<user>/<topic>:
// from, until, epoch, at (unix ns), seq (8 bytes BE each), then 1 if
// unfollowed. seq is the stream sequence of the relation's message, which
// the stream keeps as the subject's last: the same after a replay.
type relation struct {
	from, until, epoch uint64
	at                 int64
	seq                uint64
	unfollowed         bool
}

const relationLen = 41

func relationOf(f *topicspb.Follow, seq uint64) relation {
	return relation{from: f.From, until: f.Until, epoch: f.Epoch, at: f.At.AsTime().UnixNano(), seq: seq, unfollowed: f.Unfollowed}
}

func (r relation) active() bool { return !r.unfollowed }

func (r relation) encode() []byte {
	b := make([]byte, 0, relationLen)
	for _, v := range []uint64{r.from, r.until, r.epoch, uint64(r.at), r.seq} {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	if r.unfollowed {
		return append(b, 1)
	}
	return append(b, 0)
}

func decodeRelation(v []byte) (relation, bool) {
	if len(v) != relationLen {
		return relation{}, false
	}
	u := func(i int) uint64 { return binary.BigEndian.Uint64(v[8*i:]) }
	return relation{from: u(0), until: u(1), epoch: u(2), at: int64(u(3)), seq: u(4), unfollowed: v[40] == 1}, true
}

func (r relation) follow(user, topic string) Follow {
	return Follow{User: user, Topic: topic, From: r.from, Until: r.until, Epoch: r.epoch, At: time.Unix(0, r.at).UTC(), Following: !r.unfollowed, Seq: r.seq}
}

func getRelation(txn *badger.Txn, key []byte) (relation, bool, error) {
	it, err := txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return relation{}, false, nil
	}
	if err != nil {
		return relation{}, false, err
	}
	var r relation
	var ok bool
	err = it.Value(func(v []byte) error {
		r, ok = decodeRelation(v)
		return nil
	})
	return r, ok, err
}

func followOf(f *topicspb.Follow) Follow {
	return Follow{User: f.User, Topic: f.Topic, From: f.From, Until: f.Until, Epoch: f.Epoch, At: f.At.AsTime(), Following: !f.Unfollowed}
}

func followPB(f Follow) *topicspb.Follow {
	return &topicspb.Follow{User: f.User, Topic: f.Topic, From: f.From, Until: f.Until, Epoch: f.Epoch, At: timestamppb.New(f.At), Unfollowed: !f.Following}
}

// checkFollowable validates a user and a topic a user may follow.
func checkFollowable(user, topic string) error {
	if err := checkID("user", user); err != nil {
		return err
	}
	if err := checkID("topic", topic); err != nil {
		return err
	}
	if topic == Everyone {
		return fmt.Errorf("every device follows %s already: %w", Everyone, oplog.ErrInvalid)
	}
	return nil
}

// Follow makes user follow topic and returns the follow once this node's
// projection has applied it (Following, and WatchFollows, see it). The
// follow starts after the topic stream's last sequence now, or, for a
// topic with a backfill of N, just before its Nth-last message: From is
// fixed here and written in the event, so that the index never depends on
// how the topic and follows streams interleave on a replay. Following
// again is a no-op returning the existing follow. An unknown or deleted
// topic is oplog.ErrUnknownTopic; a bad id oplog.ErrInvalidID; Everyone
// oplog.ErrInvalid.
func (s *Topics) Follow(ctx context.Context, user, topic string) (Follow, error) {
	if err := checkFollowable(user, topic); err != nil {
		return Follow{}, err
	}
	for range maxAttempts {
		if err := s.follows.CatchUp(ctx); err != nil {
			return Follow{}, err
		}
		def, cur, seq, err := s.readRelation(ctx, user, topic)
		if err != nil {
			return Follow{}, err
		}
		if seq != 0 && !cur.unfollowed {
			return cur.follow(user, topic), nil
		}
		from, err := s.followPoint(ctx, topic, def.Backfill)
		if err != nil {
			return Follow{}, err
		}
		ev := &topicspb.Follow{User: user, Topic: topic, From: from, Epoch: s.epoch, At: timestamppb.Now()}
		at, err := s.relate(ctx, ev, seq)
		if errors.Is(err, errConflict) {
			continue
		} else if err != nil {
			return Follow{}, err
		}
		f := followOf(ev)
		f.Seq = at
		return f, nil
	}
	return Follow{}, fmt.Errorf("follow of %q by %q keeps changing: %w", topic, user, oplog.ErrUnavailable)
}

// Unfollow ends user's follow of topic: Until is the topic stream's last
// sequence now, so the user's devices still get the messages they were
// owed up to it (if they have a cursor for the topic). It returns the
// ended follow once this node has applied it. A topic the user does not
// follow is oplog.ErrNotFound.
func (s *Topics) Unfollow(ctx context.Context, user, topic string) (Follow, error) {
	if err := checkFollowable(user, topic); err != nil {
		return Follow{}, err
	}
	for range maxAttempts {
		if err := s.follows.CatchUp(ctx); err != nil {
			return Follow{}, err
		}
		var cur relation
		var seq uint64
		err := s.db.View(func(txn *badger.Txn) error {
			r, found, err := getRelation(txn, followKey(user, topic))
			if found {
				cur, seq = r, r.seq
			}
			return err
		})
		if err != nil {
			return Follow{}, fmt.Errorf("topics: read follow: %w", err)
		}
		if seq == 0 || cur.unfollowed {
			return Follow{}, fmt.Errorf("%q does not follow %q: %w", user, topic, oplog.ErrNotFound)
		}
		if err := s.msgs.CatchUp(ctx); err != nil {
			return Follow{}, err
		}
		from := cur.from
		if cur.epoch != s.epoch {
			from = 0 // the stream was recreated: the follow covers all of this epoch
		}
		// Until is read and the event applied with live delivery held:
		// a message dispatched live is either covered by Until or filtered
		// out by watchers that already have the unfollow (see unfollowing).
		s.unfollowing.Lock()
		until := max(s.msgs.Applied(), from)
		ev := &topicspb.Follow{User: user, Topic: topic, From: from, Until: until, Epoch: s.epoch, At: timestamppb.Now(), Unfollowed: true}
		at, err := s.relate(ctx, ev, seq)
		s.unfollowing.Unlock()
		if errors.Is(err, errConflict) {
			continue
		} else if err != nil {
			return Follow{}, err
		}
		f := followOf(ev)
		f.Seq = at
		return f, nil
	}
	return Follow{}, fmt.Errorf("unfollow of %q by %q keeps changing: %w", topic, user, oplog.ErrUnavailable)
}

// relate writes a relation event expecting its subject's last sequence to
// be last, and waits until this node has applied it (and handed it to its
// watchers); it returns the event's sequence.
func (s *Topics) relate(ctx context.Context, ev *topicspb.Follow, last uint64) (uint64, error) {
	seq, err := s.write(ctx, subjectRelation(ev.Topic, ev.User), ev, &last)
	if err != nil {
		return 0, err
	}
	if err := s.follows.WaitFor(ctx, seq); err != nil {
		return 0, err
	}
	return seq, nil
}

// readRelation returns a live topic's definition and the user's relation
// to it with the relation's sequence (0: none).
func (s *Topics) readRelation(ctx context.Context, user, topic string) (*topicspb.Topic, relation, uint64, error) {
	def, _, err := s.definition(ctx, topic)
	if err != nil {
		return nil, relation{}, 0, err
	}
	var cur relation
	var seq uint64
	err = s.db.View(func(txn *badger.Txn) error {
		r, found, err := getRelation(txn, followKey(user, topic))
		if found {
			cur, seq = r, r.seq
		}
		return err
	})
	if err != nil {
		return nil, relation{}, 0, fmt.Errorf("topics: read follow: %w", err)
	}
	return def, cur, seq, nil
}

// followPoint returns where a follow of topic starting now begins: the
// topic stream's last sequence (as far as the messages projection holds
// it after catching up), or just before the topic's backfill-th last
// message.
func (s *Topics) followPoint(ctx context.Context, topic string, backfill uint32) (uint64, error) {
	if err := s.msgs.CatchUp(ctx); err != nil {
		return 0, err
	}
	last := s.msgs.Applied()
	if backfill == 0 {
		return last, nil
	}
	from := uint64(0)
	err := s.db.View(func(txn *badger.Txn) error {
		prefix := messagePrefix(topic)
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, Reverse: true})
		defer it.Close()
		n := uint32(0)
		for it.Seek(messageKey(topic, last)); it.Valid(); it.Next() {
			if n++; n == backfill {
				from = binary.BigEndian.Uint64(it.Item().Key()[len(prefix):]) - 1
				return nil
			}
		}
		return nil // fewer than backfill messages: all of them
	})
	if err != nil {
		return 0, fmt.Errorf("topics: backfill of %s: %w", topic, err)
	}
	return from, nil
}

// manyWindow is the most follow events FollowMany keeps in flight.
const manyWindow = 4096

// FollowMany makes many users follow topic at once, for bulk imports: the
// events are pipelined (up to manyWindow publishes in flight) and it
// returns, with the number of follows written, once this node's projection
// has applied them all. Users already following are skipped (their From
// stays). Every user gets the same From, computed once. Unlike Follow, it
// does not guard against a concurrent Follow or Unfollow of the same
// relation: the last event wins. Every id is checked before anything is
// written; a failure midway leaves the follows written so far, and a
// retry skips them.
func (s *Topics) FollowMany(ctx context.Context, topic string, users []string) (int, error) {
	for _, u := range users {
		if err := checkFollowable(u, topic); err != nil {
			return 0, err
		}
	}
	if err := s.follows.CatchUp(ctx); err != nil {
		return 0, err
	}
	def, _, err := s.definition(ctx, topic)
	if err != nil {
		return 0, err
	}
	skip, err := s.following(topic, users)
	if err != nil {
		return 0, err
	}
	from, err := s.followPoint(ctx, topic, def.Backfill)
	if err != nil {
		return 0, err
	}
	ev := &topicspb.Follow{Topic: topic, From: from, Epoch: s.epoch, At: timestamppb.Now()}
	futs := make([]jetstream.PubAckFuture, 0, manyWindow)
	var last uint64
	written := 0
	wait := func(keep int) error {
		for len(futs) > keep {
			select {
			case ack := <-futs[0].Ok():
				last = max(last, ack.Sequence)
			case err := <-futs[0].Err():
				return fmt.Errorf("topics: follow: %v: %w", err, oplog.ErrUnavailable)
			case <-ctx.Done():
				return fmt.Errorf("topics: follow: %v: %w", ctx.Err(), oplog.ErrUnavailable)
			}
			futs = futs[1:]
		}
		return nil
	}
	for i, u := range users {
		if skip != nil && skip[i] {
			continue
		}
		ev.User = u
		data, err := proto.Marshal(ev)
		if err != nil {
			return written, fmt.Errorf("topics: marshal follow: %w", err)
		}
		m := nats.NewMsg(subjectRelation(topic, u))
		m.Data = data
		if len(futs) == manyWindow {
			if err := wait(manyWindow / 2); err != nil {
				return written, err
			}
		}
		f, err := s.js.PublishMsgAsync(m)
		if err != nil {
			return written, fmt.Errorf("topics: follow: %v: %w", err, oplog.ErrUnavailable)
		}
		futs = append(futs, f)
		written++
	}
	if err := wait(0); err != nil {
		return written, err
	}
	if last == 0 {
		return written, nil
	}
	s.stored(subjectFollowPrefix, last)
	return written, s.follows.WaitFor(ctx, last)
}

// following marks which of users follow topic now; nil when the topic
// has no follower (nothing to read).
func (s *Topics) following(topic string, users []string) ([]bool, error) {
	var marks []bool
	err := s.db.View(func(txn *badger.Txn) error {
		n, err := oplog.GetUint64(txn, countKey(topic))
		if err != nil || n == 0 {
			return err
		}
		marks = make([]bool, len(users))
		for i, u := range users {
			r, found, err := getRelation(txn, followKey(u, topic))
			if err != nil {
				return err
			}
			marks[i] = found && r.active()
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("topics: read follows: %w", err)
	}
	return marks, nil
}

// Following returns the topics user follows, by topic name: one prefix
// scan of the follow index (f/<user>/), plus a look at each topic's
// definition to leave out deleted ones.
func (s *Topics) Following(ctx context.Context, user string) ([]Follow, error) {
	if err := checkID("user", user); err != nil {
		return nil, err
	}
	if err := s.follows.CatchUp(ctx); err != nil {
		return nil, err
	}
	var out []Follow
	err := s.db.View(func(txn *badger.Txn) error {
		return scanFollows(txn, user, func(topic string, r relation) error {
			if !r.active() {
				return nil
			}
			st, found, err := getStatus(txn, topic)
			if err != nil || !found || st.deleted {
				return err
			}
			out = append(out, r.follow(user, topic))
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("topics: read follows: %w", err)
	}
	return out, nil
}

// scanFollows calls fn with every relation of user, by topic name.
func scanFollows(txn *badger.Txn, user string, fn func(topic string, r relation) error) error {
	prefix := followPrefix(user)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
	defer it.Close()
	for it.Rewind(); it.Valid(); it.Next() {
		var r relation
		var ok bool
		if err := it.Item().Value(func(v []byte) error {
			r, ok = decodeRelation(v)
			return nil
		}); err != nil {
			return err
		}
		if !ok {
			continue
		}
		if err := fn(string(bytes.TrimPrefix(it.Item().Key(), prefix)), r); err != nil {
			return err
		}
	}
	return nil
}

// Followers returns how many users follow topic now. Everyone is
// oplog.ErrInvalid (every device follows it), an unknown or deleted topic
// oplog.ErrUnknownTopic.
func (s *Topics) Followers(ctx context.Context, topic string) (uint64, error) {
	if err := checkID("topic", topic); err != nil {
		return 0, err
	}
	if topic == Everyone {
		return 0, fmt.Errorf("every device follows %s: %w", Everyone, oplog.ErrInvalid)
	}
	if err := s.follows.CatchUp(ctx); err != nil {
		return 0, err
	}
	if _, _, err := s.definition(ctx, topic); err != nil {
		return 0, err
	}
	var n uint64
	err := s.db.View(func(txn *badger.Txn) error {
		var err error
		n, err = oplog.GetUint64(txn, countKey(topic))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("topics: read follower count: %w", err)
	}
	return n, nil
}
