package buckets_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

var (
	chat    = &oplogpb.Business{Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER, DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_MULTI}
	coupons = &oplogpb.Business{Code: "coupons", Dimension: oplogpb.Dimension_DIMENSION_USER, DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_SINGLE}
	config  = &oplogpb.Business{Code: "config", Dimension: oplogpb.Dimension_DIMENSION_DEVICE}
	notice  = &oplogpb.Business{Code: "notice", Dimension: oplogpb.Dimension_DIMENSION_USER}
	diag    = &oplogpb.Business{Code: "diag", Dimension: oplogpb.Dimension_DIMENSION_DEVICE}

	all = []*oplogpb.Business{chat, coupons, config, notice, diag}
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

// newLog starts JetStream and opens a Log with every test business.
func newLog(t *testing.T) (*nats.Conn, string, *oplog.Log) {
	t.Helper()
	ns, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	return nc, ns.ClientURL(), oplogtest.MustOpenLog(t, nc, oplog.Config{}, all...)
}

// mustOpenMap opens a Map on l and runs it until the end of the test.
func mustOpenMap(t *testing.T, l *oplog.Log) *buckets.Map {
	t.Helper()
	m, err := buckets.Open(ctx(t), buckets.Config{Log: l})
	if err != nil {
		t.Fatalf("open map: %v", err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("run: %v", err)
		}
		_ = m.Close()
	})
	return m
}

// groups renders a plan as "bucket: business business" lines.
func groups(plan []buckets.Group) []string {
	var out []string
	for _, g := range plan {
		s := g.Bucket.Name + ":"
		for _, b := range g.Businesses {
			s += " " + b.Code
		}
		out = append(out, s)
	}
	return out
}

func names(bs []buckets.Bucket) []string {
	var out []string
	for _, b := range bs {
		out = append(out, fmt.Sprintf("%s/%d", b.Name, b.Priority))
	}
	return out
}

func TestOpen_Defaults(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)

	want := []string{"global/0", "device/1", "multi-device/1", "user/2", "one-shot/3"}
	if got := names(m.Buckets()); !slices.Equal(got, want) {
		t.Errorf("Buckets() = %v, want %v", got, want)
	}
	for _, b := range m.Buckets() {
		if !b.Default || b.Rate != 0 {
			t.Errorf("bucket %+v: want a default bucket without rate limit", b)
		}
	}
	wantPlan := []string{"device: config diag", "multi-device: chat notice", "user: coupons"}
	if got := groups(m.Plan(all)); !slices.Equal(got, wantPlan) {
		t.Errorf("Plan = %v, want %v", got, wantPlan)
	}
	if got := m.Plan(nil); got != nil {
		t.Errorf("Plan(nil) = %v, want nil", got)
	}
	if got := m.Applied(); got != 0 {
		t.Errorf("Applied() = %d on an empty stream, want 0", got)
	}
}

func TestAssign_NextPlan(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)
	v0 := m.Version()

	if err := m.Assign(ctx(t), "notice", buckets.OneShot); err != nil {
		t.Fatalf("assign: %v", err)
	}
	// No polling: the move is applied when Assign returns.
	want := []string{"device: config diag", "multi-device: chat", "user: coupons", "one-shot: notice"}
	if got := groups(m.Plan(all)); !slices.Equal(got, want) {
		t.Errorf("Plan after assign = %v, want %v", got, want)
	}
	if got := m.BucketOf(notice); got != buckets.OneShot {
		t.Errorf("BucketOf(notice) = %q, want %q", got, buckets.OneShot)
	}
	if m.Version() == v0 {
		t.Errorf("Version() = %d after a move, unchanged", m.Version())
	}
	if m.Applied() == 0 {
		t.Error("Applied() = 0 after a move")
	}

	if err := m.Assign(ctx(t), "config", buckets.Global); err != nil {
		t.Fatalf("assign to global: %v", err)
	}
	want = []string{"global: config", "device: diag", "multi-device: chat", "user: coupons", "one-shot: notice"}
	if got := groups(m.Plan(all)); !slices.Equal(got, want) {
		t.Errorf("Plan after moving config to global = %v, want %v", got, want)
	}

	if err := m.Assign(ctx(t), "notice", ""); err != nil {
		t.Fatalf("assign back to default: %v", err)
	}
	if got := m.BucketOf(notice); got != buckets.MultiDevice {
		t.Errorf("BucketOf(notice) after reset = %q, want %q", got, buckets.MultiDevice)
	}
	if got, want := m.Assignments(), map[string]string{"config": buckets.Global}; !reflect.DeepEqual(got, want) {
		t.Errorf("Assignments() = %v, want %v", got, want)
	}
}

func TestDefine_SettingsAndOrder(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)

	if err := m.Define(ctx(t), &bucketspb.Bucket{Name: "vip", Priority: 0, Rate: 50, Burst: 10, Description: "paying users"}); err != nil {
		t.Fatalf("define vip: %v", err)
	}
	// Override a default: device goes after user.
	if err := m.Define(ctx(t), &bucketspb.Bucket{Name: buckets.Device, Priority: 5, Rate: 3}); err != nil {
		t.Fatalf("define device: %v", err)
	}
	want := []string{"global/0", "vip/0", "multi-device/1", "user/2", "one-shot/3", "device/5"}
	if got := names(m.Buckets()); !slices.Equal(got, want) {
		t.Errorf("Buckets() = %v, want %v", got, want)
	}
	got, ok := m.Bucket("vip")
	if wantB := (buckets.Bucket{Name: "vip", Priority: 0, Rate: 50, Burst: 10, Description: "paying users"}); !ok || got != wantB {
		t.Errorf("Bucket(vip) = %+v, %v; want %+v", got, ok, wantB)
	}
	if dev, _ := m.Bucket(buckets.Device); !dev.Default || dev.Rate != 3 {
		t.Errorf("Bucket(device) = %+v, want the default with rate 3", dev)
	}

	if err := m.Assign(ctx(t), "chat", "vip"); err != nil {
		t.Fatalf("assign: %v", err)
	}
	wantPlan := []string{"vip: chat", "multi-device: notice", "user: coupons", "device: config diag"}
	plan := m.Plan(all)
	if got := groups(plan); !slices.Equal(got, wantPlan) {
		t.Errorf("Plan = %v, want %v", got, wantPlan)
	}
	if plan[0].Bucket.Rate != 50 {
		t.Errorf("vip group settings %+v, want rate 50", plan[0].Bucket)
	}
}

func TestAssign_OtherNodeSeesIt(t *testing.T) {
	_, url, l1 := newLog(t)
	nc2, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc2.Close)
	l2 := oplogtest.MustOpenLog(t, nc2, oplog.Config{})
	m1, m2 := mustOpenMap(t, l1), mustOpenMap(t, l2)

	if err := m1.Define(ctx(t), &bucketspb.Bucket{Name: "vip", Rate: 5}); err != nil {
		t.Fatal(err)
	}
	if err := m1.Assign(ctx(t), "coupons", "vip"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for m2.BucketOf(coupons) != "vip" {
		if time.Now().After(deadline) {
			t.Fatalf("node 2: BucketOf(coupons) = %q 10s after the move, want vip", m2.BucketOf(coupons))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if b, ok := m2.Bucket("vip"); !ok || b.Rate != 5 {
		t.Errorf("node 2: Bucket(vip) = %+v, %v; want rate 5", b, ok)
	}
	// Moves made on node 2 reach node 1 the same way.
	if err := m2.Assign(ctx(t), "coupons", ""); err != nil {
		t.Fatal(err)
	}
	for m1.BucketOf(coupons) != buckets.User {
		if time.Now().After(deadline) {
			t.Fatalf("node 1: BucketOf(coupons) = %q, want user", m1.BucketOf(coupons))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReplay_SameState(t *testing.T) {
	nc, _, l := newLog(t)
	m := mustOpenMap(t, l)
	c := ctx(t)
	js := l.JetStream()

	steps := []func() error{
		func() error { return m.Define(c, &bucketspb.Bucket{Name: "vip", Rate: 10}) },
		func() error { return m.Define(c, &bucketspb.Bucket{Name: "bulk", Priority: 9, Rate: 0.5, Burst: 3}) },
		func() error { return m.Assign(c, "chat", "vip") },
		func() error { return m.Assign(c, "notice", "bulk") },
		func() error { return m.Assign(c, "diag", buckets.OneShot) },
		func() error { return m.Define(c, &bucketspb.Bucket{Name: buckets.User, Priority: 4}) },
		// Foreign events: another kind of control event, and garbage on
		// the bucket subjects. Both nodes must skip them alike.
		func() error { _, err := js.Publish(c, oplog.SubjectControl("release", "r1"), []byte("x")); return err },
		func() error {
			_, err := js.Publish(c, oplog.SubjectControl("bucket", "junk"), []byte{0xff, 0xff})
			return err
		},
		func() error { return m.Assign(c, "coupons", "vip") },
		func() error { return m.Remove(c, "vip") },
		func() error { return m.Define(c, &bucketspb.Bucket{Name: "vip", Priority: 1}) },
		func() error { return m.Define(c, &bucketspb.Bucket{Name: "bulk", Priority: 8, Rate: 1}) },
		// The stream ends with an event the Map does not follow: Open
		// must still know it has caught up.
		func() error { _, err := js.Publish(c, oplog.SubjectControl("release", "r2"), []byte("y")); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	// The live Map has applied every bucket event: the last step it waited
	// for comes after the garbage one.
	replayed, err := buckets.Open(c, buckets.Config{Log: oplogtest.MustOpenLog(t, nc, oplog.Config{})})
	if err != nil {
		t.Fatalf("open second map: %v", err)
	}
	defer replayed.Close()

	if got, want := replayed.Buckets(), m.Buckets(); !reflect.DeepEqual(got, want) {
		t.Errorf("replayed Buckets() = %+v\nlive = %+v", got, want)
	}
	if got, want := replayed.Assignments(), m.Assignments(); !reflect.DeepEqual(got, want) {
		t.Errorf("replayed Assignments() = %v, live = %v", got, want)
	}
	for _, b := range all {
		if got, want := replayed.BucketOf(b), m.BucketOf(b); got != want {
			t.Errorf("BucketOf(%s): replayed %q, live %q", b.Code, got, want)
		}
	}
	if got, want := replayed.Applied(), m.Applied(); got != want {
		t.Errorf("replayed Applied() = %d, live %d", got, want)
	}
	if got, want := replayed.Version(), m.Version(); got != want {
		t.Errorf("replayed Version() = %d, live %d", got, want)
	}
	// And the state is the one the steps describe.
	want := map[string]string{"notice": "bulk", "diag": buckets.OneShot}
	if got := replayed.Assignments(); !reflect.DeepEqual(got, want) {
		t.Errorf("Assignments() = %v, want %v", got, want)
	}
	wantBuckets := []string{"global/0", "device/1", "multi-device/1", "vip/1", "one-shot/3", "user/4", "bulk/8"}
	if got := names(replayed.Buckets()); !slices.Equal(got, wantBuckets) {
		t.Errorf("Buckets() = %v, want %v", got, wantBuckets)
	}
}

func TestRemove_BackToDefaultRule(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)
	c := ctx(t)
	if err := m.Define(c, &bucketspb.Bucket{Name: "vip"}); err != nil {
		t.Fatal(err)
	}
	for _, code := range []string{"chat", "coupons", "config"} {
		if err := m.Assign(c, code, "vip"); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := groups(m.Plan(all)), []string{"vip: chat coupons config", "device: diag", "multi-device: notice"}; !slices.Equal(got, want) {
		t.Errorf("Plan before remove = %v, want %v", got, want)
	}
	if err := m.Remove(c, "vip"); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if _, ok := m.Bucket("vip"); ok {
		t.Error("Bucket(vip) exists after Remove")
	}
	want := []string{"device: config diag", "multi-device: chat notice", "user: coupons"}
	if got := groups(m.Plan(all)); !slices.Equal(got, want) {
		t.Errorf("Plan after remove = %v, want %v", got, want)
	}
	// A new bucket of the same name starts empty.
	if err := m.Define(c, &bucketspb.Bucket{Name: "vip"}); err != nil {
		t.Fatal(err)
	}
	if got := groups(m.Plan(all)); !slices.Equal(got, want) {
		t.Errorf("Plan after redefining vip = %v, want %v", got, want)
	}
}

func TestInvalidInput_WritesNothing(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)
	c := ctx(t)
	if err := m.Define(c, &bucketspb.Bucket{Name: "vip"}); err != nil {
		t.Fatal(err)
	}
	stream, err := l.JetStream().Stream(c, oplog.StreamControl)
	if err != nil {
		t.Fatal(err)
	}
	before := stream.CachedInfo().State.Msgs

	long := "a123456789b123456789c123456789d12" // 33
	tests := []struct {
		name string
		call func() error
		want error
	}{
		{"define nil", func() error { return m.Define(c, nil) }, oplog.ErrInvalid},
		{"define empty name", func() error { return m.Define(c, &bucketspb.Bucket{}) }, oplog.ErrInvalidID},
		{"define upper case", func() error { return m.Define(c, &bucketspb.Bucket{Name: "VIP"}) }, oplog.ErrInvalidID},
		{"define dot", func() error { return m.Define(c, &bucketspb.Bucket{Name: "a.b"}) }, oplog.ErrInvalidID},
		{"define wildcard", func() error { return m.Define(c, &bucketspb.Bucket{Name: "*"}) }, oplog.ErrInvalidID},
		{"define too long", func() error { return m.Define(c, &bucketspb.Bucket{Name: long}) }, oplog.ErrInvalidID},
		{"priority -1", func() error { return m.Define(c, &bucketspb.Bucket{Name: "x", Priority: -1}) }, oplog.ErrInvalid},
		{"priority 10", func() error { return m.Define(c, &bucketspb.Bucket{Name: "x", Priority: 10}) }, oplog.ErrInvalid},
		{"negative rate", func() error { return m.Define(c, &bucketspb.Bucket{Name: "x", Rate: -1}) }, oplog.ErrInvalid},
		{"negative burst", func() error { return m.Define(c, &bucketspb.Bucket{Name: "x", Burst: -1}) }, oplog.ErrInvalid},
		{"define removed", func() error { return m.Define(c, &bucketspb.Bucket{Name: "vip", Removed: true}) }, oplog.ErrInvalid},
		{"remove default", func() error { return m.Remove(c, buckets.User) }, oplog.ErrInvalid},
		{"remove global", func() error { return m.Remove(c, buckets.Global) }, oplog.ErrInvalid},
		{"remove unknown", func() error { return m.Remove(c, "nope") }, oplog.ErrNotFound},
		{"remove bad name", func() error { return m.Remove(c, "a b") }, oplog.ErrInvalidID},
		{"assign unknown business", func() error { return m.Assign(c, "nobody", "vip") }, oplog.ErrUnknownBusiness},
		{"assign bad business", func() error { return m.Assign(c, "Chat", "vip") }, oplog.ErrInvalidID},
		{"assign unknown bucket", func() error { return m.Assign(c, "chat", "nope") }, oplog.ErrNotFound},
		{"assign bad bucket", func() error { return m.Assign(c, "chat", "v.i.p") }, oplog.ErrInvalidID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); !errors.Is(err, tt.want) {
				t.Errorf("got %v, want %v", err, tt.want)
			}
		})
	}
	info, err := stream.Info(c)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != before {
		t.Errorf("control stream holds %d messages after refused calls, want %d", info.State.Msgs, before)
	}
}

// TestWrite_WithoutRun checks that a writer catches up by itself when no
// Run follows the stream (a CLI, or before Run starts).
func TestWrite_WithoutRun(t *testing.T) {
	_, _, l := newLog(t)
	m, err := buckets.Open(ctx(t), buckets.Config{Log: l})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Define(ctx(t), &bucketspb.Bucket{Name: "vip"}); err != nil {
		t.Fatal(err)
	}
	if err := m.Assign(ctx(t), "chat", "vip"); err != nil {
		t.Fatal(err)
	}
	if got := m.BucketOf(chat); got != "vip" {
		t.Errorf("BucketOf(chat) = %q, want vip", got)
	}
	// Catch-ups leave no consumer behind.
	stream, err := l.JetStream().Stream(ctx(t), oplog.StreamControl)
	if err != nil {
		t.Fatal(err)
	}
	if n := stream.CachedInfo().State.Consumers; n != 0 {
		t.Errorf("control stream has %d consumers after the catch-ups, want 0", n)
	}
}

// TestPlan_ConcurrentRebucketing moves businesses while 8 goroutines plan;
// every plan must be well formed. Run with -race.
func TestPlan_ConcurrentRebucketing(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)
	c := ctx(t)
	if err := m.Define(c, &bucketspb.Bucket{Name: "vip"}); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var plans atomic.Int64
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := checkPlan(m.Plan(all), all); err != nil {
					errs <- err
					return
				}
				plans.Add(1)
				runtime.Gosched() // leave the 2 cores some room for the writer
			}
		})
	}
	targets := []string{"vip", buckets.OneShot, buckets.Global, ""}
	for i := range 24 {
		b := all[i%len(all)]
		if err := m.Assign(c, b.Code, targets[i%len(targets)]); err != nil {
			t.Errorf("assign %d: %v", i, err)
			break
		}
		if i == 12 {
			if err := m.Define(c, &bucketspb.Bucket{Name: "vip", Priority: 7}); err != nil {
				t.Error(err)
			}
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if plans.Load() == 0 {
		t.Error("no plan ran during the moves")
	}
}

// checkPlan verifies that plan holds every business of in exactly once, in
// non-empty groups ordered by priority then name.
func checkPlan(plan []buckets.Group, in []*oplogpb.Business) error {
	seen := map[string]int{}
	for i, g := range plan {
		if len(g.Businesses) == 0 {
			return fmt.Errorf("empty group %s", g.Bucket.Name)
		}
		if i > 0 {
			p := plan[i-1].Bucket
			if p.Priority > g.Bucket.Priority || p.Priority == g.Bucket.Priority && p.Name >= g.Bucket.Name {
				return fmt.Errorf("group %s after %s", g.Bucket.Name, p.Name)
			}
		}
		for _, b := range g.Businesses {
			seen[b.Code]++
		}
	}
	for _, b := range in {
		if seen[b.Code] != 1 {
			return fmt.Errorf("business %s planned %d times", b.Code, seen[b.Code])
		}
	}
	return nil
}

// TestOpen_CatchesUpBeforeReturning writes through one Map and opens
// another: its first answer is already the current state.
func TestOpen_CatchesUpBeforeReturning(t *testing.T) {
	_, _, l := newLog(t)
	m := mustOpenMap(t, l)
	c := ctx(t)
	for i := range 20 {
		if err := m.Define(c, &bucketspb.Bucket{Name: fmt.Sprintf("b%02d", i), Priority: int32(i % 10)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := m.Assign(c, "diag", "b07"); err != nil {
		t.Fatal(err)
	}
	m2, err := buckets.Open(c, buckets.Config{Log: l})
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	if got := len(m2.Buckets()); got != 25 {
		t.Errorf("len(Buckets()) = %d, want 25", got)
	}
	if got := m2.BucketOf(diag); got != "b07" {
		t.Errorf("BucketOf(diag) = %q, want b07", got)
	}
}

// TestAssign_RemoveWinsRace: an Assign checked against a stale state whose
// bucket was removed meanwhile is stored but has no effect, and says so.
func TestAssign_RemoveWinsRace(t *testing.T) {
	_, _, l := newLog(t)
	c := ctx(t)
	live := mustOpenMap(t, l)
	if err := live.Define(c, &bucketspb.Bucket{Name: "vip"}); err != nil {
		t.Fatal(err)
	}
	// stale does not follow the stream (no Run): it still sees vip after
	// live removes it.
	stale, err := buckets.Open(c, buckets.Config{Log: l})
	if err != nil {
		t.Fatal(err)
	}
	defer stale.Close()
	if err := live.Remove(c, "vip"); err != nil {
		t.Fatal(err)
	}
	if _, ok := stale.Bucket("vip"); !ok {
		t.Fatal("stale map already lost vip")
	}
	if err := stale.Assign(c, "chat", "vip"); !errors.Is(err, oplog.ErrNotFound) {
		t.Errorf("assign to a bucket removed meanwhile: got %v, want ErrNotFound", err)
	}
	if got := stale.BucketOf(chat); got != buckets.MultiDevice {
		t.Errorf("stale BucketOf(chat) = %q, want multi-device", got)
	}
	deadline := time.Now().Add(10 * time.Second)
	for live.Applied() < stale.Applied() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := live.BucketOf(chat); got != buckets.MultiDevice {
		t.Errorf("live BucketOf(chat) = %q, want multi-device", got)
	}
}
