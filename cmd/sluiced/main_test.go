package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/proto"
)

// TestMainWithExternalNATS runs sluiced in-process against an existing
// NATS server (--nats), produces through it, and shuts it down.
func TestMainWithExternalNATS(t *testing.T) {
	ns, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	admin := ln.Addr().String()
	ln.Close()
	cfg, err := parseConfig([]string{"--nats", ns.ClientURL(), "--data", t.TempDir(), "--admin", admin, "--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0", "--businesses", "chat:user"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	m := NewMain(cfg, zerolog.Nop())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		m.Close()
		m.Close() // idempotent
		if _, err := os.Stat(filepath.Join(cfg.DataDir, "endpoints.json")); !os.IsNotExist(err) {
			t.Errorf("endpoints.json left behind: %v", err)
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var ep Endpoints
	raw, err := os.ReadFile(filepath.Join(cfg.DataDir, "endpoints.json"))
	if err != nil || json.Unmarshal(raw, &ep) != nil || ep.NATS != ns.ClientURL() {
		t.Fatalf("endpoints.json = %s, %v; want NATS %s", raw, err, ns.ClientURL())
	}
	body, _ := proto.Marshal(&oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: "chat", Targets: []string{"alice"}})
	resp, err := nc.Request(oplog.SubjectAppend, body, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	r := new(oplogpb.AppendReply)
	if err := proto.Unmarshal(resp.Data, r); err != nil || r.Error != nil || r.Results[0].Id != 1 {
		t.Fatalf("reply %v, %v", r, err)
	}
	// The gateway's HTTP listener serves the browser client, its demo page
	// and dispatch, which lists this node.
	base := "http" + strings.TrimSuffix(strings.TrimPrefix(ep.WebSocket, "ws"), "/v1/ws")
	for path, want := range map[string]string{"/": "<html", "/sluice.js": "Sluice", "/v1/dispatch?device=phone": ep.TCP} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), want) {
			t.Fatalf("GET %s: %d %.200s; want 200 with %q", path, resp.StatusCode, b, want)
		}
	}
}

// TestMainFailsCleanly: a start that cannot bind its admin port returns an
// error, and Close still releases everything.
func TestMainFailsCleanly(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cfg, err := parseConfig([]string{"--data", t.TempDir(), "--nats-listen", "127.0.0.1:0", "--admin", ln.Addr().String(), "--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	m := NewMain(cfg, zerolog.Nop())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := m.Run(ctx); err == nil {
		t.Fatal("Run with a taken admin port returned nil")
	}
	m.Close()
}
