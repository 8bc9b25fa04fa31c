package main

// The server side of the gateway benchmark: `sluice-bench gateway-server`,
// a hidden subcommand the benchmark runs as a child process (this binary,
// re-executed), so that what the server holds per connection is measured
// apart from the clients. It serves one mode until its standard input
// closes, it is signalled, or the admin API is told to quit:
//
//   - sluice: embedded NATS and JetStream (fsync always, or -fsync
//     interval) under -dir, oplog.Log (atomic batches as sluiced sets
//     them), Inbox (LocalFeed), Service, and gateway.Server on a loopback
//     TLV listener and an HTTP server with its WebSocket handler at /v1/ws.
//     With -topics, topics.Topics (SoleWriter, as sluiced) and its
//     Service, set as gateway.Config.Topics; with -buckets, buckets.Map
//     and a buckets.Scheduler (sluiced's defaults) as Config.Buckets and
//     Scheduler, and with -per-business Config.PerBusiness too.
//     -businesses replaces the two default businesses (chat, dev).
//   - naive-ws: a coder/websocket server with one reader and one writer
//     goroutine (fed by a channel) per connection.
//   - naive-tcp: a TCP server with one reader (bufio.Reader, 4 KiB) and one
//     writer (bufio.Writer, 4 KiB, fed by a channel) goroutine per
//     connection.
//   - raw-broadcast: a TCP server that answers a hello with a welcome and
//     -catchup one-item frames from memory, and on request writes one
//     frame to every connection in a loop.
//
// Once ready it prints one JSON line (childInfo) on standard output. The
// admin API (HTTP on loopback) answers:
//
//	GET  /mem?gcs=            runtime.GC gcs times (default 2), FreeOSMemory, then memReport
//	GET  /stats               connections and sessions now
//	POST /broadcast?round=&t0=   raw-broadcast: one frame to every connection
//	POST /catchup             sluice: wait until the inbox applied every entry
//	POST /topics/follow-many?topic=&from=&n=   sluice -topics: users from..from+n-1
//	                          (userID5) follow topic, with topics.FollowMany
//	GET  /scheduler           sluice -buckets: buckets.Scheduler.Stats()
//	POST /scheduler/reset     sluice -buckets: Scheduler.Reset()
//	POST /profile/cpu/start?path=, /profile/cpu/stop, /profile/heap?path=
//	POST /quit

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
)

// childCommand is the hidden subcommand that runs a server under test.
const childCommand = "gateway-server"

// Server modes.
const (
	modeSluice   = "sluice"
	modeNaiveWS  = "naive-ws"
	modeNaiveTCP = "naive-tcp"
	modeRaw      = "raw-broadcast"
)

// Businesses of the Sluice child: one per dimension.
const (
	bizUser   = "chat"
	bizDevice = "dev"
	benchApp  = "bench"
)

// childInfo is the line a ready child prints.
type childInfo struct {
	PID   int    `json:"pid"`
	Mode  string `json:"mode"`
	TCP   string `json:"tcp,omitempty"`  // TLV (or naive/raw TCP) listener
	WS    string `json:"ws,omitempty"`   // WebSocket URL
	NATS  string `json:"nats,omitempty"` // embedded NATS, loopback
	Admin string `json:"admin"`          // admin API base URL
	Epoch uint64 `json:"epoch,omitempty"`
}

// memReport is the answer to GET /mem.
type memReport struct {
	RSS        uint64 `json:"rss"`
	HeapInuse  uint64 `json:"heap_inuse"`
	StackInuse uint64 `json:"stack_inuse"`
	Sys        uint64 `json:"sys"`
	Goroutines int    `json:"goroutines"`
	Conns      int64  `json:"conns"`
	Sessions   int    `json:"sessions"`
}

// childStats is the answer to GET /stats.
type childStats struct {
	Conns    int64 `json:"conns"`
	Sessions int   `json:"sessions"`
}

// broadcastReply is the answer to POST /broadcast.
type broadcastReply struct {
	Conns  int   `json:"conns"`
	Errors int   `json:"errors"`
	TookNS int64 `json:"took_ns"`
}

type childConfig struct {
	mode        string
	dir         string
	tokenKey    ed25519.PublicKey
	heartbeat   time.Duration
	maxTargets  int
	atomic      int
	fsync       string
	topics      bool
	buckets     bool
	overloadAt  int // buckets.SchedulerConfig.OverloadAt (0: its default)
	perBusiness bool
	businesses  []*oplogpb.Business // nil: bizUser and bizDevice
	catchup     int
	payload     int
	verbose     bool
}

// benchServer is one mode's server.
type benchServer interface {
	stats() childStats
	// routes adds the mode's own admin endpoints.
	routes(mux *http.ServeMux)
	// failed is closed if the server fails while serving (nil: never).
	failed() <-chan struct{}
	// close stops serving and releases everything.
	close() error
}

func runGatewayServer(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c := &childConfig{}
	fs := flag.NewFlagSet("sluice-bench "+childCommand, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.mode, "mode", modeSluice, "sluice, naive-ws, naive-tcp or raw-broadcast")
	fs.StringVar(&c.dir, "dir", "", "data directory (sluice)")
	key := fs.String("token-key", "", "base64 Ed25519 public key that signs client tokens (sluice)")
	fs.DurationVar(&c.heartbeat, "heartbeat", 5*time.Minute, "gateway heartbeat (sluice)")
	fs.IntVar(&c.maxTargets, "max-targets", 0, "oplog Limits.MaxTargets (sluice; 0: default 1000)")
	fs.IntVar(&c.atomic, "atomic-batch", oplog.DefaultAtomicBatch, "oplog Config.AtomicBatch (sluice; 0: never; -1: as sluiced, by -fsync)")
	fs.StringVar(&c.fsync, "fsync", fsyncAlways, "JetStream fsync: always or interval (sluice)")
	fs.BoolVar(&c.topics, "topics", false, "serve topics: topics.Topics (SoleWriter) and its Service, as gateway.Config.Topics (sluice)")
	fs.BoolVar(&c.buckets, "buckets", false, "compute sync rounds by bucket: buckets.Map and a buckets.Scheduler in the gateway (sluice)")
	fs.IntVar(&c.overloadAt, "sync-overload", 0, "with -buckets: buckets.SchedulerConfig.OverloadAt, as sluiced's --sync-overload (sluice; 0: its default)")
	fs.BoolVar(&c.perBusiness, "per-business", false, "with -buckets: gateway.Config.PerBusiness, one read per business (sluice)")
	biz := fs.String("businesses", "", "businesses to register instead of chat and dev: code:user|device[:single], comma-separated (sluice)")
	fs.IntVar(&c.catchup, "catchup", 0, "one-item sync frames sent after every hello (raw-broadcast)")
	fs.IntVar(&c.payload, "payload", 128, "payload bytes of those frames (raw-broadcast)")
	fs.BoolVar(&c.verbose, "v", false, "log the components' warnings to stderr")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if c.mode == modeSluice {
		k, err := base64.StdEncoding.DecodeString(*key)
		if err != nil || len(k) != ed25519.PublicKeySize {
			return errors.New("-token-key: want a base64 Ed25519 public key")
		}
		c.tokenKey = k
		if c.dir == "" {
			return errors.New("-dir is required in mode sluice")
		}
		if c.fsync != fsyncAlways && c.fsync != fsyncInterval {
			return fmt.Errorf("-fsync %q: want always or interval", c.fsync)
		}
		if c.perBusiness && !c.buckets {
			return errors.New("-per-business needs -buckets")
		}
		if *biz != "" {
			var err error
			if c.businesses, err = parseBusinesses(*biz); err != nil {
				return err
			}
		}
	}
	if _, _, err := raiseFileLimit(); err != nil {
		fmt.Fprintln(stderr, "warning:", err)
	}
	log := zerolog.Nop()
	if c.verbose {
		log = zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: "15:04:05", NoColor: true}).
			Level(zerolog.WarnLevel).With().Timestamp().Str("component", "child").Logger()
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	info := childInfo{PID: os.Getpid(), Mode: c.mode}
	var (
		srv benchServer
		err error
	)
	switch c.mode {
	case modeSluice:
		srv, err = startSluiceServer(ctx, c, log, &info)
	case modeNaiveWS:
		srv, err = startNaiveWS(&info)
	case modeNaiveTCP:
		srv, err = startNaiveTCP(&info)
	case modeRaw:
		srv, err = startRawBroadcast(c, &info)
	default:
		err = fmt.Errorf("-mode %q: want sluice, naive-ws, naive-tcp or raw-broadcast", c.mode)
	}
	if err != nil {
		return err
	}
	defer func() {
		if cerr := srv.close(); cerr != nil {
			fmt.Fprintln(stderr, "close:", cerr)
		}
	}()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("admin listener: %w", err)
	}
	info.Admin = "http://" + ln.Addr().String()
	mux := http.NewServeMux()
	adminRoutes(mux, srv, cancel)
	srv.routes(mux)
	admin := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan error, 1)
	go func() { served <- admin.Serve(ln) }()
	defer func() {
		sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer scancel()
		_ = admin.Shutdown(sctx)
		<-served
		stopCPUProfile()
	}()

	line, err := json.Marshal(info)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(stdout, "%s\n", line); err != nil {
		return fmt.Errorf("announce: %w", err)
	}
	// The parent holds our standard input: when it closes (the parent
	// stopped us, or died), we stop too.
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		cancel()
	}()
	select {
	case <-ctx.Done():
		return nil
	case <-srv.failed():
		return fmt.Errorf("%s server failed", c.mode)
	}
}

// adminRoutes adds the endpoints every mode answers.
func adminRoutes(mux *http.ServeMux, srv benchServer, quit context.CancelFunc) {
	mux.HandleFunc("GET /mem", func(w http.ResponseWriter, r *http.Request) {
		gcs, err := strconv.Atoi(r.URL.Query().Get("gcs"))
		if err != nil || gcs < 0 || gcs > 100 {
			gcs = 2
		}
		for range gcs {
			runtime.GC()
		}
		debug.FreeOSMemory()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		st := srv.stats()
		writeJSON(w, memReport{RSS: residentBytes(), HeapInuse: m.HeapInuse, StackInuse: m.StackInuse, Sys: m.Sys,
			Goroutines: runtime.NumGoroutine(), Conns: st.Conns, Sessions: st.Sessions})
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, r *http.Request) { writeJSON(w, srv.stats()) })
	mux.HandleFunc("POST /profile/cpu/start", func(w http.ResponseWriter, r *http.Request) {
		if err := startCPUProfile(r.URL.Query().Get("path")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("POST /profile/cpu/stop", func(w http.ResponseWriter, r *http.Request) {
		if err := stopCPUProfile(); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("POST /profile/heap", func(w http.ResponseWriter, r *http.Request) {
		if err := writeHeapProfile(r.URL.Query().Get("path")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("POST /quit", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, struct{}{})
		quit()
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

var cpuProfile struct {
	sync.Mutex
	f *os.File
}

func startCPUProfile(path string) error {
	if path == "" {
		return errors.New("no path")
	}
	cpuProfile.Lock()
	defer cpuProfile.Unlock()
	if cpuProfile.f != nil {
		return errors.New("a CPU profile is running")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		_ = f.Close()
		return err
	}
	cpuProfile.f = f
	return nil
}

func stopCPUProfile() error {
	cpuProfile.Lock()
	defer cpuProfile.Unlock()
	if cpuProfile.f == nil {
		return nil
	}
	pprof.StopCPUProfile()
	err := cpuProfile.f.Close()
	cpuProfile.f = nil
	return err
}

func writeHeapProfile(path string) error {
	if path == "" {
		return errors.New("no path")
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	runtime.GC()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// sluiceServer is the platform as sluiced wires it, reduced to what the
// gateway needs: no dispatch registry, no admin API of its own.
type sluiceServer struct {
	*stack
	topics *topics.Topics     // nil without -topics
	bmap   *buckets.Map       // nil without -buckets
	sched  *buckets.Scheduler // nil without -buckets
	gw     *gateway.Server
	tcp    net.Listener
	ws     net.Listener
	http   *http.Server
	gctx   context.Context // ends when a component fails, or at close
	closed chan struct{}
}

func startSluiceServer(ctx context.Context, c *childConfig, log zerolog.Logger, info *childInfo) (_ *sluiceServer, err error) {
	s := &sluiceServer{closed: make(chan struct{})}
	defer func() {
		if err != nil {
			_ = s.close()
		}
	}()
	businesses := c.businesses
	if businesses == nil {
		businesses = []*oplogpb.Business{
			{Code: bizUser, Dimension: oplogpb.Dimension_DIMENSION_USER, Description: "sluice-bench gateway"},
			{Code: bizDevice, Dimension: oplogpb.Dimension_DIMENSION_DEVICE, Description: "sluice-bench gateway"},
		}
	}
	// By default as sluiced's default --fsync always: an ack means on
	// disk.
	s.stack, s.gctx, err = startStack(context.Background(), stackConfig{
		dir: c.dir, transport: transportInproc, syncAlways: c.fsync != fsyncInterval, service: true,
		atomicBatch: c.atomic,
		limits:      oplog.Limits{MaxTargets: c.maxTargets},
		businesses:  businesses,
	}, log)
	if err != nil {
		return nil, err
	}
	octx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var ready []<-chan struct{}
	if c.topics {
		// As sluiced with its embedded server.
		if s.topics, err = topics.Open(octx, topics.Config{Log: s.lg, Dir: filepath.Join(c.dir, "topics"), SoleWriter: true, Logger: &log}); err != nil {
			return nil, err
		}
		tp := s.topics
		s.closers = append(s.closers, tp.Close)
		svc, err := topics.NewService(topics.ServiceConfig{Topics: tp, Logger: &log})
		if err != nil {
			return nil, err
		}
		s.g.Go(func() error { return tp.Run(s.gctx) })
		s.g.Go(func() error { return svc.Run(s.gctx) })
		ready = append(ready, svc.Ready())
	}
	if c.buckets {
		if s.bmap, err = buckets.Open(octx, buckets.Config{Log: s.lg, Logger: &log}); err != nil {
			return nil, err
		}
		bm := s.bmap
		s.closers = append(s.closers, bm.Close)
		s.g.Go(func() error { return bm.Run(s.gctx) })
		s.sched = buckets.NewScheduler(buckets.SchedulerConfig{OverloadAt: c.overloadAt})
	}
	s.gw, err = gateway.NewServer(gateway.Config{
		Inbox:       s.inbox,
		Topics:      s.topics,
		Buckets:     s.bmap,
		Scheduler:   s.sched,
		PerBusiness: c.perBusiness,
		Tokens:      gateway.NewVerifier(c.tokenKey),
		Heartbeat:   c.heartbeat,
		Logger:      &log,
	})
	if err != nil {
		return nil, err
	}
	if s.tcp, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, fmt.Errorf("TLV listener: %w", err)
	}
	if s.ws, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, fmt.Errorf("WebSocket listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/v1/ws", s.gw.WebSocketHandler(nil))
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	tcp, ws := s.tcp, s.ws
	s.g.Go(func() error { return s.gw.ServeTCP(tcp) })
	s.g.Go(func() error {
		if err := s.http.Serve(ws); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	for _, r := range append(ready, s.svc.Ready()) {
		select {
		case <-r:
		case <-s.gctx.Done():
			return nil, fmt.Errorf("sluice components: %w", s.g.Wait())
		case <-time.After(time.Minute):
			return nil, errors.New("producer APIs not ready after 1m")
		}
	}
	info.TCP = s.tcp.Addr().String()
	info.WS = "ws://" + s.ws.Addr().String() + "/v1/ws"
	info.NATS = s.ns.ClientURL()
	info.Epoch = s.lg.Epoch(0)
	return s, nil
}

// failed is closed when a component ends before close.
func (s *sluiceServer) failed() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		select {
		case <-s.gctx.Done():
			select {
			case <-s.closed:
			default:
				close(ch)
			}
		case <-s.closed:
		}
	}()
	return ch
}

func (s *sluiceServer) stats() childStats {
	st := s.gw.Stats()
	return childStats{Conns: st.Conns, Sessions: st.Sessions}
}

// followManyReply is the answer to POST /topics/follow-many.
type followManyReply struct {
	Written   int    `json:"written"`
	Followers uint64 `json:"followers"` // of the topic afterwards
	TookNS    int64  `json:"took_ns"`   // FollowMany alone
}

func (s *sluiceServer) routes(mux *http.ServeMux) {
	mux.HandleFunc("POST /catchup", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
		defer cancel()
		if err := s.inbox.CatchUp(ctx); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, struct{}{})
	})
	mux.HandleFunc("POST /topics/follow-many", func(w http.ResponseWriter, r *http.Request) {
		if s.topics == nil {
			http.Error(w, "no topics (-topics)", http.StatusNotFound)
			return
		}
		q := r.URL.Query()
		from, err1 := strconv.Atoi(q.Get("from"))
		n, err2 := strconv.Atoi(q.Get("n"))
		if err1 != nil || err2 != nil || from < 0 || n < 1 || n > 10_000_000 {
			http.Error(w, "want from >= 0 and 1 <= n <= 10000000", http.StatusBadRequest)
			return
		}
		users := make([]string, n)
		for i := range users {
			users[i] = userID5(from + i)
		}
		start := time.Now()
		written, err := s.topics.FollowMany(r.Context(), q.Get("topic"), users)
		took := time.Since(start)
		if err != nil {
			http.Error(w, fmt.Sprintf("follow many (%d written): %v", written, err), http.StatusInternalServerError)
			return
		}
		followers, err := s.topics.Followers(r.Context(), q.Get("topic"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		writeJSON(w, followManyReply{Written: written, Followers: followers, TookNS: int64(took)})
	})
	mux.HandleFunc("GET /scheduler", func(w http.ResponseWriter, r *http.Request) {
		if s.sched == nil {
			http.Error(w, "no scheduler (-buckets)", http.StatusNotFound)
			return
		}
		writeJSON(w, s.sched.Stats())
	})
	mux.HandleFunc("POST /scheduler/reset", func(w http.ResponseWriter, r *http.Request) {
		if s.sched == nil {
			http.Error(w, "no scheduler (-buckets)", http.StatusNotFound)
			return
		}
		s.sched.Reset()
		writeJSON(w, struct{}{})
	})
}

// parseBusinesses reads code:user|device[:single], comma-separated, as
// sluiced's --businesses does.
func parseBusinesses(s string) ([]*oplogpb.Business, error) {
	var out []*oplogpb.Business
	for item := range strings.SplitSeq(s, ",") {
		parts := strings.Split(strings.TrimSpace(item), ":")
		b := &oplogpb.Business{Code: parts[0], Dimension: oplogpb.Dimension_DIMENSION_USER, Description: "sluice-bench"}
		if len(parts) < 2 || len(parts) > 3 || !oplog.ValidBusiness(b.Code) {
			return nil, fmt.Errorf("-businesses %q: want code:user|device[:single]", item)
		}
		switch parts[1] {
		case "user":
		case "device":
			b.Dimension = oplogpb.Dimension_DIMENSION_DEVICE
		default:
			return nil, fmt.Errorf("-businesses %q: dimension %q: want user or device", item, parts[1])
		}
		if len(parts) == 3 {
			if parts[2] != "single" {
				return nil, fmt.Errorf("-businesses %q: mode %q: want single", item, parts[2])
			}
			b.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_SINGLE
		}
		out = append(out, b)
	}
	return out, nil
}

// close shuts down in sluiced's order: gateway, HTTP, components, bucket
// map and topics, inbox, log, connection, server. Safe after a partial
// start.
func (s *sluiceServer) close() error {
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	var err error
	if s.gw != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = s.gw.Shutdown(ctx)
		cancel()
	}
	if s.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = s.http.Shutdown(ctx)
		cancel()
	}
	for _, ln := range []net.Listener{s.tcp, s.ws} {
		if ln != nil {
			_ = ln.Close()
		}
	}
	if s.stack != nil {
		err = s.stack.Close()
	}
	return err
}

// cannedWelcome is the answer of the naive and raw servers to a client's
// first frame.
func cannedWelcome() *gatewaypb.Frame {
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Welcome{Welcome: &gatewaypb.Welcome{
		SessionId: "naive", HeartbeatMs: 300_000, Version: wire.Version, Device: "naive"}}}
}

// connSet tracks the connections a baseline server holds.
type connSet struct {
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newConnSet() *connSet { return &connSet{conns: map[net.Conn]struct{}{}} }

func (s *connSet) add(c net.Conn) {
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
}

func (s *connSet) remove(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *connSet) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *connSet) snapshot() []net.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		out = append(out, c)
	}
	return out
}

// closeAll closes every connection and waits for their goroutines.
func (s *connSet) closeAll() {
	for _, c := range s.snapshot() {
		_ = c.Close()
	}
	s.wg.Wait()
}

// acceptLoop accepts on ln until it closes, serving each connection with
// serve in a goroutine tracked by set.
func acceptLoop(ln net.Listener, set *connSet, serve func(net.Conn)) {
	defer set.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(5 * time.Millisecond) // out of files and the like
			continue
		}
		set.add(c)
		set.wg.Add(1)
		go func() {
			defer set.wg.Done()
			defer set.remove(c)
			defer c.Close()
			serve(c)
		}()
	}
}

// naiveTCP is the TCP baseline of the idle scenario: a reader and a writer
// goroutine per connection, each with a 4 KiB buffer, and a channel
// between the reader and the writer.
type naiveTCP struct {
	ln  net.Listener
	set *connSet
}

func startNaiveTCP(info *childInfo) (*naiveTCP, error) {
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		return nil, err
	}
	welcome, err := codec.AppendTLV(nil, cannedWelcome(), false)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &naiveTCP{ln: ln, set: newConnSet()}
	s.set.wg.Add(1)
	go acceptLoop(ln, s.set, func(c net.Conn) {
		out := make(chan []byte, 16)
		done := make(chan struct{})
		go func() { // the writer
			defer close(done)
			bw := bufio.NewWriterSize(c, 4096)
			for b := range out {
				if _, err := bw.Write(b); err != nil {
					_ = c.Close()
					return
				}
				if len(out) == 0 {
					if err := bw.Flush(); err != nil {
						_ = c.Close()
						return
					}
				}
			}
		}()
		br := bufio.NewReaderSize(c, 4096)
		hdr := make([]byte, wire.HeaderSize)
		for first := true; ; first = false {
			if _, _, err := codec.ReadTLV(br, hdr); err != nil {
				break
			}
			if first {
				out <- welcome
			}
		}
		close(out)
		<-done
	})
	info.TCP = ln.Addr().String()
	return s, nil
}

func (s *naiveTCP) stats() childStats {
	n := s.set.count()
	return childStats{Conns: int64(n), Sessions: n}
}
func (s *naiveTCP) routes(mux *http.ServeMux) {}
func (s *naiveTCP) failed() <-chan struct{}   { return nil }
func (s *naiveTCP) close() error {
	_ = s.ln.Close()
	s.set.closeAll()
	return nil
}

// naiveWS is the WebSocket baseline of the idle scenario: coder/websocket
// with the HTTP handler's goroutine reading and one writer goroutine fed by
// a channel.
type naiveWS struct {
	ln   net.Listener
	http *http.Server
	wg   sync.WaitGroup

	mu    sync.Mutex
	conns map[*websocket.Conn]struct{}
}

func startNaiveWS(info *childInfo) (*naiveWS, error) {
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		return nil, err
	}
	welcome, err := codec.EncodeBinary(cannedWelcome(), false)
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &naiveWS{ln: ln, conns: map[*websocket.Conn]struct{}{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{wire.SubprotocolProto}})
		if err != nil {
			return
		}
		s.wg.Add(1)
		defer s.wg.Done()
		s.mu.Lock()
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		out := make(chan []byte, 16)
		done := make(chan struct{})
		go func() { // the writer
			defer close(done)
			for {
				select {
				case b := <-out:
					if err := c.Write(ctx, websocket.MessageBinary, b); err != nil {
						_ = c.CloseNow()
						return
					}
				case <-ctx.Done():
					return
				}
			}
		}()
		for first := true; ; first = false {
			if _, _, err := c.Read(ctx); err != nil {
				break
			}
			if first {
				out <- welcome
			}
		}
		cancel()
		<-done
		_ = c.CloseNow()
	})
	s.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = s.http.Serve(ln) }()
	info.WS = "ws://" + ln.Addr().String() + "/v1/ws"
	return s, nil
}

func (s *naiveWS) stats() childStats {
	s.mu.Lock()
	n := len(s.conns)
	s.mu.Unlock()
	return childStats{Conns: int64(n), Sessions: n}
}
func (s *naiveWS) routes(mux *http.ServeMux) {}
func (s *naiveWS) failed() <-chan struct{}   { return nil }

// close stops the HTTP server, then closes the hijacked connections it
// does not track.
func (s *naiveWS) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.http.Shutdown(ctx)
	s.mu.Lock()
	for c := range s.conns {
		_ = c.CloseNow()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// rawBroadcast is the floor of the broadcast and catch-up scenarios: no
// storage, no queues, frames written from memory straight to the sockets.
type rawBroadcast struct {
	ln    net.Listener
	set   *connSet
	codec *wire.Codec
	// ready holds the connections past their hello.
	mu    sync.Mutex
	ready map[net.Conn]struct{}
}

func startRawBroadcast(c *childConfig, info *childInfo) (*rawBroadcast, error) {
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		return nil, err
	}
	// What every client gets after its hello: a welcome, then -catchup
	// sync frames of one item each, the last with done set (a single
	// empty one if -catchup is 0).
	greeting, err := codec.AppendTLV(nil, cannedWelcome(), false)
	if err != nil {
		return nil, err
	}
	for i := range max(c.catchup, 1) {
		s := &gatewaypb.Sync{Done: i == max(c.catchup, 1)-1}
		if c.catchup > 0 {
			s.Items = []*gatewaypb.Item{benchItem(uint64(i+1), make([]byte, c.payload))}
		}
		if greeting, err = codec.AppendTLV(greeting, &gatewaypb.Frame{Body: &gatewaypb.Frame_Sync{Sync: s}}, false); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &rawBroadcast{ln: ln, set: newConnSet(), codec: codec, ready: map[net.Conn]struct{}{}}
	s.set.wg.Add(1)
	go acceptLoop(ln, s.set, func(conn net.Conn) {
		hdr := make([]byte, wire.HeaderSize)
		if _, _, err := codec.ReadTLV(conn, hdr); err != nil {
			return
		}
		if _, err := conn.Write(greeting); err != nil {
			return
		}
		s.mu.Lock()
		s.ready[conn] = struct{}{}
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			delete(s.ready, conn)
			s.mu.Unlock()
		}()
		for {
			if _, _, err := codec.ReadTLV(conn, hdr); err != nil {
				return
			}
		}
	})
	info.TCP = ln.Addr().String()
	return s, nil
}

// benchItem is an item shaped like the ones Sluice sends: id, epoch,
// business, kind, payload, creation time.
func benchItem(id uint64, payload []byte) *gatewaypb.Item {
	return &gatewaypb.Item{Id: id, Epoch: 1, Business: bizUser, Kind: int32(oplogpb.Kind_KIND_SYNC),
		Payload: payload, CreatedMs: time.Now().UnixMilli()}
}

func (s *rawBroadcast) stats() childStats {
	s.mu.Lock()
	n := len(s.ready)
	s.mu.Unlock()
	return childStats{Conns: int64(s.set.count()), Sessions: n}
}

func (s *rawBroadcast) routes(mux *http.ServeMux) {
	mux.HandleFunc("POST /broadcast", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		round, _ := strconv.ParseUint(q.Get("round"), 10, 64)
		t0, _ := strconv.ParseInt(q.Get("t0"), 10, 64)
		size, _ := strconv.Atoi(q.Get("payload"))
		payload := make([]byte, max(size, 16))
		binary.BigEndian.PutUint64(payload, round)
		binary.BigEndian.PutUint64(payload[8:], uint64(t0))
		frame, err := s.codec.AppendTLV(nil, &gatewaypb.Frame{Body: &gatewaypb.Frame_Live{Live: &gatewaypb.Live{
			Items: []*gatewaypb.Item{benchItem(round+1, payload)}}}}, false)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		s.mu.Lock()
		conns := make([]net.Conn, 0, len(s.ready))
		for c := range s.ready {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		start := time.Now()
		rep := broadcastReply{Conns: len(conns)}
		for _, c := range conns {
			_ = c.SetWriteDeadline(start.Add(10 * time.Second))
			if _, err := c.Write(frame); err != nil {
				rep.Errors++
			}
		}
		rep.TookNS = int64(time.Since(start))
		writeJSON(w, rep)
	})
}

func (s *rawBroadcast) failed() <-chan struct{} { return nil }

func (s *rawBroadcast) close() error {
	_ = s.ln.Close()
	s.set.closeAll()
	return nil
}
