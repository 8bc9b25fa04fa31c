package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// The storm benchmark: every device reconnects at once, each with a
// backlog spread over many businesses, against a gateway computing sync
// rounds by bucket and one computing every business on its own, on the
// same data.

// Computation modes of the storm's gateways.
const (
	stormBucketed    = "bucketed"
	stormPerBusiness = "per-business"
)

// goalReadsCut is the goal: bucketed sync rounds make at least 80% fewer
// store reads per connect than per-business ones.
const goalReadsCut = 0.8

// stormConfig is the command line of the storm benchmark.
type stormConfig struct {
	devices    int
	businesses int
	perDevice  int
	entries    int
	payload    int
	runs       int
	mode       string
	topics     bool
	transport  string
	dialPar    int
	sources    int
	heartbeat  time.Duration
	timeout    time.Duration
	verbose    bool
}

func parseStormFlags(args []string, stderr io.Writer) (*stormConfig, error) {
	c := &stormConfig{}
	fs := flag.NewFlagSet("sluice-bench storm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench storm [flags]

A connect storm: -devices devices (one user each) with backlogs across
-businesses businesses all reconnect at once; measures the time until every
device has its sync round done with all its entries, and the store reads per
connect from the gateway's buckets.Scheduler, for sync rounds computed by
bucket (gateway.Config.Buckets + Scheduler, as sluiced) and for every business
computed on its own (gateway.Config.PerBusiness), on the same data: each storm
runs on a fresh server child over one data directory, the two modes
alternating. Clients run in this process, on loopback.

flags:`)
		fs.PrintDefaults()
	}
	fs.IntVar(&c.devices, "devices", 10_000, "devices, each its own user, all reconnecting at once")
	fs.IntVar(&c.businesses, "businesses", 80, "registered businesses: 1/8 device-dimension, 1/8 user-dimension single-device, the rest user-dimension multi-device")
	fs.IntVar(&c.perDevice, "per-device", 10, "businesses (chosen at random) in which each device has entries")
	fs.IntVar(&c.entries, "entries", 2, "entries per device in each of its businesses")
	fs.IntVar(&c.payload, "payload", 64, "payload bytes of every entry")
	fs.IntVar(&c.runs, "runs", 3, "storms per mode, the median reported; the modes alternate (bucketed first in odd runs, per-business first in even ones)")
	fs.StringVar(&c.mode, "fsync", fsyncInterval, "JetStream fsync of the servers: interval (the server's default) or always (sluiced's default)")
	fs.BoolVar(&c.topics, "topics", true, "serve topics too, as sluiced does (each round also reads the user's follows and the everyone topic)")
	fs.StringVar(&c.transport, "transport", transportTCP, "client transport: tcp (TLV) or ws")
	fs.IntVar(&c.dialPar, "dial-parallel", 128, "devices connecting at once during a storm (the gateway's scheduler defers buckets from 256 computations in flight)")
	fs.IntVar(&c.sources, "sources", 8, "loopback source addresses clients dial from (127.0.0.2 up; Linux only)")
	fs.DurationVar(&c.heartbeat, "heartbeat", 5*time.Minute, "gateway heartbeat: long, so clients are not probed")
	fs.DurationVar(&c.timeout, "timeout", 20*time.Minute, "abort the whole run after this long")
	fs.BoolVar(&c.verbose, "v", false, "children log their components' warnings to their stderr log")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	if c.devices < 1 || c.devices > 99_999 {
		errs = append(errs, errors.New("-devices: want 1 to 99999"))
	}
	if c.businesses < 1 || c.businesses > 999 {
		errs = append(errs, errors.New("-businesses: want 1 to 999"))
	}
	if c.perDevice < 1 || c.perDevice > c.businesses {
		errs = append(errs, errors.New("-per-device: want 1 to -businesses"))
	}
	if c.entries < 1 || c.entries > 100 || c.payload < 0 || c.payload > 64<<10 {
		errs = append(errs, errors.New("-entries: want 1 to 100; -payload 0 to 65536"))
	}
	if c.runs < 1 || c.runs > 100 {
		errs = append(errs, errors.New("-runs: want 1 to 100"))
	}
	if c.mode != fsyncInterval && c.mode != fsyncAlways {
		errs = append(errs, fmt.Errorf("-fsync %q: want interval or always", c.mode))
	}
	if c.transport != transportTCP && c.transport != transportWS {
		errs = append(errs, fmt.Errorf("-transport %q: want tcp or ws", c.transport))
	}
	if c.dialPar < 1 || c.dialPar > 10_000 || c.sources < 1 || c.sources > 200 {
		errs = append(errs, errors.New("-dial-parallel: want 1 to 10000; -sources 1 to 200"))
	}
	if c.heartbeat < 100*time.Millisecond || c.timeout <= 0 {
		errs = append(errs, errors.New("-heartbeat: want at least 100ms; -timeout positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

// stormBusiness is one registered business of the storm.
type stormBusiness struct {
	code   string
	device bool // device dimension; otherwise user
	single bool // single-device mode
}

// businessMix returns the storm's businesses: 1/8 device-dimension, 1/8
// user-dimension single-device, the rest user-dimension multi-device.
func (c *stormConfig) businessMix() []stormBusiness {
	dev, single := c.businesses/8, c.businesses/8
	out := make([]stormBusiness, 0, c.businesses)
	for i := range c.businesses - dev - single {
		out = append(out, stormBusiness{code: fmt.Sprintf("m%03d", i)})
	}
	for i := range single {
		out = append(out, stormBusiness{code: fmt.Sprintf("s%03d", i), single: true})
	}
	for i := range dev {
		out = append(out, stormBusiness{code: fmt.Sprintf("v%03d", i), device: true})
	}
	return out
}

// businessFlag is the mix as the child's -businesses flag.
func businessFlag(mix []stormBusiness) string {
	parts := make([]string, len(mix))
	for i, b := range mix {
		switch {
		case b.device:
			parts[i] = b.code + ":device"
		case b.single:
			parts[i] = b.code + ":user:single"
		default:
			parts[i] = b.code + ":user"
		}
	}
	return strings.Join(parts, ",")
}

// stormRun is one storm.
type stormRun struct {
	mode   string
	took   time.Duration // first dial until the last device had everything
	each   []time.Duration
	rounds int // devices that needed more than one sync round (deferrals)
	stats  buckets.Stats
	check  catchRun // complete, lost, dups, extra
	cpu    phaseCPU
}

func (r stormRun) readsPerConnect(devices int) float64 {
	return float64(r.stats.Totals.Reads) / float64(devices)
}

// stormResult is the storm benchmark's outcome.
type stormResult struct {
	entries int
	load    time.Duration
	runs    []stormRun
}

// byMode returns the runs of one mode.
func (r stormResult) byMode(mode string) []stormRun {
	var out []stormRun
	for _, x := range r.runs {
		if x.mode == mode {
			out = append(out, x)
		}
	}
	return out
}

func runStorm(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	cfg, err := parseStormFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := progressLogger(stderr).With().Str("bench", "storm").Logger()
	gcfg := &gatewayConfig{heartbeat: cfg.heartbeat, payload: cfg.payload, atomicBatch: -1, verbose: cfg.verbose,
		sources: sourceIPs(cfg.sources), dialPar: cfg.dialPar, transport: cfg.transport}
	d, err := prepareClients(ctx, gcfg, log)
	if err != nil {
		return err
	}
	if soft := gcfg.files[0]; soft > 0 && uint64(cfg.devices+fdMargin) > soft {
		return fmt.Errorf("-devices %d: %d client links and %d other files exceed the open-file limit %d of this process (and of the server child): lower -devices", cfg.devices, cfg.devices, fdMargin, soft)
	}
	dir, err := os.MkdirTemp("", "sluice-bench-storm-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			log.Warn().Err(err).Str("dir", dir).Msg("temp dir not removed")
		}
	}()
	mix := cfg.businessMix()
	w := &stormReport{gwReport: gwReport{out: stdout, cfg: gcfg}, sc: cfg, mix: mix}
	w.header()
	data := filepath.Join(dir, "data")
	start := func(mode, label string) (*child, error) {
		extra := []string{"-fsync", cfg.mode, "-buckets", "-businesses", businessFlag(mix)}
		if cfg.topics {
			extra = append(extra, "-topics")
		}
		if mode == stormPerBusiness {
			extra = append(extra, "-per-business")
		}
		return startChildOn(ctx, gcfg, modeSluice, label, data, extra...)
	}

	var res stormResult
	srv, err := start(stormBucketed, "storm-load")
	if err != nil {
		return err
	}
	t0 := time.Now()
	want, n, err := stormLoad(ctx, cfg, mix, srv)
	srv.stop()
	if err != nil {
		return fmt.Errorf("load: %w", err)
	}
	res.entries, res.load = n, time.Since(t0)
	log.Info().Int("entries", n).Dur("took", res.load).Msg("backlogs stored")

	for run := range cfg.runs {
		modes := []string{stormBucketed, stormPerBusiness}
		if run%2 == 1 {
			modes[0], modes[1] = modes[1], modes[0]
		}
		for _, mode := range modes {
			srv, err := start(mode, "storm-"+mode)
			if err != nil {
				return err
			}
			r, err := storm(ctx, cfg, d, srv, want)
			srv.stop()
			if err != nil {
				return fmt.Errorf("run %d, %s: %w", run+1, mode, err)
			}
			r.mode = mode
			res.runs = append(res.runs, r)
			log.Info().Int("run", run+1).Str("mode", mode).Dur("all_synced", r.took).Float64("reads_per_connect", r.readsPerConnect(cfg.devices)).
				Int("complete", r.check.complete).Int("lost", r.check.lost).Dur("server_cpu", r.cpu.server).Msg("storm")
		}
	}
	w.results(res)
	return nil
}

// stormLoad stores the backlogs: each device gets cfg.entries entries in
// each of cfg.perDevice businesses chosen at random (to its user, or to
// the device for device-dimension businesses), in events of up to 1,000
// targets, all in flight at once. It returns the entry ids each device
// must receive, and the number of entries.
func stormLoad(ctx context.Context, cfg *stormConfig, mix []stormBusiness, srv *child) ([][]uint64, int, error) {
	nc, err := nats.Connect(srv.info.NATS, nats.Name("sluice-bench-producer"), nats.MaxReconnects(0))
	if err != nil {
		return nil, 0, fmt.Errorf("connect producer: %w", err)
	}
	defer closeConn(nc)
	if err := waitService(ctx, nc); err != nil {
		return nil, 0, err
	}
	rng := rand.New(rand.NewPCG(11, uint64(cfg.devices)))
	targets := make([][]string, len(mix))
	for i := range cfg.devices {
		for _, b := range rng.Perm(len(mix))[:cfg.perDevice] {
			t := userID5(i)
			if mix[b].device {
				t = deviceID5(i)
			}
			targets[b] = append(targets[b], t)
		}
	}
	var evs []*oplogpb.Event
	for e := range cfg.entries {
		payload := make([]byte, cfg.payload)
		copy(payload, fmt.Sprintf("entry %d", e))
		for b, ts := range targets {
			for k := 0; k < len(ts); k += 1000 {
				evs = append(evs, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: mix[b].code, Targets: ts[k:min(k+1000, len(ts))], Payload: payload})
			}
		}
	}
	_, _, replies, err := appendAll(ctx, nc, evs)
	if err != nil {
		return nil, 0, err
	}
	ids := map[string][]uint64{}
	n := 0
	for _, rep := range replies {
		for _, a := range rep.Results {
			ids[a.Target] = append(ids[a.Target], a.Id)
			n++
		}
	}
	want := make([][]uint64, cfg.devices)
	for i := range want {
		want[i] = slices.Concat(ids[userID5(i)], ids[deviceID5(i)])
		if len(want[i]) != cfg.perDevice*cfg.entries {
			return nil, 0, fmt.Errorf("device %d has %d entries, want %d", i, len(want[i]), cfg.perDevice*cfg.entries)
		}
	}
	// The projection holds everything before the first storm.
	if err := srv.call(ctx, http.MethodPost, "/catchup", nil, nil); err != nil {
		return nil, 0, err
	}
	return want, n, nil
}

// storm has every device reconnect (cfg.dialPar dialling at a time), send
// a Hello without sync points and read until it has all of want[i] or a
// round ends without deferral; then reads the scheduler's figures and
// closes every link.
func storm(ctx context.Context, cfg *stormConfig, d *dialer, srv *child, want [][]uint64) (stormRun, error) {
	var r stormRun
	n := cfg.devices
	hellos := make([]*gatewaypb.Frame, n)
	for i := range hellos {
		hellos[i] = mustHello(d, i, nil)
	}
	if err := srv.call(ctx, http.MethodPost, "/scheduler/reset", nil, nil); err != nil {
		return r, err
	}
	conns := make([]*benchConn, n)
	items := make([][]*gatewaypb.Item, n)
	r.each = make([]time.Duration, n)
	rounds := make([]int, n)
	ph := startPhase(srv)
	t0 := time.Now()
	err := forEach(ctx, n, cfg.dialPar, func(i int) error {
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		defer cancel()
		b, err := d.dial(hctx, srv, cfg.transport, i)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		conns[i] = b
		items[i], rounds[i], err = b.syncAll(hctx, hellos[i], len(want[i]))
		r.each[i] = time.Since(t0)
		return err
	})
	r.took = slices.Max(r.each)
	r.cpu = ph.end()
	defer closeAll(conns)
	if err != nil {
		return r, err
	}
	for i := range n {
		r.check.check(items[i], want[i])
		if rounds[i] > 1 {
			r.rounds++
		}
	}
	if err := srv.call(ctx, http.MethodGet, "/scheduler", nil, &r.stats); err != nil {
		return r, err
	}
	closeAll(conns)
	if err := srv.waitSessions(ctx, 0, time.Minute); err != nil {
		return r, err
	}
	return r, srv.alive()
}

// syncAll sends hello, reads the Welcome, then Sync frames until it holds
// want items at the end of a round, or a round ends with nothing deferred
// (the backlog is then all there is). A round that deferred buckets is
// followed by another one the server runs by itself. It returns the items
// and the rounds read.
func (b *benchConn) syncAll(ctx context.Context, hello *gatewaypb.Frame, want int) ([]*gatewaypb.Item, int, error) {
	if err := b.send(ctx, hello); err != nil {
		return nil, 0, fmt.Errorf("hello: %w", err)
	}
	f, err := b.read(ctx, handshakeTimeout)
	if err != nil {
		return nil, 0, fmt.Errorf("welcome: %w", err)
	}
	if f.GetWelcome() == nil {
		if err := endError(f); err != nil {
			return nil, 0, err
		}
		return nil, 0, fmt.Errorf("first frame is type %d, not welcome", wire.TypeOf(f))
	}
	var items []*gatewaypb.Item
	for rounds := 1; ; {
		f, err := b.read(ctx, handshakeTimeout)
		if err != nil {
			return items, rounds, fmt.Errorf("sync round %d: %w", rounds, err)
		}
		switch body := f.Body.(type) {
		case *gatewaypb.Frame_Sync:
			items = append(items, body.Sync.Items...)
			if !body.Sync.Done {
				continue
			}
			if len(items) >= want || len(body.Sync.Deferred) == 0 {
				return items, rounds, nil
			}
			rounds++
		case *gatewaypb.Frame_Live:
			items = append(items, body.Live.Items...)
		case *gatewaypb.Frame_Probe:
			if err := b.echo(ctx, body.Probe); err != nil {
				return items, rounds, err
			}
		default:
			if err := endError(f); err != nil {
				return items, rounds, err
			}
		}
	}
}

// stormReport prints the storm benchmark's results.
type stormReport struct {
	gwReport
	sc  *stormConfig
	mix []stormBusiness
}

func (w *stormReport) header() {
	c, g := w.sc, w.cfg
	var dev, single, multi int
	for _, b := range w.mix {
		switch {
		case b.device:
			dev++
		case b.single:
			single++
		default:
			multi++
		}
	}
	w.printf("sluice-bench storm\n")
	w.printf("machine:   %s\n", machineInfo())
	w.printf("files:     open-file limit %d (hard %d); clients dial from %s\n", g.files[0], g.files[1], sourceRange(g))
	topics := "no topics"
	if c.topics {
		topics = "topics.Topics + Service as Config.Topics (each round also reads the user's follows and the everyone topic)"
	}
	w.printf("server:    a child process per storm (`sluice-bench %s`) over one data directory, fsync %s: oplog.Log + Inbox (LocalFeed, SoleWriter) + Service,\n", childCommand, c.mode)
	w.printf("           buckets.Map + buckets.Scheduler (defaults: overload at %d computations in flight) as Config.Buckets and Scheduler, %s\n", buckets.DefaultOverloadAt, topics)
	w.printf("modes:     %s: Config.Buckets (one read per non-empty bucket: device, multi-device, user); %s: Config.PerBusiness (one read per business)\n", stormBucketed, stormPerBusiness)
	w.printf("data:      %d devices, one user each; %d businesses: %d user-dimension multi-device, %d user-dimension single-device, %d device-dimension;\n", c.devices, c.businesses, multi, single, dev)
	w.printf("           each device has %d entries in each of %d businesses chosen at random (%d entries, payload %d B), never acked\n", c.entries, c.perDevice, c.entries*c.perDevice, c.payload)
	w.printf("storm:     every device reconnects at once (at most %d dialling at a time) over %s with a Hello without sync points: its backlog is\n", c.dialPar, c.transport)
	w.printf("           everything it has (a device that never acked); done when its round ends holding all its entries (deferred buckets: the next round)\n")
	w.printf("figures:   total = first dial until the last device is done; reads = the scheduler's Stats (reset before each storm) / devices; %d storms per mode, alternating\n", c.runs)
}

func (w *stormReport) results(r stormResult) {
	c := w.sc
	w.printf("\nload:      %d entries stored in %.2f s\n\n", r.entries, r.load.Seconds())
	w.printf("%-13s %4s %10s %9s %9s %14s %13s %10s %9s %s\n", "mode", "run", "total ms", "p50 ms", "p99 ms", "reads/connect", "computations", "deferrals", "re-rounds", "complete / lost / dups / unexpected")
	for i, x := range r.runs {
		each := slices.Clone(x.each)
		slices.Sort(each)
		w.printf("%-13s %4d %10s %9s %9s %14.2f %13d %10d %9d %d / %d / %d / %d\n", x.mode, i/2+1, msec(x.took), msec(percentile(each, 0.5)), msec(percentile(each, 0.99)),
			x.readsPerConnect(c.devices), x.stats.Totals.Computations, x.stats.Totals.Deferrals, x.rounds, x.check.complete, x.check.lost, x.check.dups, x.check.extra)
	}
	med := func(mode string) stormRun {
		return median(r.byMode(mode), func(x stormRun) float64 { return float64(x.took) })
	}
	b, p := med(stormBucketed), med(stormPerBusiness)
	for _, x := range []stormRun{b, p} {
		var names []string
		for name := range x.stats.Buckets {
			names = append(names, name)
		}
		slices.Sort(names)
		var parts []string
		for _, name := range names {
			bs := x.stats.Buckets[name]
			parts = append(parts, fmt.Sprintf("%s %d reads/%d computations (p99 %.2f ms)", name, bs.Reads, bs.Computations, bs.P99Ms))
		}
		w.printf("  %-13s buckets: %s\n", x.mode, strings.Join(parts, ", "))
		var cpu phaseCPU
		runs := r.byMode(x.mode)
		for _, y := range runs {
			cpu = cpu.add(y.cpu)
		}
		w.printf("  %-13s %s\n", "", w.cpuLine("storm "+x.mode, cpu, c.devices*len(runs), "connect"))
	}
	rb, rp := b.readsPerConnect(c.devices), p.readsPerConnect(c.devices)
	cut := 0.0
	if rp > 0 {
		cut = 1 - rb/rp
	}
	w.printf("\nsummary (goals: bucketed >= %.0f%% fewer store reads per connect, and a lower total time; the median storm of each mode by total time)\n", goalReadsCut*100)
	check := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	w.printf("reads per connect: bucketed %.2f, per-business %.2f: %.1f%% fewer: %s\n", rb, rp, cut*100, check(cut >= goalReadsCut))
	w.printf("total time:        bucketed %s ms, per-business %s ms (%s): %s\n", msec(b.took), msec(p.took), ratio(float64(b.took), float64(p.took)), check(b.took < p.took))
	complete, lost, dups, extra := 0, 0, 0, 0
	for _, x := range r.runs {
		complete += x.check.complete
		lost += x.check.lost
		dups += x.check.dups
		extra += x.check.extra
	}
	w.printf("every device got exactly its entries: %d of %d device syncs complete, %d lost, %d duplicated, %d unexpected: %s\n",
		complete, c.devices*len(r.runs), lost, dups, extra, check(complete == c.devices*len(r.runs) && lost+dups+extra == 0))
	if len(w.disturbed) > 0 {
		w.printf("WARNING: the rest of the machine kept more than %.1f cores busy during: %s; figures are noisy\n", busyThreshold, strings.Join(w.disturbed, ", "))
	}
}
