package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"golang.org/x/sync/errgroup"
)

// Producer transports: how the benchmark's producers (raw publisher and
// Sluice producers alike) reach the server. Sluice's own connection is
// always in-process, as in sluiced.
const (
	transportTCP    = "tcp"
	transportInproc = "inproc"
)

// startNATS starts an embedded NATS server with JetStream storing in dir,
// listening on a random loopback port. syncAlways fsyncs every write;
// otherwise the server's default interval applies (2 minutes, as sluiced's
// --fsync interval default).
func startNATS(dir string, syncAlways bool) (*server.Server, error) {
	ns, err := server.NewServer(&server.Options{
		ServerName: "sluice-bench",
		Host:       "127.0.0.1",
		Port:       server.RANDOM_PORT,
		JetStream:  true,
		StoreDir:   dir,
		SyncAlways: syncAlways,
		NoSigs:     true,
		NoLog:      true,
	})
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		ns.Shutdown()
		ns.WaitForShutdown()
		return nil, errors.New("embedded nats: not ready after 30s")
	}
	return ns, nil
}

func stopNATS(ns *server.Server) {
	if ns != nil {
		ns.Shutdown()
		ns.WaitForShutdown()
	}
}

// connect connects a client to ns over the given transport.
func connect(ns *server.Server, transport, name string) (*nats.Conn, error) {
	opts := []nats.Option{nats.Name(name), nats.MaxReconnects(0)}
	url := ns.ClientURL()
	if transport == transportInproc {
		opts = append(opts, nats.InProcessServer(ns))
		url = ""
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect %s (%s): %w", name, transport, err)
	}
	return nc, nil
}

// closeConn drains nc (so replies and acks under way are delivered) and
// waits briefly for it to close.
func closeConn(nc *nats.Conn) {
	if nc == nil {
		return
	}
	if err := nc.Drain(); err != nil {
		nc.Close()
		return
	}
	for i := 0; i < 100 && !nc.IsClosed(); i++ {
		time.Sleep(10 * time.Millisecond)
	}
	nc.Close()
}

// stack is Sluice's producer side wired exactly as cmd/sluiced wires it:
// embedded server, one in-process connection, oplog.Log, oplog.Inbox and
// (optionally) oplog.Service, each run in an errgroup.
type stack struct {
	ns     *server.Server
	nc     *nats.Conn
	lg     *oplog.Log
	inbox  *oplog.Inbox
	svc    *oplog.Service // nil without stackConfig.service
	cancel context.CancelFunc
	g      *errgroup.Group // more components may join it
	// closers release what components that joined g hold (topics,
	// fanout, ...): Close calls them, last added first, once every
	// component has stopped and before the inbox closes.
	closers []func() error
}

// stackConfig says how to build a stack.
type stackConfig struct {
	dir        string // nats/ and inbox/ go inside it
	transport  string // how the stack's own connection reaches the server
	syncAlways bool   // fsync every write, as sluiced's default
	service    bool   // run the producer API too
	// atomicBatch is oplog Config.AtomicBatch; -1 chooses as sluiced
	// does: DefaultAtomicBatch with syncAlways, else 0.
	atomicBatch int
	limits      oplog.Limits
	// businesses are registered if absent. Default: benchBusiness.
	businesses []*oplogpb.Business
}

// benchBusiness is the business every benchmark event belongs to.
const benchBusiness = "bench"

// startStack starts a stack. The returned context ends when a component
// fails or Close is called: run phases under it so a failure stops them.
func startStack(ctx context.Context, c stackConfig, log zerolog.Logger) (*stack, context.Context, error) {
	s := &stack{}
	ok := false
	defer func() {
		if !ok {
			_ = s.Close()
		}
	}()
	var err error
	if s.ns, err = startNATS(filepath.Join(c.dir, "nats"), c.syncAlways); err != nil {
		return nil, nil, err
	}
	if s.nc, err = connect(s.ns, c.transport, "sluiced"); err != nil {
		return nil, nil, err
	}
	octx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	// As sluiced: group commit through atomic batches when every write is
	// fsynced.
	if c.atomicBatch < 0 {
		c.atomicBatch = 0
		if c.syncAlways {
			c.atomicBatch = oplog.DefaultAtomicBatch
		}
	}
	if s.lg, err = oplog.Open(octx, oplog.Config{Conn: s.nc, Logger: &log, AtomicBatch: c.atomicBatch, Limits: c.limits}); err != nil {
		return nil, nil, fmt.Errorf("open oplog: %w", err)
	}
	if c.businesses == nil {
		c.businesses = []*oplogpb.Business{{Code: benchBusiness, Dimension: oplogpb.Dimension_DIMENSION_USER, Description: "sluice-bench"}}
	}
	for _, b := range c.businesses {
		if _, known := s.lg.Business(b.Code); known {
			continue
		}
		if err := s.lg.RegisterBusiness(octx, b); err != nil {
			return nil, nil, fmt.Errorf("register business %s: %w", b.Code, err)
		}
	}
	if s.inbox, err = oplog.OpenInbox(oplog.InboxConfig{Log: s.lg, Dir: filepath.Join(c.dir, "inbox"), Logger: &log, LocalFeed: true, SoleWriter: true}); err != nil {
		return nil, nil, fmt.Errorf("open inbox: %w", err)
	}
	if c.service {
		if s.svc, err = oplog.NewService(oplog.ServiceConfig{Log: s.lg, Logger: &log}); err != nil {
			return nil, nil, fmt.Errorf("new service: %w", err)
		}
	}
	rctx, rcancel := context.WithCancel(ctx)
	s.cancel = rcancel
	g, gctx := errgroup.WithContext(rctx)
	s.g = g
	g.Go(func() error { return s.lg.Run(gctx) })
	g.Go(func() error { return s.inbox.Run(gctx) })
	if s.svc != nil {
		g.Go(func() error { return s.svc.Run(gctx) })
	}
	ok = true
	return s, gctx, nil
}

// Close stops the components and returns the first error one of them
// failed with; then runs the closers and closes the inbox, the log, the
// connection and the server, in reverse build order. Safe after a partial
// start.
func (s *stack) Close() error {
	var err error
	if s.cancel != nil {
		s.cancel()
		if werr := s.g.Wait(); werr != nil {
			err = fmt.Errorf("sluice components: %w", werr)
		}
	}
	for i := len(s.closers) - 1; i >= 0; i-- {
		if cerr := s.closers[i](); cerr != nil && err == nil {
			err = cerr
		}
	}
	s.closers = nil
	if s.inbox != nil {
		if cerr := s.inbox.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close inbox: %w", cerr)
		}
	}
	if s.lg != nil {
		_ = s.lg.Close()
	}
	closeConn(s.nc)
	stopNATS(s.ns)
	return err
}

// machineInfo describes where the numbers come from.
func machineInfo() string {
	cpu := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
		_ = f.Close()
	}
	return fmt.Sprintf("%d CPUs (%s), GOMAXPROCS %d, %s %s/%s, nats-server %s (embedded)",
		runtime.NumCPU(), cpu, runtime.GOMAXPROCS(0), runtime.Version(), runtime.GOOS, runtime.GOARCH, server.VERSION)
}
