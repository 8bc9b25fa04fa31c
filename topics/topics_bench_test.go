package topics_test

import (
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
)

func benchFollowMany(b *testing.B, n int) {
	users := make([]string, n)
	for i := range users {
		users[i] = fmt.Sprintf("user%d", i)
	}
	b.ReportAllocs()
	round := 0
	for b.Loop() {
		b.StopTimer()
		e := newEnv(b, topics.Config{SoleWriter: true})
		topic := fmt.Sprintf("t%d", round)
		round++
		mustCreate(b, e.s, topic, 0)
		b.StartTimer()
		got, err := e.s.FollowMany(ctx(b), topic, users)
		if err != nil || got != n {
			b.Fatalf("follow many: %d, %v", got, err)
		}
		b.StopTimer()
		if c := followers(b, e.s, topic); c != uint64(n) {
			b.Fatalf("%d followers, want %d", c, n)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "follows/s")
}

// BenchmarkFollowMany_*: a bulk import of followers into a new topic,
// until this node's index holds them all.
func BenchmarkFollowMany_100000Users(b *testing.B)  { benchFollowMany(b, 100_000) }
func BenchmarkFollowMany_1000000Users(b *testing.B) { benchFollowMany(b, 1_000_000) }

// BenchmarkBacklog_100Topics: the sync of a user following 100 topics, of
// which 5 have new messages since the device's cursors.
func BenchmarkBacklog_100Topics(b *testing.B) {
	e := newEnv(b, topics.Config{SoleWriter: true})
	cursors := map[string]topics.Cursor{}
	for i := range 100 {
		name := fmt.Sprintf("t%d", i)
		mustCreate(b, e.s, name, 0)
		mustFollow(b, e.s, "alice", name)
		id := mustPublish(b, e.s, message(name, "old"))
		cursors[name] = topics.Cursor{ID: id, Epoch: e.s.Epoch()}
	}
	cursors[topics.Everyone] = topics.Cursor{ID: 1, Epoch: e.s.Epoch()}
	for i := range 5 {
		publishN(b, e.s, fmt.Sprintf("t%d", i*20), 3)
	}
	req := topics.BacklogRequest{User: "alice", Device: "phone", Cursors: cursors}
	got := mustBacklog(b, e.s, req)
	if len(got.Entries) != 15 {
		b.Fatalf("%d entries, want 15", len(got.Entries))
	}
	b.ReportAllocs()
	reads := 0
	for b.Loop() {
		reads = mustBacklog(b, e.s, req).Reads
	}
	b.ReportMetric(float64(reads), "reads/op")
}

// BenchmarkWatch_15000Watchers: one topic message handed to 15,000
// watchers of one node (a gateway's sessions), measured from publish to
// the last delivery.
func BenchmarkWatch_15000Watchers(b *testing.B) {
	e := newEnv(b, topics.Config{SoleWriter: true})
	mustCreate(b, e.s, "big", 0)
	var delivered atomic.Int64
	done := make(chan struct{}, 1)
	const watchers = 15_000
	for range watchers {
		w, err := e.s.Watch("big", func(*oplogpb.Entry) {
			if delivered.Add(1)%watchers == 0 {
				done <- struct{}{}
			}
		})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(w.Stop)
	}
	b.ReportAllocs()
	for b.Loop() {
		mustPublish(b, e.s, message("big", "hello"))
		<-done
	}
	b.ReportMetric(float64(watchers), "deliveries/op")
}

// BenchmarkWatchChurn_15000Watchers: 15,000 sessions of one node start
// watching one topic, then all stop (a reconnect storm).
func BenchmarkWatchChurn_15000Watchers(b *testing.B) {
	e := newEnv(b, topics.Config{})
	mustCreate(b, e.s, "big", 0)
	ws := make([]*topics.Watch, 15_000)
	b.ReportAllocs()
	for b.Loop() {
		for i := range ws {
			w, err := e.s.Watch("big", func(*oplogpb.Entry) {})
			if err != nil {
				b.Fatal(err)
			}
			ws[i] = w
		}
		for _, w := range ws {
			w.Stop()
		}
	}
}
