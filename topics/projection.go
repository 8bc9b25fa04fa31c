package topics

import (
	"encoding/binary"
	"strconv"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
)

// The apply functions of the three projections. Each runs on its
// projection's goroutine only, and derives what it writes from the record
// and the projection's own keys, never from another stream: replaying the
// streams in any interleaving gives the same store. A record that can
// never apply (only Sluice writes these streams) is logged and skipped.

// applyMessage stores a topic message as is under m/<topic>/<seq>, with a
// badger TTL ending when the stream's own Nats-TTL does. An expired
// message is not stored.
func (s *Topics) applyMessage(txn *badger.Txn, r *oplog.Record) error {
	topic, ok := parseTopicSubject(r.Subject)
	if !ok {
		s.log.Error().Uint64("seq", r.Seq).Str("stream", StreamTopics).Msg("topic message on a bad subject skipped")
		return nil
	}
	ttl, ok := ttlOf(r)
	if !ok {
		s.log.Error().Uint64("seq", r.Seq).Str("stream", StreamTopics).Msg("topic message with unreadable ttl skipped")
		return nil
	}
	if ttl < 0 {
		return nil // expired already: never delivered, not kept
	}
	e := badger.NewEntry(messageKey(topic, r.Seq), r.Data)
	if ttl > 0 {
		e = e.WithTTL(ttl)
	}
	return txn.SetEntry(e)
}

// ttlOf returns what is left of a record's validity: 0 without a Nats-TTL,
// negative once over.
func ttlOf(r *oplog.Record) (time.Duration, bool) {
	v := r.TTL
	if v == "" {
		return 0, true
	}
	d, err := time.ParseDuration(v)
	if n, nerr := strconv.ParseInt(v, 10, 64); err != nil && nerr == nil {
		d, err = time.Duration(n)*time.Second, nil // the server's other form: whole seconds
	}
	if err != nil {
		return 0, false
	}
	if left := time.Until(r.Stored.Add(d)); left > 0 {
		return left, true
	}
	return -1, true
}

// applyFollows projects a definition (d/<topic>, t/<topic>) or a follow relation
// (f/<user>/<topic>, and the count n/<topic> in the same transaction).
//
// The count is read, changed and written here: safe, as one goroutine
// writes the projection, and deterministic, as it only depends on the
// relation's previous state in the index: n/<topic> is always the number
// of f/*/<topic> keys whose state is "following", whichever states the
// stream still holds (it keeps the last one per relation) — so a replay
// that sees only the last state of each relation gives the same count.
func (s *Topics) applyFollows(txn *badger.Txn, r *oplog.Record) error {
	topic, user, ok := parseFollowSubject(r.Subject)
	if !ok {
		s.log.Error().Uint64("seq", r.Seq).Str("stream", StreamFollows).Msg("follows record on a bad subject skipped")
		return nil
	}
	if user == "" {
		def := new(topicspb.Topic)
		if err := proto.Unmarshal(r.Data, def); err != nil || def.Name != topic {
			s.log.Error().Uint64("seq", r.Seq).Str("topic", topic).Msg("unreadable topic definition skipped")
			return nil
		}
		sk, dk := statusKey(topic), definitionKey(topic)
		sv := status{seq: r.Seq, deleted: def.Deleted, backfill: def.Backfill}.encode()
		if err := txn.Set(sk, sv); err != nil {
			return err
		}
		return txn.Set(dk, r.Data)
	}
	f := new(topicspb.Follow)
	if err := proto.Unmarshal(r.Data, f); err != nil || f.User != user || f.Topic != topic {
		s.log.Error().Uint64("seq", r.Seq).Str("topic", topic).Msg("unreadable follow relation skipped")
		return nil
	}
	fk := followKey(user, topic)
	old, had, err := getRelation(txn, fk)
	if err != nil {
		return err
	}
	if had && old.seq >= r.Seq {
		return nil // applied already (a replay from a point)
	}
	next := relationOf(f, r.Seq)
	val := next.encode()
	delta := b2i(next.active()) - b2i(had && old.active())
	var n uint64
	nk := countKey(topic)
	if delta != 0 {
		if n, err = oplog.GetUint64(txn, nk); err != nil {
			return err
		}
	}
	if err := txn.Set(fk, val); err != nil {
		return err
	}
	switch {
	case delta == 0:
		return nil
	case delta < 0 && n == 0:
		s.log.Error().Str("topic", topic).Uint64("seq", r.Seq).Msg("follower count below zero ignored")
		return nil
	}
	n = uint64(int64(n) + delta)
	if n == 0 {
		return txn.Delete(nk) // absent, as a replay that never counted the relation leaves it
	}
	return txn.Set(nk, binary.BigEndian.AppendUint64(nil, n))
}

// b2i converts a bool to 0 or 1.
func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// applyCursor records a device's cursor of a topic: the last ack in stream
// order, which is the only one the stream keeps.
func (s *Topics) applyCursor(txn *badger.Txn, r *oplog.Record) error {
	device, topic, ok := parseCursorSubject(r.Subject)
	c := new(topicspb.Cursor)
	if !ok || proto.Unmarshal(r.Data, c) != nil || c.Device != device || c.Topic != topic {
		s.log.Error().Uint64("seq", r.Seq).Str("stream", StreamTopicAcks).Msg("unreadable topic cursor skipped")
		return nil
	}
	return txn.Set(cursorKey(device, topic), binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, c.Id), c.Epoch))
}
