package oplog_test

import (
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

// watcher collects what a Watch delivers.
type watcher struct {
	mu      sync.Mutex
	entries []*oplogpb.Entry
	more    chan struct{}
}

func newWatcher() *watcher { return &watcher{more: make(chan struct{}, 1)} }

func (w *watcher) add(e *oplogpb.Entry) {
	w.mu.Lock()
	w.entries = append(w.entries, e)
	w.mu.Unlock()
	select {
	case w.more <- struct{}{}:
	default:
	}
}

func watch(t *testing.T, in *oplog.Inbox, dim oplogpb.Dimension, target string) (*watcher, *oplog.Watch) {
	t.Helper()
	w := newWatcher()
	wt, err := in.Watch(dim, target, w.add)
	if err != nil {
		t.Fatalf("watch %s: %v", target, err)
	}
	t.Cleanup(wt.Stop)
	return w, wt
}

// waitN waits until at least n entries arrived and returns them all.
func (w *watcher) waitN(t *testing.T, n int) []*oplogpb.Entry {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		w.mu.Lock()
		got := slices.Clone(w.entries)
		w.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-w.more:
		case <-deadline:
			t.Fatalf("watch delivered %d entries, want %d", len(got), n)
		}
	}
}

func (w *watcher) ids() []uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []uint64
	for _, e := range w.entries {
		out = append(out, e.Id)
	}
	return out
}

// TestWatchDeliversStoredAndTransient: a watch gets its target's stored
// entries (appended here, fed from memory, and by another writer, read from
// the stream) with id, epoch and shard, and its transient ones with id 0;
// nothing of other targets, and nothing after Stop.
func TestWatchDeliversStoredAndTransient(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat, config)
	remote := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	in := oplogtest.MustRunInbox(t, l, "")
	user := oplogpb.Dimension_DIMENSION_USER
	dave, daveWatch := watch(t, in, user, "dave")
	erin, _ := watch(t, in, user, "erin")
	phone, _ := watch(t, in, oplogpb.Dimension_DIMENSION_DEVICE, "phone")

	first := mustAppend(t, l, syncEvent("chat", "dave"))[0].Id
	tr := syncEvent("chat", "dave")
	tr.Transient = true
	tr.Payload = []byte("typing")
	mustAppend(t, l, tr)
	second := mustAppend(t, remote, syncEvent("chat", "dave"))[0].Id
	mustAppend(t, l, syncEvent("chat", "erin"))
	mustAppend(t, l, syncEvent("config", "phone"))

	got := dave.waitN(t, 3)
	var stored []uint64
	transient := 0
	for _, e := range got {
		if e.Target != "dave" || e.Business != "chat" || e.Shard != 0 || e.Epoch != l.Epoch(0) {
			t.Fatalf("dave got %v", e)
		}
		if e.Id == 0 {
			transient++
			if string(e.Payload) != "typing" {
				t.Fatalf("transient entry %v", e)
			}
			continue
		}
		stored = append(stored, e.Id)
	}
	if transient != 1 || !slices.Equal(stored, []uint64{first, second}) {
		t.Fatalf("dave got stored %v and %d transient, want [%d %d] and 1", stored, transient, first, second)
	}
	if e := erin.waitN(t, 1); len(e) != 1 || e[0].Target != "erin" {
		t.Fatalf("erin got %v", e)
	}
	if e := phone.waitN(t, 1); len(e) != 1 || e[0].Target != "phone" || e[0].Business != "config" {
		t.Fatalf("phone got %v", e)
	}

	// After Stop: nothing more for dave. Erin's entry, appended after dave's
	// on the same shard, proves the projection went past it.
	daveWatch.Stop()
	daveWatch.Stop() // idempotent
	mustAppend(t, l, syncEvent("chat", "dave"))
	mustAppend(t, l, tr)
	mustAppend(t, l, syncEvent("chat", "erin"))
	erin.waitN(t, 2)
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // a transient would come through NATS
	if n := len(dave.ids()); n != 3 {
		t.Fatalf("dave got %d entries after Stop, want none", n-3)
	}
	// The backlog holds the stored entries only.
	if b := mustBacklog(t, in, oplog.BacklogRequest{User: "dave", Device: "d"}); len(b.Entries) != 3 {
		t.Fatalf("backlog holds %d entries, want the 3 stored", len(b.Entries))
	}
}

// TestWatchThenBacklogMissesNothing: a reader that watches first and reads
// the backlog second, while a producer appends, sees every entry.
func TestWatchThenBacklogMissesNothing(t *testing.T) {
	e := newEnv(t)
	const n = 400
	appended := make(chan uint64, n)
	errc := make(chan error, 1)
	go func() {
		for range n {
			r, err := e.l.Append(ctx(t), syncEvent("chat", "zoe"))
			if err != nil {
				errc <- err
				return
			}
			appended <- r[0].Id
		}
		close(appended)
	}()
	var want []uint64
	for range n / 2 {
		want = append(want, <-appended)
	}
	w, _ := watch(t, e.in, oplogpb.Dimension_DIMENSION_USER, "zoe")
	b := mustBacklog(t, e.in, oplog.BacklogRequest{User: "zoe", Device: "d", Limit: n})
	for id := range appended {
		want = append(want, id)
	}
	select {
	case err := <-errc:
		t.Fatal(err)
	default:
	}
	// Live ids arrive in order, and the live ids plus the backlog are
	// every id.
	w.waitN(t, 1)
	deadline := time.Now().Add(10 * time.Second)
	for {
		live := w.ids()
		if !slices.IsSorted(live) || len(slices.Compact(slices.Clone(live))) != len(live) {
			t.Fatalf("live ids out of order or repeated: %v", live)
		}
		seen := append(ids(b), live...)
		slices.Sort(seen)
		seen = slices.Compact(seen)
		if slices.Equal(seen, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("backlog (%d) and live (%d) together hold %d of %d ids", len(b.Entries), len(live), len(seen), len(want))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRebuildDoesNotRedeliver: entries a rebuild applies again are not
// handed to watchers a second time; new entries still are.
func TestRebuildDoesNotRedeliver(t *testing.T) {
	e := newEnv(t)
	w, _ := watch(t, e.in, oplogpb.Dimension_DIMENSION_USER, "yves")
	var want []uint64
	for range 3 {
		want = append(want, mustAppend(t, e.l, syncEvent("chat", "yves"))[0].Id)
	}
	w.waitN(t, 3)
	if _, err := e.in.Rebuild(ctx(t), oplog.StreamOplog(0), 0, time.Second, nil); err != nil {
		t.Fatal(err)
	}
	want = append(want, mustAppend(t, e.l, syncEvent("chat", "yves"))[0].Id)
	w.waitN(t, 4)
	if got := w.ids(); !slices.Equal(got, want) {
		t.Fatalf("watch got %v, want %v", got, want)
	}
}

func TestWatchRefusesBadTargets(t *testing.T) {
	e := newEnv(t)
	fn := func(*oplogpb.Entry) {}
	if _, err := e.in.Watch(oplogpb.Dimension_DIMENSION_USER, "a.b", fn); !errors.Is(err, oplog.ErrInvalidID) {
		t.Fatalf("watch a.b: %v, want ErrInvalidID", err)
	}
	if _, err := e.in.Watch(oplogpb.Dimension_DIMENSION_UNSPECIFIED, "ok", fn); !errors.Is(err, oplog.ErrInvalid) {
		t.Fatalf("watch without dimension: %v, want ErrInvalid", err)
	}
}

// TestConcurrentWatches: watches of one target made and stopped
// concurrently share one registration; the ones left open all get entries.
func TestConcurrentWatches(t *testing.T) {
	e := newEnv(t)
	const n = 8
	ws := make([]*watcher, n)
	stops := make([]*oplog.Watch, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		ws[i] = newWatcher()
		wg.Go(func() { stops[i], errs[i] = e.in.Watch(oplogpb.Dimension_DIMENSION_USER, "xena", ws[i].add) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i := range n / 2 {
		wg.Go(stops[i].Stop)
	}
	wg.Wait()
	tr := syncEvent("chat", "xena")
	tr.Transient = true
	mustAppend(t, e.l, tr)
	id := mustAppend(t, e.l, syncEvent("chat", "xena"))[0].Id
	for i := n / 2; i < n; i++ {
		if got := ws[i].waitN(t, 2); len(got) != 2 || got[0].Id+got[1].Id != id {
			t.Fatalf("watch %d got %v", i, got)
		}
	}
	for i := range n / 2 {
		if got := ws[i].ids(); len(got) != 0 {
			t.Fatalf("stopped watch %d got %v", i, got)
		}
	}
}
