package client_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/diff"
	"google.golang.org/protobuf/proto"
)

// readPackage reads one of the repository's test packages.
func readPackage(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "testdata", "packages", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCheckInstall is the install decision table: expiry, serials
// (persisted), versions, rollbacks, hot patch signatures.
func TestCheckInstall(t *testing.T) {
	dir := t.TempDir()
	cfg := client.Config{URL: deadAddr(t), Token: tokens("t"), StateDir: dir}
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := client.AcceptSerial(c, "app", 10); err != nil {
		t.Fatal(err)
	}
	producerPub, producerKey, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte("patch"))
	now := time.Now()
	manifest := func(mod func(m *deliverypb.Manifest)) *deliverypb.Manifest {
		m := &deliverypb.Manifest{Package: "app", Kind: deliverypb.PackageKind_PACKAGE_KIND_APP, Version: "2.0", Serial: 10,
			Sha256: sum[:], IssuedMs: now.UnixMilli(), ExpiresMs: now.Add(time.Hour).UnixMilli()}
		if mod != nil {
			mod(m)
		}
		return m
	}
	hotPatch := func(sig []byte, pub ed25519.PublicKey) func(m *deliverypb.Manifest) {
		return func(m *deliverypb.Manifest) {
			m.Package, m.Kind, m.Serial, m.ProducerSignature, m.ProducerPublicKey = "patch", deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH, 1, sig, pub
		}
	}
	goodSig := ed25519.Sign(producerKey, deliverypb.HotPatchMessage("patch", "2.0", sum[:]))
	badSig := ed25519.Sign(producerKey, []byte("something else"))
	for _, tc := range []struct {
		name      string
		mod       func(m *deliverypb.Manifest)
		installed string
		want      error
	}{
		{"fresh install", nil, "", nil},
		{"upgrade", nil, "1.9", nil},
		{"segments compare as numbers", func(m *deliverypb.Manifest) { m.Version = "10.2" }, "9.8", nil},
		{"newer serial", func(m *deliverypb.Manifest) { m.Serial = 11 }, "1.0", nil},
		{"no expiry", func(m *deliverypb.Manifest) { m.ExpiresMs = 0 }, "1.0", nil},
		{"expired", func(m *deliverypb.Manifest) { m.ExpiresMs = now.Add(-time.Second).UnixMilli() }, "1.0", client.ErrManifestExpired},
		{"expired, nothing installed", func(m *deliverypb.Manifest) { m.ExpiresMs = now.Add(-time.Second).UnixMilli() }, "", client.ErrManifestExpired},
		{"stale serial", func(m *deliverypb.Manifest) { m.Serial = 9 }, "1.0", client.ErrStaleManifest},
		{"stale serial, nothing installed", func(m *deliverypb.Manifest) { m.Serial = 9 }, "", client.ErrStaleManifest},
		{"serial of another package", func(m *deliverypb.Manifest) { m.Package, m.Serial = "other", 1 }, "1.0", nil},
		{"downgrade", func(m *deliverypb.Manifest) { m.Version = "1.9" }, "2.0", client.ErrDowngrade},
		{"downgrade by numbers", func(m *deliverypb.Manifest) { m.Version = "9.8" }, "10.2", client.ErrDowngrade},
		{"up to date", nil, "2.0", client.ErrUpToDate},
		{"up to date, spelt longer", nil, "2.0.0", client.ErrUpToDate},
		{"signed rollback from installed", func(m *deliverypb.Manifest) {
			m.Version, m.Rollback, m.RollbackFrom = "1.9", true, []string{"2.1", "2.0"}
		}, "2.0", nil},
		{"rollback from another version", func(m *deliverypb.Manifest) {
			m.Version, m.Rollback, m.RollbackFrom = "1.9", true, []string{"2.1"}
		}, "2.0", client.ErrDowngrade},
		{"rollback_from without rollback", func(m *deliverypb.Manifest) {
			m.Version, m.RollbackFrom = "1.9", []string{"2.0"}
		}, "2.0", client.ErrDowngrade},
		{"rollback to the installed version", func(m *deliverypb.Manifest) {
			m.Version, m.Rollback, m.RollbackFrom = "2.0", true, []string{"2.1"}
		}, "2.0", client.ErrUpToDate},
		{"hot patch signed by its producer", hotPatch(goodSig, producerPub), "", nil},
		{"hot patch, producer signature of other bytes", hotPatch(badSig, producerPub), "", client.ErrSignature},
		{"hot patch without producer signature", hotPatch(nil, nil), "", client.ErrSignature},
		{"hot patch signed, without the producer's key", hotPatch(goodSig, nil), "", client.ErrSignature},
		{"hot patch signed for another package", hotPatch(ed25519.Sign(producerKey, deliverypb.HotPatchMessage("other", "2.0", sum[:])), producerPub), "", client.ErrSignature},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := c.CheckInstall(manifest(tc.mod), tc.installed)
			if !errors.Is(err, tc.want) || (tc.want == nil && err != nil) {
				t.Fatalf("CheckInstall: %v, want %v", err, tc.want)
			}
		})
	}

	// The accepted serial is persisted, and only ever grows.
	if err := client.AcceptSerial(c, "app", 7); err != nil {
		t.Fatal(err)
	}
	again, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := again.CheckInstall(manifest(func(m *deliverypb.Manifest) { m.Serial = 9 }), "1.0"); !errors.Is(err, client.ErrStaleManifest) {
		t.Fatalf("after a restart, serial 9 of 10 accepted: %v, want ErrStaleManifest", err)
	}
	if err := again.CheckInstall(manifest(nil), "1.0"); err != nil {
		t.Fatalf("after a restart, serial 10 of 10 accepted: %v", err)
	}
}

// front stands before the node's real HTTP handler and records the
// package requests; it can cut the next whole download mid-body, answer
// 503, or alter the package bytes.
type front struct {
	cutNext atomic.Bool
	mode    atomic.Int32

	mu   sync.Mutex
	reqs []string // "path" or "path range"
}

const (
	modeNormal = iota
	modeUnavailable
	modeWrongBytes
)

// cutAt is where front cuts a download.
const cutAt = 300_000

func (f *front) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/v1/packages/") {
			h.ServeHTTP(w, r)
			return
		}
		f.mu.Lock()
		f.reqs = append(f.reqs, strings.TrimSpace(r.URL.Path+" "+r.Header.Get("Range")))
		f.mu.Unlock()
		whole := !strings.Contains(r.URL.Path, "/from/")
		switch {
		case f.mode.Load() == modeUnavailable:
			http.Error(w, "package not readable now", http.StatusServiceUnavailable)
		case f.mode.Load() == modeWrongBytes && whole:
			h.ServeHTTP(&alterWriter{ResponseWriter: w}, r)
		case whole && r.Header.Get("Range") == "" && f.cutNext.CompareAndSwap(true, false):
			h.ServeHTTP(&cutWriter{ResponseWriter: w, left: cutAt}, r)
		default:
			h.ServeHTTP(w, r)
		}
	})
}

// requests returns the package requests since the last call.
func (f *front) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.reqs
	f.reqs = nil
	return r
}

// cutWriter passes left bytes of the body, then breaks the connection.
type cutWriter struct {
	http.ResponseWriter
	left int
}

func (w *cutWriter) Write(p []byte) (int, error) {
	if len(p) < w.left {
		w.left -= len(p)
		return w.ResponseWriter.Write(p)
	}
	_, _ = w.ResponseWriter.Write(p[:w.left])
	w.ResponseWriter.(http.Flusher).Flush()
	panic(http.ErrAbortHandler) // the server closes the connection
}

// alterWriter flips a bit of every write of the body.
type alterWriter struct{ http.ResponseWriter }

func (w *alterWriter) Write(p []byte) (int, error) {
	q := slices.Clone(p)
	if len(q) > 0 {
		q[0] ^= 1
	}
	return w.ResponseWriter.Write(q)
}

// cdn is a fallback download server (not Sluice) serving one package.
type cdn struct {
	*httptest.Server
	hits    atomic.Int32
	sawAuth atomic.Bool
	wrong   atomic.Bool // serve altered bytes
}

func newCDN(t *testing.T, data []byte) *cdn {
	c := &cdn{}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.hits.Add(1)
		if r.Header.Get("Authorization") != "" {
			c.sawAuth.Store(true)
		}
		body := data
		if c.wrong.Load() {
			body = slices.Clone(data)
			body[len(body)/2] ^= 1
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
	}))
	t.Cleanup(c.Close)
	return c
}

// TestInstall installs real packages released through the Delivery, over
// the gateway's HTTP endpoints: by diff (the byte diff of the binary
// rebuilds it exactly, the file diff of the H5 zip rebuilds its tree); in
// whole, resuming a download cut mid-body with a range request; in whole
// when old does not match the diff's base; from the fallback URL when the
// gateway answers 503 or wrong bytes (without the device token); not at
// all when the fallback is wrong too. Then a rollback: the signed rollback
// manifest installs the older version, after which the newer version's
// manifest is stale, also after a restart.
func TestInstall(t *testing.T) {
	noLeaks(t)
	appV1, appV2 := readPackage(t, "app-v1.bin"), readPackage(t, "app-v2.bin")
	h5V1, h5V2 := readPackage(t, "h5-v1.zip"), readPackage(t, "h5-v2.zip")
	fb := newCDN(t, appV2)
	f := &front{}
	de := newDeliveryEnv(t, f.wrap)
	ctx := testCtx(t)
	app, h5 := deliverypb.PackageKind_PACKAGE_KIND_APP, deliverypb.PackageKind_PACKAGE_KIND_H5
	de.release(t, "app", app, "1", appV1, "")
	de.release(t, "app", app, "2", appV2, fb.URL+"/app-v2.bin")
	de.release(t, "h5", h5, "1", h5V1, "")
	de.release(t, "h5", h5, "2", h5V2, "")

	cfg := de.config(t, "d-install")
	rec := &viewRecorder{}
	r := start(t, cfg, func(c *client.Client) { c.HandleView(rec.handle) })
	v := rec.wait(t, "the releases", func(v *client.View) bool { return len(v.Releases) == 2 })
	appM, h5M := releaseOf(v, "app"), releaseOf(v, "h5")
	if appM.GetVersion() != "2" || h5M.GetVersion() != "2" || len(appM.Diffs) != 1 || len(h5M.Diffs) != 1 {
		t.Fatalf("manifests: app %v; h5 %v", appM, h5M)
	}
	f.requests()
	stats := func() [4]int64 {
		s := r.Stats()
		return [4]int64{s.Installs, s.DiffInstalls, s.FallbackInstalls, s.DownloadResumes}
	}
	check := func(what string, wantReqs []string, wantStats [4]int64) {
		t.Helper()
		if got := f.requests(); !slices.Equal(got, wantReqs) {
			t.Errorf("%s: package requests %q, want %q", what, got, wantReqs)
		}
		if got := stats(); got != wantStats {
			t.Errorf("%s: installs, by diff, by fallback, resumes = %v, want %v", what, got, wantStats)
		}
	}

	// By diff: the binary is rebuilt byte for byte.
	got, err := r.Install(ctx, appM, "1", appV1)
	if err != nil {
		t.Fatalf("install app by diff: %v", err)
	}
	if !bytes.Equal(got, appV2) {
		t.Fatalf("app by diff: %d bytes, not v2", len(got))
	}
	check("app by diff", []string{"/v1/packages/app/2/from/1"}, [4]int64{1, 1, 0, 0})

	// By diff: the zip is rebuilt with v2's tree.
	got, err = r.Install(ctx, h5M, "1", h5V1)
	if err != nil {
		t.Fatalf("install h5 by diff: %v", err)
	}
	gotTree, err := diff.TreeDigest(got, nil)
	if err != nil {
		t.Fatal(err)
	}
	if wantTree, _ := diff.TreeDigest(h5V2, nil); gotTree != wantTree {
		t.Fatal("h5 by diff: the rebuilt zip does not have v2's tree")
	}
	check("h5 by diff", []string{"/v1/packages/h5/2/from/1"}, [4]int64{2, 2, 0, 0})

	// In whole: the first transfer breaks at cutAt and resumes there.
	f.cutNext.Store(true)
	got, err = r.Install(ctx, appM, "", nil)
	if err != nil {
		t.Fatalf("install app in whole: %v", err)
	}
	if !bytes.Equal(got, appV2) {
		t.Fatalf("app in whole: %d bytes, not v2", len(got))
	}
	check("app resumed", []string{"/v1/packages/app/2", "/v1/packages/app/2 bytes=300000-"}, [4]int64{3, 2, 0, 1})

	// Bytes that are not the diff's base: the whole package, no diff.
	got, err = r.Install(ctx, appM, "1", []byte("not version 1"))
	if err != nil || !bytes.Equal(got, appV2) {
		t.Fatalf("install app with a wrong old: %d bytes, %v", len(got), err)
	}
	check("app with a wrong old", []string{"/v1/packages/app/2"}, [4]int64{4, 2, 0, 1})

	// The gateway fails: the fallback URL, without the device token.
	f.mode.Store(modeUnavailable)
	got, err = r.Install(ctx, appM, "1", nil)
	if err != nil || !bytes.Equal(got, appV2) {
		t.Fatalf("install app from the fallback (503): %d bytes, %v", len(got), err)
	}
	check("fallback after 503", []string{"/v1/packages/app/2"}, [4]int64{5, 2, 1, 1})
	f.mode.Store(modeWrongBytes)
	got, err = r.Install(ctx, appM, "1", appV1) // the diff is fine, so wrong whole bytes need no old
	if err != nil || !bytes.Equal(got, appV2) {
		t.Fatalf("install app by diff while whole downloads are wrong: %d bytes, %v", len(got), err)
	}
	check("diff while whole downloads are wrong", []string{"/v1/packages/app/2/from/1"}, [4]int64{6, 3, 1, 1})
	got, err = r.Install(ctx, appM, "1", nil)
	if err != nil || !bytes.Equal(got, appV2) {
		t.Fatalf("install app from the fallback (wrong bytes): %d bytes, %v", len(got), err)
	}
	check("fallback after wrong bytes", []string{"/v1/packages/app/2"}, [4]int64{7, 3, 2, 1})
	if fb.hits.Load() != 2 || fb.sawAuth.Load() {
		t.Fatalf("fallback: %d requests (want 2), saw the token: %v", fb.hits.Load(), fb.sawAuth.Load())
	}
	fb.wrong.Store(true)
	if got, err = r.Install(ctx, appM, "1", nil); !errors.Is(err, client.ErrDownload) || got != nil {
		t.Fatalf("install with both sources wrong: %d bytes, %v; want ErrDownload", len(got), err)
	}
	check("both wrong", []string{"/v1/packages/app/2"}, [4]int64{7, 3, 2, 1})
	f.mode.Store(modeNormal)

	// A rollback: the signed rollback manifest of version 1 installs over
	// version 2.
	if _, err := de.d.Rollback(ctx, "app", "oncall"); err != nil {
		t.Fatal(err)
	}
	v = rec.wait(t, "the rollback", func(v *client.View) bool { return releaseOf(v, "app").GetVersion() == "1" })
	rb := releaseOf(v, "app")
	if !rb.Rollback || !slices.Equal(rb.RollbackFrom, []string{"2"}) || rb.Serial <= appM.Serial {
		t.Fatalf("rollback manifest: rollback %v from %v, serial %d (v2's %d)", rb.Rollback, rb.RollbackFrom, rb.Serial, appM.Serial)
	}
	if err := r.CheckInstall(rb, "1"); !errors.Is(err, client.ErrUpToDate) {
		t.Fatalf("rollback over 1: %v, want ErrUpToDate", err)
	}
	// Before it is accepted, the v2 manifest still is.
	if err := r.CheckInstall(appM, "1"); err != nil {
		t.Fatalf("v2 manifest before the rollback is accepted: %v", err)
	}
	got, err = r.Install(ctx, rb, "2", appV2)
	if err != nil || !bytes.Equal(got, appV1) {
		t.Fatalf("install the rollback: %d bytes, %v; want v1", len(got), err)
	}
	check("rollback", []string{"/v1/packages/app/1"}, [4]int64{8, 3, 2, 1})
	if err := r.CheckInstall(appM, "1"); !errors.Is(err, client.ErrStaleManifest) {
		t.Fatalf("v2 manifest after the rollback: %v, want ErrStaleManifest", err)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	again, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := again.CheckInstall(appM, "1"); !errors.Is(err, client.ErrStaleManifest) {
		t.Fatalf("v2 manifest after a restart: %v, want ErrStaleManifest", err)
	}
	// The persisted view holds the rollback, verified again at load.
	if m := again.Releases(); len(m) != 2 || !proto.Equal(m[0], rb) && !proto.Equal(m[1], rb) {
		t.Fatalf("persisted releases: %v", m)
	}
}
