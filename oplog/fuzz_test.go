package oplog

import (
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// FuzzDecodeEvent feeds arbitrary bytes, as protobuf or JSON, through the
// decoder and validator producers' input goes through. It must never
// panic; an accepted event must yield entries that round-trip and subjects
// that parse back to their target and business. Seeds:
// testdata/fuzz/FuzzDecodeEvent.
func FuzzDecodeEvent(f *testing.F) {
	f.Add(false, []byte{})
	f.Add(true, []byte(`{"kind":"KIND_SYNC","business":"chat","targets":["alice"],"payload":"aGk="}`))
	businesses := map[string]*oplogpb.Business{
		"chat":   {Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER},
		"config": {Code: "config", Dimension: oplogpb.Dimension_DIMENSION_DEVICE},
		"coupon": {Code: "coupon", Dimension: oplogpb.Dimension_DIMENSION_USER, DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_SINGLE},
	}
	lookup := func(code string) (*oplogpb.Business, bool) { b, ok := businesses[code]; return b, ok }
	lim := Limits{MaxPayload: 4096, MaxTargets: 16}.withDefaults()
	now := time.Unix(1_800_000_000, 0)
	f.Fuzz(func(t *testing.T, asJSON bool, body []byte) {
		ct := ""
		if asJSON {
			ct = ContentTypeJSON
		}
		ev, err := DecodeEvent(ct, body, lim.MaxBody)
		if err != nil {
			if CodeOf(err) != oplogpb.ErrorCode_ERROR_CODE_MALFORMED && CodeOf(err) != oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE {
				t.Fatalf("decode error %v has code %v", err, CodeOf(err))
			}
			return
		}
		if err := validate(ev, lookup, lim, now); err != nil {
			if CodeOf(err) == oplogpb.ErrorCode_ERROR_CODE_INTERNAL {
				t.Fatalf("validation error %v is untyped", err)
			}
			return
		}
		if len(ev.Targets) == 0 || len(ev.Targets) > lim.MaxTargets || len(ev.Payload) > lim.MaxPayload {
			t.Fatalf("accepted %d targets, %d payload bytes", len(ev.Targets), len(ev.Payload))
		}
		for _, target := range ev.Targets {
			e := entryFor(ev, target)
			data, err := proto.Marshal(e)
			if err != nil {
				t.Fatalf("marshal entry: %v", err)
			}
			back := new(oplogpb.Entry)
			if err := proto.Unmarshal(data, back); err != nil || !proto.Equal(back, e) {
				t.Fatalf("entry does not round-trip: %v", err)
			}
			subj := SubjectOplog(ShardOf(target, 4), ev.Dimension, target, ev.Business)
			if strings.ContainsAny(subj, " \t\r\n*>") {
				t.Fatalf("unsafe subject %q", subj)
			}
			_, dim, gotT, gotB, err := ParseOplogSubject(subj)
			if err != nil || dim != ev.Dimension || gotT != target || gotB != ev.Business {
				t.Fatalf("subject %q parses to %v %q %q, %v", subj, dim, gotT, gotB, err)
			}
		}
	})
}
