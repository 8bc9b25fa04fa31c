package delivery

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// Control subjects of the delivery events.
var (
	subjectSwitch      = oplog.SubjectControl("switch") + "."
	subjectPackage     = oplog.SubjectControl("package") + "."
	subjectProducerKey = oplog.SubjectControl("producerkey") + "."
	subjectRecall      = oplog.SubjectControl("recall") + "."
	filters            = []string{subjectSwitch + ">", subjectPackage + ">", subjectProducerKey + ">", subjectRecall + ">"}
)

// Limits of switches and packages.
const (
	MaxVariants   = 64
	MaxValueBytes = 64 << 10 // a string or JSON switch value
	// MaxSwitchesBytes bounds all switch definitions together (encoded),
	// so that a device's view, which carries one value of each, stays far
	// below the protocol's frame limit (1 MiB by default).
	MaxSwitchesBytes  = 512 << 10
	MaxDescriptionLen = 1024
	maxNameLen        = 64
)

// validName reports whether s is a switch key, package name, variant name
// or producer key id: 1-64 of [a-z0-9_-], a valid subject token.
func validName(s string) bool { return oplog.ValidName(s, maxNameLen) }

// compiledSwitch is a switch definition with its rules compiled. It is
// immutable once built.
type compiledSwitch struct {
	pb    *deliverypb.Switch
	rules []*Rule // one per variant
}

// compileSwitch validates a switch definition and compiles its rules.
func compileSwitch(sw *deliverypb.Switch) (*compiledSwitch, error) {
	if !validName(sw.Key) {
		return nil, fmt.Errorf("switch: key %q: want 1-%d of [a-z0-9_-]: %w", clip(sw.Key), maxNameLen, oplog.ErrInvalidID)
	}
	if sw.Removed {
		return &compiledSwitch{pb: sw}, nil
	}
	if sw.Type == deliverypb.SwitchType_SWITCH_TYPE_UNSPECIFIED || deliverypb.SwitchType_name[int32(sw.Type)] == "" {
		return nil, fmt.Errorf("switch %s: type %v: %w", sw.Key, sw.Type, oplog.ErrInvalid)
	}
	if len(sw.Description) > MaxDescriptionLen {
		return nil, fmt.Errorf("switch %s: description over %d bytes: %w", sw.Key, MaxDescriptionLen, oplog.ErrInvalid)
	}
	if err := checkValue(sw.Type, sw.DefaultValue); err != nil {
		return nil, fmt.Errorf("switch %s: default value: %w", sw.Key, err)
	}
	if sw.Killed || sw.KillValue != nil { // killed needs one; one set must be right
		if err := checkValue(sw.Type, sw.KillValue); err != nil {
			return nil, fmt.Errorf("switch %s: kill value: %w", sw.Key, err)
		}
	}
	if len(sw.Variants) > MaxVariants {
		return nil, fmt.Errorf("switch %s: %d variants, over %d: %w", sw.Key, len(sw.Variants), MaxVariants, oplog.ErrInvalid)
	}
	cs := &compiledSwitch{pb: sw, rules: make([]*Rule, len(sw.Variants))}
	names := make(map[string]bool, len(sw.Variants))
	for i, v := range sw.Variants {
		if v == nil {
			return nil, fmt.Errorf("switch %s: variant %d is empty: %w", sw.Key, i, oplog.ErrInvalid)
		}
		if !validName(v.Name) || v.Name == "kill" {
			return nil, fmt.Errorf("switch %s: variant name %q: want 1-%d of [a-z0-9_-], not \"kill\": %w", sw.Key, clip(v.Name), maxNameLen, oplog.ErrInvalidID)
		}
		if names[v.Name] {
			return nil, fmt.Errorf("switch %s: two variants named %s: %w", sw.Key, v.Name, oplog.ErrInvalid)
		}
		names[v.Name] = true
		if err := checkValue(sw.Type, v.Value); err != nil {
			return nil, fmt.Errorf("switch %s: variant %s: %w", sw.Key, v.Name, err)
		}
		r, err := Compile(v.Rule, switchSalt(sw.Key))
		if err != nil {
			return nil, fmt.Errorf("switch %s: variant %s: %w", sw.Key, v.Name, err)
		}
		cs.rules[i] = r
	}
	return cs, nil
}

// switchSalt is the default salt of a switch's rules: every variant of a
// switch shares it, so their percentages nest (variant A at 30% and B at
// 60% give A 30% of devices and B the next 30%).
func switchSalt(key string) string { return "switch/" + key }

// releaseSalt is the default salt of a release's rules.
func releaseSalt(pkg, version string) string { return "release/" + pkg + "/" + version }

// checkValue checks that v is set and has type t.
func checkValue(t deliverypb.SwitchType, v *deliverypb.Value) error {
	if v == nil || v.Kind == nil {
		return fmt.Errorf("value missing: %w", oplog.ErrInvalid)
	}
	ok := false
	switch k := v.Kind.(type) {
	case *deliverypb.Value_BoolValue:
		ok = t == deliverypb.SwitchType_SWITCH_TYPE_BOOL
	case *deliverypb.Value_IntValue:
		ok = t == deliverypb.SwitchType_SWITCH_TYPE_INT
	case *deliverypb.Value_NumberValue:
		ok = t == deliverypb.SwitchType_SWITCH_TYPE_NUMBER
		if math.IsNaN(k.NumberValue) || math.IsInf(k.NumberValue, 0) {
			return fmt.Errorf("number %v: %w", k.NumberValue, oplog.ErrInvalid)
		}
	case *deliverypb.Value_StringValue:
		ok = t == deliverypb.SwitchType_SWITCH_TYPE_STRING
		if len(k.StringValue) > MaxValueBytes {
			return fmt.Errorf("string over %d bytes: %w", MaxValueBytes, oplog.ErrInvalid)
		}
	case *deliverypb.Value_JsonValue:
		ok = t == deliverypb.SwitchType_SWITCH_TYPE_JSON
		if len(k.JsonValue) > MaxValueBytes || !json.Valid([]byte(k.JsonValue)) {
			return fmt.Errorf("json value: not a JSON document of up to %d bytes: %w", MaxValueBytes, oplog.ErrInvalid)
		}
	}
	if !ok {
		return fmt.Errorf("value %v is not of type %v: %w", v, t, oplog.ErrInvalid)
	}
	return nil
}

// release is one version of a package in the state, with its rules
// compiled. It is immutable: a change builds a new one.
type release struct {
	pb       *deliverypb.Release
	audience *Rule
	gray     *Rule // the gray rule; nil unless it went gray
	excluded *Rule // matches the models left out (pb.ExcludedModels); nil for none
}

// clone copies r for a change.
func (r *release) clone() *release {
	return &release{pb: proto.Clone(r.pb).(*deliverypb.Release), audience: r.audience, gray: r.gray, excluded: r.excluded}
}

// maxExcludedModels bounds the models a release leaves out.
const maxExcludedModels = MaxRuleValues

// pkgState is a package: its releases in upload order (increasing
// versions). It is immutable: a change builds a new one.
type pkgState struct {
	name     string
	kind     deliverypb.PackageKind
	serial   uint64 // stream sequence of the package's last event
	releases []*release
}

func (p *pkgState) find(version string) (int, *release) {
	for i, r := range p.releases {
		if r.pb.Version.GetVersion() == version {
			return i, r
		}
	}
	return -1, nil
}

// rollbackable reports whether devices may have r and a rollback takes
// it back: it is gray or full (paused or not), or was offered before it
// was stopped.
func rollbackable(r *release) bool {
	switch r.pb.Stage {
	case deliverypb.Stage_STAGE_GRAY, deliverypb.Stage_STAGE_FULL:
		return true
	case deliverypb.Stage_STAGE_STOPPED:
		return r.pb.Offered
	}
	return false
}

// current returns the index of the newest release a rollback takes back
// (rollbackable), or -1.
func (p *pkgState) current() int {
	for i := len(p.releases) - 1; i >= 0; i-- {
		if rollbackable(p.releases[i]) {
			return i
		}
	}
	return -1
}

// stableBefore returns the index of the newest release before i that is
// full (paused or not; not stopped or rolled back), or -1: the version a
// rollback of release i returns to.
func (p *pkgState) stableBefore(i int) int {
	for j := i - 1; j >= 0; j-- {
		if p.releases[j].pb.Stage == deliverypb.Stage_STAGE_FULL {
			return j
		}
	}
	return -1
}

// model is the projection of the delivery subjects of the control stream.
// It is fed every event in stream order (oplog.ControlModel): replaying the
// same events builds the same model.
type model struct {
	switches map[string]*compiledSwitch
	packages map[string]*pkgState
	keys     map[string]*deliverypb.ProducerKey
	recalled map[string]bool // push ids
	// lastSeq is the sequence of the last event stored on each subject,
	// applied or skipped: what a writer expects (JetStream's expected last
	// subject sequence counts skipped events too).
	lastSeq map[string]uint64
}

func newModel() *model {
	return &model{switches: map[string]*compiledSwitch{}, packages: map[string]*pkgState{},
		keys: map[string]*deliverypb.ProducerKey{}, recalled: map[string]bool{}, lastSeq: map[string]uint64{}}
}

// Apply applies the delivery event stored at seq. An event that is not
// valid against the state (only this package writes these subjects, after
// validating, so it is a foreign writer's or lost a race the expected
// sequence should have caught) is skipped with an error.
func (m *model) Apply(seq uint64, subject string, data []byte) (bool, error) {
	m.lastSeq[subject] = seq
	switch {
	case strings.HasPrefix(subject, subjectSwitch):
		sw := &deliverypb.Switch{}
		if err := proto.Unmarshal(data, sw); err != nil {
			return false, fmt.Errorf("switch event: %w", err)
		}
		if sw.Key != subject[len(subjectSwitch):] {
			return false, fmt.Errorf("switch %q on subject %s", clip(sw.Key), subject)
		}
		sw.Version = seq
		cs, err := compileSwitch(sw)
		if err != nil {
			return false, err
		}
		if sw.Removed {
			delete(m.switches, sw.Key)
		} else {
			m.switches[sw.Key] = cs
		}
		return true, nil
	case strings.HasPrefix(subject, subjectPackage):
		ev := &deliverypb.PackageEvent{}
		if err := proto.Unmarshal(data, ev); err != nil {
			return false, fmt.Errorf("package event: %w", err)
		}
		if ev.Package != subject[len(subjectPackage):] {
			return false, fmt.Errorf("package %q on subject %s", clip(ev.Package), subject)
		}
		p, err := transition(m.packages[ev.Package], ev, seq, m.keys)
		if err != nil {
			return false, err
		}
		m.packages[ev.Package] = p
		return true, nil
	case strings.HasPrefix(subject, subjectProducerKey):
		k := &deliverypb.ProducerKey{}
		if err := proto.Unmarshal(data, k); err != nil {
			return false, fmt.Errorf("producer key event: %w", err)
		}
		if err := checkProducerKey(k); err != nil || k.Id != subject[len(subjectProducerKey):] {
			return false, fmt.Errorf("producer key on %s: %v", subject, err)
		}
		m.keys[k.Id] = k
		return true, nil
	case strings.HasPrefix(subject, subjectRecall):
		rc := &deliverypb.Recall{}
		if err := proto.Unmarshal(data, rc); err != nil || rc.Push != subject[len(subjectRecall):] || !oplog.ValidID(rc.Push) {
			return false, fmt.Errorf("recall event on %s: malformed", subject)
		}
		m.recalled[rc.Push] = true
		return true, nil
	}
	return false, fmt.Errorf("subject %q: not a delivery event", clip(subject))
}

// Snapshot returns an immutable view of the model. Switches, packages
// and keys are immutable values, so the maps are copied shallowly.
func (m *model) Snapshot() *snapshot {
	s := &snapshot{
		switches: maps.Clone(m.switches),
		packages: maps.Clone(m.packages),
		keys:     maps.Clone(m.keys),
		recalled: maps.Clone(m.recalled),
		lastSeq:  maps.Clone(m.lastSeq),
		signed:   newManifestCache(),
	}
	s.switchKeys = slices.Sorted(maps.Keys(s.switches))
	s.packageNames = slices.Sorted(maps.Keys(s.packages))
	return s
}

// snapshot is an immutable view of the delivery state.
type snapshot struct {
	switches     map[string]*compiledSwitch
	switchKeys   []string
	packages     map[string]*pkgState
	packageNames []string
	keys         map[string]*deliverypb.ProducerKey
	recalled     map[string]bool
	lastSeq      map[string]uint64 // by subject: what writers expect
	signed       *manifestCache    // signed manifests of this state, filled on demand
}

// transition applies a package event to p (nil for a new package) and
// returns the new package state; p is not modified. It is the one place
// where the lifecycle rules live: writers call it to validate, the model
// to apply. Errors are oplog.ErrConflict for a transition the current
// stage does not allow, oplog.ErrNotFound for an unknown version,
// oplog.ErrInvalid for a malformed event.
func transition(p *pkgState, ev *deliverypb.PackageEvent, seq uint64, keys map[string]*deliverypb.ProducerKey) (*pkgState, error) {
	if !validName(ev.Package) {
		return nil, fmt.Errorf("package %q: want 1-%d of [a-z0-9_-]: %w", clip(ev.Package), maxNameLen, oplog.ErrInvalidID)
	}
	if up, ok := ev.Op.(*deliverypb.PackageEvent_Upload); ok {
		return upload(p, ev, up.Upload, seq, keys)
	}
	if p == nil {
		return nil, fmt.Errorf("package %s: %w", ev.Package, oplog.ErrNotFound)
	}
	np := &pkgState{name: p.name, kind: p.kind, serial: seq, releases: slices.Clone(p.releases)}
	if rb, ok := ev.Op.(*deliverypb.PackageEvent_RollbackTo); ok {
		return np, rollback(np, rb.RollbackTo, seq, ev.AtMs)
	}
	i, r := p.find(ev.Version)
	if r == nil {
		return nil, fmt.Errorf("package %s version %q: %w", p.name, clip(ev.Version), oplog.ErrNotFound)
	}
	nr := r.clone()
	nr.pb.Serial, nr.pb.UpdatedMs = seq, ev.AtMs
	st, paused := r.pb.Stage, r.pb.Paused
	refuse := func(what string) error {
		state := st.String()
		if paused {
			state += " (paused)"
		}
		return fmt.Errorf("package %s version %s: cannot %s a release in %s: %w", p.name, ev.Version, what, state, oplog.ErrConflict)
	}
	switch op := ev.Op.(type) {
	case *deliverypb.PackageEvent_Gray:
		if st != deliverypb.Stage_STAGE_DRAFT && st != deliverypb.Stage_STAGE_GRAY {
			return nil, refuse("gray")
		}
		if op.Gray == nil {
			return nil, fmt.Errorf("package %s version %s: gray without a rule: %w", p.name, ev.Version, oplog.ErrInvalid)
		}
		g, err := Compile(op.Gray, releaseSalt(p.name, ev.Version))
		if err != nil {
			return nil, fmt.Errorf("package %s version %s: gray rule: %w", p.name, ev.Version, err)
		}
		nr.pb.Stage, nr.pb.Gray, nr.gray, nr.pb.Offered = deliverypb.Stage_STAGE_GRAY, op.Gray, g, true
	case *deliverypb.PackageEvent_Full:
		if st != deliverypb.Stage_STAGE_GRAY || paused {
			return nil, refuse("release fully")
		}
		nr.pb.Stage, nr.pb.ReachedFull, nr.pb.Offered = deliverypb.Stage_STAGE_FULL, true, true
	case *deliverypb.PackageEvent_Pause:
		if (st != deliverypb.Stage_STAGE_GRAY && st != deliverypb.Stage_STAGE_FULL) || paused {
			return nil, refuse("pause")
		}
		nr.pb.Paused = true
	case *deliverypb.PackageEvent_Resume:
		if !paused && len(r.pb.ExcludedModels) == 0 {
			return nil, refuse("resume")
		}
		nr.pb.Paused, nr.pb.ExcludedModels, nr.excluded = false, nil, nil
	case *deliverypb.PackageEvent_ExcludeModel:
		if st != deliverypb.Stage_STAGE_GRAY && st != deliverypb.Stage_STAGE_FULL {
			return nil, refuse("leave a model out of")
		}
		if op.ExcludeModel == "" || len(op.ExcludeModel) > maxValueLen {
			return nil, fmt.Errorf("package %s version %s: model %q: want 1-%d bytes: %w", p.name, ev.Version, clip(op.ExcludeModel), maxValueLen, oplog.ErrInvalid)
		}
		if !slices.Contains(nr.pb.ExcludedModels, op.ExcludeModel) {
			if len(nr.pb.ExcludedModels) >= maxExcludedModels {
				return nil, fmt.Errorf("package %s version %s: %d models left out already: %w", p.name, ev.Version, maxExcludedModels, oplog.ErrInvalid)
			}
			nr.pb.ExcludedModels = append(nr.pb.ExcludedModels, op.ExcludeModel)
			ex, err := Compile(&deliverypb.Rule{Models: nr.pb.ExcludedModels}, releaseSalt(p.name, ev.Version))
			if err != nil {
				return nil, fmt.Errorf("package %s version %s: excluded models: %w", p.name, ev.Version, err)
			}
			nr.excluded = ex
		}
	case *deliverypb.PackageEvent_Stop:
		if st == deliverypb.Stage_STAGE_STOPPED || st == deliverypb.Stage_STAGE_ROLLED_BACK {
			return nil, refuse("stop")
		}
		nr.pb.Stage, nr.pb.Paused = deliverypb.Stage_STAGE_STOPPED, false
	default:
		return nil, fmt.Errorf("package %s: event without an operation: %w", p.name, oplog.ErrInvalid)
	}
	np.releases[i] = nr
	return np, nil
}

// upload adds a new version as a draft.
func upload(p *pkgState, ev *deliverypb.PackageEvent, v *deliverypb.Version, seq uint64, keys map[string]*deliverypb.ProducerKey) (*pkgState, error) {
	if v == nil || !oplog.ValidVersion(v.Version) || v.Version == "" {
		return nil, fmt.Errorf("package %s: version %q: want up to 32 of [0-9A-Za-z.+-]: %w", ev.Package, clip(v.GetVersion()), oplog.ErrInvalid)
	}
	if ev.Kind == deliverypb.PackageKind_PACKAGE_KIND_UNSPECIFIED || deliverypb.PackageKind_name[int32(ev.Kind)] == "" {
		return nil, fmt.Errorf("package %s: kind %v: %w", ev.Package, ev.Kind, oplog.ErrInvalid)
	}
	if len(v.Sha256) != 32 || v.Size < 0 || v.Object == "" {
		return nil, fmt.Errorf("package %s %s: upload without its digest, size or object: %w", ev.Package, v.Version, oplog.ErrInvalid)
	}
	np := &pkgState{name: ev.Package, kind: ev.Kind, serial: seq}
	if p != nil {
		if p.kind != ev.Kind {
			return nil, fmt.Errorf("package %s is a %v, not a %v: %w", ev.Package, p.kind, ev.Kind, oplog.ErrInvalid)
		}
		if n := len(p.releases); n > 0 {
			if last := p.releases[n-1].pb.Version.Version; oplog.CompareVersions(v.Version, last) <= 0 {
				return nil, fmt.Errorf("package %s: version %s is not above the last, %s: %w", ev.Package, v.Version, last, oplog.ErrConflict)
			}
		}
		np.releases = slices.Clone(p.releases)
	}
	if ev.Kind == deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH {
		if err := verifyProducer(ev.Package, v, keys); err != nil {
			return nil, fmt.Errorf("package %s %s: %w", ev.Package, v.Version, err)
		}
		v = proto.Clone(v).(*deliverypb.Version)
		v.ProducerPublicKey = keys[v.ProducerKey].PublicKey
	}
	aud, err := Compile(v.Audience, releaseSalt(ev.Package, v.Version))
	if err != nil {
		return nil, fmt.Errorf("package %s %s: audience: %w", ev.Package, v.Version, err)
	}
	np.releases = append(np.releases, &release{
		pb: &deliverypb.Release{Package: ev.Package, Kind: ev.Kind, Version: v, Stage: deliverypb.Stage_STAGE_DRAFT,
			Serial: seq, UpdatedMs: ev.AtMs},
		audience: aud,
	})
	return np, nil
}

// rollback marks every release newer than the target that devices may
// have (rollbackable: gray, full, or offered then stopped) rolled back,
// and resumes the target if it was paused: it is what devices are sent.
// to must be the last stable version before the newest rollbackable one.
func rollback(np *pkgState, to string, seq uint64, at int64) error {
	cur := np.current()
	if cur < 0 {
		return fmt.Errorf("package %s: no released version to roll back: %w", np.name, oplog.ErrConflict)
	}
	// The target: a full release before the current one; usually the
	// last (Rollback), or an earlier one when a full release is itself
	// rolled back (RollbackVersion).
	stable, t := np.find(to)
	if t == nil || t.pb.Stage != deliverypb.Stage_STAGE_FULL || stable >= cur {
		return fmt.Errorf("package %s: %q is not a full release before %s to roll back to: %w", np.name, clip(to), np.releases[cur].pb.Version.Version, oplog.ErrConflict)
	}
	for i := stable + 1; i < len(np.releases); i++ {
		r := np.releases[i]
		if !rollbackable(r) {
			continue
		}
		nr := r.clone()
		nr.pb.Stage, nr.pb.Paused, nr.pb.Serial, nr.pb.UpdatedMs = deliverypb.Stage_STAGE_ROLLED_BACK, false, seq, at
		np.releases[i] = nr
	}
	// The target is offered to every device again, as it must reach all
	// that may have a rolled-back version: a pause of it or models left
	// out of it end.
	if t := np.releases[stable]; t.pb.Paused || len(t.pb.ExcludedModels) > 0 {
		nt := t.clone()
		nt.pb.Paused, nt.pb.ExcludedModels, nt.excluded, nt.pb.Serial, nt.pb.UpdatedMs = false, nil, nil, seq, at
		np.releases[stable] = nt
	}
	return nil
}

// nextBoundary returns the earliest time after now at which a rule's
// window opens or closes (unix ms), or 0 for none: a device's view can
// change then without any event.
func (s *snapshot) nextBoundary(now int64) int64 {
	next := int64(0)
	consider := func(r *Rule) {
		if r == nil {
			return
		}
		for _, t := range []int64{r.notBefore, r.notAfter} {
			if t > now && (next == 0 || t < next) {
				next = t
			}
		}
	}
	for _, cs := range s.switches {
		for _, r := range cs.rules {
			consider(r)
		}
	}
	for _, p := range s.packages {
		for _, r := range p.releases {
			consider(r.audience)
			consider(r.gray)
		}
	}
	return next
}
