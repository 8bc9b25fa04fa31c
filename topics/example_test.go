package topics_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
)

// A merchant's topic: followed by a user, published to once, read back as
// the backlog of one of the user's devices.
func Example() {
	dir, _ := os.MkdirTemp("", "sluice-topics-example")
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
	store, err := topics.Open(ctx, topics.Config{Log: log, Dir: dir + "/topics"})
	if err != nil {
		panic(err)
	}
	defer store.Close()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- store.Run(runCtx) }()
	defer func() { stop(); <-done }()

	if _, err := store.Create(ctx, &topicspb.Topic{Name: "acme", Description: "ACME's shop"}); err != nil {
		panic(err)
	}
	if _, err := store.Follow(ctx, "alice", "acme"); err != nil {
		panic(err)
	}
	res, err := store.Publish(ctx, &oplogpb.Event{Topic: "acme", Payload: []byte("spring sale")})
	if err != nil {
		panic(err)
	}
	fmt.Println("published id", res.Id)

	b, err := store.Backlog(ctx, topics.BacklogRequest{User: "alice", Device: "phone"})
	if err != nil {
		panic(err)
	}
	for _, e := range b.Entries {
		fmt.Printf("backlog: topic=%s id=%d payload=%s\n", e.Topic, e.Id, e.Payload)
	}
	// Output:
	// published id 1
	// backlog: topic=acme id=1 payload=spring sale
}
