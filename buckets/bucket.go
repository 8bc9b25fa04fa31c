package buckets

import (
	"fmt"
	"math"

	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Names of the default buckets. They exist without any control event; a
// definition of the same name overrides their settings, and they cannot be
// removed.
const (
	// Global holds global configuration; the gateway also computes topics
	// (and the everyone-topic) as part of it. No business by default.
	Global = "global"
	// Device is the default of device-dimension businesses.
	Device = "device"
	// MultiDevice is the default of user-dimension businesses in
	// multi-device mode (every device of the user gets each entry).
	MultiDevice = "multi-device"
	// User is the default of user-dimension businesses in single-device
	// mode (once one device acks an entry, the others do not get it).
	User = "user"
	// OneShot holds businesses whose entries are consumed once (commands,
	// notices). Empty by default: operators move businesses in.
	OneShot = "one-shot"
)

// Limits of a bucket definition.
const (
	// MaxNameLen is the longest bucket name: 1 to 32 of a–z, 0–9, '_' and
	// '-' (the business-code alphabet, so names are safe subject tokens).
	MaxNameLen = 32
	// MaxPriority is the lowest priority; 0 is the highest.
	MaxPriority = 9
	// MaxDescriptionLen is the longest description, in bytes.
	MaxDescriptionLen = 256
)

// Bucket is the settings of one bucket, as a value: a snapshot that does
// not change when the bucket is redefined.
type Bucket struct {
	Name string `json:"name"`
	// Priority 0 runs first and is never deferred for node overload;
	// larger values are deferred first.
	Priority int `json:"priority"`
	// Rate is the computations per second this bucket may start on one
	// node; 0 is unlimited.
	Rate float64 `json:"rate"`
	// Burst is the token bucket size; 0 means max(1, ceil(Rate)).
	Burst       int    `json:"burst"`
	Description string `json:"description,omitempty"`
	// Default is set on the five buckets that exist without any event.
	Default bool `json:"default"`
}

// burst is the effective token bucket size.
func (b Bucket) burst() float64 {
	if b.Burst > 0 {
		return float64(b.Burst)
	}
	return max(1, math.Ceil(b.Rate))
}

// defaults are the built-in buckets, by priority then name.
var defaults = []Bucket{
	{Name: Global, Priority: 0, Default: true, Description: "global configuration and topics"},
	{Name: Device, Priority: 1, Default: true, Description: "device-dimension businesses"},
	{Name: MultiDevice, Priority: 1, Default: true, Description: "user-dimension businesses, multi-device mode"},
	{Name: User, Priority: 2, Default: true, Description: "user-dimension businesses, single-device mode"},
	{Name: OneShot, Priority: 3, Default: true, Description: "entries consumed once: commands, notices"},
}

// defaultBucket returns the built-in settings of a default bucket.
func defaultBucket(name string) (Bucket, bool) {
	for _, b := range defaults {
		if b.Name == name {
			return b, true
		}
	}
	return Bucket{}, false
}

// IsDefault reports whether name is one of the five default buckets.
func IsDefault(name string) bool {
	_, ok := defaultBucket(name)
	return ok
}

// DefaultRule returns the bucket of a business that has no assignment:
// Device for the device dimension, User for the user dimension in
// single-device mode, MultiDevice otherwise (unspecified dimension and mode
// mean user and multi-device, as in the business registry).
func DefaultRule(b *oplogpb.Business) string {
	switch {
	case b.GetDimension() == oplogpb.Dimension_DIMENSION_DEVICE:
		return Device
	case b.GetDeviceMode() == oplogpb.DeviceMode_DEVICE_MODE_SINGLE:
		return User
	default:
		return MultiDevice
	}
}

// ValidName reports whether s is a valid bucket name.
func ValidName(s string) bool {
	return oplog.ValidName(s, MaxNameLen)
}

// checkName refuses a bad bucket name with oplog.ErrInvalidID.
func checkName(s string) error {
	if !ValidName(s) {
		return fmt.Errorf("buckets: name %q: want 1-%d of [a-z0-9_-]: %w", clip(s), MaxNameLen, oplog.ErrInvalidID)
	}
	return nil
}

// checkDefinition validates a bucket definition (not a removal).
func checkDefinition(pb *bucketspb.Bucket) error {
	if err := checkName(pb.GetName()); err != nil {
		return err
	}
	switch {
	case pb.Priority < 0 || pb.Priority > MaxPriority:
		return fmt.Errorf("buckets: bucket %s: priority %d: want 0-%d: %w", pb.Name, pb.Priority, MaxPriority, oplog.ErrInvalid)
	case math.IsNaN(pb.Rate) || math.IsInf(pb.Rate, 0) || pb.Rate < 0:
		return fmt.Errorf("buckets: bucket %s: rate %v: want a finite number >= 0: %w", pb.Name, pb.Rate, oplog.ErrInvalid)
	case pb.Burst < 0:
		return fmt.Errorf("buckets: bucket %s: burst %d: want >= 0: %w", pb.Name, pb.Burst, oplog.ErrInvalid)
	case len(pb.Description) > MaxDescriptionLen:
		return fmt.Errorf("buckets: bucket %s: description longer than %d bytes: %w", pb.Name, MaxDescriptionLen, oplog.ErrInvalid)
	}
	return nil
}

// bucketOf converts a valid definition into settings.
func bucketOf(pb *bucketspb.Bucket) Bucket {
	return Bucket{
		Name:        pb.Name,
		Priority:    int(pb.Priority),
		Rate:        pb.Rate,
		Burst:       int(pb.Burst),
		Description: pb.Description,
		Default:     IsDefault(pb.Name),
	}
}

// clip shortens untrusted strings quoted in errors and logs.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
