package main

import "time"

// meter measures one timed phase: wall time, this process's CPU time, and
// the CPU time other processes on the machine used meanwhile (which slows
// the phase down on a small machine and should be near zero for numbers to
// be trusted).
type meter struct {
	start    time.Time
	cpu      time.Duration
	busy     time.Duration
	haveBusy bool
}

func startMeter() meter {
	busy, ok := machineBusy()
	return meter{start: time.Now(), cpu: cpuTime(), busy: busy, haveBusy: ok}
}

// throughput of n items since the start.
func (m meter) throughput(n int) throughput {
	t := throughput{n: n, took: time.Since(m.start), cpu: cpuTime() - m.cpu, other: -1}
	if busy, ok := machineBusy(); ok && m.haveBusy {
		// /proc/stat counts in 10ms ticks: clamp the rounding noise.
		t.other = max(busy-m.busy-t.cpu, 0)
	}
	return t
}
