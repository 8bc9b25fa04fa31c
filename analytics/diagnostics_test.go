package analytics_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/encoding/protojson"
)

// diagFixture is Diagnostics on an embedded JetStream, its upload handler
// on an HTTP server whose tokens are "<device>:<user>", and a clock the
// test moves.
type diagFixture struct {
	t     *testing.T
	d     *analytics.Diagnostics
	l     *oplog.Log
	inbox *oplog.Inbox
	srv   *httptest.Server
	skew  atomic.Int64 // added to the real time, in ns
}

func newDiagnostics(t *testing.T, cfg analytics.DiagnosticsConfig) *diagFixture {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	f := &diagFixture{t: t, l: oplogtest.MustOpenLog(t, nc, oplog.Config{})}
	cfg.Log = f.l
	cfg.Now = func() time.Time { return time.Now().Add(time.Duration(f.skew.Load())) }
	var err error
	if f.d, err = analytics.OpenDiagnostics(ctx(t), cfg); err != nil {
		t.Fatal(err)
	}
	f.inbox = oplogtest.MustRunInbox(t, f.l, "")
	f.srv = httptest.NewServer(f.d.UploadHandler(func(r *http.Request) (analytics.Identity, error) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			return analytics.Identity{}, errors.New("no token")
		}
		dev, user, _ := strings.Cut(tok, ":")
		return analytics.Identity{Device: dev, User: user}, nil
	}))
	t.Cleanup(f.srv.Close)
	return f
}

// post sends a device's upload and returns the status and body.
func (f *diagFixture) post(token, path string, body io.Reader) (int, string) {
	f.t.Helper()
	req, err := http.NewRequestWithContext(ctx(f.t), http.MethodPost, f.srv.URL+path, body)
	if err != nil {
		f.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := f.srv.Client().Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(out)
}

func (f *diagFixture) upload(token, id string, logs []byte) (int, string) {
	f.t.Helper()
	return f.post(token, "/v1/diagnostics/"+id+"/logs", bytes.NewReader(logs))
}

func (f *diagFixture) get(id string) *analyticspb.DiagnosticRequest {
	f.t.Helper()
	req, err := f.d.Get(ctx(f.t), id)
	if err != nil {
		f.t.Fatal(err)
	}
	return req
}

// logs downloads what a device uploaded.
func (f *diagFixture) logs(id, device string) ([]byte, *analyticspb.DiagnosticUpload) {
	f.t.Helper()
	r, up, err := f.d.Logs(ctx(f.t), id, device)
	if err != nil {
		f.t.Fatalf("logs of %s for %s: %v", device, id, err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		f.t.Fatal(err)
	}
	return data, up
}

// command waits for the diagnostic command in a device's backlog.
func (f *diagFixture) command(user, device string) (*oplogpb.Entry, *analyticspb.DiagnosticCommand) {
	f.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := f.inbox.Backlog(ctx(f.t), oplog.BacklogRequest{User: user, Device: device,
			Businesses: []string{analytics.BusinessDiagnostics.Code, analytics.BusinessDiagnosticsUser.Code}})
		if err != nil {
			f.t.Fatal(err)
		}
		if len(b.Entries) > 0 {
			e := b.Entries[len(b.Entries)-1]
			cmd := &analyticspb.DiagnosticCommand{}
			if err := protojson.Unmarshal(e.Payload, cmd); err != nil {
				f.t.Fatalf("command payload %s: %v", e.Payload, err)
			}
			return e, cmd
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("no diagnostic command for device %s (user %q)", device, user)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestDiagnosticsDevice: a request to one device is a command entry in
// that device's inbox; the device's upload is stored, the request turns
// UPLOADED with the upload's size and SHA-256, and the download gives the
// same bytes. Another device's upload is refused (403), as are unknown
// requests (404) and missing tokens (401).
func TestDiagnosticsDevice(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{})
	req, err := f.d.Request(ctx(t), analytics.LogRequest{Device: "dev-1", Note: "checkout crash"}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	if got := f.get(req.Id); got.Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_REQUESTED || got.Device != "dev-1" ||
		got.Actor != "ann" || got.Note != "checkout crash" || len(got.Uploads) != 0 {
		t.Fatalf("new request: %v", got)
	}
	e, cmd := f.command("", "dev-1")
	if e.Kind != oplogpb.Kind_KIND_COMMAND || e.Business != "diag" || e.ContentType != analytics.ContentTypeDiagnosticCommand ||
		e.ExpiresAt.AsTime().UnixMilli() != req.ExpiresMs {
		t.Fatalf("command entry: %v", e)
	}
	if cmd.RequestId != req.Id || cmd.UploadUrl != "/v1/diagnostics/"+req.Id+"/logs" || cmd.MaxBytes != analytics.DefaultMaxLogBytes ||
		cmd.ExpiresMs != req.ExpiresMs {
		t.Fatalf("command: %v", cmd)
	}
	if d := time.Until(time.UnixMilli(req.ExpiresMs)); d < analytics.DefaultDiagnosticValidity-time.Minute || d > analytics.DefaultDiagnosticValidity {
		t.Fatalf("validity: expires in %v", d)
	}

	logs := bytes.Repeat([]byte("12:00:01 E checkout: nil cart\n"), 5000) // 150 KB: several chunks
	if status, body := f.upload("dev-2:", req.Id, logs); status != http.StatusForbidden {
		t.Fatalf("another device: %d %s", status, body)
	}
	if status, body := f.upload("", req.Id, logs); status != http.StatusUnauthorized {
		t.Fatalf("no token: %d %s", status, body)
	}
	if status, body := f.upload("dev-1:", "nosuchrequest", logs); status != http.StatusNotFound {
		t.Fatalf("unknown request: %d %s", status, body)
	}
	if status, body := f.upload("dev-1:", req.Id, logs); status != http.StatusOK {
		t.Fatalf("upload: %d %s", status, body)
	}
	got := f.get(req.Id)
	sum := sha256.Sum256(logs)
	if got.Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_UPLOADED || len(got.Uploads) != 1 ||
		got.Uploads[0].Device != "dev-1" || got.Uploads[0].Size != int64(len(logs)) || !bytes.Equal(got.Uploads[0].Sha256, sum[:]) {
		t.Fatalf("after the upload: %v", got)
	}
	data, up := f.logs(req.Id, "dev-1")
	if !bytes.Equal(data, logs) || !bytes.Equal(up.Sha256, sum[:]) {
		t.Fatalf("download: %d bytes, sha %x; uploaded %d bytes, sha %x", len(data), up.Sha256, len(logs), sum)
	}
	if _, _, err := f.d.Logs(ctx(t), req.Id, "dev-2"); !errors.Is(err, oplog.ErrNotFound) {
		t.Fatalf("logs of a device that sent none: %v", err)
	}
	list, err := f.d.List(ctx(t), 10)
	if err != nil || len(list) != 1 || list[0].Id != req.Id || list[0].Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_UPLOADED {
		t.Fatalf("list: %v %v", list, err)
	}
}

// TestDiagnosticsReplace: a device that uploads again replaces its
// upload, and the earlier object is deleted.
func TestDiagnosticsReplace(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{})
	req, err := f.d.Request(ctx(t), analytics.LogRequest{Device: "dev-1"}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	if status, body := f.upload("dev-1:", req.Id, []byte("first")); status != http.StatusOK {
		t.Fatalf("upload: %d %s", status, body)
	}
	first := f.get(req.Id).Uploads[0].Object
	if status, body := f.upload("dev-1:", req.Id, []byte("second, longer")); status != http.StatusOK {
		t.Fatalf("upload again: %d %s", status, body)
	}
	got := f.get(req.Id)
	if len(got.Uploads) != 1 || got.Uploads[0].Object == first || got.Uploads[0].Size != int64(len("second, longer")) {
		t.Fatalf("after the second upload: %v", got)
	}
	if data, _ := f.logs(req.Id, "dev-1"); string(data) != "second, longer" {
		t.Fatalf("download: %q", data)
	}
	obs, err := f.l.JetStream().ObjectStore(ctx(t), analytics.BucketDiagnostics)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := obs.GetInfo(ctx(t), first); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("the replaced object %s: %v, want deleted", first, err)
	}
}

// failingReader fails the test if the handler reads the body.
type failingReader struct{ t *testing.T }

func (r failingReader) Read([]byte) (int, error) {
	r.t.Error("the body was read")
	return 0, io.ErrUnexpectedEOF
}

// TestDiagnosticsTooLarge: a Content-Length over MaxLogBytes is refused
// (413) before the body is read; a longer body without a length is cut
// and refused, and nothing is recorded.
func TestDiagnosticsTooLarge(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{MaxLogBytes: 1000})
	req, err := f.d.Request(ctx(t), analytics.LogRequest{Device: "dev-1"}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	h := f.d.UploadHandler(func(*http.Request) (analytics.Identity, error) { return analytics.Identity{Device: "dev-1"}, nil })
	r := httptest.NewRequest(http.MethodPost, "/v1/diagnostics/"+req.Id+"/logs", failingReader{t})
	r.ContentLength = 1001
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusRequestEntityTooLarge {
		t.Fatalf("Content-Length 1001: %d %s", w.Code, w.Body)
	}
	// Chunked: no length announced.
	pr, pw := io.Pipe()
	go func() {
		_, _ = pw.Write(bytes.Repeat([]byte("x"), 1500))
		_ = pw.Close()
	}()
	if status, body := f.post("dev-1:", "/v1/diagnostics/"+req.Id+"/logs", pr); status != http.StatusRequestEntityTooLarge {
		t.Fatalf("1500 bytes unannounced: %d %s", status, body)
	}
	if got := f.get(req.Id); len(got.Uploads) != 0 || got.Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_REQUESTED {
		t.Fatalf("after refused uploads: %v", got)
	}
	// At the limit it fits.
	if status, body := f.upload("dev-1:", req.Id, bytes.Repeat([]byte("y"), 1000)); status != http.StatusOK {
		t.Fatalf("1000 bytes: %d %s", status, body)
	}
}

// TestDiagnosticsExpired: past its validity a request takes no upload
// (410) and reads as EXPIRED; one with logs stays UPLOADED.
func TestDiagnosticsExpired(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{})
	waiting, err := f.d.Request(ctx(t), analytics.LogRequest{Device: "dev-1", Validity: time.Hour}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	done, err := f.d.Request(ctx(t), analytics.LogRequest{Device: "dev-1", Validity: time.Hour}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	if status, body := f.upload("dev-1:", done.Id, []byte("logs")); status != http.StatusOK {
		t.Fatalf("upload: %d %s", status, body)
	}
	f.skew.Store(int64(time.Hour + time.Second))
	if status, body := f.upload("dev-1:", waiting.Id, []byte("logs")); status != http.StatusGone {
		t.Fatalf("upload after the validity: %d %s", status, body)
	}
	if got := f.get(waiting.Id).Status; got != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_EXPIRED {
		t.Fatalf("waiting request: %v", got)
	}
	if got := f.get(done.Id).Status; got != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_UPLOADED {
		t.Fatalf("request with logs: %v", got)
	}
	list, err := f.d.List(ctx(t), 0)
	if err != nil || len(list) != 2 {
		t.Fatalf("list: %v %v", list, err)
	}
	for _, r := range list {
		if (r.Id == waiting.Id) != (r.Status == analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_EXPIRED) {
			t.Errorf("listed %s: %v", r.Id, r.Status)
		}
	}
}

// TestDiagnosticsUser: a request to a user reaches every device of the
// user; two devices upload at once, both uploads are recorded (the
// compare-and-set retries), each download gives that device's bytes, and
// a device of another user is refused.
func TestDiagnosticsUser(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{})
	req, err := f.d.Request(ctx(t), analytics.LogRequest{User: "bob"}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{"phone", "tablet"} {
		if e, cmd := f.command("bob", dev); e.Business != "diag-user" || cmd.RequestId != req.Id {
			t.Fatalf("%s: command %v %v", dev, e, cmd)
		}
	}
	if status, body := f.upload("laptop:eve", req.Id, []byte("x")); status != http.StatusForbidden {
		t.Fatalf("another user's device: %d %s", status, body)
	}
	if status, body := f.upload("laptop:", req.Id, []byte("x")); status != http.StatusForbidden {
		t.Fatalf("a device without a user: %d %s", status, body)
	}
	logs := map[string][]byte{}
	for i, dev := range []string{"phone", "tablet", "watch", "tv"} {
		logs[dev] = bytes.Repeat([]byte(fmt.Sprintf("%s log line %d\n", dev, i)), 100*(i+1))
	}
	var wg sync.WaitGroup
	for dev, data := range logs {
		wg.Go(func() {
			if status, body := f.upload(dev+":bob", req.Id, data); status != http.StatusOK {
				t.Errorf("%s: upload: %d %s", dev, status, body)
			}
		})
	}
	wg.Wait()
	got := f.get(req.Id)
	if got.Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_UPLOADED || len(got.Uploads) != len(logs) {
		t.Fatalf("after %d uploads: %v", len(logs), got)
	}
	for dev, want := range logs {
		if data, _ := f.logs(req.Id, dev); !bytes.Equal(data, want) {
			t.Errorf("%s: downloaded %d bytes, uploaded %d", dev, len(data), len(want))
		}
	}
}

// TestDiagnosticsFailure: a device's failure report makes the request
// FAILED; logs uploaded later make it UPLOADED, and a failure reported
// after logs changes nothing.
func TestDiagnosticsFailure(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{})
	req, err := f.d.Request(ctx(t), analytics.LogRequest{Device: "dev-1"}, "ann")
	if err != nil {
		t.Fatal(err)
	}
	path := "/v1/diagnostics/" + req.Id + "/failure"
	if status, body := f.post("dev-1:", path, strings.NewReader("disk full")); status != http.StatusNoContent {
		t.Fatalf("failure: %d %s", status, body)
	}
	got := f.get(req.Id)
	if got.Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_FAILED || len(got.Uploads) != 1 || got.Uploads[0].Error != "disk full" {
		t.Fatalf("after the failure: %v", got)
	}
	if status, body := f.upload("dev-1:", req.Id, []byte("logs")); status != http.StatusOK {
		t.Fatalf("upload: %d %s", status, body)
	}
	if status, body := f.post("dev-1:", path, strings.NewReader("again")); status != http.StatusNoContent {
		t.Fatalf("failure after logs: %d %s", status, body)
	}
	got = f.get(req.Id)
	if got.Status != analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_UPLOADED || len(got.Uploads) != 1 || got.Uploads[0].Error != "" ||
		got.Uploads[0].Size != 4 {
		t.Fatalf("after logs and a late failure: %v", got)
	}
}

// TestDiagnosticsRequestInvalid: a request names a device or a user, with
// valid ids, a short note and a validity within the retention.
func TestDiagnosticsRequestInvalid(t *testing.T) {
	f := newDiagnostics(t, analytics.DiagnosticsConfig{Retention: 48 * time.Hour})
	for _, tc := range []struct {
		name string
		lr   analytics.LogRequest
		want error
	}{
		{"neither", analytics.LogRequest{}, oplog.ErrInvalid},
		{"both", analytics.LogRequest{Device: "d", User: "u"}, oplog.ErrInvalid},
		{"bad id", analytics.LogRequest{Device: "a.b"}, oplog.ErrInvalidID},
		{"long note", analytics.LogRequest{Device: "d", Note: strings.Repeat("n", analytics.MaxNoteLen+1)}, oplog.ErrInvalid},
		{"validity over retention", analytics.LogRequest{Device: "d", Validity: 49 * time.Hour}, oplog.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := f.d.Request(ctx(t), tc.lr, "ann"); !errors.Is(err, tc.want) {
				t.Fatalf("Request(%+v) = %v, want %v", tc.lr, err, tc.want)
			}
		})
	}
	if list, err := f.d.List(ctx(t), 0); err != nil || len(list) != 0 {
		t.Fatalf("refused requests listed: %v %v", list, err)
	}
}
