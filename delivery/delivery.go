package delivery

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/diff"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/oplog"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// BucketPackages is the JetStream Object Store bucket of package bytes.
const BucketPackages = "sluice_packages"

// Config configures a Delivery. A zero field takes the default in its
// comment.
type Config struct {
	// Log is the oplog: its JetStream context and control stream. Required.
	Log *oplog.Log
	// Signer signs release manifests. Required.
	Signer *Signer
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// ManifestTTL is how long a signed manifest is valid. Default 7 days.
	ManifestTTL time.Duration
	// MaxPackageSize bounds an upload. Default 256 MiB.
	MaxPackageSize int64
	// URLPrefix is where packages are downloaded from: a manifest's url is
	// URLPrefix + "<package>/<version>". Default "/v1/packages/".
	URLPrefix string
	// DiffVersions is how many earlier versions of a package an upload
	// computes diffs from. Default 3; negative: none.
	DiffVersions int
	// Fanout sends pushes to big lists, segments and everyone. Optional:
	// without it only users and devices audiences up to the oplog's
	// targets per event can be pushed.
	Fanout *fanout.Fanout
	// PushValidity is a push's validity when it gives none. Default
	// DefaultPushValidity (72 hours).
	PushValidity time.Duration
	// Dir is the badger directory of the push receipts projection (the
	// funnel). Optional: without it the node records no receipts and has
	// no offline channels.
	Dir string
	// Registry is the device registry: push addresses for the offline
	// channels, known devices for an everyone push's funnel. Optional.
	Registry *Registry
	// OfflineChannels are the vendor push channels, by the name devices
	// give in their push address. Optional; they need Dir and Registry.
	OfflineChannels []OfflineChannel
	// OfflineAfter is how long a push has to reach a device over its link
	// before its vendor channel is used (Push.offline_after_ms overrides).
	// Default DefaultOfflineAfter (30 s).
	OfflineAfter time.Duration
}

// Delivery is the release and switch state of this node, a projection of
// the control stream (oplog.Control), and the operations that change it:
// switches, package uploads and the release lifecycle. Views computes
// what one device is told.
//
// Delivery is safe for concurrent use.
type Delivery struct {
	cfg Config
	ctl *oplog.Control[*snapshot]
	obs jetstream.ObjectStore
	lg  zerolog.Logger
	rc  *receipts // nil without Config.Dir
	off *offline  // nil without offline channels

	// gen counts the wake-ups of Changed: a device's view may differ
	// only across them. The update check's cache is valid within one.
	gen   atomic.Uint64
	views *viewCache

	mu      sync.Mutex
	changed chan struct{} // closed on the next change of any device's view
}

// Open creates the package bucket if needed and replays the delivery
// events of the control stream. Run keeps the state current.
func Open(ctx context.Context, cfg Config) (*Delivery, error) {
	if cfg.Log == nil || cfg.Signer == nil {
		return nil, errors.New("delivery: Config.Log and Config.Signer are required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ManifestTTL <= 0 {
		cfg.ManifestTTL = 7 * 24 * time.Hour
	}
	if cfg.MaxPackageSize <= 0 {
		cfg.MaxPackageSize = 256 << 20
	}
	if cfg.URLPrefix == "" {
		cfg.URLPrefix = "/v1/packages/"
	}
	if cfg.DiffVersions == 0 {
		cfg.DiffVersions = 3
	}
	if cfg.PushValidity <= 0 {
		cfg.PushValidity = DefaultPushValidity
	}
	if cfg.OfflineAfter <= 0 {
		cfg.OfflineAfter = DefaultOfflineAfter
	}
	d := &Delivery{cfg: cfg, lg: zerolog.Nop(), changed: make(chan struct{}), views: newViewCache()}
	if cfg.Logger != nil {
		d.lg = cfg.Logger.With().Str("component", "delivery").Logger()
	}
	obs, err := cfg.Log.JetStream().CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      BucketPackages,
		Description: "Sluice package versions and the diffs between them",
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Log.Replicas(),
	})
	if err != nil {
		return nil, fmt.Errorf("delivery: object store %s: %w", BucketPackages, err)
	}
	d.obs = obs
	if err := cfg.Log.EnsureBusinesses(ctx, BusinessPush, BusinessPushDevice); err != nil {
		return nil, fmt.Errorf("delivery: %w", err)
	}
	d.ctl, err = oplog.OpenControl(ctx, oplog.ControlConfig{Log: cfg.Log, Name: "delivery", Filters: filters, Logger: cfg.Logger}, newModel())
	if err != nil {
		return nil, err
	}
	if cfg.Dir != "" {
		if d.rc, err = openReceipts(ctx, cfg.Log, cfg.Dir, d.lg); err != nil {
			return nil, err
		}
	}
	if d.off, err = openOffline(ctx, d); err != nil {
		d.closeStores()
		return nil, err
	}
	return d, nil
}

// Run follows the control stream until ctx ends, and wakes the watchers of
// Changed on every change of the state and whenever a rule's time window
// opens or closes.
func (d *Delivery) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { d.watch(gctx); return nil })
	g.Go(func() error { return d.ctl.Run(gctx) })
	if d.rc != nil {
		g.Go(func() error { return d.rc.run(gctx) })
	}
	if d.off != nil {
		g.Go(func() error { return d.off.run(gctx) })
	}
	return g.Wait()
}

// watch turns state changes and window boundaries into Changed wake-ups.
//
// The next state-change channel is taken before the watchers are woken,
// so a change landing while they are told of the previous one wakes them
// again. Waits are at most maxWatchWait, so a far or overflowing boundary
// is recomputed rather than trusted.
func (d *Delivery) watch(ctx context.Context) {
	const maxWatchWait = time.Hour
	changed := d.ctl.Changed()
	for {
		now := d.cfg.Now().UnixMilli()
		s := d.ctl.Snapshot()
		next := s.nextBoundary(now)
		if len(s.packageNames) > 0 {
			// Views carry manifests re-signed each half lifetime: their
			// digest changes then, and online devices must get the new
			// ones before theirs expire.
			half := max(d.cfg.ManifestTTL.Milliseconds()/2, 1)
			if refresh := (now/half + 1) * half; next == 0 || refresh < next {
				next = refresh
			}
		}
		wait := maxWatchWait
		if next > 0 {
			wait = time.Duration(min(next-now+1, maxWatchWait.Milliseconds())) * time.Millisecond
		}
		t := time.NewTimer(wait)
		fired := false
		select {
		case <-ctx.Done():
		case <-changed:
			fired = true
		case <-t.C:
			fired = next > 0 && next-now+1 <= maxWatchWait.Milliseconds()
		}
		t.Stop()
		if ctx.Err() != nil {
			return
		}
		changed = d.ctl.Changed()
		if !fired {
			continue // a capped wait ran out: nothing happened yet
		}
		d.gen.Add(1)
		d.mu.Lock()
		close(d.changed)
		d.changed = make(chan struct{})
		d.mu.Unlock()
	}
}

// Changed returns a channel closed at the next change that may alter a
// device's view: a switch or release event applied, a rule's time window
// opening or closing, or manifests due to be signed anew. Gateways
// re-evaluate their online devices then.
func (d *Delivery) Changed() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.changed
}

// Close stops following (see oplog.Control.Close) and closes the
// receipts store: call it after Run has returned.
func (d *Delivery) Close() error {
	err := d.ctl.Close()
	d.closeStores()
	return err
}

func (d *Delivery) closeStores() {
	if d.rc != nil {
		if err := d.rc.close(); err != nil {
			d.lg.Error().Err(err).Msg("closing the receipts store")
		}
	}
}

// ReceiptsProjection is the push receipts projection, for rebuilds and
// digests (nil without Config.Dir).
func (d *Delivery) ReceiptsProjection() *oplog.Projection {
	if d.rc == nil {
		return nil
	}
	return d.rc.proj
}

// Applied returns the sequence of the last control event applied.
func (d *Delivery) Applied() uint64 { return d.ctl.Applied() }

// PublicKey returns the key manifests are signed with.
func (d *Delivery) PublicKey() []byte { return d.cfg.Signer.PublicKey() }

// View computes what device dev is told now: the value of every switch
// and the release to have of every package that has one for it, with a
// digest that changes only when that does.
func (d *Delivery) View(dev *Device) *deliverypb.View {
	return d.viewOf(d.ctl.Snapshot(), dev)
}

// viewOf computes a device's view in state s.
func (d *Delivery) viewOf(s *snapshot, dev *Device) *deliverypb.View {
	now := d.cfg.Now().UnixMilli()
	v := &deliverypb.View{}
	g := digester{buf: make([]byte, 0, 256)}
	if len(s.switchKeys) > 0 {
		v.Switches = make([]*deliverypb.SwitchValue, 0, len(s.switchKeys))
	}
	for _, k := range s.switchKeys {
		sv := switchValue(s.switches[k], dev, now)
		g.str(k)
		g.num(sv.Version)
		g.str(sv.Variant)
		v.Switches = append(v.Switches, sv)
	}
	half := max(d.cfg.ManifestTTL.Milliseconds()/2, 1)
	for _, name := range s.packageNames {
		o, ok := offerFor(s.packages[name], dev, now, s.keys)
		if !ok {
			continue
		}
		v.Releases = append(v.Releases, d.signed(s, o, now, half))
		g.str(name)
		g.num(o.pkg.serial)
		g.str(o.target.pb.Version.Version)
		g.str(strings.Join(o.rollback, ","))
	}
	if len(v.Releases) > 0 {
		g.num(uint64(now / half))
	}
	v.Digest = g.sum()
	return v
}

// signed returns the signed manifest of an offer, signing it once per
// state and half manifest lifetime.
func (d *Delivery) signed(s *snapshot, o offer, now, half int64) *deliverypb.SignedManifest {
	key := o.key()
	if e, ok := s.signed.m.Load(key); ok && now-e.(*signedEntry).issued < half {
		return e.(*signedEntry).sm
	}
	m := o.manifest(d.cfg.URLPrefix, now, now+d.cfg.ManifestTTL.Milliseconds())
	sm, err := d.cfg.Signer.Sign(m)
	if err != nil {
		// Marshalling a manifest built here cannot fail; if it ever does
		// the device gets no manifest rather than a broken one.
		d.lg.Error().Err(err).Str("package", o.pkg.name).Msg("signing a manifest failed")
		return &deliverypb.SignedManifest{}
	}
	s.signed.m.Store(key, &signedEntry{sm: sm, issued: now})
	return sm
}

// ----- switches -----

// SetSwitch stores a switch's whole definition, replacing the previous one
// (removed is not allowed: use RemoveSwitch). With expect > 0 it is
// stored only if the switch's version is still expect (ErrConflict if
// not), so a read-modify-write does not lose another admin's change. It
// returns the switch as applied, with its new version.
//
// Errors: oplog.ErrInvalidID for a bad key or variant name,
// oplog.ErrInvalid for a bad type, value or rule, oplog.ErrConflict.
func (d *Delivery) SetSwitch(ctx context.Context, sw *deliverypb.Switch, actor string, expect uint64) (*deliverypb.Switch, error) {
	if sw == nil {
		return nil, fmt.Errorf("switch: none given: %w", oplog.ErrInvalid)
	}
	sw = proto.Clone(sw).(*deliverypb.Switch)
	if sw.Removed {
		return nil, fmt.Errorf("switch %s: use RemoveSwitch to remove: %w", clip(sw.Key), oplog.ErrInvalid)
	}
	sw.Version, sw.UpdatedMs, sw.UpdatedBy = 0, d.cfg.Now().UnixMilli(), actor
	for _, v := range sw.Variants {
		if v != nil && v.Rule != nil && v.Rule.Salt == "" {
			v.Rule.Salt = switchSalt(sw.Key)
		}
	}
	if _, err := compileSwitch(sw); err != nil {
		return nil, err
	}
	s := d.ctl.Snapshot()
	total := proto.Size(sw)
	for k, cs := range s.switches {
		if k != sw.Key {
			total += proto.Size(cs.pb)
		}
	}
	if total > MaxSwitchesBytes {
		return nil, fmt.Errorf("switch %s: all switches would take %d bytes, over %d (a device's view carries them): %w",
			sw.Key, total, MaxSwitchesBytes, oplog.ErrInvalid)
	}
	var opts []jetstream.PublishOpt
	if expect > 0 {
		if cur, ok := s.switches[sw.Key]; !ok || cur.pb.Version != expect {
			return nil, fmt.Errorf("switch %s: not at version %d: %w", sw.Key, expect, oplog.ErrConflict)
		}
		opts = append(opts, jetstream.WithExpectLastSequencePerSubject(s.lastSeq[subjectSwitch+sw.Key]))
	}
	return d.writeSwitch(ctx, sw, opts...)
}

// writeSwitch stores a switch event and returns the switch as applied.
func (d *Delivery) writeSwitch(ctx context.Context, sw *deliverypb.Switch, opts ...jetstream.PublishOpt) (*deliverypb.Switch, error) {
	seq, s, err := d.ctl.Write(ctx, subjectSwitch+sw.Key, sw, opts...)
	if err != nil {
		return nil, err
	}
	cs, ok := s.switches[sw.Key]
	switch {
	case sw.Removed && !ok:
		return sw, nil
	case ok && cs.pb.Version == seq:
		return cs.pb, nil
	}
	return nil, fmt.Errorf("switch %s: changed meanwhile: %w", sw.Key, oplog.ErrConflict)
}

// Kill turns a switch's kill switch on (every device gets its kill value,
// whatever the variants say) or off. A bool switch without a kill value
// is killed to false; others need one set. Errors: oplog.ErrNotFound,
// oplog.ErrInvalid (no kill value), oplog.ErrConflict (changed while being
// killed, three times running).
func (d *Delivery) Kill(ctx context.Context, key string, killed bool, actor string) (*deliverypb.Switch, error) {
	return d.updateSwitch(ctx, key, actor, "killed", func(sw *deliverypb.Switch) error {
		sw.Killed = killed
		if killed && sw.KillValue == nil {
			off, err := killValue(sw, "killed")
			if err != nil {
				return err
			}
			sw.KillValue = off
		}
		return nil
	})
}

// updateSwitch changes a copy of a switch's current definition with change
// and stores it, expecting the switch's last event to be the one the copy
// was taken from: value and expected sequence come from one snapshot, so
// a change landing meanwhile is never overwritten. It retries three times
// on a conflict; doing names the change in the error ("changed while being
// <doing>"). change sees Version zeroed and UpdatedMs and UpdatedBy set.
func (d *Delivery) updateSwitch(ctx context.Context, key, actor, doing string, change func(*deliverypb.Switch) error) (*deliverypb.Switch, error) {
	for range 3 {
		s := d.ctl.Snapshot()
		cs, ok := s.switches[key]
		if !ok {
			return nil, fmt.Errorf("switch %s: %w", clip(key), oplog.ErrNotFound)
		}
		sw := proto.Clone(cs.pb).(*deliverypb.Switch)
		sw.UpdatedMs, sw.UpdatedBy, sw.Version = d.cfg.Now().UnixMilli(), actor, 0
		if err := change(sw); err != nil {
			return nil, err
		}
		out, err := d.writeSwitch(ctx, sw, jetstream.WithExpectLastSequencePerSubject(s.lastSeq[subjectSwitch+key]))
		if !errors.Is(err, oplog.ErrConflict) {
			return out, err
		}
	}
	return nil, fmt.Errorf("switch %s: changed while being %s: %w", key, doing, oplog.ErrConflict)
}

// killValue returns the value a switch takes when killed or turned off:
// its kill value, or false for a bool switch without one. doing names
// the change in the error.
func killValue(sw *deliverypb.Switch, doing string) (*deliverypb.Value, error) {
	if sw.KillValue != nil {
		return sw.KillValue, nil
	}
	if sw.Type != deliverypb.SwitchType_SWITCH_TYPE_BOOL {
		return nil, fmt.Errorf("switch %s: a %v switch needs a kill value to be %s: %w", sw.Key, sw.Type, doing, oplog.ErrInvalid)
	}
	return &deliverypb.Value{Kind: &deliverypb.Value_BoolValue{BoolValue: false}}, nil
}

// PauseRelease, RollbackRelease and SwitchOff are what circuit breakers
// (analytics.Actions) do: a pause for one model leaves it out of the
// release (ExcludeModel), a switch-off for one model gives the
// switch an off variant for it (SwitchOffFor), without a model they act
// for everyone.
func (d *Delivery) PauseRelease(ctx context.Context, pkg, version, model, actor string) error {
	var err error
	if model == "" {
		_, err = d.Pause(ctx, pkg, version, actor)
	} else {
		_, err = d.ExcludeModel(ctx, pkg, version, model, actor)
	}
	return err
}

// RollbackRelease rolls a version back, with every release after it
// (RollbackVersion).
func (d *Delivery) RollbackRelease(ctx context.Context, pkg, version, actor string) error {
	_, err := d.RollbackVersion(ctx, pkg, version, actor)
	return err
}

// SwitchOff turns a switch off, for one model's devices when model is set.
func (d *Delivery) SwitchOff(ctx context.Context, key, model, actor string) error {
	var err error
	if model == "" {
		_, err = d.Kill(ctx, key, true, actor)
	} else {
		_, err = d.SwitchOffFor(ctx, key, model, actor)
	}
	return err
}

// ExcludeModel leaves the devices of one model out of a gray or full
// release: they are offered what they would be were it paused (the
// version before, or a rollback to it). A circuit breaker limited to a
// model pauses the release for that model only. Resume offers it to the
// models left out again; a rollback to it does too. Errors:
// oplog.ErrNotFound, oplog.ErrConflict (not gray or full),
// oplog.ErrInvalid (no model, or too many left out).
func (d *Delivery) ExcludeModel(ctx context.Context, pkg, version, model, actor string) (*deliverypb.Release, error) {
	if rel, ok := d.Release(pkg, version); ok && model != "" && slices.Contains(rel.ExcludedModels, model) {
		return rel, nil // already: no event, no new manifests
	}
	return d.lifecycle(ctx, pkg, version, actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_ExcludeModel{ExcludeModel: model}
	})
}

// SwitchOffFor turns a switch off for the devices of one model: a variant
// matching the model, evaluated first, with the kill value (false for a
// bool switch). Circuit breakers limited to a model use it. Errors:
// oplog.ErrNotFound, oplog.ErrInvalid (no kill value), oplog.ErrConflict.
func (d *Delivery) SwitchOffFor(ctx context.Context, key, model, actor string) (*deliverypb.Switch, error) {
	name := "off-" + strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			return r
		case r >= 'A' && r <= 'Z':
			return r + 'a' - 'A'
		}
		return '-'
	}, model)
	name = name[:min(len(name), maxNameLen)]
	return d.updateSwitch(ctx, key, actor, "turned off", func(sw *deliverypb.Switch) error {
		off, err := killValue(sw, "turned off")
		if err != nil {
			return err
		}
		sw.Variants = slices.DeleteFunc(sw.Variants, func(v *deliverypb.Variant) bool { return v.GetName() == name })
		sw.Variants = append([]*deliverypb.Variant{{Name: name, Value: off,
			Rule: &deliverypb.Rule{Models: []string{model}, Salt: switchSalt(key)}}}, sw.Variants...)
		_, err = compileSwitch(sw)
		return err
	})
}

// RemoveSwitch removes a switch: devices stop getting it. Errors:
// oplog.ErrNotFound.
func (d *Delivery) RemoveSwitch(ctx context.Context, key, actor string) error {
	s := d.ctl.Snapshot()
	if _, ok := s.switches[key]; !ok {
		return fmt.Errorf("switch %s: %w", clip(key), oplog.ErrNotFound)
	}
	_, err := d.writeSwitch(ctx, &deliverypb.Switch{Key: key, Removed: true, UpdatedMs: d.cfg.Now().UnixMilli(), UpdatedBy: actor},
		jetstream.WithExpectLastSequencePerSubject(s.lastSeq[subjectSwitch+key]))
	return err
}

// Switch returns a switch's current definition.
func (d *Delivery) Switch(key string) (*deliverypb.Switch, bool) {
	cs, ok := d.ctl.Snapshot().switches[key]
	if !ok {
		return nil, false
	}
	return cs.pb, true
}

// Switches returns every switch, by key.
func (d *Delivery) Switches() []*deliverypb.Switch {
	s := d.ctl.Snapshot()
	out := make([]*deliverypb.Switch, 0, len(s.switchKeys))
	for _, k := range s.switchKeys {
		out = append(out, s.switches[k].pb)
	}
	return out
}

// ----- producer keys -----

// RegisterProducerKey registers (or replaces) a key that may sign hot
// patches. RevokeProducerKey revokes one: hot patches signed with it are
// refused from then on (those uploaded before stay).
func (d *Delivery) RegisterProducerKey(ctx context.Context, id string, pub []byte) error {
	k := &deliverypb.ProducerKey{Id: id, PublicKey: pub, AtMs: d.cfg.Now().UnixMilli()}
	if err := checkProducerKey(k); err != nil {
		return err
	}
	_, _, err := d.ctl.Write(ctx, subjectProducerKey+id, k)
	return err
}

// RevokeProducerKey revokes a registered key. Errors: oplog.ErrNotFound.
func (d *Delivery) RevokeProducerKey(ctx context.Context, id string) error {
	k, ok := d.ctl.Snapshot().keys[id]
	if !ok {
		return fmt.Errorf("producer key %s: %w", clip(id), oplog.ErrNotFound)
	}
	r := proto.Clone(k).(*deliverypb.ProducerKey)
	r.Revoked, r.AtMs = true, d.cfg.Now().UnixMilli()
	_, _, err := d.ctl.Write(ctx, subjectProducerKey+id, r)
	return err
}

// ProducerKeys returns the registered keys, revoked ones included.
func (d *Delivery) ProducerKeys() []*deliverypb.ProducerKey {
	s := d.ctl.Snapshot()
	out := make([]*deliverypb.ProducerKey, 0, len(s.keys))
	for _, k := range s.keys {
		out = append(out, k)
	}
	return out
}

// ----- packages and releases -----

// Upload is a new package version.
type Upload struct {
	Package  string
	Kind     deliverypb.PackageKind
	Version  string
	Data     []byte
	Audience *deliverypb.Rule // the devices the package is for; nil: all
	// FallbackURL is where a client may fetch the package when the
	// download from Sluice fails.
	FallbackURL string
	Notes       string
	// Hot patches: the producer's key id and its ed25519 signature over
	// the package, version and SHA-256 of Data (SignPackage).
	ProducerKey       string
	ProducerSignature []byte
}

// Upload stores a new version of a package as a draft release: the bytes
// go to the object store (with their SHA-256), then the upload event to the
// control stream. Versions of a package must increase; a hot patch must
// be signed by a registered producer key.
//
// Errors: oplog.ErrInvalidID (package name), oplog.ErrInvalid (version,
// kind, audience, fallback URL), oplog.ErrPayloadTooLarge,
// oplog.ErrSignature (hot patch), oplog.ErrConflict (version not above the
// last, or another upload won the race), oplog.ErrUnavailable.
func (d *Delivery) Upload(ctx context.Context, up Upload, actor string) (*deliverypb.Release, error) {
	if int64(len(up.Data)) > d.cfg.MaxPackageSize {
		return nil, fmt.Errorf("package %s: %d bytes, over %d: %w", clip(up.Package), len(up.Data), d.cfg.MaxPackageSize, oplog.ErrPayloadTooLarge)
	}
	if len(up.FallbackURL) > 2048 || (up.FallbackURL != "" && !strings.HasPrefix(up.FallbackURL, "https://") && !strings.HasPrefix(up.FallbackURL, "http://")) {
		return nil, fmt.Errorf("package %s: fallback URL %q: want an http(s) URL of up to 2048 bytes: %w", clip(up.Package), clip(up.FallbackURL), oplog.ErrInvalid)
	}
	if len(up.Notes) > MaxDescriptionLen {
		return nil, fmt.Errorf("package %s: notes over %d bytes: %w", clip(up.Package), MaxDescriptionLen, oplog.ErrInvalid)
	}
	sum := sha256.Sum256(up.Data)
	var aud *deliverypb.Rule
	if up.Audience != nil {
		aud = proto.Clone(up.Audience).(*deliverypb.Rule)
		if aud.Salt == "" {
			aud.Salt = releaseSalt(up.Package, up.Version)
		}
	}
	ver := &deliverypb.Version{
		Version: up.Version, Sha256: sum[:], Size: int64(len(up.Data)),
		Object:      up.Package + "/" + up.Version + "/" + nuid.Next(),
		FallbackUrl: up.FallbackURL, ProducerSignature: up.ProducerSignature, ProducerKey: up.ProducerKey,
		Audience: aud, Notes: up.Notes,
	}
	ev := &deliverypb.PackageEvent{Package: up.Package, Kind: up.Kind, AtMs: d.cfg.Now().UnixMilli(), Actor: actor,
		Op: &deliverypb.PackageEvent_Upload{Upload: ver}}
	s := d.ctl.Snapshot()
	cur := s.packages[up.Package]
	if _, err := transition(cur, ev, 0, s.keys); err != nil {
		return nil, err
	}
	info, err := d.obs.PutBytes(ctx, ver.Object, up.Data)
	if err != nil {
		return nil, fmt.Errorf("package %s %s: storing the bytes: %v: %w", up.Package, up.Version, err, oplog.ErrUnavailable)
	}
	if want := "SHA-256=" + b64(sum[:]); info.Digest != want {
		d.deleteObjects(ctx, ver.Object)
		return nil, fmt.Errorf("package %s %s: the object store's digest %s is not %s", up.Package, up.Version, info.Digest, want)
	}
	objects := []string{ver.Object}
	if tree, err := diff.TreeDigest(up.Data, d.diffOptions()); err == nil {
		ver.TreeSha256 = tree[:]
	}
	diffs, err := d.makeDiffs(ctx, cur, ver, up.Data)
	for _, df := range diffs {
		objects = append(objects, df.Object)
	}
	if err != nil {
		d.deleteObjects(ctx, objects...)
		return nil, err
	}
	ver.Diffs = diffs
	r, err := d.change(ctx, s, ev)
	if err != nil {
		d.deleteObjects(ctx, objects...)
		return nil, err
	}
	d.lg.Info().Str("package", up.Package).Str("version", up.Version).Int64("size", ver.Size).Int("diffs", len(diffs)).Str("actor", actor).Msg("package uploaded")
	return r, nil
}

func (d *Delivery) diffOptions() *diff.Options {
	return &diff.Options{MaxSize: min(d.cfg.MaxPackageSize, diff.MaxSizeLimit)}
}

// makeDiffs computes and stores the diffs to ver from the previous
// DiffVersions versions of the package, keeping those smaller than the
// package. A version whose bytes cannot be diffed (too large, unreadable)
// just gets no diff; a failure to store one fails the upload.
func (d *Delivery) makeDiffs(ctx context.Context, cur *pkgState, ver *deliverypb.Version, data []byte) ([]*deliverypb.Diff, error) {
	if cur == nil || d.cfg.DiffVersions < 0 {
		return nil, nil
	}
	var out []*deliverypb.Diff
	for i := len(cur.releases) - 1; i >= 0 && len(cur.releases)-i <= d.cfg.DiffVersions; i-- {
		old := cur.releases[i].pb.Version
		oldData, err := d.obs.GetBytes(ctx, old.Object)
		if err != nil {
			d.lg.Warn().Err(err).Str("object", old.Object).Msg("no diff: the earlier version is not readable")
			continue
		}
		patch, err := diff.Make(oldData, data, d.diffOptions())
		if errors.Is(err, diff.ErrNotSmaller) {
			continue
		}
		if err != nil {
			d.lg.Warn().Err(err).Str("from", old.Version).Str("to", ver.Version).Msg("no diff")
			continue
		}
		h, err := diff.ReadHeader(patch)
		if err != nil {
			return out, fmt.Errorf("package %s: reading the diff it made: %w", ver.Version, err)
		}
		name := ver.Object + ".from-" + old.Version
		if _, err := d.obs.PutBytes(ctx, name, patch); err != nil {
			return out, fmt.Errorf("package %s: storing the diff from %s: %v: %w", ver.Version, old.Version, err, oplog.ErrUnavailable)
		}
		sum := sha256.Sum256(patch)
		out = append(out, &deliverypb.Diff{FromVersion: old.Version, FromSha256: old.Sha256, Object: name,
			Sha256: sum[:], Size: int64(len(patch)), Format: h.Format.String()})
	}
	return out, nil
}

func (d *Delivery) deleteObjects(ctx context.Context, names ...string) {
	for _, n := range names {
		if err := d.obs.Delete(context.WithoutCancel(ctx), n); err != nil {
			d.lg.Warn().Err(err).Str("object", n).Msg("deleting an unused package object failed")
		}
	}
}

// change stores a package event validated against snapshot was,
// expecting the package's subject to be unchanged since. It returns the
// release the event acted on, as applied.
func (d *Delivery) change(ctx context.Context, was *snapshot, ev *deliverypb.PackageEvent) (*deliverypb.Release, error) {
	subject := subjectPackage + ev.Package
	seq, s, err := d.ctl.Write(ctx, subject, ev, jetstream.WithExpectLastSequencePerSubject(was.lastSeq[subject]))
	if err != nil {
		return nil, err
	}
	p := s.packages[ev.Package]
	version := ev.Version
	if up, ok := ev.Op.(*deliverypb.PackageEvent_Upload); ok {
		version = up.Upload.Version
	}
	if rb, ok := ev.Op.(*deliverypb.PackageEvent_RollbackTo); ok {
		version = rb.RollbackTo
	}
	if p == nil || p.serial != seq {
		// Valid when checked, refused when applied: something it relied
		// on changed in between (a producer key revoked, ...).
		return nil, fmt.Errorf("package %s: the change was refused when applied (see the log): %w", ev.Package, oplog.ErrConflict)
	}
	if _, r := p.find(version); r != nil {
		return r.pb, nil
	}
	return nil, fmt.Errorf("package %s version %s: not found after the change: %w", ev.Package, version, oplog.ErrConflict)
}

// lifecycle validates and stores one lifecycle event of a release.
func (d *Delivery) lifecycle(ctx context.Context, pkg, version, actor string, op func(*deliverypb.PackageEvent)) (*deliverypb.Release, error) {
	ev := &deliverypb.PackageEvent{Package: pkg, Version: version, AtMs: d.cfg.Now().UnixMilli(), Actor: actor}
	op(ev)
	s := d.ctl.Snapshot()
	cur := s.packages[pkg]
	if _, err := transition(cur, ev, 0, s.keys); err != nil {
		return nil, err
	}
	r, err := d.change(ctx, s, ev)
	if err != nil {
		return nil, err
	}
	d.lg.Info().Str("package", pkg).Str("version", version).Str("stage", r.Stage.String()).Bool("paused", r.Paused).Str("actor", actor).Msg("release changed")
	return r, nil
}

// Gray starts (or changes) the gray release of a draft or gray version
// with rule. Errors: oplog.ErrNotFound, oplog.ErrConflict (not draft or
// gray), oplog.ErrInvalid (rule).
func (d *Delivery) Gray(ctx context.Context, pkg, version string, rule *deliverypb.Rule, actor string) (*deliverypb.Release, error) {
	if rule == nil {
		return nil, fmt.Errorf("package %s version %s: gray needs a rule: %w", clip(pkg), clip(version), oplog.ErrInvalid)
	}
	rule = proto.Clone(rule).(*deliverypb.Rule)
	if rule.Salt == "" {
		rule.Salt = releaseSalt(pkg, version)
	}
	return d.lifecycle(ctx, pkg, version, actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_Gray{Gray: rule}
	})
}

// Full releases a gray version to its whole audience.
func (d *Delivery) Full(ctx context.Context, pkg, version, actor string) (*deliverypb.Release, error) {
	return d.lifecycle(ctx, pkg, version, actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_Full{Full: true}
	})
}

// Pause stops offering a gray or full release until Resume; devices are
// offered the release before it meanwhile (they do not downgrade).
func (d *Delivery) Pause(ctx context.Context, pkg, version, actor string) (*deliverypb.Release, error) {
	return d.lifecycle(ctx, pkg, version, actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_Pause{Pause: true}
	})
}

// Resume offers a paused release again, and to the models left out of it
// (ExcludeModel).
func (d *Delivery) Resume(ctx context.Context, pkg, version, actor string) (*deliverypb.Release, error) {
	return d.lifecycle(ctx, pkg, version, actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_Resume{Resume: true}
	})
}

// Stop ends a release for good: it is no longer offered.
func (d *Delivery) Stop(ctx context.Context, pkg, version, actor string) (*deliverypb.Release, error) {
	return d.lifecycle(ctx, pkg, version, actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_Stop{Stop: true}
	})
}

// Rollback rolls a package back to its last stable version: the newest
// gray or full release (and any between it and the stable one) is rolled
// back, and the devices it could have reached are sent a signed rollback
// manifest of the stable version, which clients install even though it is
// older. It returns the stable release. Errors: oplog.ErrNotFound,
// oplog.ErrConflict (nothing to roll back, or no stable version before it).
func (d *Delivery) Rollback(ctx context.Context, pkg, actor string) (*deliverypb.Release, error) {
	p := d.ctl.Snapshot().packages[pkg]
	if p == nil {
		return nil, fmt.Errorf("package %s: %w", clip(pkg), oplog.ErrNotFound)
	}
	cur := p.current()
	if cur < 0 {
		return nil, fmt.Errorf("package %s: no gray or full release to roll back: %w", pkg, oplog.ErrConflict)
	}
	return d.rollbackFrom(ctx, p, cur, actor)
}

// RollbackVersion rolls back one version of a package and every release
// after it that devices may have, to the last full release before it: a
// circuit breaker's rollback names the version its evidence is about,
// which may be a full release with a newer gray one after it. Errors:
// oplog.ErrNotFound; oplog.ErrConflict when the version was never offered
// or is rolled back already, or no full release precedes it.
func (d *Delivery) RollbackVersion(ctx context.Context, pkg, version, actor string) (*deliverypb.Release, error) {
	p := d.ctl.Snapshot().packages[pkg]
	if p == nil {
		return nil, fmt.Errorf("package %s: %w", clip(pkg), oplog.ErrNotFound)
	}
	i, r := p.find(version)
	if r == nil {
		return nil, fmt.Errorf("package %s version %s: %w", pkg, clip(version), oplog.ErrNotFound)
	}
	if !rollbackable(r) {
		return nil, fmt.Errorf("package %s version %s: %s, nothing to roll back: %w", pkg, version, r.pb.Stage, oplog.ErrConflict)
	}
	return d.rollbackFrom(ctx, p, i, actor)
}

// rollbackFrom rolls package p back from its release i (rollbackable), and
// every release after it, to the last full release before i. Errors:
// oplog.ErrConflict when no full release precedes it.
func (d *Delivery) rollbackFrom(ctx context.Context, p *pkgState, i int, actor string) (*deliverypb.Release, error) {
	stable := p.stableBefore(i)
	if stable < 0 {
		return nil, fmt.Errorf("package %s: no stable version before %s to roll back to: %w", p.name, p.releases[i].pb.Version.Version, oplog.ErrConflict)
	}
	to := p.releases[stable].pb.Version.Version
	return d.lifecycle(ctx, p.name, "", actor, func(ev *deliverypb.PackageEvent) {
		ev.Op = &deliverypb.PackageEvent_RollbackTo{RollbackTo: to}
	})
}

// Releases returns a package's releases in upload order, or ok false for
// an unknown package.
func (d *Delivery) Releases(pkg string) ([]*deliverypb.Release, bool) {
	p := d.ctl.Snapshot().packages[pkg]
	if p == nil {
		return nil, false
	}
	out := make([]*deliverypb.Release, len(p.releases))
	for i, r := range p.releases {
		out[i] = r.pb
	}
	return out, true
}

// Packages returns the names of every package, sorted.
func (d *Delivery) Packages() []string { return d.ctl.Snapshot().packageNames }

// Release returns one release.
func (d *Delivery) Release(pkg, version string) (*deliverypb.Release, bool) {
	p := d.ctl.Snapshot().packages[pkg]
	if p == nil {
		return nil, false
	}
	_, r := p.find(version)
	if r == nil {
		return nil, false
	}
	return r.pb, true
}
