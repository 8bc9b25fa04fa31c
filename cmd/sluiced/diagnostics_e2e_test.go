package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway"
)

// diagRequest is the admin API's view of a diagnostic request.
type diagRequest struct {
	ID      string `json:"id"`
	Device  string `json:"device"`
	User    string `json:"user"`
	Status  string `json:"status"`
	Uploads []struct {
		Device string `json:"device"`
		Size   string `json:"size"`
		Sha256 string `json:"sha256"` // base64
		Error  string `json:"error"`
	} `json:"uploads"`
}

// TestDiagnosticsEndToEnd runs sluiced and apps (the Go SDK over
// WebSocket with HandleDiagnostics): an admin asks an online device for
// its logs, the app gets the command over sync and uploads them, and the
// admin lists the request as UPLOADED and downloads the same bytes (ETag:
// their SHA-256). A device asked while offline, and the devices of a user
// asked while none was online, upload when they connect.
func TestDiagnosticsEndToEnd(t *testing.T) {
	d, addr := newTestDaemon(t, "--fsync", "interval")
	if _, err := d.start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	key, err := gateway.LoadOrCreateKey(filepath.Join(d.data, tokenKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	signer := gateway.NewSigner(key)
	lg := zerolog.Nop()
	asked := make(chan string, 16) // "<device> <request>" per collector call
	logsOf := func(device string) []byte {
		return bytes.Repeat([]byte("12:00:00 I "+device+": a line of its log\n"), 2000) // ~70 KB
	}
	// startApp runs an app on a device, signed in as user (or none).
	startApp := func(device, user string) {
		t.Helper()
		tok, err := signer.Issue(gateway.Claims{Device: device, User: user, App: "shop-app", Expires: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		c, err := client.New(client.Config{URL: "ws://" + addr(2) + "/v1/ws", StateDir: filepath.Join(t.TempDir(), device),
			Token: func(context.Context) (string, error) { return tok, nil }, Logger: &lg})
		if err != nil {
			t.Fatal(err)
		}
		c.HandleDiagnostics(func(_ context.Context, id string) ([]byte, error) {
			asked <- device + " " + id
			return logsOf(device), nil
		})
		runCtx, stop := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- c.Run(runCtx) }()
		t.Cleanup(func() {
			stop()
			if err := <-done; err != nil {
				t.Errorf("%s: run: %v", device, err)
			}
		})
		for !c.Stats().Connected {
			select {
			case err := <-done:
				t.Fatalf("%s: run: %v", device, err)
			case <-ctx.Done():
				t.Fatalf("%s: not connected", device)
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	request := func(body string) diagRequest {
		t.Helper()
		out, err := d.request(ctx, http.MethodPost, "/v1/diagnostics", []byte(body))
		if err != nil {
			t.Fatal(err)
		}
		var req diagRequest
		if err := json.Unmarshal(out, &req); err != nil || req.ID == "" || req.Status != "DIAGNOSTIC_STATUS_REQUESTED" {
			t.Fatalf("request %s: %s (%v)", body, out, err)
		}
		return req
	}
	// waitUploaded waits until the request has uploads from n devices.
	waitUploaded := func(id string, n int) (diagRequest, time.Duration) {
		t.Helper()
		start := time.Now()
		for {
			var req diagRequest
			if err := d.doJSON(ctx, http.MethodGet, "/v1/diagnostics/"+id, &req); err != nil {
				t.Fatal(err)
			}
			if len(req.Uploads) >= n {
				return req, time.Since(start)
			}
			if time.Since(start) > 10*time.Second {
				t.Fatalf("request %s after 10 s: %+v", id, req)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	// download fetches a device's logs and checks them and their ETag.
	download := func(id, device string) {
		t.Helper()
		tok, err := os.ReadFile(filepath.Join(d.data, adminTokenFile))
		if err != nil {
			t.Fatal(err)
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, d.admin+"/v1/diagnostics/"+id+"/logs/"+device, nil)
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
		resp, err := d.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		data, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		want := logsOf(device)
		sum := sha256.Sum256(want)
		if resp.StatusCode != http.StatusOK || !bytes.Equal(data, want) || resp.Header.Get("ETag") != `"`+hex.EncodeToString(sum[:])+`"` ||
			resp.Header.Get("Content-Type") != "application/octet-stream" {
			t.Fatalf("logs of %s: %d, %d bytes (want %d), ETag %s, Content-Type %s", device, resp.StatusCode, len(data), len(want),
				resp.Header.Get("ETag"), resp.Header.Get("Content-Type"))
		}
	}

	// An online device.
	startApp("phone-1", "ann")
	online := request(`{"device": "phone-1", "note": "checkout crash"}`)
	got, took := waitUploaded(online.ID, 1)
	t.Logf("the online device uploaded %s bytes %v after the request", got.Uploads[0].Size, took)
	if a := <-asked; a != "phone-1 "+online.ID {
		t.Fatalf("collector asked for %q", a)
	}
	if got.Status != "DIAGNOSTIC_STATUS_UPLOADED" || len(got.Uploads) != 1 || got.Uploads[0].Device != "phone-1" ||
		got.Uploads[0].Size != fmt.Sprint(len(logsOf("phone-1"))) {
		t.Fatalf("request after the upload: %+v", got)
	}
	var list struct {
		Requests []diagRequest `json:"requests"`
	}
	if err := d.doJSON(ctx, http.MethodGet, "/v1/diagnostics", &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Requests) != 1 || list.Requests[0].ID != online.ID || list.Requests[0].Status != "DIAGNOSTIC_STATUS_UPLOADED" {
		t.Fatalf("list: %+v", list)
	}
	download(online.ID, "phone-1")
	if _, err := d.do(ctx, http.MethodGet, "/v1/diagnostics/"+online.ID+"/logs/phone-2"); err == nil || !strings.Contains(err.Error(), "status 404") {
		t.Fatalf("logs of a device that sent none: %v", err)
	}

	// A device asked while offline; a user none of whose devices is online.
	offline := request(`{"device": "phone-2"}`)
	user := request(`{"user": "bob"}`)
	for _, id := range []string{offline.ID, user.ID} {
		if req, _ := waitUploaded(id, 0); req.Status != "DIAGNOSTIC_STATUS_REQUESTED" {
			t.Fatalf("request %s before any device connected: %+v", id, req)
		}
	}
	startApp("phone-2", "")
	startApp("tablet-1", "bob")
	startApp("tablet-2", "bob")
	waitUploaded(offline.ID, 1)
	got, _ = waitUploaded(user.ID, 2)
	devices := map[string]bool{}
	for _, up := range got.Uploads {
		devices[up.Device] = true
	}
	if got.Status != "DIAGNOSTIC_STATUS_UPLOADED" || !devices["tablet-1"] || !devices["tablet-2"] {
		t.Fatalf("user request after its devices connected: %+v", got)
	}
	download(offline.ID, "phone-2")
	download(user.ID, "tablet-1")
	download(user.ID, "tablet-2")
}
