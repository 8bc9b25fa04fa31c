package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// drainWait bounds the wait for deliveries after the last send.
const drainWait = 15 * time.Second

// The raw baseline's stream: file storage on the same server (so fsynced
// on every write, as the oplog), subjects as many as Sluice's users.
const (
	rawLatStream = "BENCH_RAW_LAT"
	rawLatPrefix = "rawlat."
)

// latResult is the latency scenario: Sluice and raw JetStream on the same
// server, at the same rate and payload.
type latResult struct {
	clients  int
	events   int
	rate     int
	duration time.Duration
	inflight int
	sluice   latSide
	raw      latSide
}

// latSide is one side's deliveries.
type latSide struct {
	sent     int
	acked    int
	received int
	dups     int           // receipts of an id a client had already
	lat      latency       // send (stamped in the payload) to receipt
	afterAck latency       // from the append's reply to receipt (negative: the receipt came first)
	req      latency       // producer request (or publish) round trip
	behind   time.Duration // the most a send started after its scheduled time
	cpu      phaseCPU
}

func (s latSide) lost() int { return s.acked - s.received }

// latSink records receipts: the send time is the first 8 bytes of the
// payload (unix nanos, this machine's clock, stamped by this process), the
// event's sequence number the next 8. With the time each append's reply
// came back (acked), a delivery's latency splits into the part until the
// reply and the part after it.
type latSink struct {
	count  atomic.Int64
	acked  []atomic.Int64 // unix nanos the reply of event i came back; 0: not (yet)
	recvAt []atomic.Int64 // unix nanos event i was received; 0: not (yet)
	mu     sync.Mutex
	lats   []time.Duration
	last   []uint64 // highest id per client (Sluice)
	dups   int
}

func newLatSink(clients, events int) *latSink {
	return &latSink{lats: make([]time.Duration, 0, events), last: make([]uint64, clients),
		acked: make([]atomic.Int64, events), recvAt: make([]atomic.Int64, events)}
}

// ack records when event i's append (or publish) was acknowledged.
func (s *latSink) ack(i int, at time.Time) { s.acked[i].Store(at.UnixNano()) }

func (s *latSink) record(client int, id uint64, payload []byte, at time.Time) {
	if len(payload) < 16 {
		return
	}
	d := time.Duration(at.UnixNano() - int64(binary.BigEndian.Uint64(payload)))
	seq := binary.BigEndian.Uint64(payload[8:])
	s.mu.Lock()
	if client >= 0 {
		if id <= s.last[client] {
			s.dups++
			s.mu.Unlock()
			return
		}
		s.last[client] = id
	}
	s.lats = append(s.lats, d)
	s.mu.Unlock()
	if seq < uint64(len(s.recvAt)) {
		s.recvAt[seq].CompareAndSwap(0, at.UnixNano())
	}
	s.count.Add(1)
}

func (s *latSink) onItems(b *benchConn, items []*gatewaypb.Item, at time.Time, _ bool) {
	for _, it := range items {
		s.record(b.idx, it.Id, it.Payload, at)
	}
}

// drain waits until want receipts are in, or drainWait.
func (s *latSink) drain(ctx context.Context, want int) {
	deadline := time.Now().Add(drainWait)
	for int(s.count.Load()) < want && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
}

func (s *latSink) result(side *latSide, took time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	side.received = len(s.lats)
	side.dups = s.dups
	side.lat = summarise(s.lats, took)
	var after []time.Duration
	for i := range s.recvAt {
		if r, a := s.recvAt[i].Load(), s.acked[i].Load(); r != 0 && a != 0 {
			after = append(after, time.Duration(r-a))
		}
	}
	side.afterAck = summarise(after, took)
}

func runLatency(ctx context.Context, cfg *gatewayConfig, d *dialer, log zerolog.Logger) (latResult, error) {
	r := latResult{clients: cfg.latN, events: cfg.latEvents(), rate: cfg.rate, duration: cfg.duration, inflight: cfg.inflight}
	srv, err := startChild(ctx, cfg, modeSluice, "latency")
	if err != nil {
		return r, err
	}
	defer srv.stop()
	if r.raw, err = latencyRaw(ctx, cfg, srv, r); err != nil {
		return r, fmt.Errorf("raw JetStream: %w", err)
	}
	log.Info().Int("sent", r.raw.sent).Int("received", r.raw.received).Dur("p50", r.raw.lat.p50).Dur("p99", r.raw.lat.p99).Msg("raw JetStream latency")
	if r.sluice, err = latencySluice(ctx, cfg, d, srv, r, log); err != nil {
		return r, fmt.Errorf("sluice: %w", err)
	}
	log.Info().Int("sent", r.sluice.sent).Int("received", r.sluice.received).Dur("p50", r.sluice.lat.p50).Dur("p99", r.sluice.lat.p99).Msg("sluice latency")
	return r, srv.alive()
}

// latencySluice connects one client per user, then appends events at the
// configured rate, each to one user in turn, by request/reply.
func latencySluice(ctx context.Context, cfg *gatewayConfig, d *dialer, srv *child, r latResult, log zerolog.Logger) (latSide, error) {
	var side latSide
	sink := newLatSink(r.clients, r.events)
	start := time.Now()
	fl, err := connectFleet(ctx, d, srv, cfg.transport, r.clients, cfg.dialPar, true, sink.onItems)
	if err != nil {
		return side, fmt.Errorf("connect: %w", err)
	}
	defer fl.close()
	log.Info().Int("clients", r.clients).Dur("took", time.Since(start)).Msg("sluice clients online")
	nc, err := nats.Connect(srv.info.NATS, nats.Name("sluice-bench-producer"), nats.MaxReconnects(0))
	if err != nil {
		return side, fmt.Errorf("connect producer: %w", err)
	}
	defer closeConn(nc)
	if err := waitService(ctx, nc); err != nil {
		return side, err
	}
	stop, err := srv.profileStart(ctx, cfg, "latency")
	if err != nil {
		return side, err
	}
	ph := startPhase(srv)
	p, err := pace(ctx, r.events, r.rate, r.inflight, paceLimit(r.duration), func(ctx context.Context, i int) error {
		user := userID5(i % r.clients)
		payload := make([]byte, cfg.payload)
		binary.BigEndian.PutUint64(payload[8:], uint64(i))
		binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
		body, err := proto.Marshal(&oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: bizUser, Targets: []string{user}, Payload: payload})
		if err != nil {
			return err
		}
		m, err := nc.RequestMsgWithContext(ctx, &nats.Msg{Subject: oplog.SubjectAppend, Data: body})
		if err != nil {
			return err
		}
		var rep oplogpb.AppendReply
		if err := proto.Unmarshal(m.Data, &rep); err != nil {
			return fmt.Errorf("reply: %w", err)
		}
		if err := checkReply(user, &rep); err != nil {
			return err
		}
		sink.ack(i, time.Now())
		return nil
	})
	sink.drain(ctx, p.acked)
	side.cpu = ph.end()
	if perr := stop(); perr != nil && err == nil {
		err = perr
	}
	if err != nil {
		return side, err
	}
	side.sent, side.acked, side.req, side.behind = p.sent, p.acked, p.req, p.behind
	sink.result(&side, p.req.took)
	if err := fl.check(); err != nil {
		return side, err
	}
	return side, nil
}

// latencyRaw publishes the same number of same-size messages at the same
// rate with js.Publish into a file stream on the same server, and receives
// them with one ordered consumer.
func latencyRaw(ctx context.Context, cfg *gatewayConfig, srv *child, r latResult) (latSide, error) {
	var side latSide
	pub, err := nats.Connect(srv.info.NATS, nats.Name("raw-producer"), nats.MaxReconnects(0))
	if err != nil {
		return side, err
	}
	defer closeConn(pub)
	sub, err := nats.Connect(srv.info.NATS, nats.Name("raw-consumer"), nats.MaxReconnects(0))
	if err != nil {
		return side, err
	}
	defer closeConn(sub)
	jsPub, err := jetstream.New(pub)
	if err != nil {
		return side, err
	}
	jsSub, err := jetstream.New(sub)
	if err != nil {
		return side, err
	}
	if _, err := jsPub.CreateStream(ctx, jetstream.StreamConfig{Name: rawLatStream, Subjects: []string{rawLatPrefix + ">"},
		Storage: jetstream.FileStorage, Replicas: 1}); err != nil {
		return side, fmt.Errorf("stream: %w", err)
	}
	stream, err := jsSub.Stream(ctx, rawLatStream)
	if err != nil {
		return side, err
	}
	cons, err := stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return side, fmt.Errorf("consumer: %w", err)
	}
	sink := newLatSink(0, r.events)
	cc, err := cons.Consume(func(m jetstream.Msg) { sink.record(-1, 0, m.Data(), time.Now()) })
	if err != nil {
		return side, fmt.Errorf("consume: %w", err)
	}
	defer cc.Stop()
	ph := startPhase(srv)
	p, err := pace(ctx, r.events, r.rate, r.inflight, paceLimit(r.duration), func(ctx context.Context, i int) error {
		payload := make([]byte, cfg.payload)
		binary.BigEndian.PutUint64(payload[8:], uint64(i))
		binary.BigEndian.PutUint64(payload, uint64(time.Now().UnixNano()))
		ack, err := jsPub.Publish(ctx, rawLatPrefix+userID5(i%r.clients), payload)
		if err != nil {
			return err
		}
		if ack.Sequence == 0 || ack.Duplicate {
			return fmt.Errorf("ack %+v", ack)
		}
		sink.ack(i, time.Now())
		return nil
	})
	if err != nil {
		return side, err
	}
	sink.drain(ctx, p.acked)
	side.cpu = ph.end()
	side.sent, side.acked, side.req, side.behind = p.sent, p.acked, p.req, p.behind
	sink.result(&side, p.req.took)
	return side, nil
}

// paced is what pace did.
type paced struct {
	sent, acked int
	req         latency
	behind      time.Duration
}

// paceLimit is how long pace may run for a load of d: sends not started
// by then are skipped, so a server that cannot keep up does not stretch
// the run.
func paceLimit(d time.Duration) time.Duration { return d + d/2 + time.Second }

// pace calls send total times at rate per second, open loop: send i is
// due at start + i/rate, and runs on one of workers goroutines (so at most
// workers are in flight). A send that finds every worker busy starts late;
// behind is the latest start. Sends not started within limit are skipped.
// The first error stops it.
func pace(ctx context.Context, total, rate, workers int, limit time.Duration, send func(ctx context.Context, i int) error) (paced, error) {
	var p paced
	start := time.Now()
	end := start.Add(limit)
	due := func(i int) time.Time {
		return start.Add(time.Duration(float64(i) * float64(time.Second) / float64(rate)))
	}
	tickets := make(chan int)
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }) }
	go func() {
		defer close(tickets)
		for i := range total {
			if d := time.Until(due(i)); d > 0 {
				select {
				case <-time.After(d):
				case <-stop:
					return
				}
			}
			if time.Now().After(end) {
				return
			}
			select {
			case tickets <- i:
			case <-stop:
				return
			case <-time.After(time.Until(end)):
				return
			}
		}
	}()
	lats := make([][]time.Duration, workers)
	behind := make([]time.Duration, workers)
	errs := make([]error, workers)
	var sent atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range tickets {
				t0 := time.Now()
				behind[w] = max(behind[w], t0.Sub(due(i)))
				sent.Add(1)
				rctx, cancel := context.WithTimeout(ctx, requestTimeout)
				err := send(rctx, i)
				cancel()
				if err != nil {
					errs[w] = fmt.Errorf("send %d: %w", i, err)
					halt()
					continue // drain the tickets already handed out
				}
				lats[w] = append(lats[w], time.Since(t0))
			}
		})
	}
	go func() {
		select {
		case <-ctx.Done():
			halt()
		case <-stop:
		}
	}()
	wg.Wait()
	halt()
	took := time.Since(start)
	if err := firstError(errs); err != nil {
		return p, err
	}
	if err := ctx.Err(); err != nil {
		return p, err
	}
	var all []time.Duration
	for w := range workers {
		all = append(all, lats[w]...)
		p.behind = max(p.behind, behind[w])
	}
	p.sent, p.acked = int(sent.Load()), len(all)
	p.req = summarise(all, took)
	return p, nil
}
