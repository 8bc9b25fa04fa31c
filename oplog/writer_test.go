package oplog_test

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/proto"
)

// TestGroupCommit drives the atomic-batch path of the writer with
// always-fsync: every id must hold the entry it was given for, retried
// message ids answer their originals, and concurrent appends all land once.
func TestGroupCommit(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{SyncAlways: true})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{AtomicBatch: 2, Limits: oplog.Limits{MaxTargets: 1000}}, chat)
	stream, err := l.JetStream().Stream(ctx(t), oplog.StreamOplog(0))
	if err != nil {
		t.Fatal(err)
	}
	check := func(r *oplogpb.AppendReply, ev *oplogpb.Event) {
		t.Helper()
		if r.Error != nil {
			t.Fatalf("append: %v", r.Error)
		}
		for _, res := range r.Results {
			m, err := stream.GetMsg(ctx(t), res.Id)
			if err != nil {
				t.Fatalf("id %d of %s: %v", res.Id, res.Target, err)
			}
			e := new(oplogpb.Entry)
			if err := proto.Unmarshal(m.Data, e); err != nil || e.Target != res.Target || e.MessageId != ev.MessageId {
				t.Fatalf("id %d holds target %q message %q, want %q %q", res.Id, e.Target, e.MessageId, res.Target, ev.MessageId)
			}
		}
	}
	// One event to many targets: one atomic batch (more than maxAtomic splits).
	targets := make([]string, 1000)
	for i := range targets {
		targets[i] = fmt.Sprintf("t%d", i)
	}
	big := syncEvent("chat", targets...)
	big.MessageId = "big"
	first := l.AppendBatch(ctx(t), []*oplogpb.Event{big, syncEvent("chat", "x", "y")})
	check(first[0], big)
	// Retried: the whole batch holds duplicates and is refused, then
	// rewritten one by one; every target answers its original id.
	again := l.AppendBatch(ctx(t), []*oplogpb.Event{proto.Clone(big).(*oplogpb.Event)})
	for i, res := range again[0].Results {
		if !res.Duplicate || res.Id != first[0].Results[i].Id {
			t.Fatalf("retry of %s: got id %d dup %v, want %d dup", res.Target, res.Id, res.Duplicate, first[0].Results[i].Id)
		}
	}
	// Concurrent appends: every id unique and holding its own entry.
	var mu sync.Mutex
	seen := map[uint64]string{}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 40 {
				ev := syncEvent("chat", fmt.Sprintf("g%d", g), fmt.Sprintf("h%d", g))
				ev.MessageId = fmt.Sprintf("g%d-%d", g, i)
				r := l.AppendBatch(ctx(t), []*oplogpb.Event{ev})[0]
				check(r, ev)
				mu.Lock()
				for _, res := range r.Results {
					if prev, dup := seen[res.Id]; dup {
						t.Errorf("id %d given to %s and %s", res.Id, prev, ev.MessageId)
					}
					seen[res.Id] = ev.MessageId
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(seen) != 8*40*2 {
		t.Fatalf("%d distinct ids, want %d", len(seen), 8*40*2)
	}
	info, err := l.JetStream().Stream(ctx(t), oplog.StreamOplog(0))
	if err != nil {
		t.Fatal(err)
	}
	if n := info.CachedInfo().State.Msgs; n != 1000+2+640 {
		t.Fatalf("stream holds %d messages, want %d", n, 1000+2+640)
	}
}

// TestBulkAppendsGoLast queues a large bulk load and then one ordinary
// append: the ordinary one is written before the bulk queue drains.
func TestBulkAppendsGoLast(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{AtomicBatch: 32, Limits: oplog.Limits{MaxTargets: 1000}}, chat)
	const jobs = 120 // ~1 s of bulk appends: room for the ordinary one on a loaded machine
	var done atomic.Int64
	started := make(chan struct{}, jobs)
	var wg sync.WaitGroup
	for g := range jobs {
		wg.Go(func() {
			targets := make([]string, 1000)
			for i := range targets {
				targets[i] = fmt.Sprintf("b%d-%d", g, i)
			}
			started <- struct{}{}
			r := l.AppendBatch(oplog.WithBulk(ctx(t)), []*oplogpb.Event{syncEvent("chat", targets...)})[0]
			if r.Error != nil {
				t.Errorf("bulk append: %v", r.Error)
			}
			done.Add(1)
		})
	}
	for range jobs {
		<-started
	}
	for done.Load() == 0 {
		runtime.Gosched()
	}
	mustAppend(t, l, syncEvent("chat", "alice"))
	behind := jobs - done.Load()
	wg.Wait()
	if behind == 0 {
		t.Fatalf("the ordinary append came back only after all %d bulk jobs", jobs)
	}
	t.Logf("ordinary append written with %d of %d bulk jobs still queued", behind, jobs)
}
