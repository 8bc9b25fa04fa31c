package delivery_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/oplog"
)

// openRegistry opens and runs a device registry on the env's log.
func (e *env) openRegistry(t *testing.T, dir string) *delivery.Registry {
	t.Helper()
	return deliverytest.MustRunRegistry(t, delivery.RegistryConfig{Log: e.log, Dir: dir})
}

// waitKnown waits until the registry counts n devices.
func waitKnown(t *testing.T, reg *delivery.Registry, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := reg.CatchUp(ctx(t)); err != nil {
			t.Fatal(err)
		}
		got, err := reg.Count(ctx(t), func(*delivery.Device) bool { return true })
		if err != nil {
			t.Fatal(err)
		}
		if got.Known == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry knows %d devices, want %d", got.Known, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func fleet(n int) []*delivery.Device {
	oses := []string{"android", "ios", "harmony"}
	out := make([]*delivery.Device, n)
	for i := range out {
		out[i] = &delivery.Device{ID: fmt.Sprintf("dev-%05d", i), Attrs: oplog.Attrs{
			OS: oses[i%3], AppVersion: fmt.Sprintf("3.%d", i%5), Region: []string{"eu", "us"}[i%2], CPU: "arm64"}}
		if i%10 == 0 {
			out[i].User = fmt.Sprintf("u%d", i)
		}
	}
	return out
}

// TestDryRuns: the registry learns devices from Seen, and a dry run counts
// exactly the known devices a rule, or a release, would reach.
func TestDryRuns(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	reg := e.openRegistry(t, t.TempDir())
	devs := fleet(3000)
	for _, dev := range devs {
		reg.Seen("app", dev, nil)
	}
	waitKnown(t, reg, uint64(len(devs)))

	rule := &deliverypb.Rule{Os: []string{"android"}, AppVersionMin: "3.2", Percent: pct(40)}
	got, err := d.DryRunRule(ctx(t), reg, rule, "release/x/1")
	if err != nil {
		t.Fatal(err)
	}
	r := delivery.MustCompile(rule, "release/x/1")
	want := 0
	for _, dev := range devs {
		if r.Match(dev, time.Now().UnixMilli()) {
			want++
		}
	}
	if st := reg.Stats(); st.Published != 3000 || st.Failed != 0 {
		t.Fatalf("registry stats %+v, want 3000 published", st)
	}
	if got.Known != 3000 || got.Matching != uint64(want) || len(got.Sample) == 0 {
		t.Fatalf("dry run: %v, want %d of 3000", got, want)
	}
	t.Logf("dry run: %d of %d known devices match", got.Matching, got.Known)

	// A release: its audience and gray rule.
	if _, err := d.Upload(ctx(t), delivery.Upload{Package: "shop", Kind: deliverypb.PackageKind_PACKAGE_KIND_H5, Version: "1",
		Data: []byte("v1"), Audience: &deliverypb.Rule{Regions: []string{"eu"}}}, "x"); err != nil {
		t.Fatal(err)
	}
	rel, err := d.DryRunRelease(ctx(t), reg, "shop", "1", &deliverypb.Rule{Os: []string{"ios"}})
	if err != nil {
		t.Fatal(err)
	}
	want = 0
	for i := range devs {
		if i%2 == 0 && i%3 == 1 {
			want++
		}
	}
	if rel.Matching != uint64(want) {
		t.Fatalf("release dry run: %d, want %d (eu and ios)", rel.Matching, want)
	}

	// An unchanged device is not published again; a changed one is.
	before, _ := reg.Count(ctx(t), func(dev *delivery.Device) bool { return dev.Attrs.OS == "web" })
	published := reg.Stats().Published
	reg.Seen("app", devs[0], nil)
	if n := reg.Stats().Published; n != published {
		t.Fatalf("an unchanged device was published again (%d → %d)", published, n)
	}
	moved := *devs[1]
	moved.Attrs.OS = "web"
	reg.Seen("app", &moved, nil)
	deadline := time.Now().Add(5 * time.Second)
	for {
		_ = reg.CatchUp(ctx(t))
		after, _ := reg.Count(ctx(t), func(dev *delivery.Device) bool { return dev.Attrs.OS == "web" })
		if after.Matching == before.Matching+1 && after.Known == 3000 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("changed device not recorded: %v", after)
		}
		time.Sleep(20 * time.Millisecond)
	}

	// The projection rebuilds to the same digest.
	p := reg.Projection()
	before2, err := p.Digest(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Rebuild(ctx(t), 0, 0, nil); err != nil {
		t.Fatal(err)
	}
	after2, _ := p.Digest(ctx(t))
	if before2 != after2 {
		t.Fatalf("digest %s after rebuild, %s before", after2, before2)
	}
}
