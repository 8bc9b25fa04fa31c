package gateway

import (
	"context"
	"errors"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
)

// Analytics stores tracking events (analytics.Ingestor).
type Analytics interface {
	Ingest(ctx context.Context, who analytics.Identity, b *analyticspb.Batch) (*analyticspb.IngestReply, error)
}

// Limits of ingestion over links.
const (
	// maxIngestsPerSession is how many batches of one session may be
	// stored at once; more are refused (UNAVAILABLE: send again later).
	maxIngestsPerSession = 4
	// maxIngests is how many batches a node stores at once.
	maxIngests    = 64
	ingestTimeout = 10 * time.Second
)

// ingest stores a batch of tracking events off the reader's goroutine
// (which may be the poller's, serving every idle link) and answers it with
// an AnalyticsAck when the client asked for them, or a non-fatal Error.
func (ss *session) ingest(e *gatewaypb.ClientEvent) {
	srv := ss.srv
	refuse := func(code gatewaypb.Error_Code, msg string) {
		if ss.analyticsAcks.Load() {
			ss.enqueue(&gatewaypb.Frame{Body: &gatewaypb.Frame_AnalyticsAck{AnalyticsAck: &gatewaypb.AnalyticsAck{
				Batch: e.AnalyticsBatch, Error: &gatewaypb.Error{Code: code, Message: msg}}}})
			return
		}
		ss.enqueue(errorFrame(code, msg, false))
	}
	if srv.cfg.Analytics == nil {
		refuse(gatewaypb.Error_CODE_INVALID, "this node takes no tracking events")
		return
	}
	if ss.ingests.Add(1) > maxIngestsPerSession {
		ss.ingests.Add(-1)
		refuse(gatewaypb.Error_CODE_UNAVAILABLE, "too many batches in flight: send it again later")
		return
	}
	select {
	case srv.ingestSlots <- struct{}{}:
	default:
		ss.ingests.Add(-1)
		refuse(gatewaypb.Error_CODE_UNAVAILABLE, "node busy: send the batch again later")
		return
	}
	ss.mu.Lock()
	who := analytics.Identity{Device: ss.device, User: ss.user}
	ss.mu.Unlock()
	go func() {
		defer func() {
			<-srv.ingestSlots
			ss.ingests.Add(-1)
		}()
		ctx, cancel := context.WithTimeout(context.Background(), ingestTimeout)
		defer cancel()
		reply, err := srv.cfg.Analytics.Ingest(ctx, who, e.Analytics)
		if err != nil {
			code := gatewaypb.Error_CODE_INVALID
			if errors.Is(err, oplog.ErrUnavailable) {
				code = gatewaypb.Error_CODE_UNAVAILABLE
			}
			ss.logAt(zerolog.InfoLevel).Err(err).Msg("tracking batch refused")
			refuse(code, err.Error())
			return
		}
		if ss.analyticsAcks.Load() {
			ss.enqueue(&gatewaypb.Frame{Body: &gatewaypb.Frame_AnalyticsAck{AnalyticsAck: &gatewaypb.AnalyticsAck{
				Batch: e.AnalyticsBatch, Reply: reply}}})
		}
	}()
}
