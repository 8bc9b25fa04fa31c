package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
)

// The raw baseline: a bare stream (file storage, no RePublish, no TTL, no
// consumers) and a producer publishing same-size messages straight into it.
const (
	rawStream = "RAW"
	// rawPrefix has the length of "sluice" so raw subjects are as long as
	// Sluice's.
	rawPrefix = "raw_js"
	// stallWait bounds how long a raw async publish waits for a free slot
	// in the window before failing.
	stallWait = 30 * time.Second
)

func rawSubject(user string) string { return rawPrefix + ".oplog.0.u." + user + "." + benchBusiness }

type rawResult struct {
	runs        []throughput
	tput        throughput // the median run
	bytesPerMsg float64
	lat         latency
}

// runRaw measures the baseline of one scenario under dir.
func runRaw(ctx context.Context, cfg *oplogConfig, sc scenario, dir string, log zerolog.Logger) (rawResult, error) {
	var res rawResult
	natsDir := filepath.Join(dir, "nats")
	if cfg.prefill {
		start := time.Now()
		if err := prefillRaw(ctx, cfg, sc, natsDir); err != nil {
			return res, fmt.Errorf("prefill: %w", err)
		}
		log.Info().Dur("took", time.Since(start)).Msg("raw stream prefilled")
	}
	ns, err := startNATS(natsDir, sc.mode == fsyncAlways)
	if err != nil {
		return res, err
	}
	defer stopNATS(ns)
	nc, err := connect(ns, cfg.transport, "raw-producer")
	if err != nil {
		return res, err
	}
	defer closeConn(nc)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(cfg.maxPending))
	if err != nil {
		return res, fmt.Errorf("jetstream: %w", err)
	}
	stream, err := ensureRawStream(ctx, js)
	if err != nil {
		return res, err
	}
	stop, err := profile(cfg, sc, "raw")
	if err != nil {
		return res, err
	}
	var bytes uint64
	for run := range cfg.runs {
		before, err := streamState(ctx, stream)
		if err != nil {
			return res, err
		}
		t, err := rawThroughput(ctx, cfg, sc, js, run, before.LastSeq)
		if err != nil {
			_ = stop()
			return res, fmt.Errorf("run %d: %w", run+1, err)
		}
		after, err := streamState(ctx, stream)
		if err != nil {
			return res, err
		}
		if got, want := after.Msgs, before.Msgs+uint64(sc.n); got != want {
			return res, fmt.Errorf("run %d: raw stream holds %d messages, want %d", run+1, got, want)
		}
		bytes += after.Bytes - before.Bytes
		res.runs = append(res.runs, t)
		log.Info().Int("run", run+1).Int("events", sc.n).Float64("msg_per_s", t.rate()).Float64("cpu_us_per_msg", t.cpuPer()).Float64("cores", t.cores()).Float64("other_cores", t.otherCores()).Msg("raw throughput")
	}
	if err := stop(); err != nil {
		return res, err
	}
	res.tput = median(res.runs, func(t throughput) float64 { return t.rate() })
	res.bytesPerMsg = float64(bytes) / float64(sc.n*cfg.runs)

	if cfg.latN > 0 {
		if res.lat, err = rawLatency(ctx, cfg, sc, js); err != nil {
			return res, err
		}
	}
	return res, nil
}

func streamState(ctx context.Context, s jetstream.Stream) (jetstream.StreamState, error) {
	info, err := s.Info(ctx)
	if err != nil {
		return jetstream.StreamState{}, fmt.Errorf("stream info: %w", err)
	}
	return info.State, nil
}

func ensureRawStream(ctx context.Context, js jetstream.JetStream) (jetstream.Stream, error) {
	s, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
		Name:     rawStream,
		Subjects: []string{rawPrefix + ".>"},
		Storage:  jetstream.FileStorage,
		Replicas: 1,
	})
	if err != nil {
		return nil, fmt.Errorf("raw stream: %w", err)
	}
	return s, nil
}

// prefillRaw stores one message for every user, on a server without
// fsync, then stops it.
func prefillRaw(ctx context.Context, cfg *oplogConfig, sc scenario, dir string) error {
	ns, err := startNATS(dir, false)
	if err != nil {
		return err
	}
	defer stopNATS(ns)
	nc, err := connect(ns, transportInproc, "raw-prefill")
	if err != nil {
		return err
	}
	defer closeConn(nc)
	var failed atomic.Int64
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096),
		jetstream.WithPublishAsyncErrHandler(func(jetstream.JetStream, *nats.Msg, error) { failed.Add(1) }))
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	stream, err := ensureRawStream(ctx, js)
	if err != nil {
		return err
	}
	data := make([]byte, cfg.entrySize)
	for i := range sc.users {
		if i%4096 == 0 && ctx.Err() != nil {
			return ctx.Err()
		}
		if _, err := js.PublishAsync(rawSubject(userID(cfg, i)), data, jetstream.WithStallWait(stallWait)); err != nil {
			return fmt.Errorf("publish %d: %w", i, err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return ctx.Err()
	}
	if n := failed.Load(); n > 0 {
		return fmt.Errorf("%d prefill publishes failed", n)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return fmt.Errorf("stream info: %w", err)
	}
	if info.State.Msgs != uint64(sc.users) {
		return fmt.Errorf("raw stream holds %d messages after prefill, want %d", info.State.Msgs, sc.users)
	}
	return nil
}

// rawThroughput publishes sc.n messages asynchronously from one goroutine
// and waits for every ack; each ack must carry a new sequence after base,
// each sequence once.
func rawThroughput(ctx context.Context, cfg *oplogConfig, sc scenario, js jetstream.JetStream, run int, base uint64) (throughput, error) {
	rng := rand.New(rand.NewPCG(1, uint64(run)))
	data := make([]byte, cfg.entrySize)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	futs := make([]jetstream.PubAckFuture, 0, sc.n)
	opts := []jetstream.PublishOpt{jetstream.WithStallWait(stallWait)}
	m := startMeter()
	for i := range sc.n {
		if i%4096 == 0 && ctx.Err() != nil {
			return throughput{}, ctx.Err()
		}
		u := rng.IntN(sc.users)
		o := opts
		if cfg.msgID {
			o = append(opts[:1:1], jetstream.WithMsgID(messageID("t", run, i)+"/"+userID(cfg, u)))
		}
		f, err := js.PublishAsync(rawSubject(userID(cfg, u)), data, o...)
		if err != nil {
			return throughput{}, fmt.Errorf("publish %d: %w", i, err)
		}
		futs = append(futs, f)
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		return throughput{}, fmt.Errorf("waiting for acks (%d pending): %w", js.PublishAsyncPending(), ctx.Err())
	}
	t := m.throughput(sc.n)
	seen := make([]bool, sc.n)
	for i, f := range futs {
		select {
		case ack := <-f.Ok():
			if ack.Sequence <= base || ack.Sequence > base+uint64(sc.n) || ack.Duplicate {
				return throughput{}, fmt.Errorf("publish %d: ack %+v, want a new sequence in (%d, %d]", i, ack, base, base+uint64(sc.n))
			}
			if seen[ack.Sequence-base-1] {
				return throughput{}, fmt.Errorf("publish %d: sequence %d acked twice", i, ack.Sequence)
			}
			seen[ack.Sequence-base-1] = true
		case err := <-f.Err():
			return throughput{}, fmt.Errorf("publish %d: %w", i, err)
		default:
			return throughput{}, fmt.Errorf("publish %d: unresolved after PublishAsyncComplete", i)
		}
	}
	return t, nil
}

// rawLatency times cfg.latN synchronous publishes, cfg.latInflight at a
// time.
func rawLatency(ctx context.Context, cfg *oplogConfig, sc scenario, js jetstream.JetStream) (latency, error) {
	data := make([]byte, cfg.entrySize)
	return measureLatency(ctx, cfg, sc, func(ctx context.Context, w, i int, user string) error {
		var opts []jetstream.PublishOpt
		if cfg.msgID {
			opts = append(opts, jetstream.WithMsgID(messageID("l", w, i)+"/"+user))
		}
		ack, err := js.Publish(ctx, rawSubject(user), data, opts...)
		if err != nil {
			return err
		}
		if ack.Sequence == 0 || ack.Duplicate {
			return fmt.Errorf("ack %+v", ack)
		}
		return nil
	})
}

// measureLatency runs cfg.latN calls of do, cfg.latInflight at a time, to
// uniformly random users, and summarises their latencies. Any error stops
// it.
func measureLatency(ctx context.Context, cfg *oplogConfig, sc scenario, do func(ctx context.Context, w, i int, user string) error) (latency, error) {
	var next atomic.Int64
	lats := make([][]time.Duration, cfg.latInflight)
	errs := make([]error, cfg.latInflight)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range cfg.latInflight {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(2, uint64(w)))
			for {
				i := int(next.Add(1)) - 1
				if i >= cfg.latN || ctx.Err() != nil {
					return
				}
				user := userID(cfg, rng.IntN(sc.users))
				rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				t0 := time.Now()
				err := do(rctx, w, i, user)
				d := time.Since(t0)
				cancel()
				if err != nil {
					errs[w] = fmt.Errorf("request %d: %w", i, err)
					next.Store(int64(cfg.latN)) // stop the others
					return
				}
				lats[w] = append(lats[w], d)
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return latency{}, fmt.Errorf("latency: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return latency{}, fmt.Errorf("latency: %w", err)
	}
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	return summarise(all, took), nil
}
