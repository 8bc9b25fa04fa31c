// Package oplogtest runs the real parts the oplog needs, for tests: an
// embedded NATS server with JetStream on a temporary directory, and a Log
// and Inbox on top of it.
package oplogtest

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Options tune RunJetStream.
type Options struct {
	// SyncAlways fsyncs every write, as sluiced does by default.
	SyncAlways bool
	// StoreDir; default t.TempDir().
	StoreDir string
}

// RunJetStream starts an embedded NATS server with JetStream on a free
// loopback port and returns it with a connected client; both stop at the
// end of the test.
func RunJetStream(tb testing.TB, o Options) (*server.Server, *nats.Conn) {
	tb.Helper()
	dir := o.StoreDir
	if dir == "" {
		dir = tb.TempDir()
	}
	ns, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: dir,
		NoSigs: true, NoLog: true, SyncAlways: o.SyncAlways,
	})
	if err != nil {
		tb.Fatalf("nats server: %v", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		tb.Fatal("nats server not ready")
	}
	nc, err := nats.Connect(ns.ClientURL())
	if err != nil {
		ns.Shutdown()
		tb.Fatalf("nats connect: %v", err)
	}
	tb.Cleanup(func() {
		nc.Close()
		ns.Shutdown()
		ns.WaitForShutdown()
	})
	return ns, nc
}

// MustOpenLog opens a Log on nc and registers the given businesses.
func MustOpenLog(tb testing.TB, nc *nats.Conn, cfg oplog.Config, businesses ...*oplogpb.Business) *oplog.Log {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg.Conn = nc
	l, err := oplog.Open(ctx, cfg)
	if err != nil {
		tb.Fatalf("open log: %v", err)
	}
	tb.Cleanup(func() { _ = l.Close() })
	for _, b := range businesses {
		if err := l.RegisterBusiness(ctx, b); err != nil {
			tb.Fatalf("register %s: %v", b.Code, err)
		}
	}
	return l
}

// MustRunInbox opens an Inbox in a temporary directory (or dir), fed by
// l's own appends as in sluiced, and runs it until the end of the test.
func MustRunInbox(tb testing.TB, l *oplog.Log, dir string) *oplog.Inbox {
	tb.Helper()
	if dir == "" {
		dir = tb.TempDir()
	}
	in, err := oplog.OpenInbox(oplog.InboxConfig{Log: l, Dir: dir, LocalFeed: true})
	if err != nil {
		tb.Fatalf("open inbox: %v", err)
	}
	wait := RunUntilCleanup(tb, "inbox", in.Run)
	tb.Cleanup(func() {
		wait()
		_ = in.Close()
	})
	return in
}

// RunUntilCleanup runs fn in a goroutine until the end of the test; the
// returned func cancels it and waits (idempotent), reporting its error.
func RunUntilCleanup(tb testing.TB, name string, fn func(context.Context) error) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	finished := make(chan struct{})
	var err error
	go func() {
		defer close(finished)
		err = fn(ctx)
	}()
	stop = func() {
		cancel()
		<-finished
		if err != nil {
			tb.Errorf("%s run: %v", name, err)
			err = nil
		}
	}
	tb.Cleanup(stop)
	return stop
}

// MustRunService runs the producer service until the end of the test.
func MustRunService(tb testing.TB, l *oplog.Log) {
	tb.Helper()
	s, err := oplog.NewService(oplog.ServiceConfig{Log: l})
	if err != nil {
		tb.Fatal(err)
	}
	stop := RunUntilCleanup(tb, "service", s.Run)
	select {
	case <-s.Ready():
	case <-time.After(10 * time.Second):
		stop()
		tb.Fatal("service not ready after 10s")
	}
}
