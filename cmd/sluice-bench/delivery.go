package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"google.golang.org/protobuf/proto"
)

// The delivery benchmark: the delivery targets of switches and releases,
// each next to a baseline measured in the same run: rule evaluations per
// second on one core (next to oplog.Match), the HTTP check for updates
// (next to a trivial handler on the same server) and switch changes
// reaching online devices (next to a topics.Everyone message to the same
// clients).

// The delivery benchmark's scenarios.
const (
	scenarioRules  = "rules"
	scenarioHTTP   = "http"
	scenarioSwitch = "switch"
)

// Client kinds of the switch scenario.
const (
	clientRaw = "raw"
	clientSDK = "sdk"
)

// Goals of the delivery benchmark.
const (
	goalHTTPRatio = 0.6         // /v1/updates at least 0.6x the trivial handler's requests/s
	goalSwitch    = time.Second // a switch change reaches every online matching device within it
)

// liveSwitch is the switch the switch scenario changes.
const liveSwitch = "bench-live"

// deliveryConfig is the command line of the delivery benchmark.
type deliveryConfig struct {
	scenarios   map[string]bool
	fsync       string
	switches    int
	packages    int
	devices     int
	rulesTime   time.Duration
	conc        int
	httpTime    time.Duration
	httpDevices int
	clients     int
	changes     int
	interval    time.Duration
	clientKind  string
	timeout     time.Duration
	cpuProfile  string
}

func parseDeliveryFlags(args []string, stderr io.Writer) (*deliveryConfig, error) {
	c := &deliveryConfig{}
	var scen string
	fs := flag.NewFlagSet("sluice-bench delivery", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench delivery [flags]

Measures the delivery targets on one embedded NATS server (JetStream in a
temporary directory) holding -switches switches of 2 variants each and
-packages packages with a gray release, each scenario next to a baseline
measured in the same run:

  rules   rule evaluations per second on one core (GOMAXPROCS 1, one
          goroutine) of a typical gray rule over -devices devices, next to
          oplog.Match of the same predicates; and Delivery.View per second.
  http    requests/s of GET /v1/updates (Delivery.UpdatesHandler, gateway
          token verified) next to a trivial handler on the same server:
          -concurrency keep-alive clients for -http-time per phase, trivial,
          updates, trivial again. Goal: updates at least 0.6x the trivial mean.
  switch  -clients clients online on a gateway (Config.Views), half of them
          matching a switch's variant; -changes changes, each timed from just
          before SetSwitch until every matching client has the new value.
          Baseline: a topics.Everyone message to the same clients. Goal:
          p99 and max under 1 s.

Loopback only; everything runs in this process. Exits non-zero when a
correctness check fails (lost or wrong values), not for a missed goal.

flags:`)
		fs.PrintDefaults()
	}
	fs.StringVar(&scen, "scenario", "all", "scenarios to run: all, or a comma-separated list of rules, http, switch")
	fs.StringVar(&c.fsync, "fsync", fsyncAlways, "JetStream fsync: always (sluiced's default) or interval")
	fs.IntVar(&c.switches, "switches", 50, "switches in the state, 2 variants each")
	fs.IntVar(&c.packages, "packages", 5, "packages in the state, each with a full release and a gray one (10%)")
	fs.IntVar(&c.devices, "devices", 100_000, "rules: devices in the population the rules run over")
	fs.DurationVar(&c.rulesTime, "rules-time", 2*time.Second, "rules: time per measured side (rule, oplog.Match, view)")
	fs.IntVar(&c.conc, "concurrency", 64, "http: concurrent keep-alive clients")
	fs.DurationVar(&c.httpTime, "http-time", 5*time.Second, "http: duration of each phase")
	fs.IntVar(&c.httpDevices, "http-devices", 1000, "http: simulated devices, each with its own token and attributes")
	fs.IntVar(&c.clients, "clients", 1000, "switch: online clients (half match the switch's variant)")
	fs.IntVar(&c.changes, "changes", 20, "switch: timed switch changes, and as many baseline messages (after one warm-up of each)")
	fs.DurationVar(&c.interval, "interval", 200*time.Millisecond, "switch: time between changes (a change goes out once the previous one reached every matching client, and not sooner)")
	fs.StringVar(&c.clientKind, "client", clientRaw, "switch: raw (protocol clients that read frames) or sdk (client.Client with Views, HandleView)")
	fs.DurationVar(&c.timeout, "timeout", 10*time.Minute, "abort the whole run after this long")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of each scenario (server and clients: one process) to <file>.<scenario>.pprof")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	var err error
	c.scenarios, err = parseSet("-scenario", scen, true, scenarioRules, scenarioHTTP, scenarioSwitch)
	errs = append(errs, err)
	if c.fsync != fsyncInterval && c.fsync != fsyncAlways {
		errs = append(errs, fmt.Errorf("-fsync %q: want interval or always", c.fsync))
	}
	if c.switches < 1 || c.switches > 1000 || c.packages < 1 || c.packages > 100 {
		errs = append(errs, errors.New("-switches: want 1 to 1000; -packages 1 to 100"))
	}
	if c.devices < 1 || c.devices > 10_000_000 || c.rulesTime < time.Millisecond {
		errs = append(errs, errors.New("-devices: want 1 to 10000000; -rules-time at least 1ms"))
	}
	if c.conc < 1 || c.conc > 4096 || c.httpTime < 10*time.Millisecond || c.httpDevices < c.conc || c.httpDevices > 1_000_000 {
		errs = append(errs, errors.New("-concurrency: want 1 to 4096; -http-time at least 10ms; -http-devices from -concurrency to 1000000"))
	}
	if c.clients < 2 || c.clients > 50_000 || c.changes < 1 || c.changes > 10_000 || c.interval < 0 {
		errs = append(errs, errors.New("-clients: want 2 to 50000; -changes 1 to 10000; -interval not negative"))
	}
	if c.clientKind != clientRaw && c.clientKind != clientSDK {
		errs = append(errs, fmt.Errorf("-client %q: want raw or sdk", c.clientKind))
	}
	if c.timeout <= 0 {
		errs = append(errs, errors.New("-timeout: want positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

// deliveryBench is the state every scenario runs against.
type deliveryBench struct {
	cfg    *deliveryConfig
	st     *stack
	ctx    context.Context // ends when a component fails
	d      *delivery.Delivery
	tp     *topics.Topics // nil without the switch scenario
	signer *gateway.Signer
	tokens *gateway.Verifier
	log    zerolog.Logger
	setup  time.Duration
	dir    string
	issues []string // failed correctness checks
}

func (b *deliveryBench) fail(format string, a ...any) {
	b.issues = append(b.issues, fmt.Sprintf(format, a...))
}

func runDelivery(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	cfg, err := parseDeliveryFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := progressLogger(stderr).With().Str("bench", "delivery").Logger()
	w := &deliveryReport{out: stdout, cfg: cfg}
	if cfg.scenarios[scenarioSwitch] {
		soft, _, err := raiseFileLimit()
		if err != nil {
			log.Warn().Err(err).Msg("open-file limit not raised")
		}
		if soft > 0 && uint64(2*cfg.clients+fdMargin) > soft {
			return fmt.Errorf("-clients %d: %d client links, as many server links and %d other files exceed the open-file limit %d: lower -clients", cfg.clients, cfg.clients, fdMargin, soft)
		}
		w.files = soft
	}
	w.load = loadAverage()
	b, err := openDeliveryBench(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := b.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	w.header(b)
	if err := runScenarios(cfg.scenarios, cfg.cpuProfile, []benchScenario{
		{scenarioRules, func() error {
			log.Info().Int("devices", cfg.devices).Msg("rules")
			r, err := b.rules()
			if err == nil {
				w.rules(r)
			}
			return err
		}},
		{scenarioHTTP, func() error {
			log.Info().Int("concurrency", cfg.conc).Msg("http")
			r, err := b.http()
			if err == nil {
				w.http(r)
			}
			return err
		}},
		{scenarioSwitch, func() error {
			log.Info().Int("clients", cfg.clients).Str("client", cfg.clientKind).Msg("switch")
			r, err := b.switches()
			if err == nil {
				w.switches(r)
			}
			return err
		}},
	}); err != nil {
		return err
	}
	w.summary(b.issues)
	if len(b.issues) > 0 {
		return fmt.Errorf("%d correctness checks failed; first: %s", len(b.issues), b.issues[0])
	}
	return nil
}

// benchScenario is one scenario of a benchmark command.
type benchScenario struct {
	name string
	run  func() error
}

// runScenarios runs the selected scenarios in order, each under its own
// CPU profile when cpuProfile names a prefix; the first error ends it.
func runScenarios(selected map[string]bool, cpuProfile string, scs []benchScenario) error {
	for _, sc := range scs {
		if !selected[sc.name] {
			continue
		}
		stop, err := startProfile(cpuProfile, sc.name)
		if err != nil {
			return err
		}
		err = sc.run()
		if perr := stop(); err == nil {
			err = perr
		}
		if err != nil {
			return fmt.Errorf("%s: %w", sc.name, err)
		}
	}
	return nil
}

// startProfile starts a CPU profile to <prefix>.<name>.pprof; without a
// prefix it does nothing. The returned function stops it.
func startProfile(prefix, name string) (stop func() error, err error) {
	if prefix == "" {
		return func() error { return nil }, nil
	}
	path := prefix + "." + name + ".pprof"
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return fmt.Errorf("cpu profile %s: %w", path, err)
		}
		return nil
	}, nil
}

// loadAverage is the machine's load average (1, 5, 15 minutes), "" if
// unknown.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// openDeliveryBench starts the server side (NATS, oplog, inbox, Delivery,
// and topics for the switch scenario) and loads the switches and
// packages.
func openDeliveryBench(ctx context.Context, cfg *deliveryConfig, log zerolog.Logger) (_ *deliveryBench, err error) {
	dir, err := os.MkdirTemp("", "sluice-bench-delivery-")
	if err != nil {
		return nil, err
	}
	b := &deliveryBench{cfg: cfg, log: log, dir: dir}
	defer func() {
		if err != nil {
			_ = b.close()
		}
	}()
	compLog := zerolog.Nop()
	if b.st, b.ctx, err = startStack(ctx, stackConfig{dir: dir, transport: transportInproc, syncAlways: cfg.fsync == fsyncAlways, atomicBatch: -1}, compLog); err != nil {
		return nil, err
	}
	octx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	_, signKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	if b.d, err = delivery.Open(octx, delivery.Config{Log: b.st.lg, Signer: delivery.NewSigner(signKey), Logger: &compLog}); err != nil {
		return nil, fmt.Errorf("open delivery: %w", err)
	}
	d := b.d
	b.st.closers = append(b.st.closers, d.Close)
	b.st.g.Go(func() error { return d.Run(b.ctx) })
	if cfg.scenarios[scenarioSwitch] {
		// As sluiced: the gateway serves topics.Everyone.
		if b.tp, err = topics.Open(octx, topics.Config{Log: b.st.lg, Dir: filepath.Join(dir, "topics"), SoleWriter: true, Logger: &compLog}); err != nil {
			return nil, fmt.Errorf("open topics: %w", err)
		}
		tp := b.tp
		b.st.closers = append(b.st.closers, tp.Close)
		b.st.g.Go(func() error { return tp.Run(b.ctx) })
	}
	pub, tokKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	b.signer, b.tokens = gateway.NewSigner(tokKey), gateway.NewVerifier(pub)
	start := time.Now()
	if err := loadDeliveryState(octx, d, cfg.switches, cfg.packages); err != nil {
		return nil, err
	}
	b.setup = time.Since(start)
	log.Info().Dur("took", b.setup).Int("switches", cfg.switches).Int("packages", cfg.packages).Msg("state loaded")
	return b, nil
}

func (b *deliveryBench) close() error {
	var err error
	if b.st != nil {
		err = b.st.Close()
	}
	if rerr := os.RemoveAll(b.dir); rerr != nil && err == nil {
		err = rerr
	}
	return err
}

func pct(p float64) *float64 { return &p }

// benchGrayRule is a typical gray rule: an app version range, two OSes,
// three regions, a network and 10% of the rest (delivery's grayRule).
func benchGrayRule() *deliverypb.Rule {
	return &deliverypb.Rule{AppVersionMin: "10.0", AppVersionMax: "10.9", Os: []string{"ios", "android"},
		OsVersionMin: "12", Regions: []string{"eu-north", "eu-central", "eu-west"}, Networks: []string{"wifi"}, Percent: pct(10)}
}

// benchSwitch is switch i of the state: of one of three types, with two
// variants (android on 10.0 or later; 20% of EU devices on wifi) and a
// default.
func benchSwitch(i int) *deliverypb.Switch {
	sw := &deliverypb.Switch{Key: fmt.Sprintf("sw-%03d", i), Description: "sluice-bench"}
	val := func(k int) *deliverypb.Value {
		switch i % 3 {
		case 0:
			return &deliverypb.Value{Kind: &deliverypb.Value_BoolValue{BoolValue: k%2 == 1}}
		case 1:
			return &deliverypb.Value{Kind: &deliverypb.Value_IntValue{IntValue: int64(100*i + k)}}
		}
		return &deliverypb.Value{Kind: &deliverypb.Value_StringValue{StringValue: fmt.Sprintf("variant-%d-%d", i, k)}}
	}
	sw.Type = []deliverypb.SwitchType{deliverypb.SwitchType_SWITCH_TYPE_BOOL, deliverypb.SwitchType_SWITCH_TYPE_INT, deliverypb.SwitchType_SWITCH_TYPE_STRING}[i%3]
	sw.DefaultValue = val(0)
	sw.Variants = []*deliverypb.Variant{
		{Name: "android-new", Rule: &deliverypb.Rule{Os: []string{"android"}, AppVersionMin: "10.0"}, Value: val(1)},
		{Name: "eu-wifi", Rule: &deliverypb.Rule{Regions: []string{"eu-north", "eu-central", "eu-west"}, Networks: []string{"wifi"}, Percent: pct(20)}, Value: val(2)},
	}
	return sw
}

// packageSize is the size of each benchmark package version.
const packageSize = 64 << 10

// loadDeliveryState sets the switches and, for each package, uploads
// 1.0.0 (released fully) and 1.1.0 (1 KiB changed, so it has a diff; in
// gray with benchGrayRule).
func loadDeliveryState(ctx context.Context, d *delivery.Delivery, switches, packages int) error {
	for i := range switches {
		if _, err := d.SetSwitch(ctx, benchSwitch(i), "sluice-bench", 0); err != nil {
			return fmt.Errorf("switch %d: %w", i, err)
		}
	}
	rng := mrand.New(mrand.NewPCG(1, 2))
	for p := range packages {
		name := fmt.Sprintf("pkg-%d", p)
		v1 := make([]byte, packageSize)
		for i := range v1 {
			v1[i] = byte(rng.Uint32())
		}
		v2 := slices.Clone(v1)
		off := rng.IntN(packageSize - 1024)
		for i := off; i < off+1024; i++ {
			v2[i] = byte(rng.Uint32())
		}
		if _, err := d.Upload(ctx, delivery.Upload{Package: name, Kind: deliverypb.PackageKind_PACKAGE_KIND_RESOURCE, Version: "1.0.0", Data: v1}, "sluice-bench"); err != nil {
			return fmt.Errorf("upload %s 1.0.0: %w", name, err)
		}
		if _, err := d.Gray(ctx, name, "1.0.0", &deliverypb.Rule{}, "sluice-bench"); err != nil {
			return fmt.Errorf("gray %s 1.0.0: %w", name, err)
		}
		if _, err := d.Full(ctx, name, "1.0.0", "sluice-bench"); err != nil {
			return fmt.Errorf("full %s 1.0.0: %w", name, err)
		}
		if _, err := d.Upload(ctx, delivery.Upload{Package: name, Kind: deliverypb.PackageKind_PACKAGE_KIND_RESOURCE, Version: "1.1.0", Data: v2}, "sluice-bench"); err != nil {
			return fmt.Errorf("upload %s 1.1.0: %w", name, err)
		}
		if _, err := d.Gray(ctx, name, "1.1.0", benchGrayRule(), "sluice-bench"); err != nil {
			return fmt.Errorf("gray %s 1.1.0: %w", name, err)
		}
	}
	return nil
}

// benchDevices builds n devices with varied attributes, the same for the
// same seed. About 70% have a user.
func benchDevices(n int, seed uint64) []delivery.Device {
	rng := mrand.New(mrand.NewPCG(seed, 17))
	pick := func(xs []string) string { return xs[rng.IntN(len(xs))] }
	var (
		apps     = []string{"9.8.0", "9.9.2", "10.0.0", "10.1.3", "10.2.1", "10.4.0", "10.8.5", "10.9.0", "11.0.0", "11.1.2"}
		oses     = []string{"android", "android", "Android", "ios", "ios", "harmony"}
		osVers   = map[string][]string{"android": {"10", "11", "12", "13", "14", "15"}, "ios": {"15.8", "16.7", "17.5", "18.1"}, "harmony": {"3.0", "4.2", "5.0"}}
		models   = []string{"Pixel 8", "SM-S918B", "iPhone15,2", "iPhone16,1", "Mate 60", "Redmi Note 13", "OnePlus 12"}
		regions  = []string{"eu-north", "eu-central", "eu-west", "us-east", "us-west", "ap-south", "ap-east", "sa-east"}
		networks = []string{"wifi", "wifi", "4g", "5g"}
		channels = []string{"play", "appstore", "huawei", "xiaomi"}
		cpus     = []string{"arm64", "arm64", "armv7", "x86_64"}
	)
	ds := make([]delivery.Device, n)
	for i := range ds {
		osName := pick(oses)
		d := delivery.Device{ID: fmt.Sprintf("device-%07d", i), Attrs: oplog.Attrs{
			AppVersion: pick(apps), OS: osName, OSVersion: pick(osVers[strings.ToLower(osName)]), Model: pick(models),
			Region: pick(regions), Network: pick(networks), Channel: pick(channels), CPU: pick(cpus)}}
		if rng.IntN(10) < 7 {
			d.User = fmt.Sprintf("user-%07d", i)
		}
		ds[i] = d
	}
	return ds
}

// ----- rules -----

// coreRun is calls of one function on one core.
type coreRun struct {
	calls int
	took  time.Duration
}

func (r coreRun) perSec() float64 { return float64(r.calls) / r.took.Seconds() }
func (r coreRun) nsPer() float64  { return float64(r.took.Nanoseconds()) / float64(r.calls) }

func (r *coreRun) add(o coreRun) { r.calls += o.calls; r.took += o.took }

// onCore calls f(i) for i cycling over [0, n) on the calling goroutine,
// locked to its thread, in slices of 1024 calls, until d has passed.
func onCore(d time.Duration, n int, f func(i int)) coreRun {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	start := time.Now()
	deadline := start.Add(d)
	calls, i := 0, 0
	for {
		for range 1024 {
			f(i)
			if i++; i == n {
				i = 0
			}
		}
		calls += 1024
		if time.Now().After(deadline) {
			break
		}
	}
	return coreRun{calls: calls, took: time.Since(start)}
}

// rulesResult is what the rules scenario measured.
type rulesResult struct {
	devices       int
	rule, base    coreRun
	ruleN, baseN  int // devices matched in one pass
	mismatches    int // devices where the rule disagreed with oplog.Match plus Place
	view          coreRun
	viewSwitches  float64 // per view, over the first views
	viewReleases  float64
	cpu           time.Duration // this process's CPU time over the timed part
	wall          time.Duration // the timed part's wall time
	other         time.Duration // other processes' CPU time meanwhile; -1 if unknown
	prevMaxProcs  int
	allocsPerView float64
}

// rules measures the gray rule and its baseline over the population, on
// one core, in alternating slices, then Delivery.View.
func (b *deliveryBench) rules() (r rulesResult, err error) {
	cfg := b.cfg
	devs := benchDevices(cfg.devices, 42)
	r.devices = len(devs)
	rule, err := delivery.Compile(benchGrayRule(), "release-bench")
	if err != nil {
		return r, err
	}
	g := benchGrayRule()
	cond := &oplogpb.Conditions{AppVersionMin: g.AppVersionMin, AppVersionMax: g.AppVersionMax, Os: g.Os,
		OsVersionMin: g.OsVersionMin, Regions: g.Regions, Networks: g.Networks}
	now := time.Now().UnixMilli()
	threshold := uint32(*g.Percent / 100 * delivery.PercentScale)
	// Correctness: the rule is the conditions plus the sticky percentage.
	for i := range devs {
		in := rule.Match(&devs[i], now)
		base := oplog.Match(cond, devs[i].Attrs)
		if in {
			r.ruleN++
		}
		if base {
			r.baseN++
		}
		if in != (base && delivery.Place("release-bench", devs[i].ID) < threshold) {
			r.mismatches++
		}
	}
	if r.mismatches > 0 {
		b.fail("rules: the gray rule disagreed with oplog.Match and Place on %d of %d devices", r.mismatches, len(devs))
	}
	nv := min(len(devs), 1000)
	for i := range nv {
		v := b.d.View(&devs[i])
		r.viewSwitches += float64(len(v.Switches))
		r.viewReleases += float64(len(v.Releases))
	}
	r.viewSwitches /= float64(nv)
	r.viewReleases /= float64(nv)

	runtime.GC()
	r.prevMaxProcs = runtime.GOMAXPROCS(1)
	defer runtime.GOMAXPROCS(r.prevMaxProcs)
	m := startMeter()
	hits := 0
	const slices = 4
	for range slices {
		r.rule.add(onCore(cfg.rulesTime/slices, len(devs), func(i int) {
			if rule.Match(&devs[i], now) {
				hits++
			}
		}))
		r.base.add(onCore(cfg.rulesTime/slices, len(devs), func(i int) {
			if oplog.Match(cond, devs[i].Attrs) {
				hits++
			}
		}))
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	mallocs := ms.Mallocs
	r.view = onCore(cfg.rulesTime, len(devs), func(i int) {
		if len(b.d.View(&devs[i]).Digest) == 0 {
			hits++
		}
	})
	runtime.ReadMemStats(&ms)
	r.allocsPerView = float64(ms.Mallocs-mallocs) / float64(r.view.calls)
	t := m.throughput(r.rule.calls + r.base.calls + r.view.calls)
	r.cpu, r.wall, r.other = t.cpu, t.took, t.other
	_ = hits
	return r, nil
}

// ----- http -----

// gatewayTokenCache is how many verified tokens a gateway.Verifier
// keeps (its verifiedMax): a token seen again skips the signature check.
const gatewayTokenCache = 1 << 16

// trivialBody is what the trivial route answers.
var trivialBody = []byte("ok\n")

// httpDevice is one simulated device of the http scenario.
type httpDevice struct {
	query  string // the update check's attributes
	token  string
	digest string // the digest of the last view it got
}

// httpPhase is one timed phase of the http scenario.
type httpPhase struct {
	name      string
	route     string
	n         int // requests answered
	s200      int
	s304      int
	inm       int // requests sent with If-None-Match
	bodyBytes int64
	bad       int    // answers that were neither right nor expected
	why       string // the first bad answer
	lat       latency
	t         throughput
}

// httpResult is what the http scenario measured.
type httpResult struct {
	phases    []httpPhase // trivial, updates, trivial
	warm      int         // warm-up requests (one per device)
	viewBytes int         // body of a view, mean over the warm-up
	switches  int         // per view in the warm-up
	releases  int
}

func (r httpResult) trivialMean() float64 {
	return (r.phases[0].t.rate() + r.phases[2].t.rate()) / 2
}

// http serves /v1/updates and /trivial from one server and loads them in
// turn.
func (b *deliveryBench) http() (r httpResult, err error) {
	cfg := b.cfg
	ctx := b.ctx
	mux := http.NewServeMux()
	mux.Handle("/v1/updates", b.d.UpdatesHandler(gateway.DeviceAuth(b.tokens)))
	mux.Handle("/trivial", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(trivialBody)
	}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return r, err
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = hs.Shutdown(sctx)
		cancel()
		if serr := <-served; !errors.Is(serr, http.ErrServerClosed) && err == nil {
			err = serr
		}
	}()

	// The devices: tokens issued and queries encoded up front.
	devs := make([]httpDevice, cfg.httpDevices)
	for i, d := range benchDevices(cfg.httpDevices, 7) {
		tok, err := b.signer.Issue(gateway.Claims{User: d.User, Device: d.ID, App: benchApp, Expires: time.Now().Add(2 * time.Hour)})
		if err != nil {
			return r, err
		}
		a := d.Attrs
		q := url.Values{"app_version": {a.AppVersion}, "os": {a.OS}, "os_version": {a.OSVersion}, "model": {a.Model},
			"region": {a.Region}, "network": {a.Network}, "channel": {a.Channel}, "cpu": {a.CPU}}
		devs[i] = httpDevice{query: q.Encode(), token: tok}
	}
	conns := make([]*httpConn, cfg.conc)
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.c.Close()
			}
		}
	}()
	addr := ln.Addr().String()
	for i := range conns {
		c, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return r, err
		}
		conns[i] = &httpConn{c: c, br: bufio.NewReaderSize(c, 32<<10), host: addr}
	}

	// Warm-up: every device checks once, without a digest; each view is
	// decoded and checked.
	if err := b.httpWarm(ctx, conns, devs, &r); err != nil {
		return r, err
	}
	for _, p := range []struct{ name, route string }{
		{"trivial (before)", "/trivial"}, {"/v1/updates", "/v1/updates"}, {"trivial (after)", "/trivial"},
	} {
		b.log.Info().Str("phase", p.name).Dur("for", cfg.httpTime).Msg("http phase")
		ph, err := httpLoad(ctx, conns, devs, p.route, cfg.httpTime)
		if err != nil {
			return r, fmt.Errorf("%s: %w", p.name, err)
		}
		ph.name = p.name
		if ph.bad > 0 {
			b.fail("http %s: %d bad answers; first: %s", p.name, ph.bad, ph.why)
		}
		r.phases = append(r.phases, ph)
		b.log.Info().Str("phase", p.name).Float64("req_per_s", ph.t.rate()).Msg("http phase done")
	}
	return r, nil
}

// httpWarm has every device check for updates once and checks each view.
func (b *deliveryBench) httpWarm(ctx context.Context, conns []*httpConn, devs []httpDevice, r *httpResult) error {
	var next atomic.Int64
	var mu sync.Mutex
	var bytes, switches, releases int
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for w, c := range conns {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(devs) || ctx.Err() != nil {
					return
				}
				d := &devs[i]
				c.request("/v1/updates", d, false)
				a, err := c.roundTrip(true)
				if err != nil {
					errs[w] = err
					next.Store(int64(len(devs)))
					return
				}
				v := &deliverypb.View{}
				if a.status != http.StatusOK {
					errs[w] = fmt.Errorf("warm-up: device %d: status %d: %s", i, a.status, a.body)
				} else if err := proto.Unmarshal(a.body, v); err != nil {
					errs[w] = fmt.Errorf("warm-up: device %d: view: %w", i, err)
				} else if a.etag != `"`+v.Digest+`"` {
					errs[w] = fmt.Errorf("warm-up: device %d: ETag %s for digest %s", i, a.etag, v.Digest)
				} else if len(v.Switches) != b.cfg.switches || len(v.Releases) != b.cfg.packages {
					errs[w] = fmt.Errorf("warm-up: device %d: view of %d switches and %d releases, want %d and %d", i, len(v.Switches), len(v.Releases), b.cfg.switches, b.cfg.packages)
				}
				if errs[w] != nil {
					next.Store(int64(len(devs)))
					return
				}
				d.digest = v.Digest
				mu.Lock()
				bytes += len(a.body)
				switches += len(v.Switches)
				releases += len(v.Releases)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	r.warm = len(devs)
	r.viewBytes, r.switches, r.releases = bytes/len(devs), switches/len(devs), releases/len(devs)
	return nil
}

// httpLoad runs one closed-loop phase: connection w sends the requests of
// devices w, w+len(conns), ... in turn, each after the previous answer,
// every other one with If-None-Match (the digest the device got last),
// until d has passed.
func httpLoad(ctx context.Context, conns []*httpConn, devs []httpDevice, route string, d time.Duration) (httpPhase, error) {
	ph := httpPhase{route: route}
	type part struct {
		n, s200, s304, inm, bad int
		bytes                   int64
		why                     string
		lat                     []time.Duration
		err                     error
	}
	parts := make([]part, len(conns))
	var stop atomic.Bool
	begin := make(chan struct{})
	var wg sync.WaitGroup
	for w, c := range conns {
		wg.Go(func() {
			p := &parts[w]
			p.lat = make([]time.Duration, 0, 1<<14)
			<-begin
			k := 0
			for i := w; !stop.Load(); i += len(conns) {
				if i >= len(devs) {
					i = w
				}
				dev := &devs[i]
				inm := k%2 == 1
				k++
				c.request(route, dev, inm)
				t0 := time.Now()
				a, err := c.roundTrip(false)
				if err != nil {
					p.err = err
					stop.Store(true)
					return
				}
				p.lat = append(p.lat, time.Since(t0))
				p.n++
				if inm {
					p.inm++
				}
				p.bytes += int64(a.bodyLen)
				bad := ""
				switch {
				case route == "/trivial" && (a.status != http.StatusOK || a.bodyLen != len(trivialBody)):
					bad = fmt.Sprintf("trivial: status %d, %d bytes", a.status, a.bodyLen)
				case route == "/trivial":
				case a.status == http.StatusNotModified && inm:
				case a.status == http.StatusOK && !inm && a.etag == `"`+dev.digest+`"` && a.bodyLen > 0:
				default:
					bad = fmt.Sprintf("updates: status %d (If-None-Match sent: %v), ETag %s (device holds %q), %d bytes", a.status, inm, a.etag, dev.digest, a.bodyLen)
				}
				switch a.status {
				case http.StatusOK:
					p.s200++
				case http.StatusNotModified:
					p.s304++
				}
				if bad != "" {
					if p.bad == 0 {
						p.why = bad
					}
					p.bad++
				}
			}
		})
	}
	runtime.GC()
	m := startMeter()
	close(begin)
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
	stop.Store(true)
	wg.Wait()
	var lats []time.Duration
	var errs []error
	for _, p := range parts {
		ph.n += p.n
		ph.s200 += p.s200
		ph.s304 += p.s304
		ph.inm += p.inm
		ph.bodyBytes += p.bytes
		if p.bad > 0 && ph.bad == 0 {
			ph.why = p.why
		}
		ph.bad += p.bad
		lats = append(lats, p.lat...)
		errs = append(errs, p.err)
	}
	ph.t = m.throughput(ph.n)
	ph.lat = summarise(lats, ph.t.took)
	if err := firstError(errs); err != nil {
		return ph, err
	}
	return ph, ctx.Err()
}

// httpConn is a lean HTTP/1.1 keep-alive client: requests built by hand,
// answers parsed without net/http, so that the load generator, which
// shares the machine with the server, costs little and the same for
// either route.
type httpConn struct {
	c    net.Conn
	br   *bufio.Reader
	host string
	req  []byte
}

// request builds the check of device d on route; with inm it carries
// the device's digest as If-None-Match. Only the path differs between
// routes.
func (h *httpConn) request(route string, d *httpDevice, inm bool) {
	b := append(h.req[:0], "GET "...)
	b = append(b, route...)
	b = append(b, '?')
	b = append(b, d.query...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, h.host...)
	b = append(b, "\r\nUser-Agent: sluice-bench\r\nAccept: application/x-protobuf\r\nAuthorization: Bearer "...)
	b = append(b, d.token...)
	if inm {
		b = append(b, "\r\nIf-None-Match: \""...)
		b = append(b, d.digest...)
		b = append(b, '"')
	}
	h.req = append(b, "\r\n\r\n"...)
}

// httpAnswer is what roundTrip read.
type httpAnswer struct {
	status  int
	etag    string
	bodyLen int
	body    []byte // with keepBody
}

var errBadHTTP = errors.New("malformed HTTP answer")

// roundTrip sends the built request and reads the answer: status line,
// headers (Content-Length, Transfer-Encoding, ETag, Connection) and body,
// kept only with keepBody.
func (h *httpConn) roundTrip(keepBody bool) (a httpAnswer, err error) {
	_ = h.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := h.c.Write(h.req); err != nil {
		return a, err
	}
	line, err := h.br.ReadSlice('\n')
	if err != nil {
		return a, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return a, fmt.Errorf("%w: status line %q", errBadHTTP, line)
	}
	if a.status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return a, fmt.Errorf("%w: status line %q", errBadHTTP, line)
	}
	length, chunked := -1, false
	for {
		line, err = h.br.ReadSlice('\n')
		if err != nil {
			return a, err
		}
		if len(line) <= 2 {
			break
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return a, fmt.Errorf("%w: header %q", errBadHTTP, line)
		}
		v = bytes.TrimSpace(v)
		switch {
		case bytes.EqualFold(k, []byte("Content-Length")):
			if length, err = strconv.Atoi(string(v)); err != nil {
				return a, fmt.Errorf("%w: header %q", errBadHTTP, line)
			}
		case bytes.EqualFold(k, []byte("Transfer-Encoding")):
			chunked = bytes.EqualFold(v, []byte("chunked"))
		case bytes.EqualFold(k, []byte("ETag")):
			a.etag = string(v)
		case bytes.EqualFold(k, []byte("Connection")) && bytes.EqualFold(v, []byte("close")):
			return a, errors.New("the server closes the connection")
		}
	}
	if a.status == http.StatusNotModified || a.status == http.StatusNoContent {
		return a, nil
	}
	read := func(n int) error {
		a.bodyLen += n
		if keepBody {
			at := len(a.body)
			a.body = append(a.body, make([]byte, n)...)
			_, err := io.ReadFull(h.br, a.body[at:])
			return err
		}
		_, err := h.br.Discard(n)
		return err
	}
	if !chunked {
		if length < 0 {
			return a, fmt.Errorf("%w: no Content-Length and not chunked", errBadHTTP)
		}
		return a, read(length)
	}
	for {
		line, err = h.br.ReadSlice('\n')
		if err != nil {
			return a, err
		}
		size, _, _ := bytes.Cut(bytes.TrimSpace(line), []byte(";"))
		n, err := strconv.ParseUint(string(size), 16, 31)
		if err != nil {
			return a, fmt.Errorf("%w: chunk size %q", errBadHTTP, line)
		}
		if n == 0 {
			for { // trailers, then the empty line
				line, err = h.br.ReadSlice('\n')
				if err != nil {
					return a, err
				}
				if len(line) <= 2 {
					return a, nil
				}
			}
		}
		if err := read(int(n)); err != nil {
			return a, err
		}
		if _, err := h.br.Discard(2); err != nil { // CRLF
			return a, err
		}
	}
}

// ----- switch -----

// liveRound is one switch change or one baseline message.
type liveRound struct {
	want  int // clients that must have it for the round to be done
	t0    time.Time
	acked time.Duration // SetSwitch or Publish returned
	mu    sync.Mutex
	at    []time.Time // by client: when it had it; zero: not (yet)
	got   int
	dups  int
	done  chan struct{}
}

func newLiveRound(clients, want int) *liveRound {
	return &liveRound{want: want, at: make([]time.Time, clients), done: make(chan struct{})}
}

// record notes that client i has the round's value at time at.
func (r *liveRound) record(i int, at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.at[i].IsZero() {
		r.dups++
		return
	}
	r.at[i] = at
	if r.got++; r.got == r.want {
		close(r.done)
	}
}

// liveRun is the switch scenario's rounds, which the clients record into.
type liveRun struct {
	switches []*liveRound // by the value set: 1 is the warm-up, 2.. the timed changes
	messages []*liveRound // by the message's tag: 0 is the warm-up
	stray    atomic.Int64 // items that are no baseline message
}

// liveClient is one online device of the switch scenario.
type liveClient struct {
	idx     int
	match   bool // its OS matches the switch's variant
	run     *liveRun
	conn    *benchConn     // raw
	sdk     *client.Client // sdk
	views   atomic.Int64
	version atomic.Uint64 // of the live switch in the last view
	value   atomic.Int64
	wrong   atomic.Int64
	why     atomic.Pointer[string]
}

func (lc *liveClient) bad(format string, a ...any) {
	if lc.wrong.Add(1) == 1 {
		s := fmt.Sprintf(format, a...)
		lc.why.Store(&s)
	}
}

// onView checks the live switch's value in a view the client got at at,
// and records the change it brings.
func (lc *liveClient) onView(sv *deliverypb.SwitchValue, at time.Time) {
	lc.views.Add(1)
	if sv == nil {
		lc.bad("client %d: a view without switch %s", lc.idx, liveSwitch)
		return
	}
	val := sv.GetValue().GetIntValue()
	lc.version.Store(sv.Version)
	lc.value.Store(val)
	switch {
	case !lc.match && (val != 0 || sv.Variant != ""):
		lc.bad("client %d (not matching): value %d variant %q, want the default 0", lc.idx, val, sv.Variant)
	case !lc.match:
	case sv.Variant != "android":
		lc.bad("client %d (matching): variant %q, want android", lc.idx, sv.Variant)
	case val >= 1 && int(val) < len(lc.run.switches):
		lc.run.switches[val].record(lc.idx, at)
	case val != 0:
		lc.bad("client %d (matching): value %d never set", lc.idx, val)
	}
}

// onItem records a baseline message.
func (lc *liveClient) onItem(it *gatewaypb.Item, at time.Time) {
	p, ok := bytes.CutPrefix(it.GetPayload(), []byte("sluice-bench/"))
	if it.GetTopic() != topics.Everyone || !ok || len(p) != 8 {
		lc.run.stray.Add(1)
		return
	}
	tag := binary.BigEndian.Uint64(p)
	if tag >= uint64(len(lc.run.messages)) {
		lc.run.stray.Add(1)
		return
	}
	lc.run.messages[tag].record(lc.idx, at)
}

// hello is the raw client's Hello: views asked for, its OS by its index.
func (lc *liveClient) attrs() *gatewaypb.Attrs {
	os, osv := "ios", "17.5"
	if lc.match {
		os, osv = "android", "14"
	}
	return &gatewaypb.Attrs{AppVersion: "10.2.1", Os: os, OsVersion: osv, Model: "bench", Region: "eu-west", Network: "wifi", Sdk: "sluice-bench"}
}

// serveRaw reads frames until the link ends, and returns why.
func (lc *liveClient) serveRaw(ctx context.Context) error {
	for {
		f, err := lc.conn.read(ctx, 0)
		if err != nil {
			return err
		}
		if err := lc.frame(ctx, f, time.Now()); err != nil {
			return err
		}
	}
}

// frame handles one frame of a raw client.
func (lc *liveClient) frame(ctx context.Context, f *gatewaypb.Frame, at time.Time) error {
	switch body := f.Body.(type) {
	case *gatewaypb.Frame_View:
		var sv *deliverypb.SwitchValue
		for _, s := range body.View.GetSwitches() {
			if s.GetKey() == liveSwitch {
				sv = s
			}
		}
		lc.onView(sv, at)
	case *gatewaypb.Frame_Live:
		for _, it := range body.Live.Items {
			lc.onItem(it, at)
		}
	case *gatewaypb.Frame_Sync:
		for _, it := range body.Sync.Items {
			lc.onItem(it, at)
		}
	case *gatewaypb.Frame_Probe:
		return lc.conn.echo(ctx, body.Probe)
	default:
		return endError(f)
	}
	return nil
}

// switchResult is what the switch scenario measured.
type switchResult struct {
	clients, matching int
	connect           time.Duration
	changes           liveSide
	messages          liveSide
	finalVersion      uint64
	views             int64 // views the clients got
	stray             int64
	slow              int64      // links the gateway cut as slow consumers
	reconnects        int64      // sdk clients' reconnects
	timed             throughput // the timed rounds, both sides
}

// liveSide is the timed rounds of one side, over the matching clients.
type liveSide struct {
	rounds int
	lat    latency // over every (matching client, round) pair
	acked  latency // SetSwitch or Publish, per round
	last   latency // per round, until its last matching client
	lost   int     // (client, round) pairs never had (over the clients the round is for)
	dups   int
	late   int           // rounds over the interval
	cpu    time.Duration // this process's, from each send until the next
}

// switches runs the switch scenario.
func (b *deliveryBench) switches() (r switchResult, err error) {
	cfg, ctx, d := b.cfg, b.ctx, b.d
	r.clients = cfg.clients
	for i := range cfg.clients {
		if i%2 == 0 {
			r.matching++
		}
	}
	run := &liveRun{}
	for range cfg.changes + 2 { // 0 unused, 1 the warm-up
		run.switches = append(run.switches, newLiveRound(cfg.clients, r.matching))
	}
	for range cfg.changes + 1 {
		run.messages = append(run.messages, newLiveRound(cfg.clients, cfg.clients))
	}
	setSwitch := func(ctx context.Context, v int64) (*deliverypb.Switch, error) {
		iv := func(v int64) *deliverypb.Value {
			return &deliverypb.Value{Kind: &deliverypb.Value_IntValue{IntValue: v}}
		}
		return d.SetSwitch(ctx, &deliverypb.Switch{Key: liveSwitch, Type: deliverypb.SwitchType_SWITCH_TYPE_INT, Description: "sluice-bench: the switch changed",
			DefaultValue: iv(0), Variants: []*deliverypb.Variant{{Name: "android", Rule: &deliverypb.Rule{Os: []string{"android"}}, Value: iv(v)}}}, "sluice-bench", 0)
	}
	if _, err := setSwitch(ctx, 0); err != nil {
		return r, err
	}
	srv, err := gateway.NewServer(gateway.Config{Inbox: b.st.inbox, Topics: b.tp, Views: d, Tokens: b.tokens, Heartbeat: 5 * time.Minute})
	if err != nil {
		return r, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = srv.Shutdown(sctx)
		cancel()
		return r, err
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTCP(ln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = srv.Shutdown(sctx)
		cancel()
		if serr := <-served; serr != nil && err == nil {
			err = serr
		}
	}()

	clients := make([]*liveClient, cfg.clients)
	for i := range clients {
		clients[i] = &liveClient{idx: i, match: i%2 == 0, run: run}
	}
	start := time.Now()
	stop, err := b.connectLive(ctx, ln.Addr().String(), clients)
	if err != nil {
		return r, fmt.Errorf("connect: %w", err)
	}
	ended := false
	defer func() {
		if !ended {
			_ = stop()
		}
	}()
	r.connect = time.Since(start)
	b.log.Info().Int("clients", cfg.clients).Dur("took", r.connect).Msg("clients online")
	for _, lc := range clients {
		if lc.views.Load() < 1 {
			return r, fmt.Errorf("client %d: no view on connect", lc.idx)
		}
	}

	change := func(k int) error {
		rd := run.switches[k]
		rd.t0 = time.Now()
		sw, err := setSwitch(ctx, int64(k))
		if err != nil {
			return err
		}
		rd.acked = time.Since(rd.t0)
		r.finalVersion = sw.Version
		return nil
	}
	publish := func(k int) error {
		rd := run.messages[k]
		payload := binary.BigEndian.AppendUint64([]byte("sluice-bench/"), uint64(k))
		rd.t0 = time.Now()
		a, err := b.tp.Publish(ctx, &oplogpb.Event{Topic: topics.Everyone, Payload: payload})
		if err != nil {
			return err
		}
		if a.Id == 0 || a.Duplicate {
			return fmt.Errorf("publish answered %v", a)
		}
		rd.acked = time.Since(rd.t0)
		return nil
	}
	wait := func(rd *liveRound) {
		select {
		case <-rd.done:
		case <-time.After(roundWait):
		case <-ctx.Done():
		}
	}
	// Warm-up, then the timed rounds, a change and a message in turn.
	if err := change(1); err != nil {
		return r, fmt.Errorf("warm-up change: %w", err)
	}
	wait(run.switches[1])
	if err := publish(0); err != nil {
		return r, fmt.Errorf("warm-up message: %w", err)
	}
	wait(run.messages[0])
	// CPU time goes to a round from its send until the next send (the
	// last one: until an interval after it), the clients' reading
	// included.
	var swCPU, msgCPU time.Duration
	var charged *time.Duration
	var c0 time.Duration
	charge := func(to *time.Duration) {
		c := cpuTime()
		if charged != nil {
			*charged += c - c0
		}
		charged, c0 = to, c
	}
	whole := startMeter()
	next := time.Now()
	for k := 1; k <= cfg.changes; k++ {
		for _, side := range []struct {
			rd   *liveRound
			send func(int) error
			cpu  *time.Duration
			idx  int
		}{{run.switches[k+1], change, &swCPU, k + 1}, {run.messages[k], publish, &msgCPU, k}} {
			pause(ctx, time.Until(next))
			next = time.Now().Add(cfg.interval)
			charge(side.cpu)
			if err := side.send(side.idx); err != nil {
				return r, fmt.Errorf("round %d: %w", k, err)
			}
			wait(side.rd)
			if err := ctx.Err(); err != nil {
				return r, err
			}
		}
		if k%5 == 0 || k == cfg.changes {
			b.log.Info().Int("round", k).Msg("switch changes and messages delivered")
		}
	}
	pause(ctx, time.Until(next))
	charge(nil)
	r.timed = whole.throughput(2 * cfg.changes)
	// The non-matching clients are not waited for: give them until every
	// client holds the last version.
	deadline := time.Now().Add(roundWait)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		all := true
		for _, lc := range clients {
			if lc.version.Load() != r.finalVersion {
				all = false
				break
			}
		}
		if all {
			break
		}
		pause(ctx, 10*time.Millisecond)
	}
	ended = true
	linkErr := stop()
	r.slow = srv.Stats().SlowConsumers
	for _, lc := range clients {
		if lc.sdk != nil {
			r.reconnects += lc.sdk.Stats().Reconnects
		}
	}
	if linkErr != nil {
		b.fail("switch: %v", linkErr)
	}

	r.changes = liveStats(run.switches[2:], clients, true, cfg.interval)
	r.messages = liveStats(run.messages[1:], clients, false, cfg.interval)
	r.changes.cpu, r.messages.cpu = swCPU, msgCPU
	r.stray = run.stray.Load()
	// Correctness: every client got every change it should have and
	// holds the right value of the last version; the baseline reached
	// every client once.
	wrong, stale := 0, 0
	var why string
	for _, lc := range clients {
		r.views += lc.views.Load()
		if n := lc.wrong.Load(); n > 0 {
			if wrong == 0 {
				why = *lc.why.Load()
			}
			wrong += int(n)
		}
		want := int64(0)
		if lc.match {
			want = int64(cfg.changes + 1)
		}
		if lc.version.Load() != r.finalVersion || lc.value.Load() != want {
			stale++
		}
	}
	if wrong > 0 {
		b.fail("switch: %d wrong switch values; first: %s", wrong, why)
	}
	if stale > 0 {
		b.fail("switch: %d clients do not hold the last version (%d) with the right value", stale, r.finalVersion)
	}
	if n := r.changes.lost + run.switches[1].want - run.switches[1].got; n > 0 {
		b.fail("switch: %d (matching client, change) pairs never had the change", n)
	}
	if n := r.messages.lost + run.messages[0].want - run.messages[0].got; n > 0 {
		b.fail("switch: %d (client, baseline message) pairs never had the message", n)
	}
	if r.messages.dups > 0 || r.stray > 0 {
		b.fail("switch: baseline messages: %d duplicates, %d stray items", r.messages.dups, r.stray)
	}
	return r, nil
}

// liveStats summarises timed rounds: latencies over the matching
// clients; losses over the clients each round is for (the matching ones
// for a change, every one for a message).
func liveStats(rounds []*liveRound, clients []*liveClient, matchingOnly bool, interval time.Duration) liveSide {
	s := liveSide{rounds: len(rounds)}
	var lats, acks, lasts []time.Duration
	for _, rd := range rounds {
		rd.mu.Lock()
		acks = append(acks, rd.acked)
		var last time.Duration
		for _, lc := range clients {
			at := rd.at[lc.idx]
			if at.IsZero() {
				if lc.match || !matchingOnly {
					s.lost++
				}
				continue
			}
			if !lc.match {
				continue
			}
			l := at.Sub(rd.t0)
			lats = append(lats, l)
			last = max(last, l)
		}
		s.dups += rd.dups
		rd.mu.Unlock()
		lasts = append(lasts, last)
		if last > interval {
			s.late++
		}
	}
	s.lat = summarise(lats, 0)
	s.acked = summarise(acks, 0)
	s.last = summarise(lasts, 0)
	return s
}

// connectLive connects the clients (raw or SDK, 64 at a time) and waits
// until each has its first view. stop closes them and reports links that
// ended early.
func (b *deliveryBench) connectLive(ctx context.Context, addr string, clients []*liveClient) (stop func() error, err error) {
	rctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var closed atomic.Bool
	var ended atomic.Int64
	var whyMu sync.Mutex
	var why error
	endedEarly := func(lc *liveClient, err error) {
		if closed.Load() {
			return
		}
		ended.Add(1)
		whyMu.Lock()
		if why == nil {
			why = fmt.Errorf("client %d: %w", lc.idx, err)
		}
		whyMu.Unlock()
	}
	stop = func() error {
		closed.Store(true)
		cancel()
		for _, lc := range clients {
			if lc.conn != nil {
				lc.conn.close()
			}
		}
		wg.Wait()
		if n := ended.Load(); n > 0 {
			return fmt.Errorf("%d client links ended early; first: %w", n, why)
		}
		return nil
	}
	defer func() {
		if err != nil {
			_ = stop()
		}
	}()
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		return stop, err
	}
	var keys []ed25519.PublicKey
	if b.cfg.clientKind == clientSDK {
		keys = []ed25519.PublicKey{b.d.PublicKey()}
	}
	const par = 64
	var next atomic.Int64
	errs := make([]error, par)
	var dwg sync.WaitGroup
	for w := range par {
		dwg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(clients) || ctx.Err() != nil {
					return
				}
				lc := clients[i]
				tok, err := b.signer.Issue(gateway.Claims{User: userID5(i), Device: deviceID5(i), App: benchApp, Expires: time.Now().Add(2 * time.Hour)})
				if err == nil {
					if b.cfg.clientKind == clientSDK {
						err = b.startSDK(rctx, &wg, addr, lc, tok, keys, endedEarly)
					} else {
						err = startRaw(ctx, rctx, &wg, codec, addr, lc, tok, endedEarly)
					}
				}
				if err != nil {
					errs[w] = fmt.Errorf("client %d: %w", i, err)
					next.Store(int64(len(clients)))
					return
				}
			}
		})
	}
	dwg.Wait()
	if err := firstError(errs); err != nil {
		return stop, err
	}
	// Every client has a first view (raw clients read it in their
	// handshake).
	deadline := time.Now().Add(time.Minute)
	for _, lc := range clients {
		for lc.views.Load() < 1 {
			if time.Now().After(deadline) {
				return stop, fmt.Errorf("client %d: no view after 1m", lc.idx)
			}
			if err := ctx.Err(); err != nil {
				return stop, err
			}
			pause(ctx, 5*time.Millisecond)
		}
	}
	return stop, nil
}

// startRaw dials a raw client, sends its Hello (views asked for), reads
// the Welcome and the first round (its view among it), then reads in a
// goroutine of wg until the link ends.
func startRaw(ctx, rctx context.Context, wg *sync.WaitGroup, codec *wire.Codec, addr string, lc *liveClient, tok string, ended func(*liveClient, error)) error {
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	c, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(hctx, "tcp", addr)
	if err != nil {
		return err
	}
	b := &benchConn{idx: lc.idx, codec: codec, tcp: c, br: bufio.NewReaderSize(c, 16<<10)}
	lc.conn = b
	hello := &gatewaypb.Frame{Body: &gatewaypb.Frame_Hello{Hello: &gatewaypb.Hello{
		Version: wire.Version, Token: tok, Attrs: lc.attrs(), Views: true}}}
	if err := b.send(hctx, hello); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	f, err := b.read(hctx, handshakeTimeout)
	if err != nil {
		return fmt.Errorf("welcome: %w", err)
	}
	if f.GetWelcome() == nil {
		if err := endError(f); err != nil {
			return err
		}
		return fmt.Errorf("first frame is type %d, not welcome", wire.TypeOf(f))
	}
	for {
		f, err := b.read(hctx, handshakeTimeout)
		if err != nil {
			return fmt.Errorf("first round: %w", err)
		}
		if err := lc.frame(hctx, f, time.Now()); err != nil {
			return err
		}
		if s := f.GetSync(); s != nil && s.Done {
			break
		}
	}
	wg.Go(func() { ended(lc, lc.serveRaw(rctx)) })
	return nil
}

// startSDK starts an SDK client (its own state directory, views asked
// for, the manifest key trusted) that records views and baseline
// messages from its handlers, and runs it in a goroutine of wg.
func (b *deliveryBench) startSDK(rctx context.Context, wg *sync.WaitGroup, addr string, lc *liveClient, tok string, keys []ed25519.PublicKey, ended func(*liveClient, error)) error {
	dir := filepath.Join(b.dir, "clients", strconv.Itoa(lc.idx))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	c, err := client.New(client.Config{URL: "tcp://" + addr, Token: func(context.Context) (string, error) { return tok, nil },
		StateDir: dir, Attrs: lc.attrs(), Views: true, ManifestKeys: keys, DialTimeout: handshakeTimeout})
	if err != nil {
		return err
	}
	lc.sdk = c
	c.HandleView(func(_ context.Context, v *client.View) {
		at := time.Now()
		if v.Rejected > 0 {
			lc.bad("client %d: %d manifests rejected", lc.idx, v.Rejected)
		}
		lc.onView(v.Switches[liveSwitch], at)
	})
	c.HandleTopic(topics.Everyone, func(_ context.Context, it *client.Item) error {
		lc.onItem(it, time.Now())
		return nil
	})
	wg.Go(func() {
		if err := c.Run(rctx); err != nil && rctx.Err() == nil {
			ended(lc, err)
		}
	})
	return nil
}

// ----- report -----

// deliveryReport prints the delivery benchmark's results.
type deliveryReport struct {
	out   io.Writer
	cfg   *deliveryConfig
	load  string
	files uint64 // open-file limit; 0 if not looked up
	rr    *rulesResult
	hr    *httpResult
	sr    *switchResult
	// disturbed names the phases during which other processes kept more
	// than busyThreshold cores busy.
	disturbed []string
}

// busy notes a phase disturbed by other processes (other < 0: unknown).
func (w *deliveryReport) busy(phase string, other float64) {
	if other > busyThreshold {
		w.disturbed = append(w.disturbed, fmt.Sprintf("%s (%.2f cores)", phase, other))
	}
}

func (w *deliveryReport) printf(format string, a ...any) { fmt.Fprintf(w.out, format, a...) }

func (w *deliveryReport) header(b *deliveryBench) {
	c := w.cfg
	w.printf("sluice-bench delivery\n")
	w.printf("machine:   %s\n", machineInfo())
	if w.load != "" {
		w.printf("load:      load average %s at the start (other processes' CPU during each phase is reported below)\n", w.load)
	}
	w.printf("server:    one embedded NATS server (JetStream in a temporary directory, fsync %s), oplog.Log + Inbox as sluiced,\n", c.fsync)
	w.printf("           delivery.Delivery (state loaded in %.2f s)%s; everything in this process, loopback only\n", b.setup.Seconds(),
		map[bool]string{true: ", topics.Topics (for the switch baseline)", false: ""}[b.tp != nil])
	w.printf("state:     %d switches (bool/int/string), 2 variants each: android on app 10.0+; 20%% of 3 EU regions on wifi\n", c.switches)
	w.printf("           %d packages of %d KiB: 1.0.0 released fully, 1.1.0 (a diff from 1.0.0) in gray with the gray rule below\n", c.packages, packageSize>>10)
	w.printf("devices:   varied attributes (10 app versions, android/ios/harmony, 8 regions, wifi/4g/5g, ...), 70%% with a user\n")
	if c.scenarios[scenarioRules] {
		w.printf("rules:     %d devices; GOMAXPROCS 1 and one goroutine locked to its thread, %v per side in 4 alternating slices\n", c.devices, c.rulesTime)
		w.printf("           gray rule: delivery.Rule of app 10.0-10.9, os ios|android, os 12+, 3 regions, wifi, 10%% sticky\n")
		w.printf("           baseline: oplog.Match of the same predicates as oplogpb.Conditions (no percentage: Conditions have none)\n")
		w.printf("           view: Delivery.View, one device after another, %v\n", c.rulesTime)
	}
	if c.scenarios[scenarioHTTP] {
		w.printf("http:      one net/http server (ReadHeaderTimeout as sluiced) on loopback: /v1/updates = Delivery.UpdatesHandler with gateway\n")
		w.printf("           token verification (as sluiced's deviceAuth); /trivial = a handler writing %d bytes, checking nothing\n", len(trivialBody))
		cache := "every timed request hits it (the signature of each token is checked in the warm-up)"
		if c.httpDevices > gatewayTokenCache {
			cache = "it starts over when full, so most timed requests check the signature"
		}
		w.printf("           gateway.Verifier keeps up to %d verified tokens: with %d devices %s\n", gatewayTokenCache, c.httpDevices, cache)
		w.printf("           load: %d keep-alive connections, closed loop, %v per phase: trivial, /v1/updates, trivial; %d devices with\n", c.conc, c.httpTime, c.httpDevices)
		w.printf("           their own token and attributes, every other request with If-None-Match (the device's last digest)\n")
		w.printf("           the load generator runs in this process: a lean HTTP/1.1 client (no net/http), the same request bytes on\n")
		w.printf("           both routes but the path; cpu = this process (server + load generator) per request; GC before each phase\n")
	}
	if c.scenarios[scenarioSwitch] {
		kind := "raw protocol clients (TLV over TCP, each a reader goroutine decoding frames; no verification, no persistence)"
		if c.clientKind == clientSDK {
			kind = "client.Client (SDK) with Views, each its own state directory: manifests verified, view persisted (fsync), HandleView"
		}
		timedAt := "a raw client has it when it has decoded the frame"
		if c.clientKind == clientSDK {
			timedAt = "an SDK client has a change when HandleView runs (after verifying and persisting the view), a message when its HandleTopic handler runs (before the cursor is persisted)"
		}
		w.printf("switch:    gateway.Server (Config.Views, Config.Topics, ServeTCP on loopback); %d clients: %s\n", c.clients, kind)
		w.printf("           open-file limit %d: %d client links in this process and as many server links\n", w.files, c.clients)
		w.printf("           switch %s: int, default 0, variant android (os android) = k; even clients are android (match), odd ios\n", liveSwitch)
		w.printf("           %d changes after a warm-up, each timed from just before SetSwitch until each matching client has value k;\n", c.changes)
		w.printf("           baseline: a topics.Everyone message (topics.Publish) to the same clients, timed likewise; changes and messages\n")
		w.printf("           alternate, one at a time: the next when every client it is for has the previous one, not sooner than %v after it\n", c.interval)
		w.printf("           %s\n", timedAt)
	}
}

func (w *deliveryReport) rules(r rulesResult) {
	w.rr = &r
	w.printf("\nrules (one core)\n")
	w.printf("%-28s %12s %14s %9s %10s\n", "side", "calls", "per s", "ns each", "matched")
	w.printf("%-28s %12d %14.0f %9.1f %10s\n", "gray rule (Rule.Match)", r.rule.calls, r.rule.perSec(), r.rule.nsPer(), fmt.Sprintf("%.2f%%", 100*float64(r.ruleN)/float64(r.devices)))
	w.printf("%-28s %12d %14.0f %9.1f %10s\n", "baseline (oplog.Match)", r.base.calls, r.base.perSec(), r.base.nsPer(), fmt.Sprintf("%.2f%%", 100*float64(r.baseN)/float64(r.devices)))
	w.printf("%-28s %12s %14s\n", "ratio rule/baseline", "", ratio(r.rule.perSec(), r.base.perSec()))
	w.printf("%-28s %12d %14.0f %9.1f %10s\n", "view (Delivery.View)", r.view.calls, r.view.perSec(), r.view.nsPer(), "-")
	w.printf("  view: %.1f switches and %.1f releases each, %.0f allocations; rule evaluations per view up to %d (2 per switch, 2 per release)\n",
		r.viewSwitches, r.viewReleases, r.allocsPerView, 2*w.cfg.switches+4*w.cfg.packages)
	other := "unknown"
	if r.other >= 0 {
		other = fmt.Sprintf("%.2f", r.other.Seconds()/r.wall.Seconds())
		w.busy("rules", r.other.Seconds()/r.wall.Seconds())
	}
	w.printf("  cpu: this process %.2f cores over %.2f s (GOMAXPROCS 1; was %d), other processes %s cores\n", r.cpu.Seconds()/r.wall.Seconds(), r.wall.Seconds(), r.prevMaxProcs, other)
	w.printf("  check: Rule.Match == oplog.Match && Place < 10%% on all %d devices: %d mismatches\n", r.devices, r.mismatches)
}

func (w *deliveryReport) http(r httpResult) {
	w.hr = &r
	w.printf("\nhttp (%d devices checked once first: view %d B, %d switches, %d releases each)\n", r.warm, r.viewBytes, r.switches, r.releases)
	w.printf("%-17s %9s %10s %8s %8s %8s %8s %8s %9s %6s %6s\n", "phase", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "200", "304", "cpu µs/req", "cores", "other")
	for _, p := range r.phases {
		other := "-"
		if p.t.otherCores() >= 0 {
			other = fmt.Sprintf("%.2f", p.t.otherCores())
			w.busy("http "+p.name, p.t.otherCores())
		}
		w.printf("%-17s %9d %10.0f %8s %8s %8s %8d %8d %9.1f %6.2f %6s\n", p.name, p.n, p.t.rate(), msec(p.lat.p50), msec(p.lat.p99), msec(p.lat.max),
			p.s200, p.s304, p.t.cpuPer(), p.t.cores(), other)
	}
	u := r.phases[1]
	w.printf("  /v1/updates: %.1f%% sent If-None-Match; %.1f%% answered 304, %.1f%% 200 (a view of %.0f B on average)\n",
		pctOf(u.inm, u.n), pctOf(u.s304, u.n), pctOf(u.s200, u.n), float64(u.bodyBytes)/float64(max(u.s200, 1)))
	w.printf("  trivial: before %.0f req/s, after %.0f req/s (drift %+.1f%%); baseline = their mean %.0f req/s\n",
		r.phases[0].t.rate(), r.phases[2].t.rate(), 100*(r.phases[2].t.rate()/r.phases[0].t.rate()-1), r.trivialMean())
	w.printf("  ratio /v1/updates / trivial: %s\n", ratio(u.t.rate(), r.trivialMean()))
}

func pctOf(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return 100 * float64(a) / float64(b)
}

func (w *deliveryReport) switches(r switchResult) {
	c := w.cfg
	w.sr = &r
	w.printf("\nswitch (%d clients online in %.2f s, %d matching; %d views sent to clients in all)\n", r.clients, r.connect.Seconds(), r.matching, r.views)
	w.printf("%-30s %6s %7s %8s %8s %8s %6s %5s %10s %10s\n", "side", "rounds", "pairs", "p50 ms", "p99 ms", "max ms", "lost", "dups", "acked p50", "last p50")
	for _, s := range []struct {
		name string
		side liveSide
	}{{"switch change (SetSwitch)", r.changes}, {"Everyone message (baseline)", r.messages}} {
		w.printf("%-30s %6d %7d %8s %8s %8s %6d %5d %10s %10s\n", s.name, s.side.rounds, s.side.lat.n, msec(s.side.lat.p50), msec(s.side.lat.p99), msec(s.side.lat.max),
			s.side.lost, s.side.dups, msec(s.side.acked.p50), msec(s.side.last.p50))
	}
	w.printf("%-30s %6s %7s %8s %8s %8s\n", "ratio change/baseline", "", "", ratio(float64(r.changes.lat.p50), float64(r.messages.lat.p50)),
		ratio(float64(r.changes.lat.p99), float64(r.messages.lat.p99)), ratio(float64(r.changes.lat.max), float64(r.messages.lat.max)))
	for _, s := range []struct {
		name string
		side liveSide
	}{{"change", r.changes}, {"message", r.messages}} {
		w.printf("  %-7s last matching client p50 %s p99 %s max %s ms; %d of %d rounds over %v; cpu %.1f ms per round\n",
			s.name, msec(s.side.last.p50), msec(s.side.last.p99), msec(s.side.last.max), s.side.late, s.side.rounds, c.interval,
			float64(s.side.cpu)/float64(time.Millisecond)/float64(max(s.side.rounds, 1)))
	}
	other := "unknown"
	if r.timed.otherCores() >= 0 {
		other = fmt.Sprintf("%.2f cores", r.timed.otherCores())
		w.busy("switch rounds", r.timed.otherCores())
	}
	w.printf("  cpu: this process (server and clients) from each send until the next; over the %.2f s of timed rounds %.2f cores, other processes %s\n",
		r.timed.took.Seconds(), r.timed.cores(), other)
	w.printf("  figures are over the matching clients (pairs = matching clients x rounds); a message's lost count is over every client\n")
	w.printf("  final switch version %d; stray items %d; slow-consumer cuts %d", r.finalVersion, r.stray, r.slow)
	if c.clientKind == clientSDK {
		w.printf("; SDK reconnects %d", r.reconnects)
	}
	w.printf("\n")
}

func (w *deliveryReport) summary(issues []string) {
	w.printf("\nsummary\n")
	met := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	if r := w.rr; r != nil {
		w.printf("rules: gray rule %.0f evaluations/s on one core (%.1f ns each), %s the oplog.Match baseline; Delivery.View %.0f views/s on one core (no goal set)\n",
			r.rule.perSec(), r.rule.nsPer(), ratio(r.rule.perSec(), r.base.perSec()), r.view.perSec())
	}
	if r := w.hr; r != nil {
		u := r.phases[1].t.rate()
		w.printf("http: /v1/updates %.0f req/s, %s the trivial handler's %.0f req/s: goal at least %.2fx: %s\n",
			u, ratio(u, r.trivialMean()), r.trivialMean(), goalHTTPRatio, met(u >= goalHTTPRatio*r.trivialMean()))
	}
	if r := w.sr; r != nil {
		l, m := r.changes.lat, r.messages.lat
		w.printf("switch: a change reached the matching clients in p50 %s p99 %s max %s ms (baseline message p50 %s p99 %s max %s ms): goal p99 and max under %v: %s\n",
			msec(l.p50), msec(l.p99), msec(l.max), msec(m.p50), msec(m.p99), msec(m.max), goalSwitch, met(l.n > 0 && l.p99 < goalSwitch && l.max < goalSwitch))
	}
	if len(w.disturbed) > 0 {
		w.printf("WARNING: other processes kept more than %.1f cores busy during: %s; figures are noisy\n", busyThreshold, strings.Join(w.disturbed, ", "))
	}
	if len(issues) == 0 {
		w.printf("correctness: OK\n")
		return
	}
	w.printf("correctness: FAILED\n")
	for _, s := range issues {
		w.printf("  %s\n", s)
	}
}
