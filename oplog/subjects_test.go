package oplog_test

import (
	"errors"
	"testing"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

func TestParseOplogSubject(t *testing.T) {
	shard, dim, target, biz, err := oplog.ParseOplogSubject(oplog.SubjectLive(3, oplogpb.Dimension_DIMENSION_DEVICE, "phone-1", "config"))
	if err != nil || shard != 3 || dim != oplogpb.Dimension_DIMENSION_DEVICE || target != "phone-1" || biz != "config" {
		t.Fatalf("got %d %v %q %q %v", shard, dim, target, biz, err)
	}
	for _, bad := range []string{
		"", "sluice", "other.oplog.0.u.a.b", "sluice.acks.0.u.a.b", "sluice.oplog.x.u.a.b",
		"sluice.oplog.0.x.a.b", "sluice.oplog.0.u.a", "sluice.oplog.0.u.a.b.c", "sluice.oplog.0.u..b", "sluice.oplog.0.u.a.",
	} {
		if _, _, _, _, err := oplog.ParseOplogSubject(bad); !errors.Is(err, oplog.ErrInvalid) {
			t.Errorf("ParseOplogSubject(%q) = %v, want ErrInvalid", bad, err)
		}
	}
}
