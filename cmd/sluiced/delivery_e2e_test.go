package main

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
)

// request sends one admin request with a body and the admin token, and
// returns the body of a 200 answer.
func (d *daemon) request(ctx context.Context, method, path string, body []byte) ([]byte, error) {
	tok, err := os.ReadFile(filepath.Join(d.data, adminTokenFile))
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, method, d.admin+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s %s: status %d: %s", method, path, resp.StatusCode, out)
	}
	return out, nil
}

// e2eDevice is one app: a client SDK with views, and the release of the
// package it was last told to have.
type e2eDevice struct {
	id, os string
	c      *client.Client
	cancel context.CancelFunc
	done   chan error

	mu       sync.Mutex
	manifest *deliverypb.Manifest // of the package, from the last view
	views    int
	changed  chan struct{} // closed and replaced at each view
}

func (dv *e2eDevice) onView(_ context.Context, v *client.View) {
	dv.mu.Lock()
	defer dv.mu.Unlock()
	dv.manifest = nil
	for _, m := range v.Releases {
		if m.Package == "shop" {
			dv.manifest = m
		}
	}
	dv.views++
	close(dv.changed)
	dv.changed = make(chan struct{})
}

// has describes what the device was told: "none", "v2", "v1 rollback".
func (dv *e2eDevice) has() string {
	dv.mu.Lock()
	defer dv.mu.Unlock()
	switch {
	case dv.manifest == nil:
		return "none"
	case dv.manifest.Rollback:
		return dv.manifest.Version + " rollback from " + strings.Join(dv.manifest.RollbackFrom, ",")
	}
	return dv.manifest.Version
}

// TestGrayReleaseEndToEnd runs sluiced and a dozen apps (the Go SDK over
// WebSocket): a gray release reaches exactly the online devices its rule
// matches, live; a pause and a rollback reach them; a device offline
// during all of it gets the rollback when it connects, and one that
// connects during the gray gets the gray version. Every manifest verifies
// with the key sluiced serves at /v1/delivery/key.
func TestGrayReleaseEndToEnd(t *testing.T) {
	d, addr := newTestDaemon(t, "--fsync", "interval")
	if _, err := d.start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	apps := newAppFleet(t, ctx, d, addr)
	connect, stop, waitAll := apps.connect, apps.stop, apps.waitAll
	do := func(method, path, body string) {
		t.Helper()
		if _, err := d.request(ctx, method, path, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	// Version 1, released to everyone; 12 devices online, one offline.
	pkg := func(v string) []byte { return bytes.Repeat([]byte("shop bundle "+v+"\n"), 2000) }
	for _, v := range []string{"1", "2"} {
		if _, err := d.request(ctx, http.MethodPost, "/v1/packages/shop/versions?kind=h5&version="+v, pkg(v)); err != nil {
			t.Fatal(err)
		}
	}
	do(http.MethodPost, "/v1/packages/shop/1/gray", `{"percent": 100}`)
	do(http.MethodPost, "/v1/packages/shop/1/full", ``)
	var online []*e2eDevice
	for i := range 12 {
		os := []string{"android", "ios", "android"}[i%3]
		online = append(online, connect(fmt.Sprintf("dev-%02d", i), os))
	}
	defer func() {
		for _, dv := range online {
			stop(dv)
		}
	}()
	waitAll("v1 full", time.Now(), online, func(*e2eDevice) string { return "1" })

	// Version 2 in gray: Android devices, 50% of them, plus one tester.
	rule := `{"os": ["android"], "percent": 50, "devices": ["dev-01"]}`
	gray := delivery.MustCompile(&deliverypb.Rule{Os: []string{"android"}, Percent: ptr(50.0), Devices: []string{"dev-01"},
		Salt: "release/shop/2"}, "")
	matches := func(dv *e2eDevice) bool {
		return gray.Match(&delivery.Device{ID: dv.id, Attrs: attrsFor(dv.os)}, time.Now().UnixMilli())
	}
	var matching []string
	for _, dv := range online {
		if matches(dv) {
			matching = append(matching, dv.id)
		}
	}
	if len(matching) < 2 || len(matching) == len(online) {
		t.Fatalf("the gray rule matches %v: want a proper subset of the %d devices", matching, len(online))
	}
	start := time.Now()
	do(http.MethodPost, "/v1/packages/shop/2/gray", rule)
	took := waitAll("gray", start, online, func(dv *e2eDevice) string {
		if matches(dv) {
			return "2"
		}
		return "1"
	})
	t.Logf("gray of version 2 to %d of %d online devices (%v): all told in %v", len(matching), len(online), matching, took)
	// A device connecting during the gray, matching it, gets version 2.
	late := connect("dev-late", "android")
	lateWant := "1"
	if matches(late) {
		lateWant = "2"
	}
	waitAll("late device", time.Now(), []*e2eDevice{late}, func(*e2eDevice) string { return lateWant })
	stop(late)

	// Pause: the gray devices are told version 1 again (no rollback: they
	// keep what they installed).
	start = time.Now()
	do(http.MethodPost, "/v1/packages/shop/2/pause", ``)
	took = waitAll("pause", start, online, func(*e2eDevice) string { return "1" })
	t.Logf("pause reached every device in %v", took)
	do(http.MethodPost, "/v1/packages/shop/2/resume", ``)
	waitAll("resume", time.Now(), online, func(dv *e2eDevice) string {
		if matches(dv) {
			return "2"
		}
		return "1"
	})

	// Rollback: every device gets a signed rollback to 1 from 2; only
	// those that have 2 install it.
	start = time.Now()
	do(http.MethodPost, "/v1/packages/shop/rollback", ``)
	took = waitAll("rollback", start, online, func(*e2eDevice) string { return "1 rollback from 2" })
	t.Logf("rollback reached every device in %v", took)
	for _, dv := range online {
		dv.mu.Lock()
		m := dv.manifest
		dv.mu.Unlock()
		installed := "1"
		if matches(dv) {
			installed = "2"
		}
		err := dv.c.CheckInstall(m, installed)
		switch {
		case matches(dv) && err != nil:
			t.Errorf("%s: the rollback manifest does not install over 2: %v", dv.id, err)
		case !matches(dv) && !errors.Is(err, client.ErrUpToDate):
			t.Errorf("%s: on 1 already, CheckInstall = %v, want ErrUpToDate", dv.id, err)
		}
	}
	// A device that was offline all along, in the gray's audience, gets
	// the rollback when it connects (it never had 2: nothing to install).
	var offline *e2eDevice
	for i := 0; offline == nil; i++ {
		id := fmt.Sprintf("away-%d", i)
		if gray.Match(&delivery.Device{ID: id, Attrs: attrsFor("android")}, time.Now().UnixMilli()) {
			offline = connect(id, "android")
		}
	}
	waitAll("offline device", time.Now(), []*e2eDevice{offline}, func(*e2eDevice) string { return "1 rollback from 2" })
	stop(offline)
	// The views all came over the sync link; none was rejected.
	for _, dv := range append(slices.Clone(online), offline) {
		if st := dv.c.Stats(); st.ManifestsRejected != 0 {
			t.Errorf("%s: %d manifests rejected", dv.id, st.ManifestsRejected)
		}
	}
}

func ptr[T any](v T) *T { return &v }

func attrsFor(os string) oplog.Attrs { return oplog.Attrs{OS: os, AppVersion: "5.0"} }

// newTestDaemon prepares sluiced (built once per test binary) on free
// loopback ports with a data directory and log under t.TempDir(), with
// args added to the listener flags; the test's cleanup kills it, and
// prints its last log lines if the test failed. addr(i) is the address of
// port i: 0 NATS, 1 admin, 2 WebSocket, 3 TLV.
func newTestDaemon(t *testing.T, args ...string) (*daemon, func(int) string) {
	t.Helper()
	bin := buildSluiced(t)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	tmp := t.TempDir()
	var ports []int
	for range 4 {
		ports = append(ports, freePort(t, rng, ports...))
	}
	addr := func(i int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[i])) }
	logPath := filepath.Join(tmp, "sluiced.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(tmp, "data")
	d := &daemon{
		bin: bin,
		args: append([]string{"--data", data, "--nats-listen", addr(0), "--admin", addr(1),
			"--ws-listen", addr(2), "--tcp-listen", addr(3), "--log-format", "json"}, args...),
		natsURL: "nats://" + addr(0),
		admin:   "http://" + addr(1),
		data:    data,
		logPath: logPath,
		logFile: logFile,
		http:    &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
	}
	t.Cleanup(func() { _ = logFile.Close() })
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sluiced log %s, last lines:\n%s", logPath, d.tail(60))
		}
	})
	t.Cleanup(func() {
		if err := d.kill(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return d, addr
}

// appFleet connects apps (the Go SDK over WebSocket, views on, the
// manifest key sluiced serves pinned) to a test daemon.
type appFleet struct {
	t      *testing.T
	ws     string
	signer *gateway.Signer
	key    ed25519.PublicKey
	dir    string
	lg     zerolog.Logger
}

func newAppFleet(t *testing.T, ctx context.Context, d *daemon, addr func(int) string) *appFleet {
	t.Helper()
	tokKey, err := gateway.LoadOrCreateKey(filepath.Join(d.data, tokenKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	var keyDoc struct {
		PublicKey string `json:"public_key"`
	}
	body, err := d.request(ctx, http.MethodGet, "/v1/delivery/key", nil)
	if err == nil {
		err = json.Unmarshal(body, &keyDoc)
	}
	key, herr := hex.DecodeString(keyDoc.PublicKey)
	if err != nil || herr != nil || len(key) != ed25519.PublicKeySize {
		t.Fatalf("manifest key: %v %v %q", err, herr, keyDoc.PublicKey)
	}
	return &appFleet{t: t, ws: "ws://" + addr(2) + "/v1/ws", signer: gateway.NewSigner(tokKey), key: key,
		dir: filepath.Join(filepath.Dir(d.data), "apps"), lg: zerolog.Nop()}
}

// token issues a device token.
func (f *appFleet) token(id string) string {
	f.t.Helper()
	tok, err := f.signer.Issue(gateway.Claims{Device: id, App: "shop-app", Expires: time.Now().Add(time.Hour)})
	if err != nil {
		f.t.Fatal(err)
	}
	return tok
}

// connect starts an app on device id with OS os.
func (f *appFleet) connect(id, os string) *e2eDevice {
	f.t.Helper()
	tok := f.token(id)
	dv := &e2eDevice{id: id, os: os, changed: make(chan struct{}), done: make(chan error, 1)}
	var err error
	dv.c, err = client.New(client.Config{URL: f.ws, StateDir: filepath.Join(f.dir, id),
		Token: func(context.Context) (string, error) { return tok, nil }, Logger: &f.lg,
		Attrs: &gatewaypb.Attrs{Os: os, AppVersion: "5.0"}, Views: true, ManifestKeys: []ed25519.PublicKey{f.key}})
	if err != nil {
		f.t.Fatal(err)
	}
	dv.c.HandleView(dv.onView)
	var runCtx context.Context
	runCtx, dv.cancel = context.WithCancel(context.Background())
	go func() { dv.done <- dv.c.Run(runCtx) }()
	return dv
}

// stop stops an app.
func (f *appFleet) stop(dv *e2eDevice) {
	dv.cancel()
	if err := <-dv.done; err != nil {
		f.t.Errorf("%s: run: %v", dv.id, err)
	}
}

// waitAll waits until every device in devs has been told want, and
// returns how long the last one took from start.
func (f *appFleet) waitAll(what string, start time.Time, devs []*e2eDevice, want func(*e2eDevice) string) time.Duration {
	f.t.Helper()
	var took time.Duration
	for _, dv := range devs {
		for {
			dv.mu.Lock()
			ch := dv.changed
			dv.mu.Unlock()
			if dv.has() == want(dv) {
				break
			}
			select {
			case <-ch:
			case <-time.After(10 * time.Second):
				f.t.Fatalf("%s: device %s (%s) has %q, want %q", what, dv.id, dv.os, dv.has(), want(dv))
			}
		}
		took = max(took, time.Since(start))
	}
	return took
}
