package gateway_test

import (
	"context"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
)

// lateAnalytics forwards to an Ingestor set after the server started.
type lateAnalytics struct {
	ready chan struct{}
	in    *analytics.Ingestor
}

func (l *lateAnalytics) Ingest(ctx context.Context, who analytics.Identity, b *analyticspb.Batch) (*analyticspb.IngestReply, error) {
	<-l.ready
	return l.in.Ingest(ctx, who, b)
}

// TestAnalyticsOverTheLink: tracking events sent in a ClientEvent are
// stored with the session's device and user and answered with an
// AnalyticsAck naming the batch; the same batch again is all duplicates.
func TestAnalyticsOverTheLink(t *testing.T) {
	hook := &lateAnalytics{ready: make(chan struct{})}
	e := newEnv(t, func(c *gateway.Config) { c.Analytics = hook })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	in, err := analytics.Open(ctx, analytics.Config{Log: e.l})
	if err != nil {
		t.Fatal(err)
	}
	hook.in = in
	close(hook.ready)

	c := e.dialTCP()
	h := hello(e.token("u1", "dev-1", time.Hour))
	h.GetHello().Analytics = true
	c.send(h)
	c.syncAll()
	batch := &analyticspb.Batch{Events: []*analyticspb.Event{
		{Id: "a1", Type: analyticspb.Type_TYPE_SESSION_START, App: "shop", TimeMs: time.Now().UnixMilli()},
		{Id: "a2", Type: analyticspb.Type_TYPE_PAGE_VIEW, App: "shop", Page: "home", TimeMs: time.Now().UnixMilli()},
		{Id: "bad id", Type: analyticspb.Type_TYPE_CUSTOM, App: "shop"},
	}}
	ack := func(n uint64) *gatewaypb.AnalyticsAck {
		t.Helper()
		c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Analytics: batch, AnalyticsBatch: n}}})
		for {
			f := c.must(5 * time.Second)
			if a := f.GetAnalyticsAck(); a != nil {
				return a
			}
		}
	}
	a := ack(7)
	if a.Batch != 7 || a.Error != nil || a.Reply.GetAccepted() != 2 || len(a.Reply.GetRejected()) != 1 {
		t.Fatalf("ack %v: want batch 7, 2 accepted, 1 rejected", a)
	}
	if a = ack(8); a.Batch != 8 || a.Reply.GetDuplicates() != 2 {
		t.Fatalf("the same events again: %v", a)
	}
}
