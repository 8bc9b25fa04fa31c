package buckets

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// histogram counts durations in fixed log-scale bins: exact below 8ns,
// then 8 bins per power of two (at most 12.5% wide) up to 2^41ns (about
// 36 minutes; longer durations land in the last bin). Observing is a few
// atomic adds, no lock; reading is a walk over the bins.
type histogram struct {
	bins  [histBins]atomic.Uint64
	count atomic.Uint64
	max   atomic.Int64
}

const (
	histSub  = 8                       // bins per power of two
	histTop  = 40                      // highest power of two binned
	histBins = (histTop - 1) * histSub // 8 exact bins, then 8 per power of two from 2^3 to 2^40
)

// binOf returns the bin of a duration in nanoseconds.
func binOf(ns uint64) int {
	if ns < histSub {
		return int(ns)
	}
	octave := bits.Len64(ns) - 1 // >= 3
	if octave > histTop {
		return histBins - 1
	}
	sub := int(ns>>(octave-3)) & (histSub - 1)
	return (octave-2)*histSub + sub
}

// upperOf returns the exclusive upper bound of a bin, in nanoseconds.
func upperOf(bin int) uint64 {
	if bin < histSub {
		return uint64(bin) + 1
	}
	octave := bin/histSub + 2
	sub := uint64(bin % histSub)
	return (histSub + sub + 1) << (octave - 3)
}

func (h *histogram) observe(d time.Duration) {
	ns := max(int64(d), 0)
	h.bins[binOf(uint64(ns))].Add(1)
	h.count.Add(1)
	for {
		m := h.max.Load()
		if ns <= m || h.max.CompareAndSwap(m, ns) {
			return
		}
	}
}

// quantile returns an upper bound of the q-quantile (0 < q <= 1), capped
// at the largest duration observed; 0 when nothing was observed. Reads
// concurrent with observations see each counter at some recent value.
func (h *histogram) quantile(q float64) time.Duration {
	var counts [histBins]uint64
	var total uint64
	for i := range h.bins {
		counts[i] = h.bins[i].Load()
		total += counts[i]
	}
	if total == 0 {
		return 0
	}
	rank := uint64(q*float64(total) + 0.5)
	rank = min(max(rank, 1), total)
	var seen uint64
	for i, c := range counts {
		seen += c
		if seen >= rank && i < histBins-1 {
			return min(time.Duration(upperOf(i)), time.Duration(h.max.Load()))
		}
	}
	return time.Duration(h.max.Load()) // the last bin is open-ended
}

func (h *histogram) reset() {
	for i := range h.bins {
		h.bins[i].Store(0)
	}
	h.count.Store(0)
	h.max.Store(0)
}
