package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"time"
)

// child is a server under test running in its own process: this binary,
// re-executed with the hidden gateway-server subcommand, in its own
// process group, killed with it should this process die.
type child struct {
	mode   string
	label  string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	info   childInfo
	dir    string // the child's temporary directory, removed by stop
	log    string // its standard error, kept in dir
	http   *http.Client
	exited chan struct{}
	cpu0   time.Duration
}

// childReadyWait bounds the start of a child.
const childReadyWait = 90 * time.Second

// startChild starts a server in mode with extra flags; label names it in
// progress and profile file names. Its data lives in its own temporary
// directory.
func startChild(ctx context.Context, cfg *gatewayConfig, mode, label string, extra ...string) (*child, error) {
	if mode == modeSluice && cfg.asSluiced && !slices.Contains(extra, "-topics") {
		// The gateway as sluiced runs it: topics (every session also
		// follows Everyone) and rounds by bucket.
		extra = append([]string{"-topics", "-buckets", "-sync-overload", strconv.Itoa(cfg.syncOverload)}, extra...)
	}
	return startChildOn(ctx, cfg, mode, label, "", extra...)
}

// startChildOn is startChild with the Sluice data in dataDir ("": in the
// child's temporary directory): several children, one after the other,
// can then serve the same data. stop leaves dataDir in place.
func startChildOn(ctx context.Context, cfg *gatewayConfig, mode, label, dataDir string, extra ...string) (_ *child, err error) {
	dir, err := os.MkdirTemp("", "sluice-bench-gw-")
	if err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	c := &child{mode: mode, label: label, dir: dir, log: filepath.Join(dir, "stderr.log"),
		http: &http.Client{Timeout: 2 * time.Minute}, exited: make(chan struct{})}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("own executable: %w", err)
	}
	if dataDir == "" {
		dataDir = filepath.Join(dir, "data")
	}
	args := []string{childCommand, "-mode", mode, "-dir", dataDir,
		"-heartbeat", cfg.heartbeat.String(), "-payload", strconv.Itoa(cfg.payload)}
	if mode == modeSluice {
		args = append(args, "-token-key", base64.StdEncoding.EncodeToString(cfg.tokenKey.Public().(ed25519.PublicKey)),
			"-atomic-batch", strconv.Itoa(cfg.atomicBatch))
	}
	if cfg.verbose {
		args = append(args, "-v")
	}
	args = append(args, extra...)
	// Should the run's context end (an interrupt), the child's process
	// group is killed at once; otherwise stop asks it to leave first.
	c.cmd = exec.CommandContext(ctx, exe, args...)
	childAttrs(c.cmd)
	c.cmd.WaitDelay = 5 * time.Second
	logf, err := os.Create(c.log)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor
	c.cmd.Stderr = logf
	stdout, err := c.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s server: %w", mode, err)
	}
	go func() {
		_ = c.cmd.Wait()
		close(c.exited)
	}()
	line := make(chan []byte, 1)
	go func() {
		br := bufio.NewReader(stdout)
		b, _ := br.ReadBytes('\n')
		line <- b
		_, _ = io.Copy(io.Discard, br)
	}()
	select {
	case b := <-line:
		if err := json.Unmarshal(bytes.TrimSpace(b), &c.info); err != nil || c.info.Admin == "" {
			<-c.exited
			return nil, fmt.Errorf("%s server did not start (%v): %s", mode, c.cmd.ProcessState, c.tail())
		}
	case <-time.After(childReadyWait):
		return nil, fmt.Errorf("%s server not ready after %v: %s", mode, childReadyWait, c.tail())
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	c.cpu0, _ = processCPU(c.info.PID)
	return c, nil
}

// tail is the end of the child's standard error, for error messages.
func (c *child) tail() string {
	b, _ := os.ReadFile(c.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	if len(b) == 0 {
		return "(no output)"
	}
	return string(b)
}

// cpu is the CPU time the child has used since it started serving.
func (c *child) cpu() time.Duration {
	d, ok := processCPU(c.info.PID)
	if !ok {
		return -1
	}
	return d
}

// stop asks the child to leave (its standard input closes), kills its
// process group if it is still there after a while, waits for it, and
// removes its directory. Idempotent.
func (c *child) stop() {
	if c.cmd != nil && c.cmd.Process != nil {
		if c.stdin != nil {
			_ = c.stdin.Close()
		}
		select {
		case <-c.exited:
		case <-time.After(15 * time.Second):
		}
		// Whatever is left of the group goes now, the child included.
		_ = killGroup(c.cmd)
		<-c.exited
	}
	if c.dir != "" {
		_ = os.RemoveAll(c.dir)
		c.dir = ""
	}
}

// call sends an admin request and decodes the JSON answer into out.
func (c *child) call(ctx context.Context, method, path string, q url.Values, out any) error {
	return c.do(ctx, c.http, method, path, q, out)
}

// callFor is call for requests that may take longer than the client's
// two minutes (bulk loads): limit bounds it instead.
func (c *child) callFor(ctx context.Context, limit time.Duration, method, path string, q url.Values, out any) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	return c.do(ctx, &http.Client{}, method, path, q, out)
}

func (c *child) do(ctx context.Context, hc *http.Client, method, path string, q url.Values, out any) error {
	u := c.info.Admin + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s server %s %s: %w", c.mode, method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s server %s %s: %w", c.mode, method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s server %s %s: %s: %s", c.mode, method, path, resp.Status, bytes.TrimSpace(body))
	}
	if out == nil {
		return nil
	}
	return json.Unmarshal(body, out)
}

// mem reads the child's memory after gcs garbage collections and a
// debug.FreeOSMemory.
func (c *child) mem(ctx context.Context, gcs int) (memReport, error) {
	var m memReport
	err := c.call(ctx, http.MethodGet, "/mem", url.Values{"gcs": {strconv.Itoa(gcs)}}, &m)
	return m, err
}

func (c *child) stats(ctx context.Context) (childStats, error) {
	var s childStats
	err := c.call(ctx, http.MethodGet, "/stats", nil, &s)
	return s, err
}

// waitSessions polls until the child holds exactly n sessions and n
// connections (so links being closed are gone too).
func (c *child) waitSessions(ctx context.Context, n int, within time.Duration) error {
	deadline := time.Now().Add(within)
	var last childStats
	for {
		st, err := c.stats(ctx)
		if err != nil {
			return err
		}
		if st.Sessions == n && st.Conns == int64(n) {
			return nil
		}
		last = st
		if time.Now().After(deadline) {
			return fmt.Errorf("%s server holds %d sessions on %d connections after %v, want %d", c.mode, last.Sessions, last.Conns, within, n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// profileStart starts a CPU profile of the child when -cpuprofile is set;
// the returned func stops it.
func (c *child) profileStart(ctx context.Context, cfg *gatewayConfig, phase string) (func() error, error) {
	if cfg.cpuProfile == "" {
		return func() error { return nil }, nil
	}
	path, err := filepath.Abs(fmt.Sprintf("%s.%s.%s.pprof", cfg.cpuProfile, c.label, phase))
	if err != nil {
		return nil, err
	}
	if err := c.call(ctx, http.MethodPost, "/profile/cpu/start", url.Values{"path": {path}}, nil); err != nil {
		return nil, err
	}
	return func() error {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return c.call(sctx, http.MethodPost, "/profile/cpu/stop", nil, nil)
	}, nil
}

// heapProfile writes a heap profile of the child when -memprofile is set.
func (c *child) heapProfile(ctx context.Context, cfg *gatewayConfig, phase string) error {
	if cfg.memProfile == "" {
		return nil
	}
	path, err := filepath.Abs(fmt.Sprintf("%s.%s.%s.pprof", cfg.memProfile, c.label, phase))
	if err != nil {
		return err
	}
	return c.call(ctx, http.MethodPost, "/profile/heap", url.Values{"path": {path}}, nil)
}

// errChildGone reports a child that exited while in use.
var errChildGone = errors.New("server process exited")

// alive returns errChildGone (with the child's last words) if it exited.
func (c *child) alive() error {
	select {
	case <-c.exited:
		return fmt.Errorf("%s: %w: %s", c.mode, errChildGone, c.tail())
	default:
		return nil
	}
}
