package oplog_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Append an event for a user and read it back as the backlog of one of the
// user's devices.
func Example() {
	dir, _ := os.MkdirTemp("", "sluice-example")
	defer os.RemoveAll(dir)
	ns, _ := server.NewServer(&server.Options{JetStream: true, StoreDir: dir, DontListen: true, NoSigs: true, NoLog: true})
	go ns.Start()
	defer ns.Shutdown()
	ns.ReadyForConnections(10 * time.Second)
	nc, _ := nats.Connect("", nats.InProcessServer(ns))
	defer nc.Close()

	ctx := context.Background()
	log, err := oplog.Open(ctx, oplog.Config{Conn: nc})
	if err != nil {
		panic(err)
	}
	defer log.Close()
	_ = log.RegisterBusiness(ctx, &oplogpb.Business{Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER})
	inbox, err := oplog.OpenInbox(oplog.InboxConfig{Log: log, Dir: dir + "/inbox"})
	if err != nil {
		panic(err)
	}
	defer inbox.Close()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- inbox.Run(runCtx) }()
	defer func() { stop(); <-done }()

	res, err := log.Append(ctx, &oplogpb.Event{
		Kind: oplogpb.Kind_KIND_SYNC, Business: "chat", Targets: []string{"alice"}, Payload: []byte("hi"),
	})
	if err != nil {
		panic(err)
	}
	fmt.Println("appended id", res[0].Id)

	b, err := inbox.Backlog(ctx, oplog.BacklogRequest{User: "alice", Device: "phone"})
	if err != nil {
		panic(err)
	}
	for _, e := range b.Entries {
		fmt.Printf("backlog: id=%d business=%s payload=%s\n", e.Id, e.Business, e.Payload)
	}
	// Output:
	// appended id 1
	// backlog: id=1 business=chat payload=hi
}
