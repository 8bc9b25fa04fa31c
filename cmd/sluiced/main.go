// Command sluiced runs the Sluice platform: with no flags, an embedded NATS
// server with JetStream storing under ./sluice-data, the oplog streams, the
// producer API, the inbox projection, topics (read diffusion), buckets,
// fanout, the client gateway (WebSocket and TLV sockets) and the admin
// HTTP API, all on localhost.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"golang.org/x/sync/errgroup"
)

func main() {
	cfg, err := parseConfig(os.Args[1:], os.Getenv)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sluiced:", err)
		os.Exit(2)
	}
	log := newLogger(cfg, isatty.IsTerminal(os.Stderr.Fd()))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	m := NewMain(cfg, log)
	err = m.Run(ctx)
	m.Close()
	if err != nil {
		log.Error().Err(err).Msg("sluiced stopped")
		os.Exit(1)
	}
	log.Info().Msg("sluiced stopped")
}

// Main is the sluiced process: Run starts everything and blocks until ctx
// ends; Close releases what Run built, in reverse order. Tests drive it
// in-process or as a child process.
type Main struct {
	cfg Config
	log zerolog.Logger

	ns         *server.Server
	nc         *nats.Conn
	lg         *oplog.Log
	inbox      *oplog.Inbox
	topics     *topics.Topics
	buckets    *buckets.Map
	sched      *buckets.Scheduler
	fanout     *fanout.Fanout
	delivery   *delivery.Delivery
	devices    *delivery.Registry
	analytics  *analytics.Ingestor
	aggregates *analytics.Aggregates
	breakers   *analytics.Breakers
	gateway    *gateway.Server
	admin      *http.Server
	// diagnostics: requests for devices' logs, and their uploads.
	diagnostics *analytics.Diagnostics

	mu        sync.Mutex
	ready     bool
	endpoints Endpoints
	closeOnce sync.Once
}

// Endpoints are the addresses sluiced serves, written to
// <data>/endpoints.json at start for tools (sluicectl) and tests.
type Endpoints struct {
	NATS      string `json:"nats"`
	Admin     string `json:"admin"`
	WebSocket string `json:"websocket"` // ws:// or wss:// URL of /v1/ws
	TCP       string `json:"tcp"`       // host:port of the TLV listener
	PID       int    `json:"pid"`
}

// NewMain builds nothing yet; Run does.
func NewMain(cfg Config, log zerolog.Logger) *Main { return &Main{cfg: cfg, log: log} }

// Run starts the platform and blocks until ctx ends or a component fails.
func (m *Main) Run(ctx context.Context) error {
	m.log.Info().Interface("config", m.cfg).Msg("sluiced starting")
	if err := os.MkdirAll(m.cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	auth, err := loadAdminAuth(m.cfg, m.log)
	if err != nil {
		return err
	}
	m.log.Info().Str("component", "admin").Str("token_source", auth.source).Strs("admins", auth.names()).Msg("admin api authentication")
	natsURL, err := m.connect()
	if err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	businesses, err := parseBusinesses(m.cfg.Businesses)
	if err != nil {
		return err
	}
	m.lg, err = oplog.Open(startCtx, oplog.Config{
		Conn:            m.nc,
		Shards:          m.cfg.Shards,
		Replicas:        m.cfg.Replicas,
		DuplicateWindow: m.cfg.DuplicateWindow,
		AtomicBatch:     m.cfg.AtomicBatch,
		Limits:          oplog.Limits{MaxPayload: m.cfg.MaxPayload, MaxTargets: m.cfg.MaxTargets},
		Logger:          &m.log,
	})
	if err != nil {
		return err
	}
	for _, b := range businesses {
		if _, ok := m.lg.Business(b.Code); ok {
			continue
		}
		if err := m.lg.RegisterBusiness(startCtx, b); err != nil {
			return err
		}
		m.log.Info().Str("business", b.Code).Str("dimension", b.Dimension.String()).Msg("business registered")
	}
	m.inbox, err = oplog.OpenInbox(oplog.InboxConfig{
		Log: m.lg, Dir: filepath.Join(m.cfg.DataDir, "inbox"), Logger: &m.log,
		// The embedded server has no other writer: project our own appends
		// from memory rather than reading each back through NATS.
		LocalFeed: m.cfg.NATSURL == "",
		// Producers reach the embedded server through the producer API, so
		// this process writes every entry: readers need not ask the
		// stream how far it goes.
		SoleWriter: m.cfg.NATSURL == "",
	})
	if err != nil {
		return err
	}
	svc, err := oplog.NewService(oplog.ServiceConfig{Log: m.lg, Logger: &m.log})
	if err != nil {
		return err
	}
	m.topics, err = topics.Open(startCtx, topics.Config{Log: m.lg, Dir: filepath.Join(m.cfg.DataDir, "topics"),
		SoleWriter: m.cfg.NATSURL == "", DuplicateWindow: m.cfg.DuplicateWindow, Logger: &m.log})
	if err != nil {
		return err
	}
	topicSvc, err := topics.NewService(topics.ServiceConfig{Topics: m.topics, Logger: &m.log})
	if err != nil {
		return err
	}
	if m.buckets, err = buckets.Open(startCtx, buckets.Config{Log: m.lg, Logger: &m.log}); err != nil {
		return err
	}
	m.sched = buckets.NewScheduler(buckets.SchedulerConfig{OverloadAt: m.cfg.SyncOverload})
	m.fanout, err = fanout.Open(startCtx, fanout.Config{Log: m.lg, Inbox: m.inbox, Global: everyone{m.topics},
		Dir: filepath.Join(m.cfg.DataDir, "fanout"), Concurrency: m.cfg.FanoutConcurrency, Logger: &m.log})
	if err != nil {
		return err
	}
	fanoutSvc, err := fanout.NewService(fanout.ServiceConfig{Fanout: m.fanout, Logger: &m.log})
	if err != nil {
		return err
	}
	if err := m.openDelivery(startCtx); err != nil {
		return err
	}
	gw, err := m.startGateway(startCtx)
	if err != nil {
		return err
	}
	m.gateway = gw.srv
	ln, err := net.Listen("tcp", m.cfg.AdminListen)
	if err != nil {
		_ = gw.tcp.Close()
		_ = gw.ws.Close()
		return fmt.Errorf("admin listener: %w", err)
	}
	m.admin = &http.Server{Handler: m.adminHandler(auth), ReadHeaderTimeout: 10 * time.Second}
	m.mu.Lock()
	m.endpoints = Endpoints{NATS: natsURL, Admin: "http://" + ln.Addr().String(), WebSocket: gw.wsURL,
		TCP: gw.tcp.Addr().String(), PID: os.Getpid()}
	m.mu.Unlock()
	if err := writeEndpoints(m.cfg.DataDir, m.endpoints); err != nil {
		_ = ln.Close()
		_ = gw.tcp.Close()
		_ = gw.ws.Close()
		return err
	}

	// Shutdown drains the gateway first (clients get GoAway and their
	// queued frames) while the core still runs, then stops the core.
	coreCtx, stopCore := context.WithCancel(context.Background())
	defer stopCore()
	g, gctx := errgroup.WithContext(coreCtx)
	drain := make(chan struct{})
	g.Go(func() error {
		select {
		case <-ctx.Done():
		case <-gctx.Done():
		}
		close(drain)
		return nil
	})
	g.Go(func() error { return m.lg.Run(gctx) })
	g.Go(func() error { return m.inbox.Run(gctx) })
	g.Go(func() error { return svc.Run(gctx) })
	g.Go(func() error { return m.topics.Run(gctx) })
	g.Go(func() error { return topicSvc.Run(gctx) })
	g.Go(func() error { return m.buckets.Run(gctx) })
	g.Go(func() error { return m.fanout.Run(gctx) })
	g.Go(func() error { return fanoutSvc.Run(gctx) })
	g.Go(func() error { return m.delivery.Run(gctx) })
	g.Go(func() error { return m.devices.Run(gctx) })
	g.Go(func() error { return m.aggregates.Run(gctx) })
	g.Go(func() error { return m.breakers.Run(gctx) })
	drained := gw.serve(gctx, g, drain, m)
	g.Go(func() error {
		if err := m.admin.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("admin: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-drained // the core serves the clients' last acks
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := m.admin.Shutdown(sctx)
		stopCore()
		return err
	})
	for _, ready := range []<-chan struct{}{svc.Ready(), topicSvc.Ready(), fanoutSvc.Ready()} {
		select {
		case <-ready:
		case <-gctx.Done():
			return g.Wait()
		}
	}
	m.mu.Lock()
	m.ready = true
	m.mu.Unlock()
	m.log.Info().Str("nats", natsURL).Str("admin", m.endpoints.Admin).Str("websocket", gw.wsURL).
		Str("tcp", m.endpoints.TCP).Msg("sluiced ready")
	return g.Wait()
}

// connect starts the embedded NATS server (unless --nats is set) and
// connects to it. It returns the URL producers should use.
func (m *Main) connect() (string, error) {
	nlog := m.log.With().Str("component", "nats").Logger()
	if m.cfg.NATSURL != "" {
		nc, err := nats.Connect(m.cfg.NATSURL, nats.Name("sluiced"), nats.MaxReconnects(-1))
		if err != nil {
			return "", fmt.Errorf("nats %s: %w", m.cfg.NATSURL, err)
		}
		m.nc = nc
		return m.cfg.NATSURL, nil
	}
	host, portStr, err := net.SplitHostPort(m.cfg.NATSListen)
	if err != nil {
		return "", fmt.Errorf("--nats-listen: %w", err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return "", fmt.Errorf("--nats-listen port: %w", err)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	opts := &server.Options{
		ServerName: "sluiced",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   filepath.Join(m.cfg.DataDir, "nats"),
		NoSigs:     true,
	}
	if m.cfg.Fsync == FsyncAlways {
		opts.SyncAlways = true
	} else {
		opts.SyncInterval = m.cfg.FsyncInterval
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return "", fmt.Errorf("embedded nats: %w", err)
	}
	ns.SetLoggerV2(natsLogger{nlog}, false, false, false)
	m.ns = ns
	go ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		return "", errors.New("embedded nats: not ready after 30s")
	}
	nc, err := nats.Connect("", nats.InProcessServer(ns), nats.Name("sluiced"), nats.MaxReconnects(-1))
	if err != nil {
		return "", fmt.Errorf("embedded nats connect: %w", err)
	}
	m.nc = nc
	return ns.ClientURL(), nil
}

// Close releases everything Run built, in reverse order. Idempotent; safe
// after a failed start.
func (m *Main) Close() {
	m.closeOnce.Do(func() {
		if m.fanout != nil {
			if err := m.fanout.Close(); err != nil {
				m.log.Error().Err(err).Msg("close fanout")
			}
		}
		if m.buckets != nil {
			_ = m.buckets.Close()
		}
		if m.delivery != nil {
			if err := m.delivery.Close(); err != nil {
				m.log.Error().Err(err).Msg("close delivery")
			}
		}
		if m.aggregates != nil {
			if err := m.aggregates.Close(); err != nil {
				m.log.Error().Err(err).Msg("close analytics")
			}
		}
		if m.devices != nil {
			if err := m.devices.Close(); err != nil {
				m.log.Error().Err(err).Msg("close device registry")
			}
		}
		if m.topics != nil {
			if err := m.topics.Close(); err != nil {
				m.log.Error().Err(err).Msg("close topics")
			}
		}
		if m.inbox != nil {
			if err := m.inbox.Close(); err != nil {
				m.log.Error().Err(err).Msg("close inbox")
			}
		}
		if m.lg != nil {
			_ = m.lg.Close()
		}
		if m.nc != nil {
			if err := m.nc.Drain(); err != nil {
				m.nc.Close()
			}
			for i := 0; i < 50 && !m.nc.IsClosed(); i++ {
				time.Sleep(20 * time.Millisecond)
			}
		}
		if m.ns != nil {
			m.ns.Shutdown()
			m.ns.WaitForShutdown()
		}
		_ = os.Remove(filepath.Join(m.cfg.DataDir, "endpoints.json"))
	})
}

func writeEndpoints(dir string, e Endpoints) error {
	data, _ := json.MarshalIndent(e, "", "  ")
	tmp := filepath.Join(dir, "endpoints.json.tmp")
	if err := os.WriteFile(tmp, append(data, '\n'), 0o640); err != nil {
		return fmt.Errorf("write endpoints: %w", err)
	}
	return os.Rename(tmp, filepath.Join(dir, "endpoints.json"))
}

// parseBusinesses reads "code:user|device[:single]" items.
func parseBusinesses(s string) ([]*oplogpb.Business, error) {
	var out []*oplogpb.Business
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		parts := strings.Split(item, ":")
		b := &oplogpb.Business{Code: parts[0], Dimension: oplogpb.Dimension_DIMENSION_USER}
		if len(parts) > 1 {
			switch parts[1] {
			case "user":
			case "device":
				b.Dimension = oplogpb.Dimension_DIMENSION_DEVICE
			default:
				return nil, fmt.Errorf("--businesses %q: dimension %q: want user or device", item, parts[1])
			}
		}
		if len(parts) > 2 {
			switch parts[2] {
			case "single":
				b.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_SINGLE
			case "multi":
			default:
				return nil, fmt.Errorf("--businesses %q: mode %q: want single or multi", item, parts[2])
			}
		}
		if len(parts) > 3 || !oplog.ValidBusiness(b.Code) {
			return nil, fmt.Errorf("--businesses %q: want code:user|device[:single]", item)
		}
		out = append(out, b)
	}
	return out, nil
}

// everyone stores a fanout to everyone as one message of the built-in
// topic every device reads (read diffusion).
type everyone struct{ tp *topics.Topics }

func (e everyone) Publish(ctx context.Context, ev *oplogpb.Event) (*oplogpb.Appended, error) {
	// One entry for every device: no inbox, so no dimension or device mode.
	ev.Topic = topics.Everyone
	ev.Dimension, ev.DeviceMode = oplogpb.Dimension_DIMENSION_UNSPECIFIED, oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED
	return e.tp.Publish(ctx, ev)
}
