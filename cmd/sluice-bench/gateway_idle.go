package main

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"
)

// idleResult is the idle-memory scenario of one transport: Sluice and its
// naive baseline, each in a fresh child.
type idleResult struct {
	transport string
	conns     int
	sluice    idleSide
	base      idleSide
}

// idleSide is one server's memory before and after its connections.
type idleSide struct {
	mode          string
	before, after memReport
	connect       time.Duration // to open every connection and finish its handshake
}

// per divides the growth of one measure by the connections.
func (s idleSide) per(n int, f func(memReport) uint64) float64 {
	return (float64(f(s.after)) - float64(f(s.before))) / float64(n)
}

func (s idleSide) rssPer(n int) float64 { return s.per(n, func(m memReport) uint64 { return m.RSS }) }
func (s idleSide) heapStackPer(n int) float64 {
	return s.per(n, func(m memReport) uint64 { return m.HeapInuse + m.StackInuse })
}
func (s idleSide) heapPer(n int) float64 {
	return s.per(n, func(m memReport) uint64 { return m.HeapInuse })
}
func (s idleSide) stackPer(n int) float64 {
	return s.per(n, func(m memReport) uint64 { return m.StackInuse })
}
func (s idleSide) goroutinesPer(n int) float64 {
	return float64(s.after.Goroutines-s.before.Goroutines) / float64(n)
}

func (r idleResult) goal() float64 {
	if r.transport == transportWS {
		return goalIdleWS
	}
	return goalIdleTCP
}

// runIdle measures the idle memory per connection of one transport.
func runIdle(ctx context.Context, cfg *gatewayConfig, d *dialer, transport string, log zerolog.Logger) (idleResult, error) {
	r := idleResult{transport: transport, conns: cfg.idleN}
	base := modeNaiveTCP
	if transport == transportWS {
		base = modeNaiveWS
	}
	var err error
	if r.sluice, err = measureIdle(ctx, cfg, d, modeSluice, transport, log); err != nil {
		return r, fmt.Errorf("sluice: %w", err)
	}
	if r.base, err = measureIdle(ctx, cfg, d, base, transport, log); err != nil {
		return r, fmt.Errorf("%s: %w", base, err)
	}
	return r, nil
}

// measureIdle starts a server in mode, measures it, opens cfg.idleN idle
// connections (Sluice clients past Hello and their first sync round),
// and measures it again.
func measureIdle(ctx context.Context, cfg *gatewayConfig, d *dialer, mode, transport string, log zerolog.Logger) (idleSide, error) {
	s := idleSide{mode: mode}
	label := "idle-" + transport + "-" + mode
	srv, err := startChild(ctx, cfg, mode, label)
	if err != nil {
		return s, err
	}
	defer srv.stop()
	if s.before, err = srv.mem(ctx, cfg.memGCs); err != nil {
		return s, err
	}
	start := time.Now()
	fl, err := connectFleet(ctx, d, srv, transport, cfg.idleN, cfg.dialPar, mode == modeSluice, nil)
	if err != nil {
		return s, fmt.Errorf("connect: %w", err)
	}
	defer fl.close()
	s.connect = time.Since(start)
	if err := srv.waitSessions(ctx, cfg.idleN, 30*time.Second); err != nil {
		return s, err
	}
	// Let what a handshake starts and stops (flushers, sync rounds)
	// finish: idle means idle.
	select {
	case <-time.After(time.Second):
	case <-ctx.Done():
		return s, ctx.Err()
	}
	if s.after, err = srv.mem(ctx, cfg.memGCs); err != nil {
		return s, err
	}
	if mode == modeSluice {
		if err := srv.heapProfile(ctx, cfg, "idle"); err != nil {
			return s, err
		}
	}
	if err := fl.check(); err != nil {
		return s, err
	}
	if err := srv.alive(); err != nil {
		return s, err
	}
	log.Info().Str("server", mode).Str("transport", transport).Int("conns", cfg.idleN).Dur("connect", s.connect).
		Float64("rss_kib_per_conn", s.rssPer(cfg.idleN)/1024).Float64("heap_stack_kib_per_conn", s.heapStackPer(cfg.idleN)/1024).
		Float64("goroutines_per_conn", s.goroutinesPer(cfg.idleN)).Msg("idle memory")
	return s, nil
}
