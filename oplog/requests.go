package oplog

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// Request/reply APIs.
//
// Every producer and admin API of Sluice (topics, fanout, ...) is NATS
// request/reply with protobuf bodies, or protojson when the request says
// Content-Type: application/json, and typed errors in the reply. Requests
// serves one such API so that each package writes only its handler.

// RequestHandler answers one request. The reply it returns carries the
// typed error, if any, and is sent whatever err is; err is for the log.
// It must not panic on any input.
type RequestHandler func(ctx context.Context, subject, contentType string, body []byte) (reply proto.Message, err error)

// RequestsConfig configures ServeRequests. A zero field takes the default.
type RequestsConfig struct {
	// Conn the API is served on. Required.
	Conn *nats.Conn
	// Subjects served. Required.
	Subjects []string
	// Queue group shared by every node serving the API. Default "sluice-api".
	Queue string
	// Workers is the number of requests handled at once. Default 16.
	Workers int
	// Timeout bounds one request. Default 30 seconds.
	Timeout time.Duration
	// PendingMsgs and PendingBytes bound the requests each subscription
	// holds before the NATS client drops (and reports) them. Default the
	// client's (nats.DefaultSubPendingMsgsLimit, ...BytesLimit).
	PendingMsgs, PendingBytes int
	// Handle answers a request. Required.
	Handle RequestHandler
	// Logger for refusals (one line each) and lost replies.
	Logger zerolog.Logger
}

// ServeRequests serves an API until ctx ends, then unsubscribes and waits
// for the requests under way. It closes ready (if not nil) once every
// subject is subscribed.
func ServeRequests(ctx context.Context, cfg RequestsConfig, ready chan<- struct{}) error {
	if cfg.Queue == "" {
		cfg.Queue = "sluice-api"
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 16
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.PendingMsgs <= 0 {
		cfg.PendingMsgs = nats.DefaultSubPendingMsgsLimit
	}
	if cfg.PendingBytes <= 0 {
		cfg.PendingBytes = nats.DefaultSubPendingBytesLimit
	}
	reqs := make(chan *nats.Msg, 4*cfg.Workers)
	var subs []*nats.Subscription
	unsubscribe := func() {
		for _, sub := range subs {
			_ = sub.Unsubscribe()
		}
	}
	for _, subj := range cfg.Subjects {
		sub, err := cfg.Conn.ChanQueueSubscribe(subj, cfg.Queue, reqs)
		if err != nil {
			unsubscribe()
			return fmt.Errorf("subscribe %s: %w", subj, err)
		}
		_ = sub.SetPendingLimits(cfg.PendingMsgs, cfg.PendingBytes)
		subs = append(subs, sub)
	}
	if err := cfg.Conn.Flush(); err != nil {
		unsubscribe()
		return fmt.Errorf("flush subscriptions: %w", err)
	}
	if ready != nil {
		close(ready)
	}
	var wg sync.WaitGroup
	for range cfg.Workers {
		wg.Go(func() {
			for m := range reqs {
				answer(context.WithoutCancel(ctx), cfg, m)
			}
		})
	}
	<-ctx.Done()
	unsubscribe()
	close(reqs)
	wg.Wait()
	return nil
}

// answer handles one request and sends its reply in the request's
// encoding.
func answer(ctx context.Context, cfg RequestsConfig, m *nats.Msg) {
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	ct := m.Header.Get(HeaderContentType)
	reply, err := cfg.Handle(ctx, m.Subject, ct, m.Data)
	if err != nil {
		switch code := CodeOf(err); code {
		case oplogpb.ErrorCode_ERROR_CODE_INTERNAL, oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE:
			cfg.Logger.Warn().Err(err).Str("subject", m.Subject).Str("code", code.String()).Msg("request failed")
		default:
			cfg.Logger.Info().Err(err).Str("subject", m.Subject).Str("code", code.String()).Msg("request refused")
		}
	}
	if m.Reply == "" || reply == nil {
		return
	}
	data, err := Encode(ct, reply)
	if err != nil {
		cfg.Logger.Error().Err(err).Str("subject", m.Subject).Msg("encode reply")
		return
	}
	out := nats.NewMsg(m.Reply)
	out.Data = data
	if ct == ContentTypeJSON {
		out.Header.Set(HeaderContentType, ContentTypeJSON)
	}
	if err := cfg.Conn.PublishMsg(out); err != nil {
		cfg.Logger.Warn().Err(err).Str("subject", m.Subject).Msg("reply lost")
	}
}
