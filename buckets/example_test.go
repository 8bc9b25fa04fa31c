package buckets_test

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Plan a connect computation, move a business to another bucket at run
// time, and admit the computations through a Scheduler.
func Example() {
	dir, _ := os.MkdirTemp("", "sluice-buckets-example")
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
	for _, b := range []*oplogpb.Business{
		{Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER},
		{Code: "orders", Dimension: oplogpb.Dimension_DIMENSION_USER, DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_SINGLE},
		{Code: "config", Dimension: oplogpb.Dimension_DIMENSION_DEVICE},
		{Code: "notice", Dimension: oplogpb.Dimension_DIMENSION_USER},
	} {
		if err := log.RegisterBusiness(ctx, b); err != nil {
			panic(err)
		}
	}

	m, err := buckets.Open(ctx, buckets.Config{Log: log})
	if err != nil {
		panic(err)
	}
	defer m.Close()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error)
	go func() { done <- m.Run(runCtx) }()
	defer func() { stop(); <-done }()

	show := func() {
		for _, g := range m.Plan(log.Businesses()) {
			codes := make([]string, 0, len(g.Businesses))
			for _, b := range g.Businesses {
				codes = append(codes, b.Code)
			}
			// Businesses() has no order; a real caller does not care.
			fmt.Printf("  %s (priority %d): %d businesses\n", g.Bucket.Name, g.Bucket.Priority, len(codes))
		}
	}
	fmt.Println("default rule:")
	show()

	// Control events: a rate-limited bucket for notices.
	if err := m.Define(ctx, &bucketspb.Bucket{Name: "notices", Priority: 5, Rate: 100}); err != nil {
		panic(err)
	}
	if err := m.Assign(ctx, "notice", "notices"); err != nil {
		panic(err)
	}
	fmt.Println("after the move:")
	show()

	s := buckets.NewScheduler(buckets.SchedulerConfig{})
	for _, g := range m.Plan(log.Businesses()) {
		if ok, retry := s.Admit(g.Bucket, time.Now()); !ok {
			fmt.Println("deferred for", retry)
			continue
		}
		s.Begin()
		start := time.Now()
		// ... one inbox read for every business of g ...
		s.Record(g.Bucket.Name, 1, time.Since(start))
		s.End()
	}
	fmt.Println("bucket computations:", s.Stats().Totals.BucketComputations)
	// Output:
	// default rule:
	//   device (priority 1): 1 businesses
	//   multi-device (priority 1): 2 businesses
	//   user (priority 2): 1 businesses
	// after the move:
	//   device (priority 1): 1 businesses
	//   multi-device (priority 1): 1 businesses
	//   user (priority 2): 1 businesses
	//   notices (priority 5): 1 businesses
	// bucket computations: 4
}
