package topics

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"github.com/sluicehq/sluice/topics/topicspb"
)

// TestSplitsBetweenRecords: when a transaction is refused as too big after
// a record's writes went into it (badger.ErrTxnTooBig, here after every
// third record of a transaction), the projector keeps the record whole:
// the follower counts are right and equal a rebuild's.
func TestSplitsBetweenRecords(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Open(ctx, Config{Log: l, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// The follows projection again, with small transactions: a record's
	// relation and count are written, then the transaction is refused.
	var cur *badger.Txn // held: a discarded transaction's address is not reused
	var n int
	var refused atomic.Int64
	s.follows, err = oplog.NewProjection(oplog.ProjectionConfig{
		Stream: StreamFollows, DB: s.db, JetStream: l.JetStream(), Logger: &s.log,
		Prefixes: [][]byte{prefixStatus, prefixDefinitions, prefixFollows, prefixCounts},
		Apply: func(txn *badger.Txn, r *oplog.Record) error {
			if txn != cur {
				cur, n = txn, 0
			}
			n++
			if err := s.applyFollows(txn, r); err != nil {
				return err
			}
			if n > 3 {
				refused.Add(1)
				return badger.ErrTxnTooBig
			}
			return nil
		},
		Committed: s.committedFollows,
	})
	if err != nil {
		t.Fatal(err)
	}
	run, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- s.Run(run) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	if _, err := s.Create(ctx, &topicspb.Topic{Name: "t"}); err != nil {
		t.Fatal(err)
	}
	users := make([]string, 500)
	for i := range users {
		users[i] = fmt.Sprintf("u%d", i)
	}
	if _, err := s.FollowMany(ctx, "t", users); err != nil {
		t.Fatal(err)
	}
	for _, u := range users[:100] {
		if _, err := s.Unfollow(ctx, u, "t"); err != nil {
			t.Fatal(err)
		}
	}
	check := func(when string) {
		t.Helper()
		if n, err := s.Followers(ctx, "t"); err != nil || n != 400 {
			t.Fatalf("%s: %d followers (%v), want 400", when, n, err)
		}
	}
	check("live")
	live, err := s.Digest(ctx, StreamFollows)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := s.Rebuild(ctx, StreamFollows, 0, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Digest != live {
		t.Fatalf("rebuilt digest %s, live %s", sum.Digest, live)
	}
	check("rebuilt")
	if refused.Load() == 0 {
		t.Fatal("no transaction was refused: nothing was split")
	}
}
