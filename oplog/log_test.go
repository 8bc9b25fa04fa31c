package oplog_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

var (
	chat    = &oplogpb.Business{Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER}
	coupons = &oplogpb.Business{Code: "coupons", Dimension: oplogpb.Dimension_DIMENSION_USER, DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_SINGLE}
	config  = &oplogpb.Business{Code: "config", Dimension: oplogpb.Dimension_DIMENSION_DEVICE}
)

type env struct {
	nc *nats.Conn
	l  *oplog.Log
	in *oplog.Inbox
}

func newEnv(t *testing.T) env {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{Limits: oplog.Limits{MaxPayload: 1024, MaxTargets: 3}}, chat, coupons, config)
	in := oplogtest.MustRunInbox(t, l, "")
	return env{nc, l, in}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func syncEvent(biz string, targets ...string) *oplogpb.Event {
	return &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: biz, Targets: targets, Payload: []byte("p")}
}

func mustAppend(t *testing.T, l *oplog.Log, ev *oplogpb.Event) []*oplogpb.Appended {
	t.Helper()
	r, err := l.Append(ctx(t), ev)
	if err != nil {
		t.Fatalf("append %v: %v", ev, err)
	}
	return r
}

func ids(b *oplog.Backlog) []uint64 {
	var out []uint64
	for _, e := range b.Entries {
		out = append(out, e.Id)
	}
	return out
}

func mustBacklog(t *testing.T, in *oplog.Inbox, req oplog.BacklogRequest) *oplog.Backlog {
	t.Helper()
	b, err := in.Backlog(ctx(t), req)
	if err != nil {
		t.Fatalf("backlog %+v: %v", req, err)
	}
	return b
}

func equalIDs(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestAppendAndBacklog(t *testing.T) {
	e := newEnv(t)
	var want []uint64
	for i := range 5 {
		ev := syncEvent("chat", "alice", "bob")
		ev.Payload = []byte("m" + strconv.Itoa(i))
		r := mustAppend(t, e.l, ev)
		if len(r) != 2 || r[0].Target != "alice" || r[1].Target != "bob" {
			t.Fatalf("results %v, want alice and bob", r)
		}
		if r[0].Epoch != e.l.Epoch(0) || r[0].Epoch == 0 {
			t.Fatalf("epoch %d, want %d", r[0].Epoch, e.l.Epoch(0))
		}
		if len(want) > 0 && r[0].Id <= want[len(want)-1] {
			t.Fatalf("id %d not above %d", r[0].Id, want[len(want)-1])
		}
		want = append(want, r[0].Id)
	}
	mustAppend(t, e.l, syncEvent("config", "phone1"))
	b := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone1"})
	got := ids(b)
	if len(got) != 6 || !equalIDs(got[:5], want) || b.Entries[5].Business != "config" {
		t.Fatalf("backlog ids %v, want %v then one config entry", got, want)
	}
	if string(b.Entries[2].Payload) != "m2" || b.Entries[2].Target != "alice" || b.Entries[2].Epoch != e.l.Epoch(0) {
		t.Fatalf("entry 2 = %v", b.Entries[2])
	}
	// From a sync point: only what comes after it.
	b = mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone1",
		Points: map[string]oplog.SyncPoint{"chat": {ID: want[2], Epoch: e.l.Epoch(0)}, "config": {ID: 1 << 40, Epoch: e.l.Epoch(0)}}})
	if got := ids(b); !equalIDs(got, want[3:]) {
		t.Fatalf("backlog after %d = %v, want %v", want[2], got, want[3:])
	}
	// A device without a user gets only device-dimension businesses.
	b = mustBacklog(t, e.in, oplog.BacklogRequest{Device: "phone1"})
	if len(b.Entries) != 1 || b.Entries[0].Business != "config" {
		t.Fatalf("anonymous backlog %v, want the config entry", ids(b))
	}
	// Limit.
	b = mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone1", Limit: 2})
	if !b.More || len(b.Entries) != 2 {
		t.Fatalf("limited backlog: %d entries, more=%v", len(b.Entries), b.More)
	}
}

func TestDuplicateMessageID(t *testing.T) {
	e := newEnv(t)
	ev := syncEvent("chat", "alice", "bob")
	ev.MessageId = "order-17"
	first := mustAppend(t, e.l, ev)
	again := mustAppend(t, e.l, proto.Clone(ev).(*oplogpb.Event))
	for i := range first {
		if again[i].Id != first[i].Id || !again[i].Duplicate || first[i].Duplicate {
			t.Fatalf("retry %v, first %v: want the original ids marked duplicate", again[i], first[i])
		}
	}
	b := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "d1"})
	if len(b.Entries) != 1 {
		t.Fatalf("alice has %d entries, want 1", len(b.Entries))
	}
}

func TestBadInput(t *testing.T) {
	e := newEnv(t)
	past := timestamppb.New(time.Now().Add(-time.Second))
	cases := []struct {
		name string
		mod  func(*oplogpb.Event)
		want error
	}{
		{"no kind", func(ev *oplogpb.Event) { ev.Kind = 0 }, oplog.ErrUnknownKind},
		{"kind out of range", func(ev *oplogpb.Event) { ev.Kind = 99 }, oplog.ErrUnknownKind},
		{"unknown business", func(ev *oplogpb.Event) { ev.Business = "nope" }, oplog.ErrUnknownBusiness},
		{"business alphabet", func(ev *oplogpb.Event) { ev.Business = "Chat" }, oplog.ErrInvalidID},
		{"target with dot", func(ev *oplogpb.Event) { ev.Targets = []string{"a.b"} }, oplog.ErrInvalidID},
		{"target wildcard", func(ev *oplogpb.Event) { ev.Targets = []string{"*"} }, oplog.ErrInvalidID},
		{"target too long", func(ev *oplogpb.Event) { ev.Targets = []string{strings.Repeat("a", 65)} }, oplog.ErrInvalidID},
		{"message id with space", func(ev *oplogpb.Event) { ev.MessageId = "a b" }, oplog.ErrInvalidID},
		{"no targets", func(ev *oplogpb.Event) { ev.Targets = nil }, oplog.ErrNoTargets},
		{"too many targets", func(ev *oplogpb.Event) { ev.Targets = []string{"a", "b", "c", "d"} }, oplog.ErrTooManyTargets},
		{"payload too large", func(ev *oplogpb.Event) { ev.Payload = make([]byte, 1025) }, oplog.ErrPayloadTooLarge},
		{"expired", func(ev *oplogpb.Event) { ev.ExpiresAt = past }, oplog.ErrExpired},
		{"wrong dimension", func(ev *oplogpb.Event) { ev.Dimension = oplogpb.Dimension_DIMENSION_DEVICE }, oplog.ErrInvalid},
		{"single device on device business", func(ev *oplogpb.Event) {
			ev.Business, ev.DeviceMode = "config", oplogpb.DeviceMode_DEVICE_MODE_SINGLE
		}, oplog.ErrInvalid},
		{"bad version condition", func(ev *oplogpb.Event) { ev.Conditions = &oplogpb.Conditions{AppVersionMin: "1 2"} }, oplog.ErrInvalid},
		{"topic kind", func(ev *oplogpb.Event) { ev.Kind = oplogpb.Kind_KIND_TOPIC_MESSAGE }, oplog.ErrUnknownKind},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ev := syncEvent("chat", "alice")
			c.mod(ev)
			_, err := e.l.Append(ctx(t), ev)
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
	// Nothing was written.
	s, err := e.l.JetStream().Stream(ctx(t), oplog.StreamOplog(0))
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 0 {
		t.Fatalf("oplog holds %d messages after refused events, want 0", n)
	}
	// A batch refuses the bad event alone.
	rs := e.l.AppendBatch(ctx(t), []*oplogpb.Event{syncEvent("chat", "alice"), syncEvent("nope", "alice"), nil})
	if rs[0].Error != nil || len(rs[0].Results) != 1 || rs[1].Error.GetCode() != oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_BUSINESS || rs[2].Error.GetCode() != oplogpb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Fatalf("batch replies %v", rs)
	}
}

func TestSingleDeviceMode(t *testing.T) {
	e := newEnv(t)
	c1 := mustAppend(t, e.l, syncEvent("coupons", "alice"))[0].Id
	m1 := mustAppend(t, e.l, syncEvent("chat", "alice"))[0].Id
	c2 := mustAppend(t, e.l, syncEvent("coupons", "alice"))[0].Id
	epoch := e.l.Epoch(0)
	// Both devices see both coupons until one of them acks.
	for _, dev := range []string{"phone", "tablet"} {
		if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: dev})); !equalIDs(got, []uint64{c1, m1, c2}) {
			t.Fatalf("%s backlog %v", dev, got)
		}
	}
	if err := e.in.Ack(ctx(t), "alice", "phone", map[string]oplog.SyncPoint{"coupons": {ID: c1, Epoch: epoch}}); err != nil {
		t.Fatal(err)
	}
	// The tablet no longer gets coupon 1, but still the chat message and coupon 2.
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "tablet"})); !equalIDs(got, []uint64{m1, c2}) {
		t.Fatalf("tablet backlog after phone acked %d: %v, want %v", c1, got, []uint64{m1, c2})
	}
	// The phone's own backlog starts after its recorded sync point.
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone"})); !equalIDs(got, []uint64{m1, c2}) {
		t.Fatalf("phone backlog %v", got)
	}
	sp, err := e.in.SyncPoints(ctx(t), "phone")
	if err != nil || sp["coupons"] != (oplog.SyncPoint{ID: c1, Epoch: epoch, User: "alice"}) {
		t.Fatalf("sync points %v, %v", sp, err)
	}
	// Acks move forward only; an old epoch is refused.
	if err := e.in.Ack(ctx(t), "alice", "phone", map[string]oplog.SyncPoint{"coupons": {ID: c1 - 1, Epoch: epoch}}); err != nil {
		t.Fatal(err)
	}
	if sp, _ := e.in.SyncPoints(ctx(t), "phone"); sp["coupons"].ID != c1 {
		t.Fatalf("sync point went back to %d", sp["coupons"].ID)
	}
	err = e.in.Ack(ctx(t), "alice", "phone", map[string]oplog.SyncPoint{"chat": {ID: m1, Epoch: epoch + 1}})
	if !errors.Is(err, oplog.ErrEpochMismatch) {
		t.Fatalf("ack with a wrong epoch: %v", err)
	}
}

func TestConditionsAndExpiry(t *testing.T) {
	e := newEnv(t)
	ev := syncEvent("chat", "alice")
	ev.Conditions = &oplogpb.Conditions{AppVersionMin: "2.0", Os: []string{"ios"}}
	cond := mustAppend(t, e.l, ev)[0].Id
	ev = syncEvent("chat", "alice")
	ev.ExpiresAt = timestamppb.New(time.Now().Add(1500 * time.Millisecond))
	exp := mustAppend(t, e.l, ev)[0].Id

	old := oplog.Attrs{AppVersion: "1.9.9", OS: "iOS"}
	cur := oplog.Attrs{AppVersion: "2.10", OS: "iOS"}
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "d", Attrs: old})); !equalIDs(got, []uint64{exp}) {
		t.Fatalf("old client got %v, want only %d", got, exp)
	}
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "d", Attrs: cur})); !equalIDs(got, []uint64{cond, exp}) {
		t.Fatalf("current client got %v, want %d and %d", got, cond, exp)
	}
	time.Sleep(1600 * time.Millisecond)
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "d", Attrs: cur})); !equalIDs(got, []uint64{cond}) {
		t.Fatalf("after expiry got %v, want only %d", got, cond)
	}
	// The stream drops it too (per-message TTL).
	stream, err := e.l.JetStream().Stream(ctx(t), oplog.StreamOplog(0))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := stream.GetMsg(ctx(t), exp)
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("expired entry %d still stored", exp)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}

func TestSourceOfTruthRefusesDeleteAndPurge(t *testing.T) {
	e := newEnv(t)
	id := mustAppend(t, e.l, syncEvent("chat", "alice"))[0].Id
	for _, name := range []string{oplog.StreamOplog(0), oplog.StreamAcks, oplog.StreamIngest} {
		s, err := e.l.JetStream().Stream(ctx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Purge(ctx(t)); err == nil {
			t.Errorf("%s: purge accepted", name)
		}
		if name == oplog.StreamOplog(0) {
			if err := s.DeleteMsg(ctx(t), id); err == nil {
				t.Errorf("%s: delete of %d accepted", name, id)
			}
		}
	}
	if b := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "d"}); len(b.Entries) != 1 {
		t.Fatalf("backlog has %d entries after refused delete, want 1", len(b.Entries))
	}
}

// TestDeviceSwitchesUsers: a device's recorded sync point of a user
// business belongs to the user it was acked under; another user signed in
// on the device starts from their own inbox, and can ack lower ids.
func TestDeviceSwitchesUsers(t *testing.T) {
	e := newEnv(t)
	epoch := e.l.Epoch(0)
	b1 := mustAppend(t, e.l, syncEvent("chat", "bob"))[0].Id
	a1 := mustAppend(t, e.l, syncEvent("chat", "ann"))[0].Id
	if err := e.in.Ack(ctx(t), "ann", "shared", map[string]oplog.SyncPoint{"chat": {ID: a1, Epoch: epoch}}); err != nil {
		t.Fatal(err)
	}
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "ann", Device: "shared"})); len(got) != 0 {
		t.Fatalf("ann's backlog after her ack: %v", got)
	}
	// Bob's entry is older than Ann's ack, and still his to receive.
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "bob", Device: "shared"})); !equalIDs(got, []uint64{b1}) {
		t.Fatalf("bob's backlog on ann's device: %v, want [%d]", got, b1)
	}
	if err := e.in.Ack(ctx(t), "bob", "shared", map[string]oplog.SyncPoint{"chat": {ID: b1, Epoch: epoch}}); err != nil {
		t.Fatal(err)
	}
	sp, err := e.in.SyncPoints(ctx(t), "shared")
	if err != nil || sp["chat"] != (oplog.SyncPoint{ID: b1, Epoch: epoch, User: "bob"}) {
		t.Fatalf("after bob's ack: %v, %v", sp, err)
	}
	// An ack naming an unknown business records nothing, not even the
	// valid points beside it.
	err = e.in.Ack(ctx(t), "bob", "shared", map[string]oplog.SyncPoint{"chat": {ID: b1 + 5, Epoch: epoch}, "nope": {ID: 1, Epoch: epoch}})
	if !errors.Is(err, oplog.ErrUnknownBusiness) {
		t.Fatalf("ack with an unknown business: %v", err)
	}
	if sp, _ := e.in.SyncPoints(ctx(t), "shared"); sp["chat"].ID != b1 {
		t.Fatalf("a refused ack recorded %v", sp["chat"])
	}
}

// TestBacklogOfSomeBusinesses reads a backlog restricted to a bucket of
// businesses and counts its inbox scans.
func TestBacklogOfSomeBusinesses(t *testing.T) {
	e := newEnv(t)
	mustAppend(t, e.l, syncEvent("chat", "alice"))
	mustAppend(t, e.l, syncEvent("coupons", "alice"))
	mustAppend(t, e.l, syncEvent("config", "phone"))
	all := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone"})
	if len(all.Entries) != 3 || all.Reads != 3 {
		t.Fatalf("whole backlog: %d entries in %d reads, want 3 in 3 (two inboxes, the sync points)", len(all.Entries), all.Reads)
	}
	recorded, err := e.in.SyncPoints(ctx(t), "phone")
	if err != nil {
		t.Fatal(err)
	}
	user := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone", Businesses: []string{"chat", "coupons"}, Recorded: recorded})
	if len(user.Entries) != 2 || user.Reads != 1 {
		t.Fatalf("user bucket: %d entries in %d reads, want 2 in 1", len(user.Entries), user.Reads)
	}
	one := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone", Businesses: []string{"config", "nope"}, Recorded: recorded})
	if len(one.Entries) != 1 || one.Entries[0].Business != "config" || one.Reads != 1 {
		t.Fatalf("device bucket: %v in %d reads", one.Entries, one.Reads)
	}
	none := mustBacklog(t, e.in, oplog.BacklogRequest{User: "alice", Device: "phone", Businesses: []string{}, Recorded: recorded})
	if len(none.Entries) != 0 || none.Reads != 0 {
		t.Fatalf("empty bucket: %d entries in %d reads", len(none.Entries), none.Reads)
	}
}

// TestCollapseKey: a newer entry with the same collapse key replaces an
// older one not yet delivered, per target and business; an older entry
// that outlives the newer one stays replaced; the index survives a rebuild.
func TestCollapseKey(t *testing.T) {
	e := newEnv(t)
	app := func(key string, mod ...func(*oplogpb.Event)) uint64 {
		ev := syncEvent("chat", "alice")
		ev.CollapseKey = key
		for _, m := range mod {
			m(ev)
		}
		return mustAppend(t, e.l, ev)[0].Id
	}
	score1 := app("score")
	other := app("weather")
	plain := app("")
	score2 := app("score")
	bobs := mustAppend(t, e.l, func() *oplogpb.Event { ev := syncEvent("chat", "bob"); ev.CollapseKey = "score"; return ev }())[0].Id
	req := oplog.BacklogRequest{User: "alice", Device: "d"}
	if got := ids(mustBacklog(t, e.in, req)); !equalIDs(got, []uint64{other, plain, score2}) {
		t.Fatalf("backlog %v, want %d %d %d (score %d replaced by %d)", got, other, plain, score2, score1, score2)
	}
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "bob", Device: "d2"})); !equalIDs(got, []uint64{bobs}) {
		t.Fatalf("bob's backlog %v: another target's key replaced his entry", got)
	}
	// A short-lived newer entry: once it expires the older stays replaced.
	long := app("promo")
	short := app("promo", func(ev *oplogpb.Event) { ev.ExpiresAt = timestamppb.New(time.Now().Add(1200 * time.Millisecond)) })
	if got := ids(mustBacklog(t, e.in, req)); !equalIDs(got, []uint64{other, plain, score2, short}) {
		t.Fatalf("backlog %v, want promo %d only (not %d)", got, short, long)
	}
	time.Sleep(1500 * time.Millisecond)
	if got := ids(mustBacklog(t, e.in, req)); !equalIDs(got, []uint64{other, plain, score2}) {
		t.Fatalf("after the newer promo expired: %v, want the old one still replaced", got)
	}
	// The stream keeps a collapsing entry past its validity (CollapseGrace
	// longer), so that a rebuild still sees what it replaced.
	stream, err := e.l.JetStream().Stream(ctx(t), oplog.StreamOplog(0))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.GetMsg(ctx(t), short); err != nil {
		t.Fatalf("expired collapsing entry %d gone from the stream: %v", short, err)
	}
	if msg, _ := stream.GetMsg(ctx(t), short); msg == nil || msg.Header.Get("Nats-TTL") == "" {
		t.Fatalf("a collapsing entry with a validity carries no Nats-TTL: it would never leave the stream")
	}
	// Rebuilt from zero, the index gives the same answers.
	name := oplog.StreamOplog(0)
	sum, err := e.in.Rebuild(ctx(t), name, 0, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Messages != 7 {
		t.Fatalf("rebuild applied %d messages, want 7", sum.Messages)
	}
	if got := ids(mustBacklog(t, e.in, req)); !equalIDs(got, []uint64{other, plain, score2}) {
		t.Fatalf("after a rebuild: %v", got)
	}
	// A bad key is refused.
	ev := syncEvent("chat", "alice")
	ev.CollapseKey = "no spaces"
	if _, err := e.l.Append(ctx(t), ev); !errors.Is(err, oplog.ErrInvalidID) {
		t.Fatalf("bad collapse key: %v", err)
	}
}
