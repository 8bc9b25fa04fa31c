package main

import (
	"context"
	"io"
	"testing"
	"time"
)

// TestStormSmoke runs the connect storm with tiny counts, one storm per
// mode: every device must get exactly its entries, and bucketed rounds
// must read the store less per connect than per-business ones (a count,
// not a timing).
func TestStormSmoke(t *testing.T) {
	num := `\d+\.\d\d`
	runSmoke(t, 2*time.Minute,
		[]string{"storm", "-devices", "40", "-per-device", "5", "-entries", "1", "-runs", "1", "-timeout", "2m"},
		[]string{
			`^bucketed\s+1\s+` + num + `\s+` + num + `\s+` + num + `\s+` + num + `\s+\d+\s+\d+\s+\d+ 40 / 0 / 0 / 0$`,
			`^per-business\s+1\s+` + num + `\s+` + num + `\s+` + num + `\s+` + num + `\s+\d+\s+\d+\s+\d+ 40 / 0 / 0 / 0$`,
			`^reads per connect: bucketed ` + num + `, per-business ` + num + `: ` + `\d+\.\d% fewer: MET$`,
			`^total time:\s+bucketed ` + num + ` ms, per-business ` + num + ` ms`,
		},
		[]string{
			"every device got exactly its entries: 80 of 80 device syncs complete, 0 lost, 0 duplicated, 0 unexpected: MET",
		})
}

func TestStormFlags(t *testing.T) {
	for _, args := range [][]string{
		{"storm", "-devices", "0"},
		{"storm", "-businesses", "5", "-per-device", "6"},
		{"storm", "-fsync", "never"},
		{"storm", "-runs", "0"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want a flag error", args)
		}
	}
}

// TestStormBusinesses: the storm's mix reaches the child as registered
// businesses of the right dimension and mode.
func TestStormBusinesses(t *testing.T) {
	c := &stormConfig{businesses: 80}
	mix := c.businessMix()
	got, err := parseBusinesses(businessFlag(mix))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 80 {
		t.Fatalf("%d businesses, want 80", len(got))
	}
	count := map[string]int{}
	for i, b := range got {
		if b.Code != mix[i].code {
			t.Errorf("business %d is %s, want %s", i, b.Code, mix[i].code)
		}
		count[b.Dimension.String()+"/"+b.DeviceMode.String()]++
	}
	want := map[string]int{
		"DIMENSION_USER/DEVICE_MODE_UNSPECIFIED":   60,
		"DIMENSION_USER/DEVICE_MODE_SINGLE":        10,
		"DIMENSION_DEVICE/DEVICE_MODE_UNSPECIFIED": 10,
	}
	for k, n := range want {
		if count[k] != n {
			t.Errorf("%d businesses %s, want %d", count[k], k, n)
		}
	}
	for _, bad := range []string{"x", "a:group", "a:user:many", "A:user", "a:user:single:x"} {
		if _, err := parseBusinesses(bad); err == nil {
			t.Errorf("parseBusinesses(%q): got nil error", bad)
		}
	}
}
