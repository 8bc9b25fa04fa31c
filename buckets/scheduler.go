package buckets

import (
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of SchedulerConfig.
const (
	// DefaultOverloadAt is the default SchedulerConfig.OverloadAt.
	DefaultOverloadAt = 256
	// DefaultDeferFor is the default SchedulerConfig.DeferFor.
	DefaultDeferFor = 2 * time.Second
	// MinRetryAfter is the shortest retryAfter Admit answers: a client
	// told to come back sooner would only spin.
	MinRetryAfter = 100 * time.Millisecond
)

// SchedulerConfig configures a Scheduler. A zero field takes the default in
// its comment.
type SchedulerConfig struct {
	// OverloadAt is the number of computations in flight on this node
	// (Begin without End) from which buckets of priority > 0 are deferred,
	// while priority 0 still proceeds. Default DefaultOverloadAt (256).
	OverloadAt int
	// DeferFor is how long an overload deferral asks the client to wait,
	// with ±25% jitter so that deferred clients do not come back in one
	// instant. Default DefaultDeferFor (2s).
	DeferFor time.Duration
}

// Scheduler admits bucket computations on this node, and measures them.
// Each bucket has a token bucket of Bucket.Rate tokens per second and
// Bucket.Burst tokens, keyed by name and re-read from the Bucket given to
// every Admit, so a new rate applies at once. When the node is overloaded
// (OverloadAt computations in flight), buckets of priority > 0 are
// deferred and priority 0 proceeds.
//
// Safe for concurrent use. Admit takes one short per-bucket mutex (only for
// rate-limited buckets); Begin, End, Record and Computation are atomic
// adds, plus a map read lock to find the bucket.
type Scheduler struct {
	overloadAt int64
	deferFor   time.Duration

	inFlight     atomic.Int64
	computations atomic.Uint64
	reads        atomic.Uint64

	mu      sync.RWMutex
	buckets map[string]*bucketState
}

// bucketState is the token bucket and the metrics of one bucket name.
type bucketState struct {
	mu      sync.Mutex
	tokens  float64
	last    time.Time
	started bool

	computations atomic.Uint64
	reads        atomic.Uint64
	rateLimited  atomic.Uint64
	overloaded   atomic.Uint64
	latency      histogram
}

// NewScheduler returns a Scheduler. It starts nothing.
func NewScheduler(cfg SchedulerConfig) *Scheduler {
	s := &Scheduler{
		overloadAt: int64(cfg.OverloadAt),
		deferFor:   cfg.DeferFor,
		buckets:    make(map[string]*bucketState),
	}
	if s.overloadAt <= 0 {
		s.overloadAt = DefaultOverloadAt
	}
	if s.deferFor <= 0 {
		s.deferFor = DefaultDeferFor
	}
	return s
}

// state returns the state of a bucket name, creating it on first use.
func (s *Scheduler) state(name string) *bucketState {
	s.mu.RLock()
	st := s.buckets[name]
	s.mu.RUnlock()
	if st != nil {
		return st
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st = s.buckets[name]; st == nil {
		st = new(bucketState)
		s.buckets[name] = st
	}
	return st
}

// Admit decides whether a computation of bucket b may start at now. When
// it may not, retryAfter says when the client should try again: for an
// overloaded node, DeferFor ±25%; for a bucket out of tokens, the time
// until it has one again (at least MinRetryAfter). An admitted computation
// has taken a token; the caller brackets it with Begin and End.
//
// Overload is checked first, so a deferred bucket keeps its tokens.
func (s *Scheduler) Admit(b Bucket, now time.Time) (ok bool, retryAfter time.Duration) {
	st := s.state(b.Name)
	if b.Priority > 0 && s.inFlight.Load() >= s.overloadAt {
		st.overloaded.Add(1)
		return false, jitter(s.deferFor)
	}
	if b.Rate <= 0 {
		return true, 0
	}
	st.mu.Lock()
	wait := st.take(b.Rate, b.burst(), now)
	st.mu.Unlock()
	if wait > 0 {
		st.rateLimited.Add(1)
		return false, max(wait, MinRetryAfter)
	}
	return true, 0
}

// take refills the token bucket up to now and takes a token, or returns
// how long until one is there. Time going backwards refills nothing.
func (st *bucketState) take(rate, burst float64, now time.Time) time.Duration {
	switch {
	case !st.started:
		st.tokens, st.last, st.started = burst, now, true
	case now.After(st.last):
		st.tokens += rate * now.Sub(st.last).Seconds()
		st.last = now
	}
	st.tokens = min(st.tokens, burst) // also when the burst shrank
	if st.tokens >= 1 {
		st.tokens--
		return 0
	}
	return time.Duration(math.Ceil((1 - st.tokens) / rate * float64(time.Second)))
}

// jitter returns d ±25%, uniformly.
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.75 + 0.5*rand.Float64()))
}

// Begin counts a computation in flight on this node, for overload; End
// ends it. Call End exactly once per Begin.
func (s *Scheduler) Begin() { s.inFlight.Add(1) }

// End ends a computation counted by Begin.
func (s *Scheduler) End() { s.inFlight.Add(-1) }

// InFlight returns the computations in flight (Begin without End).
func (s *Scheduler) InFlight() int { return int(s.inFlight.Load()) }

// Record measures one bucket computation: the reads it made and how long
// it took.
func (s *Scheduler) Record(bucket string, reads int, took time.Duration) {
	st := s.state(bucket)
	st.computations.Add(1)
	st.reads.Add(uint64(max(reads, 0)))
	st.latency.observe(took)
}

// Computation measures one whole computation (a connect's sync round, all
// buckets together, topics included) and the reads it made; the totals of
// Stats count these.
func (s *Scheduler) Computation(reads int) {
	s.computations.Add(1)
	s.reads.Add(uint64(max(reads, 0)))
}

// Stats are the Scheduler's counters since it started or was Reset.
type Stats struct {
	Buckets map[string]BucketStats `json:"buckets"`
	Totals  Totals                 `json:"totals"`
}

// BucketStats are the counters of one bucket.
type BucketStats struct {
	Computations uint64 `json:"computations"` // Record calls
	Reads        uint64 `json:"reads"`
	// Deferrals is RateLimited plus Overloaded: Admit calls that said no.
	Deferrals   uint64 `json:"deferrals"`
	RateLimited uint64 `json:"rate_limited"`
	Overloaded  uint64 `json:"overloaded"`
	// Latency of the recorded computations, in milliseconds: upper bounds
	// of log-scale bins at most 12.5% wide, capped at the maximum.
	P50Ms float64 `json:"p50_ms"`
	P99Ms float64 `json:"p99_ms"`
	MaxMs float64 `json:"max_ms"`
}

// Totals are the node-wide counters.
type Totals struct {
	// Computations and Reads count whole computations (Computation).
	Computations        uint64  `json:"computations"`
	Reads               uint64  `json:"reads"`
	ReadsPerComputation float64 `json:"reads_per_computation"`
	// BucketComputations, BucketReads and Deferrals sum the buckets.
	BucketComputations uint64 `json:"bucket_computations"`
	BucketReads        uint64 `json:"bucket_reads"`
	Deferrals          uint64 `json:"deferrals"`
	InFlight           int64  `json:"in_flight"`
}

// Stats returns the counters. Safe to call while they change; each counter
// is read once.
func (s *Scheduler) Stats() Stats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := Stats{Buckets: make(map[string]BucketStats, len(s.buckets))}
	for name, st := range s.buckets {
		bs := BucketStats{
			Computations: st.computations.Load(),
			Reads:        st.reads.Load(),
			RateLimited:  st.rateLimited.Load(),
			Overloaded:   st.overloaded.Load(),
			P50Ms:        ms(st.latency.quantile(0.50)),
			P99Ms:        ms(st.latency.quantile(0.99)),
			MaxMs:        ms(time.Duration(st.latency.max.Load())),
		}
		bs.Deferrals = bs.RateLimited + bs.Overloaded
		out.Buckets[name] = bs
		out.Totals.BucketComputations += bs.Computations
		out.Totals.BucketReads += bs.Reads
		out.Totals.Deferrals += bs.Deferrals
	}
	out.Totals.Computations = s.computations.Load()
	out.Totals.Reads = s.reads.Load()
	if out.Totals.Computations > 0 {
		out.Totals.ReadsPerComputation = float64(out.Totals.Reads) / float64(out.Totals.Computations)
	}
	out.Totals.InFlight = s.inFlight.Load()
	return out
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// Reset zeroes the counters and latencies, for benchmarks. Token buckets
// and computations in flight are kept.
func (s *Scheduler) Reset() {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, st := range s.buckets {
		st.computations.Store(0)
		st.reads.Store(0)
		st.rateLimited.Store(0)
		st.overloaded.Store(0)
		st.latency.reset()
	}
	s.computations.Store(0)
	s.reads.Store(0)
}
