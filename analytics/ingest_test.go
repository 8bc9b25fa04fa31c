package analytics_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func newIngestor(t *testing.T, now func() time.Time) (*analytics.Ingestor, *oplog.Log) {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	in, err := analytics.Open(ctx(t), analytics.Config{Log: l, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	return in, l
}

func event(id string, typ analyticspb.Type, at time.Time) *analyticspb.Event {
	return &analyticspb.Event{Id: id, Type: typ, TimeMs: at.UnixMilli(), App: "shop", AppVersion: "5.1", Os: "android",
		Model: "Pixel 8", Region: "eu", Network: "wifi", Releases: map[string]string{"shop-h5": "2.0"}, Switches: map[string]string{"dark": "on"}}
}

// stored reads back every event of the stream.
func stored(t *testing.T, l *oplog.Log) []*analyticspb.Event {
	t.Helper()
	s, err := l.JetStream().Stream(ctx(t), analytics.StreamAnalytics)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	var out []*analyticspb.Event
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx(t), seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		ev := &analyticspb.Event{}
		if err := proto.Unmarshal(m.Data, ev); err != nil {
			t.Fatal(err)
		}
		out = append(out, ev)
	}
	return out
}

func TestIngest(t *testing.T) {
	now := time.Now()
	in, l := newIngestor(t, func() time.Time { return now })
	crash := event("e3", analyticspb.Type_TYPE_CRASH, now.Add(-time.Hour))
	crash.Stack = "panic: boom\n\tmain.go:12"
	b := &analyticspb.Batch{Events: []*analyticspb.Event{
		event("e1", analyticspb.Type_TYPE_SESSION_START, now.Add(-2*time.Hour)),
		event("e2", analyticspb.Type_TYPE_PAGE_VIEW, now.Add(-2*time.Hour)),
		crash,
		event("e4", analyticspb.Type_TYPE_CUSTOM, now.Add(time.Hour)), // from the future: clamped
		event("e2", analyticspb.Type_TYPE_PAGE_VIEW, now),             // the same id again: a duplicate
		event("bad id", analyticspb.Type_TYPE_CUSTOM, now),
		event("e5", analyticspb.Type(99), now),
		event("e6", analyticspb.Type_TYPE_CUSTOM, now.Add(-8*24*time.Hour)), // older than the late window
		func() *analyticspb.Event {
			e := event("e7", analyticspb.Type_TYPE_CRASH, now)
			e.Stack = strings.Repeat("x", 40<<10)
			return e
		}(),
		func() *analyticspb.Event { e := event("e8", analyticspb.Type_TYPE_CUSTOM, now); e.App = ""; return e }(),
		func() *analyticspb.Event {
			e := event("e9", analyticspb.Type_TYPE_SESSION_END, now)
			e.DurationMs = -1
			return e
		}(),
	}}
	reply, err := in.Ingest(ctx(t), analytics.Identity{Device: "dev-1", User: "alice"}, b)
	if err != nil {
		t.Fatal(err)
	}
	if reply.Accepted != 4 || reply.Duplicates != 1 || reply.Clamped != 1 || len(reply.Rejected) != 6 {
		t.Fatalf("reply %v: want 4 accepted, 1 duplicate, 1 clamped, 6 rejected", reply)
	}
	wantCodes := []string{"ERROR_CODE_INVALID_ID", "ERROR_CODE_UNKNOWN_KIND", "ERROR_CODE_EXPIRED", "ERROR_CODE_PAYLOAD_TOO_LARGE",
		"ERROR_CODE_INVALID_ID", "ERROR_CODE_INVALID"}
	for i, r := range reply.Rejected {
		if r.Index != uint32(i+5) || r.Code != wantCodes[i] {
			t.Errorf("rejected %d: %v, want index %d code %s", i, r, i+5, wantCodes[i])
		}
	}
	evs := stored(t, l)
	if len(evs) != 4 {
		t.Fatalf("stream holds %d events, want 4", len(evs))
	}
	for _, ev := range evs {
		if ev.Device != "dev-1" || ev.User != "alice" || ev.ReceivedMs != now.UnixMilli() {
			t.Fatalf("stored event %v: device, user and receive time must come from the server", ev)
		}
		if ev.Id == "e4" && ev.TimeMs != now.UnixMilli() {
			t.Fatalf("future event stored at %d, want clamped to %d", ev.TimeMs, now.UnixMilli())
		}
	}
	// The same batch again: everything valid is a duplicate.
	if reply, err = in.Ingest(ctx(t), analytics.Identity{Device: "dev-1", User: "alice"}, b); err != nil || reply.Accepted != 0 || reply.Duplicates != 5 {
		t.Fatalf("retried batch: %v, %v; want 0 accepted, 5 duplicates", reply, err)
	}
	if n := len(stored(t, l)); n != 4 {
		t.Fatalf("stream holds %d events after the retry", n)
	}
	// The same event id from another device is another event.
	if reply, err = in.Ingest(ctx(t), analytics.Identity{Device: "dev-2"}, &analyticspb.Batch{Events: []*analyticspb.Event{
		event("e1", analyticspb.Type_TYPE_SESSION_START, now)}}); err != nil || reply.Accepted != 1 {
		t.Fatalf("same id, another device: %v, %v", reply, err)
	}
	big := &analyticspb.Batch{Events: make([]*analyticspb.Event, analytics.MaxBatchEvents+1)}
	if _, err := in.Ingest(ctx(t), analytics.Identity{Device: "d"}, big); !errors.Is(err, oplog.ErrTooManyTargets) {
		t.Fatalf("oversized batch: %v", err)
	}
}

// deviceAuth accepts "Bearer <device>".
func deviceAuth(r *http.Request) (analytics.Identity, error) {
	dev, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || dev == "" {
		return analytics.Identity{}, errors.New("no token")
	}
	return analytics.Identity{Device: dev}, nil
}

func post(t *testing.T, url string, body []byte, header ...string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

func TestHandler(t *testing.T) {
	now := time.Now()
	in, l := newIngestor(t, func() time.Time { return now })
	srv := httptest.NewServer(in.Handler(deviceAuth))
	defer srv.Close()
	batch := func(prefix string, n int) []byte {
		b := &analyticspb.Batch{}
		for i := range n {
			b.Events = append(b.Events, event(fmt.Sprintf("%s%d", prefix, i), analyticspb.Type_TYPE_PAGE_VIEW, now))
		}
		data, _ := proto.Marshal(b)
		return data
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(batch("g", 20))
	_ = zw.Close()
	enc, _ := zstd.NewWriter(nil)
	zs := enc.EncodeAll(batch("z", 30), nil)
	jsonBatch, _ := protojson.Marshal(&analyticspb.Batch{Events: []*analyticspb.Event{event("j1", analyticspb.Type_TYPE_CUSTOM, now)}})
	bomb := enc.EncodeAll(make([]byte, 20<<20), nil) // 20 MiB of zeros, a few KiB compressed
	for _, c := range []struct {
		name     string
		body     []byte
		header   []string
		status   int
		accepted uint32
		code     string // of a refusal's {"error", "code"}
	}{
		{"protobuf", batch("p", 10), []string{"Authorization", "Bearer d1"}, 200, 10, ""},
		{"gzip", gz.Bytes(), []string{"Authorization", "Bearer d1", "Content-Encoding", "gzip"}, 200, 20, ""},
		{"zstd", zs, []string{"Authorization", "Bearer d1", "Content-Encoding", "zstd"}, 200, 30, ""},
		{"json", jsonBatch, []string{"Authorization", "Bearer d1", "Content-Type", "application/json"}, 200, 1, ""},
		{"no token", batch("x", 1), nil, 401, 0, ""},
		{"malformed", []byte("not a batch \xff\xff"), []string{"Authorization", "Bearer d1"}, 400, 0, "ERROR_CODE_MALFORMED"},
		{"bad gzip", []byte("nope"), []string{"Authorization", "Bearer d1", "Content-Encoding", "gzip"}, 400, 0, "ERROR_CODE_MALFORMED"},
		{"unknown encoding", batch("x", 1), []string{"Authorization", "Bearer d1", "Content-Encoding", "br"}, 400, 0, "ERROR_CODE_MALFORMED"},
		{"too many events", batch("m", analytics.MaxBatchEvents+1), []string{"Authorization", "Bearer d1"}, 400, 0, "ERROR_CODE_TOO_MANY_TARGETS"},
		{"over the body limit", make([]byte, analytics.MaxBodyBytes+1), []string{"Authorization", "Bearer d1"}, 413, 0, "ERROR_CODE_PAYLOAD_TOO_LARGE"},
		{"decompression bomb", bomb, []string{"Authorization", "Bearer d1", "Content-Encoding", "zstd"}, 413, 0, "ERROR_CODE_PAYLOAD_TOO_LARGE"},
	} {
		status, out := post(t, srv.URL, c.body, c.header...)
		if status != c.status {
			t.Errorf("%s: status %d (%s), want %d", c.name, status, bytes.TrimSpace(out), c.status)
			continue
		}
		if status != 200 {
			var refusal struct{ Error, Code string }
			if err := json.Unmarshal(out, &refusal); err != nil || refusal.Error == "" || refusal.Code != c.code {
				t.Errorf("%s: body %s (%v), want {\"error\": ..., \"code\": %q}", c.name, bytes.TrimSpace(out), err, c.code)
			}
			continue
		}
		reply := &analyticspb.IngestReply{}
		if strings.Contains(strings.Join(c.header, " "), "json") {
			err := protojson.Unmarshal(out, reply)
			if err != nil {
				t.Fatal(err)
			}
		} else if err := proto.Unmarshal(out, reply); err != nil {
			t.Fatal(err)
		}
		if reply.Accepted != c.accepted {
			t.Errorf("%s: %v, want %d accepted", c.name, reply, c.accepted)
		}
	}
	if n := len(stored(t, l)); n != 61 {
		t.Fatalf("stream holds %d events, want 61", n)
	}
}

// FuzzReadBatch: no body, compressed or not, makes ReadBatch panic, and
// what it refuses it refuses with a typed error. Seeds: testdata/fuzz/FuzzReadBatch.
func FuzzReadBatch(f *testing.F) {
	b, _ := proto.Marshal(&analyticspb.Batch{Events: []*analyticspb.Event{{Id: "e1", Type: analyticspb.Type_TYPE_CRASH, App: "a", Stack: "x"}}})
	f.Add(b, "")
	enc, _ := zstd.NewWriter(nil)
	f.Add(enc.EncodeAll(b, nil), "zstd")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, _ = zw.Write(b)
	_ = zw.Close()
	f.Add(gz.Bytes(), "gzip")
	f.Fuzz(func(t *testing.T, body []byte, encoding string) {
		for _, asJSON := range []bool{false, true} {
			batch, err := analytics.ReadBatch(bytes.NewReader(body), encoding, asJSON)
			if err != nil {
				if !errors.Is(err, oplog.ErrMalformed) && !errors.Is(err, oplog.ErrPayloadTooLarge) {
					t.Fatalf("untyped error: %v", err)
				}
				continue
			}
			_ = len(batch.GetEvents())
		}
	})
}
