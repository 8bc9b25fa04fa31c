package delivery_test

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

func pct(p float64) *float64 { return &p }

var phone = delivery.Device{ID: "dev-1", User: "alice", Attrs: oplog.Attrs{
	AppVersion: "10.2.1", OS: "Android", OSVersion: "14", Model: "Pixel 8",
	Region: "eu-west", Network: "wifi", Channel: "play", CPU: "arm64"}}

func TestRulePredicates(t *testing.T) {
	const now = 1_700_000_000_000
	for _, c := range []struct {
		name string
		rule *deliverypb.Rule
		want bool
	}{
		{"nil rule", nil, true},
		{"empty rule", &deliverypb.Rule{}, true},
		{"app version in range", &deliverypb.Rule{AppVersionMin: "10.2", AppVersionMax: "10.10"}, true},
		{"app version below", &deliverypb.Rule{AppVersionMin: "10.3"}, false},
		{"app version above", &deliverypb.Rule{AppVersionMax: "10.2.0"}, false},
		{"os, case-insensitive", &deliverypb.Rule{Os: []string{"ios", "android"}}, true},
		{"other os", &deliverypb.Rule{Os: []string{"ios"}}, false},
		{"os version", &deliverypb.Rule{Os: []string{"android"}, OsVersionMin: "13"}, true},
		{"os version too old", &deliverypb.Rule{OsVersionMin: "15"}, false},
		{"model", &deliverypb.Rule{Models: []string{"pixel 8"}}, true},
		{"other model", &deliverypb.Rule{Models: []string{"Pixel 7"}}, false},
		{"network", &deliverypb.Rule{Networks: []string{"WIFI"}}, true},
		{"not on 4g", &deliverypb.Rule{Networks: []string{"4g"}}, false},
		{"region", &deliverypb.Rule{Regions: []string{"eu-west", "eu-north"}}, true},
		{"other region", &deliverypb.Rule{Regions: []string{"us-east"}}, false},
		{"cpu", &deliverypb.Rule{Cpus: []string{"arm64"}}, true},
		{"other cpu", &deliverypb.Rule{Cpus: []string{"x86_64"}}, false},
		{"channel", &deliverypb.Rule{Channels: []string{"play"}}, true},
		{"other channel", &deliverypb.Rule{Channels: []string{"huawei"}}, false},
		{"0 percent", &deliverypb.Rule{Percent: pct(0)}, false},
		{"100 percent", &deliverypb.Rule{Percent: pct(100)}, true},
		{"whitelisted device beats predicates", &deliverypb.Rule{Devices: []string{"dev-1"}, Os: []string{"ios"}, Percent: pct(0)}, true},
		{"whitelisted user", &deliverypb.Rule{Users: []string{"alice"}, Percent: pct(0)}, true},
		{"not whitelisted", &deliverypb.Rule{Users: []string{"bob"}, Devices: []string{"dev-2"}, Percent: pct(0)}, false},
		{"whitelist plus everyone on android", &deliverypb.Rule{Users: []string{"bob"}, Os: []string{"android"}, Percent: pct(100)}, true},
		{"window open", &deliverypb.Rule{NotBeforeMs: now - 1, NotAfterMs: now + 1}, true},
		{"window not started", &deliverypb.Rule{NotBeforeMs: now + 1}, false},
		{"window ended (exclusive)", &deliverypb.Rule{NotAfterMs: now}, false},
		{"window closes whitelist too", &deliverypb.Rule{Devices: []string{"dev-1"}, Percent: pct(0), NotAfterMs: now}, false},
		{"except the model", &deliverypb.Rule{Os: []string{"android"}, Except: &deliverypb.Rule{Models: []string{"pixel 8"}}}, false},
		{"except another model", &deliverypb.Rule{Os: []string{"android"}, Except: &deliverypb.Rule{Models: []string{"Pixel 7"}}}, true},
		{"except beats the whitelist", &deliverypb.Rule{Devices: []string{"dev-1"}, Percent: pct(0), Except: &deliverypb.Rule{Regions: []string{"eu-west"}}}, false},
		{"all predicates", &deliverypb.Rule{AppVersionMin: "10", Os: []string{"android"}, OsVersionMin: "14", OsVersionMax: "14",
			Models: []string{"Pixel 8"}, Networks: []string{"wifi"}, Regions: []string{"eu-west"}, Cpus: []string{"arm64"}, Channels: []string{"play"}}, true},
	} {
		r, err := delivery.Compile(c.rule, "salt")
		if err != nil {
			t.Errorf("%s: compile: %v", c.name, err)
			continue
		}
		if got := r.Match(&phone, now); got != c.want {
			t.Errorf("%s: Match = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestRuleUnreportedAttributeDoesNotMatch(t *testing.T) {
	bare := delivery.Device{ID: "dev-9"}
	for _, rule := range []*deliverypb.Rule{
		{AppVersionMin: "1"}, {OsVersionMax: "99"}, {Os: []string{"android"}}, {Models: []string{"x"}},
		{Networks: []string{"wifi"}}, {Regions: []string{"eu"}}, {Cpus: []string{"arm64"}}, {Channels: []string{"play"}},
	} {
		if delivery.MustCompile(rule, "s").Match(&bare, 0) {
			t.Errorf("a device without attributes matched %v", rule)
		}
	}
	if !delivery.MustCompile(&deliverypb.Rule{}, "s").Match(&bare, 0) {
		t.Error("a device without attributes did not match the empty rule")
	}
}

func TestCompileRefusesBadRules(t *testing.T) {
	long := strings.Repeat("x", 65)
	many := make([]string, delivery.MaxRuleValues+1)
	for i := range many {
		many[i] = fmt.Sprint("m", i)
	}
	huge := make([]string, delivery.MaxWhitelist+1)
	for i := range huge {
		huge[i] = fmt.Sprint("d", i)
	}
	for _, c := range []struct {
		name string
		rule *deliverypb.Rule
		want error
	}{
		{"bad version", &deliverypb.Rule{AppVersionMin: "1.0 beta"}, oplog.ErrInvalid},
		{"long version", &deliverypb.Rule{OsVersionMax: strings.Repeat("1", 33)}, oplog.ErrInvalid},
		{"empty app range", &deliverypb.Rule{AppVersionMin: "2", AppVersionMax: "1.9"}, oplog.ErrInvalid},
		{"empty os range", &deliverypb.Rule{OsVersionMin: "15", OsVersionMax: "14"}, oplog.ErrInvalid},
		{"empty value", &deliverypb.Rule{Models: []string{""}}, oplog.ErrInvalid},
		{"long value", &deliverypb.Rule{Regions: []string{long}}, oplog.ErrInvalid},
		{"too many values", &deliverypb.Rule{Models: many}, oplog.ErrInvalid},
		{"bad device id", &deliverypb.Rule{Devices: []string{"a b"}, Percent: pct(0)}, oplog.ErrInvalidID},
		{"bad user id", &deliverypb.Rule{Users: []string{"x.y"}, Percent: pct(0)}, oplog.ErrInvalidID},
		{"whitelist too long", &deliverypb.Rule{Devices: huge, Percent: pct(0)}, oplog.ErrInvalid},
		{"whitelist without percent", &deliverypb.Rule{Devices: []string{"d1"}}, oplog.ErrInvalid},
		{"negative percent", &deliverypb.Rule{Percent: pct(-1)}, oplog.ErrInvalid},
		{"over 100 percent", &deliverypb.Rule{Percent: pct(100.5)}, oplog.ErrInvalid},
		{"NaN percent", &deliverypb.Rule{Percent: pct(math.NaN())}, oplog.ErrInvalid},
		{"window backwards", &deliverypb.Rule{NotBeforeMs: 10, NotAfterMs: 5}, oplog.ErrInvalid},
		{"negative window", &deliverypb.Rule{NotBeforeMs: -5}, oplog.ErrInvalid},
		{"long salt", &deliverypb.Rule{Salt: strings.Repeat("s", 200)}, oplog.ErrInvalid},
		{"empty except", &deliverypb.Rule{Except: &deliverypb.Rule{}}, oplog.ErrInvalid},
		{"except with a percentage", &deliverypb.Rule{Except: &deliverypb.Rule{Models: []string{"x"}, Percent: pct(5)}}, oplog.ErrInvalid},
	} {
		if _, err := delivery.Compile(c.rule, "salt"); !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.want)
		}
	}
}

// devices returns n device ids shaped like real ones: a common prefix and
// a counter, the hardest case for a weak hash.
func devices(n int) []delivery.Device {
	ds := make([]delivery.Device, n)
	for i := range ds {
		ds[i] = delivery.Device{ID: fmt.Sprintf("device-%07d", i)}
	}
	return ds
}

// TestPercentageDistribution checks that a sticky percentage takes its share
// of devices within statistical bounds: the count of n devices in p% is
// binomial, and each is checked at 5 standard deviations (a false alarm
// about once in 3.5 million runs; the ids are fixed, so the test is
// deterministic anyway).
func TestPercentageDistribution(t *testing.T) {
	const n = 200_000
	ds := devices(n)
	for _, p := range []float64{0.5, 1, 5, 10, 25, 33.3, 50, 90} {
		r := delivery.MustCompile(&deliverypb.Rule{Percent: pct(p)}, "release-42")
		got := 0
		for i := range ds {
			if r.Match(&ds[i], 0) {
				got++
			}
		}
		q := p / 100
		mean, sd := n*q, math.Sqrt(n*q*(1-q))
		if math.Abs(float64(got)-mean) > 5*sd {
			t.Errorf("%v%%: %d of %d devices, want %.0f ± %.0f (5σ)", p, got, n, mean, 5*sd)
		} else {
			t.Logf("%v%%: %d of %d devices (expected %.0f, σ %.1f)", p, got, n, mean, sd)
		}
	}
}

// TestPlaceIsUniform is a chi-square test of the places of 200,000 device ids
// over 100 equal slots: with 99 degrees of freedom, a statistic over 180
// has a probability below 1e-6 for a uniform hash.
func TestPlaceIsUniform(t *testing.T) {
	const n, bins = 200_000, 100
	for _, salt := range []string{"release-1", "release-2", "switch-dark-mode", ""} {
		var counts [bins]int
		for i := 0; i < n; i++ {
			p := delivery.Place(salt, fmt.Sprintf("device-%07d", i))
			if p >= delivery.PercentScale {
				t.Fatalf("place %d out of range", p)
			}
			counts[int(p)*bins/delivery.PercentScale]++
		}
		exp := float64(n) / bins
		chi := 0.0
		for _, c := range counts {
			chi += (float64(c) - exp) * (float64(c) - exp) / exp
		}
		if chi > 180 {
			t.Errorf("salt %q: chi-square %.1f over 100 slots, want < 180", salt, chi)
		} else {
			t.Logf("salt %q: chi-square %.1f (99 df)", salt, chi)
		}
	}
}

// TestRaisingPercentOnlyAddsDevices checks stickiness: every device in at
// a lower percentage is in at every higher one, and the same percentage
// compiled again gives the same devices.
func TestRaisingPercentOnlyAddsDevices(t *testing.T) {
	ds := devices(50_000)
	steps := []float64{0.1, 1, 2, 5, 10, 20, 50, 99, 100}
	prev := make([]bool, len(ds))
	for _, p := range steps {
		r := delivery.MustCompile(&deliverypb.Rule{Percent: pct(p)}, "release-7")
		again := delivery.MustCompile(&deliverypb.Rule{Percent: pct(p)}, "release-7")
		for i := range ds {
			in := r.Match(&ds[i], 0)
			if prev[i] && !in {
				t.Fatalf("%s was in below %v%% and is out at %v%%", ds[i].ID, p, p)
			}
			if again.Match(&ds[i], 0) != in {
				t.Fatalf("%s: two compilations of %v%% disagree", ds[i].ID, p)
			}
			prev[i] = in
		}
	}
}

// TestSaltsAreIndependent checks that two releases at 50% pick unrelated
// halves: about a quarter of the devices are in both.
func TestSaltsAreIndependent(t *testing.T) {
	const n = 100_000
	ds := devices(n)
	a := delivery.MustCompile(&deliverypb.Rule{Percent: pct(50)}, "release-a")
	b := delivery.MustCompile(&deliverypb.Rule{Percent: pct(50)}, "release-b")
	both := 0
	for i := range ds {
		if a.Match(&ds[i], 0) && b.Match(&ds[i], 0) {
			both++
		}
	}
	mean, sd := n*0.25, math.Sqrt(n*0.25*0.75)
	if math.Abs(float64(both)-mean) > 5*sd {
		t.Errorf("%d of %d devices in both 50%% populations, want %.0f ± %.0f", both, n, mean, 5*sd)
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	r := delivery.MustCompile(grayRule(), "release-1")
	if n := testing.AllocsPerRun(1000, func() { r.Match(&phone, 0) }); n != 0 {
		t.Errorf("Match allocates %v times", n)
	}
}

// grayRule is a typical gray rule: an app version range, two OSes, a few
// regions, a network and 10% of the rest.
func grayRule() *deliverypb.Rule {
	return &deliverypb.Rule{AppVersionMin: "10.0", AppVersionMax: "10.9", Os: []string{"ios", "android"},
		OsVersionMin: "12", Regions: []string{"eu-north", "eu-central", "eu-west"}, Networks: []string{"wifi"}, Percent: pct(10)}
}

// BenchmarkRuleMatch measures rule evaluations per second on one core
// (run with -cpu 1) for a typical gray rule, next to its baseline in the
// same run: the oplog's condition match (what the gateway runs per live
// entry) on the same predicates without the percentage.
func BenchmarkRuleMatch(b *testing.B) {
	ds := []delivery.Device{phone, phone, phone, phone}
	ds[1].Attrs.AppVersion, ds[2].Attrs.Region, ds[3].ID = "9.8", "us-east", "dev-77"
	b.Run("rule=gray", func(b *testing.B) {
		r := delivery.MustCompile(grayRule(), "release-1")
		n := 0
		for i := 0; b.Loop(); i++ {
			if r.Match(&ds[i&3], 0) {
				n++
			}
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "evals/s")
	})
	b.Run("rule=whitelist-1000", func(b *testing.B) {
		wl := make([]string, 1000)
		for i := range wl {
			wl[i] = fmt.Sprint("wl-", i)
		}
		pb := grayRule()
		pb.Devices = wl
		r := delivery.MustCompile(pb, "release-1")
		for i := 0; b.Loop(); i++ {
			r.Match(&ds[i&3], 0)
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "evals/s")
	})
	b.Run("baseline=oplog.Match", func(b *testing.B) {
		g := grayRule()
		c := &oplogpb.Conditions{AppVersionMin: g.AppVersionMin, AppVersionMax: g.AppVersionMax, Os: g.Os,
			OsVersionMin: g.OsVersionMin, Regions: g.Regions, Networks: g.Networks}
		c = proto.Clone(c).(*oplogpb.Conditions)
		for i := 0; b.Loop(); i++ {
			oplog.Match(c, ds[i&3].Attrs)
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "evals/s")
	})
}
