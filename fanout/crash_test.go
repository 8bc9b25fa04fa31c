package fanout

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// The crash test runs the workers in child processes (this test binary
// re-executed, as cmd/sluice-bench does with its gateway server) against
// the parent's NATS server, and kills them with SIGKILL mid-fanout.
const (
	envChild  = "SLUICE_FANOUT_TEST_CHILD" // set: run as a worker node
	envNATS   = "SLUICE_FANOUT_TEST_NATS"
	envDir    = "SLUICE_FANOUT_TEST_DIR"
	envShards = "SLUICE_FANOUT_TEST_SHARDS"
)

func TestMain(m *testing.M) {
	if os.Getenv(envChild) != "" {
		if err := runChild(); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// runChild is a worker node: Log, Inbox and Fanout running against the
// parent's server until its standard input closes (or it is killed).
func runChild() error {
	shards, _ := strconv.Atoi(os.Getenv(envShards))
	dir := os.Getenv(envDir)
	lg := zerolog.New(os.Stderr).Level(zerolog.InfoLevel).With().Timestamp().Logger()
	nc, err := nats.Connect(os.Getenv(envNATS))
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l, err := oplog.Open(ctx, oplog.Config{Conn: nc, Shards: shards, Logger: &lg})
	if err != nil {
		return err
	}
	defer l.Close()
	in, err := oplog.OpenInbox(oplog.InboxConfig{Log: l, Dir: filepath.Join(dir, "inbox"), LocalFeed: true, Logger: &lg})
	if err != nil {
		return err
	}
	defer in.Close()
	f, err := Open(ctx, Config{Log: l, Inbox: in, Dir: filepath.Join(dir, "fanout"), Logger: &lg})
	if err != nil {
		return err
	}
	defer f.Close()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return l.Run(gctx) })
	g.Go(func() error { return in.Run(gctx) })
	g.Go(func() error { return f.Run(gctx) })
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	cancel()
	return g.Wait()
}

// node is a child worker process.
type node struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	log    string
	exited chan struct{}
}

func startNode(t *testing.T, url string, shards int) *node {
	t.Helper()
	dir := t.TempDir()
	n := &node{log: filepath.Join(dir, "stderr.log"), exited: make(chan struct{})}
	n.cmd = exec.Command(os.Args[0], "-test.run=^$")
	n.cmd.Env = append(os.Environ(), envChild+"=1", envNATS+"="+url, envDir+"="+dir, envShards+"="+strconv.Itoa(shards))
	logf, err := os.Create(n.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	n.cmd.Stderr = logf
	out, err := n.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if n.stdin, err = n.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = n.cmd.Wait()
		close(n.exited)
	}()
	t.Cleanup(n.stop)
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		ready <- line
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case line := <-ready:
		if line != "ready\n" {
			<-n.exited
			t.Fatalf("node did not start: %s", n.tail())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("node not ready: %s", n.tail())
	}
	return n
}

// kill sends SIGKILL and waits for the process to be gone.
func (n *node) kill(t *testing.T) {
	t.Helper()
	if err := n.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill: %v", err)
	}
	<-n.exited
}

// stop asks the node to leave, and kills it if it does not.
func (n *node) stop() {
	_ = n.stdin.Close()
	select {
	case <-n.exited:
	case <-time.After(20 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.exited
	}
}

func (n *node) tail() string {
	b, _ := os.ReadFile(n.log)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// Worker nodes killed with SIGKILL mid-fanout, twice: the job resumes on
// a new node, and every recipient ends up with exactly one entry.
func TestKillMidFanout(t *testing.T) {
	const (
		shards     = 2
		recipients = 50_000
	)
	var url string
	e := mustEnv(t, envOptions{log: oplog.Config{Shards: shards}, noRun: true, natsURL: func(u string) { url = u }})
	ctx := ctxFor(t, 120*time.Second)
	ids := users("k", 0, recipients)

	first := startNode(t, url, shards)
	start := time.Now()
	if _, err := e.f.Create(ctx, listJob("crash")); err != nil {
		t.Fatal(err)
	}
	addList(t, ctx, e.f, "crash", ids, DefaultChunkSize)

	// waitDone waits until at least least recipients are written, and
	// fails if the job ended already: the kill would not be mid-fanout.
	waitDone := func(least uint64) *fanoutpb.Status {
		for {
			st, err := e.f.Status(ctx, "crash")
			if err != nil {
				t.Fatal(err)
			}
			if terminal(st.State) {
				t.Fatalf("job ended before the kill: %v", st)
			}
			if st.Done >= least {
				return st
			}
			select {
			case <-ctx.Done():
				t.Fatalf("job stalled at %v", st)
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	st := waitDone(recipients / 10)
	first.kill(t)
	t.Logf("first node killed at %d of %d", st.Done, recipients)

	second := startNode(t, url, shards)
	st = waitDone(max(st.Done+recipients/10, recipients/2))
	second.kill(t)
	t.Logf("second node killed at %d of %d", st.Done, recipients)
	if st.Done >= recipients*9/10 {
		t.Logf("(past 90%%: the node wrote fast)")
	}

	third := startNode(t, url, shards)
	st = waitEnded(t, ctx, e.f, "crash")
	took := time.Since(start)
	if st.State != fanoutpb.State_STATE_DONE || st.Total != recipients || st.Done != recipients || st.Failed != 0 {
		t.Errorf("status %v; want done, %d of %d", st, recipients, recipients)
	}
	got, other := entriesOf(t, ctx, e.l.JetStream(), shards, MessageID("crash"))
	checkExactlyOnce(t, got, ids)
	if other != 0 {
		t.Errorf("%d other entries", other)
	}
	if t.Failed() {
		t.Logf("third node's log: %s", third.tail())
	}
	// How many chunks a killed node had started and another finished.
	resumed := 0
	for n := range uint32(recipients / DefaultChunkSize) {
		s, err1 := e.f.done.Get(ctx, startedKey("crash", n))
		d, err2 := e.f.done.Get(ctx, doneKey("crash", n))
		if err1 != nil || err2 != nil {
			t.Fatalf("markers of chunk %d: %v, %v", n, err1, err2)
		}
		cd := new(fanoutpb.ChunkDone)
		if err := proto.Unmarshal(d.Value(), cd); err != nil {
			t.Fatal(err)
		}
		if string(s.Value()) != cd.Node {
			resumed++
		}
	}
	t.Logf("%d chunks resumed after a kill", resumed)
	t.Logf("%d recipients through two kills in %v", recipients, took)
}
