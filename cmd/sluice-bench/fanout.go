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
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The fanout benchmark: one event written to a list of users through
// fanout.Fanout (write diffusion), against raw JetStream publishing as
// many same-size messages, on the same server in the same run.

// fanoutJob is the id of the benchmark's job (every run has fresh servers).
const fanoutJob = "bench-fanout"

// fanoutConfig is the command line of the fanout benchmark.
type fanoutConfig struct {
	cpuprofile  string
	users       int
	chunk       int
	concurrency int
	payload     int
	mode        string
	latN        int
	latGap      time.Duration
	latDelay    time.Duration
	poll        time.Duration
	maxPending  int
	transport   string
	rawMsgID    bool
	timeout     time.Duration
	verbose     bool

	idWidth   int
	entrySize int // the stored entry of one recipient, without headers
}

func parseFanoutFlags(args []string, stderr io.Writer) (*fanoutConfig, error) {
	c := &fanoutConfig{}
	fs := flag.NewFlagSet("sluice-bench fanout", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench fanout [flags]

Fans one event out to -users users through fanout.Fanout (a list job: Create,
AddRecipients in chunks, Seal, then Status until DONE), wired as sluiced wires
it, and compares the rate with raw JetStream async publish of as many messages
of the same size into a bare file stream on the same server, one subject per
recipient. While the fanout runs, single appends through oplog.Log.Append are
timed next to the same appends on the idle server. Everything runs in this
process on an embedded server in a temporary directory, removed at the end.

flags:`)
		fs.PrintDefaults()
	}
	fs.IntVar(&c.users, "users", 1_000_000, "recipients of the event (and raw messages)")
	fs.IntVar(&c.chunk, "chunk", fanout.DefaultChunkSize, "recipients per AddRecipients call (fanout Config.ChunkSize is raised to match above 1000)")
	fs.IntVar(&c.concurrency, "concurrency", 0, "fanout Config.Concurrency (0: the default, 2, as sluiced's --fanout-concurrency)")
	fs.IntVar(&c.payload, "payload", 256, "payload bytes of the event")
	fs.StringVar(&c.mode, "fsync", fsyncInterval, "fsync mode of the server: interval (the server's default, 2 minutes; oplog atomic batch 0) or always (atomic batch 32, as sluiced)")
	fs.IntVar(&c.latN, "lat-n", 200, "single appends timed when idle, and again while the fanout runs")
	fs.DurationVar(&c.latGap, "lat-gap", 10*time.Millisecond, "interval between the starts of two single appends")
	fs.DurationVar(&c.latDelay, "lat-delay", 2*time.Second, "how long after Create the single appends start")
	fs.DurationVar(&c.poll, "poll", 200*time.Millisecond, "Status polling interval")
	fs.IntVar(&c.maxPending, "max-pending", 4096, "async publish window of the raw publisher (oplog.Log uses 4096)")
	fs.StringVar(&c.transport, "transport", transportInproc, "how the raw publisher reaches the server: inproc (as Sluice's own connection) or tcp (loopback)")
	fs.BoolVar(&c.rawMsgID, "raw-msgid", false, "give every raw message a Nats-Msg-Id, as every fanout entry has one (a diagnostic: the baseline is a bare stream)")
	fs.DurationVar(&c.timeout, "timeout", 20*time.Minute, "abort the whole run after this long")
	fs.BoolVar(&c.verbose, "v", false, "also log the Sluice components' warnings and errors")
	fs.StringVar(&c.cpuprofile, "cpuprofile", "", "write a CPU profile of the fanout phase to this file")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	if c.users < 1 || c.users > 100_000_000 {
		errs = append(errs, errors.New("-users: want 1 to 100000000"))
	}
	if c.chunk < 1 || c.chunk > fanout.MaxChunkSize {
		errs = append(errs, fmt.Errorf("-chunk: want 1 to %d", fanout.MaxChunkSize))
	} else if (c.users+c.chunk-1)/c.chunk > fanout.MaxChunks {
		errs = append(errs, fmt.Errorf("-users/-chunk: at most %d chunks", fanout.MaxChunks))
	}
	if c.concurrency < 0 || c.concurrency > 64 {
		errs = append(errs, errors.New("-concurrency: want 0 to 64"))
	}
	if c.payload < 0 || c.payload > 64<<10 {
		errs = append(errs, errors.New("-payload: want 0 to 65536 bytes (the oplog's default limit)"))
	}
	if c.mode != fsyncInterval && c.mode != fsyncAlways {
		errs = append(errs, fmt.Errorf("-fsync %q: want interval or always", c.mode))
	}
	if c.latN < 1 || c.latN > 100_000 || c.latGap < 0 || c.latDelay < 0 {
		errs = append(errs, errors.New("-lat-n: want 1 to 100000; -lat-gap and -lat-delay not negative"))
	}
	if c.poll < time.Millisecond || c.maxPending < 1 {
		errs = append(errs, errors.New("-poll: want at least 1ms; -max-pending positive"))
	}
	if c.transport != transportTCP && c.transport != transportInproc {
		errs = append(errs, fmt.Errorf("-transport %q: want inproc or tcp", c.transport))
	}
	if c.timeout <= 0 {
		errs = append(errs, errors.New("-timeout must be positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	c.idWidth = len(strconv.Itoa(c.users - 1))
	c.entrySize = proto.Size(&oplogpb.Entry{
		Kind: oplogpb.Kind_KIND_SYNC, Business: benchBusiness, Dimension: oplogpb.Dimension_DIMENSION_USER,
		Target: c.recipient(0), Payload: make([]byte, c.payload), MessageId: fanout.MessageID(fanoutJob),
		CreatedAt: timestamppb.Now(), DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_MULTI,
	})
	return c, nil
}

// recipient is the id of recipient i; all have one length.
func (c *fanoutConfig) recipient(i int) string {
	s := strconv.Itoa(i)
	return "u" + strings.Repeat("0", max(c.idWidth-len(s), 0)) + s
}

// soloUser is the user of the single appends: not a recipient, and as
// long as the recipients' ids.
func (c *fanoutConfig) soloUser(i int) string {
	s := strconv.Itoa(i % 1000)
	return "s" + strings.Repeat("0", max(c.idWidth-len(s), 0)) + s
}

// fanoutResult is what the fanout benchmark measured.
type fanoutResult struct {
	raw        throughput
	rawBytes   float64    // stored bytes per raw message
	fan        throughput // Create until Status said DONE
	projected  time.Duration
	lastChunk  time.Duration // Create until the last chunk marker's finish time
	added      time.Duration // Create until Seal returned
	fanBytes   float64
	polls      int
	idle, busy latency
	busyLate   int // single appends that ended after the fanout's last chunk was written
	streamAdd  uint64
	status     *fanoutpb.Status
}

func (r fanoutResult) ratio() float64 {
	if r.raw.rate() == 0 {
		return 0
	}
	return r.fan.rate() / r.raw.rate()
}

func runFanoutBench(ctx context.Context, args []string, stdout, stderr io.Writer) (err error) {
	cfg, err := parseFanoutFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := progressLogger(stderr).With().Str("bench", "fanout").Logger()
	compLog := zerolog.Nop()
	if cfg.verbose {
		compLog = log.Level(zerolog.WarnLevel)
	}
	dir, err := os.MkdirTemp("", "sluice-bench-fanout-")
	if err != nil {
		return fmt.Errorf("temp dir: %w", err)
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			log.Warn().Err(err).Str("dir", dir).Msg("temp dir not removed")
		}
	}()
	st, sctx, err := startStack(ctx, stackConfig{dir: dir, transport: transportInproc, syncAlways: cfg.mode == fsyncAlways, atomicBatch: -1}, compLog)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	octx, ocancel := context.WithTimeout(sctx, time.Minute)
	defer ocancel()
	chunkSize := 0 // the default, 1,000
	if cfg.chunk > fanout.DefaultChunkSize {
		chunkSize = cfg.chunk
	}
	fan, err := fanout.Open(octx, fanout.Config{Log: st.lg, Inbox: st.inbox, Dir: filepath.Join(dir, "fanout"),
		Concurrency: cfg.concurrency, ChunkSize: chunkSize, Logger: &compLog})
	if err != nil {
		return err
	}
	st.closers = append(st.closers, fan.Close)
	st.g.Go(func() error { return fan.Run(sctx) })

	w := &fanoutReport{out: stdout, cfg: cfg}
	w.header()
	var res fanoutResult
	if res.raw, res.rawBytes, err = rawDistinct(sctx, cfg, st); err != nil {
		return fmt.Errorf("raw baseline: %w", err)
	}
	log.Info().Int("messages", cfg.users).Float64("msg_per_s", res.raw.rate()).Float64("cpu_us_per_msg", res.raw.cpuPer()).Msg("raw publish")
	if res.idle, err = soloLatency(sctx, cfg, st.lg, "idle"); err != nil {
		return fmt.Errorf("idle latency: %w", err)
	}
	log.Info().Dur("p50", res.idle.p50).Dur("p99", res.idle.p99).Msg("single appends, idle")
	if err := runFanoutJob(sctx, cfg, st, fan, &res, log); err != nil {
		return fmt.Errorf("fanout: %w", err)
	}
	w.results(res)
	return nil
}

// rawDistinct publishes cfg.users messages of the entry's size with
// js.PublishAsync into a bare file stream on the stack's server, one
// subject per recipient, and waits for every ack; each must carry a new
// sequence, each sequence once, and the stream must hold them all.
func rawDistinct(ctx context.Context, cfg *fanoutConfig, st *stack) (throughput, float64, error) {
	nc, err := connect(st.ns, cfg.transport, "raw-producer")
	if err != nil {
		return throughput{}, 0, err
	}
	defer closeConn(nc)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(cfg.maxPending))
	if err != nil {
		return throughput{}, 0, fmt.Errorf("jetstream: %w", err)
	}
	stream, err := ensureRawStream(ctx, js)
	if err != nil {
		return throughput{}, 0, err
	}
	before, err := streamState(ctx, stream)
	if err != nil {
		return throughput{}, 0, err
	}
	data := make([]byte, cfg.entrySize)
	for i := range data {
		data[i] = byte(i * 7)
	}
	n := cfg.users
	futs := make([]jetstream.PubAckFuture, 0, n)
	m := startMeter()
	for i := range n {
		if i%4096 == 0 && ctx.Err() != nil {
			return throughput{}, 0, ctx.Err()
		}
		user := cfg.recipient(i)
		msg := &nats.Msg{Subject: rawSubject(user), Data: data}
		if cfg.rawMsgID {
			msg.Header = nats.Header{jetstream.MsgIDHeader: {fanout.MessageID(fanoutJob) + "/" + user}}
		}
		f, err := js.PublishMsgAsync(msg, jetstream.WithStallWait(stallWait))
		if err != nil {
			return throughput{}, 0, fmt.Errorf("publish %d: %w", i, err)
		}
		futs = append(futs, f)
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return throughput{}, 0, fmt.Errorf("waiting for acks (%d pending): %w", js.PublishAsyncPending(), ctx.Err())
	}
	t := m.throughput(n)
	base := before.LastSeq
	seen := make([]bool, n)
	for i, f := range futs {
		select {
		case ack := <-f.Ok():
			if ack.Sequence <= base || ack.Sequence > base+uint64(n) || ack.Duplicate || seen[ack.Sequence-base-1] {
				return t, 0, fmt.Errorf("publish %d: ack %+v, want a new sequence in (%d, %d], once", i, ack, base, base+uint64(n))
			}
			seen[ack.Sequence-base-1] = true
		case err := <-f.Err():
			return t, 0, fmt.Errorf("publish %d: %w", i, err)
		default:
			return t, 0, fmt.Errorf("publish %d: unresolved after PublishAsyncComplete", i)
		}
	}
	after, err := streamState(ctx, stream)
	if err != nil {
		return t, 0, err
	}
	if got, want := after.Msgs, before.Msgs+uint64(n); got != want {
		return t, 0, fmt.Errorf("raw stream holds %d messages, want %d", got, want)
	}
	return t, float64(after.Bytes-before.Bytes) / float64(n), nil
}

// soloLatency times cfg.latN single appends through lg.Append, one at a
// time, each starting cfg.latGap after the previous one started (or when
// it ended, if later). Each appends one entry for a user who is not a
// recipient.
func soloLatency(ctx context.Context, cfg *fanoutConfig, lg *oplog.Log, phase string) (latency, error) {
	payload := make([]byte, cfg.payload)
	ds := make([]time.Duration, 0, cfg.latN)
	start := time.Now()
	next := start
	for i := range cfg.latN {
		if d := time.Until(next); d > 0 {
			pause(ctx, d)
		}
		if err := ctx.Err(); err != nil {
			return latency{}, err
		}
		next = next.Add(cfg.latGap)
		ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: benchBusiness, Targets: []string{cfg.soloUser(i)}, Payload: payload}
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		t0 := time.Now()
		res, err := lg.Append(rctx, ev)
		d := time.Since(t0)
		cancel()
		if err != nil {
			return latency{}, fmt.Errorf("%s append %d: %w", phase, i, err)
		}
		if len(res) != 1 || res[0].Id == 0 || res[0].Duplicate {
			return latency{}, fmt.Errorf("%s append %d: results %v", phase, i, res)
		}
		ds = append(ds, d)
	}
	return summarise(ds, time.Since(start)), nil
}

// runFanoutJob streams the list job, times it, runs the single appends
// while it is under way, and checks the outcome.
func runFanoutJob(ctx context.Context, cfg *fanoutConfig, st *stack, fan *fanout.Fanout, res *fanoutResult, log zerolog.Logger) error {
	stream, err := st.lg.JetStream().Stream(ctx, oplog.StreamOplog(0))
	if err != nil {
		return fmt.Errorf("oplog stream: %w", err)
	}
	before, err := streamState(ctx, stream)
	if err != nil {
		return err
	}
	// The projection's progress, sampled: when it applied the last
	// entry is known only once the last entry's sequence is.
	type sample struct {
		at  time.Time
		seq uint64
	}
	var (
		samples []sample
		smu     sync.Mutex
		swg     sync.WaitGroup // the sampler
		bwg     sync.WaitGroup // the single appends
	)
	sctx, stopSampling := context.WithCancel(ctx)
	stop := func() {
		stopSampling()
		swg.Wait()
	}
	defer func() {
		stop()
		bwg.Wait()
	}()
	swg.Go(func() {
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		var last uint64
		for {
			if seq := st.inbox.LastSeq(0); seq != last {
				last = seq
				smu.Lock()
				samples = append(samples, sample{time.Now(), seq})
				smu.Unlock()
			}
			select {
			case <-t.C:
			case <-sctx.Done():
				return
			}
		}
	})

	payload := make([]byte, cfg.payload)
	for i := range payload {
		payload[i] = byte(i)
	}
	chunks := (cfg.users + cfg.chunk - 1) / cfg.chunk
	if cfg.cpuprofile != "" {
		if err := startCPUProfile(cfg.cpuprofile); err != nil {
			return err
		}
		defer func() { _ = stopCPUProfile() }()
	}
	m := startMeter()
	t0 := m.start
	if _, err := fan.Create(ctx, &fanoutpb.Job{Id: fanoutJob, Audience: &fanoutpb.Job_List{List: &fanoutpb.List{}},
		Event: &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: benchBusiness, Payload: payload}}); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	// The single appends start a while into the fanout.
	var (
		busy    latency
		busyErr error
	)
	bwg.Go(func() {
		pause(ctx, cfg.latDelay-time.Since(t0))
		busy, busyErr = soloLatency(ctx, cfg, st.lg, "busy")
	})
	// The producer: every chunk in turn, then the seal.
	ids := make([]string, 0, cfg.chunk)
	for n := range chunks {
		ids = ids[:0]
		for i := n * cfg.chunk; i < min((n+1)*cfg.chunk, cfg.users); i++ {
			ids = append(ids, cfg.recipient(i))
		}
		actx, cancel := context.WithTimeout(ctx, requestTimeout)
		err := fan.AddRecipients(actx, fanoutJob, n, ids)
		cancel()
		if err != nil {
			return fmt.Errorf("add chunk %d: %w", n, err)
		}
	}
	if _, err := fan.Seal(ctx, fanoutJob, chunks); err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	res.added = time.Since(t0)
	log.Info().Int("chunks", chunks).Dur("took", res.added).Msg("recipients added and job sealed")
	var status *fanoutpb.Status
	lastLog := time.Now()
	for {
		res.polls++
		s, err := fan.Status(ctx, fanoutJob)
		if err != nil {
			return fmt.Errorf("status: %w", err)
		}
		if s.State != fanoutpb.State_STATE_PENDING && s.State != fanoutpb.State_STATE_RUNNING {
			status = s
			break
		}
		if time.Since(lastLog) >= 5*time.Second {
			lastLog = time.Now()
			log.Info().Uint64("done", s.Done).Uint64("total", s.Total).Float64("rate", s.Rate).Msg("fanout under way")
		}
		pause(ctx, cfg.poll)
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	res.fan = m.throughput(cfg.users)
	// Every entry of the job is stored by now: the stream's last sequence
	// bounds them (single appends under way may lie beyond).
	atDone, err := streamState(ctx, stream)
	if err != nil {
		return err
	}
	res.status = status
	if f := status.FinishedAt; f != nil {
		res.lastChunk = f.AsTime().Sub(t0)
	}
	log.Info().Str("state", status.State.String()).Dur("took", res.fan.took).Float64("rate", res.fan.rate()).Msg("fanout ended")
	bwg.Wait() // the single appends: after the fanout if they outlasted it
	if busyErr != nil {
		return busyErr
	}
	res.busy = busy

	// When the projection had applied the job's entries, and everything
	// the job and the single appends stored.
	if err := st.inbox.CatchUp(ctx); err != nil {
		return fmt.Errorf("inbox catch-up: %w", err)
	}
	res.projected = time.Since(t0)
	stop()
	after, err := streamState(ctx, stream)
	if err != nil {
		return err
	}
	smu.Lock()
	for _, s := range samples {
		if s.seq >= atDone.LastSeq {
			res.projected = s.at.Sub(t0)
			break
		}
	}
	smu.Unlock()
	res.streamAdd = after.Msgs - before.Msgs
	res.fanBytes = float64(after.Bytes-before.Bytes) / float64(res.streamAdd)
	res.busyLate = countLate(res.busy, cfg, res.lastChunk)

	var errs []error
	if want := uint64(cfg.users + cfg.latN); res.streamAdd != want {
		errs = append(errs, fmt.Errorf("the oplog stream holds %d entries more than before, want %d (%d recipients + %d single appends)", res.streamAdd, want, cfg.users, cfg.latN))
	}
	if s := status; s.State != fanoutpb.State_STATE_DONE || s.Total != uint64(cfg.users) || s.Done != uint64(cfg.users) || s.Failed != 0 || s.ChunksDone != uint32(chunks) {
		errs = append(errs, fmt.Errorf("status %s total %d done %d failed %d chunks done %d, want DONE %d %d 0 %d (error %q)",
			s.State, s.Total, s.Done, s.Failed, s.ChunksDone, cfg.users, cfg.users, chunks, s.Error))
	}
	return errors.Join(errs...)
}

// countLate estimates how many of the busy single appends ran after the
// fanout's last chunk was written: they started cfg.latDelay after Create,
// about cfg.latGap apart.
func countLate(l latency, cfg *fanoutConfig, lastChunk time.Duration) int {
	if l.n == 0 || lastChunk <= 0 {
		return 0
	}
	end := cfg.latDelay + l.took
	if end <= lastChunk {
		return 0
	}
	if cfg.latDelay >= lastChunk {
		return l.n
	}
	return min(l.n, int(float64(l.n)*float64(end-lastChunk)/float64(l.took))+1)
}

// fanoutReport prints the fanout benchmark's results.
type fanoutReport struct {
	out io.Writer
	cfg *fanoutConfig
}

func (w *fanoutReport) printf(format string, a ...any) { fmt.Fprintf(w.out, format, a...) }

func (w *fanoutReport) header() {
	c := w.cfg
	chunks := (c.users + c.chunk - 1) / c.chunk
	conc := c.concurrency
	if conc == 0 {
		conc = fanout.DefaultConcurrency
	}
	atomicBatch := 0
	fsync := "interval (the server's default: every 2 minutes)"
	if c.mode == fsyncAlways {
		atomicBatch = oplog.DefaultAtomicBatch
		fsync = "always (every write)"
	}
	w.printf("sluice-bench fanout\n")
	w.printf("machine:   %s\n", machineInfo())
	w.printf("fsync:     %s; one embedded server, in this process, in a temporary directory\n", fsync)
	w.printf("fanout:    one list job to %d users: Create, AddRecipients of %d chunks of %d ids (one producer, in turn), Seal, then Status every %v until DONE;\n", c.users, chunks, c.chunk, c.poll)
	w.printf("           fanout.Fanout (Concurrency %d, own Dir) + oplog.Log (atomic batch %d) + Inbox (LocalFeed, SoleWriter), as sluiced wires them\n", conc, atomicBatch)
	msgID := "no headers"
	if c.rawMsgID {
		msgID = "each with a Nats-Msg-Id as the fanout's"
	}
	w.printf("raw:       js.PublishAsync of %d messages into a bare file stream (no RePublish, TTL or consumers) on the same server, one subject per recipient, window %d, %s, %s\n",
		c.users, c.maxPending, transportName(c.transport), msgID)
	w.printf("entry:     payload %d B; stored entry %d B, the size of every raw message (fanout entries also carry a Nats-Msg-Id header: fanout-<job>/<user>)\n", c.payload, c.entrySize)
	w.printf("latency:   %d single appends through oplog.Log.Append (one at a time, starts %v apart, to users outside the list): idle, then from %v after Create while the fanout runs\n\n", c.latN, c.latGap, c.latDelay)
}

func (w *fanoutReport) results(r fanoutResult) {
	c := w.cfg
	w.printf("%-10s %9s %10s %11s %7s %13s %7s %9s\n", "side", "messages", "took s", "msg/s", "ratio", "cpu µs/msg", "cores", "B/msg")
	w.printf("%-10s %9d %10.2f %11.0f %7s %13.1f %7.2f %9.0f\n", "raw", r.raw.n, r.raw.took.Seconds(), r.raw.rate(), "-", r.raw.cpuPer(), r.raw.cores(), r.rawBytes)
	w.printf("%-10s %9d %10.2f %11.0f %6.2fx %13.1f %7.2f %9.0f\n", "fanout", r.fan.n, r.fan.took.Seconds(), r.fan.rate(), r.ratio(), r.fan.cpuPer(), r.fan.cores(), r.fanBytes)
	w.printf("  fanout: Create -> Seal returned %.2f s; -> last chunk written %.2f s; -> Status DONE seen %.2f s (%d polls); -> inbox applied every entry stored by then %.2f s (%.0f/s)\n",
		r.added.Seconds(), r.lastChunk.Seconds(), r.fan.took.Seconds(), r.polls, r.projected.Seconds(), float64(c.users)/r.projected.Seconds())
	other := func(t throughput) string {
		if o := t.otherCores(); o >= 0 {
			return fmt.Sprintf("%.2f", o)
		}
		return "?"
	}
	w.printf("  cpu: this process (server, Sluice, producer) %.1f µs/msg raw, %.1f µs/recipient fanout; other processes kept %s | %s cores busy\n",
		r.raw.cpuPer(), r.fan.cpuPer(), other(r.raw), other(r.fan))

	w.printf("\nsingle-user appends (%d, one at a time, %v apart, through oplog.Log.Append)\n", c.latN, c.latGap)
	w.printf("  %-15s %s\n", "idle", r.idle)
	w.printf("  %-15s %s\n", "during fanout", r.busy)
	if r.idle.p99 > 0 {
		w.printf("  %-15s p50 %.2fx  p99 %.2fx  max %.2fx\n", "during / idle", float64(r.busy.p50)/float64(r.idle.p50), float64(r.busy.p99)/float64(r.idle.p99), float64(r.busy.max)/float64(r.idle.max))
	}
	if r.busyLate > 0 {
		w.printf("  NOTE: about %d of the %d appends ran after the fanout's last chunk was written (the fanout ended first): lower -lat-n or -lat-delay, or raise -users\n", r.busyLate, c.latN)
	}

	s := r.status
	w.printf("\nverify: oplog stream +%d entries (%d recipients + %d single appends during the fanout): OK;\n", r.streamAdd, c.users, c.latN)
	w.printf("        Status %s total %d done %d failed %d, chunks %d of %d done: OK\n", s.State, s.Total, s.Done, s.Failed, s.ChunksDone, s.Chunks)
	w.printf("\nsummary (goal: fanout >= %.1fx raw, each next to the other in this run)\n", goalRatio)
	verdict := "MET"
	if r.ratio() < goalRatio {
		verdict = "NOT MET"
	}
	w.printf("%-8s fanout/raw %.2fx at %d users (%.0f vs %.0f msg/s): goal %s\n", c.mode, r.ratio(), c.users, r.fan.rate(), r.raw.rate(), verdict)
	w.printf("%-8s single appends during the fanout: p50 %s p99 %s (idle p50 %s p99 %s)\n", c.mode, ms(r.busy.p50), ms(r.busy.p99), ms(r.idle.p50), ms(r.idle.p99))
	if o := max(r.raw.otherCores(), r.fan.otherCores()); o > busyThreshold {
		w.printf("WARNING: other processes kept up to %.1f cores busy during a timed phase: rates are depressed and noisy; rerun on a quiet machine\n", o)
	}
}
