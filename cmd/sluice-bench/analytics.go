package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// The analytics benchmark: ingestion of tracking events through
// analytics.Ingestor's HTTP handler, next to raw JetStream async publish
// of the same bytes on the same server in the same run; and the
// aggregates' queries (daily active users, retention) over synthetic data
// for a million users, next to raw badger reads of the same store.

// The analytics benchmark's scenarios.
const (
	scenarioIngest = "ingest"
	scenarioQuery  = "query"
)

// goalIngestRatio: ingestion at least half as fast as raw JetStream.
const goalIngestRatio = 0.5

// analyticsApp is the app every synthetic event belongs to.
const analyticsApp = "bench"

// rawAnalyticsPrefix has the length of "sluice.analytics." so that raw
// subjects are as long as the analytics stream's.
const rawAnalyticsPrefix = "raw_js.analytics."

// rawAnalyticsStream is the raw baseline's bare stream.
const rawAnalyticsStream = "RAW_ANALYTICS"

// analyticsConfig is the command line of the analytics benchmark.
type analyticsConfig struct {
	scenarios  map[string]bool
	fsync      string
	conc       int
	batch      int
	ingestTime time.Duration
	n          int
	devices    int
	users      int
	days       int
	queries    int
	loaders    int
	timeout    time.Duration
	cpuProfile string
	sides      map[string]bool // ingest sides: http, link
}

func parseAnalyticsFlags(args []string, stderr io.Writer) (*analyticsConfig, error) {
	c := &analyticsConfig{}
	var scen string
	fs := flag.NewFlagSet("sluice-bench analytics", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench analytics [flags]

Measures analytics on embedded NATS servers (JetStream in temporary
directories), each figure next to a baseline measured in the same run:

  ingest  events/s uploaded by -concurrency clients POSTing gzip-compressed
          protobuf batches of -batch events to analytics.Ingestor's Handler
          (device tokens verified as sluiced does) on a loopback HTTP server,
          for -time or -n events; then the same over gateway links: a TLV
          link per device to a gateway.Server whose Config.Analytics is the
          same Ingestor, -concurrency workers each sending a batch
          (ClientEvent.analytics) after the previous AnalyticsAck; each
          side against the baseline: raw js.PublishAsync of the same
          encoded events (one message each, with the message id Ingest sets)
          into a bare stream on the same server, as many, until every ack is
          in. Goal: at least 0.5x. The stream must then hold exactly the
          events sent.
  query   -users users active over -days days, uploaded through
          Ingestor.Ingest and projected by analytics.Aggregates (apply rate
          timed); then -queries calls each of Counters(app, day) (the daily
          active users) and Retention(app, cohort, 30), with p50/p99, next
          to raw badger reads of the same keys in the same store. Every
          day's DAU and new users and every cohort's retention are checked
          against the generator's counts.

Loopback and in-process only; everything runs in this process. Exits
non-zero when a correctness check fails, not for a missed goal.

flags:`)
		fs.PrintDefaults()
	}
	fs.StringVar(&scen, "scenario", "all", "scenarios to run: all, or a comma-separated list of ingest, query")
	var sides string
	fs.StringVar(&sides, "sides", "http,link", "ingest: the sides to measure, a comma-separated list of http, link")
	fs.StringVar(&c.fsync, "fsync", fsyncAlways, "ingest: JetStream fsync, always (sluiced's default) or interval")
	fs.IntVar(&c.conc, "concurrency", 16, "ingest: concurrent keep-alive HTTP clients")
	fs.IntVar(&c.batch, "batch", 100, "ingest: events per uploaded batch (at most 1000)")
	fs.DurationVar(&c.ingestTime, "time", 10*time.Second, "ingest: how long the HTTP side uploads (it stops sooner when -n events are sent)")
	fs.IntVar(&c.n, "n", 200_000, "ingest: most events the HTTP side sends (encoded before timing)")
	fs.IntVar(&c.devices, "devices", 1000, "ingest: uploading devices, each with its own token")
	fs.IntVar(&c.users, "users", 1_000_000, "query: users in the synthetic data")
	fs.IntVar(&c.days, "days", 30, "query: days of synthetic data, ending yesterday (UTC)")
	fs.IntVar(&c.queries, "queries", 200, "query: timed calls of each query (after untimed ones: each day and cohort once, at least 20)")
	fs.IntVar(&c.loaders, "loaders", 4, "query: concurrent Ingest calls while loading")
	fs.DurationVar(&c.timeout, "timeout", 15*time.Minute, "abort the whole run after this long")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of each scenario (server and clients: one process) to <file>.<scenario>.pprof")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	var err error
	c.scenarios, err = parseSet("-scenario", scen, true, scenarioIngest, scenarioQuery)
	errs = append(errs, err)
	c.sides, err = parseSet("-sides", sides, false, "http", "link")
	errs = append(errs, err)
	if c.fsync != fsyncInterval && c.fsync != fsyncAlways {
		errs = append(errs, fmt.Errorf("-fsync %q: want interval or always", c.fsync))
	}
	if c.conc < 1 || c.conc > 1024 || c.batch < 1 || c.batch > analytics.MaxBatchEvents {
		errs = append(errs, fmt.Errorf("-concurrency: want 1 to 1024; -batch 1 to %d", analytics.MaxBatchEvents))
	}
	if c.ingestTime < 10*time.Millisecond || c.n < c.batch || c.n > 10_000_000 || c.devices < 1 || c.devices > 1_000_000 {
		errs = append(errs, errors.New("-time: want at least 10ms; -n from -batch to 10000000; -devices 1 to 1000000"))
	}
	if c.users < 1 || c.users > 100_000_000 || c.days < 2 || c.days > 60 || c.queries < 1 || c.queries > 1_000_000 || c.loaders < 1 || c.loaders > 64 {
		errs = append(errs, errors.New("-users: want 1 to 100000000; -days 2 to 60; -queries 1 to 1000000; -loaders 1 to 64"))
	}
	if c.timeout <= 0 {
		errs = append(errs, errors.New("-timeout: want positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

// analyticsBench holds what the scenarios share.
type analyticsBench struct {
	cfg    *analyticsConfig
	log    zerolog.Logger
	issues []string // failed correctness checks
}

func (b *analyticsBench) fail(format string, a ...any) {
	b.issues = append(b.issues, fmt.Sprintf(format, a...))
}

func runAnalytics(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseAnalyticsFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	b := &analyticsBench{cfg: cfg, log: progressLogger(stderr).With().Str("bench", "analytics").Logger()}
	w := &analyticsReport{out: stdout, cfg: cfg}
	w.header(loadAverage())
	if err := runScenarios(cfg.scenarios, cfg.cpuProfile, []benchScenario{
		{scenarioIngest, func() error {
			r, err := b.ingest(ctx)
			if err == nil {
				w.ingest(r)
			}
			return err
		}},
		{scenarioQuery, func() error {
			r, err := b.query(ctx)
			if err == nil {
				w.query(r)
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

// ----- synthetic events -----

var (
	benchPages   = []string{"home", "search", "category", "product", "reviews", "cart", "checkout", "payment", "orders", "account", "settings", "help"}
	benchActions = []string{"add_to_cart", "purchase", "share", "search_submit", "coupon_applied", "wishlist_add", "login", "signup"}
	benchModels  = []string{"Pixel 8", "Pixel 7a", "SM-S918B", "SM-A546B", "iPhone15,2", "iPhone14,7", "iPhone16,1", "2311DRK48G", "CPH2581", "V2254A", "LE2123", "XQ-DQ72"}
	benchRegions = []string{"eu-north", "eu-central", "eu-west", "us-east", "us-west", "ap-south", "ap-east", "sa-east"}
	benchNets    = []string{"wifi", "4g", "5g"}
	benchVers    = []string{"5.0.3", "5.1.0", "5.1.2", "5.2.0", "5.2.1", "5.3.0"}
)

// devProfile is a synthetic device: its attributes, the same on every
// event it sends.
type devProfile struct {
	device, user                                   string
	version, os, osVersion, model, region, network string
	releases, switches                             map[string]string
}

// profileOf derives device i's profile from a hash of i.
func profileOf(device, user string, h uint64) devProfile {
	p := devProfile{device: device, user: user, version: benchVers[h%uint64(len(benchVers))],
		model: benchModels[(h>>8)%uint64(len(benchModels))], region: benchRegions[(h>>16)%uint64(len(benchRegions))],
		network: benchNets[(h>>24)%uint64(len(benchNets))]}
	if strings.HasPrefix(p.model, "iPhone") {
		p.os, p.osVersion = "ios", []string{"17.5", "18.1", "18.2"}[(h>>32)%3]
	} else {
		p.os, p.osVersion = "android", []string{"13", "14", "15"}[(h>>32)%3]
	}
	if (h>>40)%2 == 0 {
		p.releases = map[string]string{"shop-h5": []string{"2.0.4", "2.1.0"}[(h>>41)%2]}
	}
	return p
}

// event is a new event of the profile's device.
func (p *devProfile) event(id string, typ analyticspb.Type, ms int64) *analyticspb.Event {
	return &analyticspb.Event{Id: id, Type: typ, TimeMs: ms, Device: p.device, User: p.user, App: analyticsApp,
		AppVersion: p.version, Os: p.os, OsVersion: p.osVersion, Model: p.model, Region: p.region, Network: p.network,
		Releases: p.releases, Switches: p.switches}
}

// benchStack is a crash or freeze stack: 1.4 KB of 18 frames, 0.9 KB of 12.
func benchStack(rng *mrand.Rand, frames int) string {
	var b strings.Builder
	b.WriteString("java.lang.IllegalStateException: cart total mismatch\n")
	classes := []string{"CartViewModel", "CheckoutFragment", "PaymentRepository", "PriceFormatter", "ProductAdapter", "NetworkClient"}
	for i := range frames {
		c := classes[rng.IntN(len(classes))]
		fmt.Fprintf(&b, "\tat com.example.shop.%s.%s.method%d(%s.kt:%d)\n", strings.ToLower(c[:4]), c, i, c, 20+rng.IntN(400))
	}
	return b.String()
}

// ingestDevice generates one device's events for the ingest scenario: a
// session start, page views walking the pages (each with the page before
// as referrer), custom events with properties, performance samples, a
// crash or a freeze now and then (with a stack), and session ends.
type ingestDevice struct {
	p       devProfile
	token   string
	rng     *mrand.Rand
	tag     string            // the side's prefix of event ids
	common  map[string]string // properties of every event
	seq     int
	ms      int64
	page    string
	session string
	open    bool
}

func (d *ingestDevice) next() *analyticspb.Event {
	d.seq++
	d.ms += int64(500 + d.rng.IntN(20_000))
	id := d.tag + strconv.Itoa(d.seq)
	if !d.open {
		d.open, d.page = true, ""
		d.session = fmt.Sprintf("%s-%08x", d.p.device, d.rng.Uint32())
		e := d.p.event(id, analyticspb.Type_TYPE_SESSION_START, d.ms)
		e.Session = d.session
		e.Properties = map[string]string{"launch": []string{"cold", "warm", "push"}[d.rng.IntN(3)]}
		maps.Copy(e.Properties, d.common)
		return e
	}
	var e *analyticspb.Event
	switch r := d.rng.IntN(1000); {
	case r < 600:
		e = d.p.event(id, analyticspb.Type_TYPE_PAGE_VIEW, d.ms)
		next := benchPages[d.rng.IntN(len(benchPages))]
		e.Page, e.Referrer, d.page = next, d.page, next
		e.Properties = map[string]string{"title": "Shop — " + next, "load_ms": strconv.Itoa(80 + d.rng.IntN(900))}
	case r < 800:
		e = d.p.event(id, analyticspb.Type_TYPE_CUSTOM, d.ms)
		e.Name = benchActions[d.rng.IntN(len(benchActions))]
		e.Page = d.page
		e.Properties = map[string]string{"item": fmt.Sprintf("sku-%06d", d.rng.IntN(1_000_000)), "price": fmt.Sprintf("%d.%02d", d.rng.IntN(200), d.rng.IntN(100)),
			"currency": "EUR", "list": "recommended", "position": strconv.Itoa(d.rng.IntN(40))}
	case r < 900:
		e = d.p.event(id, analyticspb.Type_TYPE_PERF, d.ms)
		e.Name = []string{"cold_start_ms", "frame_drop_pct", "api_latency_ms"}[d.rng.IntN(3)]
		e.Value = float64(d.rng.IntN(5000)) / 10
		e.Page = d.page
	case r < 915:
		e = d.p.event(id, analyticspb.Type_TYPE_CRASH, d.ms)
		e.Stack = benchStack(d.rng, 18)
		e.Page = d.page
		d.open = false // the app died: the next event starts a session
	case r < 925:
		e = d.p.event(id, analyticspb.Type_TYPE_FREEZE, d.ms)
		e.Stack = benchStack(d.rng, 12)
		e.DurationMs = int64(5000 + d.rng.IntN(10_000))
		e.Page = d.page
	default:
		e = d.p.event(id, analyticspb.Type_TYPE_SESSION_END, d.ms)
		e.DurationMs = int64(60_000 + d.rng.IntN(600_000))
		d.open = false
	}
	e.Session = d.session
	if e.Properties == nil {
		e.Properties = map[string]string{}
	}
	maps.Copy(e.Properties, d.common) // what SDKs attach to every event
	return e
}

// ingestBatch is one upload: a device's events, encoded as the client
// sends them and as the stream stores them.
type ingestBatch struct {
	device int
	body   []byte   // a gzip-compressed analyticspb.Batch
	plain  int      // the batch's size before compression
	msgs   [][]byte // each event as Ingest stores it (received_ms set)
	subs   []string // and its subject
	ids    []string // and its message id, "<device>:<event id>"
}

// ingestPool is the batches of one side, encoded before timing.
type ingestPool struct {
	batches []ingestBatch
	devices []*ingestDevice
	events  int
	bytes   int64 // encoded events, as stored
	types   map[analyticspb.Type]int
}

// makeIngestPool encodes n events (rounded up to whole batches) of the
// devices, batch i from device i mod devices, on every core.
func (b *analyticsBench) makeIngestPool(tag string, signer *gateway.Signer) (*ingestPool, error) {
	cfg := b.cfg
	nb := (cfg.n + cfg.batch - 1) / cfg.batch
	pool := &ingestPool{batches: make([]ingestBatch, nb), devices: make([]*ingestDevice, cfg.devices), types: map[analyticspb.Type]int{}}
	start := time.Now().Add(-time.Hour).UnixMilli()
	for i := range pool.devices {
		h := splitmix(uint64(i) + 0x5eed)
		dev, user := fmt.Sprintf("dev-%06d", i), ""
		if h%10 < 8 {
			user = fmt.Sprintf("user-%06d", i)
		}
		p := profileOf(dev, user, h)
		p.switches = map[string]string{"new-checkout": []string{"on", "off"}[h%2], "dark-mode": []string{"on", "off"}[(h>>1)%2]}
		tok, err := signer.Issue(gateway.Claims{Device: dev, User: user, App: analyticsApp, Expires: time.Now().Add(3 * time.Hour)})
		if err != nil {
			return nil, err
		}
		common := map[string]string{"sdk": "sluice-android/1.4.2", "screen": "1080x2400", "locale": "de-DE", "tz": "Europe/Berlin", "carrier": "Telekom.de"}
		if p.os == "ios" {
			common["sdk"], common["screen"] = "sluice-ios/1.4.0", "1179x2556"
		}
		pool.devices[i] = &ingestDevice{p: p, token: tok, common: common, rng: mrand.New(mrand.NewPCG(h, 7)), tag: tag, ms: start + int64(h%600_000)}
	}
	workers := runtime.GOMAXPROCS(0)
	errs := make([]error, workers)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			var gz bytes.Buffer
			zw := gzip.NewWriter(&gz)
			types := map[analyticspb.Type]int{}
			var events int
			var size int64
			// Worker w encodes the batches of devices w, w+workers, ...
			// so that each device's events stay in order.
			for dev := w; dev < len(pool.devices); dev += workers {
				d := pool.devices[dev]
				for i := dev; i < nb; i += len(pool.devices) {
					evs := make([]*analyticspb.Event, cfg.batch)
					bt := ingestBatch{device: dev, msgs: make([][]byte, cfg.batch), subs: make([]string, cfg.batch), ids: make([]string, cfg.batch)}
					for k := range evs {
						evs[k] = d.next()
						types[evs[k].Type]++
					}
					plain, err := proto.Marshal(&analyticspb.Batch{Events: evs})
					if err != nil {
						errs[w] = err
						return
					}
					gz.Reset()
					zw.Reset(&gz)
					_, _ = zw.Write(plain)
					if err := zw.Close(); err != nil {
						errs[w] = err
						return
					}
					bt.body, bt.plain = bytes.Clone(gz.Bytes()), len(plain)
					for k, e := range evs {
						e.ReceivedMs = e.TimeMs + 1500 // as Ingest sets it: a time of the same size
						if bt.msgs[k], err = proto.Marshal(e); err != nil {
							errs[w] = err
							return
						}
						size += int64(len(bt.msgs[k]))
						bt.subs[k] = analytics.TypeToken(e.Type)
						bt.ids[k] = e.Device + ":" + e.Id
					}
					events += len(evs)
					pool.batches[i] = bt
				}
			}
			mu.Lock()
			defer mu.Unlock()
			pool.events += events
			pool.bytes += size
			for t, n := range types {
				pool.types[t] += n
			}
		})
	}
	wg.Wait()
	return pool, firstError(errs)
}

// splitmix is a 64-bit mix (SplitMix64's finalizer).
func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// ----- ingest -----

// ingestPhase is one timed side of the ingest scenario.
type ingestPhase struct {
	name    string
	events  int
	batches int           // requests (HTTP), or 0
	sent    []ingestBatch // the batches sent, in pool order
	lat     latency       // per request (HTTP), or none
	t       throughput
}

// ingestSide is one way events reach SLUICE_ANALYTICS, timed over its own
// pool of pre-encoded batches: HTTP posts, and frames over gateway links.
type ingestSide struct {
	name string
	tag  string // prefix of the side's event ids
	run  func(ctx context.Context, pool *ingestPool) (ingestPhase, error)
}

// ingestResult is what the ingest scenario measured.
type ingestResult struct {
	sides       []ingestPhase
	raw         ingestPhase
	meanEvent   float64 // encoded bytes
	meanBody    float64 // compressed batch
	meanPlain   float64 // uncompressed batch
	types       map[analyticspb.Type]int
	generated   int
	encode      time.Duration
	streamMsgs  uint64
	streamBytes uint64
	rawBytes    uint64
	checked     []string // the read-back verdicts, a side each
	project     throughput
}

// projectIngested runs analytics.Aggregates from an empty store over
// what the sides stored, timed until it holds the stream's last
// sequence: the apply rate on a live-like mix (many events per device and
// day), against which the ingest rates tell whether the aggregates keep
// up.
func (b *analyticsBench) projectIngested(ctx context.Context, st *stack, dir string, last uint64) (throughput, error) {
	nop := zerolog.Nop()
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: st.lg, Dir: filepath.Join(dir, "aggregates"), Logger: &nop})
	if err != nil {
		return throughput{}, err
	}
	defer func() { _ = ag.Close() }()
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	runtime.GC()
	m := startMeter()
	go func() { ran <- ag.Run(rctx) }()
	defer func() { stop(); <-ran }()
	b.log.Info().Uint64("events", last).Msg("projecting the ingested events")
	if err := ag.Projection().WaitFor(ctx, last); err != nil {
		return throughput{}, err
	}
	t := m.throughput(int(last))
	b.log.Info().Float64("events_per_s", t.rate()).Msg("projected")
	return t, nil
}

// ingest measures the ingestion sides and the raw baseline on one server.
func (b *analyticsBench) ingest(ctx context.Context) (r ingestResult, err error) {
	cfg := b.cfg
	dir, err := os.MkdirTemp("", "sluice-bench-analytics-ingest-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(dir)
	nop := zerolog.Nop()
	st, sctx, err := startStack(ctx, stackConfig{dir: dir, transport: transportInproc, syncAlways: cfg.fsync == fsyncAlways, atomicBatch: -1}, nop)
	if err != nil {
		return r, err
	}
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	octx, cancel := context.WithTimeout(sctx, time.Minute)
	defer cancel()
	in, err := analytics.Open(octx, analytics.Config{Log: st.lg, Logger: &nop})
	if err != nil {
		return r, fmt.Errorf("open analytics: %w", err)
	}
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return r, err
	}
	signer := gateway.NewSigner(key)
	auth := gateway.DeviceAuth(gateway.NewVerifier(pub))
	mux := http.NewServeMux()
	mux.Handle("/v1/analytics", in.Handler(func(r *http.Request) (analytics.Identity, error) { // as sluiced
		id, err := auth(r)
		return analytics.Identity{Device: id.Device, User: id.User}, err
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
	addr := ln.Addr().String()
	// The gateway, as sluiced runs it: tracking events over links go to
	// the same Ingestor.
	gw, err := gateway.NewServer(gateway.Config{Inbox: st.inbox, Tokens: gateway.NewVerifier(pub), Analytics: in, Heartbeat: 5 * time.Minute, Logger: &nop})
	if err != nil {
		return r, err
	}
	gln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return r, err
	}
	gserved := make(chan error, 1)
	go func() { gserved <- gw.ServeTCP(gln) }()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = gw.Shutdown(sctx)
		cancel()
		if serr := <-gserved; serr != nil && err == nil {
			err = serr
		}
	}()
	gaddr := gln.Addr().String()

	var sides []ingestSide
	if cfg.sides["http"] {
		sides = append(sides, ingestSide{name: "HTTP /v1/analytics", tag: "h", run: func(ctx context.Context, pool *ingestPool) (ingestPhase, error) {
			return b.ingestHTTP(ctx, addr, pool)
		}})
	}
	if cfg.sides["link"] {
		sides = append(sides, ingestSide{name: "gateway link (TLV)", tag: "g", run: func(ctx context.Context, pool *ingestPool) (ingestPhase, error) {
			return b.ingestLink(ctx, gaddr, pool)
		}})
	}
	js := st.lg.JetStream()
	stream, err := js.Stream(octx, analytics.StreamAnalytics)
	if err != nil {
		return r, err
	}
	var plain, body int64
	nBatches := 0
	for i, side := range sides {
		if i > 0 {
			// Each side starts from an empty stream, as the raw baseline
			// does: a stream holding the previous side's events (and its
			// duplicate window the ids) slows the next one down.
			if err := js.DeleteStream(sctx, analytics.StreamAnalytics); err != nil {
				return r, fmt.Errorf("delete the stream: %w", err)
			}
			if _, err := analytics.Open(sctx, analytics.Config{Log: st.lg, Logger: &nop}); err != nil {
				return r, fmt.Errorf("recreate the stream: %w", err)
			}
			if stream, err = js.Stream(sctx, analytics.StreamAnalytics); err != nil {
				return r, err
			}
		}
		start := time.Now()
		pool, err := b.makeIngestPool(side.tag, signer)
		if err != nil {
			return r, err
		}
		r.encode += time.Since(start)
		r.generated += pool.events
		r.types = pool.types
		r.meanEvent = float64(pool.bytes) / float64(pool.events)
		b.log.Info().Str("side", side.name).Int("events", pool.events).Dur("took", time.Since(start)).Msg("batches encoded")
		b.log.Info().Str("side", side.name).Int("concurrency", cfg.conc).Dur("for", cfg.ingestTime).Msg("ingest")
		ph, err := side.run(sctx, pool)
		if err != nil {
			return r, fmt.Errorf("%s: %w", side.name, err)
		}
		ph.name = side.name
		info, err := streamState(sctx, stream)
		if err != nil {
			return r, err
		}
		if info.Msgs != uint64(ph.events) {
			b.fail("%s: the stream holds %d messages, %d events were sent", side.name, info.Msgs, ph.events)
		}
		expect := map[string]bool{}
		for _, bt := range ph.sent {
			for _, id := range bt.ids {
				expect[id] = true
			}
			plain += int64(bt.plain)
			body += int64(len(bt.body))
		}
		nBatches += len(ph.sent)
		r.sides = append(r.sides, ph)
		b.log.Info().Str("side", side.name).Int("events", ph.events).Float64("events_per_s", ph.t.rate()).Msg("ingest done")
		r.streamMsgs += info.Msgs
		r.streamBytes += info.Bytes
		b.log.Info().Uint64("messages", info.Msgs).Msg("reading the stream back")
		r.checked = append(r.checked, side.name+": "+b.readBack(sctx, stream, expect))
		if i == len(sides)-1 {
			if r.project, err = b.projectIngested(sctx, st, dir, info.LastSeq); err != nil {
				return r, fmt.Errorf("projection: %w", err)
			}
		}
	}
	if nBatches > 0 {
		r.meanPlain, r.meanBody = float64(plain)/float64(nBatches), float64(body)/float64(nBatches)
	}

	// The baseline: as many events as the largest side sent, the same
	// bytes, after the sides.
	var base []ingestBatch
	for _, s := range r.sides {
		if len(s.sent) > len(base) {
			base = s.sent
		}
	}
	b.log.Info().Int("batches", len(base)).Msg("raw baseline")
	if r.raw, r.rawBytes, err = b.ingestRaw(sctx, st, base); err != nil {
		return r, fmt.Errorf("raw: %w", err)
	}
	b.log.Info().Int("events", r.raw.events).Float64("events_per_s", r.raw.t.rate()).Msg("raw done")
	return r, nil
}

// ingestHTTP has cfg.conc keep-alive clients post the pool's batches in
// turn, each after the previous answer, until -time has passed or every
// batch is sent; every answer must accept every event of its batch.
func (b *analyticsBench) ingestHTTP(ctx context.Context, addr string, pool *ingestPool) (ph ingestPhase, err error) {
	conns := make([]*httpConn, b.cfg.conc)
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.c.Close()
			}
		}
	}()
	for i := range conns {
		c, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return ph, err
		}
		conns[i] = &httpConn{c: c, br: bufio.NewReaderSize(c, 4<<10), host: addr}
	}
	return b.drive(ctx, pool, len(conns), func(w, i int) (time.Duration, error) {
		c, bt := conns[w], &pool.batches[i]
		c.post("/v1/analytics", pool.devices[bt.device].token, bt.body)
		t0 := time.Now()
		a, err := c.roundTrip(true)
		if err != nil {
			return 0, err
		}
		lat := time.Since(t0)
		reply := &analyticspb.IngestReply{}
		if a.status != http.StatusOK {
			return 0, fmt.Errorf("status %d: %s", a.status, bytes.TrimSpace(a.body))
		}
		if err := proto.Unmarshal(a.body, reply); err != nil {
			return 0, fmt.Errorf("reply: %w", err)
		}
		if int(reply.Accepted) != len(bt.msgs) || reply.Duplicates != 0 || len(reply.Rejected) != 0 {
			return 0, fmt.Errorf("%d events accepted, %d duplicates, %d rejected (%v); want %d accepted",
				reply.Accepted, reply.Duplicates, len(reply.Rejected), reply.Rejected, len(bt.msgs))
		}
		return lat, nil
	})
}

// drive runs workers goroutines that take the pool's batches in order and
// send each with send (worker w, batch i), which answers with the batch's
// latency once it is acknowledged, until the batches run out or
// cfg.ingestTime passes; batches under way then finish and count. The
// first error stops every worker. The phase is timed from the first send.
func (b *analyticsBench) drive(ctx context.Context, pool *ingestPool, workers int, send func(w, i int) (time.Duration, error)) (ph ingestPhase, err error) {
	type part struct {
		lat []time.Duration
		err error
	}
	parts := make([]part, workers)
	var next atomic.Int64
	var stop atomic.Bool
	var wg sync.WaitGroup
	runtime.GC()
	m := startMeter()
	for w := range parts {
		wg.Go(func() {
			p := &parts[w]
			for !stop.Load() && ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(pool.batches) {
					return
				}
				lat, err := send(w, i)
				if err != nil {
					p.err = fmt.Errorf("batch %d: %w", i, err)
					stop.Store(true)
					return
				}
				p.lat = append(p.lat, lat)
			}
		})
	}
	timer := time.NewTimer(b.cfg.ingestTime)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-timer.C:
	case <-done:
	case <-ctx.Done():
	}
	timer.Stop()
	stop.Store(true)
	<-done // batches under way finish: their events count
	sent := min(int(next.Load()), len(pool.batches))
	var lats []time.Duration
	var errs []error
	for _, p := range parts {
		lats = append(lats, p.lat...)
		errs = append(errs, p.err)
	}
	if err := firstError(errs); err != nil {
		return ph, err
	}
	if err := ctx.Err(); err != nil {
		return ph, err
	}
	ph.sent = pool.batches[:sent]
	for _, bt := range ph.sent {
		ph.events += len(bt.msgs)
	}
	ph.batches = sent
	ph.t = m.throughput(ph.events)
	ph.lat = summarise(lats, ph.t.took)
	return ph, nil
}

// post builds a request posting body, gzip-compressed protobuf, with the
// device's token.
func (h *httpConn) post(route, token string, body []byte) {
	b := append(h.req[:0], "POST "...)
	b = append(b, route...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, h.host...)
	b = append(b, "\r\nUser-Agent: sluice-bench\r\nContent-Type: application/x-protobuf\r\nContent-Encoding: gzip\r\nAuthorization: Bearer "...)
	b = append(b, token...)
	b = append(b, "\r\nContent-Length: "...)
	b = strconv.AppendInt(b, int64(len(body)), 10)
	b = append(b, "\r\n\r\n"...)
	h.req = append(b, body...)
}

// readBack reads the whole analytics stream and checks that it holds
// each expected event exactly once and nothing else.
func (b *analyticsBench) readBack(ctx context.Context, stream jetstream.Stream, expect map[string]bool) string {
	info, err := streamState(ctx, stream)
	if err != nil {
		b.fail("read back: %v", err)
		return "FAILED"
	}
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		b.fail("read back: %v", err)
		return "FAILED"
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(1024))
	if err != nil {
		b.fail("read back: %v", err)
		return "FAILED"
	}
	defer it.Stop()
	seen := make(map[string]bool, len(expect))
	var dups, stray, bad int
	for n := uint64(0); n < info.Msgs; n++ {
		m, err := it.Next()
		if err != nil {
			b.fail("read back: message %d of %d: %v", n+1, info.Msgs, err)
			return "FAILED"
		}
		ev := &analyticspb.Event{}
		if err := proto.Unmarshal(m.Data(), ev); err != nil {
			bad++
			continue
		}
		id := ev.Device + ":" + ev.Id
		switch {
		case !expect[id]:
			stray++
		case seen[id]:
			dups++
		}
		seen[id] = true
	}
	missing := 0
	for id := range expect {
		if !seen[id] {
			missing++
		}
	}
	verdict := "OK"
	if dups+stray+bad+missing > 0 {
		verdict = "FAILED"
		b.fail("the analytics stream: %d events missing, %d duplicated, %d not sent, %d undecodable", missing, dups, stray, bad)
	}
	return fmt.Sprintf("%d messages read back: %d events missing, %d duplicated, %d not sent, %d undecodable: %s", info.Msgs, missing, dups, stray, bad, verdict)
}

// ingestRaw publishes the events of batches, the bytes Ingest stored, with
// js.PublishAsync from one goroutine into a bare stream (one message per
// event, with the same message id), and waits for every ack.
func (b *analyticsBench) ingestRaw(ctx context.Context, st *stack, batches []ingestBatch) (ph ingestPhase, size uint64, err error) {
	ph.name = "raw js.PublishAsync"
	nc, err := connect(st.ns, transportInproc, "raw-producer")
	if err != nil {
		return ph, 0, err
	}
	defer closeConn(nc)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096)) // as oplog.Log's
	if err != nil {
		return ph, 0, err
	}
	stream, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: rawAnalyticsStream, Subjects: []string{rawAnalyticsPrefix + ">"},
		Storage: jetstream.FileStorage, Replicas: 1})
	if err != nil {
		return ph, 0, fmt.Errorf("raw stream: %w", err)
	}
	n := 0
	for _, bt := range batches {
		n += len(bt.msgs)
	}
	futs := make([]jetstream.PubAckFuture, 0, n)
	runtime.GC()
	m := startMeter()
	for i, bt := range batches {
		if i%64 == 0 && ctx.Err() != nil {
			return ph, 0, ctx.Err()
		}
		for k, data := range bt.msgs {
			msg := &nats.Msg{Subject: rawAnalyticsPrefix + analyticsApp + "." + bt.subs[k], Data: data}
			f, err := js.PublishMsgAsync(msg, jetstream.WithMsgID(bt.ids[k]), jetstream.WithStallWait(stallWait))
			if err != nil {
				return ph, 0, fmt.Errorf("publish: %w", err)
			}
			futs = append(futs, f)
		}
	}
	seqs := make(map[uint64]bool, n)
	for i, f := range futs {
		select {
		case ack := <-f.Ok():
			if ack.Duplicate || seqs[ack.Sequence] {
				return ph, 0, fmt.Errorf("event %d: ack of a duplicate (seq %d)", i, ack.Sequence)
			}
			seqs[ack.Sequence] = true
		case err := <-f.Err():
			return ph, 0, fmt.Errorf("event %d: %w", i, err)
		case <-ctx.Done():
			return ph, 0, ctx.Err()
		}
	}
	ph.events = n
	ph.t = m.throughput(n)
	info, err := streamState(ctx, stream)
	if err != nil {
		return ph, 0, err
	}
	if info.Msgs != uint64(n) {
		b.fail("raw: the stream holds %d messages, %d were published", info.Msgs, n)
	}
	return ph, info.Bytes, nil
}

// ----- query -----

// queryReturn sets how often a user comes back: k days after the first
// with probability queryReturn/sqrt(k) (12% the next day, 2% a month
// later). With 30 days, a user is active on 1.7 days on average.
const queryReturn = 0.12

// queryDedupeWindow is the analytics stream's duplicate window while
// the query scenario loads its data.
const queryDedupeWindow = 5 * time.Second

// queryStats is latencies of one query, measured call by call.
type queryStats struct {
	name string
	lat  latency
}

// queryResult is what the query scenario measured.
type queryResult struct {
	users, days        int
	first, last        string // days, UTC
	events, userDays   int
	load               throughput
	apply              throughput
	applied            uint64
	storeBytes         int64
	streamBytes        uint64
	countersPerDay     float64
	calls              []queryStats
	checkedDays        int
	checkedCohorts     int
	mismatches         int
	firstMismatch      string
	retentionDaysAsked int
}

// queryPlan is the synthetic data: which users are active on which days.
// User u is first seen on day firstDay(u) and comes back on a later day
// k days after with probability queryReturn/sqrt(k).
type queryPlan struct {
	users, days int
	start       time.Time // day 0, UTC
	// The generator's counts, to check the aggregates against.
	dau, fresh []uint64   // per day
	retention  [][]uint64 // per cohort day, per days since
}

func (q *queryPlan) firstDay(u int) int { return int(splitmix(uint64(u)) % uint64(q.days)) }

// active reports whether user u is active on day d.
func (q *queryPlan) active(u, d int) bool {
	f := q.firstDay(u)
	if d == f {
		return true
	}
	if d < f {
		return false
	}
	k := float64(d - f)
	h := splitmix(uint64(u)<<8 | uint64(d) + 0xa11ce)
	return float64(h>>11)/(1<<53) < queryReturn/math.Sqrt(k)
}

func (q *queryPlan) day(d int) string { return q.start.AddDate(0, 0, d).Format("20060102") }

// userEvents appends user u's events on day d: a page view, another one
// (with the first as referrer) for a tenth of them, a custom event for
// one in twenty, a crash for one in 300.
func (q *queryPlan) userEvents(evs []*analyticspb.Event, u, d int) []*analyticspb.Event {
	h := splitmix(uint64(u) + 0x9e37)
	p := profileOf("d"+strconv.Itoa(u), "u"+strconv.Itoa(u), h)
	r := splitmix(uint64(u)<<8 | uint64(d))
	ms := q.start.AddDate(0, 0, d).Add(time.Duration(r%(22*3600)) * time.Second).UnixMilli()
	id := func(k int) string { return "e" + strconv.Itoa(d*8+k) }
	page := benchPages[(r>>20)%uint64(len(benchPages))]
	e := p.event(id(0), analyticspb.Type_TYPE_PAGE_VIEW, ms)
	e.Page = page
	evs = append(evs, e)
	if (r>>28)%10 == 0 {
		e := p.event(id(1), analyticspb.Type_TYPE_PAGE_VIEW, ms+15_000)
		e.Page, e.Referrer = benchPages[(r>>32)%uint64(len(benchPages))], page
		evs = append(evs, e)
	}
	if (r>>36)%20 == 0 {
		e := p.event(id(2), analyticspb.Type_TYPE_CUSTOM, ms+30_000)
		e.Name = benchActions[(r>>40)%uint64(len(benchActions))]
		evs = append(evs, e)
	}
	if (r>>44)%300 == 0 {
		e := p.event(id(3), analyticspb.Type_TYPE_CRASH, ms+45_000)
		e.Stack = "java.lang.NullPointerException\n\tat com.example.shop.cart.CartViewModel.total(CartViewModel.kt:88)\n"
		evs = append(evs, e)
	}
	return evs
}

// query loads the synthetic data through Ingestor.Ingest, times the
// projection's catch-up, then the queries and the raw reads.
func (b *analyticsBench) query(ctx context.Context) (r queryResult, err error) {
	cfg := b.cfg
	dir, err := os.MkdirTemp("", "sluice-bench-analytics-query-")
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(dir)
	nop := zerolog.Nop()
	// The data is loaded with fsync interval: the queries read badger,
	// which the stream's fsync does not touch.
	st, sctx, err := startStack(ctx, stackConfig{dir: dir, transport: transportInproc, atomicBatch: -1}, nop)
	if err != nil {
		return r, err
	}
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	today := time.Now().UTC().Truncate(24 * time.Hour)
	q := &queryPlan{users: cfg.users, days: cfg.days, start: today.AddDate(0, 0, -cfg.days),
		dau: make([]uint64, cfg.days), fresh: make([]uint64, cfg.days), retention: make([][]uint64, cfg.days)}
	for f := range q.retention {
		q.retention[f] = make([]uint64, cfg.days-f)
	}
	r.users, r.days, r.first, r.last = cfg.users, cfg.days, q.day(0), q.day(cfg.days-1)
	// The clock moves with the day being loaded, so that every event is
	// inside the late window when it arrives.
	var clock atomic.Int64
	octx, cancel := context.WithTimeout(sctx, time.Minute)
	defer cancel()
	// The synthetic events have no duplicates: a short duplicate window
	// keeps the server's table of message ids (in this process's heap,
	// scanned by every GC) from holding millions of them.
	in, err := analytics.Open(octx, analytics.Config{Log: st.lg, Logger: &nop, Now: func() time.Time { return time.UnixMilli(clock.Load()) },
		DedupeWindow: queryDedupeWindow})
	if err != nil {
		return r, fmt.Errorf("open analytics: %w", err)
	}

	// Load, day after day: cfg.loaders goroutines, each over its share of
	// the users, in batches of MaxBatchEvents (a user's events of a day in
	// one batch, in time order).
	b.log.Info().Int("users", cfg.users).Int("days", cfg.days).Msg("loading synthetic data")
	runtime.GC()
	m := startMeter()
	var events, rejected atomic.Int64
	for d := range cfg.days {
		clock.Store(q.start.AddDate(0, 0, d+1).UnixMilli())
		counts := make([][3]uint64, cfg.loaders) // dau, new, per loader
		rets := make([][]uint64, cfg.loaders)
		errs := make([]error, cfg.loaders)
		var wg sync.WaitGroup
		for w := range cfg.loaders {
			rets[w] = make([]uint64, d+1)
			wg.Go(func() {
				batch := make([]*analyticspb.Event, 0, analytics.MaxBatchEvents)
				flush := func() error {
					if len(batch) == 0 {
						return nil
					}
					reply, err := in.Ingest(sctx, analytics.Identity{}, &analyticspb.Batch{Events: batch})
					if err != nil {
						return err
					}
					events.Add(int64(reply.Accepted))
					rejected.Add(int64(len(batch)) - int64(reply.Accepted))
					batch = batch[:0]
					return nil
				}
				var one []*analyticspb.Event
				for u := w; u < cfg.users; u += cfg.loaders {
					if !q.active(u, d) {
						continue
					}
					f := q.firstDay(u)
					counts[w][0]++
					if f == d {
						counts[w][1]++
					}
					rets[w][d-f]++
					one = q.userEvents(one[:0], u, d)
					if len(batch)+len(one) > analytics.MaxBatchEvents {
						if errs[w] = flush(); errs[w] != nil {
							return
						}
					}
					batch = append(batch, one...)
				}
				errs[w] = flush()
			})
		}
		wg.Wait()
		if err := firstError(errs); err != nil {
			return r, fmt.Errorf("load day %s: %w", q.day(d), err)
		}
		for w := range cfg.loaders {
			q.dau[d] += counts[w][0]
			q.fresh[d] += counts[w][1]
			for k, n := range rets[w] {
				if n > 0 {
					q.retention[d-k][k] += n
				}
			}
		}
		r.userDays += int(q.dau[d])
		b.log.Info().Str("day", q.day(d)).Uint64("dau", q.dau[d]).Int64("events", events.Load()).Msg("day loaded")
	}
	r.events = int(events.Load())
	r.load = m.throughput(r.events)
	if n := rejected.Load(); n > 0 {
		b.fail("load: %d events rejected by Ingest", n)
	}
	stream, err := st.lg.JetStream().Stream(sctx, analytics.StreamAnalytics)
	if err != nil {
		return r, err
	}
	info, err := streamState(sctx, stream)
	if err != nil {
		return r, err
	}
	r.streamBytes = info.Bytes
	if info.Msgs != uint64(r.events) {
		b.fail("load: the stream holds %d messages, %d events were accepted", info.Msgs, r.events)
	}

	// The projection, from an empty store, timed until it holds every
	// event.
	agDir := filepath.Join(dir, "analytics")
	ag, err := analytics.OpenAggregates(analytics.AggregatesConfig{Log: st.lg, Dir: agDir, Logger: &nop})
	if err != nil {
		return r, err
	}
	closed := false
	defer func() {
		if !closed {
			_ = ag.Close()
		}
	}()
	rctx, stopRun := context.WithCancel(sctx)
	ran := make(chan error, 1)
	runtime.GC()
	m = startMeter()
	go func() { ran <- ag.Run(rctx) }()
	defer func() {
		stopRun()
		if ran != nil {
			<-ran
		}
	}()
	b.log.Info().Int("events", r.events).Msg("projecting")
	for {
		wctx, cancel := context.WithTimeout(sctx, 10*time.Second)
		err := ag.Projection().WaitFor(wctx, info.LastSeq)
		cancel()
		if err == nil || sctx.Err() != nil {
			break
		}
		b.log.Info().Uint64("applied", ag.Projection().Applied()).Int("of", r.events).Msg("projecting")
	}
	if err := ag.CatchUp(sctx); err != nil {
		return r, fmt.Errorf("catch up: %w", err)
	}
	r.applied = ag.Projection().Applied()
	r.apply = m.throughput(int(r.applied))
	b.log.Info().Float64("events_per_s", r.apply.rate()).Msg("projected")

	// Check the aggregates against the generator's counts.
	var counters int
	for d := range cfg.days {
		c, err := ag.Counters(sctx, analyticsApp, q.day(d))
		if err != nil {
			return r, err
		}
		counters += len(c)
		if c["dau"] != q.dau[d] || c["new"] != q.fresh[d] {
			r.mismatch(fmt.Sprintf("day %s: dau %d new %d, generated %d and %d", q.day(d), c["dau"], c["new"], q.dau[d], q.fresh[d]))
		}
		r.checkedDays++
		ret, err := ag.Retention(sctx, analyticsApp, q.day(d), cfg.days-1-d)
		if err != nil {
			return r, err
		}
		for k, n := range ret {
			if n != q.retention[d][k] {
				r.mismatch(fmt.Sprintf("cohort %s day %d: %d users, generated %d", q.day(d), k, n, q.retention[d][k]))
				break
			}
		}
		r.checkedCohorts++
	}
	r.countersPerDay = float64(counters) / float64(cfg.days)
	if r.mismatches > 0 {
		b.fail("aggregates: %d mismatches with the generated data; first: %s", r.mismatches, r.firstMismatch)
	}

	// The queries, call by call, over every day and cohort in turn.
	const retentionDays = 30
	r.retentionDaysAsked = retentionDays
	b.log.Info().Int("calls", cfg.queries).Msg("queries")
	timed := func(name string, f func(i int) error) error {
		for i := range max(20, cfg.days) { // warm-up: every day and cohort once
			if err := f(i); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
		}
		ds := make([]time.Duration, cfg.queries)
		start := time.Now()
		for i := range ds {
			t0 := time.Now()
			if err := f(i); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			ds[i] = time.Since(t0)
		}
		r.calls = append(r.calls, queryStats{name: name, lat: summarise(ds, time.Since(start))})
		return nil
	}
	if err := timed("Counters(app, day) (DAU)", func(i int) error {
		c, err := ag.Counters(sctx, analyticsApp, q.day(i%cfg.days))
		if err == nil && c["dau"] != q.dau[i%cfg.days] {
			err = fmt.Errorf("dau %d, want %d", c["dau"], q.dau[i%cfg.days])
		}
		return err
	}); err != nil {
		return r, err
	}
	if err := timed(fmt.Sprintf("Retention(app, cohort, %d)", retentionDays), func(i int) error {
		_, err := ag.Retention(sctx, analyticsApp, q.day(i%cfg.days), retentionDays)
		return err
	}); err != nil {
		return r, err
	}
	if err := timed("CatchUp alone (in both)", func(int) error { return ag.CatchUp(sctx) }); err != nil {
		return r, err
	}

	// The baseline: raw reads of the same store, reopened.
	stopRun()
	if err := <-ran; err != nil {
		return r, fmt.Errorf("aggregates: %w", err)
	}
	ran = nil
	closed = true
	if err := ag.Close(); err != nil {
		return r, err
	}
	if r.storeBytes, err = dirSize(agDir); err != nil {
		return r, err
	}
	db, err := oplog.OpenStore(agDir, nop)
	if err != nil {
		return r, err
	}
	defer db.Close()
	if err := timed("raw badger: 1 point read (n/<app>/<day>/dau)", func(i int) error {
		txn := db.NewTransaction(false)
		defer txn.Discard()
		n, err := oplog.GetUint64(txn, []byte("n/"+analyticsApp+"/"+q.day(i%cfg.days)+"/dau"))
		if err == nil && n != q.dau[i%cfg.days] {
			err = fmt.Errorf("dau %d, want %d", n, q.dau[i%cfg.days])
		}
		return err
	}); err != nil {
		return r, err
	}
	if err := timed("raw badger: prefix scan (n/<app>/<day>/)", func(i int) error {
		txn := db.NewTransaction(false)
		defer txn.Discard()
		// The options as Counters gives them: the package's type, named
		// by inference (only the packages that own badger import it).
		opts := argOf(txn.NewIterator)
		opts.Prefix, opts.PrefetchValues = []byte("n/"+analyticsApp+"/"+q.day(i%cfg.days)+"/"), true
		it := txn.NewIterator(opts)
		defer it.Close()
		n := 0
		for it.Rewind(); it.Valid(); it.Next() {
			if err := it.Item().Value(func([]byte) error { n++; return nil }); err != nil {
				return err
			}
		}
		if n == 0 {
			return errors.New("no counters")
		}
		return nil
	}); err != nil {
		return r, err
	}
	if err := timed(fmt.Sprintf("raw badger: %d point reads (r/<app>/<cohort>/<n>)", retentionDays+1), func(i int) error {
		txn := db.NewTransaction(false)
		defer txn.Discard()
		cohort := "r/" + analyticsApp + "/" + q.day(i%cfg.days) + "/"
		for n := range retentionDays + 1 {
			if _, err := oplog.GetUint64(txn, []byte(cohort+strconv.Itoa(n))); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		return r, err
	}
	return r, nil
}

// argOf is the zero value of f's argument type.
func argOf[A, R any](func(A) R) (a A) { return a }

func (r *queryResult) mismatch(s string) {
	if r.mismatches == 0 {
		r.firstMismatch = s
	}
	r.mismatches++
}

// dirSize is the size of the files under dir.
func dirSize(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		n += info.Size()
		return nil
	})
	return n, err
}

// ----- report -----

// analyticsReport prints the analytics benchmark's results.
type analyticsReport struct {
	out       io.Writer
	cfg       *analyticsConfig
	ir        *ingestResult
	qr        *queryResult
	disturbed []string
}

func (w *analyticsReport) printf(format string, a ...any) { fmt.Fprintf(w.out, format, a...) }

// busy notes a phase disturbed by other processes.
func (w *analyticsReport) busy(phase string, t throughput) string {
	c := t.otherCores()
	if c < 0 {
		return "-"
	}
	if c > busyThreshold {
		w.disturbed = append(w.disturbed, fmt.Sprintf("%s (%.2f cores)", phase, c))
	}
	return fmt.Sprintf("%.2f", c)
}

func (w *analyticsReport) header(load string) {
	c := w.cfg
	w.printf("sluice-bench analytics\n")
	w.printf("machine:   %s\n", machineInfo())
	if load != "" {
		w.printf("load:      load average %s at the start (other processes' CPU during each phase is reported below)\n", load)
	}
	if c.scenarios[scenarioIngest] {
		w.printf("ingest:    one embedded NATS server (JetStream in a temporary directory, fsync %s), oplog.Log as sluiced, analytics.Ingestor\n", c.fsync)
		w.printf("           and its Handler on a loopback net/http server, device tokens verified by gateway.DeviceAuth (cached verifier)\n")
		w.printf("           %d keep-alive clients (a lean HTTP/1.1 client in this process), each posting a batch after the previous answer:\n", c.conc)
		w.printf("           %d events of one device per batch, protobuf, gzip; %d devices; for %v or %d events, whichever comes first\n", c.batch, c.devices, c.ingestTime, c.n)
		w.printf("           link: gateway.Server (Config.Analytics the same Ingestor, ServeTCP on loopback), a TLV link per device (Hello asking\n")
		w.printf("           for AnalyticsAck frames); %d workers each send a batch (ClientEvent.analytics, zstd by the codec) after the previous ack\n", c.conc)
		w.printf("           baseline: raw js.PublishAsync from one goroutine (window 4096, as oplog.Log) of the same encoded events into a bare\n")
		w.printf("           file stream on the same server, one message per event with the message id \"<device>:<event id>\", until every ack is in\n")
	}
	if c.scenarios[scenarioQuery] {
		w.printf("query:     a server of its own (fsync interval: the queries read badger), %d users over %d days ending yesterday (UTC),\n", c.users, c.days)
		w.printf("           loaded through Ingestor.Ingest (%d at a time, batches of %d, the clock set to the end of the day loaded),\n", c.loaders, analytics.MaxBatchEvents)
		w.printf("           then analytics.Aggregates from an empty store: its catch-up timed; %d timed calls per query, cycling over days and cohorts\n", c.queries)
	}
}

func (w *analyticsReport) ingest(r ingestResult) {
	w.ir = &r
	c := w.cfg
	var mix []string
	for _, t := range []analyticspb.Type{analyticspb.Type_TYPE_PAGE_VIEW, analyticspb.Type_TYPE_CUSTOM, analyticspb.Type_TYPE_PERF,
		analyticspb.Type_TYPE_SESSION_START, analyticspb.Type_TYPE_SESSION_END, analyticspb.Type_TYPE_CRASH, analyticspb.Type_TYPE_FREEZE} {
		mix = append(mix, fmt.Sprintf("%s %.1f%%", analytics.TypeToken(t), pctOf(r.types[t], r.generated)))
	}
	w.printf("\ningest (fsync %s; %d clients, batches of %d events)\n", c.fsync, c.conc, c.batch)
	w.printf("  events: %.0f B each encoded, mean; %s\n", r.meanEvent, strings.Join(mix, ", "))
	w.printf("  batches: %.0f B of protobuf, %.0f B gzip-compressed (%.0f%%), mean; %d events encoded in %.2f s before timing\n",
		r.meanPlain, r.meanBody, 100*r.meanBody/max(r.meanPlain, 1), r.generated, r.encode.Seconds())
	w.printf("%-22s %9s %8s %11s %9s %9s %6s %6s %8s %8s\n", "side", "events", "took s", "events/s", "ratio", "cpu µs/ev", "cores", "other", "p50 ms", "p99 ms")
	row := func(p ingestPhase, ratioTo float64) {
		rat, p50, p99 := "-", "-", "-"
		if ratioTo > 0 {
			rat = ratio(p.t.rate(), ratioTo)
		}
		if p.lat.n > 0 {
			p50, p99 = msec(p.lat.p50), msec(p.lat.p99)
		}
		w.printf("%-22s %9d %8.2f %11.0f %9s %9.1f %6.2f %6s %8s %8s\n", p.name, p.events, p.t.took.Seconds(), p.t.rate(), rat,
			p.t.cpuPer(), p.t.cores(), w.busy("ingest "+p.name, p.t), p50, p99)
	}
	for _, s := range r.sides {
		row(s, r.raw.t.rate())
	}
	row(r.raw, 0)
	for _, s := range r.sides {
		if s.batches > 0 {
			w.printf("  %s: %d requests, latency per request (post to answer) p50 %s p99 %s max %s ms\n", s.name, s.batches, msec(s.lat.p50), msec(s.lat.p99), msec(s.lat.max))
		}
	}
	w.printf("  stored: %s held %d messages, %.0f B each (each side into a new stream); the raw stream %.0f B each\n", analytics.StreamAnalytics, r.streamMsgs,
		float64(r.streamBytes)/float64(max(r.streamMsgs, 1)), float64(r.rawBytes)/float64(max(r.raw.events, 1)))
	for _, c := range r.checked {
		w.printf("  verify %s\n", c)
	}
	if r.project.n > 0 {
		fastest := 0.0
		for _, s := range r.sides {
			fastest = max(fastest, s.t.rate())
		}
		keeps := "keeps up with"
		if r.project.rate() < fastest {
			keeps = fmt.Sprintf("falls behind by %.0f events/s at", fastest-r.project.rate())
		}
		w.printf("  projection: analytics.Aggregates applied the last side's %d events from an empty store in %.2f s: %.0f events/s (cpu %.1f µs/event, %.2f cores, other %s);\n",
			r.project.n, r.project.took.Seconds(), r.project.rate(), r.project.cpuPer(), r.project.cores(), w.busy("ingest projection", r.project))
		w.printf("              it %s the fastest side's %.0f events/s\n", keeps, fastest)
	}
}

func (w *analyticsReport) query(r queryResult) {
	w.qr = &r
	w.printf("\nquery (%d users over %d days, %s-%s: %d user-days, %d events)\n", r.users, r.days, r.first, r.last, r.userDays, r.events)
	w.printf("  load: Ingestor.Ingest %.1f s, %.0f events/s (cpu %.1f µs/event, %.2f cores, other processes %s cores); stream %.1f MiB\n",
		r.load.took.Seconds(), r.load.rate(), r.load.cpuPer(), r.load.cores(), w.busy("query load", r.load), float64(r.streamBytes)/(1<<20))
	w.printf("  projection: analytics.Aggregates caught up with %d events in %.1f s: %.0f events/s applied (cpu %.1f µs/event, %.2f cores, other %s)\n",
		r.applied, r.apply.took.Seconds(), r.apply.rate(), r.apply.cpuPer(), r.apply.cores(), w.busy("query projection", r.apply))
	w.printf("  store: badger directory %.1f MiB after Close (%.0f B per event); %.0f counters per day, mean\n",
		float64(r.storeBytes)/(1<<20), float64(r.storeBytes)/float64(max(r.events, 1)), r.countersPerDay)
	w.printf("%-50s %7s %9s %9s %9s %11s\n", "call", "calls", "p50 ms", "p99 ms", "max ms", "calls/s")
	for _, c := range r.calls {
		w.printf("%-50s %7d %9.3f %9.3f %9.3f %11.0f\n", c.name, c.lat.n, ms64(c.lat.p50), ms64(c.lat.p99), ms64(c.lat.max), throughput{n: c.lat.n, took: c.lat.took}.rate())
	}
	w.printf("  Counters and Retention each first wait for the projection to hold what the stream held at the call (CatchUp: one STREAM.INFO)\n")
	w.printf("  Counters reads every counter of the day (a prefix scan) into a map; the raw reads use the store reopened after Close, warmed likewise\n")
	verdict := "OK"
	if r.mismatches > 0 {
		verdict = fmt.Sprintf("FAILED (%d mismatches; first: %s)", r.mismatches, r.firstMismatch)
	}
	w.printf("  check: DAU and new users of %d days, retention of %d cohorts against the generator's counts: %s\n", r.checkedDays, r.checkedCohorts, verdict)
}

func ms64(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func (w *analyticsReport) summary(issues []string) {
	w.printf("\nsummary\n")
	if r := w.ir; r != nil {
		for _, s := range r.sides {
			met := "NOT MET"
			if s.t.rate() >= goalIngestRatio*r.raw.t.rate() {
				met = "MET"
			}
			w.printf("ingest: %s %.0f events/s, %s raw js.PublishAsync's %.0f events/s (fsync %s): goal at least %.2fx: %s\n",
				s.name, s.t.rate(), ratio(s.t.rate(), r.raw.t.rate()), r.raw.t.rate(), w.cfg.fsync, goalIngestRatio, met)
		}
	}
	if r := w.qr; r != nil && len(r.calls) >= 2 {
		w.printf("query: %d users: Counters (DAU) p50 %.3f p99 %.3f ms, Retention (%d days) p50 %.3f p99 %.3f ms; projection %.0f events/s (no goal set)\n",
			r.users, ms64(r.calls[0].lat.p50), ms64(r.calls[0].lat.p99), r.retentionDaysAsked, ms64(r.calls[1].lat.p50), ms64(r.calls[1].lat.p99), r.apply.rate())
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
