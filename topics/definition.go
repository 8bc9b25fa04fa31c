package topics

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Reserved reports whether a topic name belongs to the system (it starts
// with "_", as Everyone does): Create and Delete refuse it.
func Reserved(name string) bool { return strings.HasPrefix(name, "_") }

// Create defines a topic, or updates the backfill and description of an
// existing one, and returns the stored definition once this node's
// projection has applied it. A reserved or invalid name is refused with
// oplog.ErrInvalidID, a deleted topic's name (names are not reused) or an
// out-of-range field with oplog.ErrInvalid.
func (s *Topics) Create(ctx context.Context, def *topicspb.Topic) (*topicspb.Topic, error) {
	if def == nil {
		return nil, fmt.Errorf("no topic: %w", oplog.ErrInvalid)
	}
	if err := checkID("topic", def.Name); err != nil {
		return nil, err
	}
	if Reserved(def.Name) {
		return nil, fmt.Errorf("topic %q: names starting with _ are reserved: %w", def.Name, oplog.ErrInvalidID)
	}
	if def.Backfill > MaxBackfill {
		return nil, fmt.Errorf("backfill %d over %d: %w", def.Backfill, MaxBackfill, oplog.ErrInvalid)
	}
	if len(def.Description) > MaxDescriptionLen {
		return nil, fmt.Errorf("description longer than %d bytes: %w", MaxDescriptionLen, oplog.ErrInvalid)
	}
	for range maxAttempts {
		if err := s.follows.CatchUp(ctx); err != nil {
			return nil, err
		}
		cur, seq, found, err := s.readTopic(def.Name)
		if err != nil {
			return nil, err
		}
		now := timestamppb.Now()
		next := &topicspb.Topic{Name: def.Name, Backfill: def.Backfill, Description: def.Description, CreatedAt: now, UpdatedAt: now}
		if found {
			if cur.Deleted {
				return nil, fmt.Errorf("topic %q was deleted; names are not reused: %w", def.Name, oplog.ErrInvalid)
			}
			if cur.Backfill == def.Backfill && cur.Description == def.Description {
				return cur, nil
			}
			next.CreatedAt = cur.CreatedAt
		}
		if err := s.define(ctx, next, seq); errors.Is(err, errConflict) {
			continue
		} else if err != nil {
			return nil, err
		}
		s.log.Info().Str("topic", next.Name).Uint32("backfill", next.Backfill).Bool("update", found).Msg("topic defined")
		return next, nil
	}
	return nil, fmt.Errorf("topic %q keeps changing: %w", def.Name, oplog.ErrUnavailable)
}

// Delete deletes a topic: it takes no more messages or followers, and
// backlogs leave it out. Its messages and follow relations stay in their
// streams (which refuse deletes); its name is not reused. An unknown or
// already deleted topic is refused with oplog.ErrUnknownTopic, a reserved
// name with oplog.ErrInvalidID.
func (s *Topics) Delete(ctx context.Context, name string) error {
	if err := checkID("topic", name); err != nil {
		return err
	}
	if Reserved(name) {
		return fmt.Errorf("topic %q: names starting with _ are reserved: %w", name, oplog.ErrInvalidID)
	}
	for range maxAttempts {
		if err := s.follows.CatchUp(ctx); err != nil {
			return err
		}
		cur, seq, found, err := s.readTopic(name)
		if err != nil {
			return err
		}
		if !found || cur.Deleted {
			return fmt.Errorf("topic %q: %w", name, oplog.ErrUnknownTopic)
		}
		next := proto.Clone(cur).(*topicspb.Topic)
		next.Deleted, next.UpdatedAt = true, timestamppb.Now()
		if err := s.define(ctx, next, seq); errors.Is(err, errConflict) {
			continue
		} else if err != nil {
			return err
		}
		s.log.Info().Str("topic", name).Msg("topic deleted")
		return nil
	}
	return fmt.Errorf("topic %q keeps changing: %w", name, oplog.ErrUnavailable)
}

// define writes a definition, expecting the definition subject's last
// sequence to be last, and waits until this node has applied it.
func (s *Topics) define(ctx context.Context, def *topicspb.Topic, last uint64) error {
	seq, err := s.write(ctx, subjectDefinition(def.Name), def, &last)
	if err != nil {
		return err
	}
	return s.follows.WaitFor(ctx, seq)
}

// Topic returns the definition of a topic; an unknown or deleted one is
// oplog.ErrUnknownTopic.
func (s *Topics) Topic(ctx context.Context, name string) (*topicspb.Topic, error) {
	if err := checkID("topic", name); err != nil {
		return nil, err
	}
	def, _, err := s.definition(ctx, name)
	return def, err
}

// definition returns a live topic's definition and its sequence. A topic
// this node has not seen is looked for again after catching up with the
// follows stream (it may have been created through another node).
func (s *Topics) definition(ctx context.Context, name string) (*topicspb.Topic, uint64, error) {
	for caught := false; ; caught = true {
		def, seq, found, err := s.readTopic(name)
		if err != nil {
			return nil, 0, err
		}
		if found && !def.Deleted {
			return def, seq, nil
		}
		if found || caught {
			return nil, 0, fmt.Errorf("topic %q: %w", name, oplog.ErrUnknownTopic)
		}
		if err := s.follows.CatchUp(ctx); err != nil {
			return nil, 0, err
		}
	}
}

// Topics lists the live topics (Everyone included), by name.
func (s *Topics) Topics(ctx context.Context) ([]*topicspb.Topic, error) {
	if err := s.follows.CatchUp(ctx); err != nil {
		return nil, err
	}
	var out []*topicspb.Topic
	err := s.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefixDefinitions, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			def, err := decodeDefinition(it.Item())
			if err != nil {
				return err
			}
			if !def.Deleted {
				out = append(out, def)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("topics: list topics: %w", err)
	}
	return out, nil
}

func (s *Topics) readTopic(name string) (def *topicspb.Topic, seq uint64, found bool, err error) {
	err = s.db.View(func(txn *badger.Txn) error {
		def, seq, found, err = getDefinition(txn, name)
		return err
	})
	if err != nil {
		return nil, 0, false, fmt.Errorf("topics: read topic %s: %w", name, err)
	}
	return def, seq, found, nil
}

// getDefinition returns a topic's definition and the sequence of its
// message.
func getDefinition(txn *badger.Txn, name string) (*topicspb.Topic, uint64, bool, error) {
	st, found, err := getStatus(txn, name)
	if err != nil || !found {
		return nil, 0, false, err
	}
	it, err := txn.Get(definitionKey(name))
	if err != nil {
		return nil, 0, false, err
	}
	def, err := decodeDefinition(it)
	return def, st.seq, err == nil, err
}

func decodeDefinition(it *badger.Item) (*topicspb.Topic, error) {
	def := new(topicspb.Topic)
	err := it.Value(func(v []byte) error { return proto.Unmarshal(v, def) })
	return def, err
}

// status is what reads of a topic need of its definition, small enough
// for badger to keep in its tree (a backlog looks at every followed
// topic's): d/<topic> = seq (8 bytes BE), deleted (1), backfill (4 BE).
type status struct {
	seq      uint64
	deleted  bool
	backfill uint32
}

func (st status) encode() []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 13), st.seq)
	if st.deleted {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	return binary.BigEndian.AppendUint32(b, st.backfill)
}

func getStatus(txn *badger.Txn, name string) (status, bool, error) {
	it, err := txn.Get(statusKey(name))
	if errors.Is(err, badger.ErrKeyNotFound) {
		return status{}, false, nil
	}
	if err != nil {
		return status{}, false, err
	}
	var st status
	var ok bool
	err = it.Value(func(v []byte) error {
		if len(v) == 13 {
			st, ok = status{seq: binary.BigEndian.Uint64(v), deleted: v[8] == 1, backfill: binary.BigEndian.Uint32(v[9:])}, true
		}
		return nil
	})
	return st, ok, err
}
