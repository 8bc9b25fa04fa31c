package oplog_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// TestRebuildIsDeterministic: rebuilding a projection from zero, twice,
// and from a point gives the state live projection built, byte for byte.
func TestRebuildIsDeterministic(t *testing.T) {
	e := newEnv(t)
	epoch := e.l.Epoch(0)
	for i := range 300 {
		user := fmt.Sprintf("u%d", i%17)
		biz := []string{"chat", "coupons"}[i%2]
		id := mustAppend(t, e.l, syncEvent(biz, user))[0].Id
		mustAppend(t, e.l, syncEvent("config", fmt.Sprintf("dev%d", i%5)))
		if i%7 == 0 {
			// Devices switch users now and then: watermarks must survive replay.
			dev := fmt.Sprintf("dev%d", i%3)
			if err := e.in.Ack(ctx(t), user, dev, map[string]oplog.SyncPoint{biz: {ID: id, Epoch: epoch}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.in.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	for _, name := range e.in.Projections() {
		live, err := e.in.Digest(ctx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		for _, from := range []uint64{0, 0, 250} {
			var calls int
			sum, err := e.in.Rebuild(ctx(t), name, from, time.Millisecond, func(oplog.Progress) { calls++ })
			if err != nil {
				t.Fatalf("rebuild %s from %d: %v", name, from, err)
			}
			if sum.Digest != live {
				t.Fatalf("%s rebuilt from %d: digest %s, live projection had %s", name, from, sum.Digest, live)
			}
			if calls == 0 || sum.Applied == 0 {
				t.Fatalf("%s rebuilt from %d: %d progress reports, applied %d", name, from, calls, sum.Applied)
			}
		}
	}
	// The digest is not blind: one more entry changes it.
	before, _ := e.in.Digest(ctx(t), oplog.StreamOplog(0))
	mustAppend(t, e.l, syncEvent("chat", "u1"))
	if err := e.in.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if after, _ := e.in.Digest(ctx(t), oplog.StreamOplog(0)); after == before {
		t.Fatal("digest did not change after an append")
	}
}

// TestInboxResumesAfterRestart: a reopened inbox continues from the
// sequence it recorded, and ends identical to a fresh rebuild.
func TestInboxResumesAfterRestart(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat)
	dir := t.TempDir()
	in, err := oplog.OpenInbox(oplog.InboxConfig{Log: l, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := contextWithCancel()
	done := make(chan error, 1)
	go func() { done <- in.Run(c) }()
	for range 50 {
		mustAppend(t, l, syncEvent("chat", "frank"))
	}
	if err := in.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := in.Close(); err != nil {
		t.Fatal(err)
	}
	for range 50 {
		mustAppend(t, l, syncEvent("chat", "frank"))
	}
	in2 := oplogtest.MustRunInbox(t, l, dir)
	if got := in2.Applied()[oplog.StreamOplog(0)]; got != 50 {
		t.Fatalf("reopened inbox starts at %d, want 50", got)
	}
	b := mustBacklog(t, in2, oplog.BacklogRequest{User: "frank", Device: "d", Limit: 1000})
	if len(b.Entries) != 100 {
		t.Fatalf("backlog after restart: %d entries, want 100", len(b.Entries))
	}
	resumed, _ := in2.Digest(ctx(t), oplog.StreamOplog(0))
	sum, err := in2.Rebuild(ctx(t), oplog.StreamOplog(0), 0, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Digest != resumed {
		t.Fatalf("resumed digest %s, rebuilt %s", resumed, sum.Digest)
	}
}

// TestFeedWithOtherWriters: entries appended by another process (a second
// Log on the same streams, whose writes never reach this inbox's feed) are
// still projected, in order, interleaved with fed ones, and the result
// equals a rebuild from the stream.
func TestFeedWithOtherWriters(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	local := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat)
	remote := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	in := oplogtest.MustRunInbox(t, local, "")
	var want []uint64
	for i := range 60 {
		l := local
		if i%3 == 1 {
			l = remote
		}
		want = append(want, mustAppend(t, l, syncEvent("chat", "gina"))[0].Id)
	}
	// A remote write alone, with no local write after it to reveal the gap:
	// the reader's wait must fetch it from the stream.
	want = append(want, mustAppend(t, remote, syncEvent("chat", "gina"))[0].Id)
	b := mustBacklog(t, in, oplog.BacklogRequest{User: "gina", Device: "d", Limit: 1000})
	if got := ids(b); !equalIDs(got, want) {
		t.Fatalf("backlog %v\nwant %v", got, want)
	}
	live, _ := in.Digest(ctx(t), oplog.StreamOplog(0))
	sum, err := in.Rebuild(ctx(t), oplog.StreamOplog(0), 0, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Digest != live {
		t.Fatalf("fed projection digest %s, rebuilt %s", live, sum.Digest)
	}
}

// TestExpiredTailDoesNotStallReaders: when the newest entries of a stream
// expire before the projection applies them (here: a rebuild after they
// expired), their sequences no longer exist; rebuilds and backlog reads must
// still complete.
func TestExpiredTailDoesNotStallReaders(t *testing.T) {
	e := newEnv(t)
	keep := mustAppend(t, e.l, syncEvent("chat", "hana"))[0].Id
	ev := syncEvent("chat", "hana")
	ev.ExpiresAt = timestamppb.New(time.Now().Add(time.Second))
	gone := mustAppend(t, e.l, ev)[0].Id
	stream, err := e.l.JetStream().Stream(ctx(t), oplog.StreamOplog(0))
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := stream.GetMsg(ctx(t), gone); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("entry %d not expired from the stream", gone)
		}
		time.Sleep(100 * time.Millisecond)
	}
	sum, err := e.in.Rebuild(ctx(t), oplog.StreamOplog(0), 0, time.Second, nil)
	if err != nil {
		t.Fatalf("rebuild over an expired tail: %v", err)
	}
	if sum.Applied < gone {
		t.Fatalf("rebuild applied up to %d, want at least %d", sum.Applied, gone)
	}
	if got := ids(mustBacklog(t, e.in, oplog.BacklogRequest{User: "hana", Device: "d"})); !equalIDs(got, []uint64{keep}) {
		t.Fatalf("backlog %v, want only %d", got, keep)
	}
}

// TestSoleWriter: an inbox told its process writes every entry waits for
// what was stored before it opened and for every append and ack of its own
// process, without asking the streams how far they go.
func TestSoleWriter(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat)
	before := mustAppend(t, l, syncEvent("chat", "gwen"))[0].Id
	if _, err := oplog.OpenInbox(oplog.InboxConfig{Log: l, Dir: t.TempDir(), SoleWriter: true}); err == nil {
		t.Fatal("SoleWriter without LocalFeed was accepted")
	}
	in, err := oplog.OpenInbox(oplog.InboxConfig{Log: l, Dir: t.TempDir(), LocalFeed: true, SoleWriter: true})
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := contextWithCancel()
	done := make(chan error, 1)
	go func() { done <- in.Run(c) }()
	defer func() {
		cancel()
		<-done
		_ = in.Close()
	}()
	epoch := l.Epoch(0)
	for i := range 200 {
		id := mustAppend(t, l, syncEvent("chat", "gwen"))[0].Id
		// Each read right after an append sees it, and everything before.
		b := mustBacklog(t, in, oplog.BacklogRequest{User: "gwen", Device: "g", Limit: 1000})
		if len(b.Entries) != i+2 || b.Entries[0].Id != before || b.Entries[len(b.Entries)-1].Id != id {
			t.Fatalf("append %d: backlog of %d entries ending at %v, want %d ending at %d", i, len(b.Entries), ids(b)[max(len(b.Entries)-1, 0):], i+2, id)
		}
		if i%50 == 0 {
			if err := in.Ack(ctx(t), "gwen", "h", map[string]oplog.SyncPoint{"chat": {ID: id, Epoch: epoch}}); err != nil {
				t.Fatal(err)
			}
			if sp, err := in.SyncPoints(ctx(t), "h"); err != nil || sp["chat"].ID != id {
				t.Fatalf("sync points right after the ack: %v, %v; want %d", sp, err, id)
			}
		}
	}
}
