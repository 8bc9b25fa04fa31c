package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Fsync modes, as sluiced's --fsync names them.
const (
	fsyncInterval = "interval"
	fsyncAlways   = "always"
	fsyncBoth     = "both"
)

// Default events per timed run, chosen so the default run (two modes, two
// user counts, each with a prefill and three runs per side) ends within
// about five minutes on two cores.
const (
	defaultNInterval = 200_000
	defaultNAlways   = 20_000
)

// oplogConfig is the command line of the oplog benchmark.
type oplogConfig struct {
	n           int // 0: per-mode default
	runs        int
	payload     int
	users       []int
	modes       []string
	batch       int
	inflight    int
	latN        int
	latInflight int
	maxPending  int
	prefill     bool
	msgID       bool
	transport   string
	sluiceConn  string
	cpuProfile  string
	timeout     time.Duration
	verbose     bool

	entrySize int // size of a stored entry, measured
	idWidth   int // digits of every user id, so all entries have one size
}

func (c *oplogConfig) eventsFor(mode string) int {
	switch {
	case c.n > 0:
		return c.n
	case mode == fsyncAlways:
		return defaultNAlways
	default:
		return defaultNInterval
	}
}

func parseOplogFlags(args []string, stderr io.Writer) (*oplogConfig, error) {
	c := &oplogConfig{}
	fs := flag.NewFlagSet("sluice-bench oplog", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench oplog [flags]

Compares raw JetStream async publish of same-size messages into a bare stream
with Sluice's producer path end to end (request/reply batch append: validated,
appended, acked, and projected into the badger inbox), per fsync mode and user
count; then single-event request/reply latency against a synchronous
JetStream publish. Each scenario runs on fresh embedded servers in temporary
directories, removed at the end.

flags:`)
		fs.PrintDefaults()
	}
	fs.IntVar(&c.n, "n", 0, fmt.Sprintf("events per timed run (0: %d with -fsync interval, %d with always)", defaultNInterval, defaultNAlways))
	fs.IntVar(&c.runs, "runs", 3, "timed throughput runs per scenario and side; the median is reported")
	fs.IntVar(&c.payload, "payload", 256, "payload bytes of every event")
	users := fs.String("users", "1000,1000000", "distinct target users, comma-separated: one scenario per count")
	fsync := fs.String("fsync", fsyncBoth, "fsync mode of the servers: always, interval or both")
	fs.IntVar(&c.batch, "batch", 100, "events per batch request")
	fs.IntVar(&c.inflight, "inflight", 16, "batch requests in flight (one producer goroutine each)")
	fs.IntVar(&c.latN, "lat-n", 3000, "single-event requests of the latency phase")
	fs.IntVar(&c.latInflight, "lat-inflight", 4, "requests in flight in the latency phase")
	fs.IntVar(&c.maxPending, "max-pending", 4096, "async publish window of the raw publisher (oplog.Log uses 4096)")
	fs.BoolVar(&c.prefill, "prefill", true, "before timing, store one entry for every user (untimed, without fsync), so the streams and the inbox already hold every target")
	fs.BoolVar(&c.msgID, "msgid", false, "give every event a producer message id (and every raw message a Nats-Msg-Id), exercising dedupe")
	fs.StringVar(&c.transport, "transport", transportTCP, "how producers reach the server: tcp (loopback) or inproc")
	fs.StringVar(&c.sluiceConn, "sluice-transport", transportInproc, "how Sluice's own connection reaches the server: inproc (as sluiced) or tcp (loopback; diagnostic)")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of each timed throughput phase to <this>.<mode>.<users>.<raw|sluice>.pprof")
	fs.DurationVar(&c.timeout, "timeout", 20*time.Minute, "abort the whole run after this long")
	fs.BoolVar(&c.verbose, "v", false, "also log the Sluice components' warnings and errors")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	for _, u := range strings.Split(*users, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(u))
		if err != nil || n < 1 || n > 100_000_000 {
			errs = append(errs, fmt.Errorf("-users %q: want counts from 1 to 100000000", u))
			continue
		}
		c.users = append(c.users, n)
	}
	switch *fsync {
	case fsyncBoth:
		c.modes = []string{fsyncInterval, fsyncAlways}
	case fsyncInterval, fsyncAlways:
		c.modes = []string{*fsync}
	default:
		errs = append(errs, fmt.Errorf("-fsync %q: want always, interval or both", *fsync))
	}
	if c.n < 0 || c.n >= 1e9 {
		errs = append(errs, errors.New("-n: want 0 to 999999999"))
	}
	if c.runs < 1 || c.runs > 999 {
		errs = append(errs, errors.New("-runs: want 1 to 999"))
	}
	if c.payload < 0 || c.payload > 64<<10 {
		errs = append(errs, errors.New("-payload: want 0 to 65536 bytes (the oplog's default limit)"))
	}
	if c.batch < 1 || c.batch > 1000 {
		errs = append(errs, errors.New("-batch: want 1 to 1000 (the oplog's default limit)"))
	}
	if c.inflight < 1 || c.maxPending < 1 {
		errs = append(errs, errors.New("-inflight and -max-pending must be positive"))
	}
	if c.latInflight < 1 || c.latInflight > 999 {
		errs = append(errs, errors.New("-lat-inflight: want 1 to 999"))
	}
	if c.latN < 0 || c.latN >= 1e9 {
		errs = append(errs, errors.New("-lat-n: want 0 to 999999999"))
	}
	if c.transport != transportTCP && c.transport != transportInproc {
		errs = append(errs, fmt.Errorf("-transport %q: want tcp or inproc", c.transport))
	}
	if c.sluiceConn != transportTCP && c.sluiceConn != transportInproc {
		errs = append(errs, fmt.Errorf("-sluice-transport %q: want tcp or inproc", c.sluiceConn))
	}
	if c.timeout <= 0 {
		errs = append(errs, errors.New("-timeout must be positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	maxUsers := 0
	for _, u := range c.users {
		maxUsers = max(maxUsers, u)
	}
	c.idWidth = len(strconv.Itoa(maxUsers - 1))
	c.entrySize = entrySize(c)
	return c, nil
}

// entrySize is the size of the entry Sluice stores for one benchmark
// event: the raw baseline publishes messages of this size.
func entrySize(c *oplogConfig) int {
	e := &oplogpb.Entry{
		Kind:       oplogpb.Kind_KIND_SYNC,
		Business:   benchBusiness,
		Dimension:  oplogpb.Dimension_DIMENSION_USER,
		Target:     userID(c, 0),
		Payload:    make([]byte, c.payload),
		CreatedAt:  timestamppb.Now(),
		DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_MULTI,
	}
	if c.msgID {
		e.MessageId = messageID("t", 0, 0)
	}
	return proto.Size(e)
}

// userID is the id of user i; every id has the same length.
func userID(c *oplogConfig, i int) string {
	s := strconv.Itoa(i)
	return "u" + strings.Repeat("0", max(c.idWidth-len(s), 0)) + s
}

// messageID is the producer message id of event i of a timed run ("t") or
// of a latency worker ("l"); ids never repeat within a scenario, and all
// have one length (the flags bound run, worker and event counts).
func messageID(phase string, runOrWorker, i int) string {
	return fmt.Sprintf("bench-%s%03d-%09d", phase, runOrWorker, i)
}

// scenario is one fsync mode and user count.
type scenario struct {
	mode  string
	users int
	n     int
}

func (s scenario) String() string { return fmt.Sprintf("%s/%d users", s.mode, s.users) }

// result is what one scenario measured.
type result struct {
	scenario
	raw    rawResult
	sluice sluiceResult
}

func (r result) ratio() float64 { return r.sluice.e2e.rate() / r.raw.tput.rate() }

func runOplog(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseOplogFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := progressLogger(stderr)
	compLog := zerolog.Nop() // the Sluice components' logger
	if cfg.verbose {
		compLog = log.Level(zerolog.WarnLevel)
	}

	w := &report{out: stdout, cfg: cfg}
	w.header()
	var results []result
	for _, mode := range cfg.modes {
		for _, users := range cfg.users {
			sc := scenario{mode: mode, users: users, n: cfg.eventsFor(mode)}
			r, err := runScenario(ctx, cfg, sc, log, compLog)
			if err != nil {
				return fmt.Errorf("scenario %s: %w", sc, err)
			}
			w.row(r)
			results = append(results, r)
		}
	}
	w.footer(results)
	return nil
}

// runScenario measures the raw baseline and Sluice, each on fresh servers
// in a fresh temporary directory that is removed at the end.
func runScenario(ctx context.Context, cfg *oplogConfig, sc scenario, log, compLog zerolog.Logger) (result, error) {
	r := result{scenario: sc}
	dir, err := os.MkdirTemp("", "sluice-bench-")
	if err != nil {
		return r, fmt.Errorf("temp dir: %w", err)
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			log.Warn().Err(err).Str("dir", dir).Msg("temp dir not removed")
		}
	}()
	log = log.With().Str("fsync", sc.mode).Int("users", sc.users).Logger()
	if r.raw, err = runRaw(ctx, cfg, sc, filepath.Join(dir, "raw"), log); err != nil {
		return r, fmt.Errorf("raw baseline: %w", err)
	}
	if r.sluice, err = runSluice(ctx, cfg, sc, filepath.Join(dir, "sluice"), log, compLog); err != nil {
		return r, fmt.Errorf("sluice: %w", err)
	}
	return r, nil
}

// profile starts a CPU profile of one timed phase when -cpuprofile is set;
// the returned func stops it.
func profile(cfg *oplogConfig, sc scenario, phase string) (func() error, error) {
	return startProfile(cfg.cpuProfile, fmt.Sprintf("%s.%d.%s", sc.mode, sc.users, phase))
}
