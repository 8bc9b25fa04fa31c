package gateway_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// manyBusinesses registers n user-dimension businesses b00..; every
// fourth in single-device mode and every fifth device-dimension.
func manyBusinesses(n int) []*oplogpb.Business {
	var out []*oplogpb.Business
	for i := range n {
		b := &oplogpb.Business{Code: fmt.Sprintf("b%02d", i), Dimension: oplogpb.Dimension_DIMENSION_USER}
		switch {
		case i%5 == 4:
			b.Dimension = oplogpb.Dimension_DIMENSION_DEVICE
		case i%4 == 3:
			b.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_SINGLE
		}
		out = append(out, b)
	}
	return out
}

func targetOf(b *oplogpb.Business, user, device string) string {
	if b.Dimension == oplogpb.Dimension_DIMENSION_DEVICE {
		return device
	}
	return user
}

// TestBucketsReadOncePerBucket: a connect reads the inbox once per
// non-empty bucket, not once per business, and gets the same items as
// the per-business computation.
func TestBucketsReadOncePerBucket(t *testing.T) {
	bizs := manyBusinesses(20)
	var perBiz []*gatewaypb.Item
	var perBizReads int
	for _, mode := range []string{"per-business", "bucketed"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnvWith(t, envOptions{buckets: true, businesses: bizs}, func(c *gateway.Config) { c.PerBusiness = mode == "per-business" })
			for i, b := range bizs {
				for range 1 + i%3 {
					e.append(b.Code, targetOf(b, "alice", "phone"))
				}
			}
			c := e.dialTCP()
			c.send(hello(e.token("alice", "phone", time.Hour)))
			_, items, _ := c.syncAll()
			st := e.sched.Stats()
			if st.Totals.Computations != 1 {
				t.Fatalf("%d computations, want 1", st.Totals.Computations)
			}
			reads := int(st.Totals.Reads)
			t.Logf("%s: %d items in %d reads (%v)", mode, len(items), reads, st.Buckets)
			if mode == "per-business" {
				perBiz, perBizReads = items, reads
				// One per business (the env's chat and config too), and the
				// device's recorded sync points once.
				if reads != len(bizs)+2+1 {
					t.Fatalf("per-business computation took %d reads, want %d", reads, len(bizs)+2+1)
				}
				return
			}
			// device, multi-device and user buckets: one read each, and the
			// sync points.
			if reads != 4 {
				t.Fatalf("bucketed computation took %d reads, want 4", reads)
			}
			if reads*5 > perBizReads {
				t.Fatalf("bucketed %d reads vs per-business %d: not 80%% fewer", reads, perBizReads)
			}
			key := func(it *gatewaypb.Item) string { return fmt.Sprintf("%s/%d", it.Business, it.Id) }
			var a, b []string
			for _, it := range items {
				a = append(a, key(it))
			}
			for _, it := range perBiz {
				b = append(b, key(it))
			}
			if !sameSet(a, b) {
				t.Fatalf("bucketed items differ from per-business ones:\n%v\n%v", a, b)
			}
		})
	}
}

// TestRebucketingUnderLiveTraffic moves businesses between buckets, and
// changes bucket priorities, while producers append and clients come back
// to the foreground: every client gets every entry of its inboxes exactly
// once, in id order per business, and moved businesses are computed in
// their new bucket on the next round.
func TestRebucketingUnderLiveTraffic(t *testing.T) {
	bizs := manyBusinesses(12)
	e := newEnvWith(t, envOptions{buckets: true, businesses: bizs}, nil)
	const clients = 4
	type sink struct {
		mu   sync.Mutex
		got  map[string][]uint64 // business -> ids in arrival order
		seen map[string]bool
	}
	sinks := make([]*sink, clients)
	conns := make([]*client, clients)
	var readers sync.WaitGroup
	for i := range clients {
		s := &sink{got: map[string][]uint64{}, seen: map[string]bool{}}
		sinks[i] = s
		c := e.dialTCP()
		conns[i] = c
		c.send(hello(e.token(fmt.Sprintf("u%d", i), fmt.Sprintf("d%d", i), time.Hour)))
		c.syncAll()
		readers.Go(func() {
			for {
				f, err := c.read(3 * time.Second)
				if err != nil {
					return
				}
				s.mu.Lock()
				for _, it := range append(f.GetLive().GetItems(), f.GetSync().GetItems()...) {
					k := fmt.Sprintf("%s/%d", it.Business, it.Id)
					if s.seen[k] {
						t.Errorf("client %d got %s twice", i, k)
					}
					s.seen[k] = true
					s.got[it.Business] = append(s.got[it.Business], it.Id)
				}
				s.mu.Unlock()
			}
		})
	}
	// Producers.
	want := make([]map[string][]uint64, clients)
	for i := range want {
		want[i] = map[string][]uint64{}
	}
	var wmu sync.Mutex
	stop := make(chan struct{})
	var producers sync.WaitGroup
	for p := range 2 {
		producers.Go(func() {
			r := rand.New(rand.NewPCG(uint64(p), 7))
			for {
				select {
				case <-stop:
					return
				default:
				}
				i := r.IntN(clients)
				b := bizs[r.IntN(len(bizs))]
				id := e.append(b.Code, targetOf(b, fmt.Sprintf("u%d", i), fmt.Sprintf("d%d", i)))
				wmu.Lock()
				want[i][b.Code] = append(want[i][b.Code], id)
				wmu.Unlock()
			}
		})
	}
	// Rebucketing while it runs, with rounds in between.
	ctx := tctx(t)
	if err := e.bm.Define(ctx, &bucketspb.Bucket{Name: "promo", Priority: 4}); err != nil {
		t.Fatal(err)
	}
	moves := []struct{ biz, bucket string }{
		{"b00", "promo"}, {"b01", buckets.OneShot}, {"b04", buckets.Global}, {"b03", "promo"},
		{"b00", ""}, {"b02", buckets.OneShot}, {"b01", buckets.Global},
	}
	for i, m := range moves {
		if err := e.bm.Assign(ctx, m.biz, m.bucket); err != nil {
			t.Fatalf("assign %s to %q: %v", m.biz, m.bucket, err)
		}
		if i == 3 {
			if err := e.bm.Define(ctx, &bucketspb.Bucket{Name: buckets.OneShot, Priority: 0}); err != nil {
				t.Fatal(err)
			}
		}
		for _, c := range conns {
			c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_FOREGROUND}}})
		}
		time.Sleep(40 * time.Millisecond)
	}
	close(stop)
	producers.Wait()
	// Everything appended arrives, once, in order per business.
	waitFor(t, func() bool {
		wmu.Lock()
		defer wmu.Unlock()
		for i, s := range sinks {
			s.mu.Lock()
			n, m := 0, 0
			for _, ids := range want[i] {
				n += len(ids)
			}
			for _, ids := range s.got {
				m += len(ids)
			}
			s.mu.Unlock()
			if m < n {
				return false
			}
		}
		return true
	})
	total := 0
	for i, s := range sinks {
		s.mu.Lock()
		for biz, ids := range want[i] {
			// Two producers append concurrently: the answer order is not
			// the id order, which is the order the client must see.
			slices.Sort(ids)
			total += len(ids)
			if got := s.got[biz]; !slices.Equal(got, ids) {
				t.Errorf("client %d business %s: got %v, want %v", i, biz, got, ids)
			}
		}
		s.mu.Unlock()
	}
	st := e.sched.Stats()
	for _, b := range []string{"promo", buckets.OneShot, buckets.Global} {
		if st.Buckets[b].Computations == 0 {
			t.Errorf("bucket %s was never computed after the moves: %+v", b, st.Buckets)
		}
	}
	t.Logf("%d entries to %d clients during %d moves; computations %d, reads %d", total, clients, len(moves), st.Totals.Computations, st.Totals.Reads)
	for _, c := range conns {
		if c.tcp != nil {
			_ = c.tcp.Close()
		}
	}
	readers.Wait()
}

// TestDeferredBucket: a rate-limited bucket is deferred on the second
// connect; the client is told when to come back, its entries are neither
// in the round nor sent live meanwhile, and the round it asks for brings
// them.
func TestDeferredBucket(t *testing.T) {
	promo := &oplogpb.Business{Code: "promo", Dimension: oplogpb.Dimension_DIMENSION_USER}
	e := newEnvWith(t, envOptions{buckets: true, businesses: []*oplogpb.Business{promo}}, nil)
	ctx := tctx(t)
	if err := e.bm.Define(ctx, &bucketspb.Bucket{Name: "slow", Priority: 5, Rate: 0.2, Burst: 1}); err != nil {
		t.Fatal(err)
	}
	if err := e.bm.Assign(ctx, "promo", "slow"); err != nil {
		t.Fatal(err)
	}
	p1 := e.append("promo", "carol")
	e.append("chat", "carol")
	first := e.dialTCP()
	first.send(hello(e.token("carol", "phone", time.Hour)))
	_, items, _ := first.syncAll()
	if len(items) != 2 {
		t.Fatalf("first connect got %d items, want 2 (the bucket's token)", len(items))
	}
	// The second device finds the bucket without a token.
	c := e.dialTCP()
	c.send(hello(e.token("carol", "tablet", time.Hour)))
	if c.must(5*time.Second).GetWelcome() == nil {
		t.Fatal("no welcome")
	}
	var done *gatewaypb.Sync
	items = nil
	for done == nil {
		s := c.must(5 * time.Second).GetSync()
		if s == nil {
			t.Fatal("expected the sync round")
		}
		items = append(items, s.Items...)
		if s.Done {
			done = s
		}
	}
	if !slices.Equal(done.Deferred, []string{"slow"}) || done.RetryAfterMs == 0 {
		t.Fatalf("done frame deferred %v retry %d ms, want [slow] and a delay", done.Deferred, done.RetryAfterMs)
	}
	for _, it := range items {
		if it.Business == "promo" {
			t.Fatalf("deferred business promo:%d in the round", it.Id)
		}
	}
	// Live: the deferred business is held back, the others flow. Both go
	// through one projection in this order, so a live promo would come
	// first.
	p2 := e.append("promo", "carol")
	c1 := e.append("chat", "carol")
	if l := c.live(1); l[0].Business != "chat" || l[0].Id != c1 {
		t.Fatalf("live %v, want chat:%d only", l, c1)
	}
	if st := e.sched.Stats(); st.Buckets["slow"].Deferrals == 0 {
		t.Fatalf("no deferral counted: %+v", st.Buckets["slow"])
	}
	// The client comes back when told; the bucket has its token again.
	time.Sleep(time.Duration(done.RetryAfterMs) * time.Millisecond)
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_FOREGROUND}}})
	var got []uint64
	for !slices.Contains(got, p2) {
		f := c.must(5 * time.Second)
		for _, it := range f.GetSync().GetItems() {
			if it.Business == "promo" {
				got = append(got, it.Id)
			}
		}
	}
	if !slices.Equal(got, []uint64{p1, p2}) {
		t.Fatalf("after the deferral promo items %v, want [%d %d]", got, p1, p2)
	}
}

// TestOverloadDefersLowerBuckets: with the node overloaded (more bucket
// computations in flight than OverloadAt), buckets of priority > 0 are
// deferred while the global bucket (priority 0) proceeds; every client
// still gets all its entries once it comes back as told.
func TestOverloadDefersLowerBuckets(t *testing.T) {
	bizs := manyBusinesses(10)
	e := newEnvWith(t, envOptions{buckets: true, businesses: bizs, scheduler: buckets.SchedulerConfig{OverloadAt: 1}}, nil)
	if err := e.bm.Assign(tctx(t), "b00", buckets.Global); err != nil {
		t.Fatal(err)
	}
	const clients = 24
	want := make([]int, clients)
	for i := range clients {
		for _, b := range bizs {
			e.append(b.Code, targetOf(b, fmt.Sprintf("u%d", i), fmt.Sprintf("d%d", i)))
			want[i]++
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	deferredRounds, globalDeferred := 0, 0
	for i := range clients {
		wg.Go(func() {
			c := e.dialTCP()
			c.send(hello(e.token(fmt.Sprintf("u%d", i), fmt.Sprintf("d%d", i), time.Hour)))
			got := map[string]bool{}
			firstRound := true
			for len(got) < want[i] {
				f, err := c.read(10 * time.Second)
				if err != nil {
					t.Errorf("client %d: %v after %d of %d items", i, err, len(got), want[i])
					return
				}
				s := f.GetSync()
				for _, it := range append(s.GetItems(), f.GetLive().GetItems()...) {
					got[fmt.Sprintf("%s/%d", it.Business, it.Id)] = true
				}
				if s.GetDone() {
					mu.Lock()
					if len(s.Deferred) > 0 {
						deferredRounds++
						if slices.Contains(s.Deferred, buckets.Global) {
							globalDeferred++
						}
					}
					mu.Unlock()
					if firstRound && len(s.Deferred) == 0 && len(got) < want[i] {
						t.Errorf("client %d: round done with %d of %d items and nothing deferred", i, len(got), want[i])
						return
					}
					firstRound = false
					if len(s.Deferred) > 0 {
						time.Sleep(time.Duration(s.RetryAfterMs) * time.Millisecond)
						c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_FOREGROUND}}})
					}
				}
			}
		})
	}
	wg.Wait()
	st := e.sched.Stats()
	t.Logf("%d clients; %d rounds deferred something; global computed %d times, deferred %d; totals %+v", clients, deferredRounds, st.Buckets[buckets.Global].Computations, st.Buckets[buckets.Global].Deferrals, st.Totals)
	if globalDeferred != 0 || st.Buckets[buckets.Global].Deferrals != 0 {
		t.Fatalf("the priority-0 bucket was deferred %d times", st.Buckets[buckets.Global].Deferrals)
	}
	if deferredRounds == 0 {
		t.Skip("no computation overlapped another on this run: overload not reached (the client count is too small for this machine)")
	}
}
