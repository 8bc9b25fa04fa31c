package topics_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

var news = &oplogpb.Business{Code: "news", Dimension: oplogpb.Dimension_DIMENSION_USER}

type env struct {
	nc *nats.Conn
	l  *oplog.Log
	s  *topics.Topics
}

// newEnv runs an embedded NATS server, a Log with the "news" business and
// a Topics with cfg (Log and Dir filled in).
func newEnv(t testing.TB, cfg topics.Config) *env {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{Limits: oplog.Limits{MaxPayload: 1024}}, news)
	cfg.Log = l
	return &env{nc: nc, l: l, s: mustRun(t, cfg)}
}

func ctx(t testing.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

func mustCreate(t testing.TB, s *topics.Topics, name string, backfill uint32) {
	t.Helper()
	if _, err := s.Create(ctx(t), &topicspb.Topic{Name: name, Backfill: backfill}); err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
}

func message(topic, payload string) *oplogpb.Event {
	return &oplogpb.Event{Topic: topic, Business: "news", Payload: []byte(payload)}
}

func mustPublish(t testing.TB, s *topics.Topics, ev *oplogpb.Event) uint64 {
	t.Helper()
	res, err := s.Publish(ctx(t), ev)
	if err != nil {
		t.Fatalf("publish to %s: %v", ev.Topic, err)
	}
	if res.Target != ev.Topic || res.Id == 0 || res.Epoch != s.Epoch() {
		t.Fatalf("publish to %s: got %v", ev.Topic, res)
	}
	return res.Id
}

// publishN publishes n messages to topic and returns their ids.
func publishN(t testing.TB, s *topics.Topics, topic string, n int) []uint64 {
	t.Helper()
	var out []uint64
	for i := range n {
		out = append(out, mustPublish(t, s, message(topic, fmt.Sprint(i))))
	}
	return out
}

func mustFollow(t testing.TB, s *topics.Topics, user, topic string) topics.Follow {
	t.Helper()
	f, err := s.Follow(ctx(t), user, topic)
	if err != nil {
		t.Fatalf("%s follows %s: %v", user, topic, err)
	}
	return f
}

func mustUnfollow(t testing.TB, s *topics.Topics, user, topic string) topics.Follow {
	t.Helper()
	f, err := s.Unfollow(ctx(t), user, topic)
	if err != nil {
		t.Fatalf("%s unfollows %s: %v", user, topic, err)
	}
	return f
}

func mustBacklog(t testing.TB, s *topics.Topics, req topics.BacklogRequest) *topics.Backlog {
	t.Helper()
	b, err := s.Backlog(ctx(t), req)
	if err != nil {
		t.Fatalf("backlog %+v: %v", req, err)
	}
	return b
}

func followers(t testing.TB, s *topics.Topics, topic string) uint64 {
	t.Helper()
	n, err := s.Followers(ctx(t), topic)
	if err != nil {
		t.Fatalf("followers of %s: %v", topic, err)
	}
	return n
}

// ids returns the ids of the entries of topic, in order.
func ids(entries []*oplogpb.Entry, topic string) []uint64 {
	var out []uint64
	for _, e := range entries {
		if e.Topic == topic {
			out = append(out, e.Id)
		}
	}
	return out
}

func streamMsgs(t testing.TB, l *oplog.Log, name string) uint64 {
	t.Helper()
	st, err := l.JetStream().Stream(ctx(t), name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	return st.CachedInfo().State.Msgs
}

func TestTopicMessageIsStoredOnce(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "merchant", 0)
	users := make([]string, 2000)
	for i := range users {
		users[i] = fmt.Sprintf("u%d", i)
	}
	n, err := e.s.FollowMany(ctx(t), "merchant", users)
	if err != nil || n != len(users) {
		t.Fatalf("follow many: %d, %v; want %d", n, err, len(users))
	}
	if got := followers(t, e.s, "merchant"); got != 2000 {
		t.Fatalf("followers %d, want 2000", got)
	}
	want := publishN(t, e.s, "merchant", 10)
	if got := streamMsgs(t, e.l, topics.StreamTopics); got != 10 {
		t.Fatalf("topic stream holds %d messages after 10 publishes to 2,000 followers, want 10", got)
	}
	if got := streamMsgs(t, e.l, oplog.StreamOplog(0)); got != 0 {
		t.Fatalf("oplog stream holds %d messages, want 0", got)
	}
	for _, u := range []string{"u0", "u1999"} {
		b := mustBacklog(t, e.s, topics.BacklogRequest{User: u, Device: u + "-phone"})
		if got := ids(b.Entries, "merchant"); !slices.Equal(got, want) {
			t.Fatalf("%s backlog %v, want %v", u, got, want)
		}
		for _, en := range b.Entries {
			if en.Kind != oplogpb.Kind_KIND_TOPIC_MESSAGE || en.Business != "news" || en.Target != "" || en.Epoch != e.s.Epoch() {
				t.Fatalf("entry %v", en)
			}
		}
	}
	// FollowMany again: everyone follows already, nothing is written.
	if n, err := e.s.FollowMany(ctx(t), "merchant", users[:10]); err != nil || n != 0 {
		t.Fatalf("follow many again: %d, %v; want 0", n, err)
	}
}

func TestFollowIndexAndCounts(t *testing.T) {
	e := newEnv(t, topics.Config{})
	for _, name := range []string{"a", "b", "c"} {
		mustCreate(t, e.s, name, 0)
	}
	publishN(t, e.s, "a", 3)
	fa := mustFollow(t, e.s, "alice", "a")
	if !fa.Following || fa.From != 3 || fa.Epoch != e.s.Epoch() || fa.Until != 0 {
		t.Fatalf("follow %+v, want following from 3", fa)
	}
	if again := mustFollow(t, e.s, "alice", "a"); again != fa {
		t.Fatalf("second follow %+v, want the first %+v", again, fa)
	}
	mustFollow(t, e.s, "alice", "c")
	mustFollow(t, e.s, "bob", "a")
	got, err := e.s.Following(ctx(t), "alice")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Topic != "a" || got[1].Topic != "c" || got[0] != fa {
		t.Fatalf("alice follows %+v", got)
	}
	steps := []struct {
		user, op string
		want     uint64
	}{
		{"bob", "unfollow", 1},
		{"bob", "follow", 2},
		{"alice", "unfollow", 1},
		{"alice", "follow", 2},
		{"alice", "follow", 2},
		{"bob", "unfollow", 1},
		{"alice", "unfollow", 0},
	}
	for i, st := range steps {
		if st.op == "follow" {
			mustFollow(t, e.s, st.user, "a")
		} else {
			mustUnfollow(t, e.s, st.user, "a")
		}
		if got := followers(t, e.s, "a"); got != st.want {
			t.Fatalf("step %d (%s %s): %d followers, want %d", i, st.user, st.op, got, st.want)
		}
	}
	if _, err := e.s.Unfollow(ctx(t), "alice", "a"); !errors.Is(err, oplog.ErrNotFound) {
		t.Fatalf("unfollow twice: %v, want ErrNotFound", err)
	}
	if _, err := e.s.Unfollow(ctx(t), "carol", "b"); !errors.Is(err, oplog.ErrNotFound) {
		t.Fatalf("unfollow never followed: %v, want ErrNotFound", err)
	}
	if got, _ := e.s.Following(ctx(t), "alice"); len(got) != 1 || got[0].Topic != "c" {
		t.Fatalf("alice follows %+v, want c only", got)
	}
	// A deleted topic leaves Following.
	if err := e.s.Delete(ctx(t), "c"); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.s.Following(ctx(t), "alice"); len(got) != 0 {
		t.Fatalf("alice follows %+v after c was deleted", got)
	}

	// Bulk: 50,000 followers.
	users := make([]string, 50_000)
	for i := range users {
		users[i] = fmt.Sprintf("bulk%d", i)
	}
	start := time.Now()
	n, err := e.s.FollowMany(ctx(t), "b", users)
	if err != nil || n != len(users) {
		t.Fatalf("follow many: %d, %v", n, err)
	}
	t.Logf("FollowMany of %d users: %v (%.0f/s)", len(users), time.Since(start), float64(len(users))/time.Since(start).Seconds())
	if got := followers(t, e.s, "b"); got != 50_000 {
		t.Fatalf("followers of b %d, want 50000", got)
	}
	if got, _ := e.s.Following(ctx(t), "bulk49999"); len(got) != 1 || got[0].Topic != "b" {
		t.Fatalf("bulk49999 follows %+v", got)
	}
	mustUnfollow(t, e.s, "bulk7", "b")
	if got := followers(t, e.s, "b"); got != 49_999 {
		t.Fatalf("followers of b %d after an unfollow, want 49999", got)
	}
}

func TestFollowPoint(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "plain", 0)
	mustCreate(t, e.s, "backfilled", 3)
	publishN(t, e.s, "plain", 5)
	old := publishN(t, e.s, "backfilled", 10)
	mustFollow(t, e.s, "alice", "plain")
	f := mustFollow(t, e.s, "alice", "backfilled")
	if f.From != old[7]-1 {
		t.Fatalf("backfill follow from %d, want %d (before the 3rd-last)", f.From, old[7]-1)
	}
	b := mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "phone"})
	if len(ids(b.Entries, "plain")) != 0 {
		t.Fatalf("new follower got old messages of plain: %v", ids(b.Entries, "plain"))
	}
	if got := ids(b.Entries, "backfilled"); !slices.Equal(got, old[7:]) {
		t.Fatalf("backfilled backlog %v, want the last 3 %v", got, old[7:])
	}
	newer := publishN(t, e.s, "plain", 2)
	b = mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "phone"})
	if got := ids(b.Entries, "plain"); !slices.Equal(got, newer) {
		t.Fatalf("plain backlog %v, want %v", got, newer)
	}
	// Fewer messages than the backfill: all of them.
	mustCreate(t, e.s, "young", 100)
	few := publishN(t, e.s, "young", 2)
	mustFollow(t, e.s, "bob", "young")
	b = mustBacklog(t, e.s, topics.BacklogRequest{User: "bob", Device: "tab"})
	if got := ids(b.Entries, "young"); !slices.Equal(got, few) {
		t.Fatalf("young backlog %v, want %v", got, few)
	}
}

func TestBacklog(t *testing.T) {
	e := newEnv(t, topics.Config{EveryoneBackfill: 2})
	epoch := e.s.Epoch()
	for _, name := range []string{"a", "b"} {
		mustCreate(t, e.s, name, 0)
		mustFollow(t, e.s, "alice", name)
	}
	everyone := publishN(t, e.s, topics.Everyone, 3)
	a := publishN(t, e.s, "a", 4)
	bb := publishN(t, e.s, "b", 4)

	t.Run("merge", func(t *testing.T) {
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "phone"})
		if !slices.Equal(ids(got.Entries, topics.Everyone), everyone[1:]) {
			t.Fatalf("everyone %v, want the last 2 %v", ids(got.Entries, topics.Everyone), everyone[1:])
		}
		if !slices.Equal(ids(got.Entries, "a"), a) || !slices.Equal(ids(got.Entries, "b"), bb) || got.More {
			t.Fatalf("backlog a %v b %v more %v", ids(got.Entries, "a"), ids(got.Entries, "b"), got.More)
		}
		if got.Entries[0].Topic != topics.Everyone {
			t.Fatalf("first entry of %s, want Everyone first", got.Entries[0].Topic)
		}
		if got.Reads != 4 {
			t.Fatalf("%d reads, want 4 (index, everyone, a, b)", got.Reads)
		}
	})
	t.Run("cursors", func(t *testing.T) {
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "phone", Cursors: map[string]topics.Cursor{
			"a": {ID: a[1], Epoch: epoch}, "b": {ID: bb[3], Epoch: epoch}, topics.Everyone: {ID: everyone[2], Epoch: epoch},
		}})
		if !slices.Equal(ids(got.Entries, "a"), a[2:]) || len(got.Entries) != 2 {
			t.Fatalf("entries %v, want a %v only", got.Entries, a[2:])
		}
		// b and Everyone have nothing after their cursors: not even read.
		if got.Reads != 2 {
			t.Fatalf("%d reads, want 2 (index, a)", got.Reads)
		}
	})
	t.Run("epoch reset", func(t *testing.T) {
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "phone", Cursors: map[string]topics.Cursor{
			"a": {ID: a[3], Epoch: epoch - 1}, "b": {ID: bb[3], Epoch: epoch},
		}})
		if !slices.Equal(got.Reset, []string{"a"}) || !slices.Equal(ids(got.Entries, "a"), a) {
			t.Fatalf("reset %v, a %v; want [a] and every message of a", got.Reset, ids(got.Entries, "a"))
		}
	})
	t.Run("limit", func(t *testing.T) {
		var all []uint64
		cursors := map[string]topics.Cursor{}
		for round := 0; ; round++ {
			got := mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "pager", Cursors: cursors, Limit: 3})
			for _, en := range got.Entries {
				all = append(all, en.Id)
				cursors[en.Topic] = topics.Cursor{ID: en.Id, Epoch: en.Epoch}
			}
			if !got.More {
				break
			}
			if len(got.Entries) != 3 || round > 5 {
				t.Fatalf("round %d: %d entries with More", round, len(got.Entries))
			}
		}
		want := append(append(slices.Clone(everyone[1:]), a...), bb...)
		if !slices.Equal(all, want) {
			t.Fatalf("paged %v, want %v", all, want)
		}
	})
	t.Run("recorded cursor", func(t *testing.T) {
		if err := e.s.Ack(ctx(t), "desk", map[string]topics.Cursor{"a": {ID: a[2], Epoch: epoch}, "b": {ID: bb[0], Epoch: epoch}}); err != nil {
			t.Fatal(err)
		}
		// Acks only move forward.
		if err := e.s.Ack(ctx(t), "desk", map[string]topics.Cursor{"a": {ID: a[0], Epoch: epoch}}); err != nil {
			t.Fatal(err)
		}
		cs, err := e.s.Cursors(ctx(t), "desk")
		if err != nil || cs["a"] != (topics.Cursor{ID: a[2], Epoch: epoch}) {
			t.Fatalf("cursors %v, %v", cs, err)
		}
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "alice", Device: "desk", Cursors: map[string]topics.Cursor{"b": {ID: bb[2], Epoch: epoch}}})
		if !slices.Equal(ids(got.Entries, "a"), a[3:]) || !slices.Equal(ids(got.Entries, "b"), bb[3:]) {
			t.Fatalf("a %v b %v", ids(got.Entries, "a"), ids(got.Entries, "b"))
		}
		if err := e.s.Ack(ctx(t), "desk", map[string]topics.Cursor{"a": {ID: a[3], Epoch: epoch + 1}}); !errors.Is(err, oplog.ErrEpochMismatch) {
			t.Fatalf("ack of another epoch: %v", err)
		}
	})
	t.Run("conditions and expiry", func(t *testing.T) {
		mustCreate(t, e.s, "cond", 0)
		mustFollow(t, e.s, "bob", "cond")
		ios := message("cond", "ios only")
		ios.Conditions = &oplogpb.Conditions{Os: []string{"ios"}}
		iosID := mustPublish(t, e.s, ios)
		short := message("cond", "short-lived")
		expiry := time.Now().Add(2 * time.Second)
		short.ExpiresAt = timestamppb.New(expiry)
		shortID := mustPublish(t, e.s, short)
		plain := mustPublish(t, e.s, message("cond", "plain"))
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "bob", Device: "droid", Attrs: oplog.Attrs{OS: "android"}})
		got2 := mustBacklog(t, e.s, topics.BacklogRequest{User: "bob", Device: "iphone", Attrs: oplog.Attrs{OS: "ios"}})
		if time.Now().Before(expiry) { // a very slow machine may get here too late
			if ids := ids(got.Entries, "cond"); !slices.Equal(ids, []uint64{shortID, plain}) {
				t.Fatalf("android before expiry: %v, want %v", ids, []uint64{shortID, plain})
			}
			if ids := ids(got2.Entries, "cond"); !slices.Equal(ids, []uint64{iosID, shortID, plain}) {
				t.Fatalf("ios before expiry: %v", ids)
			}
		}
		time.Sleep(time.Until(expiry) + 100*time.Millisecond) // let the short-lived message expire
		got = mustBacklog(t, e.s, topics.BacklogRequest{User: "bob", Device: "iphone", Attrs: oplog.Attrs{OS: "ios"}})
		if ids := ids(got.Entries, "cond"); !slices.Equal(ids, []uint64{iosID, plain}) {
			t.Fatalf("ios after expiry: %v, want %v", ids, []uint64{iosID, plain})
		}
	})
	t.Run("unfollowed", func(t *testing.T) {
		mustCreate(t, e.s, "gone", 0)
		mustFollow(t, e.s, "carol", "gone")
		before := publishN(t, e.s, "gone", 3)
		if err := e.s.Ack(ctx(t), "old", map[string]topics.Cursor{"gone": {ID: before[0], Epoch: epoch}}); err != nil {
			t.Fatal(err)
		}
		f := mustUnfollow(t, e.s, "carol", "gone")
		if f.Following || f.Until != before[2] {
			t.Fatalf("unfollow %+v, want until %d", f, before[2])
		}
		after := publishN(t, e.s, "gone", 2)
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "carol", Device: "old"})
		if !slices.Equal(ids(got.Entries, "gone"), before[1:]) {
			t.Fatalf("device with a cursor got %v, want %v (up to until)", ids(got.Entries, "gone"), before[1:])
		}
		got = mustBacklog(t, e.s, topics.BacklogRequest{User: "carol", Device: "new"})
		if len(ids(got.Entries, "gone")) != 0 {
			t.Fatalf("new device got %v of an unfollowed topic", ids(got.Entries, "gone"))
		}
		got = mustBacklog(t, e.s, topics.BacklogRequest{User: "carol", Device: "new", Cursors: map[string]topics.Cursor{"gone": {ID: before[2], Epoch: epoch}}})
		if len(ids(got.Entries, "gone")) != 0 {
			t.Fatalf("device at until got %v", ids(got.Entries, "gone"))
		}
		// Following again starts afresh after the last message.
		f = mustFollow(t, e.s, "carol", "gone")
		if f.From != after[1] {
			t.Fatalf("refollow from %d, want %d", f.From, after[1])
		}
	})
	t.Run("everyone", func(t *testing.T) {
		// A device without a user gets Everyone only, from its backfill.
		got := mustBacklog(t, e.s, topics.BacklogRequest{Device: "kiosk"})
		if !slices.Equal(ids(got.Entries, topics.Everyone), everyone[1:]) || len(got.Entries) != 2 || got.Reads != 1 {
			t.Fatalf("kiosk: %v, %d reads", got.Entries, got.Reads)
		}
		next := mustPublish(t, e.s, message(topics.Everyone, "to all"))
		got = mustBacklog(t, e.s, topics.BacklogRequest{Device: "kiosk", Cursors: map[string]topics.Cursor{topics.Everyone: {ID: everyone[2], Epoch: epoch}}})
		if !slices.Equal(ids(got.Entries, topics.Everyone), []uint64{next}) {
			t.Fatalf("kiosk with a cursor: %v", ids(got.Entries, topics.Everyone))
		}
	})
	t.Run("deleted", func(t *testing.T) {
		mustCreate(t, e.s, "doomed", 0)
		mustFollow(t, e.s, "dave", "doomed")
		publishN(t, e.s, "doomed", 2)
		if err := e.s.Delete(ctx(t), "doomed"); err != nil {
			t.Fatal(err)
		}
		got := mustBacklog(t, e.s, topics.BacklogRequest{User: "dave", Device: "d"})
		if len(ids(got.Entries, "doomed")) != 0 {
			t.Fatalf("deleted topic in the backlog: %v", ids(got.Entries, "doomed"))
		}
	})
}

func TestBadInput(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "t", 0)
	mustCreate(t, e.s, "dead", 0)
	if err := e.s.Delete(ctx(t), "dead"); err != nil {
		t.Fatal(err)
	}
	before := e.s.Applied()
	past := timestamppb.New(time.Now().Add(-time.Minute))
	publishes := []struct {
		name string
		ev   *oplogpb.Event
		want error
	}{
		{"nil", nil, oplog.ErrMalformed},
		{"unknown topic", message("ghost", "x"), oplog.ErrUnknownTopic},
		{"deleted topic", message("dead", "x"), oplog.ErrUnknownTopic},
		{"bad topic", message("a.b", "x"), oplog.ErrInvalidID},
		{"no topic", message("", "x"), oplog.ErrInvalidID},
		{"targets", &oplogpb.Event{Topic: "t", Targets: []string{"alice"}}, oplog.ErrInvalid},
		{"kind", &oplogpb.Event{Topic: "t", Kind: oplogpb.Kind_KIND_FOLLOW}, oplog.ErrUnknownKind},
		{"unknown business", &oplogpb.Event{Topic: "t", Business: "ghost"}, oplog.ErrUnknownBusiness},
		{"bad business", &oplogpb.Event{Topic: "t", Business: "Bad!"}, oplog.ErrInvalidID},
		{"payload", &oplogpb.Event{Topic: "t", Payload: make([]byte, 1025)}, oplog.ErrPayloadTooLarge},
		{"expired", &oplogpb.Event{Topic: "t", ExpiresAt: past}, oplog.ErrExpired},
		{"message id", &oplogpb.Event{Topic: "t", MessageId: "has space"}, oplog.ErrInvalidID},
		{"transient", &oplogpb.Event{Topic: "t", Transient: true}, oplog.ErrInvalid},
		{"dimension", &oplogpb.Event{Topic: "t", Dimension: oplogpb.Dimension_DIMENSION_USER}, oplog.ErrInvalid},
		{"conditions", &oplogpb.Event{Topic: "t", Conditions: &oplogpb.Conditions{AppVersionMin: "1 2"}}, oplog.ErrInvalid},
	}
	for _, c := range publishes {
		if _, err := e.s.Publish(ctx(t), c.ev); !errors.Is(err, c.want) {
			t.Errorf("publish %s: %v, want %v", c.name, err, c.want)
		}
	}
	creates := []struct {
		name string
		def  *topicspb.Topic
		want error
	}{
		{"reserved", &topicspb.Topic{Name: "_mine"}, oplog.ErrInvalidID},
		{"everyone", &topicspb.Topic{Name: topics.Everyone}, oplog.ErrInvalidID},
		{"bad name", &topicspb.Topic{Name: "a b"}, oplog.ErrInvalidID},
		{"long name", &topicspb.Topic{Name: string(make([]byte, 65))}, oplog.ErrInvalidID},
		{"backfill", &topicspb.Topic{Name: "big", Backfill: topics.MaxBackfill + 1}, oplog.ErrInvalid},
		{"reused name", &topicspb.Topic{Name: "dead"}, oplog.ErrInvalid},
	}
	for _, c := range creates {
		if _, err := e.s.Create(ctx(t), c.def); !errors.Is(err, c.want) {
			t.Errorf("create %s: %v, want %v", c.name, err, c.want)
		}
	}
	for _, c := range []struct {
		name        string
		user, topic string
		want        error
	}{
		{"bad user", "a/b", "t", oplog.ErrInvalidID},
		{"bad topic", "alice", "t.x", oplog.ErrInvalidID},
		{"unknown topic", "alice", "ghost", oplog.ErrUnknownTopic},
		{"deleted topic", "alice", "dead", oplog.ErrUnknownTopic},
		{"everyone", "alice", topics.Everyone, oplog.ErrInvalid},
	} {
		if _, err := e.s.Follow(ctx(t), c.user, c.topic); !errors.Is(err, c.want) {
			t.Errorf("follow %s: %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := e.s.FollowMany(ctx(t), "t", []string{"ok", "not ok"}); !errors.Is(err, oplog.ErrInvalidID) {
		t.Errorf("follow many with a bad id: %v", err)
	}
	for name, err := range map[string]error{
		"delete reserved": e.s.Delete(ctx(t), topics.Everyone),
		"delete unknown":  e.s.Delete(ctx(t), "ghost"),
		"delete twice":    e.s.Delete(ctx(t), "dead"),
		"ack bad device":  e.s.Ack(ctx(t), "", nil),
		"ack bad topic":   e.s.Ack(ctx(t), "d", map[string]topics.Cursor{"a b": {ID: 1, Epoch: e.s.Epoch()}}),
	} {
		if err == nil {
			t.Errorf("%s accepted", name)
		}
	}
	if _, err := e.s.Backlog(ctx(t), topics.BacklogRequest{Device: "bad device"}); !errors.Is(err, oplog.ErrInvalidID) {
		t.Errorf("backlog of a bad device: %v", err)
	}
	if _, err := e.s.Followers(ctx(t), "ghost"); !errors.Is(err, oplog.ErrUnknownTopic) {
		t.Errorf("followers of an unknown topic: %v", err)
	}
	if _, err := e.s.Watch("a b", func(*oplogpb.Entry) {}); !errors.Is(err, oplog.ErrInvalidID) {
		t.Errorf("watch of a bad topic: %v", err)
	}
	// Nothing was written by any refusal.
	if err := e.s.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if after := e.s.Applied(); !mapsEqual(after, before) {
		t.Fatalf("streams moved from %v to %v", before, after)
	}
	if got := streamMsgs(t, e.l, topics.StreamTopics); got != 0 {
		t.Fatalf("topic stream holds %d messages", got)
	}
}

func mapsEqual(a, b map[string]uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestPublishDuplicate(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "t", 0)
	mustCreate(t, e.s, "u", 0)
	ev := message("t", "once")
	ev.MessageId = "m-1"
	first, err := e.s.Publish(ctx(t), ev)
	if err != nil {
		t.Fatal(err)
	}
	again, err := e.s.Publish(ctx(t), ev)
	if err != nil || again.Id != first.Id || !again.Duplicate {
		t.Fatalf("retry %v, %v; want id %d marked duplicate", again, err, first.Id)
	}
	// The same message id on another topic is another message.
	other := message("u", "once")
	other.MessageId = "m-1"
	if res, err := e.s.Publish(ctx(t), other); err != nil || res.Duplicate || res.Id == first.Id {
		t.Fatalf("same id on another topic: %v, %v", res, err)
	}
}

// collector gathers what watches deliver.
type collector[T any] struct {
	mu   sync.Mutex
	got  []T
	more chan struct{}
}

func newCollector[T any]() *collector[T] { return &collector[T]{more: make(chan struct{}, 1)} }

func (c *collector[T]) add(v T) {
	c.mu.Lock()
	c.got = append(c.got, v)
	c.mu.Unlock()
	select {
	case c.more <- struct{}{}:
	default:
	}
}

func (c *collector[T]) snapshot() []T {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.got)
}

// waitFor waits until ok holds for what was delivered, and returns it.
func (c *collector[T]) waitFor(t testing.TB, what string, ok func([]T) bool) []T {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		got := c.snapshot()
		if ok(got) {
			return got
		}
		select {
		case <-c.more:
		case <-deadline:
			t.Fatalf("waiting for %s: got %d items", what, len(got))
		}
	}
}

func TestWatch(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "live", 0)
	mustCreate(t, e.s, "other", 0)
	msgs := newCollector[*oplogpb.Entry]()
	w, err := e.s.Watch("live", msgs.add)
	if err != nil {
		t.Fatal(err)
	}
	follows := newCollector[topics.Follow]()
	fw, err := e.s.WatchFollows("alice", follows.add)
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Stop()
	var want []uint64
	for i := range 50 {
		want = append(want, mustPublish(t, e.s, message("live", fmt.Sprint(i))))
		mustPublish(t, e.s, message("other", "not watched"))
	}
	got := msgs.waitFor(t, "50 live messages", func(es []*oplogpb.Entry) bool { return len(es) >= 50 })
	for i, en := range got {
		if en.Id != want[i] || en.Topic != "live" || en.Epoch != e.s.Epoch() || string(en.Payload) != fmt.Sprint(i) {
			t.Fatalf("delivery %d: %v, want id %d", i, en, want[i])
		}
	}
	// Follow events of alice, in order, with their bounds.
	f1 := mustFollow(t, e.s, "alice", "live")
	mustFollow(t, e.s, "bob", "live") // not alice's
	newest := mustPublish(t, e.s, message("other", "while following"))
	u1 := mustUnfollow(t, e.s, "alice", "live")
	f2 := mustFollow(t, e.s, "alice", "other")
	fs := follows.waitFor(t, "3 follow events", func(fs []topics.Follow) bool { return len(fs) >= 3 })
	if len(fs) != 3 || !eqFollow(fs[0], f1) || !eqFollow(fs[1], u1) || !eqFollow(fs[2], f2) {
		t.Fatalf("follow events %+v, want %+v %+v %+v", fs, f1, u1, f2)
	}
	if fs[1].Following || fs[1].Until != newest || !fs[1].Covers(newest) || fs[1].Covers(newest+1) || fs[1].Covers(fs[1].From) {
		t.Fatalf("unfollow %+v: want until %d", fs[1], newest)
	}
	// Rebuilds deliver nothing again.
	for _, name := range e.s.Projections() {
		if _, err := e.s.Rebuild(ctx(t), name, 0, time.Second, nil); err != nil {
			t.Fatal(err)
		}
	}
	last := mustPublish(t, e.s, message("live", "after rebuild"))
	got = msgs.waitFor(t, "the message after the rebuild", func(es []*oplogpb.Entry) bool { return len(es) >= 51 })
	if len(got) != 51 || got[50].Id != last {
		t.Fatalf("after rebuild: %d deliveries, last %d; want 51, last %d", len(got), got[len(got)-1].Id, last)
	}
	if fs := follows.snapshot(); len(fs) != 3 {
		t.Fatalf("follow events after rebuild: %d, want 3", len(fs))
	}
	// Stop ends delivery.
	w.Stop()
	w.Stop()
	mustPublish(t, e.s, message("live", "unwatched"))
	fence := newCollector[*oplogpb.Entry]()
	fw2, _ := e.s.Watch("live", fence.add)
	defer fw2.Stop()
	fenceID := mustPublish(t, e.s, message("live", "fence"))
	fence.waitFor(t, "the fence", func(es []*oplogpb.Entry) bool { return len(es) > 0 && es[len(es)-1].Id == fenceID })
	if n := len(msgs.snapshot()); n != 51 {
		t.Fatalf("stopped watch got %d deliveries, want 51", n)
	}
}

func eqFollow(a, b topics.Follow) bool {
	return a.User == b.User && a.Topic == b.Topic && a.From == b.From && a.Until == b.Until &&
		a.Epoch == b.Epoch && a.Following == b.Following && a.At.Equal(b.At)
}

// TestFollowRacingPublishes: while several goroutines publish to a topic, a
// user follows and unfollows it repeatedly. For each follow period, a
// device that reads the backlog from the follow state and takes live
// messages filtered by the follow (as a gateway does) gets exactly the
// messages in (from, until]: no gap, no extra.
func TestFollowRacingPublishes(t *testing.T) {
	for _, sole := range []bool{false, true} {
		t.Run(fmt.Sprintf("sole writer %v", sole), func(t *testing.T) {
			e := newEnv(t, topics.Config{SoleWriter: sole})
			mustCreate(t, e.s, "hot", 0)
			live := newCollector[*oplogpb.Entry]()
			w, err := e.s.Watch("hot", live.add)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Stop()
			events := newCollector[topics.Follow]()
			fw, err := e.s.WatchFollows("racer", events.add)
			if err != nil {
				t.Fatal(err)
			}
			defer fw.Stop()

			var mu sync.Mutex
			var published []uint64
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for g := range 4 {
				wg.Go(func() {
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						default:
						}
						id := mustPublish(t, e.s, message("hot", fmt.Sprintf("%d-%d", g, i)))
						mu.Lock()
						published = append(published, id)
						mu.Unlock()
					}
				})
			}
			type period struct {
				f       topics.Follow
				backlog []uint64
			}
			var periods []period
			for range 8 {
				f := mustFollow(t, e.s, "racer", "hot")
				// The device reads its backlog while following (new device).
				b := mustBacklog(t, e.s, topics.BacklogRequest{User: "racer", Device: fmt.Sprintf("dev%d", len(periods))})
				time.Sleep(5 * time.Millisecond)
				u := mustUnfollow(t, e.s, "racer", "hot")
				if u.From != f.From || u.Until < u.From {
					t.Fatalf("unfollow %+v after follow %+v", u, f)
				}
				// And again after the unfollow, from where the first read ended.
				cursor := f.From
				if got := ids(b.Entries, "hot"); len(got) > 0 {
					cursor = got[len(got)-1]
				}
				b2 := mustBacklog(t, e.s, topics.BacklogRequest{User: "racer", Device: fmt.Sprintf("dev%d", len(periods)),
					Cursors: map[string]topics.Cursor{"hot": {ID: cursor, Epoch: e.s.Epoch()}}})
				periods = append(periods, period{u, append(ids(b.Entries, "hot"), ids(b2.Entries, "hot")...)})
			}
			close(stop)
			wg.Wait()
			mu.Lock()
			slices.Sort(published)
			mu.Unlock()
			last := published[len(published)-1]
			all := live.waitFor(t, "every message live", func(es []*oplogpb.Entry) bool { return len(es) > 0 && es[len(es)-1].Id >= last })
			if len(all) != len(published) {
				t.Fatalf("watch delivered %d messages, %d were published", len(all), len(published))
			}
			for i, en := range all {
				if en.Id != published[i] {
					t.Fatalf("watch delivery %d: id %d, want %d", i, en.Id, published[i])
				}
			}
			evs := events.waitFor(t, "16 follow events", func(fs []topics.Follow) bool { return len(fs) >= 16 })
			if len(evs) != 16 {
				t.Fatalf("%d follow events, want 16", len(evs))
			}
			for i, p := range periods {
				// What the store says the period owes.
				var want []uint64
				for _, id := range published {
					if p.f.Covers(id) {
						want = append(want, id)
					}
				}
				// Backlog: exactly that, in order.
				if !slices.Equal(p.backlog, want) {
					t.Fatalf("period %d %+v: backlog %v, want %v", i, p.f, p.backlog, want)
				}
				// Live, filtered by the follow as the gateway learns it from
				// WatchFollows: the same set, and every message of the
				// period is in the topic stream between the two events.
				if ev := evs[2*i]; ev.From != p.f.From || !ev.Following {
					t.Fatalf("follow event %d: %+v, want from %d", i, ev, p.f.From)
				}
				if ev := evs[2*i+1]; ev.Until != p.f.Until || ev.Following {
					t.Fatalf("unfollow event %d: %+v, want until %d", i, ev, p.f.Until)
				}
				var got []uint64
				for _, en := range all {
					if evs[2*i+1].Covers(en.Id) {
						got = append(got, en.Id)
					}
				}
				if !slices.Equal(got, want) {
					t.Fatalf("period %d: live %v, want %v", i, got, want)
				}
			}
		})
	}
}

func TestRebuildIsDeterministic(t *testing.T) {
	e := newEnv(t, topics.Config{})
	epoch := e.s.Epoch()
	for i := range 4 {
		mustCreate(t, e.s, fmt.Sprintf("t%d", i), uint32(i))
	}
	for i := range 200 {
		topic := fmt.Sprintf("t%d", i%4)
		user := fmt.Sprintf("u%d", i%13)
		id := mustPublish(t, e.s, message(topic, fmt.Sprint(i)))
		switch i % 5 {
		case 0:
			mustFollow(t, e.s, user, topic)
		case 1:
			// follow → unfollow → follow: counts survive replay.
			mustFollow(t, e.s, user, topic)
			mustUnfollow(t, e.s, user, topic)
			if i%3 == 0 {
				mustFollow(t, e.s, user, topic)
			}
		case 2:
			if err := e.s.Ack(ctx(t), "dev"+user, map[string]topics.Cursor{topic: {ID: id, Epoch: epoch}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	ttl := message("t0", "expiring")
	ttl.ExpiresAt = timestamppb.New(time.Now().Add(time.Hour))
	mustPublish(t, e.s, ttl)
	if _, err := e.s.Create(ctx(t), &topicspb.Topic{Name: "t1", Backfill: 9, Description: "redefined"}); err != nil {
		t.Fatal(err)
	}
	if err := e.s.Delete(ctx(t), "t3"); err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for i := range 3 {
		counts[fmt.Sprintf("t%d", i)] = followers(t, e.s, fmt.Sprintf("t%d", i))
	}
	if err := e.s.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	for _, name := range e.s.Projections() {
		live, err := e.s.Digest(ctx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		for _, from := range []uint64{0, 0, 50} {
			sum, err := e.s.Rebuild(ctx(t), name, from, time.Millisecond, nil)
			if err != nil {
				t.Fatalf("rebuild %s from %d: %v", name, from, err)
			}
			if sum.Digest != live {
				t.Fatalf("%s rebuilt from %d: digest %s, live projection had %s", name, from, sum.Digest, live)
			}
		}
	}
	for topic, n := range counts {
		if got := followers(t, e.s, topic); got != n {
			t.Fatalf("%s: %d followers after rebuilds, %d before", topic, got, n)
		}
	}
	// The digest is not blind.
	before, _ := e.s.Digest(ctx(t), topics.StreamFollows)
	mustFollow(t, e.s, "newcomer", "t0")
	if after, _ := e.s.Digest(ctx(t), topics.StreamFollows); after == before {
		t.Fatal("follows digest did not change after a follow")
	}
}

// TestRestart: a reopened store resumes where it stopped, keeps its index
// and counts, and equals a rebuild.
func TestRestart(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, news)
	dir := t.TempDir()
	s, err := topics.Open(ctx(t), topics.Config{Log: l, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	c, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(c) }()
	mustCreate(t, s, "t", 0)
	mustFollow(t, s, "alice", "t")
	first := publishN(t, s, "t", 5)
	if err := s.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := mustRun(t, topics.Config{Log: l, Dir: dir})
	if got := s2.Applied()[topics.StreamTopics]; got != first[4] {
		t.Fatalf("reopened at %d, want %d", got, first[4])
	}
	more := publishN(t, s2, "t", 2)
	b := mustBacklog(t, s2, topics.BacklogRequest{User: "alice", Device: "phone"})
	if got := ids(b.Entries, "t"); !slices.Equal(got, append(first, more...)) {
		t.Fatalf("backlog after restart %v", got)
	}
	if n := followers(t, s2, "t"); n != 1 {
		t.Fatalf("%d followers after restart", n)
	}
	for _, name := range s2.Projections() {
		resumed, _ := s2.Digest(ctx(t), name)
		sum, err := s2.Rebuild(ctx(t), name, 0, time.Second, nil)
		if err != nil || sum.Digest != resumed {
			t.Fatalf("%s: resumed digest %s, rebuilt %v (%v)", name, resumed, sum, err)
		}
	}
}

func TestEveryoneDefinition(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	s := mustRun(t, topics.Config{Log: l})
	def, err := s.Topic(ctx(t), topics.Everyone)
	if err != nil || def.Backfill != topics.DefaultEveryoneBackfill {
		t.Fatalf("everyone: %v, %v", def, err)
	}
	// A second node with another setting updates it; a third with the
	// same one writes nothing.
	s2 := mustRun(t, topics.Config{Log: l, EveryoneBackfill: 7})
	if def, err := s2.Topic(ctx(t), topics.Everyone); err != nil || def.Backfill != 7 {
		t.Fatalf("everyone after a new setting: %v, %v", def, err)
	}
	before := streamMsgs(t, l, topics.StreamFollows)
	mustRun(t, topics.Config{Log: l, EveryoneBackfill: 7})
	if after := streamMsgs(t, l, topics.StreamFollows); after != before {
		t.Fatalf("follows stream grew from %d to %d", before, after)
	}
	all, err := s2.Topics(ctx(t))
	if err != nil || len(all) != 1 || all[0].Name != topics.Everyone {
		t.Fatalf("topics %v, %v", all, err)
	}
}

// TestWatchChurn: watches start and stop while messages flow (as
// sessions of a gateway do); each gets its messages once, in strictly
// increasing id order. (TestWatch checks that Stop ends delivery.)
func TestWatchChurn(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "busy", 0)
	stop := make(chan struct{})
	var pub sync.WaitGroup
	pub.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				mustPublish(t, e.s, message("busy", "x"))
			}
		}
	})
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 200 {
				var mu sync.Mutex
				var last uint64
				w, err := e.s.Watch("busy", func(en *oplogpb.Entry) {
					mu.Lock()
					defer mu.Unlock()
					if en.Id <= last {
						t.Errorf("watcher %d/%d got %d after %d", g, i, en.Id, last)
					}
					last = en.Id
				})
				if err != nil {
					t.Error(err)
					return
				}
				if i%3 == 0 {
					time.Sleep(time.Millisecond)
				}
				w.Stop()
			}
		})
	}
	wg.Wait()
	close(stop)
	pub.Wait()
}

// TestWatchAllFollowsWants: a WatchAllFollows watcher gets the relations
// of the users it wants, in order, and nothing of the others (they are
// not even decoded for it).
func TestWatchAllFollowsWants(t *testing.T) {
	e := newEnv(t, topics.Config{})
	mustCreate(t, e.s, "live", 0)
	var mu sync.Mutex
	asked := map[string]int{}
	wants := func(user string) bool {
		mu.Lock()
		asked[user]++
		mu.Unlock()
		return user == "alice"
	}
	if _, err := e.s.WatchAllFollows(nil, func(topics.Follow) {}); err == nil {
		t.Fatal("WatchAllFollows without wants: no error")
	}
	follows := newCollector[topics.Follow]()
	fw, err := e.s.WatchAllFollows(wants, follows.add)
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Stop()
	mustFollow(t, e.s, "bob", "live")
	f1 := mustFollow(t, e.s, "alice", "live")
	mustFollow(t, e.s, "carol", "live")
	f2 := mustUnfollow(t, e.s, "alice", "live")
	fs := follows.waitFor(t, "alice's 2 events", func(fs []topics.Follow) bool { return len(fs) >= 2 })
	if len(fs) != 2 || !eqFollow(fs[0], f1) || !eqFollow(fs[1], f2) {
		t.Fatalf("events %+v, want %+v %+v", fs, f1, f2)
	}
	mu.Lock()
	defer mu.Unlock()
	if asked["bob"] != 1 || asked["carol"] != 1 || asked["alice"] != 2 {
		t.Fatalf("wants asked %v, want bob and carol once, alice twice", asked)
	}
}
