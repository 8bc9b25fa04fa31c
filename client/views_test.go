package client_test

import (
	"context"
	"crypto/ed25519"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/oplog"
)

// deliveryEnv is an env with a Delivery on its log and a gateway node
// serving the Delivery's views, with the HTTP endpoints on the
// WebSocket's listener as sluiced serves them: /v1/ws, /v1/updates and
// /v1/packages/, the last two authenticated by the gateway's tokens.
type deliveryEnv struct {
	*env
	d    *delivery.Delivery
	reg  *delivery.Registry // the gateway reports devices to it
	key  ed25519.PublicKey  // the manifests' signer
	ws   string             // ws://host:port/v1/ws
	http string             // http://host:port
}

// newDeliveryEnv starts a deliveryEnv; front, if set, wraps the node's
// HTTP handler (every path).
func newDeliveryEnv(t *testing.T, front func(http.Handler) http.Handler) *deliveryEnv {
	t.Helper()
	e := newEnv(t)
	lg := testLogger(t)
	d := deliverytest.MustRun(t, delivery.Config{Log: e.log, Logger: &lg}, true)
	reg := deliverytest.MustRunRegistry(t, delivery.RegistryConfig{Log: e.log})
	verifier := gateway.NewVerifier(e.pub)
	in, err := analytics.Open(testCtx(t), analytics.Config{Log: e.log})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := gateway.NewServer(gateway.Config{Inbox: e.in, Tokens: verifier, Views: d, Receipts: d, Suppress: d.Suppressed, Devices: reg, Analytics: in})
	if err != nil {
		t.Fatal(err)
	}
	auth := gateway.DeviceAuth(verifier)

	mux := http.NewServeMux()
	mux.Handle("/v1/ws", srv.WebSocketHandler(nil))
	mux.Handle("/v1/updates", d.UpdatesHandler(auth))
	mux.Handle("/v1/packages/", d.DownloadHandler("/v1/packages/", auth))
	var h http.Handler = mux
	if front != nil {
		h = front(mux)
	}
	hs := httptest.NewServer(h)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		hs.Close()
	})
	return &deliveryEnv{env: e, d: d, reg: reg, key: d.PublicKey(), ws: "ws" + strings.TrimPrefix(hs.URL, "http") + "/v1/ws", http: hs.URL}
}

// config is a Config for device on the node, with views and the
// manifest key; the HTTP base is left to be derived from the URL.
func (de *deliveryEnv) config(t *testing.T, device string) client.Config {
	return client.Config{URL: de.ws, Token: tokens(de.token("", device)), StateDir: t.TempDir(), Attrs: attrs,
		Views: true, ManifestKeys: []ed25519.PublicKey{de.key}}
}

// setBool sets bool switch key to def for every device.
func (de *deliveryEnv) setBool(t *testing.T, key string, def bool) {
	t.Helper()
	sw := &deliverypb.Switch{Key: key, Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(def)}
	if _, err := de.d.SetSwitch(testCtx(t), sw, "test", 0); err != nil {
		t.Fatal(err)
	}
}

// release uploads a version of a package and releases it fully.
func (de *deliveryEnv) release(t *testing.T, pkg string, kind deliverypb.PackageKind, version string, data []byte, fallback string) {
	t.Helper()
	ctx := testCtx(t)
	if _, err := de.d.Upload(ctx, delivery.Upload{Package: pkg, Kind: kind, Version: version, Data: data, FallbackURL: fallback}, "ci"); err != nil {
		t.Fatalf("upload %s %s: %v", pkg, version, err)
	}
	if _, err := de.d.Gray(ctx, pkg, version, &deliverypb.Rule{}, "ci"); err != nil {
		t.Fatalf("gray %s %s: %v", pkg, version, err)
	}
	if _, err := de.d.Full(ctx, pkg, version, "ci"); err != nil {
		t.Fatalf("full %s %s: %v", pkg, version, err)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func boolValue(b bool) *deliverypb.Value {
	return &deliverypb.Value{Kind: &deliverypb.Value_BoolValue{BoolValue: b}}
}

// viewRecorder keeps the views a HandleView function was told.
type viewRecorder struct {
	mu    sync.Mutex
	views []*client.View
}

func (r *viewRecorder) handle(_ context.Context, v *client.View) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.views = append(r.views, v)
}

func (r *viewRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.views)
}

// wait waits until the last view told satisfies cond, and returns it.
func (r *viewRecorder) wait(t *testing.T, what string, cond func(v *client.View) bool) *client.View {
	t.Helper()
	var last *client.View
	waitFor(t, what, func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		if len(r.views) == 0 {
			return false
		}
		last = r.views[len(r.views)-1]
		return cond(last)
	})
	return last
}

// boolOf is the value of bool switch key in v, and its variant.
func boolOf(v *client.View, key string) (val bool, variant string, ok bool) {
	sv, ok := v.Switches[key]
	if !ok {
		return false, "", false
	}
	k, ok := sv.GetValue().GetKind().(*deliverypb.Value_BoolValue)
	return ok && k.BoolValue, sv.Variant, ok
}

func releaseOf(v *client.View, pkg string) *deliverypb.Manifest {
	for _, m := range v.Releases {
		if m.Package == pkg {
			return m
		}
	}
	return nil
}

// TestViewsLive connects a client asking for views: the first view comes
// after Welcome with the switches and the verified release, the same view
// the Delivery computes for the device; a switch change and a kill come
// live; the accessors answer from the view; an update check over the HTTP
// base derived from the ws:// URL finds the view unchanged (304).
func TestViewsLive(t *testing.T) {
	noLeaks(t)
	de := newDeliveryEnv(t, nil)
	ctx := testCtx(t)
	de.setBool(t, "dark-mode", false)
	greeting := &deliverypb.Switch{Key: "greeting", Type: deliverypb.SwitchType_SWITCH_TYPE_STRING,
		DefaultValue: &deliverypb.Value{Kind: &deliverypb.Value_StringValue{StringValue: "hello"}}}
	if _, err := de.d.SetSwitch(ctx, greeting, "test", 0); err != nil {
		t.Fatal(err)
	}
	limit := &deliverypb.Switch{Key: "limit", Type: deliverypb.SwitchType_SWITCH_TYPE_INT,
		DefaultValue: &deliverypb.Value{Kind: &deliverypb.Value_IntValue{IntValue: 42}}}
	if _, err := de.d.SetSwitch(ctx, limit, "test", 0); err != nil {
		t.Fatal(err)
	}
	de.release(t, "app", deliverypb.PackageKind_PACKAGE_KIND_APP, "1", []byte("version one"), "")

	rec := &viewRecorder{}
	cfg := de.config(t, "d-live")
	r := start(t, cfg, func(c *client.Client) { c.HandleView(rec.handle) })
	v := rec.wait(t, "first view", func(*client.View) bool { return true })
	if val, variant, ok := boolOf(v, "dark-mode"); !ok || val || variant != "" {
		t.Fatalf("dark-mode in the first view: %v %q %v", val, variant, ok)
	}
	if len(v.Releases) != 1 || v.Rejected != 0 {
		t.Fatalf("first view: %d releases, %d rejected; want 1, 0", len(v.Releases), v.Rejected)
	}
	if m := v.Releases[0]; m.Package != "app" || m.Version != "1" || m.Url != "/v1/packages/app/1" || m.Serial == 0 {
		t.Fatalf("release %v", m)
	}
	dev := &delivery.Device{ID: "d-live", Attrs: oplog.Attrs{AppVersion: attrs.AppVersion, OS: attrs.Os}}
	if want := de.d.View(dev).Digest; v.Digest != want {
		t.Fatalf("digest %q, the Delivery's %q", v.Digest, want)
	}
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"SwitchBool(dark-mode)", r.SwitchBool("dark-mode", true), false},
		{"SwitchBool(absent)", r.SwitchBool("absent", true), true},
		{"SwitchString(greeting)", r.SwitchString("greeting", "?"), "hello"},
		{"SwitchInt(greeting): another type", r.SwitchInt("greeting", 7), int64(7)},
		{"SwitchInt(limit)", r.SwitchInt("limit", 0), int64(42)},
		{"SwitchNumber(limit): an int", r.SwitchNumber("limit", 1.5), 1.5},
		{"SwitchString(dark-mode): a bool", r.SwitchString("dark-mode", "def"), "def"},
		{"len(Releases())", len(r.Releases()), 1},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if sv, ok := r.Switch("limit"); !ok || sv.GetValue().GetIntValue() != 42 || sv.Version == 0 {
		t.Errorf("Switch(limit) = %v, %v", sv, ok)
	}
	if _, ok := r.Switch("absent"); ok {
		t.Error("Switch(absent) found")
	}

	// Live: a change of the default, then a kill.
	de.setBool(t, "dark-mode", true)
	rec.wait(t, "dark-mode on", func(v *client.View) bool { val, _, _ := boolOf(v, "dark-mode"); return val })
	if !r.SwitchBool("dark-mode", false) {
		t.Fatal("SwitchBool(dark-mode) is false after the view turned it on")
	}
	if _, err := de.d.Kill(ctx, "dark-mode", true, "oncall"); err != nil {
		t.Fatal(err)
	}
	v = rec.wait(t, "dark-mode killed", func(v *client.View) bool { _, variant, _ := boolOf(v, "dark-mode"); return variant == "kill" })
	if r.SwitchBool("dark-mode", true) || len(v.Releases) != 1 {
		t.Fatalf("killed: SwitchBool true or %d releases", len(v.Releases))
	}
	st := r.Stats()
	if st.Views != 3 || rec.count() != 3 || st.ManifestsRejected != 0 {
		t.Fatalf("views %d, told %d, rejected %d; want 3, 3, 0", st.Views, rec.count(), st.ManifestsRejected)
	}

	// Over HTTP the view is the same: 304, nothing applied.
	got, err := r.CheckUpdates(ctx)
	if err != nil {
		t.Fatalf("CheckUpdates: %v", err)
	}
	if got.Digest != v.Digest || r.Stats().Views != 3 || rec.count() != 3 {
		t.Fatalf("CheckUpdates: digest %q (want %q), views %d (want 3)", got.Digest, v.Digest, r.Stats().Views)
	}
}

// TestViewPersisted: the view survives a restart, offline (New loads it)
// and online, where the Hello presents its digest and the gateway sends
// nothing until the view changes.
func TestViewPersisted(t *testing.T) {
	noLeaks(t)
	de := newDeliveryEnv(t, nil)
	de.setBool(t, "dark-mode", true)
	de.release(t, "app", deliverypb.PackageKind_PACKAGE_KIND_APP, "1", []byte("version one"), "")
	cfg := de.config(t, "d-persist")
	rec := &viewRecorder{}
	r := start(t, cfg, func(c *client.Client) { c.HandleView(rec.handle) })
	first := rec.wait(t, "first view", func(*client.View) bool { return true })
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, "view.pb")); err != nil {
		t.Fatalf("view file: %v", err)
	}

	// Offline: New loads the view.
	off, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if v := off.View(); v == nil || v.Digest != first.Digest || !off.SwitchBool("dark-mode", false) || len(off.Releases()) != 1 {
		t.Fatalf("after New: view %+v, dark-mode %v, %d releases", v, off.SwitchBool("dark-mode", false), len(off.Releases()))
	}

	// Online: the digest is presented, so the gateway sends no view (it
	// would come before the first round's end).
	rec2 := &viewRecorder{}
	r2 := start(t, cfg, func(c *client.Client) { c.HandleView(rec2.handle) })
	waitFor(t, "first round", func() bool { return r2.Stats().Rounds >= 1 })
	if n, views := rec2.count(), r2.Stats().Views; n != 0 || views != 0 {
		t.Fatalf("after a restart with the same view: %d views told, %d applied; want none", n, views)
	}
	if !r2.SwitchBool("dark-mode", false) {
		t.Fatal("SwitchBool(dark-mode) false after the restart")
	}
	// A change still comes, and is persisted in turn.
	de.setBool(t, "dark-mode", false)
	v := rec2.wait(t, "dark-mode off", func(v *client.View) bool { val, _, ok := boolOf(v, "dark-mode"); return ok && !val })
	if v.Digest == first.Digest || len(v.Releases) != 1 {
		t.Fatalf("changed view: digest %q (first %q), %d releases", v.Digest, first.Digest, len(v.Releases))
	}
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}
	again, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if again.View().Digest != v.Digest || again.SwitchBool("dark-mode", true) {
		t.Fatalf("after the second restart: digest %q, want %q; dark-mode %v", again.View().Digest, v.Digest, again.SwitchBool("dark-mode", true))
	}
}

// TestViewUntrustedKey: a manifest signed by a key the client does not
// trust is dropped and counted, the view's switches still apply; with the
// server's key among the trusted (a rotation), it verifies.
func TestViewUntrustedKey(t *testing.T) {
	noLeaks(t)
	de := newDeliveryEnv(t, nil)
	de.setBool(t, "dark-mode", true)
	de.release(t, "app", deliverypb.PackageKind_PACKAGE_KIND_APP, "1", []byte("version one"), "")
	other, _, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}

	cfg := de.config(t, "d-untrusted")
	cfg.ManifestKeys = []ed25519.PublicKey{other}
	rec := &viewRecorder{}
	r := start(t, cfg, func(c *client.Client) { c.HandleView(rec.handle) })
	v := rec.wait(t, "view", func(*client.View) bool { return true })
	if len(v.Releases) != 0 || v.Rejected != 1 || len(r.Releases()) != 0 {
		t.Fatalf("untrusted: %d releases, %d rejected; want 0, 1", len(v.Releases), v.Rejected)
	}
	if st := r.Stats(); st.ManifestsRejected != 1 || st.Views != 1 {
		t.Fatalf("stats: %d rejected, %d views; want 1, 1", st.ManifestsRejected, st.Views)
	}
	if !r.SwitchBool("dark-mode", false) {
		t.Fatal("the switches of a view with a bad manifest did not apply")
	}

	cfg2 := de.config(t, "d-rotation")
	cfg2.ManifestKeys = []ed25519.PublicKey{other, de.key}
	rec2 := &viewRecorder{}
	r2 := start(t, cfg2, func(c *client.Client) { c.HandleView(rec2.handle) })
	v2 := rec2.wait(t, "view", func(*client.View) bool { return true })
	if len(v2.Releases) != 1 || v2.Rejected != 0 || r2.Stats().ManifestsRejected != 0 {
		t.Fatalf("trusted among two keys: %d releases, %d rejected; want 1, 0", len(v2.Releases), v2.Rejected)
	}
}

// statusLog records the statuses of /v1/updates answers.
type statusLog struct {
	mu       sync.Mutex
	statuses []int
}

func (l *statusLog) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v1/updates" {
			h.ServeHTTP(w, r)
			return
		}
		rw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		h.ServeHTTP(rw, r)
		l.mu.Lock()
		l.statuses = append(l.statuses, rw.status)
		l.mu.Unlock()
	})
}

func (l *statusLog) last() (int, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.statuses) == 0 {
		return 0, 0
	}
	return l.statuses[len(l.statuses)-1], len(l.statuses)
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// TestCheckUpdates checks for updates over HTTP without Run: 200 with the
// view (applied, persisted, told), 304 while it is unchanged, 200 again
// after a change; the attributes go with the request (a variant for the
// client's OS); a new client on the same StateDir presents the persisted
// digest and gets 304.
func TestCheckUpdates(t *testing.T) {
	noLeaks(t)
	statuses := &statusLog{}
	de := newDeliveryEnv(t, statuses.wrap)
	ctx := testCtx(t)
	sw := &deliverypb.Switch{Key: "new-checkout", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(false),
		Variants: []*deliverypb.Variant{{Name: "droid", Rule: &deliverypb.Rule{Os: []string{"android"}}, Value: boolValue(true)}}}
	if _, err := de.d.SetSwitch(ctx, sw, "test", 0); err != nil {
		t.Fatal(err)
	}
	de.release(t, "app", deliverypb.PackageKind_PACKAGE_KIND_APP, "1", []byte("version one"), "")
	cfg := de.config(t, "d-check")
	cfg.URL, cfg.HTTPBase = deadAddr(t), de.http // never dialed: no Run
	c, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rec := &viewRecorder{}
	c.HandleView(rec.handle)

	v, err := c.CheckUpdates(ctx)
	if err != nil {
		t.Fatalf("CheckUpdates: %v", err)
	}
	if status, n := statuses.last(); status != http.StatusOK || n != 1 {
		t.Fatalf("first check: status %d (%d requests), want 200", status, n)
	}
	if sv, ok := c.Switch("new-checkout"); !ok || sv.Variant != "droid" || !c.SwitchBool("new-checkout", false) {
		t.Fatalf("new-checkout = %v, %v; want the droid variant, true", sv, ok)
	}
	if len(v.Releases) != 1 || rec.count() != 1 || c.View() != v || c.Stats().Views != 1 {
		t.Fatalf("first check: %d releases, %d told, views %d", len(v.Releases), rec.count(), c.Stats().Views)
	}

	v2, err := c.CheckUpdates(ctx)
	if err != nil {
		t.Fatalf("CheckUpdates: %v", err)
	}
	if status, n := statuses.last(); status != http.StatusNotModified || n != 2 || v2 != v || rec.count() != 1 {
		t.Fatalf("second check: status %d (%d requests), same view %v, told %d; want 304, the same view, told once", status, n, v2 == v, rec.count())
	}

	if _, err := de.d.Kill(ctx, "new-checkout", true, "oncall"); err != nil {
		t.Fatal(err)
	}
	v3, err := c.CheckUpdates(ctx)
	if err != nil {
		t.Fatalf("CheckUpdates: %v", err)
	}
	if status, _ := statuses.last(); status != http.StatusOK || v3.Digest == v.Digest || c.SwitchBool("new-checkout", true) || rec.count() != 2 {
		t.Fatalf("after a kill: status %d, digest changed %v, told %d", status, v3.Digest != v.Digest, rec.count())
	}

	// A new client on the same directory presents the persisted digest.
	c2, err := client.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v4, err := c2.CheckUpdates(ctx)
	if err != nil {
		t.Fatalf("CheckUpdates: %v", err)
	}
	if status, n := statuses.last(); status != http.StatusNotModified || n != 4 || v4.Digest != v3.Digest || c2.SwitchBool("new-checkout", true) {
		t.Fatalf("restarted client: status %d (%d requests), digest %q (want %q)", status, n, v4.Digest, v3.Digest)
	}

	// Without an HTTP base there is nothing to ask.
	cfg3 := de.config(t, "d-nohttp")
	cfg3.URL = deadAddr(t)
	c3, err := client.New(cfg3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c3.CheckUpdates(ctx); !errors.Is(err, client.ErrNoHTTP) {
		t.Fatalf("CheckUpdates without an HTTP base: %v, want ErrNoHTTP", err)
	}
}
