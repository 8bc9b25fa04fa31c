package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// goalRatio is the target: Sluice's producer path at no less than half the
// raw JetStream baseline in each fsync mode.
const goalRatio = 0.5

// throughput is n items in took, using cpu of process CPU time (server,
// Sluice and producers alike: everything runs in this process).
type throughput struct {
	n     int
	took  time.Duration
	cpu   time.Duration
	other time.Duration // CPU time other processes used meanwhile; -1 if unknown
}

// otherCores is the average number of cores other processes kept busy.
func (t throughput) otherCores() float64 {
	if t.other < 0 || t.took <= 0 {
		return -1
	}
	return t.other.Seconds() / t.took.Seconds()
}

// cores is the average number of cores this process kept busy.
func (t throughput) cores() float64 {
	if t.took <= 0 {
		return 0
	}
	return t.cpu.Seconds() / t.took.Seconds()
}

// cpuPer is the CPU time per item in microseconds.
func (t throughput) cpuPer() float64 {
	if t.n == 0 {
		return 0
	}
	return float64(t.cpu) / float64(time.Microsecond) / float64(t.n)
}

func (t throughput) rate() float64 {
	if t.took <= 0 {
		return 0
	}
	return float64(t.n) / t.took.Seconds()
}

// median returns the element of xs with the median key (the lower middle
// one for an even count).
func median[T any](xs []T, key func(T) float64) T {
	s := slices.Clone(xs)
	slices.SortFunc(s, func(a, b T) int {
		switch ka, kb := key(a), key(b); {
		case ka < kb:
			return -1
		case ka > kb:
			return 1
		}
		return 0
	})
	return s[(len(s)-1)/2]
}

// latency summarises request latencies.
type latency struct {
	n             int
	took          time.Duration
	p50, p99, max time.Duration
}

func summarise(ds []time.Duration, took time.Duration) latency {
	if len(ds) == 0 {
		return latency{}
	}
	slices.Sort(ds)
	return latency{n: len(ds), took: took, p50: percentile(ds, 0.50), p99: percentile(ds, 0.99), max: ds[len(ds)-1]}
}

// percentile of sorted ds by nearest rank.
// sortedDurations returns one duration of each x, sorted.
func sortedDurations[T any](xs []T, d func(T) time.Duration) []time.Duration {
	ds := make([]time.Duration, 0, len(xs))
	for _, x := range xs {
		ds = append(ds, d(x))
	}
	slices.Sort(ds)
	return ds
}

func percentile(ds []time.Duration, p float64) time.Duration {
	i := int(p*float64(len(ds))+0.999999) - 1
	return ds[min(max(i, 0), len(ds)-1)]
}

func (l latency) String() string {
	if l.n == 0 {
		return "-"
	}
	return fmt.Sprintf("p50 %s  p99 %s  max %s  (%.0f req/s)", ms(l.p50), ms(l.p99), ms(l.max), throughput{n: l.n, took: l.took}.rate())
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

// report prints the results.
type report struct {
	out io.Writer
	cfg *oplogConfig
}

func (w *report) printf(format string, a ...any) { fmt.Fprintf(w.out, format, a...) }

func (w *report) header() {
	c := w.cfg
	w.printf("sluice-bench oplog\n")
	w.printf("machine:   %s\n", machineInfo())
	var ns []string
	for _, m := range c.modes {
		ns = append(ns, fmt.Sprintf("%s %d", m, c.eventsFor(m)))
	}
	w.printf("events:    per timed run: %s; %d runs per side and scenario, median reported; payload %d B, stored entry %d B (raw messages are the same size)\n", strings.Join(ns, ", "), c.runs, c.payload, c.entrySize)
	w.printf("producers: over %s; raw: 1 async publisher, window %d; sluice: %d batch requests of %d events in flight to %s\n",
		transportName(c.transport), c.maxPending, c.inflight, c.batch, "sluice.api.v1.append.batch")
	w.printf("targets:   uniform random over the scenario's users; subjects <6 chars>.oplog.0.u.<user>.bench on both sides; prefill %v; message ids %v\n", c.prefill, c.msgID)
	w.printf("sluice:    oplog.Log + Inbox + Service as in sluiced (own connection: %s; badger inbox); end to end = first send until every reply is in and the inbox has applied the last id\n", transportName(c.sluiceConn))
	w.printf("latency:   %d single-event requests, %d in flight: raw js.Publish vs request/reply on sluice.api.v1.append\n\n", c.latN, c.latInflight)
	w.printf("%-8s %9s %8s %11s %11s %6s %12s %9s %13s %9s\n", "fsync", "users", "events", "raw msg/s", "sluice ev/s", "ratio", "sluice ack/s", "proj lag", "cpu µs/msg r|s", "B/msg r|s")
}

func transportName(t string) string {
	if t == transportInproc {
		return "in-process"
	}
	return "loopback TCP"
}

func (w *report) row(r result) {
	defer w.runs(r)
	w.printf("%-8s %9d %8d %11.0f %11.0f %5.2fx %12.0f %9s %6.1f|%-6.1f %4.0f|%-4.0f\n",
		r.mode, r.users, r.n, r.raw.tput.rate(), r.sluice.e2e.rate(), r.ratio(), r.sluice.acked.rate(),
		ms(r.sluice.lag), r.raw.tput.cpuPer(), r.sluice.e2e.cpuPer(), r.raw.bytesPerMsg, r.sluice.bytesPerMsg)
}

// runs prints every run's rate under a result row, with the cores other
// processes kept busy meanwhile, so the spread and its cause show.
func (w *report) runs(r result) {
	one := func(t throughput) string {
		if c := t.otherCores(); c >= 0 {
			return fmt.Sprintf("%.0f/%.1f", t.rate(), c)
		}
		return fmt.Sprintf("%.0f", t.rate())
	}
	var raw, sl []string
	for _, t := range r.raw.runs {
		raw = append(raw, one(t))
	}
	for _, t := range r.sluice.runs {
		sl = append(sl, one(t.e2e))
	}
	w.printf("%-8s %9s   runs (rate/other processes' cores): raw %s | sluice %s\n", "", "", strings.Join(raw, " "), strings.Join(sl, " "))
}

// busyThreshold is the load from other processes (in cores) above which a
// timed run is flagged as disturbed.
const busyThreshold = 0.2

// disturbed counts the timed runs during which other processes were busy.
func disturbed(results []result) (n, of int, worst float64) {
	check := func(t throughput) {
		of++
		if c := t.otherCores(); c > busyThreshold {
			n++
			worst = max(worst, c)
		}
	}
	for _, r := range results {
		for _, t := range r.raw.runs {
			check(t)
		}
		for _, t := range r.sluice.runs {
			check(t.e2e)
		}
	}
	return n, of, worst
}

func (w *report) footer(results []result) {
	if w.cfg.latN > 0 {
		w.printf("\nlatency (%d single-event requests, %d in flight)\n", w.cfg.latN, w.cfg.latInflight)
		for _, r := range results {
			w.printf("%-8s %9d  raw js.Publish   %s\n", r.mode, r.users, r.raw.lat)
			w.printf("%-8s %9d  sluice append    %s\n", r.mode, r.users, r.sluice.lat)
		}
	}
	w.printf("\nsummary (goal: sluice >= %.1fx raw in each mode)\n", goalRatio)
	if n, of, worst := disturbed(results); n > 0 {
		w.printf("WARNING: other processes kept more than %.1f cores busy during %d of %d timed runs (up to %.1f cores): rates are depressed and noisy; rerun on a quiet machine\n", busyThreshold, n, of, worst)
	}
	for _, mode := range w.cfg.modes {
		var parts []string
		worst := -1.0
		for _, r := range results {
			if r.mode != mode {
				continue
			}
			parts = append(parts, fmt.Sprintf("%.2fx at %d users (%.0f vs %.0f/s)", r.ratio(), r.users, r.sluice.e2e.rate(), r.raw.tput.rate()))
			if worst < 0 || r.ratio() < worst {
				worst = r.ratio()
			}
		}
		verdict := "MET"
		if worst < goalRatio {
			verdict = "NOT MET"
		}
		w.printf("%-8s sluice/raw %s: goal %s\n", mode, strings.Join(parts, ", "), verdict)
	}
}
