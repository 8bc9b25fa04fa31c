package client

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"google.golang.org/protobuf/encoding/protojson"
)

// fakeUploads records diagnostic posts and answers them with the next
// status of a script (200 when it runs out).
type fakeUploads struct {
	mu     sync.Mutex
	script []int
	posts  []fakePost
}

type fakePost struct {
	path, token, contentType string
	body                     []byte
}

func (f *fakeUploads) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	f.mu.Lock()
	f.posts = append(f.posts, fakePost{r.URL.Path, r.Header.Get("Authorization"), r.Header.Get("Content-Type"), body})
	status := http.StatusOK
	if len(f.script) > 0 {
		status, f.script = f.script[0], f.script[1:]
	}
	f.mu.Unlock()
	w.WriteHeader(status)
}

func (f *fakeUploads) got() []fakePost {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fakePost(nil), f.posts...)
}

// newDiagnosticClient is a client (never run) whose HTTP base is a fake
// upload server.
func newDiagnosticClient(t *testing.T, script ...int) (*Client, *fakeUploads) {
	t.Helper()
	f := &fakeUploads{script: script}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	c, err := New(Config{URL: "ws://127.0.0.1:1/v1/ws", HTTPBase: srv.URL, StateDir: t.TempDir(),
		Token: func(context.Context) (string, error) { return "tok-1", nil }})
	if err != nil {
		t.Fatal(err)
	}
	old := diagnosticRetryWait
	diagnosticRetryWait = time.Millisecond
	t.Cleanup(func() { diagnosticRetryWait = old })
	return c, f
}

// commandItem is a command item as the server's analytics package writes
// it (analyticspb.DiagnosticCommand in protojson with proto names).
func commandItem(t *testing.T, id string, maxBytes int64, expires time.Time) *Item {
	t.Helper()
	payload, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(&analyticspb.DiagnosticCommand{
		RequestId: id, UploadUrl: "/v1/diagnostics/" + id + "/logs", MaxBytes: maxBytes, ExpiresMs: expires.UnixMilli()})
	if err != nil {
		t.Fatal(err)
	}
	return &Item{Id: 7, Business: BusinessDiagnostics, Kind: 5, Payload: payload, ContentType: ContentTypeDiagnosticCommand,
		ExpiresMs: expires.UnixMilli()}
}

// TestDiagnose: the handler decodes the server's command, calls the
// collector with the request id and uploads its bytes with the token;
// it retries 503s, stops at a refusal for good, cuts logs over max_bytes
// to their end, reports a collector's failure, and fails (so the item
// comes again) when every try failed before the validity ended.
func TestDiagnose(t *testing.T) {
	ctx := context.Background()
	in := time.Now().Add(time.Hour)
	for _, tc := range []struct {
		name      string
		script    []int
		maxBytes  int64
		logs      string
		collect   error
		wantErr   bool
		wantPosts int
		wantPath  string
		wantBody  string
	}{
		{name: "stored", maxBytes: 100, logs: "log lines", wantPosts: 1, wantPath: "/v1/diagnostics/r1/logs", wantBody: "log lines"},
		{name: "retried", script: []int{503, 502}, maxBytes: 100, logs: "log lines", wantPosts: 3, wantPath: "/v1/diagnostics/r1/logs", wantBody: "log lines"},
		{name: "gone", script: []int{410}, maxBytes: 100, logs: "log lines", wantPosts: 1, wantPath: "/v1/diagnostics/r1/logs", wantBody: "log lines"},
		{name: "cut", maxBytes: 4, logs: "old new!", wantPosts: 1, wantPath: "/v1/diagnostics/r1/logs", wantBody: "new!"},
		{name: "collector failed", maxBytes: 100, collect: errors.New("disk full"), wantPosts: 1, wantPath: "/v1/diagnostics/r1/failure", wantBody: "disk full"},
		{name: "tries run out", script: []int{503, 503, 503, 503}, maxBytes: 100, logs: "x", wantErr: true, wantPosts: 4, wantPath: "/v1/diagnostics/r1/logs", wantBody: "x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, f := newDiagnosticClient(t, tc.script...)
			var asked []string
			err := c.diagnose(ctx, commandItem(t, "r1", tc.maxBytes, in), func(_ context.Context, id string) ([]byte, error) {
				asked = append(asked, id)
				return []byte(tc.logs), tc.collect
			})
			if (err != nil) != tc.wantErr {
				t.Fatalf("diagnose = %v, want error %v", err, tc.wantErr)
			}
			if len(asked) != 1 || asked[0] != "r1" {
				t.Fatalf("collector asked for %v, want [r1]", asked)
			}
			posts := f.got()
			if len(posts) != tc.wantPosts {
				t.Fatalf("%d posts, want %d", len(posts), tc.wantPosts)
			}
			for _, p := range posts {
				if p.path != tc.wantPath || p.token != "Bearer tok-1" || string(p.body) != tc.wantBody {
					t.Fatalf("post %s %q %q, want %s with the token and %q", p.path, p.token, p.body, tc.wantPath, tc.wantBody)
				}
			}
		})
	}
}

// TestDiagnoseExpired: no retry outlives the command's validity, and an
// expired command is processed (nil), not failed.
func TestDiagnoseExpired(t *testing.T) {
	c, f := newDiagnosticClient(t, 503, 503, 503, 503)
	diagnosticRetryWait = time.Hour
	start := time.Now()
	err := c.diagnose(context.Background(), commandItem(t, "r1", 100, time.Now().Add(50*time.Millisecond)),
		func(context.Context, string) ([]byte, error) { return []byte("x"), nil })
	if err != nil || len(f.got()) != 1 || time.Since(start) > 10*time.Second {
		t.Fatalf("diagnose = %v after %d posts, %v", err, len(f.got()), time.Since(start))
	}
}

// TestDiagnoseUnreadable: a command that does not decode is dropped
// (nil) without calling the collector.
func TestDiagnoseUnreadable(t *testing.T) {
	c, f := newDiagnosticClient(t)
	for _, payload := range []string{`{`, `{"request_id": "r1"}`, `{"request_id": "r1", "upload_url": "/x", "max_bytes": "many"}`} {
		it := &Item{Id: 1, Business: BusinessDiagnostics, Payload: []byte(payload)}
		err := c.diagnose(context.Background(), it, func(context.Context, string) ([]byte, error) {
			t.Errorf("%s: collector called", payload)
			return nil, nil
		})
		if err != nil {
			t.Errorf("%s: %v", payload, err)
		}
	}
	if n := len(f.got()); n != 0 {
		t.Fatalf("%d posts", n)
	}
}

func TestUploadURL(t *testing.T) {
	for _, tc := range []struct {
		ref, want string
		token     bool
		bad       bool
	}{
		{ref: "/v1/diagnostics/r/logs", want: "http://gw:7481/v1/diagnostics/r/logs", token: true},
		{ref: "http://gw:7481/x", want: "http://gw:7481/x", token: true},
		{ref: "https://elsewhere/x", want: "https://elsewhere/x"},
		{ref: "//elsewhere/x", bad: true},
		{ref: "ftp://gw/x", bad: true},
	} {
		u, token, err := uploadURL("http://gw:7481", tc.ref)
		if (err != nil) != tc.bad || u != tc.want || token != tc.token {
			t.Errorf("uploadURL(%q) = %q, %v, %v", tc.ref, u, token, err)
		}
	}
}
