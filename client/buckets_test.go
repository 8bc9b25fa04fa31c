package client_test

import (
	"context"
	"testing"
	"time"

	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/client"
)

// TestDeferredBuckets: a round that defers a rate-limited bucket lists it
// in its done frame; the client asks again after retry_after_ms and gets
// the bucket's items then (not live meanwhile).
func TestDeferredBuckets(t *testing.T) {
	noLeaks(t)
	e := newEnv(t).withBuckets()
	ctx := context.Background()
	// One computation a second: the round after the Hello's is deferred.
	if err := e.bm.Define(ctx, &bucketspb.Bucket{Name: "slow", Priority: 5, Rate: 1, Burst: 1}); err != nil {
		t.Fatal(err)
	}
	if err := e.bm.Assign(ctx, "config", "slow"); err != nil {
		t.Fatal(err)
	}
	n := e.node(nil)
	d1 := e.append("config", "vphone")
	rec := newRecorder()
	r := start(t, client.Config{URL: n.ws, Token: tokens(e.token("", "vphone")), StateDir: t.TempDir()},
		func(c *client.Client) { c.HandleDefault(rec.handle) })
	rec.waitIDs(t, "config", d1)
	waitFor(t, "first round", func() bool { return r.Stats().Rounds == 1 })

	if err := r.Foreground(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "deferral", func() bool { return r.Stats().Deferrals == 1 })
	appended := time.Now()
	d2 := e.append("config", "vphone")
	rec.waitIDs(t, "config", d1, d2)
	// Not live: it came with a round after the retry.
	if d := time.Since(appended); d < 200*time.Millisecond {
		t.Fatalf("deferred bucket's item after %v, want it after the retry", d)
	}
	st := r.Stats()
	if st.Rounds < 3 || st.Deferrals != 1 {
		t.Fatalf("stats %+v", st)
	}
	// The server also runs a round by itself, 1.25 retry_after_ms after a
	// deferral: when it wins the client's retry is cancelled.
	t.Logf("%d deferral retries, %d rounds; item after %v", st.DeferRetries, st.Rounds, time.Since(appended).Round(time.Millisecond))
}
