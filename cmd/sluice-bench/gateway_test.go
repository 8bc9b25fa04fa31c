package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary stand in for sluice-bench when the gateway
// benchmark re-executes itself (os.Executable) as a server child.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == childCommand {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := runGatewayServer(ctx, os.Args[2:], os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "sluice-bench:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestGatewaySmoke runs every gateway scenario with tiny counts: it must
// finish without error and print each scenario's row and the summary. No
// timing is asserted.
func TestGatewaySmoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	args := []string{"gateway", "-n", "20", "-rate", "50", "-duration", "1s", "-backlog", "5",
		"-rounds", "2", "-catchup-runs", "2", "-inflight", "4", "-timeout", "3m"}
	var progress io.Writer = io.Discard
	if testing.Verbose() {
		progress = os.Stderr
	}
	if err := run(ctx, args, &out, progress); err != nil {
		t.Fatalf("run %v: %v\noutput:\n%s", args, err, out.String())
	}
	got := out.String()
	num := `\d+\.\d\d`
	for _, row := range []string{
		`idle-ws\s+20\s+-?` + num + ` KiB\s+-?` + num + ` KiB\s+naive-ws\s`,
		`idle-tcp\s+20\s+-?` + num + ` KiB\s+-?` + num + ` KiB\s+naive-tcp\s`,
		`broadcast\s+20\s+` + num + ` / ` + num + `\s+` + num + ` / ` + num + `\s+` + num + `x\s`,
		`broadcast-transient\s+20\s+` + num + ` / ` + num + `\s+` + num + ` / ` + num + `\s+` + num + `x\s`,
		`latency\s+` + num + ` / ` + num + ` / ` + num + `\s+` + num + ` / ` + num + ` / ` + num + `\s+` + num + `x\s`,
		`catchup\s+20\s+` + num + ` / ` + num + `\s+` + num + ` / ` + num + `\s+` + num + `x\s`,
	} {
		if !regexp.MustCompile(`(?m)^` + row).MatchString(got) {
			t.Errorf("output has no row matching %q", row)
		}
	}
	// Correctness, not speed: every acknowledged event reached its client
	// once, on both sides of the latency scenario, and every reconnecting
	// client got exactly what it missed.
	for want, n := range map[string]int{"lost 0, duplicated 0;": 2, "clients complete 40 of 40, entries lost 0, duplicated 0, unexpected 0": 2, "\nsummary": 1} {
		if got := bytes.Count(out.Bytes(), []byte(want)); got != n {
			t.Errorf("output holds %q %d times, want %d", want, got, n)
		}
	}
	if t.Failed() {
		t.Logf("output:\n%s", got)
	}
}

// TestGatewayCatchupDeferred runs the catch-up scenario on a node whose
// scheduler defers as soon as one sync computation is in flight: clients
// whose backlog the server deferred get it in a later round, so every
// client still ends with exactly what it missed, and the report counts
// the deferred ones apart instead of calling their entries lost. (The
// benchmark used to read only the first round.)
func TestGatewayCatchupDeferred(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out bytes.Buffer
	args := []string{"gateway", "-scenario", "catchup", "-n", "60", "-backlog", "5", "-catchup-runs", "1",
		"-sync-overload", "1", "-timeout", "3m"}
	if err := run(ctx, args, &out, io.Discard); err != nil {
		t.Fatalf("run %v: %v\noutput:\n%s", args, err, out.String())
	}
	got := out.String()
	if n := strings.Count(got, "clients complete 60 of 60, entries lost 0, duplicated 0, unexpected 0"); n != 2 {
		t.Errorf("%d sides with every client complete, want 2", n)
	}
	m := regexp.MustCompile(`deferred under load: (\d+) of 60 clients`).FindStringSubmatch(got)
	if m == nil || m[1] == "0" {
		t.Errorf("no client deferred with -sync-overload 1 (match %q)", m)
	}
	if t.Failed() {
		t.Logf("output:\n%s", got)
	}
}

func TestGatewayFlags(t *testing.T) {
	for _, args := range [][]string{
		{"gateway", "-scenario", "nope"},
		{"gateway", "-transport", "udp"},
		{"gateway", "-payload", "8"},
		{"gateway", "-n", "-1"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want a flag error", args)
		}
	}
}
