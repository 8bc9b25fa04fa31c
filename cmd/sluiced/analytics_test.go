package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway"
	"google.golang.org/protobuf/proto"
)

// TestAnalyticsUpload: sluiced serves tracking uploads on the gateway's
// HTTP listener, behind the device token, answers once they are stored,
// and the admin API reports them aggregated.
func TestAnalyticsUpload(t *testing.T) {
	d, addr := newTestDaemon(t)
	if _, err := d.start(); err != nil {
		t.Fatal(err)
	}
	key, err := gateway.LoadOrCreateKey(filepath.Join(d.data, tokenKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	tok, err := gateway.NewSigner(key).Issue(gateway.Claims{Device: "dev-1", User: "ann", App: "shop", Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	batch, _ := proto.Marshal(&analyticspb.Batch{Events: []*analyticspb.Event{
		{Id: "s1", Type: analyticspb.Type_TYPE_SESSION_START, App: "shop", TimeMs: time.Now().UnixMilli()},
		{Id: "c1", Type: analyticspb.Type_TYPE_CRASH, App: "shop", Stack: "panic", TimeMs: time.Now().UnixMilli()},
	}})
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(batch)
	_ = zw.Close()
	upload := func(token string) (int, *analyticspb.IngestReply) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+addr(2)+"/v1/analytics", bytes.NewReader(gz.Bytes()))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Encoding", "gzip")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		reply := &analyticspb.IngestReply{}
		if resp.StatusCode == http.StatusOK {
			if err := proto.Unmarshal(body, reply); err != nil {
				t.Fatal(err)
			}
		}
		return resp.StatusCode, reply
	}
	if status, reply := upload(tok); status != http.StatusOK || reply.Accepted != 2 {
		t.Fatalf("upload: %d %v", status, reply)
	}
	if status, reply := upload(tok); status != http.StatusOK || reply.Duplicates != 2 {
		t.Fatalf("the same batch again: %d %v", status, reply)
	}
	if status, _ := upload("not-a-token"); status != http.StatusUnauthorized {
		t.Fatalf("bad token: %d", status)
	}
	// The admin API answers with the aggregates.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var got struct {
		Counters map[string]uint64 `json:"counters"`
	}
	today := time.Now().UTC().Format("20060102")
	if err := d.doJSON(ctx, http.MethodGet, "/v1/analytics/shop/periods/"+today, &got); err != nil {
		t.Fatal(err)
	}
	if got.Counters["dau"] != 1 || got.Counters["crashes@"] != 1 || got.Counters["sessions@"] != 1 {
		t.Fatalf("counters of today: %v", got.Counters)
	}
}
