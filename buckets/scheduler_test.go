package buckets

import (
	"encoding/json"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func TestScheduler_RateLimit(t *testing.T) {
	s := NewScheduler(SchedulerConfig{})
	b := Bucket{Name: "vip", Priority: 1, Rate: 2} // burst max(1, ceil(2)) = 2

	for i := range 2 {
		if ok, retry := s.Admit(b, t0); !ok {
			t.Fatalf("admit %d within the burst: deferred for %v", i, retry)
		}
	}
	ok, retry := s.Admit(b, t0)
	if ok || retry <= 0 {
		t.Fatalf("third admit at the same instant: ok %v retry %v, want deferred with retryAfter > 0", ok, retry)
	}
	if retry != 500*time.Millisecond {
		t.Errorf("retryAfter %v, want 500ms (one token at 2/s)", retry)
	}
	if ok, _ := s.Admit(b, t0.Add(retry/2)); ok {
		t.Error("admitted before retryAfter")
	}
	if ok, retry := s.Admit(b, t0.Add(retry)); !ok {
		t.Errorf("not admitted at retryAfter: retry %v", retry)
	}

	// A new rate applies at once: unlimited.
	b.Rate = 0
	for i := range 100 {
		if ok, _ := s.Admit(b, t0.Add(time.Second)); !ok {
			t.Fatalf("admit %d with rate 0 deferred", i)
		}
	}
	// A fast bucket out of tokens still says at least MinRetryAfter.
	fast := Bucket{Name: "fast", Rate: 1000, Burst: 1}
	s.Admit(fast, t0)
	if ok, retry := s.Admit(fast, t0); ok || retry != MinRetryAfter {
		t.Errorf("fast bucket: ok %v retry %v, want deferred for %v", ok, retry, MinRetryAfter)
	}
	// Time going backwards refills nothing.
	slow := Bucket{Name: "slow", Rate: 1}
	s.Admit(slow, t0)
	if ok, _ := s.Admit(slow, t0.Add(-time.Hour)); ok {
		t.Error("admitted when the clock went backwards")
	}

	st := s.Stats().Buckets
	if st["vip"].RateLimited != 2 || st["vip"].Deferrals != 2 || st["vip"].Overloaded != 0 {
		t.Errorf("vip stats %+v, want 2 rate-limited deferrals", st["vip"])
	}
}

func TestScheduler_BurstShrinks(t *testing.T) {
	s := NewScheduler(SchedulerConfig{})
	b := Bucket{Name: "b", Rate: 1, Burst: 100}
	s.Admit(b, t0) // 99 tokens left
	b.Burst = 1
	if ok, _ := s.Admit(b, t0); !ok {
		t.Fatal("first admit after the burst shrank deferred")
	}
	if ok, _ := s.Admit(b, t0); ok {
		t.Error("admitted beyond the new burst of 1")
	}
}

func TestScheduler_Overload(t *testing.T) {
	s := NewScheduler(SchedulerConfig{OverloadAt: 3, DeferFor: time.Second})
	low := Bucket{Name: "user", Priority: 2}
	high := Bucket{Name: "global", Priority: 0}
	for range 3 {
		s.Begin()
	}
	for range 50 {
		ok, retry := s.Admit(low, t0)
		if ok {
			t.Fatal("priority 2 admitted while overloaded")
		}
		if retry < 750*time.Millisecond || retry > 1250*time.Millisecond {
			t.Fatalf("retryAfter %v, want 1s ±25%%", retry)
		}
	}
	if ok, retry := s.Admit(high, t0); !ok {
		t.Errorf("priority 0 deferred for %v while overloaded", retry)
	}
	s.End()
	if ok, retry := s.Admit(low, t0); !ok {
		t.Errorf("priority 2 deferred for %v below OverloadAt", retry)
	}
	if got := s.InFlight(); got != 2 {
		t.Errorf("InFlight() = %d, want 2", got)
	}
	st := s.Stats()
	if st.Buckets["user"].Overloaded != 50 || st.Totals.Deferrals != 50 || st.Totals.InFlight != 2 {
		t.Errorf("stats %+v, want 50 overload deferrals and 2 in flight", st)
	}
}

// TestScheduler_OverloadKeepsTokens: a bucket deferred for overload does
// not spend its tokens.
func TestScheduler_OverloadKeepsTokens(t *testing.T) {
	s := NewScheduler(SchedulerConfig{OverloadAt: 1})
	b := Bucket{Name: "b", Priority: 1, Rate: 1, Burst: 1}
	s.Begin()
	for range 5 {
		s.Admit(b, t0)
	}
	s.End()
	if ok, _ := s.Admit(b, t0); !ok {
		t.Error("token spent by overload deferrals")
	}
}

func TestScheduler_Stats(t *testing.T) {
	s := NewScheduler(SchedulerConfig{})
	for i := 1; i <= 100; i++ {
		s.Record("user", 1, time.Duration(i)*time.Millisecond)
	}
	s.Record("global", 2, 3*time.Millisecond)
	s.Computation(3)
	s.Computation(1)

	st := s.Stats()
	u := st.Buckets["user"]
	if u.Computations != 100 || u.Reads != 100 {
		t.Errorf("user: %+v, want 100 computations and reads", u)
	}
	// Bins are at most 12.5% wide and report their upper bound.
	if u.P50Ms < 50 || u.P50Ms > 50*1.125 || u.P99Ms < 99 || u.P99Ms > 100 || u.MaxMs != 100 {
		t.Errorf("user latency p50 %v p99 %v max %v, want ~50, ~99, 100", u.P50Ms, u.P99Ms, u.MaxMs)
	}
	want := Totals{Computations: 2, Reads: 4, ReadsPerComputation: 2, BucketComputations: 101, BucketReads: 102}
	if st.Totals != want {
		t.Errorf("totals %+v, want %+v", st.Totals, want)
	}
	if _, err := json.Marshal(st); err != nil {
		t.Errorf("marshal stats: %v", err)
	}

	s.Reset()
	st = s.Stats()
	if st.Buckets["user"] != (BucketStats{}) || st.Totals != (Totals{}) {
		t.Errorf("after Reset: %+v", st)
	}
}

func TestScheduler_Concurrent(t *testing.T) {
	s := NewScheduler(SchedulerConfig{OverloadAt: 4})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			b := Bucket{Name: []string{"a", "b"}[g%2], Priority: g % 3, Rate: 1000}
			for i := range 500 {
				now := t0.Add(time.Duration(i) * time.Millisecond)
				if ok, _ := s.Admit(b, now); ok {
					s.Begin()
					s.Record(b.Name, 1, time.Microsecond)
					s.End()
				}
				if i%100 == 0 {
					_ = s.Stats()
				}
			}
			s.Computation(1)
		})
	}
	wg.Wait()
	if got := s.InFlight(); got != 0 {
		t.Errorf("InFlight() = %d after every End, want 0", got)
	}
	if got := s.Stats().Totals.Computations; got != 8 {
		t.Errorf("computations %d, want 8", got)
	}
}

func TestHistogram_Bins(t *testing.T) {
	prev := uint64(0)
	for bin := range histBins {
		up := upperOf(bin)
		if up <= prev {
			t.Fatalf("bin %d: upper %d not above %d", bin, up, prev)
		}
		if got := binOf(up - 1); got != bin {
			t.Fatalf("binOf(%d) = %d, want %d", up-1, got, bin)
		}
		if got := binOf(prev); got != bin {
			t.Fatalf("binOf(%d) = %d, want %d (lower bound)", prev, got, bin)
		}
		if bin >= histSub && float64(up-prev) > 0.125*float64(prev)+1 {
			t.Fatalf("bin %d: [%d, %d) wider than 12.5%%", bin, prev, up)
		}
		prev = up
	}
	if got := binOf(1 << 62); got != histBins-1 {
		t.Errorf("binOf(2^62) = %d, want the last bin %d", got, histBins-1)
	}
	var h histogram
	if got := h.quantile(0.5); got != 0 {
		t.Errorf("empty quantile = %v", got)
	}
	h.observe(-time.Second)
	h.observe(time.Hour)
	if got := h.quantile(1); got != time.Hour {
		t.Errorf("max quantile = %v, want 1h", got)
	}
}
