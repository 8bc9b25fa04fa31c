package main

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// catchResult is the catch-up scenario: Sluice and the raw floor.
type catchResult struct {
	clients int
	backlog int
	sluice  catchSide
	raw     catchSide
}

type catchSide struct {
	runs []catchRun
}

// catchRun is one reconnect of every client at once.
type catchRun struct {
	took     time.Duration // first reconnect until the last client had its whole backlog
	first    time.Duration // until the last client served in its first round had it (0: none was)
	deferred int           // clients whose backlog came in a later round (the server deferred it under load)
	complete int           // clients with exactly their missing entries
	lost     int           // missing entries not received
	dups     int           // entries received more than once
	extra    int           // entries received that were not missing
	cpu      phaseCPU
}

func (s catchSide) tooks() []time.Duration {
	return sortedDurations(s.runs, func(r catchRun) time.Duration { return r.took })
}

func (s catchSide) p50() time.Duration  { return percentile(s.tooks(), 0.5) }
func (s catchSide) p100() time.Duration { return slices.Max(s.tooks()) }

// deferred counts the clients of every run whose backlog came in a later
// round.
func (s catchSide) deferred() int {
	n := 0
	for _, r := range s.runs {
		n += r.deferred
	}
	return n
}

func (s catchSide) totals() (complete, lost, dups, extra int) {
	for _, r := range s.runs {
		complete += r.complete
		lost += r.lost
		dups += r.dups
		extra += r.extra
	}
	return
}

func runCatchup(ctx context.Context, cfg *gatewayConfig, d *dialer, log zerolog.Logger) (catchResult, error) {
	r := catchResult{clients: cfg.catchN, backlog: cfg.backlog}
	var err error
	if r.sluice, err = catchupSluice(ctx, cfg, d, log); err != nil {
		return r, fmt.Errorf("sluice: %w", err)
	}
	if r.raw, err = catchupRaw(ctx, cfg, d, log); err != nil {
		return r, fmt.Errorf("raw: %w", err)
	}
	return r, nil
}

// chunkEvents returns events with the given payload targeting every user,
// at most per targets each.
func chunkEvents(users []string, per int, payload []byte) []*oplogpb.Event {
	var evs []*oplogpb.Event
	for k := 0; k < len(users); k += per {
		evs = append(evs, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: bizUser, Targets: users[k:min(k+per, len(users))], Payload: payload})
	}
	return evs
}

// appendEach appends count events to every user (sent all at once) and
// returns the ids each user got, in order.
func appendEach(ctx context.Context, nc *nats.Conn, users []string, count, payload int) (map[string][]uint64, error) {
	var evs []*oplogpb.Event
	for i := range count {
		p := make([]byte, payload)
		copy(p, strconv.Itoa(i))
		evs = append(evs, chunkEvents(users, 1000, p)...)
	}
	_, _, replies, err := appendAll(ctx, nc, evs)
	if err != nil {
		return nil, err
	}
	ids := make(map[string][]uint64, len(users))
	for _, rep := range replies {
		for _, a := range rep.Results {
			ids[a.Target] = append(ids[a.Target], a.Id)
		}
	}
	for _, u := range users {
		slices.Sort(ids[u])
		if len(ids[u]) != count {
			return nil, fmt.Errorf("user %s got %d ids for %d events", u, len(ids[u]), count)
		}
	}
	return ids, nil
}

// reconnect has every client dial, send hellos[i] and read sync rounds
// until it holds want[i] items or a round ends with nothing deferred, all
// released at once; it returns the links, the items each got and the
// run's timing. A node with more computations in flight than its
// scheduler's OverloadAt (sluiced's --sync-overload) defers buckets of
// priority > 0 and runs another round for those clients after about
// buckets.DefaultDeferFor: their time includes that wait, and the run
// counts them. The links stay open.
func reconnect(ctx context.Context, d *dialer, srv *child, transport string, hellos []*gatewaypb.Frame, want []int) ([]*benchConn, [][]*gatewaypb.Item, catchRun, error) {
	n := len(hellos)
	conns := make([]*benchConn, n)
	items := make([][]*gatewaypb.Item, n)
	took := make([]time.Duration, n)
	rounds := make([]int, n)
	errs := make([]error, n)
	var ready, wg sync.WaitGroup
	start := make(chan struct{})
	var t0 time.Time
	ready.Add(n)
	for i := range n {
		wg.Go(func() {
			ready.Done()
			<-start
			hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
			defer cancel()
			b, err := d.dial(hctx, srv, transport, i)
			if err != nil {
				took[i] = time.Since(t0)
				errs[i] = fmt.Errorf("client %d: dial: %w", i, err)
				return
			}
			conns[i] = b
			items[i], rounds[i], err = b.syncAll(hctx, hellos[i], want[i])
			took[i] = time.Since(t0)
			if err != nil {
				errs[i] = fmt.Errorf("client %d: %w", i, err)
			}
		})
	}
	ready.Wait()
	ph := startPhase(srv)
	t0 = time.Now()
	close(start)
	wg.Wait()
	run := catchRun{took: slices.Max(took), cpu: ph.end()}
	for i, r := range rounds {
		if r > 1 {
			run.deferred++
		} else {
			run.first = max(run.first, took[i])
		}
	}
	return conns, items, run, firstError(errs)
}

// closeAll closes every link.
func closeAll(conns []*benchConn) {
	for _, b := range conns {
		if b != nil {
			b.close()
		}
	}
}

// check counts, for one client, the missing entries it did and did not
// get.
func (r *catchRun) check(got []*gatewaypb.Item, want []uint64) {
	wanted := make(map[uint64]bool, len(want))
	for _, id := range want {
		wanted[id] = false
	}
	matched := 0
	for _, it := range got {
		seen, ok := wanted[it.Id]
		switch {
		case !ok:
			r.extra++
		case seen:
			r.dups++
		default:
			wanted[it.Id] = true
			matched++
		}
	}
	r.lost += len(want) - matched
	if matched == len(want) && len(got) == len(want) {
		r.complete++
	}
}

// catchupSluice: every client connects, gets and acks one entry, and
// leaves; then each run appends the backlog for every user, and every
// client reconnects at once with its sync point.
func catchupSluice(ctx context.Context, cfg *gatewayConfig, d *dialer, log zerolog.Logger) (catchSide, error) {
	var side catchSide
	n := cfg.catchN
	srv, err := startChild(ctx, cfg, modeSluice, "catchup-sluice")
	if err != nil {
		return side, err
	}
	defer srv.stop()
	nc, err := nats.Connect(srv.info.NATS, nats.Name("sluice-bench-producer"), nats.MaxReconnects(0))
	if err != nil {
		return side, fmt.Errorf("connect producer: %w", err)
	}
	defer closeConn(nc)
	if err := waitService(ctx, nc); err != nil {
		return side, err
	}
	users := make([]string, n)
	for i := range users {
		users[i] = userID5(i)
	}
	epoch := srv.info.Epoch
	point := func(id uint64) []*gatewaypb.SyncPoint {
		return []*gatewaypb.SyncPoint{{Business: bizUser, Id: id, Epoch: epoch}}
	}
	// One entry each, received and acked: every client has a sync point.
	first, err := appendEach(ctx, nc, users, 1, cfg.payload)
	if err != nil {
		return side, fmt.Errorf("first entries: %w", err)
	}
	points := make([]uint64, n)
	if err := forEach(ctx, n, cfg.dialPar, func(i int) error {
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		defer cancel()
		b, err := d.dial(hctx, srv, cfg.transport, i)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		defer b.close()
		items, _, err := b.syncAll(hctx, mustHello(d, i, nil), 1)
		if err != nil {
			return err
		}
		if len(items) != 1 || items[0].Id != first[users[i]][0] {
			return fmt.Errorf("first sync round: %d items, want id %d", len(items), first[users[i]][0])
		}
		points[i] = items[0].Id
		return b.ackConfirmed(ctx, point(points[i]))
	}); err != nil {
		return side, fmt.Errorf("first connect: %w", err)
	}
	if err := srv.waitSessions(ctx, 0, 30*time.Second); err != nil {
		return side, err
	}
	for run := range cfg.catchRuns {
		start := time.Now()
		missing, err := appendEach(ctx, nc, users, cfg.backlog, cfg.payload)
		if err != nil {
			return side, fmt.Errorf("run %d: backlog: %w", run+1, err)
		}
		// The projection has applied everything before the clock starts
		// (a backlog read would wait for it otherwise).
		if err := srv.call(ctx, "POST", "/catchup", nil, nil); err != nil {
			return side, err
		}
		log.Info().Int("run", run+1).Int("entries", n*cfg.backlog).Dur("took", time.Since(start)).Msg("backlog appended while the clients were away")
		hellos := make([]*gatewaypb.Frame, n)
		want := make([]int, n)
		for i := range hellos {
			hellos[i] = mustHello(d, i, point(points[i]))
			want[i] = len(missing[users[i]])
		}
		stop, err := srv.profileStart(ctx, cfg, fmt.Sprintf("catchup%d", run+1))
		if err != nil {
			return side, err
		}
		conns, items, res, err := reconnect(ctx, d, srv, cfg.transport, hellos, want)
		if perr := stop(); perr != nil && err == nil {
			err = perr
		}
		if err != nil {
			closeAll(conns)
			return side, fmt.Errorf("run %d: %w", run+1, err)
		}
		for i := range n {
			res.check(items[i], missing[users[i]])
			if len(items[i]) > 0 {
				points[i] = max(points[i], slices.MaxFunc(items[i], func(a, b *gatewaypb.Item) int { return cmp.Compare(a.Id, b.Id) }).Id)
			}
		}
		side.runs = append(side.runs, res)
		log.Info().Int("run", run+1).Dur("all_caught_up", res.took).Int("complete", res.complete).Int("lost", res.lost).Int("deferred", res.deferred).
			Int("dups", res.dups).Dur("server_cpu", res.cpu.server).Msg("sluice catch-up")
		// Untimed: every client acks what it got and leaves.
		err = forEach(ctx, n, cfg.dialPar, func(i int) error { return conns[i].ackConfirmed(ctx, point(points[i])) })
		closeAll(conns)
		if err != nil {
			return side, fmt.Errorf("run %d: ack: %w", run+1, err)
		}
		if err := srv.waitSessions(ctx, 0, 30*time.Second); err != nil {
			return side, err
		}
	}
	return side, srv.alive()
}

// catchupRaw: the raw-broadcast server sends every client that says hello
// a welcome and the backlog's worth of one-item frames from memory.
func catchupRaw(ctx context.Context, cfg *gatewayConfig, d *dialer, log zerolog.Logger) (catchSide, error) {
	var side catchSide
	n := cfg.catchN
	srv, err := startChild(ctx, cfg, modeRaw, "catchup-raw", "-catchup", strconv.Itoa(cfg.backlog))
	if err != nil {
		return side, err
	}
	defer srv.stop()
	want := make([]uint64, cfg.backlog)
	for i := range want {
		want[i] = uint64(i + 1)
	}
	hellos := make([]*gatewaypb.Frame, n)
	wantN := make([]int, n)
	for i := range hellos {
		hellos[i] = mustHello(d, i, nil)
		wantN[i] = cfg.backlog
	}
	for run := range cfg.catchRuns {
		conns, items, res, err := reconnect(ctx, d, srv, transportTCP, hellos, wantN)
		closeAll(conns)
		if err != nil {
			return side, fmt.Errorf("run %d: %w", run+1, err)
		}
		for i := range n {
			res.check(items[i], want)
		}
		side.runs = append(side.runs, res)
		log.Info().Int("run", run+1).Dur("all_caught_up", res.took).Int("complete", res.complete).Dur("server_cpu", res.cpu.server).Msg("raw catch-up")
		if err := srv.waitSessions(ctx, 0, 30*time.Second); err != nil {
			return side, err
		}
	}
	return side, srv.alive()
}

// mustHello builds client i's hello; issuing a token for ids the
// benchmark made up cannot fail.
func mustHello(d *dialer, i int, points []*gatewaypb.SyncPoint) *gatewaypb.Frame {
	h, err := d.hello(i, points)
	if err != nil {
		panic(err)
	}
	return h
}

// forEach runs fn for 0..n-1, par at a time; the first error stops it.
func forEach(ctx context.Context, n, par int, fn func(i int) error) error {
	var next atomic.Int64
	errs := make([]error, par)
	var wg sync.WaitGroup
	for w := range min(par, n) {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(i); err != nil {
					errs[w] = fmt.Errorf("client %d: %w", i, err)
					next.Store(int64(n))
					return
				}
			}
		})
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		return err
	}
	return ctx.Err()
}
