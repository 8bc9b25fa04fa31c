package delivery_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/proto"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

type env struct {
	log    *oplog.Log
	signer *delivery.Signer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &env{log: oplogtest.MustOpenLog(t, nc, oplog.Config{}), signer: delivery.NewSigner(key)}
}

// open opens a Delivery on the env's log and runs it until the test ends.
func (e *env) open(t *testing.T, now func() time.Time) *delivery.Delivery {
	t.Helper()
	return deliverytest.MustRun(t, delivery.Config{Log: e.log, Signer: e.signer, Now: now}, false)
}

func boolValue(b bool) *deliverypb.Value {
	return &deliverypb.Value{Kind: &deliverypb.Value_BoolValue{BoolValue: b}}
}

func stringValue(s string) *deliverypb.Value {
	return &deliverypb.Value{Kind: &deliverypb.Value_StringValue{StringValue: s}}
}

// valueOf returns the value device dev sees of switch key, as text, and
// its variant ("absent" when the view has no such switch).
func valueOf(d *delivery.Delivery, dev *delivery.Device, key string) string {
	for _, sv := range d.View(dev).Switches {
		if sv.Key == key {
			return fmt.Sprintf("%v/%s", sv.Value.Kind, sv.Variant)
		}
	}
	return "absent"
}

func TestSwitches(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	android := &delivery.Device{ID: "a1", Attrs: oplog.Attrs{OS: "android", AppVersion: "5.1"}}
	ios := &delivery.Device{ID: "i1", Attrs: oplog.Attrs{OS: "ios", AppVersion: "5.1"}}
	vip := &delivery.Device{ID: "v1", User: "vip-1", Attrs: oplog.Attrs{OS: "ios"}}

	sw, err := d.SetSwitch(c, &deliverypb.Switch{
		Key: "new-checkout", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(false),
		Variants: []*deliverypb.Variant{
			{Name: "staff", Rule: &deliverypb.Rule{Users: []string{"vip-1"}, Percent: pct(0)}, Value: boolValue(true)},
			{Name: "android", Rule: &deliverypb.Rule{Os: []string{"android"}}, Value: boolValue(true)},
		},
	}, "alice", 0)
	if err != nil {
		t.Fatalf("set: %v", err)
	}
	if sw.Version == 0 || sw.UpdatedBy != "alice" || sw.Variants[0].Rule.Salt != "switch/new-checkout" {
		t.Fatalf("stored switch: %v", sw)
	}
	for _, c := range []struct {
		dev  *delivery.Device
		want string
	}{{android, "&{true}/android"}, {ios, "&{false}/"}, {vip, "&{true}/staff"}} {
		if got := valueOf(d, c.dev, "new-checkout"); got != c.want {
			t.Errorf("%s: %s, want %s", c.dev.ID, got, c.want)
		}
	}
	digest := d.View(ios).Digest

	// A read-modify-write against a stale version is refused.
	stale := sw.Version
	sw2 := proto.Clone(sw).(*deliverypb.Switch)
	sw2.DefaultValue = boolValue(true)
	if sw2, err = d.SetSwitch(c, sw2, "bob", stale); err != nil || sw2.Version <= stale {
		t.Fatalf("set with the current version: %v, %v", sw2, err)
	}
	if _, err := d.SetSwitch(c, sw, "carol", stale); !errors.Is(err, oplog.ErrConflict) {
		t.Fatalf("set with a stale version: err = %v, want ErrConflict", err)
	}
	if got := valueOf(d, ios, "new-checkout"); got != "&{true}/" {
		t.Errorf("ios after the default changed: %s", got)
	}
	if d.View(ios).Digest == digest {
		t.Error("the digest did not change with the value")
	}

	// Kill: everyone gets the kill value; un-kill restores the rules.
	if _, err := d.Kill(c, "new-checkout", true, "oncall"); err != nil {
		t.Fatalf("kill: %v", err)
	}
	for _, dev := range []*delivery.Device{android, ios, vip} {
		if got := valueOf(d, dev, "new-checkout"); got != "&{false}/kill" {
			t.Errorf("%s while killed: %s", dev.ID, got)
		}
	}
	if _, err := d.Kill(c, "new-checkout", false, "oncall"); err != nil {
		t.Fatalf("unkill: %v", err)
	}
	if got := valueOf(d, vip, "new-checkout"); got != "&{true}/staff" {
		t.Errorf("vip after unkill: %s", got)
	}
	if err := d.RemoveSwitch(c, "new-checkout", "alice"); err != nil {
		t.Fatalf("remove: %v", err)
	}
	if got := valueOf(d, vip, "new-checkout"); got != "absent" {
		t.Errorf("after remove: %s", got)
	}
	if err := d.RemoveSwitch(c, "new-checkout", "alice"); !errors.Is(err, oplog.ErrNotFound) {
		t.Errorf("remove twice: %v", err)
	}
	if _, err := d.Kill(c, "nope", true, "x"); !errors.Is(err, oplog.ErrNotFound) {
		t.Errorf("kill unknown: %v", err)
	}
}

// TestSwitchUpdateKeepsChangesMeanwhile: a change stored while Kill or
// SwitchOffFor works on its copy makes the write conflict and retry from
// the new definition, rather than overwrite it.
func TestSwitchUpdateKeepsChangesMeanwhile(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	sw, err := d.SetSwitch(c, &deliverypb.Switch{Key: "k", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL,
		DefaultValue: boolValue(true)}, "alice", 0)
	if err != nil {
		t.Fatal(err)
	}
	calls := 0
	got, err := d.UpdateSwitch(c, "k", "oncall", func(cur *deliverypb.Switch) error {
		if calls++; calls == 1 {
			meanwhile := proto.Clone(sw).(*deliverypb.Switch)
			meanwhile.Description = "changed meanwhile"
			if _, err := d.SetSwitch(c, meanwhile, "bob", 0); err != nil {
				return err
			}
		}
		cur.Killed, cur.KillValue = true, boolValue(false)
		return nil
	})
	if err != nil {
		t.Fatalf("update: %v", err)
	}
	if calls != 2 || !got.Killed || got.Description != "changed meanwhile" || got.UpdatedBy != "oncall" {
		t.Fatalf("after %d tries: %v, want killed with bob's description", calls, got)
	}
}

func TestSwitchRefusesBadDefinitions(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	str := deliverypb.SwitchType_SWITCH_TYPE_STRING
	for _, cs := range []struct {
		name string
		sw   *deliverypb.Switch
		want error
	}{
		{"bad key", &deliverypb.Switch{Key: "Dark.Mode", Type: str, DefaultValue: stringValue("x")}, oplog.ErrInvalidID},
		{"no type", &deliverypb.Switch{Key: "k", DefaultValue: stringValue("x")}, oplog.ErrInvalid},
		{"no default", &deliverypb.Switch{Key: "k", Type: str}, oplog.ErrInvalid},
		{"wrong type", &deliverypb.Switch{Key: "k", Type: str, DefaultValue: boolValue(true)}, oplog.ErrInvalid},
		{"bad json", &deliverypb.Switch{Key: "k", Type: deliverypb.SwitchType_SWITCH_TYPE_JSON,
			DefaultValue: &deliverypb.Value{Kind: &deliverypb.Value_JsonValue{JsonValue: "{"}}}, oplog.ErrInvalid},
		{"variant without name", &deliverypb.Switch{Key: "k", Type: str, DefaultValue: stringValue("x"),
			Variants: []*deliverypb.Variant{{Value: stringValue("y")}}}, oplog.ErrInvalidID},
		{"variant named kill", &deliverypb.Switch{Key: "k", Type: str, DefaultValue: stringValue("x"),
			Variants: []*deliverypb.Variant{{Name: "kill", Value: stringValue("y")}}}, oplog.ErrInvalidID},
		{"variant bad rule", &deliverypb.Switch{Key: "k", Type: str, DefaultValue: stringValue("x"),
			Variants: []*deliverypb.Variant{{Name: "a", Value: stringValue("y"), Rule: &deliverypb.Rule{Percent: pct(101)}}}}, oplog.ErrInvalid},
		{"removed", &deliverypb.Switch{Key: "k", Removed: true}, oplog.ErrInvalid},
	} {
		if _, err := d.SetSwitch(c, cs.sw, "x", 0); !errors.Is(err, cs.want) {
			t.Errorf("%s: err = %v, want %v", cs.name, err, cs.want)
		}
	}
	if n := len(d.Switches()); n != 0 {
		t.Errorf("%d switches stored after refusals", n)
	}
}

// pkgBytes returns distinct package contents.
func pkgBytes(v string) []byte { return bytes.Repeat([]byte("package "+v+"\n"), 100) }

func mustUpload(t *testing.T, d *delivery.Delivery, pkg, version string) {
	t.Helper()
	if _, err := d.Upload(ctx(t), delivery.Upload{Package: pkg, Kind: deliverypb.PackageKind_PACKAGE_KIND_H5, Version: version,
		Data: pkgBytes(version)}, "ci"); err != nil {
		t.Fatalf("upload %s %s: %v", pkg, version, err)
	}
}

// TestReleaseLifecycle walks every transition, allowed and refused.
func TestReleaseLifecycle(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	const pkg = "mall"
	gray := &deliverypb.Rule{Percent: pct(10)}
	mustUpload(t, d, pkg, "1.0.0")

	step := func(name string, err error, want error) {
		t.Helper()
		if want == nil && err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if want != nil && !errors.Is(err, want) {
			t.Fatalf("%s: err = %v, want %v", name, err, want)
		}
	}
	stage := func(version string) string {
		r, ok := d.Release(pkg, version)
		if !ok {
			return "missing"
		}
		s := r.Stage.String()
		if r.Paused {
			s += "+paused"
		}
		return s
	}
	expect := func(version, want string) {
		t.Helper()
		if got := stage(version); got != want {
			t.Fatalf("%s is %s, want %s", version, got, want)
		}
	}
	var err error
	_, err = d.Full(c, pkg, "1.0.0", "x")
	step("draft → full", err, oplog.ErrConflict)
	_, err = d.Pause(c, pkg, "1.0.0", "x")
	step("pause a draft", err, oplog.ErrConflict)
	_, err = d.Resume(c, pkg, "1.0.0", "x")
	step("resume a draft", err, oplog.ErrConflict)
	_, err = d.Rollback(c, pkg, "x")
	step("rollback with nothing released", err, oplog.ErrConflict)
	_, err = d.ExcludeModel(c, pkg, "1.0.0", "Moto", "x")
	step("leave a model out of a draft", err, oplog.ErrConflict)
	_, err = d.Gray(c, pkg, "1.0.0", gray, "x")
	step("draft → gray", err, nil)
	expect("1.0.0", "STAGE_GRAY")
	_, err = d.Gray(c, pkg, "1.0.0", &deliverypb.Rule{Percent: pct(50)}, "x")
	step("gray → gray (rule change)", err, nil)
	_, err = d.Rollback(c, pkg, "x")
	step("rollback without a stable version", err, oplog.ErrConflict)
	_, err = d.Pause(c, pkg, "1.0.0", "x")
	step("pause gray", err, nil)
	expect("1.0.0", "STAGE_GRAY+paused")
	_, err = d.Pause(c, pkg, "1.0.0", "x")
	step("pause twice", err, oplog.ErrConflict)
	_, err = d.Full(c, pkg, "1.0.0", "x")
	step("full while paused", err, oplog.ErrConflict)
	_, err = d.Resume(c, pkg, "1.0.0", "x")
	step("resume", err, nil)
	_, err = d.Resume(c, pkg, "1.0.0", "x")
	step("resume twice", err, oplog.ErrConflict)
	_, err = d.ExcludeModel(c, pkg, "1.0.0", "", "x")
	step("leave no model out", err, oplog.ErrInvalid)
	_, err = d.ExcludeModel(c, pkg, "1.0.0", strings.Repeat("m", 65), "x")
	step("leave a 65-byte model out", err, oplog.ErrInvalid)
	for range 2 { // the second time changes nothing
		_, err = d.ExcludeModel(c, pkg, "1.0.0", "Moto", "x")
		step("leave a model out of a gray release", err, nil)
	}
	if r, _ := d.Release(pkg, "1.0.0"); !slices.Equal(r.ExcludedModels, []string{"Moto"}) || r.Stage != deliverypb.Stage_STAGE_GRAY {
		t.Fatalf("after leaving Moto out: %v, excluded %v", r.Stage, r.ExcludedModels)
	}
	_, err = d.Full(c, pkg, "1.0.0", "x")
	step("gray → full", err, nil)
	expect("1.0.0", "STAGE_FULL")
	_, err = d.Gray(c, pkg, "1.0.0", gray, "x")
	step("full → gray", err, oplog.ErrConflict)
	_, err = d.Pause(c, pkg, "1.0.0", "x")
	step("pause full", err, nil)
	_, err = d.Resume(c, pkg, "1.0.0", "x")
	step("resume full", err, nil)
	expect("1.0.0", "STAGE_FULL")

	// Versions only go up, and a package keeps its kind.
	_, err = d.Upload(c, delivery.Upload{Package: pkg, Kind: deliverypb.PackageKind_PACKAGE_KIND_H5, Version: "0.9", Data: []byte("x")}, "x")
	step("upload an older version", err, oplog.ErrConflict)
	_, err = d.Upload(c, delivery.Upload{Package: pkg, Kind: deliverypb.PackageKind_PACKAGE_KIND_APP, Version: "2.0", Data: []byte("x")}, "x")
	step("upload another kind", err, oplog.ErrInvalid)
	_, err = d.Gray(c, pkg, "9.9", gray, "x")
	step("gray an unknown version", err, oplog.ErrNotFound)
	_, err = d.Gray(c, "nope", "1.0.0", gray, "x")
	step("gray an unknown package", err, oplog.ErrNotFound)

	// 1.1 goes gray and is rolled back to 1.0.0; 1.2 is stopped.
	mustUpload(t, d, pkg, "1.1.0")
	_, err = d.Gray(c, pkg, "1.1.0", gray, "x")
	step("1.1 gray", err, nil)
	rb, err := d.Rollback(c, pkg, "x")
	step("rollback", err, nil)
	if rb.Version.Version != "1.0.0" {
		t.Fatalf("rolled back to %s, want 1.0.0", rb.Version.Version)
	}
	expect("1.1.0", "STAGE_ROLLED_BACK")
	expect("1.0.0", "STAGE_FULL")
	_, err = d.Full(c, pkg, "1.1.0", "x")
	step("full a rolled-back release", err, oplog.ErrConflict)
	_, err = d.Stop(c, pkg, "1.1.0", "x")
	step("stop a rolled-back release", err, oplog.ErrConflict)
	mustUpload(t, d, pkg, "1.2.0")
	_, err = d.Stop(c, pkg, "1.2.0", "x")
	step("stop a draft", err, nil)
	expect("1.2.0", "STAGE_STOPPED")
	_, err = d.Gray(c, pkg, "1.2.0", gray, "x")
	step("gray a stopped release", err, oplog.ErrConflict)
	_, err = d.Stop(c, pkg, "1.2.0", "x")
	step("stop twice", err, oplog.ErrConflict)

	// A second node replaying the stream has the same state.
	d2 := e.open(t, time.Now)
	r1, _ := d.Releases(pkg)
	r2, _ := d2.Releases(pkg)
	if len(r1) != 3 || len(r1) != len(r2) {
		t.Fatalf("releases: %d here, %d replayed", len(r1), len(r2))
	}
	for i := range r1 {
		if !proto.Equal(r1[i], r2[i]) {
			t.Errorf("release %d: %v here, %v replayed", i, r1[i], r2[i])
		}
	}
}

func TestUploadRefusesBadInput(t *testing.T) {
	e := newEnv(t)
	d, err := delivery.Open(ctx(t), delivery.Config{Log: e.log, Signer: e.signer, MaxPackageSize: 1000})
	if err != nil {
		t.Fatal(err)
	}
	h5 := deliverypb.PackageKind_PACKAGE_KIND_H5
	for _, c := range []struct {
		name string
		up   delivery.Upload
		want error
	}{
		{"bad package", delivery.Upload{Package: "Mall/x", Kind: h5, Version: "1", Data: []byte("x")}, oplog.ErrInvalidID},
		{"no version", delivery.Upload{Package: "mall", Kind: h5, Data: []byte("x")}, oplog.ErrInvalid},
		{"bad version", delivery.Upload{Package: "mall", Kind: h5, Version: "1 0", Data: []byte("x")}, oplog.ErrInvalid},
		{"no kind", delivery.Upload{Package: "mall", Version: "1", Data: []byte("x")}, oplog.ErrInvalid},
		{"too large", delivery.Upload{Package: "mall", Kind: h5, Version: "1", Data: make([]byte, 1001)}, oplog.ErrPayloadTooLarge},
		{"bad fallback", delivery.Upload{Package: "mall", Kind: h5, Version: "1", Data: []byte("x"), FallbackURL: "ftp://x"}, oplog.ErrInvalid},
		{"bad audience", delivery.Upload{Package: "mall", Kind: h5, Version: "1", Data: []byte("x"),
			Audience: &deliverypb.Rule{AppVersionMin: "a b"}}, oplog.ErrInvalid},
	} {
		if _, err := d.Upload(ctx(t), c.up, "x"); !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.want)
		}
	}
	if n := len(d.Packages()); n != 0 {
		t.Errorf("%d packages after refusals", n)
	}
}

// TestHotPatchSignatures: a hot patch needs a valid signature from a
// registered, unrevoked producer key.
func TestHotPatchSignatures(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	_, other, _ := ed25519.GenerateKey(rand.Reader)
	data := []byte("patch bytes v1")
	sum := sha256.Sum256(data)
	good := delivery.SignPackage(key, "fix", "1", sum[:])
	up := func(version, keyID string, sig []byte) error {
		_, err := d.Upload(c, delivery.Upload{Package: "fix", Kind: deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH, Version: version,
			Data: data, ProducerKey: keyID, ProducerSignature: sig}, "x")
		return err
	}
	if err := up("1", "", nil); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("unsigned: %v", err)
	}
	if err := up("1", "team-a", good); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("unregistered key: %v", err)
	}
	if err := d.RegisterProducerKey(c, "team-a", pub); err != nil {
		t.Fatal(err)
	}
	if err := up("1", "team-a", delivery.SignPackage(other, "fix", "1", sum[:])); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("signed by another key: %v", err)
	}
	if err := up("1", "team-a", delivery.SignPackage(key, "other-package", "1", sum[:])); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("signed for another package: %v", err)
	}
	if err := up("1", "team-a", delivery.SignPackage(key, "fix", "0.9", sum[:])); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("signed for another version: %v", err)
	}
	tampered := slices.Clone(good)
	tampered[0] ^= 1
	if err := up("1", "team-a", tampered); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("tampered signature: %v", err)
	}
	if err := up("1", "team-a", good); err != nil {
		t.Fatalf("valid signature: %v", err)
	}
	if err := d.RevokeProducerKey(c, "team-a"); err != nil {
		t.Fatal(err)
	}
	if err := up("2", "team-a", good); !errors.Is(err, oplog.ErrSignature) {
		t.Errorf("revoked key: %v", err)
	}
	if err := d.RegisterProducerKey(c, "team-b", []byte("short")); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("bad key: %v", err)
	}
}

// offerOf returns the verified manifest device dev is offered of pkg, or nil.
func offerOf(t *testing.T, d *delivery.Delivery, pub ed25519.PublicKey, dev *delivery.Device, pkg string) *deliverypb.Manifest {
	t.Helper()
	for _, sm := range d.View(dev).Releases {
		m, err := delivery.VerifyManifest(sm, pub)
		if err != nil {
			t.Fatalf("manifest does not verify: %v", err)
		}
		if m.Package == pkg {
			return m
		}
	}
	return nil
}

func describe(m *deliverypb.Manifest) string {
	if m == nil {
		return "none"
	}
	if m.Rollback {
		return m.Version + " rollback from " + fmt.Sprint(m.RollbackFrom)
	}
	return m.Version
}

// TestOffers checks which release each device is offered through a gray
// release, full, pause, a rollback and a stop.
func TestOffers(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub := e.signer.PublicKey()
	const pkg = "app"
	devs := make([]*delivery.Device, 200)
	for i := range devs {
		devs[i] = &delivery.Device{ID: fmt.Sprintf("d%03d", i), Attrs: oplog.Attrs{OS: "android", AppVersion: "3.0"}}
	}
	tester := &delivery.Device{ID: "qa-phone", Attrs: oplog.Attrs{OS: "android"}}
	iphone := &delivery.Device{ID: "ip", Attrs: oplog.Attrs{OS: "ios"}}
	count := func(want string) int {
		n := 0
		for _, dev := range devs {
			if describe(offerOf(t, d, pub, dev, pkg)) == want {
				n++
			}
		}
		return n
	}
	androidOnly := &deliverypb.Rule{Os: []string{"android"}}
	for _, v := range []string{"1.0", "2.0"} {
		if _, err := d.Upload(c, delivery.Upload{Package: pkg, Kind: deliverypb.PackageKind_PACKAGE_KIND_APP, Version: v,
			Data: pkgBytes(v), Audience: androidOnly}, "ci"); err != nil {
			t.Fatal(err)
		}
	}
	if got := describe(offerOf(t, d, pub, devs[0], pkg)); got != "none" {
		t.Fatalf("draft offered: %s", got)
	}
	mustDo := func(_ *deliverypb.Release, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	mustDo(d.Gray(c, pkg, "1.0", &deliverypb.Rule{Percent: pct(100)}, "x"))
	mustDo(d.Full(c, pkg, "1.0", "x"))
	if n := count("1.0"); n != len(devs) {
		t.Fatalf("1.0 full: %d of %d offered it", n, len(devs))
	}
	if got := describe(offerOf(t, d, pub, iphone, pkg)); got != "none" {
		t.Fatalf("outside the audience: offered %s", got)
	}
	mustDo(d.Gray(c, pkg, "2.0", &deliverypb.Rule{Devices: []string{"qa-phone"}, Percent: pct(25)}, "x"))
	gray := count("2.0")
	if gray < 25 || gray > 75 || count("1.0") != len(devs)-gray {
		t.Fatalf("2.0 at 25%%: %d of %d offered it, %d offered 1.0", gray, len(devs), count("1.0"))
	}
	if got := describe(offerOf(t, d, pub, tester, pkg)); got != "2.0" {
		t.Fatalf("whitelisted tester offered %s", got)
	}
	m := offerOf(t, d, pub, tester, pkg)
	if m.Url != "/v1/packages/app/2.0" || len(m.Sha256) != 32 || m.Serial == 0 || m.ExpiresMs <= m.IssuedMs {
		t.Fatalf("manifest: %v", m)
	}
	mustDo(d.Pause(c, pkg, "2.0", "x"))
	if n := count("1.0"); n != len(devs) {
		t.Fatalf("2.0 paused: %d of %d offered 1.0", n, len(devs))
	}
	mustDo(d.Resume(c, pkg, "2.0", "x"))
	if n := count("2.0"); n != gray {
		t.Fatalf("resumed: %d offered 2.0, want the same %d", n, gray)
	}
	mustDo(d.Rollback(c, pkg, "x"))
	// Every device of the audience is told: whichever rule let it have
	// 2.0 then, it may have it now (a client only downgrades from a
	// version the rollback lists).
	if n := count("1.0 rollback from [2.0]"); n != len(devs) {
		t.Fatalf("rolled back: %d of %d offered the rollback", n, len(devs))
	}
	if got := describe(offerOf(t, d, pub, tester, pkg)); got != "1.0 rollback from [2.0]" {
		t.Fatalf("tester after rollback: %s", got)
	}
	// A tampered manifest does not verify.
	sm := d.View(tester).Releases[0]
	bad := proto.Clone(sm).(*deliverypb.SignedManifest)
	bad.Manifest[len(bad.Manifest)-1] ^= 1
	if _, err := delivery.VerifyManifest(bad, pub); !errors.Is(err, oplog.ErrSignature) {
		t.Fatalf("tampered manifest: %v", err)
	}
	if _, err := delivery.VerifyManifest(sm, ed25519.PublicKey(make([]byte, 32))); !errors.Is(err, oplog.ErrSignature) {
		t.Fatalf("untrusted key: %v", err)
	}
}

// TestWindowWakesWatchers: a device's view changes when a rule's window
// opens, without any event; Changed says so.
func TestWindowWakesWatchers(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	opens := time.Now().Add(300 * time.Millisecond)
	dev := &delivery.Device{ID: "d1"}
	if _, err := d.SetSwitch(c, &deliverypb.Switch{Key: "sale", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(false),
		Variants: []*deliverypb.Variant{{Name: "on", Value: boolValue(true), Rule: &deliverypb.Rule{NotBeforeMs: opens.UnixMilli()}}}}, "x", 0); err != nil {
		t.Fatal(err)
	}
	if got := valueOf(d, dev, "sale"); got != "&{false}/" {
		t.Fatalf("before the window: %s", got)
	}
	// Changed may fire once more for the switch event itself; then it must
	// fire when the window opens, and no later than a second after.
	for time.Now().Before(opens) {
		select {
		case <-d.Changed():
		case <-time.After(time.Until(opens) + time.Second):
			t.Fatal("Changed did not fire when the window opened")
		}
	}
	if got := valueOf(d, dev, "sale"); got != "&{true}/on" {
		t.Fatalf("after the window opened: %s", got)
	}
}

// The rollback cases a review found (each failed before the fix).

func lifecycleDevs(n int) []*delivery.Device {
	devs := make([]*delivery.Device, n)
	for i := range devs {
		devs[i] = &delivery.Device{ID: fmt.Sprintf("d%03d", i), Attrs: oplog.Attrs{OS: "android"}}
	}
	return devs
}

func mustRelease(t *testing.T) func(*deliverypb.Release, error) {
	return func(_ *deliverypb.Release, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestRollbackReachesEveryDeviceThatHadIt: devices given 2.0 under a wider
// gray rule, or in a window since closed, get the rollback.
func TestRollbackReachesEveryDeviceThatHadIt(t *testing.T) {
	e := newEnv(t)
	clock := time.Now()
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	d := e.open(t, now)
	c := ctx(t)
	pub := e.signer.PublicKey()
	must := mustRelease(t)
	mustUpload(t, d, "app", "1.0")
	mustUpload(t, d, "app", "2.0")
	must(d.Gray(c, "app", "1.0", &deliverypb.Rule{Percent: pct(100)}, "x"))
	must(d.Full(c, "app", "1.0", "x"))
	must(d.Gray(c, "app", "2.0", &deliverypb.Rule{Percent: pct(50), NotAfterMs: clock.Add(time.Hour).UnixMilli()}, "x"))
	var had []*delivery.Device
	for _, dev := range lifecycleDevs(200) {
		if describe(offerOf(t, d, pub, dev, "app")) == "2.0" {
			had = append(had, dev)
		}
	}
	must(d.Gray(c, "app", "2.0", &deliverypb.Rule{Percent: pct(10), NotAfterMs: clock.Add(time.Hour).UnixMilli()}, "x"))
	mu.Lock()
	clock = clock.Add(2 * time.Hour) // the window closed
	mu.Unlock()
	must(d.Rollback(c, "app", "x"))
	for _, dev := range had {
		if got := describe(offerOf(t, d, pub, dev, "app")); got != "1.0 rollback from [2.0]" {
			t.Fatalf("%s had 2.0 and is offered %q", dev.ID, got)
		}
	}
}

// TestModelsLeftOut: a full release with a model left out offers that
// model's devices the version before; a rollback to it reaches them as
// every other device, and resume ends a leaving-out.
func TestModelsLeftOut(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub := e.signer.PublicKey()
	must := mustRelease(t)
	moto := &delivery.Device{ID: "m1", Attrs: oplog.Attrs{OS: "android", Model: "Moto"}}
	pixel := &delivery.Device{ID: "p1", Attrs: oplog.Attrs{OS: "android", Model: "Pixel 8"}}
	offers := func() string {
		return describe(offerOf(t, d, pub, moto, "mall")) + " | " + describe(offerOf(t, d, pub, pixel, "mall"))
	}
	for _, v := range []string{"1", "2", "3"} {
		mustUpload(t, d, "mall", v)
	}
	must(d.Gray(c, "mall", "1", &deliverypb.Rule{Percent: pct(100)}, "x"))
	must(d.Full(c, "mall", "1", "x"))
	must(d.Gray(c, "mall", "2", &deliverypb.Rule{Percent: pct(100)}, "x"))
	must(d.Full(c, "mall", "2", "x"))
	before, _ := d.Release("mall", "2")
	must(d.ExcludeModel(c, "mall", "2", "Moto", "breaker"))
	if got := offers(); got != "1 | 2" {
		t.Fatalf("mall 2 full, Moto left out: offers %q, want \"1 | 2\"", got)
	}
	left, _ := d.Release("mall", "2")
	must(d.ExcludeModel(c, "mall", "2", "Moto", "breaker"))
	if again, _ := d.Release("mall", "2"); again.Serial != left.Serial || left.Serial == before.Serial {
		t.Fatalf("serials %d, %d, %d: leaving Moto out must write one event, and the second time none", before.Serial, left.Serial, again.Serial)
	}
	must(d.Resume(c, "mall", "2", "x"))
	if got := offers(); got != "2 | 2" {
		t.Fatalf("after resume: offers %q, want \"2 | 2\"", got)
	}
	// Left out again, then 3 goes out and is rolled back to 2: Moto
	// devices that took 3 must be told too.
	must(d.ExcludeModel(c, "mall", "2", "Moto", "breaker"))
	must(d.Gray(c, "mall", "3", &deliverypb.Rule{Percent: pct(100)}, "x"))
	if got := offers(); got != "3 | 3" {
		t.Fatalf("mall 3 gray: offers %q", got)
	}
	must(d.Rollback(c, "mall", "x"))
	if got := offers(); got != "2 rollback from [3] | 2 rollback from [3]" {
		t.Fatalf("after the rollback: offers %q", got)
	}
	if r, _ := d.Release("mall", "2"); len(r.ExcludedModels) != 0 {
		t.Fatalf("rollback target still leaves out %v", r.ExcludedModels)
	}
}

// TestRollbackVersion: rolling back a full version takes back it and the
// gray one after it, to the full version before it.
func TestRollbackVersion(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub := e.signer.PublicKey()
	must := mustRelease(t)
	for _, v := range []string{"1", "2", "3", "4"} {
		mustUpload(t, d, "cart", v)
	}
	for _, v := range []string{"1", "2"} {
		must(d.Gray(c, "cart", v, &deliverypb.Rule{Percent: pct(100)}, "x"))
		must(d.Full(c, "cart", v, "x"))
	}
	must(d.Gray(c, "cart", "3", &deliverypb.Rule{Percent: pct(100)}, "x"))
	for _, tc := range []struct {
		version string
		want    error
	}{{"9", oplog.ErrNotFound}, {"4", oplog.ErrConflict}, {"1", oplog.ErrConflict}} {
		if _, err := d.RollbackVersion(c, "cart", tc.version, "x"); !errors.Is(err, tc.want) {
			t.Fatalf("roll back %s: %v, want %v", tc.version, err, tc.want)
		}
	}
	must(d.RollbackVersion(c, "cart", "2", "breaker"))
	dev := &delivery.Device{ID: "x1", Attrs: oplog.Attrs{OS: "android"}}
	if got := describe(offerOf(t, d, pub, dev, "cart")); got != "1 rollback from [3 2]" {
		t.Fatalf("after rolling back 2: offered %q", got)
	}
	for v, want := range map[string]deliverypb.Stage{"1": deliverypb.Stage_STAGE_FULL, "2": deliverypb.Stage_STAGE_ROLLED_BACK, "3": deliverypb.Stage_STAGE_ROLLED_BACK} {
		if r, _ := d.Release("cart", v); r.Stage != want {
			t.Fatalf("cart %s: %v, want %v", v, r.Stage, want)
		}
	}
	if _, err := d.RollbackVersion(c, "cart", "2", "breaker"); !errors.Is(err, oplog.ErrConflict) {
		t.Fatalf("rolling 2 back again: %v, want a conflict", err)
	}
}

// TestRollbackAfterStop: stopping a bad release, then rolling back, takes
// back the stopped release (not the good one before it).
func TestRollbackAfterStop(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub := e.signer.PublicKey()
	must := mustRelease(t)
	dev := &delivery.Device{ID: "x1", Attrs: oplog.Attrs{OS: "android"}}
	for _, v := range []string{"1.0", "2.0", "3.0"} {
		mustUpload(t, d, "app", v)
	}
	for _, v := range []string{"1.0", "2.0"} {
		must(d.Gray(c, "app", v, &deliverypb.Rule{Percent: pct(100)}, "x"))
		must(d.Full(c, "app", v, "x"))
	}
	must(d.Gray(c, "app", "3.0", &deliverypb.Rule{Devices: []string{"x1"}, Percent: pct(0)}, "x"))
	must(d.Stop(c, "app", "3.0", "x"))
	rb, err := d.Rollback(c, "app", "x")
	if err != nil || rb.Version.Version != "2.0" {
		t.Fatalf("rollback after stopping 3.0: %v, %v; want 2.0", rb, err)
	}
	if got := describe(offerOf(t, d, pub, dev, "app")); got != "2.0 rollback from [3.0]" {
		t.Fatalf("the device on 3.0 is offered %q", got)
	}
}

// TestRollbackResumesAPausedTarget: rolling back to a paused full release
// resumes it: devices are sent what Rollback names.
func TestRollbackResumesAPausedTarget(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub := e.signer.PublicKey()
	must := mustRelease(t)
	dev := &delivery.Device{ID: "x1", Attrs: oplog.Attrs{OS: "android"}}
	for _, v := range []string{"1.0", "2.0", "3.0"} {
		mustUpload(t, d, "app", v)
	}
	for _, v := range []string{"1.0", "2.0"} {
		must(d.Gray(c, "app", v, &deliverypb.Rule{Percent: pct(100)}, "x"))
		must(d.Full(c, "app", v, "x"))
	}
	must(d.Pause(c, "app", "2.0", "x"))
	must(d.Gray(c, "app", "3.0", &deliverypb.Rule{Percent: pct(100)}, "x"))
	rb, err := d.Rollback(c, "app", "x")
	if err != nil || rb.Version.Version != "2.0" || rb.Paused {
		t.Fatalf("rollback: %v, %v; want 2.0, resumed", rb, err)
	}
	if got := describe(offerOf(t, d, pub, dev, "app")); got != "2.0 rollback from [3.0]" {
		t.Fatalf("device offered %q", got)
	}
}

// TestSkippedEventDoesNotWedge: an event valid when written but refused
// when applied (its producer key was revoked in between) fails its writer
// and leaves the package writable.
func TestSkippedEventDoesNotWedge(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	if err := d.RegisterProducerKey(c, "team", pub); err != nil {
		t.Fatal(err)
	}
	data := []byte("patch")
	sum := sha256.Sum256(data)
	v := &deliverypb.Version{Version: "1", Sha256: sum[:], Size: 5, Object: "fix/1/x", ProducerKey: "team",
		ProducerSignature: delivery.SignPackage(key, "fix", "1", sum[:])}
	// Write the upload event straight to the stream after revoking the
	// key: what an upload racing a revocation stores.
	if err := d.RevokeProducerKey(c, "team"); err != nil {
		t.Fatal(err)
	}
	ev := &deliverypb.PackageEvent{Package: "fix", Kind: deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH, Op: &deliverypb.PackageEvent_Upload{Upload: v}}
	b, _ := proto.Marshal(ev)
	if _, err := e.log.JetStream().Publish(c, oplog.SubjectControl("package", "fix"), b); err != nil {
		t.Fatal(err)
	}
	if err := d.RegisterProducerKey(c, "team", pub); err != nil { // catch up past the skipped event
		t.Fatal(err)
	}
	// The package accepts a new upload: the expectation counts the
	// skipped event.
	if _, err := d.Upload(c, delivery.Upload{Package: "fix", Kind: deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH, Version: "2",
		Data: data, ProducerKey: "team", ProducerSignature: delivery.SignPackage(key, "fix", "2", sum[:])}, "x"); err != nil {
		t.Fatalf("upload after a skipped event: %v", err)
	}
	// Same for switches.
	sw, err := d.SetSwitch(c, &deliverypb.Switch{Key: "k", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(true)}, "x", 0)
	if err != nil {
		t.Fatal(err)
	}
	bad, _ := proto.Marshal(&deliverypb.Switch{Key: "k"}) // no type: skipped on apply
	if _, err := e.log.JetStream().Publish(c, oplog.SubjectControl("switch", "k"), bad); err != nil {
		t.Fatal(err)
	}
	if _, err := d.SetSwitch(c, &deliverypb.Switch{Key: "other", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(true)}, "x", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Kill(c, "k", true, "x"); err != nil {
		t.Fatalf("kill after a skipped event: %v", err)
	}
	if _, err := d.SetSwitch(c, sw, "x", sw.Version); !errors.Is(err, oplog.ErrConflict) {
		t.Fatalf("set with a version since changed: %v", err)
	}
}

// TestHotPatchKeyRotation: a hot patch keeps the public key it was
// signed with when its producer key id is registered again with another.
func TestHotPatchKeyRotation(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	c := ctx(t)
	pub, key, _ := ed25519.GenerateKey(rand.Reader)
	pub2, _, _ := ed25519.GenerateKey(rand.Reader)
	if err := d.RegisterProducerKey(c, "team", pub); err != nil {
		t.Fatal(err)
	}
	data := []byte("patch v1")
	sum := sha256.Sum256(data)
	if _, err := d.Upload(c, delivery.Upload{Package: "fix", Kind: deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH, Version: "1",
		Data: data, ProducerKey: "team", ProducerSignature: delivery.SignPackage(key, "fix", "1", sum[:])}, "x"); err != nil {
		t.Fatal(err)
	}
	must := mustRelease(t)
	must(d.Gray(c, "fix", "1", &deliverypb.Rule{Percent: pct(100)}, "x"))
	if err := d.RegisterProducerKey(c, "team", pub2); err != nil {
		t.Fatal(err)
	}
	m := offerOf(t, d, e.signer.PublicKey(), &delivery.Device{ID: "x"}, "fix")
	if m == nil || !ed25519.Verify(m.ProducerPublicKey, deliverypb.HotPatchMessage(m.Package, m.Version, m.Sha256), m.ProducerSignature) {
		t.Fatalf("after the key id was registered again, the patch's producer signature does not verify: %v", m)
	}
}

// TestManifestRefreshIsSignalled: with no event, Changed fires when the
// manifests are due to be signed anew (half their lifetime), so online
// devices get fresh ones before theirs expire.
func TestManifestRefreshIsSignalled(t *testing.T) {
	e := newEnv(t)
	d := deliverytest.MustRun(t, delivery.Config{Log: e.log, Signer: e.signer, ManifestTTL: 2 * time.Second}, false)
	mustUpload(t, d, "app", "1.0")
	must := mustRelease(t)
	must(d.Gray(ctx(t), "app", "1.0", &deliverypb.Rule{Percent: pct(100)}, "x"))
	dev := &delivery.Device{ID: "x1"}
	time.Sleep(50 * time.Millisecond) // past the wake-up of the gray event itself
	before := d.View(dev).Digest
	select {
	case <-d.Changed():
	case <-time.After(3 * time.Second):
		t.Fatal("no Changed within the manifests' half lifetime")
	}
	time.Sleep(20 * time.Millisecond)
	if d.View(dev).Digest == before {
		t.Fatal("Changed fired but the view is the same")
	}
}

// TestFarWindowDoesNotSpin: a window ending in year 9999 does not wake
// watchers (the wait used to overflow and fire at once, thousands of
// times a second).
func TestFarWindowDoesNotSpin(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	far := time.Date(9999, 12, 31, 0, 0, 0, 0, time.UTC).UnixMilli()
	if _, err := d.SetSwitch(ctx(t), &deliverypb.Switch{Key: "s", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: boolValue(false),
		Variants: []*deliverypb.Variant{{Name: "v", Value: boolValue(true), Rule: &deliverypb.Rule{NotAfterMs: far}}}}, "x", 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	wakes := 0
	deadline := time.After(500 * time.Millisecond)
	for {
		select {
		case <-d.Changed():
			wakes++
			continue
		case <-deadline:
		}
		break
	}
	if wakes > 1 {
		t.Fatalf("Changed fired %d times in 500 ms with nothing changing", wakes)
	}
}

// TestSwitchesStayUnderTheViewBudget: switch definitions together are
// bounded, so that a view always fits a protocol frame.
func TestSwitchesStayUnderTheViewBudget(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	big := stringValue(strings.Repeat("x", 60<<10))
	n := 0
	for ; n < 20; n++ {
		_, err := d.SetSwitch(ctx(t), &deliverypb.Switch{Key: fmt.Sprint("copy-", n), Type: deliverypb.SwitchType_SWITCH_TYPE_STRING, DefaultValue: big}, "x", 0)
		if errors.Is(err, oplog.ErrInvalid) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if n == 20 || n*60<<10 > delivery.MaxSwitchesBytes {
		t.Fatalf("%d switches of 60 KiB accepted (budget %d bytes)", n, delivery.MaxSwitchesBytes)
	}
	// Replacing one is still allowed: the old definition does not count.
	if _, err := d.SetSwitch(ctx(t), &deliverypb.Switch{Key: "copy-0", Type: deliverypb.SwitchType_SWITCH_TYPE_STRING, DefaultValue: big}, "x", 0); err != nil {
		t.Fatalf("replacing a switch at the budget: %v", err)
	}
}
