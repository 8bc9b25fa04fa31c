package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/oplog"
)

// Scenarios of the gateway benchmark, in the order they run.
const (
	scIdle      = "idle"
	scBroadcast = "broadcast"
	scLatency   = "latency"
	scCatchup   = "catchup"
)

var allScenarios = []string{scIdle, scBroadcast, scLatency, scCatchup}

// Default connection counts per scenario (-n overrides them all).
const (
	defaultIdleN    = 10_000
	defaultBcastN   = 10_000
	defaultLatN     = 1_000
	defaultCatchupN = 1_000
)

// The goals of the gateway issue.
const (
	goalIdleWS    = 16 << 10 // bytes per idle WebSocket connection
	goalIdleTCP   = 6 << 10  // bytes per idle TLV connection
	goalBroadcast = 100 * time.Millisecond
	goalLatencyP  = 5 * time.Millisecond // p99
	goalCatchup   = 400 * time.Millisecond
)

// gatewayConfig is the command line of the gateway benchmark.
type gatewayConfig struct {
	asSluiced    bool // Sluice children run topics and buckets, as sluiced
	syncOverload int  // their scheduler's OverloadAt
	scenarios    []string
	idleN        int
	bcastN       int
	latN         int
	catchN       int
	rounds       int
	catchRuns    int
	backlog      int
	rate         int
	duration     time.Duration
	payload      int
	inflight     int
	transport    string
	bcastTargets int
	heartbeat    time.Duration
	atomicBatch  int
	memGCs       int
	dialPar      int
	cpuProfile   string
	memProfile   string
	timeout      time.Duration
	verbose      bool

	tokenKey ed25519.PrivateKey
	sources  []net.IP
	files    [2]uint64     // open-file limit: soft (after raising), hard
	fsync    time.Duration // median fsync of a small write where children keep their data
}

func parseGatewayFlags(args []string, stderr io.Writer) (*gatewayConfig, error) {
	c := &gatewayConfig{}
	fs := flag.NewFlagSet("sluice-bench gateway", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench gateway [flags]

Measures the gateway against the goals of its issue, each next to a baseline
measured in the same run: idle memory per connection (WebSocket and TLV,
against naive one-reader-one-writer servers), one message to every online
client (against a server writing from memory), publish-to-client latency
(against raw JetStream publish and consume), and catch-up of reconnecting
clients (against a server sending the same bytes from memory). Every server
runs in a child process (this binary, re-executed) on loopback; clients run
in this process.

flags:`)
		fs.PrintDefaults()
	}
	scen := fs.String("scenario", "all", "scenarios to run, comma-separated: idle, broadcast, latency, catchup, or all")
	fs.BoolVar(&c.asSluiced, "as-sluiced", true, "run Sluice servers with topics and buckets, as sluiced does (false: the gateway on the inbox alone)")
	fs.IntVar(&c.syncOverload, "sync-overload", buckets.DefaultOverloadAt, "with -as-sluiced: sync computations in flight above which the Sluice children defer buckets of priority > 0 (sluiced's --sync-overload)")
	n := fs.Int("n", 0, fmt.Sprintf("connections of every scenario (0: idle %d, broadcast %d, latency %d, catchup %d)", defaultIdleN, defaultBcastN, defaultLatN, defaultCatchupN))
	fs.IntVar(&c.idleN, "idle-n", defaultIdleN, "idle connections per server and transport")
	fs.IntVar(&c.bcastN, "broadcast-n", defaultBcastN, "online clients of the broadcast")
	fs.IntVar(&c.latN, "latency-n", defaultLatN, "clients (one user each) of the latency scenario")
	fs.IntVar(&c.catchN, "catchup-n", defaultCatchupN, "reconnecting clients of the catch-up scenario")
	fs.IntVar(&c.rounds, "rounds", 5, "timed broadcast rounds per variant (after one warm-up round)")
	fs.IntVar(&c.catchRuns, "catchup-runs", 3, "timed catch-up runs per side")
	fs.IntVar(&c.backlog, "backlog", 50, "entries each client misses in the catch-up scenario")
	fs.IntVar(&c.rate, "rate", 5000, "events per second of the latency scenario (all producers together)")
	fs.DurationVar(&c.duration, "duration", 10*time.Second, "length of the latency scenario's load")
	fs.IntVar(&c.payload, "payload", 128, "payload bytes of every event and baseline message (at least 16)")
	fs.IntVar(&c.inflight, "inflight", 64, "append requests (or raw publishes) in flight in the latency scenario")
	fs.StringVar(&c.transport, "transport", transportTCP, "client transport of the broadcast, latency and catch-up scenarios: tcp (TLV) or ws")
	fs.IntVar(&c.bcastTargets, "broadcast-targets", 1000, "targets per event of the broadcast (above 1000 the child raises oplog Limits.MaxTargets to match)")
	fs.DurationVar(&c.heartbeat, "heartbeat", 5*time.Minute, "gateway heartbeat: long, so idle clients are not probed")
	fs.IntVar(&c.atomicBatch, "atomic-batch", oplog.DefaultAtomicBatch, "oplog Config.AtomicBatch of the Sluice children (sluiced's default with --fsync always; 0: never; a diagnostic)")
	fs.IntVar(&c.memGCs, "mem-gcs", 2, "runtime.GC calls in the server before each memory reading (then debug.FreeOSMemory, one more)")
	fs.IntVar(&c.dialPar, "dial-parallel", 128, "clients connecting at once while a scenario sets up")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of the server child during each timed Sluice phase to <this>.<label>.<phase>.pprof")
	fs.StringVar(&c.memProfile, "memprofile", "", "write a heap profile of each idle server child, with its connections open, to <this>.<label>.idle.pprof")
	fs.DurationVar(&c.timeout, "timeout", 15*time.Minute, "abort the whole run after this long")
	fs.BoolVar(&c.verbose, "v", false, "children log their components' warnings to their stderr log")
	sources := fs.Int("sources", 8, "loopback source addresses clients dial from (127.0.0.2 up; Linux only)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	if *scen == "all" {
		c.scenarios = allScenarios
	} else {
		for _, s := range strings.Split(*scen, ",") {
			s = strings.TrimSpace(s)
			if !slices.Contains(allScenarios, s) {
				errs = append(errs, fmt.Errorf("-scenario %q: want idle, broadcast, latency, catchup or all", s))
				continue
			}
			if !slices.Contains(c.scenarios, s) {
				c.scenarios = append(c.scenarios, s)
			}
		}
	}
	if *n != 0 {
		c.idleN, c.bcastN, c.latN, c.catchN = *n, *n, *n, *n
	}
	for _, v := range []struct {
		name string
		v    int
	}{{"-n/-idle-n", c.idleN}, {"-n/-broadcast-n", c.bcastN}, {"-n/-latency-n", c.latN}, {"-n/-catchup-n", c.catchN}} {
		if v.v < 1 || v.v > 99_999 {
			errs = append(errs, fmt.Errorf("%s: want 1 to 99999 connections", v.name))
		}
	}
	if c.rounds < 1 || c.catchRuns < 1 || c.rounds > 1000 || c.catchRuns > 1000 {
		errs = append(errs, errors.New("-rounds and -catchup-runs: want 1 to 1000"))
	}
	if c.syncOverload < 1 {
		errs = append(errs, errors.New("-sync-overload: want at least 1"))
	}
	if c.backlog < 1 || c.backlog > 10_000 {
		errs = append(errs, errors.New("-backlog: want 1 to 10000"))
	}
	if c.rate < 1 || c.duration <= 0 || float64(c.rate)*c.duration.Seconds() > 10_000_000 {
		errs = append(errs, errors.New("-rate and -duration: want positive, at most 10,000,000 events in all"))
	}
	if c.payload < 16 || c.payload > 64<<10 {
		errs = append(errs, errors.New("-payload: want 16 to 65536 bytes"))
	}
	if c.inflight < 1 || c.inflight > 10_000 || c.dialPar < 1 || c.dialPar > 10_000 {
		errs = append(errs, errors.New("-inflight and -dial-parallel: want 1 to 10000"))
	}
	if c.transport != transportTCP && c.transport != transportWS {
		errs = append(errs, fmt.Errorf("-transport %q: want tcp or ws", c.transport))
	}
	if c.bcastTargets < 1 || c.bcastTargets > 100_000 {
		errs = append(errs, errors.New("-broadcast-targets: want 1 to 100000"))
	}
	if c.atomicBatch < 0 || c.atomicBatch > 1000 {
		errs = append(errs, errors.New("-atomic-batch: want 0 to 1000"))
	}
	if c.memGCs < 0 || c.memGCs > 100 {
		errs = append(errs, errors.New("-mem-gcs: want 0 to 100"))
	}
	if c.heartbeat < 100*time.Millisecond {
		errs = append(errs, errors.New("-heartbeat: want at least 100ms"))
	}
	if *sources < 1 || *sources > 200 {
		errs = append(errs, errors.New("-sources: want 1 to 200"))
	}
	if c.timeout <= 0 {
		errs = append(errs, errors.New("-timeout must be positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	c.sources = sourceIPs(*sources)
	return c, nil
}

// latEvents is the number of events of the latency scenario.
func (c *gatewayConfig) latEvents() int { return int(float64(c.rate) * c.duration.Seconds()) }

// gatewayResults collects what the scenarios measured, for the summary.
type gatewayResults struct {
	idle      []idleResult
	broadcast *bcastResult
	latency   *latResult
	catchup   *catchResult
}

func runGateway(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseGatewayFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := progressLogger(stderr)
	soft, hard, err := raiseFileLimit()
	if err != nil {
		log.Warn().Err(err).Msg("open-file limit not raised")
	}
	cfg.files = [2]uint64{soft, hard}
	if _, cfg.tokenKey, err = ed25519.GenerateKey(rand.Reader); err != nil {
		return fmt.Errorf("token key: %w", err)
	}
	if err := checkSources(ctx, cfg); err != nil {
		return err
	}
	d, err := newDialer(cfg)
	if err != nil {
		return err
	}

	if cfg.fsync, err = measureFsync(200); err != nil {
		log.Warn().Err(err).Msg("fsync not measured")
	}

	w := &gwReport{out: stdout, cfg: cfg}
	w.header()
	var res gatewayResults
	for _, sc := range cfg.scenarios {
		scLog := log.With().Str("scenario", sc).Logger()
		switch sc {
		case scIdle:
			for _, tr := range []string{transportWS, transportTCP} {
				r, err := runIdle(ctx, cfg, d, tr, scLog)
				if err != nil {
					return fmt.Errorf("idle %s: %w", tr, err)
				}
				res.idle = append(res.idle, r)
			}
			w.idle(res.idle)
		case scBroadcast:
			r, err := runBroadcast(ctx, cfg, d, scLog)
			if err != nil {
				return fmt.Errorf("broadcast: %w", err)
			}
			res.broadcast = &r
			w.broadcast(r)
		case scLatency:
			r, err := runLatency(ctx, cfg, d, scLog)
			if err != nil {
				return fmt.Errorf("latency: %w", err)
			}
			res.latency = &r
			w.latency(r)
		case scCatchup:
			r, err := runCatchup(ctx, cfg, d, scLog)
			if err != nil {
				return fmt.Errorf("catchup: %w", err)
			}
			res.catchup = &r
			w.catchup(r)
		}
	}
	w.summary(res)
	return nil
}

// prepareClients readies this process to drive clients against server
// children: it raises the open-file limit (recorded in cfg.files), makes
// the token key, keeps the source addresses that work, and returns a
// dialer.
func prepareClients(ctx context.Context, cfg *gatewayConfig, log zerolog.Logger) (*dialer, error) {
	soft, hard, err := raiseFileLimit()
	if err != nil {
		log.Warn().Err(err).Msg("open-file limit not raised")
	}
	cfg.files = [2]uint64{soft, hard}
	if _, cfg.tokenKey, err = ed25519.GenerateKey(rand.Reader); err != nil {
		return nil, fmt.Errorf("token key: %w", err)
	}
	if err := checkSources(ctx, cfg); err != nil {
		return nil, err
	}
	return newDialer(cfg)
}

// checkSources makes sure clients can dial from every source address;
// those that cannot are dropped (with 127.0.0.1 as the last resort).
func checkSources(ctx context.Context, cfg *gatewayConfig) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("loopback listener: %w", err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	var ok []net.IP
	for _, ip := range cfg.sources {
		nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 2 * time.Second}
		c, err := nd.DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			continue
		}
		_ = c.Close()
		ok = append(ok, ip)
	}
	if len(ok) == 0 {
		ok = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	cfg.sources = ok
	return nil
}

// phase measures one timed phase: wall time, CPU time of this process
// (the clients and producers), of the server child, and of every other
// process on the machine.
type phase struct {
	start  time.Time
	self   time.Duration
	child  time.Duration
	busy   time.Duration
	srv    *child
	haveMB bool
}

func startPhase(srv *child) phase {
	p := phase{start: time.Now(), self: cpuTime(), srv: srv}
	if srv != nil {
		p.child = srv.cpu()
	}
	p.busy, p.haveMB = machineBusy()
	return p
}

// phaseCPU is what a phase used.
type phaseCPU struct {
	took   time.Duration
	server time.Duration // -1 if unknown
	client time.Duration
	other  time.Duration // -1 if unknown
}

func (p phase) end() phaseCPU {
	r := phaseCPU{took: time.Since(p.start), client: cpuTime() - p.self, server: -1, other: -1}
	if p.srv != nil && p.child >= 0 {
		if c := p.srv.cpu(); c >= 0 {
			r.server = c - p.child
		}
	}
	if busy, ok := machineBusy(); ok && p.haveMB && r.server >= 0 {
		r.other = max(busy-p.busy-r.client-r.server, 0)
	}
	return r
}

// add sums two phases' CPU (unknowns stay unknown).
func (a phaseCPU) add(b phaseCPU) phaseCPU {
	sum := func(x, y time.Duration) time.Duration {
		if x < 0 || y < 0 {
			return -1
		}
		return x + y
	}
	return phaseCPU{took: a.took + b.took, server: sum(a.server, b.server), client: a.client + b.client, other: sum(a.other, b.other)}
}

// measureFsync times n small appends, each followed by fsync, to a file in
// the temporary directory the children store their data in, and returns
// the median: with fsync always, one JetStream store of one message costs
// at least that, so it bounds the rate of single durable publishes.
func measureFsync(n int) (time.Duration, error) {
	f, err := os.CreateTemp("", "sluice-bench-fsync-")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, 512)
	ds := make([]time.Duration, 0, n)
	for range n {
		t := time.Now()
		if _, err := f.Write(buf); err != nil {
			return 0, err
		}
		if err := f.Sync(); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(t))
	}
	slices.Sort(ds)
	return percentile(ds, 0.5), nil
}
