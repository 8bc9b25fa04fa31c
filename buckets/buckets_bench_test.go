package buckets_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

// BenchmarkPlan_80Businesses plans the Alipay-sized registry: 80
// businesses of every kind, a fifth of them assigned to custom buckets.
func BenchmarkPlan_80Businesses(b *testing.B) {
	_, nc := oplogtest.RunJetStream(b, oplogtest.Options{})
	var bs []*oplogpb.Business
	for i := range 80 {
		biz := &oplogpb.Business{Code: fmt.Sprintf("biz%02d", i), Dimension: oplogpb.Dimension_DIMENSION_USER}
		switch i % 3 {
		case 1:
			biz.Dimension = oplogpb.Dimension_DIMENSION_DEVICE
		case 2:
			biz.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_SINGLE
		}
		bs = append(bs, biz)
	}
	l := oplogtest.MustOpenLog(b, nc, oplog.Config{}, bs...)
	m, err := buckets.Open(b.Context(), buckets.Config{Log: l})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	for _, name := range []string{"vip", "bulk"} {
		if err := m.Define(b.Context(), &bucketspb.Bucket{Name: name, Priority: 4}); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < 80; i += 5 {
		if err := m.Assign(b.Context(), bs[i].Code, []string{"vip", "bulk", buckets.OneShot}[i%3]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if len(m.Plan(bs)) == 0 {
			b.Fatal("empty plan")
		}
	}
}

func BenchmarkAdmit(b *testing.B) {
	s := buckets.NewScheduler(buckets.SchedulerConfig{})
	bucket := buckets.Bucket{Name: "user", Priority: 2, Rate: 1e9}
	now := time.Now()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if ok, _ := s.Admit(bucket, now); ok {
				s.Begin()
				s.Record(bucket.Name, 1, time.Millisecond)
				s.End()
			}
		}
	})
}
