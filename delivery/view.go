package delivery

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strings"

	"github.com/sluicehq/sluice/delivery/deliverypb"
)

// offer is the release a device should have of one package.
type offer struct {
	pkg      *pkgState
	target   *release
	rollback []string // versions rolled back past, newest first; nil for an upgrade
}

// offerFor walks a package's releases newest first and returns what device
// d should have at now, or ok false for nothing:
//   - a rolled-back release is remembered, and the release finally
//     offered carries the rollback and lists it: whatever rule, window or
//     attributes let the device have it then, it may have it now, and a
//     client only downgrades when what it has is listed;
//   - draft, stopped and paused releases are skipped;
//   - a gray release is offered if d is in its audience and gray rule;
//   - a full release is offered if d is in its audience;
//   - a hot patch whose producer key was revoked since is skipped.
func offerFor(p *pkgState, d *Device, now int64, keys map[string]*deliverypb.ProducerKey) (offer, bool) {
	var rolled []string
	for i := len(p.releases) - 1; i >= 0; i-- {
		r := p.releases[i]
		if r.pb.Stage == deliverypb.Stage_STAGE_ROLLED_BACK {
			rolled = append(rolled, r.pb.Version.Version)
			continue
		}
		if r.pb.Paused || !r.audience.Match(d, now) || (r.excluded != nil && r.excluded.Match(d, now)) {
			continue
		}
		if r.pb.Kind == deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH {
			if k := keys[r.pb.Version.ProducerKey]; k == nil || k.Revoked {
				continue
			}
		}
		switch r.pb.Stage {
		case deliverypb.Stage_STAGE_GRAY:
			if r.gray != nil && r.gray.Match(d, now) {
				return offer{pkg: p, target: r, rollback: rolled}, true
			}
		case deliverypb.Stage_STAGE_FULL:
			return offer{pkg: p, target: r, rollback: rolled}, true
		}
	}
	return offer{}, false
}

// switchValue returns the value of a switch for device d at now.
func switchValue(cs *compiledSwitch, d *Device, now int64) *deliverypb.SwitchValue {
	sw := cs.pb
	if sw.Killed {
		return &deliverypb.SwitchValue{Key: sw.Key, Value: sw.KillValue, Version: sw.Version, Variant: "kill"}
	}
	for i, r := range cs.rules {
		if r.Match(d, now) {
			v := sw.Variants[i]
			return &deliverypb.SwitchValue{Key: sw.Key, Value: v.Value, Version: sw.Version, Variant: v.Name}
		}
	}
	return &deliverypb.SwitchValue{Key: sw.Key, Value: sw.DefaultValue, Version: sw.Version}
}

// manifest builds the manifest of an offer (unsigned).
func (o offer) manifest(prefix string, issued, expires int64) *deliverypb.Manifest {
	v := o.target.pb.Version
	m := &deliverypb.Manifest{
		Package: o.pkg.name, Kind: o.pkg.kind, Version: v.Version, Sha256: v.Sha256, Size: v.Size,
		TreeSha256: v.TreeSha256, Url: prefix + o.pkg.name + "/" + v.Version, FallbackUrl: v.FallbackUrl,
		Rollback: len(o.rollback) > 0, RollbackFrom: o.rollback, Serial: o.pkg.serial,
		IssuedMs: issued, ExpiresMs: expires,
		ProducerSignature: v.ProducerSignature, ProducerKey: v.ProducerKey,
	}
	m.ProducerPublicKey = v.ProducerPublicKey
	for _, df := range v.Diffs {
		m.Diffs = append(m.Diffs, &deliverypb.Diff{FromVersion: df.FromVersion, FromSha256: df.FromSha256,
			Sha256: df.Sha256, Size: df.Size, Format: df.Format,
			Object: prefix + o.pkg.name + "/" + v.Version + "/from/" + df.FromVersion})
	}
	return m
}

// key identifies an offer's manifest within one state: the package,
// target and rollback set.
func (o offer) key() string {
	return o.pkg.name + "\x00" + o.target.pb.Version.Version + "\x00" + strings.Join(o.rollback, ",")
}

// digest identifies a view by what it tells the device, not by its
// signature bytes: the switches' keys, versions and variants, and the
// offers' packages, serials, targets and rollback sets, plus the
// manifests' issue period so that a device is sent fresh manifests before
// the ones it holds expire.
type digester struct {
	buf []byte
}

func (g *digester) str(s string) {
	g.buf = binary.AppendUvarint(g.buf, uint64(len(s)))
	g.buf = append(g.buf, s...)
}

func (g *digester) num(n uint64) { g.buf = binary.AppendUvarint(g.buf, n) }

func (g *digester) sum() string {
	h := sha256.Sum256(g.buf)
	return hex.EncodeToString(h[:12])
}
