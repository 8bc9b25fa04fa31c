package main

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"time"
)

// gwReport prints the gateway benchmark's results: a table per scenario
// as it ends (Sluice, baseline, ratio, goal, verdict, then details), and
// a summary.
type gwReport struct {
	out       io.Writer
	cfg       *gatewayConfig
	disturbed []string // timed phases during which other processes were busy
}

func (w *gwReport) printf(format string, a ...any) { fmt.Fprintf(w.out, format, a...) }

func (w *gwReport) header() {
	c := w.cfg
	w.printf("sluice-bench gateway\n")
	w.printf("machine:   %s\n", machineInfo())
	if c.fsync > 0 {
		w.printf("disk:      a 512 B append + fsync in the temp dir takes %s ms (median of 200): at most ~%.0f single durable stores/s\n", msec(c.fsync), float64(time.Second)/float64(c.fsync))
	}
	w.printf("files:     open-file limit %d (hard %d); clients dial from %s\n", c.files[0], c.files[1], sourceRange(c))
	w.printf("servers:   one child process per measurement (this binary re-executed as `sluice-bench %s`), on loopback, GOMAXPROCS %d\n", childCommand, runtime.GOMAXPROCS(0))
	w.printf("sluice:    embedded NATS + JetStream (fsync always) + oplog.Log (atomic batch %d) + Inbox (LocalFeed, SoleWriter) + Service + gateway.Server (defaults, heartbeat %v): TLV listener and WebSocket at /v1/ws\n", c.atomicBatch, c.heartbeat)
	if c.asSluiced {
		w.printf("           as sluiced runs it: topics.Topics and its Service, buckets.Map and a buckets.Scheduler deferring buckets of priority > 0 above %d sync computations in flight\n", c.syncOverload)
	} else {
		w.printf("           the gateway on the inbox alone (-as-sluiced=false): no topics, no buckets, no scheduler\n")
	}
	w.printf("clients:   in this process; each sends Hello with a token for its own user and device and reads Welcome and its first sync round\n")
	w.printf("           (catch-up: and the rounds the server runs later for buckets it deferred); payload %d B; no compression\n", c.payload)
	w.printf("cpu:       per timed phase: server = the child process, clients+producers = this process, others = the rest of the machine\n")
	w.printf("           (other processes, kernel threads such as the file system journal, interrupts such as loopback packet delivery)\n")
	w.printf("figures:   each next to its baseline measured in this run; ratio = sluice / baseline (lower is better)\n")
}

func sourceRange(c *gatewayConfig) string {
	if len(c.sources) == 1 {
		return c.sources[0].String()
	}
	return fmt.Sprintf("%s-%s (%d source addresses)", c.sources[0], c.sources[len(c.sources)-1], len(c.sources))
}

func kib(b float64) string { return fmt.Sprintf("%.2f KiB", b/1024) }
func mib(b uint64) string  { return fmt.Sprintf("%.1f", float64(b)/(1<<20)) }

// msec formats a duration in milliseconds.
func msec(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

func ratio(s, b float64) string {
	if b <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", s/b)
}

// verdict of a goal on a single figure.
func verdict(v, goal float64) string {
	if v <= goal {
		return "MET"
	}
	return "NOT MET"
}

// verdict2 of a goal on a figure seen over rounds: MET when every round
// is within it, MET AT P50 when only the median is.
func verdict2(p50, p100, goal time.Duration) string {
	switch {
	case p100 <= goal:
		return "MET"
	case p50 <= goal:
		return "MET AT P50"
	}
	return "NOT MET"
}

// cpuLine describes where a timed phase's CPU went, per unit.
func (w *gwReport) cpuLine(what string, c phaseCPU, per int, unit string) string {
	if per < 1 {
		per = 1
	}
	f := func(d time.Duration) string {
		if d < 0 {
			return "?"
		}
		return msec(d / time.Duration(per))
	}
	s := fmt.Sprintf("cpu per %s: server %s ms, clients+producers %s ms, others %s ms", unit, f(c.server), f(c.client), f(c.other))
	if c.other >= 0 && c.took > 0 {
		if cores := c.other.Seconds() / c.took.Seconds(); cores > busyThreshold {
			w.disturbed = append(w.disturbed, fmt.Sprintf("%s (%.1f cores)", what, cores))
		}
	}
	return s
}

func (w *gwReport) idle(rs []idleResult) {
	if len(rs) == 0 {
		return
	}
	n := rs[0].conns
	w.printf("\n(a) idle memory per connection: %d connections per server, each past its handshake (Sluice: Hello, Welcome, first sync round);\n", n)
	w.printf("    child VmRSS after %dx runtime.GC + debug.FreeOSMemory; per connection = (with connections - before) / connections\n", w.cfg.memGCs)
	w.printf("%-20s %7s %16s %16s %-10s %7s %-12s %s\n", "scenario", "conns", "sluice RSS/conn", "baseline", "", "ratio", "goal", "verdict")
	for _, r := range rs {
		s, b := r.sluice.rssPer(n), r.base.rssPer(n)
		w.printf("%-20s %7d %16s %16s %-10s %7s %-12s %s\n", "idle-"+r.transport, n, kib(s), kib(b), r.base.mode, ratio(s, b),
			"<= "+kib(r.goal()), verdict(s, r.goal()))
	}
	w.printf("  %-10s %-9s %22s %16s %13s %13s %16s %10s\n", "server", "transport", "RSS MiB before->with", "heap+stack/conn", "heap/conn", "stack/conn", "goroutines/conn", "connect")
	for _, r := range rs {
		for _, s := range []idleSide{r.sluice, r.base} {
			w.printf("  %-10s %-9s %22s %16s %13s %13s %16.2f %10s\n", s.mode, r.transport, mib(s.before.RSS)+" -> "+mib(s.after.RSS),
				kib(s.heapStackPer(n)), kib(s.heapPer(n)), kib(s.stackPer(n)), s.goroutinesPer(n), s.connect.Round(time.Millisecond))
		}
	}
}

func (w *gwReport) broadcast(r bcastResult) {
	c := w.cfg
	w.printf("\n(b) one message to %d online clients (%s): time from the first append request to the moment the last client has it;\n", r.clients, c.transport)
	w.printf("    %d rounds per variant after a warm-up round, p50 / p100 of the rounds\n", c.rounds)
	limit := "the oplog's default Limits.MaxTargets, as sluiced's --max-targets"
	if r.maxTarget > 0 {
		limit = fmt.Sprintf("the child's oplog Limits.MaxTargets raised to %d", r.maxTarget)
	}
	w.printf("    sluice: %d event(s) of %d targets each (%s), all sent at once, one request each to sluice.api.v1.append;\n", r.events, r.targets, limit)
	w.printf("    transient: the same with Event.transient (not stored, live only); baseline: raw-broadcast writes one frame of the same payload to every socket in a loop\n")
	w.printf("%-20s %7s %22s %22s %7s %-12s %s\n", "scenario", "clients", "sluice p50 / p100 ms", "baseline p50 / p100", "ratio", "goal", "verdict")
	for _, v := range []struct {
		name string
		side bcastSide
	}{{"broadcast", r.stored}, {"broadcast-transient", r.transient}} {
		w.printf("%-20s %7d %22s %22s %7s %-12s %s\n", v.name, r.clients, msec(v.side.p50())+" / "+msec(v.side.p100()),
			msec(r.raw.p50())+" / "+msec(r.raw.p100()), ratio(float64(v.side.p50()), float64(r.raw.p50())),
			"<= "+goalBroadcast.String(), verdict2(v.side.p50(), v.side.p100(), goalBroadcast))
	}
	for _, v := range []struct {
		name string
		side bcastSide
		ack  string
	}{{"sluice", r.stored, "appends acked"}, {"transient", r.transient, "appends acked"}, {"raw", r.raw, "write loop done"}} {
		var rounds, acks []string
		for _, x := range v.side.rounds {
			rounds = append(rounds, msec(x.last))
			acks = append(acks, msec(x.acked))
		}
		lost, dups := v.side.lost(r.clients)
		w.printf("  %-9s last client per round (ms): %s; %s after (ms): %s\n", v.name, strings.Join(rounds, " "), v.ack, strings.Join(acks, " "))
		w.printf("  %-9s receipts lost %d, duplicated %d, stray %d; %s\n", "", lost, dups, v.side.stray,
			w.cpuLine("broadcast "+v.name, v.side.cpu(), len(v.side.rounds), "round"))
	}
}

func (w *gwReport) latency(r latResult) {
	w.printf("\n(c) publish -> client latency: %d clients (one user each), %d events/s for %v (%d events), each to one user in turn,\n", r.clients, r.rate, r.duration, r.events)
	w.printf("    %d requests in flight, send time in the payload, fsync always; sluice: request/reply on sluice.api.v1.append, clients over %s;\n", r.inflight, w.cfg.transport)
	w.printf("    baseline: js.Publish (same rate, payload and in-flight count) into a file stream on the same server, received by one ordered consumer\n")
	w.printf("%-20s %26s %26s %7s %-12s %s\n", "scenario", "sluice p50 / p99 / max ms", "baseline p50 / p99 / max", "ratio", "goal", "verdict")
	f := func(l latency) string { return msec(l.p50) + " / " + msec(l.p99) + " / " + msec(l.max) }
	v := verdict(float64(r.sluice.lat.p99), float64(goalLatencyP))
	if r.sluice.lost() != 0 || r.sluice.dups != 0 {
		v += " (LOSSES)"
	}
	w.printf("%-20s %26s %26s %7s %-12s %s\n", "latency", f(r.sluice.lat), f(r.raw.lat), ratio(float64(r.sluice.lat.p99), float64(r.raw.lat.p99)),
		"p99 <= "+goalLatencyP.String(), v)
	for _, s := range []struct {
		name string
		side latSide
		req  string
	}{{"sluice", r.sluice, "append request"}, {"raw", r.raw, "js.Publish"}} {
		x := s.side
		w.printf("  %-7s sent %d, acked %d, received %d, lost %d, duplicated %d; %s p50 %s p99 %s ms\n",
			s.name, x.sent, x.acked, x.received, x.lost(), x.dups, s.req, msec(x.req.p50), msec(x.req.p99))
		held := "held the rate"
		if x.sent < r.events || x.behind > 100*time.Millisecond {
			held = "DID NOT hold the rate"
			if x.sent < r.events {
				held += fmt.Sprintf(" (%d sends skipped at the %v time limit)", r.events-x.sent, paceLimit(r.duration))
			}
		}
		w.printf("  %-7s %.0f sends/s, at most %s ms behind schedule: %s\n", "", throughput{n: x.sent, took: x.req.took}.rate(), msec(x.behind), held)
		w.printf("  %-7s receipt minus reply: p50 %s p99 %s max %s ms (delivery after the ack; negative: the client had it first)\n", "",
			msec(x.afterAck.p50), msec(x.afterAck.p99), msec(x.afterAck.max))
		w.printf("  %-7s %s\n", "", w.cpuLine("latency "+s.name, x.cpu, x.sent/1000, "1000 events"))
	}
}

func (w *gwReport) catchup(r catchResult) {
	c := w.cfg
	w.printf("\n(d) catch-up: %d clients reconnecting at once (%s), each with its sync point and %d entries appended while it was away;\n", r.clients, c.transport, r.backlog)
	w.printf("    time from the first reconnect until every client has all of them; %d runs, p50 / p100;\n", c.catchRuns)
	w.printf("    baseline: raw-broadcast answers each hello with a welcome and %d one-item frames of the same payload from memory (TCP)\n", r.backlog)
	w.printf("%-20s %7s %22s %22s %7s %-12s %s\n", "scenario", "clients", "sluice p50 / p100 ms", "baseline p50 / p100", "ratio", "goal", "verdict")
	v := verdict2(r.sluice.p50(), r.sluice.p100(), goalCatchup)
	if _, lost, dups, extra := r.sluice.totals(); lost+dups+extra > 0 {
		v += " (LOSSES)"
	}
	w.printf("%-20s %7d %22s %22s %7s %-12s %s\n", "catchup", r.clients, msec(r.sluice.p50())+" / "+msec(r.sluice.p100()),
		msec(r.raw.p50())+" / "+msec(r.raw.p100()), ratio(float64(r.sluice.p50()), float64(r.raw.p50())), "<= "+goalCatchup.String(), v)
	for _, s := range []struct {
		name string
		side catchSide
	}{{"sluice", r.sluice}, {"raw", r.raw}} {
		var runs []string
		var cpu phaseCPU
		for _, x := range s.side.runs {
			runs = append(runs, msec(x.took))
			cpu = cpu.add(x.cpu)
		}
		complete, lost, dups, extra := s.side.totals()
		w.printf("  %-7s runs (ms): %s; clients complete %d of %d, entries lost %d, duplicated %d, unexpected %d\n",
			s.name, strings.Join(runs, " "), complete, r.clients*len(s.side.runs), lost, dups, extra)
		if d := s.side.deferred(); d > 0 {
			var firsts []string
			for _, x := range s.side.runs {
				firsts = append(firsts, msec(x.first))
			}
			w.printf("  %-7s deferred under load: %d of %d clients got their backlog in a later round (the node had more sync computations\n", "", d, r.clients*len(s.side.runs))
			w.printf("  %-7s in flight than its scheduler's OverloadAt, sluiced's --sync-overload); the last client served in its first round had it at (ms): %s\n", "", strings.Join(firsts, " "))
		}
		w.printf("  %-7s %s\n", "", w.cpuLine("catchup "+s.name, cpu, len(s.side.runs), "run"))
	}
}

func (w *gwReport) summary(res gatewayResults) {
	w.printf("\nsummary (goals of the gateway issue; ratio = sluice / baseline)\n")
	w.printf("%-20s %-26s %-30s %7s %-13s %s\n", "scenario", "sluice", "baseline", "ratio", "goal", "verdict")
	row := func(name, s, b, r, goal, v string) {
		w.printf("%-20s %-26s %-30s %7s %-13s %s\n", name, s, b, r, goal, v)
	}
	for _, r := range res.idle {
		s, b := r.sluice.rssPer(r.conns), r.base.rssPer(r.conns)
		row("idle-"+r.transport, kib(s)+"/conn", kib(b)+"/conn "+r.base.mode, ratio(s, b), "<= "+kib(r.goal()), verdict(s, r.goal()))
	}
	if r := res.broadcast; r != nil {
		for _, v := range []struct {
			name string
			side bcastSide
		}{{"broadcast", r.stored}, {"broadcast-transient", r.transient}} {
			row(v.name, "p50 "+msec(v.side.p50())+" ms", "p50 "+msec(r.raw.p50())+" ms raw-broadcast", ratio(float64(v.side.p50()), float64(r.raw.p50())),
				"<= "+goalBroadcast.String(), verdict2(v.side.p50(), v.side.p100(), goalBroadcast))
		}
	}
	if r := res.latency; r != nil {
		v := verdict(float64(r.sluice.lat.p99), float64(goalLatencyP))
		if r.sluice.lost() != 0 || r.sluice.dups != 0 {
			v += fmt.Sprintf(" (%d lost, %d duplicated)", r.sluice.lost(), r.sluice.dups)
		}
		row("latency", "p99 "+msec(r.sluice.lat.p99)+" ms", "p99 "+msec(r.raw.lat.p99)+" ms raw JetStream", ratio(float64(r.sluice.lat.p99), float64(r.raw.lat.p99)),
			"p99 <= "+goalLatencyP.String(), v)
	}
	if r := res.catchup; r != nil {
		v := verdict2(r.sluice.p50(), r.sluice.p100(), goalCatchup)
		if _, lost, dups, extra := r.sluice.totals(); lost+dups+extra > 0 {
			v += fmt.Sprintf(" (%d lost, %d duplicated, %d unexpected)", lost, dups, extra)
		}
		if d := r.sluice.deferred(); d > 0 {
			v += fmt.Sprintf(" (%d of %d clients deferred under load)", d, r.clients*len(r.sluice.runs))
		}
		row("catchup", "p50 "+msec(r.sluice.p50())+" ms", "p50 "+msec(r.raw.p50())+" ms raw from memory", ratio(float64(r.sluice.p50()), float64(r.raw.p50())),
			"<= "+goalCatchup.String(), v)
	}
	if len(w.disturbed) > 0 {
		w.printf("WARNING: the rest of the machine kept more than %.1f cores busy during: %s; figures are noisy, ratios less so\n", busyThreshold, strings.Join(w.disturbed, ", "))
	}
}
