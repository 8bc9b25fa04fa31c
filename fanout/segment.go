package fanout

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Segments.
//
// A segment is a named set of users kept by events: SegmentAdd and
// SegmentRemove store one Membership per user in StreamSegments, which
// keeps the last per segment and user. The segment projection (badger, in
// Config.Dir) applies the stream in order:
//
//	g/<segment>/<user>  present while the user is a member (empty value)
//	n/<segment>         member count (8 bytes BE), absent at zero
//	a/SLUICE_SEGMENTS   the sequence applied (the projection's own)
//
// Segment names and user ids are in the id alphabet, so no key holds a
// '/' of its own, and a segment's members are one prefix scan, in byte
// order of user id: the order a segment job is expanded in.
const (
	keyMember = "g/"
	keyCount  = "n/"
)

func memberPrefix(segment string) []byte { return []byte(keyMember + segment + "/") }
func countKey(segment string) []byte     { return []byte(keyCount + segment) }

// SegmentAdd makes users members of a segment (at most ChunkSize per
// call). It returns once the changes are durable; SegmentSize and segment
// jobs see them after that. Adding a member again changes nothing.
func (f *Fanout) SegmentAdd(ctx context.Context, segment string, users ...string) error {
	return f.setMembers(ctx, segment, users, true)
}

// SegmentRemove removes users from a segment, like SegmentAdd.
func (f *Fanout) SegmentRemove(ctx context.Context, segment string, users ...string) error {
	return f.setMembers(ctx, segment, users, false)
}

func (f *Fanout) setMembers(ctx context.Context, segment string, users []string, member bool) error {
	if err := checkSegment(segment); err != nil {
		return err
	}
	switch {
	case len(users) == 0:
		return fmt.Errorf("no users: %w", oplog.ErrNoTargets)
	case len(users) > f.chunkSize:
		return fmt.Errorf("%d users, limit %d: %w", len(users), f.chunkSize, oplog.ErrTooManyTargets)
	}
	for _, u := range users {
		if !oplog.ValidID(u) {
			return fmt.Errorf("user %q: want 1-%d of [A-Za-z0-9_-]: %w", clip(u), oplog.MaxIDLen, oplog.ErrInvalidID)
		}
	}
	at := timestamppb.Now()
	futs := make([]jetstream.PubAckFuture, 0, len(users))
	for _, u := range users {
		data, err := proto.Marshal(&fanoutpb.Membership{Segment: segment, User: u, Member: member, At: at})
		if err != nil {
			return fmt.Errorf("fanout: marshal membership: %w", err)
		}
		m := nats.NewMsg(SubjectSegment(segment, u))
		m.Data = data
		fut, err := f.js.PublishMsgAsync(m)
		if err != nil {
			return unavailable("store membership", err)
		}
		futs = append(futs, fut)
	}
	for _, fut := range futs {
		select {
		case <-fut.Ok():
		case err := <-fut.Err():
			return unavailable("store membership", err)
		case <-ctx.Done():
			return unavailable("store membership", ctx.Err())
		}
	}
	return nil
}

// SegmentSize returns the number of members of a segment, once the
// projection holds every change stored before the call. Run must be
// running.
func (f *Fanout) SegmentSize(ctx context.Context, segment string) (uint64, error) {
	if err := checkSegment(segment); err != nil {
		return 0, err
	}
	if err := f.seg.CatchUp(ctx); err != nil {
		return 0, unavailable("segment projection", err)
	}
	var n uint64
	err := f.db.View(func(txn *badger.Txn) error {
		var err error
		n, err = oplog.GetUint64(txn, countKey(segment))
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("fanout: read segment size: %w", err)
	}
	return n, nil
}

// SegmentMembers returns the members of a segment as a set, once the
// projection holds every change stored before the call; at most max of
// them (ErrInvalid beyond: dry runs of bigger segments need another way).
// Run must be running.
func (f *Fanout) SegmentMembers(ctx context.Context, segment string, max int) (map[string]struct{}, error) {
	if err := checkSegment(segment); err != nil {
		return nil, err
	}
	if err := f.seg.CatchUp(ctx); err != nil {
		return nil, unavailable("segment projection", err)
	}
	out := map[string]struct{}{}
	prefix := memberPrefix(segment)
	err := f.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if len(out) == max {
				return fmt.Errorf("segment %s has more than %d members: %w", segment, max, oplog.ErrInvalid)
			}
			out[string(it.Item().Key()[len(prefix):])] = struct{}{}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("fanout: read segment: %w", err)
	}
	return out, nil
}

func checkSegment(s string) error {
	if !oplog.ValidID(s) {
		return fmt.Errorf("segment %q: want 1-%d of [A-Za-z0-9_-]: %w", clip(s), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	return nil
}

// applyMembership projects one membership change.
func (f *Fanout) applyMembership(txn *badger.Txn, r *oplog.Record) error {
	m := new(fanoutpb.Membership)
	rest, _ := strings.CutPrefix(r.Subject, "sluice.segment.")
	if err := proto.Unmarshal(r.Data, m); err != nil || !oplog.ValidID(m.Segment) || !oplog.ValidID(m.User) || rest != m.Segment+"."+m.User {
		f.log.Error().Uint64("seq", r.Seq).Str("stream", StreamSegments).Msg("unreadable membership skipped")
		return nil
	}
	key := append(memberPrefix(m.Segment), m.User...)
	_, err := txn.Get(key)
	present := err == nil
	if err != nil && !errors.Is(err, badger.ErrKeyNotFound) {
		return err
	}
	if present == m.Member {
		return nil
	}
	n, err := oplog.GetUint64(txn, countKey(m.Segment))
	if err != nil {
		return err
	}
	if m.Member {
		n++
		err = txn.Set(key, nil)
	} else {
		n--
		err = txn.Delete(key)
	}
	if err != nil {
		return err
	}
	if n == 0 {
		return txn.Delete(countKey(m.Segment))
	}
	return txn.Set(countKey(m.Segment), binary.BigEndian.AppendUint64(nil, n))
}

// members returns up to limit members of a segment after user after
// (exclusive; "" from the start), and up to upto (inclusive; "" no bound),
// in byte order.
func (f *Fanout) members(segment, after, upto string, limit int) ([]string, error) {
	prefix := memberPrefix(segment)
	var out []string
	err := f.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: false})
		defer it.Close()
		start := prefix
		if after != "" {
			start = append(append(bytes.Clone(prefix), after...), 0)
		}
		for it.Seek(start); it.Valid() && len(out) < limit; it.Next() {
			u := string(it.Item().Key()[len(prefix):])
			if upto != "" && u > upto {
				break
			}
			out = append(out, u)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("fanout: read segment: %w", err)
	}
	return out, nil
}
