package fanout_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Send one push to a list of users streamed in chunks, and read it back
// from one of their inboxes.
func Example() {
	dir, _ := os.MkdirTemp("", "sluice-fanout-example")
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
	_ = log.RegisterBusiness(ctx, &oplogpb.Business{Code: "promo"})
	inbox, err := oplog.OpenInbox(oplog.InboxConfig{Log: log, Dir: filepath.Join(dir, "inbox")})
	if err != nil {
		panic(err)
	}
	defer inbox.Close()
	fo, err := fanout.Open(ctx, fanout.Config{Log: log, Inbox: inbox, Dir: filepath.Join(dir, "fanout")})
	if err != nil {
		panic(err)
	}
	defer fo.Close()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	go func() { _ = inbox.Run(runCtx); done <- struct{}{} }()
	go func() { _ = fo.Run(runCtx); done <- struct{}{} }()
	defer func() { stop(); <-done; <-done }()

	// The producer creates the job, streams the recipients, and seals it.
	_, err = fo.Create(ctx, &fanoutpb.Job{
		Id:       "spring-sale",
		Event:    &oplogpb.Event{Kind: oplogpb.Kind_KIND_PUSH, Business: "promo", Payload: []byte("20% off")},
		Audience: &fanoutpb.Job_List{List: &fanoutpb.List{}},
	})
	if err != nil {
		panic(err)
	}
	_ = fo.AddRecipients(ctx, "spring-sale", 0, []string{"alice", "bob"})
	_ = fo.AddRecipients(ctx, "spring-sale", 1, []string{"carol"})
	_, _ = fo.Seal(ctx, "spring-sale", 2)

	st, _ := fo.Status(ctx, "spring-sale")
	for st.State != fanoutpb.State_STATE_DONE {
		time.Sleep(10 * time.Millisecond)
		st, _ = fo.Status(ctx, "spring-sale")
	}
	fmt.Printf("%s: %d of %d written\n", st.State, st.Done, st.Total)

	b, _ := inbox.Backlog(ctx, oplog.BacklogRequest{User: "carol", Device: "phone"})
	for _, e := range b.Entries {
		fmt.Printf("carol: %s %q\n", e.MessageId, e.Payload)
	}
	// Output:
	// STATE_DONE: 3 of 3 written
	// carol: fanout-spring-sale "20% off"
}
