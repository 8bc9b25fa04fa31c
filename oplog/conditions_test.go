package oplog_test

import (
	"testing"

	"github.com/sluicehq/sluice/oplog"
)

func TestCompareVersions(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want int
	}{
		{"1.0", "1.0", 0},
		{"1", "1.0.0", 0},
		{"10.2.1", "9.8", 1},
		{"9.8", "10.2.1", -1},
		{"1.10", "1.9", 1},
		{"2.0.0-beta", "2.0.0-alpha", 1},
		{"2.0.1", "2.0.0-rc1", 1}, // "1" < "0-rc1" as text: text compare is what mixed segments get
		{"1.2", "1.2.1", -1},
		{"1.2.0.0", "1.2", 0},
		{"", "0", 0},
		{"18446744073709551615", "18446744073709551614", 1},
		{"99999999999999999999", "1", 1}, // too big for 64 bits: text
	} {
		if got := oplog.CompareVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := oplog.CompareVersions(c.b, c.a); got != -c.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", c.b, c.a, got, -c.want)
		}
	}
	if n := testing.AllocsPerRun(100, func() { oplog.CompareVersions("10.2.13", "10.2.9") }); n != 0 {
		t.Errorf("CompareVersions allocates %v times", n)
	}
}
