package topics

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"github.com/sluicehq/sluice/topics/topicspb"
)

// TestBudgetSplitsBetweenRecords: with a transaction budget so small that
// batches must be committed in pieces, no record is half applied: the
// follower counts are right and equal a rebuild's.
func TestBudgetSplitsBetweenRecords(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := Open(ctx, Config{Log: l, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.budget = budget{maxSize: 1 << 20, maxCount: 7} // a relation and its count are 2 writes
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
}
