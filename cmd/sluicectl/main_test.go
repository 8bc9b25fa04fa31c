package main

import (
	"bytes"
	"context"
	"errors"
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

	"github.com/sluicehq/sluice/oplog"
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

// TestTopicsFanoutBuckets drives topics, fanout, segments and buckets
// through sluicectl against the real sluiced binary.
func TestTopicsFanoutBuckets(t *testing.T) {
	data := startSluiced(t)
	must := func(want string, args ...string) string {
		t.Helper()
		out, err := ctl(t, append([]string{"--data", data}, args...)...)
		if err != nil {
			t.Fatalf("sluicectl %v: %v\n%s", args, err, out)
		}
		if !regexp.MustCompile(want).MatchString(out) {
			t.Fatalf("sluicectl %v printed:\n%s\nwant %q", args, out, want)
		}
		return out
	}
	// Topics.
	must(`topic news backfill=2`, "topic", "create", "news", "--backfill", "2")
	must(`(?s)alice follow news from=\d+.*bob follow news`, "topic", "follow", "news", "alice", "bob")
	must(`news followers=2`, "topic", "followers", "news")
	must(`published news id=\d+ epoch=\d+`, "topic", "publish", "news", "--payload", "extra")
	must(`(?m)^news\s+followers=2 backfill=2`, "topic", "list")
	must(`bob unfollow news from=\d+ until=\d+`, "topic", "unfollow", "news", "bob")
	must(`news followers=1`, "topic", "followers", "news")
	if out, err := ctl(t, "--data", data, "topic", "publish", "nope"); !errors.Is(err, oplog.ErrUnknownTopic) {
		t.Fatalf("publish to an unknown topic: %v %s", err, out)
	}
	// Fanout to a list, streamed from a file, with progress.
	list := filepath.Join(t.TempDir(), "users")
	var b strings.Builder
	for i := range 2500 {
		fmt.Fprintf(&b, "user%d\n", i)
	}
	if err := os.WriteFile(list, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	must(`job big created(?s).*big list STATE_DONE total=2500 done=2500 failed=0`, "fanout", "send", "--id", "big", "--biz", "demo", "--users-file", list, "--wait")
	must(`big list STATE_DONE total=2500 done=2500`, "fanout", "status", "big")
	must(`(?m)^big list STATE_DONE`, "fanout", "list")
	must(`"hello from sluicectl"`, "inspect", "--user", "user2499", "--device", "phone")
	// A segment, and everyone.
	must(`segment vip size=2`, "segment", "add", "vip", "alice", "carol")
	must(`vip segment:vip STATE_DONE total=2 done=2`, "fanout", "send", "--id", "vip", "--segment", "vip", "--wait")
	must(`all everyone STATE_DONE total=1 done=1`, "fanout", "send", "--id", "all", "--everyone", "--wait")
	if out, err := ctl(t, "--data", data, "fanout", "status", "nosuchjob"); err == nil || !strings.Contains(err.Error(), "NOT_FOUND") {
		t.Fatalf("status of an unknown job: %v %s", err, out)
	}
	// Buckets.
	must(`(?m)^multi-device\s+priority=1 .*businesses=demo`, "buckets")
	must(`bucket promo priority=4`, "buckets", "define", "promo", "--priority", "4", "--rate", "100")
	must(`business demo in bucket promo`, "buckets", "assign", "demo", "promo")
	must(`(?m)^promo\s+priority=4 rate=100 .*businesses=demo`, "buckets")
	if out, err := ctl(t, "--data", data, "buckets", "assign", "demo", "nosuch"); err == nil || !strings.Contains(err.Error(), "NOT_FOUND") {
		t.Fatalf("assign to an unknown bucket: %v %s", err, out)
	}
	must(`business demo in bucket multi-device`, "buckets", "assign", "demo", "-")
	// Every projection rebuilds to the digest it had.
	for _, p := range []string{"SLUICE_TOPICS", "SLUICE_FOLLOWS", "SLUICE_SEGMENTS"} {
		before := must(`digest`, "digest", "--projection", p)
		after := must(`digest`, "rebuild", "--projection", p)
		d := regexp.MustCompile(`[0-9a-f]{64}`).FindString(before)
		if d == "" || !strings.Contains(after, d) {
			t.Fatalf("%s: digest %q before, rebuild printed:\n%s", p, d, after)
		}
	}
}
