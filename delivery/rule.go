package delivery

import (
	"fmt"
	"math"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Device is what a rule is evaluated against: a device, its bound user ("" for
// none) and the attributes it reported.
type Device struct {
	ID    string
	User  string
	Attrs oplog.Attrs
}

// Limits of a rule.
const (
	MaxWhitelist  = 10000 // users plus devices in one rule
	MaxRuleValues = 64    // values in one attribute list
	maxValueLen   = 64
	maxSaltLen    = 128
	// PercentScale is the resolution of a sticky percentage: a device's
	// place is one of PercentScale slots, so 0.0001% steps count.
	PercentScale = 1_000_000
)

// Rule is a compiled targeting rule (deliverypb.Rule), safe for concurrent
// use. Push, releases and switches all target with it.
//
// A device matches when the time is inside the window and it is on the
// whitelist, or when it passes every predicate set and its sticky place
// (Place) is below the percentage.
type Rule struct {
	users, devices map[string]struct{}
	// cond holds the attribute predicates, matched as the oplog matches
	// an entry's conditions (oplog.Match); nil: none (Everyone).
	cond      *oplogpb.Conditions
	threshold uint32 // places below it are in; PercentScale: all
	salt      string
	notBefore int64 // unix ms; 0: none
	notAfter  int64 // unix ms, exclusive; 0: none
	except    *Rule // devices it matches are left out; nil: none
}

// Everyone is the rule that matches every device at any time.
var Everyone = &Rule{threshold: PercentScale}

// Compile validates a rule and compiles it. A nil rule is Everyone. salt is
// used when the rule has none: the id of the release or switch, so that
// each gets its own sticky population.
//
// Errors wrap oplog.ErrInvalid: a version bound that is not a version, a
// list over MaxRuleValues or a value over 64 bytes, a whitelist over
// MaxWhitelist or with an id that is not a valid id, a percentage outside
// 0–100 or unset beside a whitelist, or a window that ends before it
// starts.
func Compile(pb *deliverypb.Rule, salt string) (*Rule, error) {
	if pb == nil {
		return Everyone, nil
	}
	c := &oplogpb.Conditions{AppVersionMin: pb.AppVersionMin, AppVersionMax: pb.AppVersionMax,
		OsVersionMin: pb.OsVersionMin, OsVersionMax: pb.OsVersionMax}
	r := &Rule{cond: c, salt: pb.Salt, notBefore: pb.NotBeforeMs, notAfter: pb.NotAfterMs}
	if r.salt == "" {
		r.salt = salt
	}
	if len(r.salt) > maxSaltLen {
		return nil, fmt.Errorf("rule: salt over %d bytes: %w", maxSaltLen, oplog.ErrInvalid)
	}
	for _, v := range []string{c.AppVersionMin, c.AppVersionMax, c.OsVersionMin, c.OsVersionMax} {
		if !oplog.ValidVersion(v) {
			return nil, fmt.Errorf("rule: version %q: want up to 32 of [0-9A-Za-z.+-]: %w", clip(v), oplog.ErrInvalid)
		}
	}
	if c.AppVersionMin != "" && c.AppVersionMax != "" && oplog.CompareVersions(c.AppVersionMin, c.AppVersionMax) > 0 {
		return nil, fmt.Errorf("rule: app version range %s-%s is empty: %w", c.AppVersionMin, c.AppVersionMax, oplog.ErrInvalid)
	}
	if c.OsVersionMin != "" && c.OsVersionMax != "" && oplog.CompareVersions(c.OsVersionMin, c.OsVersionMax) > 0 {
		return nil, fmt.Errorf("rule: OS version range %s-%s is empty: %w", c.OsVersionMin, c.OsVersionMax, oplog.ErrInvalid)
	}
	var err error
	for _, l := range []struct {
		name string
		in   []string
		out  *[]string
	}{{"os", pb.Os, &c.Os}, {"models", pb.Models, &c.Models}, {"networks", pb.Networks, &c.Networks},
		{"regions", pb.Regions, &c.Regions}, {"cpus", pb.Cpus, &c.Cpus}, {"channels", pb.Channels, &c.Channels}} {
		if *l.out, err = valueList(l.name, l.in); err != nil {
			return nil, err
		}
	}
	if n := len(pb.Users) + len(pb.Devices); n > MaxWhitelist {
		return nil, fmt.Errorf("rule: whitelist of %d, over %d: %w", n, MaxWhitelist, oplog.ErrInvalid)
	}
	if r.users, err = idSet("users", pb.Users); err != nil {
		return nil, err
	}
	if r.devices, err = idSet("devices", pb.Devices); err != nil {
		return nil, err
	}
	switch {
	case pb.Percent == nil && (r.users != nil || r.devices != nil):
		return nil, fmt.Errorf("rule: a rule with a whitelist must set percent (0 for the whitelist only): %w", oplog.ErrInvalid)
	case pb.Percent == nil:
		r.threshold = PercentScale
	default:
		p := *pb.Percent
		if math.IsNaN(p) || p < 0 || p > 100 {
			return nil, fmt.Errorf("rule: percent %v: want 0-100: %w", p, oplog.ErrInvalid)
		}
		r.threshold = uint32(math.Round(p / 100 * PercentScale))
	}
	if r.notBefore < 0 || r.notAfter < 0 || (r.notAfter != 0 && r.notAfter <= r.notBefore) {
		return nil, fmt.Errorf("rule: window %d-%d is empty: %w", r.notBefore, r.notAfter, oplog.ErrInvalid)
	}
	if x := pb.Except; x != nil {
		if len(x.Users) > 0 || len(x.Devices) > 0 || x.Percent != nil || x.NotBeforeMs != 0 || x.NotAfterMs != 0 || x.Except != nil {
			return nil, fmt.Errorf("rule: except: attribute predicates only: %w", oplog.ErrInvalid)
		}
		if x.AppVersionMin == "" && x.AppVersionMax == "" && x.OsVersionMin == "" && x.OsVersionMax == "" && len(x.Os)+len(x.Models)+
			len(x.Networks)+len(x.Regions)+len(x.Cpus)+len(x.Channels) == 0 {
			return nil, fmt.Errorf("rule: an empty except would leave every device out: %w", oplog.ErrInvalid)
		}
		if r.except, err = Compile(x, ""); err != nil {
			return nil, fmt.Errorf("rule: except: %w", err)
		}
	}
	return r, nil
}

// MustCompile is Compile for rules known to be valid (tests, literals); it
// panics on an invalid one.
func MustCompile(pb *deliverypb.Rule, salt string) *Rule {
	r, err := Compile(pb, salt)
	if err != nil {
		panic(err)
	}
	return r
}

func valueList(name string, in []string) ([]string, error) {
	if len(in) == 0 {
		return nil, nil
	}
	if len(in) > MaxRuleValues {
		return nil, fmt.Errorf("rule: %s: %d values, over %d: %w", name, len(in), MaxRuleValues, oplog.ErrInvalid)
	}
	out := make([]string, len(in))
	for i, v := range in {
		if v == "" || len(v) > maxValueLen {
			return nil, fmt.Errorf("rule: %s: value %q: want 1-%d bytes: %w", name, clip(v), maxValueLen, oplog.ErrInvalid)
		}
		out[i] = v
	}
	return out, nil
}

func idSet(name string, ids []string) (map[string]struct{}, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	set := make(map[string]struct{}, len(ids))
	for _, id := range ids {
		if !oplog.ValidID(id) {
			return nil, fmt.Errorf("rule: %s: id %q: %w", name, clip(id), oplog.ErrInvalidID)
		}
		set[id] = struct{}{}
	}
	return set, nil
}

// Match reports whether the rule reaches device d at unix milliseconds now.
// It does not allocate.
func (r *Rule) Match(d *Device, now int64) bool {
	if (r.notBefore != 0 && now < r.notBefore) || (r.notAfter != 0 && now >= r.notAfter) {
		return false
	}
	if r.except != nil && r.except.Match(d, now) {
		return false
	}
	if r.whitelisted(d) {
		return true
	}
	return oplog.Match(r.cond, d.Attrs) && r.inPercent(d.ID)
}

func (r *Rule) whitelisted(d *Device) bool {
	if r.devices != nil {
		if _, ok := r.devices[d.ID]; ok {
			return true
		}
	}
	if r.users != nil && d.User != "" {
		if _, ok := r.users[d.User]; ok {
			return true
		}
	}
	return false
}

func (r *Rule) inPercent(device string) bool {
	switch r.threshold {
	case PercentScale:
		return true
	case 0:
		return false
	}
	return Place(r.salt, device) < r.threshold
}

// Place is a device's sticky place for a salt: a number in
// [0, PercentScale) from a hash of the salt and the device id. A rule with
// percentage p takes the devices whose place is below p% of PercentScale,
// so a device's answer never changes while the rule's percentage does not,
// and raising the percentage only adds devices. Different salts give
// independent populations.
//
// The hash is 64-bit FNV-1a over salt, a zero byte and the device id,
// finished with the murmur3 64-bit mixer (FNV alone spreads short,
// similar ids poorly in its low bits). It is part of the platform's
// contract: changing it would move devices between populations.
func Place(salt, device string) uint32 {
	const (
		offset = 14695981039346656037
		prime  = 1099511628211
	)
	h := uint64(offset)
	for i := 0; i < len(salt); i++ {
		h = (h ^ uint64(salt[i])) * prime
	}
	h *= prime // the zero separator: h ^ 0 == h
	for i := 0; i < len(device); i++ {
		h = (h ^ uint64(device[i])) * prime
	}
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	// Lemire's multiply-shift maps the top 32 bits onto [0, PercentScale)
	// without the bias of a modulo.
	return uint32((h >> 32) * PercentScale >> 32)
}

// clip shortens s for an error message.
func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}
