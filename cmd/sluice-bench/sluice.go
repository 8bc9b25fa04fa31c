package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// requestTimeout bounds every producer request.
const requestTimeout = 30 * time.Second

type sluiceResult struct {
	runs        []sluiceRun
	sluiceRun   // the median run, by end-to-end rate
	bytesPerMsg float64
	lat         latency
}

// sluiceRun is one timed run of the producer path.
type sluiceRun struct {
	e2e   throughput    // first send until every reply is in and the inbox has applied the last id
	acked throughput    // first send until every reply is in
	lag   time.Duration // from the last reply until the inbox had applied the last id
}

// runSluice measures Sluice's producer path for one scenario under dir.
func runSluice(ctx context.Context, cfg *oplogConfig, sc scenario, dir string, log, compLog zerolog.Logger) (res sluiceResult, err error) {
	if cfg.prefill {
		start := time.Now()
		if err := prefillSluice(ctx, cfg, sc, dir, compLog); err != nil {
			return res, fmt.Errorf("prefill: %w", err)
		}
		log.Info().Dur("took", time.Since(start)).Msg("sluice oplog and inbox prefilled")
	}
	st, sctx, err := startStack(ctx, stackConfig{dir: dir, transport: cfg.sluiceConn, syncAlways: sc.mode == fsyncAlways, service: true, atomicBatch: -1}, compLog)
	if err != nil {
		return res, err
	}
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if err := st.inbox.CatchUp(sctx); err != nil {
		return res, fmt.Errorf("inbox catch-up before the run: %w", err)
	}
	nc, err := connect(st.ns, cfg.transport, "sluice-producer")
	if err != nil {
		return res, err
	}
	defer closeConn(nc)
	if err := waitService(sctx, nc); err != nil {
		return res, err
	}
	stream, err := st.lg.JetStream().Stream(sctx, oplog.StreamOplog(0))
	if err != nil {
		return res, fmt.Errorf("oplog stream: %w", err)
	}
	stop, err := profile(cfg, sc, "sluice")
	if err != nil {
		return res, err
	}
	var bytes uint64
	for run := range cfg.runs {
		before, err := streamState(sctx, stream)
		if err != nil {
			return res, err
		}
		r, err := sluiceThroughput(sctx, cfg, sc, nc, st.inbox, run, before.LastSeq)
		if err != nil {
			_ = stop()
			return res, fmt.Errorf("run %d: %w", run+1, err)
		}
		after, err := streamState(sctx, stream)
		if err != nil {
			return res, err
		}
		if got, want := after.Msgs, before.Msgs+uint64(sc.n); got != want {
			return res, fmt.Errorf("run %d: oplog stream holds %d entries, want %d", run+1, got, want)
		}
		bytes += after.Bytes - before.Bytes
		res.runs = append(res.runs, r)
		log.Info().Int("run", run+1).Int("events", sc.n).Float64("events_per_s", r.e2e.rate()).Float64("cpu_us_per_event", r.e2e.cpuPer()).Float64("cores", r.e2e.cores()).Float64("other_cores", r.e2e.otherCores()).Dur("projection_lag", r.lag).Msg("sluice throughput")
	}
	if err := stop(); err != nil {
		return res, err
	}
	res.sluiceRun = median(res.runs, func(r sluiceRun) float64 { return r.e2e.rate() })
	res.bytesPerMsg = float64(bytes) / float64(sc.n*cfg.runs)

	if cfg.latN > 0 {
		if res.lat, err = sluiceLatency(sctx, cfg, sc, nc); err != nil {
			return res, err
		}
	}
	return res, nil
}

// waitService waits until the producer API answers (the service subscribes
// in its own goroutine): an empty batch writes nothing and gets an empty
// reply.
func waitService(ctx context.Context, nc *nats.Conn) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		m, err := nc.RequestWithContext(rctx, oplog.SubjectAppendBatch, nil)
		cancel()
		if err == nil {
			var r oplogpb.AppendBatchReply
			if err := proto.Unmarshal(m.Data, &r); err != nil {
				return fmt.Errorf("producer api probe: %w", err)
			}
			if r.Error != nil {
				return fmt.Errorf("producer api probe: %s: %s", r.Error.Code, r.Error.Message)
			}
			return nil
		}
		if !errors.Is(err, nats.ErrNoResponders) || time.Now().After(deadline) {
			return fmt.Errorf("producer api not answering: %w", err)
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// prefillSluice appends one entry for every user through oplog.Log on a
// server without fsync, waits until the inbox holds them all, then stops
// everything: the timed run reopens the same directories.
func prefillSluice(ctx context.Context, cfg *oplogConfig, sc scenario, dir string, compLog zerolog.Logger) (err error) {
	st, sctx, err := startStack(ctx, stackConfig{dir: dir, transport: cfg.sluiceConn, atomicBatch: -1}, compLog)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	const chunk = 1000
	chunks := (sc.users + chunk - 1) / chunk
	payload := make([]byte, cfg.payload)
	var next atomic.Int64
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for w := range errs {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= chunks || sctx.Err() != nil {
					return
				}
				lo, hi := k*chunk, min((k+1)*chunk, sc.users)
				evs := make([]*oplogpb.Event, 0, hi-lo)
				for u := lo; u < hi; u++ {
					evs = append(evs, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: benchBusiness, Targets: []string{userID(cfg, u)}, Payload: payload})
				}
				for i, r := range st.lg.AppendBatch(sctx, evs) {
					if r.Error != nil {
						errs[w] = fmt.Errorf("event for user %d: %s: %s", lo+i, r.Error.Code, r.Error.Message)
						next.Store(int64(chunks))
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := st.inbox.CatchUp(sctx); err != nil {
		return fmt.Errorf("inbox catch-up: %w", err)
	}
	stream, err := st.lg.JetStream().Stream(sctx, oplog.StreamOplog(0))
	if err != nil {
		return fmt.Errorf("oplog stream: %w", err)
	}
	if got := stream.CachedInfo().State.Msgs; got != uint64(sc.users) {
		return fmt.Errorf("oplog stream holds %d entries after prefill, want %d", got, sc.users)
	}
	return nil
}

// sluiceThroughput sends sc.n events in batch requests, cfg.inflight at a
// time, checks every reply, and waits until the inbox has applied them.
// Every entry must get a new id in (base, base+n], each id once.
func sluiceThroughput(ctx context.Context, cfg *oplogConfig, sc scenario, nc *nats.Conn, inbox *oplog.Inbox, run int, base uint64) (sluiceRun, error) {
	var res sluiceRun
	batches := (sc.n + cfg.batch - 1) / cfg.batch
	var next atomic.Int64
	ids := make([][]uint64, cfg.inflight)
	errs := make([]error, cfg.inflight)
	var wg sync.WaitGroup
	m := startMeter()
	for w := range cfg.inflight {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(3+run), uint64(w)))
			payload := make([]byte, cfg.payload)
			for i := range payload {
				payload[i] = byte(rng.Uint32())
			}
			evs := make([]*oplogpb.Event, cfg.batch)
			for i := range evs {
				evs[i] = &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: benchBusiness, Targets: []string{""}, Payload: payload}
			}
			fail := func(err error) {
				errs[w] = err
				next.Store(int64(batches)) // stop the others
			}
			for {
				k := int(next.Add(1)) - 1
				if k >= batches || ctx.Err() != nil {
					return
				}
				lo, hi := k*cfg.batch, min((k+1)*cfg.batch, sc.n)
				batch := &oplogpb.EventBatch{Events: evs[:hi-lo]}
				for j, ev := range batch.Events {
					ev.Targets[0] = userID(cfg, rng.IntN(sc.users))
					if cfg.msgID {
						ev.MessageId = messageID("t", run, lo+j)
					}
				}
				body, err := proto.Marshal(batch)
				if err != nil {
					fail(fmt.Errorf("marshal batch %d: %w", k, err))
					return
				}
				msg := nats.NewMsg(oplog.SubjectAppendBatch)
				msg.Data = body
				rctx, cancel := context.WithTimeout(ctx, requestTimeout)
				m, err := nc.RequestMsgWithContext(rctx, msg)
				cancel()
				if err != nil {
					fail(fmt.Errorf("batch %d: request: %w", k, err))
					return
				}
				var r oplogpb.AppendBatchReply
				if err := proto.Unmarshal(m.Data, &r); err != nil {
					fail(fmt.Errorf("batch %d: reply: %w", k, err))
					return
				}
				if err := checkBatchReply(batch, &r, &ids[w]); err != nil {
					fail(fmt.Errorf("batch %d: %w", k, err))
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return res, err
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.acked = m.throughput(sc.n)
	if err := inbox.CatchUp(ctx); err != nil {
		return res, fmt.Errorf("inbox catch-up: %w", err)
	}
	res.e2e = m.throughput(sc.n)
	res.lag = res.e2e.took - res.acked.took

	seen := make([]bool, sc.n)
	count := 0
	for _, ws := range ids {
		for _, id := range ws {
			if id <= base || id > base+uint64(sc.n) {
				return res, fmt.Errorf("id %d outside (%d, %d]", id, base, base+uint64(sc.n))
			}
			if seen[id-base-1] {
				return res, fmt.Errorf("id %d given twice", id)
			}
			seen[id-base-1] = true
			count++
		}
	}
	if count != sc.n {
		return res, fmt.Errorf("%d ids for %d events", count, sc.n)
	}
	return res, nil
}

// checkBatchReply checks that every event of batch was appended once for
// its one target, and collects the ids.
func checkBatchReply(batch *oplogpb.EventBatch, r *oplogpb.AppendBatchReply, ids *[]uint64) error {
	if r.Error != nil {
		return fmt.Errorf("refused: %s: %s", r.Error.Code, r.Error.Message)
	}
	if len(r.Replies) != len(batch.Events) {
		return fmt.Errorf("%d replies for %d events", len(r.Replies), len(batch.Events))
	}
	for j, rep := range r.Replies {
		if err := checkReply(batch.Events[j].Targets[0], rep); err != nil {
			return fmt.Errorf("event %d: %w", j, err)
		}
		*ids = append(*ids, rep.Results[0].Id)
	}
	return nil
}

func checkReply(target string, rep *oplogpb.AppendReply) error {
	if rep.Error != nil {
		return fmt.Errorf("refused: %s: %s", rep.Error.Code, rep.Error.Message)
	}
	if len(rep.Results) != 1 {
		return fmt.Errorf("%d results for one target", len(rep.Results))
	}
	if a := rep.Results[0]; a.Target != target || a.Id == 0 || a.Duplicate {
		return fmt.Errorf("result %v for target %s", a, target)
	}
	return nil
}

// sluiceLatency times cfg.latN single-event requests, cfg.latInflight at a
// time.
func sluiceLatency(ctx context.Context, cfg *oplogConfig, sc scenario, nc *nats.Conn) (latency, error) {
	payload := make([]byte, cfg.payload)
	return measureLatency(ctx, cfg, sc, func(ctx context.Context, w, i int, user string) error {
		ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: benchBusiness, Targets: []string{user}, Payload: payload}
		if cfg.msgID {
			ev.MessageId = messageID("l", w, i)
		}
		body, err := proto.Marshal(ev)
		if err != nil {
			return fmt.Errorf("marshal: %w", err)
		}
		msg := nats.NewMsg(oplog.SubjectAppend)
		msg.Data = body
		m, err := nc.RequestMsgWithContext(ctx, msg)
		if err != nil {
			return err
		}
		var r oplogpb.AppendReply
		if err := proto.Unmarshal(m.Data, &r); err != nil {
			return fmt.Errorf("reply: %w", err)
		}
		return checkReply(user, &r)
	})
}
