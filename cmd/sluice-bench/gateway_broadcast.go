package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// roundWait bounds one broadcast round: clients that have nothing by then
// count as lost.
const roundWait = 10 * time.Second

// bcastResult is the broadcast scenario: Sluice stored and transient, and
// the raw baseline.
type bcastResult struct {
	clients   int
	events    int // events per round
	targets   int // targets per event
	maxTarget int // the child's oplog Limits.MaxTargets (0: default)
	stored    bcastSide
	transient bcastSide
	raw       bcastSide
}

type bcastSide struct {
	rounds []bcastRound
	stray  int64 // items of no round under way (late from an earlier one)
}

// bcastRound is one message to every client.
type bcastRound struct {
	last  time.Duration // from the first send until the last client had it (roundWait if some never did)
	acked time.Duration // until every append reply was in (raw: the write loop ended)
	got   int           // clients that received it
	dups  int           // receipts beyond the first per client
	cpu   phaseCPU
}

func (s bcastSide) lasts() []time.Duration {
	return sortedDurations(s.rounds, func(r bcastRound) time.Duration { return r.last })
}

func (s bcastSide) p50() time.Duration  { return percentile(s.lasts(), 0.5) }
func (s bcastSide) p100() time.Duration { return slices.Max(s.lasts()) }

func (s bcastSide) lost(clients int) (lost, dups int) {
	for _, r := range s.rounds {
		lost += clients - r.got
		dups += r.dups
	}
	return lost, dups
}

func (s bcastSide) cpu() phaseCPU {
	var sum phaseCPU
	for _, r := range s.rounds {
		sum = sum.add(r.cpu)
	}
	return sum
}

// tracker follows one round: which client got its message when.
type tracker struct {
	tag   uint64
	got   []atomic.Int64 // unix nanos of receipt per client; 0: not yet
	count atomic.Int64
	dups  atomic.Int64
	all   chan struct{}
}

func newTracker(tag uint64, n int) *tracker {
	return &tracker{tag: tag, got: make([]atomic.Int64, n), all: make(chan struct{})}
}

// rounds hands the clients' items to the round under way.
type rounds struct {
	cur   atomic.Pointer[tracker]
	stray atomic.Int64
}

func (rs *rounds) onItems(b *benchConn, items []*gatewaypb.Item, at time.Time, _ bool) {
	tr := rs.cur.Load()
	for _, it := range items {
		if tr == nil || len(it.Payload) < 8 || binary.BigEndian.Uint64(it.Payload) != tr.tag {
			rs.stray.Add(1)
			continue
		}
		if !tr.got[b.idx].CompareAndSwap(0, at.UnixNano()) {
			tr.dups.Add(1)
			continue
		}
		if tr.count.Add(1) == int64(len(tr.got)) {
			close(tr.all)
		}
	}
}

// finish waits for the round's last receipt (or roundWait) and measures it
// from t0.
func (tr *tracker) finish(ctx context.Context, t0 time.Time) (bcastRound, error) {
	select {
	case <-tr.all:
	case <-time.After(roundWait):
	case <-ctx.Done():
		return bcastRound{}, ctx.Err()
	}
	r := bcastRound{got: int(tr.count.Load()), dups: int(tr.dups.Load())}
	var last int64
	for i := range tr.got {
		last = max(last, tr.got[i].Load())
	}
	r.last = time.Duration(last - t0.UnixNano())
	if r.got < len(tr.got) {
		r.last = roundWait
	}
	return r, nil
}

func runBroadcast(ctx context.Context, cfg *gatewayConfig, d *dialer, log zerolog.Logger) (bcastResult, error) {
	n := cfg.bcastN
	tpe := min(cfg.bcastTargets, n)
	r := bcastResult{clients: n, targets: tpe, events: (n + tpe - 1) / tpe}
	if tpe > 1000 {
		r.maxTarget = tpe
	}
	var err error
	if r.stored, r.transient, err = broadcastSluice(ctx, cfg, d, r, log); err != nil {
		return r, err
	}
	if r.raw, err = broadcastRaw(ctx, cfg, d, log); err != nil {
		return r, fmt.Errorf("raw-broadcast: %w", err)
	}
	return r, nil
}

// broadcastSluice runs a warm-up round, then the stored rounds, then the
// transient ones, on one Sluice child with every client online.
func broadcastSluice(ctx context.Context, cfg *gatewayConfig, d *dialer, br bcastResult, log zerolog.Logger) (stored, transient bcastSide, err error) {
	var extra []string
	if br.maxTarget > 0 {
		extra = []string{"-max-targets", strconv.Itoa(br.maxTarget)}
	}
	srv, err := startChild(ctx, cfg, modeSluice, "broadcast-sluice", extra...)
	if err != nil {
		return stored, transient, err
	}
	defer srv.stop()
	var rs rounds
	start := time.Now()
	fl, err := connectFleet(ctx, d, srv, cfg.transport, br.clients, cfg.dialPar, true, rs.onItems)
	if err != nil {
		return stored, transient, fmt.Errorf("connect: %w", err)
	}
	defer fl.close()
	log.Info().Int("clients", br.clients).Dur("took", time.Since(start)).Msg("sluice clients online")
	nc, err := nats.Connect(srv.info.NATS, nats.Name("sluice-bench-producer"), nats.MaxReconnects(0))
	if err != nil {
		return stored, transient, fmt.Errorf("connect producer: %w", err)
	}
	defer closeConn(nc)
	if err := waitService(ctx, nc); err != nil {
		return stored, transient, err
	}
	users := make([]string, br.clients)
	for i := range users {
		users[i] = userID5(i)
	}
	tag := uint64(0)
	round := func(transient bool) (bcastRound, error) {
		tag++
		payload := make([]byte, cfg.payload)
		binary.BigEndian.PutUint64(payload, tag)
		var evs []*oplogpb.Event
		for k := 0; k < br.clients; k += br.targets {
			evs = append(evs, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: bizUser, Targets: users[k:min(k+br.targets, br.clients)],
				Payload: payload, Transient: transient})
		}
		tr := newTracker(tag, br.clients)
		rs.cur.Store(tr)
		ph := startPhase(srv)
		t0, acked, _, err := appendAll(ctx, nc, evs)
		if err != nil {
			return bcastRound{}, err
		}
		res, err := tr.finish(ctx, t0)
		res.acked = acked
		res.cpu = ph.end()
		rs.cur.Store(nil)
		return res, err
	}
	if _, err := round(false); err != nil { // warm-up
		return stored, transient, fmt.Errorf("warm-up round: %w", err)
	}
	for _, tr := range []bool{false, true} {
		side := &stored
		what := "stored"
		if tr {
			side, what = &transient, "transient"
		}
		stop, err := srv.profileStart(ctx, cfg, "broadcast-"+what)
		if err != nil {
			return stored, transient, err
		}
		for i := range cfg.rounds {
			pause(ctx, 200*time.Millisecond)
			res, err := round(tr)
			if err != nil {
				_ = stop()
				return stored, transient, fmt.Errorf("%s round %d: %w", what, i+1, err)
			}
			side.rounds = append(side.rounds, res)
			log.Info().Str("variant", what).Int("round", i+1).Dur("last_client", res.last).Dur("appended", res.acked).
				Int("got", res.got).Int("dups", res.dups).Dur("server_cpu", res.cpu.server).Msg("sluice broadcast")
		}
		if err := stop(); err != nil {
			return stored, transient, err
		}
	}
	stored.stray = rs.stray.Load()
	if err := fl.check(); err != nil {
		return stored, transient, err
	}
	return stored, transient, srv.alive()
}

// appendAll sends every event to sluice.api.v1.append at once (one
// request each, all in flight, encoded beforehand) and returns when every
// reply is in, with the time the first request went out, how long until
// the last reply, and the replies. Each event must be appended for each of
// its targets.
func appendAll(ctx context.Context, nc *nats.Conn, evs []*oplogpb.Event) (time.Time, time.Duration, []*oplogpb.AppendReply, error) {
	bodies := make([][]byte, len(evs))
	for i, ev := range evs {
		b, err := proto.Marshal(ev)
		if err != nil {
			return time.Time{}, 0, nil, err
		}
		bodies[i] = b
	}
	replies := make([]*oplogpb.AppendReply, len(evs))
	errs := make([]error, len(evs))
	start := time.Now()
	var wg sync.WaitGroup
	for i, body := range bodies {
		wg.Go(func() {
			rctx, cancel := context.WithTimeout(ctx, requestTimeout)
			defer cancel()
			m, err := nc.RequestMsgWithContext(rctx, &nats.Msg{Subject: oplog.SubjectAppend, Data: body})
			if err != nil {
				errs[i] = fmt.Errorf("append %d: %w", i, err)
				return
			}
			rep := new(oplogpb.AppendReply)
			if err := proto.Unmarshal(m.Data, rep); err != nil {
				errs[i] = fmt.Errorf("append %d: reply: %w", i, err)
				return
			}
			replies[i] = rep
			switch {
			case rep.Error != nil:
				errs[i] = fmt.Errorf("append %d: refused: %s: %s", i, rep.Error.Code, rep.Error.Message)
			case len(rep.Results) != len(evs[i].Targets):
				errs[i] = fmt.Errorf("append %d: %d results for %d targets", i, len(rep.Results), len(evs[i].Targets))
			}
		})
	}
	wg.Wait()
	return start, time.Since(start), replies, firstError(errs)
}

// broadcastRaw runs the same rounds against the raw-broadcast server.
func broadcastRaw(ctx context.Context, cfg *gatewayConfig, d *dialer, log zerolog.Logger) (bcastSide, error) {
	var side bcastSide
	n := cfg.bcastN
	srv, err := startChild(ctx, cfg, modeRaw, "broadcast-raw")
	if err != nil {
		return side, err
	}
	defer srv.stop()
	var rs rounds
	fl, err := connectFleet(ctx, d, srv, transportTCP, n, cfg.dialPar, true, rs.onItems)
	if err != nil {
		return side, fmt.Errorf("connect: %w", err)
	}
	defer fl.close()
	if err := srv.waitSessions(ctx, n, 30*time.Second); err != nil {
		return side, err
	}
	round := func(tag uint64) (bcastRound, error) {
		tr := newTracker(tag, n)
		rs.cur.Store(tr)
		ph := startPhase(srv)
		t0 := time.Now()
		var rep broadcastReply
		q := url.Values{"round": {strconv.FormatUint(tag, 10)}, "t0": {strconv.FormatInt(t0.UnixNano(), 10)}, "payload": {strconv.Itoa(cfg.payload)}}
		if err := srv.call(ctx, http.MethodPost, "/broadcast", q, &rep); err != nil {
			return bcastRound{}, err
		}
		acked := time.Since(t0)
		if rep.Conns != n || rep.Errors > 0 {
			return bcastRound{}, fmt.Errorf("broadcast reached %d connections with %d errors, want %d", rep.Conns, rep.Errors, n)
		}
		res, err := tr.finish(ctx, t0)
		res.acked = acked
		res.cpu = ph.end()
		rs.cur.Store(nil)
		return res, err
	}
	if _, err := round(1); err != nil {
		return side, fmt.Errorf("warm-up round: %w", err)
	}
	for i := range cfg.rounds {
		pause(ctx, 200*time.Millisecond)
		res, err := round(uint64(i + 2))
		if err != nil {
			return side, fmt.Errorf("round %d: %w", i+1, err)
		}
		side.rounds = append(side.rounds, res)
		log.Info().Str("variant", "raw").Int("round", i+1).Dur("last_client", res.last).Dur("written", res.acked).
			Int("got", res.got).Dur("server_cpu", res.cpu.server).Msg("raw broadcast")
	}
	side.stray = rs.stray.Load()
	if err := fl.check(); err != nil {
		return side, err
	}
	return side, srv.alive()
}

// pause waits d unless ctx ends first.
func pause(ctx context.Context, d time.Duration) {
	select {
	case <-time.After(d):
	case <-ctx.Done():
	}
}
