package topics

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Cursor is the highest message id of a topic a device has received, with
// the epoch of the topic stream that id belongs to.
type Cursor struct {
	ID    uint64 `json:"id"`
	Epoch uint64 `json:"epoch"`
}

// BacklogRequest asks for the topic messages a device has not received.
type BacklogRequest struct {
	// User bound to the device; empty for a device without a user, which
	// then only gets Everyone.
	User string
	// Device. Required.
	Device string
	// Cursors are the client's, by topic. A topic the client does not name
	// starts from the device's recorded cursor (Ack), if any.
	Cursors map[string]Cursor
	// Attrs are matched against message conditions.
	Attrs oplog.Attrs
	// Limit is the most messages returned. Default 10,000.
	Limit int
}

// Backlog is the answer to a BacklogRequest.
type Backlog struct {
	// Entries, topic by topic (Everyone first, then by name), in id order
	// within each topic, with Topic, Id and Epoch set.
	Entries []*oplogpb.Entry
	// More is set when Limit cut the backlog: ask again with the cursors
	// advanced by Entries.
	More bool
	// Reset names the topics whose client cursor was of another epoch:
	// they start again from the follow point (Everyone: its backfill).
	Reset []string
	// Reads counts the badger scans made: one for the follow index (with
	// a User), and one per topic actually read. A topic with nothing
	// after the device's cursor is mostly skipped unread.
	Reads int
}

// DefaultLimit is the Limit of a BacklogRequest that sets none.
const DefaultLimit = 10_000

// Backlog returns the topic messages a device has not received: of
// Everyone, and of every topic the user follows or followed.
//
// A topic starts after the highest of the follow point (Follow.From), the
// client's cursor if it has one of the current epoch, and otherwise the
// device's recorded cursor. Everyone starts, for a device with no cursor,
// before its last Backfill messages. A topic the user unfollowed is read
// only up to Follow.Until, and only for a device that has a cursor for it:
// a new device does not get old topics. Deleted topics, expired messages
// and messages whose conditions the client does not match are left out.
//
// It first waits until the projections hold everything their streams held
// at the call, so a reader that watches first and reads the backlog second
// misses nothing.
func (s *Topics) Backlog(ctx context.Context, req BacklogRequest) (*Backlog, error) {
	if err := checkID("device", req.Device); err != nil {
		return nil, err
	}
	if req.User != "" {
		if err := checkID("user", req.User); err != nil {
			return nil, err
		}
	}
	if req.Limit <= 0 {
		req.Limit = DefaultLimit
	}
	for _, p := range []*oplog.Projection{s.follows, s.acks, s.msgs} {
		if err := p.CatchUp(ctx); err != nil {
			return nil, err
		}
	}
	// Trust the per-topic bounds only once they cover what the read sees.
	trusted := s.live.through.Load() >= s.msgs.Applied()
	out := &Backlog{}
	now := time.Now()
	err := s.db.View(func(txn *badger.Txn) error {
		type item struct {
			topic string
			rel   relation
		}
		items := []item{{topic: Everyone}}
		if req.User != "" {
			out.Reads++
			if err := scanFollows(txn, req.User, func(topic string, r relation) error {
				items = append(items, item{topic, r})
				return nil
			}); err != nil {
				return err
			}
		}
		for _, it := range items {
			everyone := it.topic == Everyone
			from, until := it.rel.from, uint64(math.MaxUint64)
			if !everyone {
				if it.rel.epoch != s.epoch {
					if it.rel.unfollowed {
						continue // its bounds are of a stream that no longer exists
					}
					from = 0
				}
				if it.rel.unfollowed {
					until = it.rel.until
				}
			}
			start, cursor := from, false
			if c, given := req.Cursors[it.topic]; given && c != (Cursor{}) {
				if c.Epoch != s.epoch {
					out.Reset = append(out.Reset, it.topic)
				} else {
					start, cursor = max(from, c.ID), true
				}
			} else if c, ok, err := getCursor(txn, req.Device, it.topic); err != nil {
				return err
			} else if ok && c.Epoch == s.epoch {
				start, cursor = max(from, c.ID), true
			}
			if it.rel.unfollowed && (!cursor || start >= until) {
				continue
			}
			backfill := everyone && !cursor
			if trusted && !backfill {
				if b, ok := s.live.bound(it.topic); ok && b <= start {
					continue // nothing new: not even the definition is looked at
				}
			}
			st, found, err := getStatus(txn, it.topic)
			if err != nil {
				return err
			}
			if found && st.deleted || !found && !everyone {
				continue
			}
			if backfill {
				out.Reads++
				if err := s.readBackfill(txn, it.topic, st.backfill, req, out, now); err != nil {
					return err
				}
			} else {
				out.Reads++
				if err := s.readMessages(txn, it.topic, start, until, req, out, now); err != nil {
					return err
				}
			}
			if out.More {
				return nil
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("topics: read backlog: %w", err)
	}
	slices.Sort(out.Reset)
	return out, nil
}

// keep decodes a message and adds it to out unless it is expired or its
// conditions do not match; it sets More instead when out is full.
func (s *Topics) keep(v []byte, topic string, id uint64, req BacklogRequest, out *Backlog, now time.Time) error {
	e := new(oplogpb.Entry)
	if err := proto.Unmarshal(v, e); err != nil {
		return fmt.Errorf("message %d of %s: %w", id, topic, err)
	}
	if e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(now) || !oplog.Match(e.Conditions, req.Attrs) {
		return nil
	}
	if len(out.Entries) == req.Limit {
		out.More = true
		return nil
	}
	e.Topic, e.Id, e.Epoch = topic, id, s.epoch
	out.Entries = append(out.Entries, e)
	return nil
}

// readMessages adds the messages of topic in (start, until] to out.
func (s *Topics) readMessages(txn *badger.Txn, topic string, start, until uint64, req BacklogRequest, out *Backlog, now time.Time) error {
	prefix := messagePrefix(topic)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
	defer it.Close()
	newest := start
	for it.Seek(messageKey(topic, start+1)); it.Valid(); it.Next() {
		id := binary.BigEndian.Uint64(it.Item().Key()[len(prefix):])
		if id > until {
			return nil
		}
		newest = id
		if err := it.Item().Value(func(v []byte) error { return s.keep(v, topic, id, req, out, now) }); err != nil || out.More {
			return err
		}
	}
	s.live.learn(topic, newest) // read to the end: nothing above newest
	return nil
}

// readBackfill adds the last backfill messages of topic to out, in id
// order: one reverse scan.
func (s *Topics) readBackfill(txn *badger.Txn, topic string, backfill uint32, req BacklogRequest, out *Backlog, now time.Time) error {
	if backfill == 0 {
		return nil
	}
	prefix := messagePrefix(topic)
	it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, Reverse: true, PrefetchValues: true, PrefetchSize: 64})
	defer it.Close()
	type msg struct {
		id  uint64
		val []byte
	}
	var msgs []msg
	for it.Seek(messageKey(topic, math.MaxUint64)); it.Valid() && len(msgs) < int(backfill); it.Next() {
		id := binary.BigEndian.Uint64(it.Item().Key()[len(prefix):])
		v, err := it.Item().ValueCopy(nil)
		if err != nil {
			return err
		}
		if len(msgs) == 0 {
			s.live.learn(topic, id) // the newest there is
		}
		msgs = append(msgs, msg{id, v})
	}
	for i := len(msgs) - 1; i >= 0; i-- {
		if err := s.keep(msgs[i].val, topic, msgs[i].id, req, out, now); err != nil || out.More {
			return err
		}
	}
	return nil
}

// Ack records that a device has received every message of each topic up
// to its cursor. A cursor of another epoch is refused with
// oplog.ErrEpochMismatch (nothing is recorded); a cursor at or below the
// recorded one is ignored (cursors only move forward). It returns once the
// cursors are stored in the topic ack stream.
func (s *Topics) Ack(ctx context.Context, device string, cursors map[string]Cursor) error {
	if err := checkID("device", device); err != nil {
		return err
	}
	for topic, c := range cursors {
		if err := checkID("topic", topic); err != nil {
			return err
		}
		if c.Epoch != s.epoch {
			return fmt.Errorf("cursor of %q: epoch %d, stream has %d: %w", topic, c.Epoch, s.epoch, oplog.ErrEpochMismatch)
		}
	}
	current, err := s.Cursors(ctx, device)
	if err != nil {
		return err
	}
	var seqs []uint64
	for topic, c := range cursors {
		if cur, ok := current[topic]; ok && cur.Epoch == c.Epoch && cur.ID >= c.ID {
			continue
		}
		data, err := proto.Marshal(&topicspb.Cursor{Device: device, Topic: topic, Id: c.ID, Epoch: c.Epoch, At: timestamppb.Now()})
		if err != nil {
			return fmt.Errorf("topics: marshal cursor: %w", err)
		}
		ack, err := s.js.Publish(ctx, subjectCursor(device, topic), data)
		if err != nil {
			return fmt.Errorf("topics: ack: %v: %w", err, oplog.ErrUnavailable)
		}
		seqs = append(seqs, ack.Sequence)
	}
	for _, seq := range seqs {
		s.stored(subjectAckPrefix, seq)
	}
	return nil
}

// Cursors returns the recorded cursors of a device, by topic.
func (s *Topics) Cursors(ctx context.Context, device string) (map[string]Cursor, error) {
	if err := checkID("device", device); err != nil {
		return nil, err
	}
	if err := s.acks.CatchUp(ctx); err != nil {
		return nil, err
	}
	out := make(map[string]Cursor)
	prefix := cursorPrefix(device)
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			var c Cursor
			if err := it.Item().Value(func(v []byte) error {
				c = decodeCursor(v)
				return nil
			}); err != nil {
				return err
			}
			out[string(it.Item().Key()[len(prefix):])] = c
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("topics: read cursors: %w", err)
	}
	return out, nil
}

func decodeCursor(v []byte) Cursor {
	if len(v) != 16 {
		return Cursor{}
	}
	return Cursor{ID: binary.BigEndian.Uint64(v), Epoch: binary.BigEndian.Uint64(v[8:])}
}

func getCursor(txn *badger.Txn, device, topic string) (Cursor, bool, error) {
	it, err := txn.Get(cursorKey(device, topic))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return Cursor{}, false, nil
	}
	if err != nil {
		return Cursor{}, false, err
	}
	var c Cursor
	err = it.Value(func(v []byte) error {
		c = decodeCursor(v)
		return nil
	})
	return c, err == nil, err
}
