//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// The durability test: sluiced runs as a child process with the default
// fsync policy (always); several producers append events with acks over
// every producer path (single request, batch request, fire-and-forget
// ingest) while the child is killed with SIGKILL at random moments and
// restarted on the same ports and data directory. Afterwards every
// acknowledged event must be in the oplog stream exactly once, under the id
// its producer was given, with ids increasing per producer, target and
// business in send order; and the badger projection must agree with the
// stream, before and after a rebuild.
const (
	durWantAcked     = 20_000
	durWantKills     = 3
	durTargets       = 64               // targets per business
	durSingles       = 3                // connections on the single-request path,
	durSingleLanes   = 4                // each with this many concurrent producers
	durBatchers      = 2                // connections (one producer each) on the batch path
	durIngesters     = 2                // connections (one producer each) on the ingest path
	durKillMin       = 1 * time.Second  // random interval between kills
	durKillMax       = 4 * time.Second  //
	durReqTimeout    = 2 * time.Second  // per request attempt
	durProduceFor    = 75 * time.Second // longest production phase
	durFinishFor     = 30 * time.Second // to settle the events in flight at the stop
	durDrainFor      = 60 * time.Second // for the ingest stream to drain
	durReadyFor      = 30 * time.Second // for a (re)started sluiced to be ready
	durBusinessUser  = "demo"
	durBusinessDev   = "alerts"
	durBusinessesArg = "demo:user,alerts:device"
)

var (
	sluicedOnce     sync.Once
	sluicedBinDir   string
	sluicedBin      string
	sluicedBuildErr error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if sluicedBinDir != "" {
		_ = os.RemoveAll(sluicedBinDir)
	}
	os.Exit(code)
}

// buildSluiced builds the sluiced binary once per test process.
func buildSluiced(t *testing.T) string {
	t.Helper()
	sluicedOnce.Do(func() {
		dir, err := os.MkdirTemp("", "sluiced-bin-")
		if err != nil {
			sluicedBuildErr = err
			return
		}
		sluicedBinDir = dir
		gobin, err := exec.LookPath("go")
		if err != nil {
			sluicedBuildErr = fmt.Errorf("no go command to build sluiced: %w", err)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		bin := filepath.Join(dir, "sluiced")
		out, err := exec.CommandContext(ctx, gobin, "build", "-o", bin, ".").CombinedOutput()
		if err != nil {
			sluicedBuildErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		sluicedBin = bin
	})
	if sluicedBuildErr != nil {
		t.Fatalf("build sluiced: %v", sluicedBuildErr)
	}
	return sluicedBin
}

// freePort returns a free loopback port below the kernel's ephemeral range,
// so that no outgoing connection of a producer can take it while sluiced is
// down between a kill and its restart.
func freePort(t *testing.T, rng *rand.Rand, avoid ...int) int {
	t.Helper()
	lo, hi := 20000, 32767
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n-1 < hi {
				hi = n - 1
				lo = min(lo, hi-2000)
			}
		}
	}
	for range 200 {
		port := lo + rng.IntN(hi-lo+1)
		if slices.Contains(avoid, port) {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		_ = ln.Close()
		return port
	}
	// Fall back on any free port.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// daemon is the sluiced child process, restarted on the same ports and data
// directory after every kill.
type daemon struct {
	bin     string
	args    []string
	natsURL string
	admin   string // http://host:port
	data    string // data directory: sluiced keeps its admin token there
	logPath string
	logFile *os.File
	http    *http.Client

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	starts int
	kills  int
}

// note writes a marker line into the child's log.
func (d *daemon) note(format string, args ...any) {
	fmt.Fprintf(d.logFile, "=== durability test %s: %s ===\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// start starts sluiced and waits until /readyz answers 200. A child that
// exits at once because a port is taken is started again; any other early
// exit, and a child not ready in time, are errors.
func (d *daemon) start() (time.Duration, error) {
	begin := time.Now()
	for attempt := 1; ; attempt++ {
		off, _ := d.logFile.Seek(0, io.SeekEnd)
		err := d.startOnce()
		if err == nil {
			return time.Since(begin), nil
		}
		b, _ := os.ReadFile(d.logPath)
		portTaken := int64(len(b)) > off && bytes.Contains(b[off:], []byte("address already in use"))
		if !portTaken || attempt == 5 {
			return time.Since(begin), err
		}
		d.note("start %d: a port is taken, starting again", attempt)
		time.Sleep(time.Second)
	}
}

func (d *daemon) startOnce() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd != nil {
		return errors.New("sluiced is already running")
	}
	d.starts++
	d.note("start %d", d.starts)
	cmd := exec.Command(d.bin, d.args...)
	cmd.Stdout, cmd.Stderr = d.logFile, d.logFile
	// Should the test process die (a test timeout panics), take the child
	// along rather than leave it holding the ports.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start sluiced: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	deadline := time.Now().Add(durReadyFor)
	for {
		select {
		case <-exited:
			return fmt.Errorf("sluiced (start %d) exited before it was ready: %v", d.starts, cmd.ProcessState)
		default:
		}
		if d.ready() {
			d.cmd, d.exited = cmd, exited
			return nil
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("sluiced (start %d) not ready after %v", d.starts, durReadyFor)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func (d *daemon) ready() bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.admin+"/readyz", nil)
	if err != nil {
		return false
	}
	resp, err := d.http.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// kill sends SIGKILL and waits for the child to be gone.
func (d *daemon) kill() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return nil
	}
	_ = d.cmd.Process.Kill()
	select {
	case <-d.exited:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("sluiced pid %d still running 10s after SIGKILL", d.cmd.Process.Pid)
	}
	d.kills++
	d.note("SIGKILL %d (pid %d)", d.kills, d.cmd.Process.Pid)
	d.cmd, d.exited = nil, nil
	return nil
}

// tail returns the last n lines of the child's log.
func (d *daemon) tail(n int) string {
	b, err := os.ReadFile(d.logPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// getJSON GETs an admin URL and decodes a 200 answer into v.
func (d *daemon) getJSON(ctx context.Context, path string, v any) error {
	return d.doJSON(ctx, http.MethodGet, path, v)
}

func (d *daemon) doJSON(ctx context.Context, method, path string, v any) error {
	body, err := d.do(ctx, method, path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%s %s: %v: %s", method, path, err, body)
	}
	return nil
}

// do sends one admin request, with the admin token sluiced generated at
// its first start, and returns the body of a 200 answer.
func (d *daemon) do(ctx context.Context, method, path string) ([]byte, error) {
	return d.request(ctx, method, path, nil)
}

// Producer paths.
type durPath int

const (
	pathSingle durPath = iota // request/reply on SubjectAppend
	pathBatch                 // request/reply on SubjectAppendBatch
	pathIngest                // JetStream publish to the ingest stream
)

func (p durPath) String() string {
	return [...]string{"single", "batch", "ingest"}[p]
}

// durEvent is one event a producer sent, in its send order.
type durEvent struct {
	pb       *oplogpb.Event
	msgID    string
	target   string
	business string
	acked    bool   // the producer got an ack
	id       uint64 // the id answered (request paths) or found (ingest)
	epoch    uint64 // the epoch answered (request paths)
	attempts int

	// For diagnostics.
	ackedAt   time.Time
	killsAt   int64  // kills before the ack
	ingestSeq uint64 // sequence in the ingest stream
	storedAt  time.Time
}

func (e *durEvent) key() string { return e.msgID + "\x00" + e.target }

// describe tells when an event was acknowledged and stored.
func (e *durEvent) describe() string {
	s := e.msgID + ":"
	if e.ingestSeq != 0 {
		s += fmt.Sprintf(" ingest seq %d,", e.ingestSeq)
	}
	s += fmt.Sprintf(" acked after %d kills", e.killsAt)
	if !e.storedAt.IsZero() && !e.ackedAt.IsZero() {
		s += fmt.Sprintf(", entry created %v after the ack", e.storedAt.Sub(e.ackedAt).Round(time.Millisecond))
	}
	return s
}

// durRun is the shared state of one test run.
type durRun struct {
	t        *testing.T
	stop     chan struct{} // no new events after it closes
	finishBy atomic.Int64  // unix nanos: in-flight events are given up after it
	abort    atomic.Bool   // sluiced could not be restarted: give up at once

	kills       atomic.Int64
	acked       atomic.Int64
	ackedByPath [3]atomic.Int64
	retries     atomic.Int64 // request or publish attempts after the first
	dupReplies  atomic.Int64 // API results with duplicate=true
	dupIngest   atomic.Int64 // ingest PubAcks with duplicate=true
	errReplies  atomic.Int64 // retryable error replies (UNAVAILABLE, ...)
}

func (r *durRun) stopped() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

// giveUp says whether a producer must abandon the event it is retrying.
func (r *durRun) giveUp() bool {
	if r.abort.Load() {
		return true
	}
	fb := r.finishBy.Load()
	return fb != 0 && time.Now().UnixNano() > fb
}

// durProducer sends events on one path. Each of its events is retried with
// the same message id until it is acknowledged, and its next event is only
// sent after that, so its events to one target are strictly sequential
// (within a batch, in batch order). Producers on one connection (lanes) send
// to disjoint sets of targets.
type durProducer struct {
	name   string
	lane   int // this producer sends to targets i with i % lanes == lane
	lanes  int
	path   durPath
	run    *durRun
	rng    *rand.Rand
	conn   *durConn
	events []*durEvent
}

// durConn is a producer connection: unlimited reconnects, quickly. A
// request under way when the connection drops is abandoned at once (and
// retried) rather than left to time out: its reply cannot come.
type durConn struct {
	nc *nats.Conn
	js jetstream.JetStream

	mu   sync.Mutex
	down chan struct{} // closed when the connection drops
}

func durConnect(url, name string) (*durConn, error) {
	c := &durConn{down: make(chan struct{})}
	nc, err := nats.Connect(url,
		nats.Name("durability-"+name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(50*time.Millisecond),
		nats.ReconnectJitter(50*time.Millisecond, 50*time.Millisecond),
		nats.Timeout(time.Second),
		nats.DisconnectErrHandler(func(*nats.Conn, error) {
			c.mu.Lock()
			select {
			case <-c.down:
			default:
				close(c.down)
			}
			c.mu.Unlock()
		}),
		nats.ReconnectHandler(func(*nats.Conn) {
			c.mu.Lock()
			select {
			case <-c.down:
				c.down = make(chan struct{})
			default:
			}
			c.mu.Unlock()
		}),
		nats.NoCallbacksAfterClientClose(),
	)
	if err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, err
	}
	c.nc, c.js = nc, js
	return c, nil
}

// attempt returns the context of one request attempt: it ends after the
// request timeout or when the connection drops.
func (c *durConn) attempt() (context.Context, context.CancelFunc) {
	c.mu.Lock()
	down := c.down
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), durReqTimeout)
	go func() {
		select {
		case <-down:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

func (p *durProducer) newEvent() *durEvent {
	i := p.lane + p.lanes*p.rng.IntN(durTargets/p.lanes)
	e := &durEvent{msgID: fmt.Sprintf("%s-%06d", p.name, len(p.events))}
	dim := oplogpb.Dimension_DIMENSION_USER
	if p.rng.IntN(2) == 0 {
		e.business, e.target = durBusinessUser, "u"+strconv.Itoa(i)
	} else {
		e.business, e.target = durBusinessDev, "dev"+strconv.Itoa(i)
		dim = oplogpb.Dimension_DIMENSION_DEVICE
	}
	payload := fmt.Appendf(nil, "%s:%x", e.msgID, p.rng.Uint32())
	e.pb = &oplogpb.Event{
		Kind:      oplogpb.Kind_KIND_SYNC,
		Business:  e.business,
		Dimension: dim,
		Targets:   []string{e.target},
		Payload:   payload,
		MessageId: e.msgID,
	}
	p.events = append(p.events, e)
	return e
}

func (p *durProducer) produce() {
	for !p.run.stopped() && !p.run.abort.Load() {
		switch p.path {
		case pathSingle:
			p.sendSingle(p.newEvent())
		case pathBatch:
			batch := make([]*durEvent, 2+p.rng.IntN(40))
			for i := range batch {
				batch[i] = p.newEvent()
			}
			p.sendBatch(batch)
		case pathIngest:
			p.sendIngest(p.newEvent())
		}
	}
}

// backoff sleeps a little before a retry.
func (p *durProducer) backoff(attempt int) {
	p.run.retries.Add(1)
	d := time.Duration(min(attempt, 10)) * 10 * time.Millisecond
	time.Sleep(d + time.Duration(p.rng.IntN(20))*time.Millisecond)
}

func retryable(e *oplogpb.Error) bool {
	return e.Code == oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE || e.Code == oplogpb.ErrorCode_ERROR_CODE_INTERNAL
}

// checkResult records one acknowledged append result.
func (p *durProducer) checkResult(e *durEvent, r *oplogpb.AppendReply) bool {
	if len(r.Results) != 1 || r.Results[0].Target != e.target || r.Results[0].Id == 0 {
		p.run.t.Errorf("producer %s: event %s to %s: got results %v, want one result for %s with an id", p.name, e.msgID, e.target, r.Results, e.target)
		return false
	}
	res := r.Results[0]
	e.acked, e.id, e.epoch = true, res.Id, res.Epoch
	e.ackedAt, e.killsAt = time.Now(), p.run.kills.Load()
	if res.Duplicate {
		p.run.dupReplies.Add(1)
	}
	p.run.acked.Add(1)
	p.run.ackedByPath[p.path].Add(1)
	return true
}

func (p *durProducer) sendSingle(e *durEvent) {
	data, err := proto.Marshal(e.pb)
	if err != nil {
		p.run.t.Errorf("producer %s: marshal: %v", p.name, err)
		return
	}
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			if p.run.giveUp() {
				return
			}
			p.backoff(attempt)
		}
		e.attempts++
		ctx, cancel := p.conn.attempt()
		m, err := p.conn.nc.RequestWithContext(ctx, oplog.SubjectAppend, data)
		cancel()
		if err != nil {
			continue // timeout, no responders, disconnected: same event again
		}
		r := new(oplogpb.AppendReply)
		if err := proto.Unmarshal(m.Data, r); err != nil {
			p.run.t.Errorf("producer %s: event %s: undecodable reply: %v", p.name, e.msgID, err)
			return
		}
		if r.Error != nil {
			if retryable(r.Error) {
				p.run.errReplies.Add(1)
				continue
			}
			p.run.t.Errorf("producer %s: event %s refused: got %s %q, want an ack", p.name, e.msgID, r.Error.Code, r.Error.Message)
			return
		}
		p.checkResult(e, r)
		return
	}
}

func (p *durProducer) sendBatch(batch []*durEvent) {
	pending := batch
	for attempt := 0; len(pending) > 0; attempt++ {
		if attempt > 0 {
			if p.run.giveUp() {
				return
			}
			p.backoff(attempt)
		}
		b := &oplogpb.EventBatch{}
		for _, e := range pending {
			e.attempts++
			b.Events = append(b.Events, e.pb)
		}
		data, err := proto.Marshal(b)
		if err != nil {
			p.run.t.Errorf("producer %s: marshal: %v", p.name, err)
			return
		}
		ctx, cancel := p.conn.attempt()
		m, err := p.conn.nc.RequestWithContext(ctx, oplog.SubjectAppendBatch, data)
		cancel()
		if err != nil {
			continue
		}
		r := new(oplogpb.AppendBatchReply)
		if err := proto.Unmarshal(m.Data, r); err != nil {
			p.run.t.Errorf("producer %s: undecodable batch reply: %v", p.name, err)
			return
		}
		if r.Error != nil {
			if retryable(r.Error) {
				p.run.errReplies.Add(1)
				continue
			}
			p.run.t.Errorf("producer %s: batch of %d refused: got %s %q, want acks", p.name, len(pending), r.Error.Code, r.Error.Message)
			return
		}
		if len(r.Replies) != len(pending) {
			p.run.t.Errorf("producer %s: batch of %d: got %d replies, want %d", p.name, len(pending), len(r.Replies), len(pending))
			return
		}
		var again []*durEvent
		for i, rep := range r.Replies {
			e := pending[i]
			switch {
			case rep.Error == nil:
				if !p.checkResult(e, rep) {
					return
				}
			case retryable(rep.Error):
				p.run.errReplies.Add(1)
				again = append(again, e)
			default:
				p.run.t.Errorf("producer %s: event %s refused in a batch: got %s %q, want an ack", p.name, e.msgID, rep.Error.Code, rep.Error.Message)
				return
			}
		}
		pending = again
	}
}

func (p *durProducer) sendIngest(e *durEvent) {
	data, err := proto.Marshal(e.pb)
	if err != nil {
		p.run.t.Errorf("producer %s: marshal: %v", p.name, err)
		return
	}
	subj := oplog.SubjectIngest + "." + e.business
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			if p.run.giveUp() {
				return
			}
			p.backoff(attempt)
		}
		e.attempts++
		ctx, cancel := p.conn.attempt()
		ack, err := p.conn.js.Publish(ctx, subj, data, jetstream.WithMsgID(e.msgID), jetstream.WithExpectStream(oplog.StreamIngest))
		cancel()
		if err != nil {
			continue
		}
		if ack.Stream != oplog.StreamIngest || ack.Sequence == 0 {
			p.run.t.Errorf("producer %s: event %s: got PubAck %+v, want one from %s", p.name, e.msgID, ack, oplog.StreamIngest)
			return
		}
		if ack.Duplicate {
			p.run.dupIngest.Add(1)
		}
		e.acked, e.ingestSeq = true, ack.Sequence
		e.ackedAt, e.killsAt = time.Now(), p.run.kills.Load()
		p.run.acked.Add(1)
		p.run.ackedByPath[pathIngest].Add(1)
		return
	}
}

// problems collects failures of one kind, reported with a few examples.
type problems struct {
	what     string
	n        int
	examples []string
}

func (p *problems) add(format string, args ...any) {
	p.n++
	if len(p.examples) < 8 {
		p.examples = append(p.examples, fmt.Sprintf(format, args...))
	}
}

func (p *problems) report(t *testing.T) {
	t.Helper()
	if p.n > 0 {
		t.Errorf("%s: %d, e.g.\n\t%s", p.what, p.n, strings.Join(p.examples, "\n\t"))
	}
}

func TestDurability(t *testing.T) {
	if testing.Short() {
		t.Skip("durability test takes about a minute")
	}
	begin := time.Now()
	bin := buildSluiced(t)
	t.Logf("sluiced built in %v", time.Since(begin).Round(time.Millisecond))

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SLUICE_DURABILITY_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("SLUICE_DURABILITY_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (set SLUICE_DURABILITY_SEED to reuse the random choices; timing still varies)", seed)
	rng := rand.New(rand.NewPCG(seed, 0x5eed))

	tmp := t.TempDir()
	natsPort := freePort(t, rng)
	adminPort := freePort(t, rng, natsPort)
	logPath := filepath.Join(tmp, "sluiced.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{
		bin: bin,
		args: []string{
			"--data", filepath.Join(tmp, "data"),
			"--nats-listen", net.JoinHostPort("127.0.0.1", strconv.Itoa(natsPort)),
			"--admin", net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort)),
			"--ws-listen", "127.0.0.1:0", "--tcp-listen", "127.0.0.1:0",
			"--log-format", "json",
			"--businesses", durBusinessesArg,
		},
		natsURL: "nats://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(natsPort)),
		admin:   "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort)),
		data:    filepath.Join(tmp, "data"),
		logPath: logPath,
		logFile: logFile,
		http:    &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
	}
	// Cleanups run last-in first-out: the log tail is printed after the
	// child is gone and before the log file is closed.
	t.Cleanup(func() { _ = logFile.Close() })
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("sluiced log %s, last lines:\n%s", logPath, d.tail(80))
		}
	})
	t.Cleanup(func() {
		if err := d.kill(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})

	took, err := d.start()
	if err != nil {
		t.Fatalf("first start: %v", err)
	}
	t.Logf("sluiced ready in %v (nats %s, admin %s)", took.Round(time.Millisecond), d.natsURL, d.admin)

	// Producers.
	run := &durRun{t: t, stop: make(chan struct{})}
	var producers []*durProducer
	var conns []*durConn
	defer func() {
		for _, c := range conns {
			c.nc.Close()
		}
	}()
	for c := range durSingles + durBatchers + durIngesters {
		path, lanes := pathSingle, durSingleLanes
		switch {
		case c >= durSingles+durBatchers:
			path, lanes = pathIngest, 1
		case c >= durSingles:
			path, lanes = pathBatch, 1
		}
		conn, err := durConnect(d.natsURL, "p"+strconv.Itoa(c))
		if err != nil {
			t.Fatalf("producer connection %d: %v", c, err)
		}
		conns = append(conns, conn)
		for lane := range lanes {
			name := "p" + strconv.Itoa(c)
			if lanes > 1 {
				name += "." + strconv.Itoa(lane)
			}
			producers = append(producers, &durProducer{
				name: name, lane: lane, lanes: lanes, path: path, run: run, conn: conn,
				rng: rand.New(rand.NewPCG(seed, uint64(len(producers)+1))),
			})
		}
	}
	produceStart := time.Now()
	var wg sync.WaitGroup
	for _, p := range producers {
		wg.Go(p.produce)
	}

	// The killer: SIGKILL at random moments, restart at once on the same
	// ports and data directory, until the producers are stopped.
	type killRecord struct {
		at      time.Duration
		acked   int64
		restart time.Duration
	}
	var kills []killRecord
	killerDone := make(chan struct{})
	go func() {
		defer close(killerDone)
		krng := rand.New(rand.NewPCG(seed, 0xdead))
		for {
			wait := durKillMin + time.Duration(krng.Int64N(int64(durKillMax-durKillMin)))
			select {
			case <-run.stop:
				return
			case <-time.After(wait):
			}
			at, acked := time.Since(produceStart), run.acked.Load()
			if err := d.kill(); err != nil {
				t.Errorf("kill: %v", err)
				run.abort.Store(true)
				return
			}
			run.kills.Add(1)
			took, err := d.start()
			kills = append(kills, killRecord{at: at, acked: acked, restart: took})
			if err != nil {
				t.Errorf("restart after kill %d: %v", len(kills), err)
				run.abort.Store(true)
				return
			}
		}
	}()

	// Stop once enough events are acknowledged and enough kills happened.
	tick := time.NewTicker(20 * time.Millisecond)
	deadline := time.After(durProduceFor)
	for waiting := true; waiting; {
		select {
		case <-tick.C:
			if run.abort.Load() || (run.acked.Load() >= durWantAcked && run.kills.Load() >= durWantKills) {
				waiting = false
			}
		case <-deadline:
			waiting = false
		}
	}
	tick.Stop()
	run.finishBy.Store(time.Now().Add(durFinishFor).UnixNano())
	close(run.stop)
	<-killerDone
	wg.Wait()
	produced := time.Since(produceStart)
	if run.abort.Load() {
		t.Fatalf("sluiced could not be killed or restarted; see the log")
	}
	var unacked int
	for _, p := range producers {
		for _, e := range p.events {
			if !e.acked {
				unacked++
			}
		}
	}
	t.Logf("production: %v, %d events acked (single %d, batch %d, ingest %d), %d given up unacked; %d kills; %d retries, %d error replies, %d duplicate replies, %d duplicate ingest acks",
		produced.Round(time.Millisecond), run.acked.Load(), run.ackedByPath[pathSingle].Load(), run.ackedByPath[pathBatch].Load(), run.ackedByPath[pathIngest].Load(),
		unacked, len(kills), run.retries.Load(), run.errReplies.Load(), run.dupReplies.Load(), run.dupIngest.Load())
	for i, k := range kills {
		t.Logf("kill %d at %v with %d acked, ready again after %v", i+1, k.at.Round(time.Millisecond), k.acked, k.restart.Round(time.Millisecond))
	}
	if got := run.acked.Load(); got < durWantAcked {
		t.Errorf("events acked in %v: got %d, want at least %d", durProduceFor, got, durWantAcked)
	}
	if got := len(kills); got < durWantKills {
		t.Errorf("kills: got %d, want at least %d", got, durWantKills)
	}
	if unacked > 0 {
		t.Errorf("events still unacknowledged %v after the stop: got %d, want 0", durFinishFor, unacked)
	}

	ctx, cancel := context.WithTimeout(context.Background(), durDrainFor+30*time.Second)
	defer cancel()
	nc, err := nats.Connect(d.natsURL, nats.Name("durability-verifier"))
	if err != nil {
		t.Fatalf("verifier connect: %v", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}

	// Let the router drain the ingest stream (a message delivered before a
	// kill and never acked comes back after the router's ack wait).
	drainStart := time.Now()
	for {
		s, err := js.Stream(ctx, oplog.StreamIngest)
		var left uint64
		if err == nil {
			left = s.CachedInfo().State.Msgs
			if left == 0 {
				break
			}
		}
		if time.Since(drainStart) > durDrainFor {
			t.Fatalf("ingest stream after %v: got %d messages left (err %v), want 0", durDrainFor, left, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("ingest stream drained %v after the stop", time.Since(drainStart).Round(time.Millisecond))

	// Projection caught up: /v1/digest waits for it.
	proj := oplog.StreamOplog(0)
	var dg struct {
		Digest  string `json:"digest"`
		Applied uint64 `json:"applied"`
	}
	if err := d.getJSON(ctx, "/v1/digest?projection="+proj, &dg); err != nil {
		t.Fatalf("digest: %v", err)
	}

	// Read the whole oplog stream: the source of truth.
	s, err := js.Stream(ctx, proj)
	if err != nil {
		t.Fatalf("stream %s: %v", proj, err)
	}
	state := s.CachedInfo().State
	entries := readStream(ctx, t, s, state.Msgs)
	if got := uint64(len(entries)); got != state.Msgs {
		t.Fatalf("entries read from %s: got %d, want %d", proj, got, state.Msgs)
	}
	if dg.Applied != state.LastSeq {
		t.Errorf("projection %s applied after catch-up: got %d, want the stream's last seq %d", proj, dg.Applied, state.LastSeq)
	}
	t.Logf("oplog: %d entries, seq %d..%d, %d deleted/gaps", state.Msgs, state.FirstSeq, state.LastSeq, state.NumDeleted)

	// Index the stream and the producers' records.
	byKey := map[string][]storedEntry{}
	for _, se := range entries {
		k := se.entry.MessageId + "\x00" + se.entry.Target
		byKey[k] = append(byKey[k], se)
	}
	sent := map[string]*durEvent{}
	var epoch uint64
	epochs := problems{what: "acks with an epoch other than the first ack's"}
	for _, p := range producers {
		for _, e := range p.events {
			sent[e.key()] = e
			if e.epoch == 0 {
				continue
			}
			if epoch == 0 {
				epoch = e.epoch
			}
			if e.epoch != epoch {
				epochs.add("producer %s event %s: got epoch %d, want %d", p.name, e.msgID, e.epoch, epoch)
			}
		}
	}
	if want, _ := strconv.ParseUint(s.CachedInfo().Config.Metadata["sluice_epoch"], 10, 64); epoch != want {
		epochs.add("acks: got epoch %d, want the stream's epoch %d", epoch, want)
	}
	epochs.report(t)

	unknown := problems{what: "oplog entries no producer sent"}
	for _, se := range entries {
		if sent[se.entry.MessageId+"\x00"+se.entry.Target] == nil {
			unknown.add("seq %d: message id %q target %q business %q", se.seq, se.entry.MessageId, se.entry.Target, se.entry.Business)
		}
	}
	unknown.report(t)

	missing := problems{what: "acknowledged events missing from the oplog"}
	doubled := problems{what: "events stored more than once"}
	wrongID := problems{what: "acknowledged ids that are not the entry's sequence"}
	wrongBody := problems{what: "entries that differ from the event sent"}
	for _, p := range producers {
		for _, e := range p.events {
			got := byKey[e.key()]
			if len(got) > 1 {
				var seqs []uint64
				for _, g := range got {
					seqs = append(seqs, g.seq)
				}
				doubled.add("producer %s (%s) event %s to %s/%s: got seqs %v, want one", p.name, p.path, e.msgID, e.business, e.target, seqs)
			}
			if len(got) == 0 {
				if e.acked {
					missing.add("producer %s (%s) event %s to %s/%s (answered id %d, %d attempts): got no entry, want one", p.name, p.path, e.msgID, e.business, e.target, e.id, e.attempts)
				}
				continue
			}
			first := got[0]
			if en := first.entry; en.Business != e.business || en.Dimension != e.pb.Dimension || en.Kind != e.pb.Kind || !bytes.Equal(en.Payload, e.pb.Payload) {
				wrongBody.add("seq %d: got %s/%s %s %s payload %q, want %s/%s %s %s payload %q", first.seq,
					en.Business, en.Target, en.Dimension, en.Kind, en.Payload, e.business, e.target, e.pb.Dimension, e.pb.Kind, e.pb.Payload)
			}
			if !e.acked {
				continue
			}
			if first.entry.CreatedAt != nil {
				e.storedAt = first.entry.CreatedAt.AsTime()
			}
			if p.path == pathIngest {
				e.id = first.seq
			} else if e.id != first.seq {
				wrongID.add("producer %s (%s) event %s: got id %d in the ack, want the entry's seq %d", p.name, p.path, e.msgID, e.id, first.seq)
			}
		}
	}
	missing.report(t)
	doubled.report(t)
	wrongID.report(t)
	wrongBody.report(t)

	// How long ingested events waited for the router.
	var maxWait time.Duration
	var late int
	for _, p := range producers {
		for _, e := range p.events {
			if p.path != pathIngest || !e.acked || e.storedAt.IsZero() {
				continue
			}
			w := e.storedAt.Sub(e.ackedAt)
			maxWait = max(maxWait, w)
			if w > 5*time.Second {
				late++
			}
		}
	}
	t.Logf("ingest: entries created at most %v after the producer's ack; %d of %d more than 5s after", maxWait.Round(time.Millisecond), late, run.ackedByPath[pathIngest].Load())

	// Ids increase per producer, target and business, in send order.
	var order [3]problems
	for i := range order {
		order[i].what = "ids not increasing in send order per target and business on the " + durPath(i).String() + " path"
	}
	for _, p := range producers {
		lasts := map[string]*durEvent{}
		for _, e := range p.events {
			if !e.acked || e.id == 0 {
				continue
			}
			k := e.business + "/" + e.target
			if l, ok := lasts[k]; ok && e.id <= l.id {
				order[p.path].add("producer %s %s: event %s got id %d after %s got id %d (%s; %s)", p.name, k, e.msgID, e.id, l.msgID, l.id, e.describe(), l.describe())
			}
			lasts[k] = e
		}
	}
	for i := range order {
		order[i].report(t)
	}

	// The badger projection survived the kills: every inbox holds exactly
	// the stream's entries of its target.
	streamIDs := map[string][]uint64{} // target -> seqs
	for _, se := range entries {
		streamIDs[se.entry.Target] = append(streamIDs[se.entry.Target], se.seq)
	}
	inboxes := problems{what: "inboxes that differ from the stream"}
	for i := range durTargets {
		user, device := "u"+strconv.Itoa(i), "dev"+strconv.Itoa(i)
		var bl struct {
			Entries []json.RawMessage `json:"entries"`
			More    bool              `json:"more"`
		}
		q := url.Values{"user": {user}, "device": {device}, "limit": {"100000"}}
		if err := d.getJSON(ctx, "/v1/backlog?"+q.Encode(), &bl); err != nil {
			t.Fatalf("backlog: %v", err)
		}
		if bl.More {
			inboxes.add("backlog of %s/%s: got more=true, want the whole backlog", user, device)
		}
		got := map[string][]uint64{}
		for _, raw := range bl.Entries {
			var e oplogpb.Entry
			if err := protojson.Unmarshal(raw, &e); err != nil {
				t.Fatalf("backlog entry %s: %v", raw, err)
			}
			if se := entryAt(entries, e.Id); se == nil || se.entry.MessageId != e.MessageId || se.entry.Target != e.Target || se.entry.Business != e.Business {
				inboxes.add("backlog of %s/%s: got entry %d %s/%s %q, want the stream's entry %d", user, device, e.Id, e.Business, e.Target, e.MessageId, e.Id)
			}
			got[e.Target] = append(got[e.Target], e.Id)
		}
		for _, target := range []string{user, device} {
			g, w := got[target], streamIDs[target]
			slices.Sort(g)
			if !slices.Equal(g, w) {
				inboxes.add("inbox of %s: got %d ids (%s), want %d (%s)", target, len(g), diffIDs(g, w), len(w), diffIDs(w, g))
			}
		}
	}
	inboxes.report(t)

	// And a rebuild from the stream gives the same projection.
	var rb struct {
		Summary *oplog.RebuildSummary `json:"summary"`
		Error   string                `json:"error"`
	}
	if err := d.rebuild(ctx, proj, &rb); err != nil {
		t.Fatalf("rebuild: %v", err)
	}
	switch {
	case rb.Summary == nil:
		t.Errorf("rebuild of %s: got error %q, want a summary", proj, rb.Error)
	case rb.Summary.Digest != dg.Digest:
		t.Errorf("digest of %s: got %s after the kills, want %s as rebuilt from the stream", proj, dg.Digest, rb.Summary.Digest)
	}

	t.Logf("verified %d entries in %v; total %v", len(entries), time.Since(drainStart).Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
	logWarnings(t, logPath)
}

// storedEntry is one oplog message read back.
type storedEntry struct {
	seq   uint64
	entry *oplogpb.Entry
}

// readStream reads n messages of s in order with an ordered consumer.
func readStream(ctx context.Context, t *testing.T, s jetstream.Stream, n uint64) []storedEntry {
	t.Helper()
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		t.Fatalf("ordered consumer: %v", err)
	}
	out := make([]storedEntry, 0, n)
	for uint64(len(out)) < n {
		if ctx.Err() != nil {
			t.Fatalf("reading the oplog: got %d of %d entries: %v", len(out), n, ctx.Err())
		}
		batch, err := cons.Fetch(min(int(n)-len(out), 2000), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatalf("fetch: %v", err)
		}
		for m := range batch.Messages() {
			md, err := m.Metadata()
			if err != nil {
				t.Fatalf("metadata: %v", err)
			}
			e := new(oplogpb.Entry)
			if err := proto.Unmarshal(m.Data(), e); err != nil {
				t.Fatalf("seq %d: undecodable entry: %v", md.Sequence.Stream, err)
			}
			out = append(out, storedEntry{md.Sequence.Stream, e})
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			t.Fatalf("fetch: %v", err)
		}
	}
	return out
}

// entryAt finds the entry of a sequence in entries (sorted by seq).
func entryAt(entries []storedEntry, seq uint64) *storedEntry {
	i, ok := slices.BinarySearchFunc(entries, seq, func(e storedEntry, s uint64) int {
		switch {
		case e.seq < s:
			return -1
		case e.seq > s:
			return 1
		}
		return 0
	})
	if !ok {
		return nil
	}
	return &entries[i]
}

// diffIDs describes the ids of a that b lacks.
func diffIDs(a, b []uint64) string {
	var extra []uint64
	for _, id := range a {
		if _, ok := slices.BinarySearch(b, id); !ok {
			extra = append(extra, id)
		}
	}
	if len(extra) > 10 {
		return fmt.Sprintf("%d not in the other, e.g. %v", len(extra), extra[:10])
	}
	return fmt.Sprintf("%v not in the other", extra)
}

// rebuild replays a projection from zero and decodes the last NDJSON line.
func (d *daemon) rebuild(ctx context.Context, projection string, v any) error {
	body, err := d.do(ctx, http.MethodPost, "/v1/rebuild?"+url.Values{"projection": {projection}, "from": {"0"}}.Encode())
	if err != nil {
		return err
	}
	lines := bytes.Split(bytes.TrimSpace(body), []byte("\n"))
	return json.Unmarshal(lines[len(lines)-1], v)
}

var digits = regexp.MustCompile(`[0-9]+`)

// logWarnings logs the distinct warning and error messages of the sluiced
// log (numbers masked) with their counts.
func logWarnings(t *testing.T, path string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Logf("sluiced log: %v", err)
		return
	}
	counts := map[string]int{}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		var l struct {
			Level   string `json:"level"`
			Message string `json:"message"`
			Error   string `json:"error"`
		}
		if json.Unmarshal(line, &l) != nil || (l.Level != "warn" && l.Level != "error") {
			continue
		}
		msg := l.Level + ": " + l.Message
		if l.Error != "" {
			msg += ": " + l.Error
		}
		msg = digits.ReplaceAllString(msg, "N")
		if len(msg) > 160 {
			msg = msg[:160] + "…"
		}
		counts[msg]++
	}
	keys := slices.Sorted(maps.Keys(counts))
	for _, k := range keys {
		t.Logf("sluiced log: %d× %s", counts[k], k)
	}
}
