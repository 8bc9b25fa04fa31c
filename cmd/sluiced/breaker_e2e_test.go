package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"google.golang.org/protobuf/proto"
)

// TestCircuitBreakerEndToEnd runs sluiced with three apps online on a
// gray release: a breaker rule is set through the admin API, apps upload
// a synthetic crash spike over HTTP, the breaker pauses the release, and
// the online apps are told (version 1 again) within seconds; the trip
// records its evidence.
func TestCircuitBreakerEndToEnd(t *testing.T) {
	d, addr := newTestDaemon(t, "--fsync", "interval")
	if _, err := d.start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	apps := newAppFleet(t, ctx, d, addr)
	do := func(method, path, body string) {
		t.Helper()
		if _, err := d.request(ctx, method, path, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range []string{"1", "2"} {
		do(http.MethodPost, "/v1/packages/shop/versions?kind=h5&version="+v, "bundle "+v)
	}
	do(http.MethodPost, "/v1/packages/shop/1/gray", `{"percent": 100}`)
	do(http.MethodPost, "/v1/packages/shop/1/full", ``)
	do(http.MethodPost, "/v1/packages/shop/2/gray", `{"percent": 100}`)
	var online []*e2eDevice
	for i := range 3 {
		online = append(online, apps.connect(fmt.Sprint("app-", i), "android"))
	}
	defer func() {
		for _, dv := range online {
			apps.stop(dv)
		}
	}()
	apps.waitAll("gray", time.Now(), online, func(*e2eDevice) string { return "2" })
	do(http.MethodPut, "/v1/breakers/shop-crashes", `{"app": "shop", "package": "shop", "version": "2",
		"metric": "METRIC_CRASH_RATE", "threshold": 0.2, "min_sessions": 20, "window_ms": 600000, "action": "ACTION_PAUSE"}`)

	// 25 devices on version 2 start a session; 10 crash: 40%.
	upload := func(device string, evs ...*analyticspb.Event) {
		t.Helper()
		body, _ := proto.Marshal(&analyticspb.Batch{Events: evs})
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr(2)+"/v1/analytics", bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+apps.token(device))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(resp.Body)
		reply := &analyticspb.IngestReply{}
		if resp.StatusCode != http.StatusOK || proto.Unmarshal(out, reply) != nil || int(reply.Accepted) != len(evs) {
			t.Fatalf("upload: %d %s", resp.StatusCode, out)
		}
	}
	now := time.Now().UnixMilli()
	rel := map[string]string{"shop": "2"}
	for i := range 25 {
		evs := []*analyticspb.Event{{Id: "s", Type: analyticspb.Type_TYPE_SESSION_START, App: "shop", TimeMs: now, Releases: rel}}
		if i < 10 {
			evs = append(evs, &analyticspb.Event{Id: "c", Type: analyticspb.Type_TYPE_CRASH, App: "shop", TimeMs: now, Releases: rel, Stack: "panic"})
		}
		upload(fmt.Sprint("crashy-", i), evs...)
	}
	start := time.Now()
	took := apps.waitAll("paused by the breaker", start, online, func(*e2eDevice) string { return "1" })
	t.Logf("the crash spike paused the release; every online app told in %v after the last upload", took)
	var got struct {
		Trips []struct {
			Rule     string  `json:"rule"`
			Sessions string  `json:"sessions"`
			Affected string  `json:"affected"`
			Rate     float64 `json:"rate"`
			Result   string  `json:"result"`
		} `json:"trips"`
	}
	if err := d.doJSON(ctx, http.MethodGet, "/v1/breakers", &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Trips) != 1 || got.Trips[0].Sessions != "25" || got.Trips[0].Affected != "10" || got.Trips[0].Result != "done" {
		b, _ := json.Marshal(got)
		t.Fatalf("trips: %s", b)
	}
}
