package oplog

import (
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
}

// Match reports whether a client with attributes a may receive an entry
// with conditions c. A nil c matches everything. A condition on an
// attribute the client did not report does not match.
func Match(c *oplogpb.Conditions, a Attrs) bool {
	if c == nil {
		return true
	}
	return inRange(a.AppVersion, c.AppVersionMin, c.AppVersionMax) &&
		inRange(a.OSVersion, c.OsVersionMin, c.OsVersionMax) &&
		oneOf(a.OS, c.Os) && oneOf(a.Model, c.Models) && oneOf(a.Region, c.Regions) &&
		oneOf(a.Network, c.Networks) && oneOf(a.Channel, c.Channels)
}

func oneOf(v string, set []string) bool {
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

func inRange(v, min, max string) bool {
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
func CompareVersions(a, b string) int {
	as, bs := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(as) || i < len(bs); i++ {
		x, y := "0", "0"
		if i < len(as) {
			x = as[i]
		}
		if i < len(bs) {
			y = bs[i]
		}
		xn, xerr := strconv.ParseUint(x, 10, 64)
		yn, yerr := strconv.ParseUint(y, 10, 64)
		switch {
		case xerr == nil && yerr == nil:
			if xn != yn {
				if xn < yn {
					return -1
				}
				return 1
			}
		default:
			if c := strings.Compare(x, y); c != 0 {
				return c
			}
		}
	}
	return 0
}

const maxConditionValues = 64

func validVersion(s string) bool {
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
		if !validVersion(v) {
			return fmt.Errorf("conditions: version %q: %w", clip(v), ErrInvalid)
		}
	}
	for _, l := range [][]string{c.Os, c.Models, c.Regions, c.Networks, c.Channels} {
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
