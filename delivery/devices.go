package delivery

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// StreamDevices holds the device registry: the last known record of every
// device, on sluice.device.<device>.
const StreamDevices = "SLUICE_DEVICES"

const subjectDevices = "sluice.device."

// The registry's keys in badger: d/<device> → the record,
// u/<user>/<device> for the devices a user is bound on, and n/devices the
// count of devices.
var (
	devicePrefix = []byte("d/")
	userPrefix   = []byte("u/")
	countPrefix  = []byte("n/")
	countKey     = []byte("n/devices")
)

func userKey(user, device string) []byte { return []byte("u/" + user + "/" + device) }

// RegistryConfig configures a Registry. A zero field takes the default in
// its comment.
type RegistryConfig struct {
	// Log is the oplog (its JetStream context and replica count). Required.
	Log *oplog.Log
	// Dir is the badger directory of the projection. Required.
	Dir string
	// SeenEvery is how often an unchanged device's last-seen time is
	// refreshed. Default 24 hours.
	SeenEvery time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Registry is the device registry: what every device that connected last
// reported (user, app, attributes), for dry runs that count the devices a
// release, a switch or a push would reach. Gateways report devices with
// Seen; the records are events in StreamDevices (last state per device),
// projected into badger.
type Registry struct {
	cfg  RegistryConfig
	js   jetstream.JetStream
	db   *badger.DB
	proj *oplog.Projection
	lg   zerolog.Logger

	published atomic.Int64 // records published by Seen
	failed    atomic.Int64 // of which the publish failed
}

// OpenRegistry creates the stream if needed and opens the projection.
func OpenRegistry(ctx context.Context, cfg RegistryConfig) (*Registry, error) {
	if cfg.Log == nil || cfg.Dir == "" {
		return nil, errors.New("delivery: RegistryConfig.Log and Dir are required")
	}
	if cfg.SeenEvery <= 0 {
		cfg.SeenEvery = 24 * time.Hour
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	r := &Registry{cfg: cfg, js: cfg.Log.JetStream(), lg: zerolog.Nop()}
	if cfg.Logger != nil {
		r.lg = cfg.Logger.With().Str("component", "devices").Logger()
	}
	if _, err := cfg.Log.EnsureStream(ctx, jetstream.StreamConfig{
		Name:              StreamDevices,
		Description:       "Sluice device registry: the last record of every device",
		Subjects:          []string{subjectDevices + ">"},
		Storage:           jetstream.FileStorage,
		Replicas:          cfg.Log.Replicas(),
		MaxMsgsPerSubject: 1,
	}); err != nil {
		return nil, err
	}
	db, err := oplog.OpenStore(cfg.Dir, r.lg)
	if err != nil {
		return nil, err
	}
	r.db = db
	r.proj, err = oplog.NewProjection(oplog.ProjectionConfig{
		Stream: StreamDevices, DB: db, JetStream: r.js, Prefixes: [][]byte{devicePrefix, userPrefix, countPrefix},
		Apply: r.apply, Logger: &r.lg,
	})
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return r, nil
}

// apply projects one device record: d/<device> → the record.
func (r *Registry) apply(txn *badger.Txn, rec *oplog.Record) error {
	dev := &deliverypb.Device{}
	if err := proto.Unmarshal(rec.Data, dev); err != nil || !oplog.ValidID(dev.Device) || subjectDevices+dev.Device != rec.Subject {
		r.lg.Warn().Uint64("seq", rec.Seq).Str("subject", rec.Subject).Msg("device record skipped: malformed")
		return nil
	}
	key := append(devicePrefix, dev.Device...)
	old := &deliverypb.Device{}
	if it, err := txn.Get(key); err == nil {
		if err := it.Value(func(v []byte) error { return proto.Unmarshal(v, old) }); err == nil && old.User != "" && old.User != dev.User {
			if err := txn.Delete(userKey(old.User, dev.Device)); err != nil {
				return err
			}
		}
	} else if errors.Is(err, badger.ErrKeyNotFound) {
		n, err := oplog.GetUint64(txn, countKey)
		if err != nil {
			return err
		}
		if err := txn.Set(countKey, binary.BigEndian.AppendUint64(nil, n+1)); err != nil {
			return err
		}
	} else {
		return err
	}
	if dev.User != "" && oplog.ValidID(dev.User) {
		if err := txn.Set(userKey(dev.User, dev.Device), nil); err != nil {
			return err
		}
	}
	return txn.Set(key, rec.Data)
}

// Run applies the stream until ctx ends.
func (r *Registry) Run(ctx context.Context) error { return r.proj.Run(ctx) }

// Projection is the registry's projection, for rebuilds and digests.
func (r *Registry) Projection() *oplog.Projection { return r.proj }

// Close closes the badger store; call it after Run returned.
func (r *Registry) Close() error { return r.db.Close() }

// MaxPushTokenLen bounds a vendor push token.
const MaxPushTokenLen = 512

// Seen records that a device connected with these attributes, and its
// vendor push address (nil: keep the one known; an empty token: none). It
// publishes a record only when something changed since the registry's
// last one, or the last one is older than SeenEvery, so a reconnect costs
// one key lookup. It does not wait for the publish.
func (r *Registry) Seen(app string, d *Device, push *deliverypb.PushAddress) {
	if !oplog.ValidID(d.ID) {
		return
	}
	now := r.cfg.Now()
	rec := &deliverypb.Device{Device: d.ID, User: d.User, App: app, AppVersion: d.Attrs.AppVersion, Os: d.Attrs.OS,
		OsVersion: d.Attrs.OSVersion, Model: d.Attrs.Model, Region: d.Attrs.Region, Network: d.Attrs.Network,
		Channel: d.Attrs.Channel, Cpu: d.Attrs.CPU}
	old, ok, err := r.Get(d.ID)
	switch {
	case push != nil && push.Token != "" && len(push.Token) <= MaxPushTokenLen && validName(push.Channel):
		rec.PushChannel, rec.PushToken = push.Channel, push.Token
	case push == nil && ok:
		rec.PushChannel, rec.PushToken = old.PushChannel, old.PushToken
	}
	if err == nil && ok {
		seen := old.SeenMs
		old.SeenMs = 0
		if proto.Equal(old, rec) && now.Sub(time.UnixMilli(seen)) < r.cfg.SeenEvery {
			return
		}
	}
	rec.SeenMs = now.UnixMilli()
	data, err := proto.Marshal(rec)
	if err != nil {
		return
	}
	r.published.Add(1)
	fut, err := r.js.PublishAsync(subjectDevices+d.ID, data)
	if err != nil {
		r.failed.Add(1)
		r.lg.Debug().Err(err).Str("device", d.ID).Msg("device record not published")
		return
	}
	go func() {
		select {
		case <-fut.Ok():
		case err := <-fut.Err():
			r.failed.Add(1)
			r.lg.Debug().Err(err).Str("device", d.ID).Msg("device record not stored")
		}
	}()
}

// RegistryStats counts what Seen published.
type RegistryStats struct {
	Published int64 `json:"published"` // records published (changed or refreshed devices)
	Failed    int64 `json:"failed"`    // of which the publish failed (the next connect retries)
}

// Stats returns the registry's counters.
func (r *Registry) Stats() RegistryStats {
	return RegistryStats{Published: r.published.Load(), Failed: r.failed.Load()}
}

// Get returns the registry's record of a device.
func (r *Registry) Get(device string) (*deliverypb.Device, bool, error) {
	var out *deliverypb.Device
	err := r.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(append(devicePrefix, device...))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return it.Value(func(v []byte) error {
			out = &deliverypb.Device{}
			return proto.Unmarshal(v, out)
		})
	})
	if err != nil {
		return nil, false, fmt.Errorf("devices: get %s: %w", device, err)
	}
	return out, out != nil, nil
}

// DevicesOf returns the registry's records of the devices bound to a user.
func (r *Registry) DevicesOf(user string) ([]*deliverypb.Device, error) {
	var ids []string
	prefix := []byte("u/" + user + "/")
	err := r.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			ids = append(ids, string(it.Item().Key()[len(prefix):]))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("devices: of user %s: %w", user, err)
	}
	out := make([]*deliverypb.Device, 0, len(ids))
	for _, id := range ids {
		if dev, ok, err := r.Get(id); err != nil {
			return nil, err
		} else if ok && dev.User == user {
			out = append(out, dev)
		}
	}
	return out, nil
}

// Each calls fn with every known device's record, in id order, until fn
// returns false. The record is reused between calls.
func (r *Registry) Each(ctx context.Context, fn func(*deliverypb.Device) bool) error {
	rec := &deliverypb.Device{}
	n := 0
	return r.db.View(func(txn *badger.Txn) error {
		opts := badger.DefaultIteratorOptions
		opts.Prefix = devicePrefix
		it := txn.NewIterator(opts)
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			if n%4096 == 0 && ctx.Err() != nil {
				return ctx.Err()
			}
			n++
			if err := it.Item().Value(func(v []byte) error { return proto.Unmarshal(v, rec) }); err != nil {
				return err
			}
			if !fn(rec) {
				return nil
			}
		}
		return nil
	})
}

// CatchUp waits until the projection has applied every record stored
// when it was called.
func (r *Registry) CatchUp(ctx context.Context) error { return r.proj.CatchUp(ctx) }

// maxSample is how many matching device ids a dry run returns.
const maxSample = 10

// Known returns the number of devices the registry knows.
func (r *Registry) Known() (uint64, error) {
	var n uint64
	err := r.db.View(func(txn *badger.Txn) error {
		var err error
		n, err = oplog.GetUint64(txn, countKey)
		return err
	})
	return n, err
}

// Count walks every known device and counts those match accepts. It reads
// a consistent badger snapshot; a million devices take about a second.
func (r *Registry) Count(ctx context.Context, match func(*Device) bool) (*deliverypb.DryRun, error) {
	out := &deliverypb.DryRun{}
	dev := &Device{}
	if err := r.Each(ctx, func(rec *deliverypb.Device) bool {
		out.Known++
		*dev = Device{ID: rec.Device, User: rec.User, Attrs: attrsOfRecord(rec)}
		if match(dev) {
			tally(out, rec.Device)
		}
		return true
	}); err != nil {
		return nil, fmt.Errorf("devices: count: %w", err)
	}
	return out, nil
}

// tally counts a matching device in a dry run; the first maxSample are
// its sample.
func tally(out *deliverypb.DryRun, device string) {
	out.Matching++
	if len(out.Sample) < maxSample {
		out.Sample = append(out.Sample, device)
	}
}

// DryRunRule counts the known devices a rule reaches now (salt as for
// Compile).
func (d *Delivery) DryRunRule(ctx context.Context, reg *Registry, pb *deliverypb.Rule, salt string) (*deliverypb.DryRun, error) {
	r, err := Compile(pb, salt)
	if err != nil {
		return nil, err
	}
	now := d.cfg.Now().UnixMilli()
	return reg.Count(ctx, func(dev *Device) bool { return r.Match(dev, now) })
}

// DryRunRelease counts the known devices a release would be offered to
// with gray rule gray (nil: the release's own gray rule, or its whole
// audience when it has none): its audience and the rule.
func (d *Delivery) DryRunRelease(ctx context.Context, reg *Registry, pkg, version string, gray *deliverypb.Rule) (*deliverypb.DryRun, error) {
	p := d.ctl.Snapshot().packages[pkg]
	if p == nil {
		return nil, fmt.Errorf("package %s: %w", clip(pkg), oplog.ErrNotFound)
	}
	_, rel := p.find(version)
	if rel == nil {
		return nil, fmt.Errorf("package %s version %s: %w", pkg, clip(version), oplog.ErrNotFound)
	}
	g := rel.gray
	if gray != nil {
		var err error
		if g, err = Compile(gray, releaseSalt(pkg, version)); err != nil {
			return nil, err
		}
	}
	if g == nil {
		g = Everyone
	}
	now := d.cfg.Now().UnixMilli()
	return reg.Count(ctx, func(dev *Device) bool {
		return rel.audience.Match(dev, now) && g.Match(dev, now) && (rel.excluded == nil || !rel.excluded.Match(dev, now))
	})
}
