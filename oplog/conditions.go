package oplog

import (
	"cmp"
	"fmt"
	"strconv"
	"strings"

	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Attrs are the attributes a client reports about itself (in its hello).
// Entries with Conditions are delivered only to clients whose Attrs match.
type Attrs struct {
	AppVersion string
	OS         string
	OSVersion  string
	Model      string
	Region     string
	Network    string
	Channel    string
	CPU        string // CPU architecture: "arm64", "armv7", "x86_64", ...
}

// Match reports whether a client with attributes a may receive an entry
// with conditions c. A nil c matches everything. A condition on an
// attribute the client did not report does not match.
func Match(c *oplogpb.Conditions, a Attrs) bool {
	if c == nil {
		return true
	}
	return InRange(a.AppVersion, c.AppVersionMin, c.AppVersionMax) &&
		InRange(a.OSVersion, c.OsVersionMin, c.OsVersionMax) &&
		OneOf(a.OS, c.Os) && OneOf(a.Model, c.Models) && OneOf(a.Region, c.Regions) &&
		OneOf(a.Network, c.Networks) && OneOf(a.Channel, c.Channels) && OneOf(a.CPU, c.Cpus)
}

// OneOf reports whether v is in set, case-insensitively; an empty set
// holds everything. It does not allocate.
func OneOf(v string, set []string) bool {
	if len(set) == 0 {
		return true
	}
	for _, s := range set {
		if strings.EqualFold(s, v) {
			return true
		}
	}
	return false
}

// InRange reports whether version v is within the inclusive bounds (""
// for none); a bound on a version the client did not report ("") does not
// hold. It does not allocate.
func InRange(v, min, max string) bool {
	if min == "" && max == "" {
		return true
	}
	if v == "" {
		return false
	}
	return (min == "" || CompareVersions(v, min) >= 0) && (max == "" || CompareVersions(v, max) <= 0)
}

// CompareVersions compares dotted versions ("10.2.1" > "9.8"): numeric
// segments numerically, others as text; a missing segment counts as 0.
// It does not allocate.
func CompareVersions(a, b string) int {
	for a != "" || b != "" {
		var x, y string
		x, a = nextSegment(a)
		y, b = nextSegment(b)
		if c := compareSegment(x, y); c != 0 {
			return c
		}
	}
	return 0
}

// nextSegment splits the first dot-separated segment off v; an exhausted
// version yields "0".
func nextSegment(v string) (seg, rest string) {
	if v == "" {
		return "0", ""
	}
	if i := strings.IndexByte(v, '.'); i >= 0 {
		return v[:i], v[i+1:]
	}
	return v, ""
}

// compareSegment compares two segments: numerically when both are
// decimal numbers (that fit in 64 bits), as text otherwise.
func compareSegment(x, y string) int {
	xn, xok := parseDecimal(x)
	yn, yok := parseDecimal(y)
	if xok && yok {
		return cmp.Compare(xn, yn)
	}
	return strings.Compare(x, y)
}

func parseDecimal(s string) (uint64, bool) {
	if len(s) > 19 { // may overflow: the library checks
		n, err := strconv.ParseUint(s, 10, 64)
		return n, err == nil
	}
	if s == "" {
		return 0, false
	}
	var n uint64
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	return n, true
}

const maxConditionValues = 64

// ValidVersion reports whether s can be a version bound: up to 32 of
// [0-9A-Za-z.+-] ("" is no bound).
func ValidVersion(s string) bool {
	if len(s) > 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '.' || c == '-' || c == '+') {
			return false
		}
	}
	return true
}

func checkConditions(c *oplogpb.Conditions) error {
	if c == nil {
		return nil
	}
	for _, v := range []string{c.AppVersionMin, c.AppVersionMax, c.OsVersionMin, c.OsVersionMax} {
		if !ValidVersion(v) {
			return fmt.Errorf("conditions: version %q: %w", clip(v), ErrInvalid)
		}
	}
	for _, l := range [][]string{c.Os, c.Models, c.Regions, c.Networks, c.Channels, c.Cpus} {
		if len(l) > maxConditionValues {
			return fmt.Errorf("conditions: more than %d values in a list: %w", maxConditionValues, ErrInvalid)
		}
		for _, v := range l {
			if len(v) == 0 || len(v) > 64 {
				return fmt.Errorf("conditions: value %q: %w", clip(v), ErrInvalid)
			}
		}
	}
	return nil
}
