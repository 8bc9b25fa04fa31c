package oplog

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// ServiceConfig configures a Service. A zero field takes the default.
type ServiceConfig struct {
	// Log is the oplog appended to. Required.
	Log *Log
	// QueueGroup shared by every node serving the API. Default "sluice-api".
	QueueGroup string
	// Router is the durable consumer name of the ingest router, shared by
	// every node. Default "sluice-router".
	Router string
	// Workers is the number of requests handled at once per node. Default 64.
	Workers int
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Service serves producers over NATS: the request/reply append API and
// the router that moves fire-and-forget ingest events into the oplog (or
// the dead-letter stream, with the reason in a header).
type Service struct {
	lg      *Log
	queue   string
	router  string
	workers int
	log     zerolog.Logger
	ready   chan struct{}
}

// NewService validates cfg. Run serves.
func NewService(cfg ServiceConfig) (*Service, error) {
	if cfg.Log == nil {
		return nil, errors.New("oplog: ServiceConfig.Log is required")
	}
	s := &Service{lg: cfg.Log, queue: cfg.QueueGroup, router: cfg.Router, workers: cfg.Workers, log: zerolog.Nop(), ready: make(chan struct{})}
	if s.queue == "" {
		s.queue = "sluice-api"
	}
	if s.router == "" {
		s.router = "sluice-router"
	}
	if s.workers <= 0 {
		s.workers = 64
	}
	if cfg.Logger != nil {
		s.log = cfg.Logger.With().Str("component", "producer-api").Logger()
	}
	return s, nil
}

// Run serves until ctx ends, then drains the subscriptions and waits for
// the requests under way.
func (s *Service) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.route(gctx) })
	g.Go(func() error {
		err := ServeRequests(gctx, RequestsConfig{
			Conn: s.lg.Conn(), Subjects: []string{SubjectAppend, SubjectAppendBatch}, Queue: s.queue,
			Workers: s.workers, Timeout: 10 * time.Second, PendingMsgs: 64 * 1024, PendingBytes: 256 << 20,
			Handle: s.handle, Logger: s.log,
		}, s.ready)
		if err != nil {
			return fmt.Errorf("oplog: %w", err)
		}
		return nil
	})
	return g.Wait()
}

// Ready is closed once the request/reply API is subscribed.
func (s *Service) Ready() <-chan struct{} { return s.ready }

// handle answers one API request. It never panics on input: every decode
// or validation failure becomes a typed error reply (the error return
// stays nil: handleOne and handleBatch log refusals themselves).
func (s *Service) handle(ctx context.Context, subject, ct string, body []byte) (proto.Message, error) {
	if subject == SubjectAppendBatch {
		return s.handleBatch(ctx, ct, body), nil
	}
	return s.handleOne(ctx, ct, body), nil
}

func (s *Service) handleOne(ctx context.Context, ct string, body []byte) *oplogpb.AppendReply {
	ev, err := DecodeEvent(ct, body, s.lg.Limits().MaxBody)
	if err != nil {
		s.log.Info().Err(err).Msg("request refused")
		return &oplogpb.AppendReply{Error: ErrorPB(err)}
	}
	r := s.lg.AppendBatch(ctx, []*oplogpb.Event{ev})[0]
	s.logRefusal(ev, r.Error)
	return r
}

func (s *Service) handleBatch(ctx context.Context, ct string, body []byte) *oplogpb.AppendBatchReply {
	lim := s.lg.Limits()
	b, err := DecodeBatch(ct, body, lim.MaxBody*4)
	if err == nil && len(b.Events) > lim.MaxBatch {
		err = fmt.Errorf("%d events in a batch, limit %d: %w", len(b.Events), lim.MaxBatch, ErrInvalid)
	}
	if err != nil {
		s.log.Info().Err(err).Msg("batch refused")
		return &oplogpb.AppendBatchReply{Error: ErrorPB(err)}
	}
	rs := s.lg.AppendBatch(ctx, b.Events)
	for i, r := range rs {
		s.logRefusal(b.Events[i], r.Error)
	}
	return &oplogpb.AppendBatchReply{Replies: rs}
}

func (s *Service) logRefusal(ev *oplogpb.Event, e *oplogpb.Error) {
	if e == nil {
		return
	}
	s.log.Info().Str("business", clip(ev.GetBusiness())).Str("code", e.Code.String()).Str("reason", e.Message).Msg("event refused")
}

// route runs the ingest router until ctx ends, restarting it with backoff
// when its consumer fails.
func (s *Service) route(ctx context.Context) error {
	retry(ctx, s.log, "ingest router failed", s.routeOnce)
	return nil
}

// routeOnce moves ingest events into the oplog, in ingest order. The
// messages of a batch are acked, in order, only once their entries are
// durable or their refused events are dead letters. At start it resets
// the consumer to its ack floor, so that messages a crashed router had
// received but not acked are redelivered at once and first, rather than
// after the ack wait and behind newer ones. Appends carry a message id
// derived from the producer's (or from the ingest sequence), so a batch
// re-appended after a crash yields its original entries, provided the
// restart comes within the duplicate window.
func (s *Service) routeOnce(ctx context.Context) error {
	js := s.lg.JetStream()
	cons, err := js.CreateOrUpdateConsumer(ctx, StreamIngest, jetstream.ConsumerConfig{
		Durable:       s.router,
		Description:   "Sluice router: ingest events into the oplog",
		AckPolicy:     jetstream.AckExplicitPolicy, // a work queue requires it
		AckWait:       30 * time.Second,
		MaxAckPending: 4096,
		MaxDeliver:    -1,
	})
	if err != nil {
		return fmt.Errorf("oplog: router consumer: %w", err)
	}
	if _, err := js.ResetConsumer(ctx, StreamIngest, s.router); err != nil {
		return fmt.Errorf("oplog: reset router consumer: %w", err)
	}
	msgs := make(chan jetstream.Msg, 1024)
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cc, err := cons.Consume(func(m jetstream.Msg) {
		select {
		case msgs <- m:
		case <-cctx.Done():
		}
	}, jetstream.PullMaxMessages(1024))
	if err != nil {
		return fmt.Errorf("oplog: router consume: %w", err)
	}
	defer cc.Stop()
	batch := make([]jetstream.Msg, 0, 256)
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-msgs:
			batch = append(batch[:0], m)
		drain:
			for len(batch) < cap(batch) {
				select {
				case m := <-msgs:
					batch = append(batch, m)
				default:
					break drain
				}
			}
			if err := s.routeBatch(ctx, batch); err != nil {
				return err
			}
		}
	}
}

// routeBatch appends a batch of ingest messages in order. Refused events
// become dead letters. If an append fails for a reason that may pass, it
// acks what precedes the failure and returns an error: the router then
// restarts from the failed message, keeping ingest order.
func (s *Service) routeBatch(ctx context.Context, batch []jetstream.Msg) error {
	evs := make([]*oplogpb.Event, 0, len(batch))
	idx := make([]int, 0, len(batch)) // batch index of each event
	refused := make(map[int]*oplogpb.Error)
	for i, m := range batch {
		ev, err := DecodeEvent(m.Headers().Get(HeaderContentType), m.Data(), s.lg.Limits().MaxBody)
		if err != nil {
			refused[i] = ErrorPB(err)
			continue
		}
		if ev.MessageId == "" {
			if md, err := m.Metadata(); err == nil {
				ev.MessageId = "ingest-" + strconv.FormatUint(md.Sequence.Stream, 10)
			}
		}
		evs = append(evs, ev)
		idx = append(idx, i)
	}
	failed := len(batch) // index of the first message that must be retried
	if len(evs) > 0 {
		actx, cancel := context.WithTimeout(ctx, 20*time.Second)
		replies := s.lg.AppendBatch(actx, evs)
		cancel()
		for j, r := range replies {
			switch {
			case r.Error == nil:
			case r.Error.Code == oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE || r.Error.Code == oplogpb.ErrorCode_ERROR_CODE_INTERNAL:
				failed = min(failed, idx[j])
			default:
				refused[idx[j]] = r.Error
			}
		}
	}
	for i := 0; i < failed; i++ {
		if e, ok := refused[i]; ok {
			if err := s.deadLetter(ctx, batch[i], e); err != nil {
				failed = i
				break
			}
		}
	}
	if failed > 0 {
		// Acks travel in order on one connection: confirming the last one
		// confirms them all.
		for _, m := range batch[:failed-1] {
			if err := m.Ack(); err != nil {
				return fmt.Errorf("oplog: ack ingest: %w", err)
			}
		}
		if err := batch[failed-1].DoubleAck(ctx); err != nil {
			return fmt.Errorf("oplog: ack ingest: %w", err)
		}
	}
	if failed < len(batch) {
		return fmt.Errorf("oplog: ingest append failed at %s, retrying from there: %w", batch[failed].Subject(), ErrUnavailable)
	}
	return nil
}

// deadLetter stores a refused ingest message in the dead-letter stream
// with its reason. The caller acks the ingest message afterwards.
func (s *Service) deadLetter(ctx context.Context, m jetstream.Msg, e *oplogpb.Error) error {
	dl := nats.NewMsg("sluice.dlq." + e.Code.String())
	dl.Data = m.Data()
	for k, v := range m.Headers() {
		if k != jetstream.MsgIDHeader {
			dl.Header[k] = v
		}
	}
	dl.Header.Set(HeaderError, e.Message)
	dl.Header.Set(HeaderErrorCode, e.Code.String())
	dl.Header.Set("Sluice-Ingest-Subject", m.Subject())
	var opts []jetstream.PublishOpt
	if md, err := m.Metadata(); err == nil {
		opts = append(opts, jetstream.WithMsgID("dlq-"+strconv.FormatUint(md.Sequence.Stream, 10)))
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := s.lg.JetStream().PublishMsg(pctx, dl, opts...); err != nil {
		return fmt.Errorf("oplog: store dead letter: %w", err)
	}
	s.log.Info().Str("code", e.Code.String()).Str("reason", e.Message).Str("subject", m.Subject()).Msg("ingest event dead-lettered")
	return nil
}
