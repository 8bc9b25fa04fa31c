// Package topicstest runs the real topic store for tests: a Topics on an
// oplog.Log (see oplogtest for the embedded NATS server), applying its
// streams until the end of the test.
package topicstest

import (
	"context"
	"testing"
	"time"

	"github.com/sluicehq/sluice/oplog/oplogtest"
	"github.com/sluicehq/sluice/topics"
)

// MustRun opens a Topics with cfg (Dir defaults to a temporary directory)
// and runs it until the end of the test, then closes it.
func MustRun(tb testing.TB, cfg topics.Config) *topics.Topics {
	tb.Helper()
	if cfg.Dir == "" {
		cfg.Dir = tb.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := topics.Open(ctx, cfg)
	if err != nil {
		tb.Fatalf("open topics: %v", err)
	}
	stop := oplogtest.RunUntilCleanup(tb, "topics", s.Run)
	tb.Cleanup(func() {
		stop()
		if err := s.Close(); err != nil {
			tb.Errorf("close topics: %v", err)
		}
	})
	return s
}

// MustRunService serves the topic API of s until the end of the test.
func MustRunService(tb testing.TB, s *topics.Topics) {
	tb.Helper()
	sv, err := topics.NewService(topics.ServiceConfig{Topics: s})
	if err != nil {
		tb.Fatal(err)
	}
	stop := oplogtest.RunUntilCleanup(tb, "topic service", sv.Run)
	select {
	case <-sv.Ready():
	case <-time.After(10 * time.Second):
		stop()
		tb.Fatal("topic service not ready after 10s")
	}
}
