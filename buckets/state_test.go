package buckets

import (
	"fmt"
	"slices"
	"testing"

	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

func TestDefaultRule(t *testing.T) {
	tests := []struct {
		dim  oplogpb.Dimension
		mode oplogpb.DeviceMode
		want string
	}{
		{oplogpb.Dimension_DIMENSION_DEVICE, oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED, Device},
		{oplogpb.Dimension_DIMENSION_DEVICE, oplogpb.DeviceMode_DEVICE_MODE_MULTI, Device},
		{oplogpb.Dimension_DIMENSION_USER, oplogpb.DeviceMode_DEVICE_MODE_MULTI, MultiDevice},
		{oplogpb.Dimension_DIMENSION_USER, oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED, MultiDevice},
		{oplogpb.Dimension_DIMENSION_USER, oplogpb.DeviceMode_DEVICE_MODE_SINGLE, User},
		{oplogpb.Dimension_DIMENSION_UNSPECIFIED, oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED, MultiDevice},
		{oplogpb.Dimension_DIMENSION_UNSPECIFIED, oplogpb.DeviceMode_DEVICE_MODE_SINGLE, User},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%s", tt.dim, tt.mode), func(t *testing.T) {
			if got := DefaultRule(&oplogpb.Business{Code: "b", Dimension: tt.dim, DeviceMode: tt.mode}); got != tt.want {
				t.Errorf("DefaultRule = %q, want %q", got, tt.want)
			}
		})
	}
	for _, name := range []string{Global, Device, MultiDevice, User, OneShot} {
		if !IsDefault(name) || !ValidName(name) {
			t.Errorf("%s: IsDefault %v, ValidName %v; want both", name, IsDefault(name), ValidName(name))
		}
	}
}

// feed applies events to a model as a stream would deliver them.
type feed struct {
	m   *model
	seq uint64
}

func (f *feed) put(t *testing.T, subject string, msg proto.Message) error {
	t.Helper()
	data, err := proto.Marshal(msg)
	if err != nil {
		t.Fatal(err)
	}
	f.seq++
	_, err = f.m.Apply(f.seq, subject, data)
	return err
}

func (f *feed) define(t *testing.T, b *bucketspb.Bucket) error {
	return f.put(t, oplog.SubjectControl("bucket", b.Name), b)
}

func (f *feed) assign(t *testing.T, business, bucket string) error {
	return f.put(t, oplog.SubjectControl("assign", business), &bucketspb.Assignment{Business: business, Bucket: bucket})
}

func TestModel_Apply(t *testing.T) {
	f := &feed{m: newModel()}
	if err := f.define(t, &bucketspb.Bucket{Name: "vip", Priority: 1}); err != nil {
		t.Fatal(err)
	}
	if err := f.assign(t, "chat", "vip"); err != nil {
		t.Fatal(err)
	}
	// An assignment to a bucket that does not exist is rejected and
	// remembered, and changes nothing.
	v := f.m.version
	if err := f.assign(t, "chat", "gone"); err == nil {
		t.Error("assignment to a missing bucket applied")
	}
	if s := f.m.Snapshot(); !s.wasRejected(f.seq) || s.names["chat"] != "vip" || f.m.version != v {
		t.Errorf("after a rejected assignment: rejected %v, chat in %q, version %d→%d", s.rejected, s.names["chat"], v, f.m.version)
	}
	// Redelivery of an applied sequence is a no-op.
	data, _ := proto.Marshal(&bucketspb.Assignment{Business: "chat"})
	if changed, _ := f.m.Apply(2, oplog.SubjectControl("assign", "chat"), data); changed || f.m.assign["chat"] != "vip" {
		t.Errorf("redelivered event changed the model: chat in %q", f.m.assign["chat"])
	}
	// A removal of a default bucket (which Remove refuses) reverts its
	// settings and keeps its businesses.
	if err := f.define(t, &bucketspb.Bucket{Name: OneShot, Priority: 9, Rate: 1}); err != nil {
		t.Fatal(err)
	}
	if err := f.assign(t, "cmd", OneShot); err != nil {
		t.Fatal(err)
	}
	if err := f.define(t, &bucketspb.Bucket{Name: OneShot, Removed: true}); err != nil {
		t.Fatal(err)
	}
	s := f.m.Snapshot()
	if b := s.order[s.pos[OneShot]]; b.Priority != 3 || b.Rate != 0 || s.names["cmd"] != OneShot {
		t.Errorf("after removing one-shot: %+v, cmd in %q; want the built-in settings and cmd kept", b, s.names["cmd"])
	}
	// Events that do not belong are skipped.
	bad := []struct {
		subject string
		msg     proto.Message
	}{
		{oplog.SubjectControl("bucket", "a"), &bucketspb.Bucket{Name: "b"}},
		{oplog.SubjectControl("bucket", "a"), &bucketspb.Bucket{Name: "a", Priority: 11}},
		{oplog.SubjectControl("bucket", "A"), &bucketspb.Bucket{Name: "A"}},
		{oplog.SubjectControl("assign", "x"), &bucketspb.Assignment{Business: "y", Bucket: "vip"}},
		{oplog.SubjectControl("other", "x"), &bucketspb.Assignment{Business: "x", Bucket: "vip"}},
	}
	v = f.m.version
	for _, b := range bad {
		if err := f.put(t, b.subject, b.msg); err == nil {
			t.Errorf("%s %v: applied, want skipped", b.subject, b.msg)
		}
	}
	if f.m.version != v || f.m.applied != f.seq {
		t.Errorf("after bad events: version %d→%d, applied %d of %d", v, f.m.version, f.m.applied, f.seq)
	}
}

func TestPlan_Sizes(t *testing.T) {
	// More buckets and businesses than plan's stack buffers hold.
	f := &feed{m: newModel()}
	var bs []*oplogpb.Business
	for i := range 40 {
		if err := f.define(t, &bucketspb.Bucket{Name: fmt.Sprintf("b%02d", i), Priority: int32(i % 10)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 600 {
		b := &oplogpb.Business{Code: fmt.Sprintf("biz%03d", i), Dimension: oplogpb.Dimension_DIMENSION_USER}
		bs = append(bs, b)
		if i%3 == 0 {
			if err := f.assign(t, b.Code, fmt.Sprintf("b%02d", i%40)); err != nil {
				t.Fatal(err)
			}
		}
	}
	bs = append(bs, nil)
	plan := f.m.Snapshot().plan(bs)
	total := 0
	for i, g := range plan {
		total += len(g.Businesses)
		if len(g.Businesses) == 0 || cap(g.Businesses) != len(g.Businesses) {
			t.Errorf("group %s: len %d cap %d", g.Bucket.Name, len(g.Businesses), cap(g.Businesses))
		}
		if i > 0 && plan[i-1].Bucket.Priority > g.Bucket.Priority {
			t.Errorf("group %s (priority %d) after priority %d", g.Bucket.Name, g.Bucket.Priority, plan[i-1].Bucket.Priority)
		}
		if !slices.IsSortedFunc(g.Businesses, func(a, b *oplogpb.Business) int { return cmpStr(a.Code, b.Code) }) {
			t.Errorf("group %s: businesses out of input order", g.Bucket.Name)
		}
	}
	if total != 600 {
		t.Errorf("plan holds %d businesses, want 600", total)
	}
	if got := len(plan); got != 41 { // 40 custom buckets + multi-device
		t.Errorf("%d groups, want 41", got)
	}
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
