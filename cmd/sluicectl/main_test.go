package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// startSluiced builds and starts the real sluiced binary on free loopback
// ports with its data in a temporary directory; it stops at the end of the
// test. It returns the data directory, which holds endpoints.json.
func startSluiced(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "sluiced")
	build := exec.Command("go", "build", "-o", bin, "../sluiced")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build sluiced: %v\n%s", err, out)
	}
	data := filepath.Join(dir, "data")
	admin := freeAddr(t)
	var logs bytes.Buffer
	cmd := exec.Command(bin, "--data", data, "--nats-listen", freeAddr(t), "--admin", admin, "--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0", "--log-format", "json",
		"--businesses", "demo:user,settings:device")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("sluiced exited with %v\n%s", err, logs.String())
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("sluiced did not stop on SIGINT\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return data
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("sluiced not ready: %v\n%s", err, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func ctl(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	err := run(ctx, args, &out, &errOut)
	return out.String() + errOut.String(), err
}

func TestPublishThenInspect(t *testing.T) {
	data := startSluiced(t)
	out, err := ctl(t, "--data", data, "publish", "--user", "alice", "--payload", "first words")
	if err != nil {
		t.Fatalf("publish: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`appended demo/alice id=(\d+) epoch=(\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("publish printed %q, want the id and epoch", out)
	}
	id, epoch := m[1], m[2]

	out, err = ctl(t, "--data", data, "inspect", "--user", "alice", "--device", "phone")
	if err != nil {
		t.Fatalf("inspect: %v\n%s", err, out)
	}
	row := regexp.MustCompile(`(?m)^\s+` + id + `\s+` + epoch + `\s+demo\s+alice\s+.*"first words"$`)
	if !row.MatchString(out) {
		t.Fatalf("inspect printed:\n%s\nwant a row with id %s and epoch %s", out, id, epoch)
	}

	// A retry with the same message id answers the original id.
	for i := range 2 {
		out, err = ctl(t, "--data", data, "publish", "--user", "bob", "--msg-id", "order-1", "--json")
		if err != nil {
			t.Fatalf("publish: %v\n%s", err, out)
		}
		if i == 1 && !strings.Contains(out, "duplicate") {
			t.Fatalf("retry printed %q, want it marked duplicate", out)
		}
	}

	// Bad input is refused with a typed error.
	if out, err := ctl(t, "--data", data, "publish", "--user", "not.valid"); err == nil || !strings.Contains(err.Error(), "ERROR_CODE_INVALID_ID") {
		t.Fatalf("publish to a bad id: %v, %s", err, out)
	}

	// Rebuild twice: same digest as the live projection.
	out, err = ctl(t, "--data", data, "digest")
	if err != nil {
		t.Fatalf("digest: %v", err)
	}
	live := regexp.MustCompile(`digest=([0-9a-f]{64})`).FindStringSubmatch(out)
	if live == nil {
		t.Fatalf("digest printed %q", out)
	}
	for range 2 {
		out, err = ctl(t, "--data", data, "rebuild")
		if err != nil {
			t.Fatalf("rebuild: %v\n%s", err, out)
		}
		if !strings.Contains(out, "digest "+live[1]) || !strings.Contains(out, "100%") {
			t.Fatalf("rebuild printed:\n%s\nwant a progress bar at 100%% and digest %s", out, live[1])
		}
	}

	// Tail sees a new stored entry, with its id, and a transient one. It
	// subscribes to transient entries before it starts reading the stream,
	// so once it has the stored entry of a round it gets that round's
	// transient one.
	done := make(chan string, 1)
	go func() {
		out, err := ctl(t, "--data", data, "tail", "--user", "alice", "-n", "2")
		done <- fmt.Sprint(out, err)
	}()
	deadline := time.After(20 * time.Second)
	for {
		if _, err := ctl(t, "--data", data, "publish", "--user", "alice", "--payload", "live one"); err != nil {
			t.Fatal(err)
		}
		if _, err := ctl(t, "--data", data, "publish", "--user", "alice", "--payload", "typing", "--transient"); err != nil {
			t.Fatal(err)
		}
		select {
		case out := <-done:
			if !regexp.MustCompile(`id=\d+ business=demo target=alice kind=KIND_SYNC payload="live one"`).MatchString(out) ||
				!strings.Contains(out, `id=transient business=demo target=alice kind=KIND_SYNC payload="typing"`) {
				t.Fatalf("tail printed %q", out)
			}
			return
		case <-time.After(200 * time.Millisecond):
		case <-deadline:
			t.Fatal("tail saw nothing")
		}
	}
}
