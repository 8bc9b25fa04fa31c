package gateway_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
)

func tctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// publishTopic stores one message of a topic and returns its id.
func (e *env) publishTopic(topic, payload string) uint64 {
	e.t.Helper()
	a, err := e.tp.Publish(tctx(e.t), &oplogpb.Event{Kind: oplogpb.Kind_KIND_TOPIC_MESSAGE, Topic: topic, Payload: []byte(payload)})
	if err != nil {
		e.t.Fatalf("publish to %s: %v", topic, err)
	}
	return a.Id
}

func (e *env) createTopic(name string, backfill uint32) {
	e.t.Helper()
	if _, err := e.tp.Create(tctx(e.t), &topicspb.Topic{Name: name, Backfill: backfill}); err != nil {
		e.t.Fatalf("create topic %s: %v", name, err)
	}
}

// topicItems keeps the topic items of a list, as "topic:id".
func topicItems(items []*gatewaypb.Item) []string {
	var out []string
	for _, it := range items {
		if it.Topic != "" {
			out = append(out, fmt.Sprintf("%s:%d", it.Topic, it.Id))
		}
	}
	return out
}

func key(topic string, id uint64) string { return fmt.Sprintf("%s:%d", topic, id) }

// TestTopicsSyncAndLive: a follower gets a topic's messages after its
// follow point in the sync round and live, every device gets Everyone's,
// an unfollow stops delivery, a follow made while online starts a round,
// and cursors in Hello and Ack are honoured.
func TestTopicsSyncAndLive(t *testing.T) {
	e := newEnvWith(t, envOptions{topics: true}, nil)
	e.createTopic("news", 0)
	before := e.publishTopic("news", "before the follow")
	if _, err := e.tp.Follow(tctx(t), "alice", "news"); err != nil {
		t.Fatal(err)
	}
	m1 := e.publishTopic("news", "m1")
	all1 := e.publishTopic(topics.Everyone, "to everyone")

	c := e.dialTCP()
	c.send(hello(e.token("alice", "phone", time.Hour)))
	_, items, _ := c.syncAll()
	if got, want := topicItems(items), []string{key("news", m1), key(topics.Everyone, all1)}; !sameSet(got, want) {
		t.Fatalf("first round topic items %v, want %v (not %d, before the follow)", got, want, before)
	}
	// Live: the followed topic and Everyone.
	m2 := e.publishTopic("news", "m2")
	all2 := e.publishTopic(topics.Everyone, "again")
	if got := topicItems(c.live(2)); !slices.Equal(got, []string{key("news", m2), key(topics.Everyone, all2)}) {
		t.Fatalf("live topic items %v", got)
	}
	// A device without a user gets Everyone only.
	anon := e.dialTCP()
	anon.send(hello(e.token("", "kiosk", time.Hour)))
	_, items, _ = anon.syncAll()
	for _, it := range items {
		if it.Topic != topics.Everyone {
			t.Fatalf("a device without a user got %s:%d", it.Topic, it.Id)
		}
	}
	// Unfollow: nothing of the topic after it. Everyone's next message
	// goes through the same projection after m3, so had m3 been sent it
	// would come first.
	if _, err := e.tp.Unfollow(tctx(t), "alice", "news"); err != nil {
		t.Fatal(err)
	}
	m3 := e.publishTopic("news", "m3")
	all3 := e.publishTopic(topics.Everyone, "after the unfollow")
	for got := []string{}; !slices.Contains(got, key(topics.Everyone, all3)); {
		f := c.must(5 * time.Second)
		var its []*gatewaypb.Item
		if l := f.GetLive(); l != nil {
			its = l.Items
		}
		if s := f.GetSync(); s != nil {
			its = s.Items
		}
		got = topicItems(its)
		if slices.Contains(got, key("news", m3)) {
			t.Fatalf("news:%d delivered after the unfollow", m3)
		}
	}
	// A follow made while online: the round it starts, then live.
	e.createTopic("sport", 1)
	s1 := e.publishTopic("sport", "s1 (backfill)")
	if _, err := e.tp.Follow(tctx(t), "alice", "sport"); err != nil {
		t.Fatal(err)
	}
	s2 := e.publishTopic("sport", "s2")
	got := map[string]bool{}
	for !got[key("sport", s2)] {
		f := c.must(5 * time.Second)
		for _, it := range append(f.GetLive().GetItems(), f.GetSync().GetItems()...) {
			k := key(it.Topic, it.Id)
			if got[k] {
				t.Fatalf("%s delivered twice", k)
			}
			got[k] = true
		}
	}
	if !got[key("sport", s1)] {
		t.Fatalf("the backfill of a follow made online is missing: got %v", got)
	}
	// Ack the cursors; a new link of another device of the user presents
	// its own cursors and gets only what is after them.
	epoch := e.tp.Epoch()
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Ack{Ack: &gatewaypb.Ack{Topics: []*gatewaypb.TopicCursor{
		{Topic: "sport", Id: s2, Epoch: epoch}, {Topic: topics.Everyone, Id: all3, Epoch: epoch}}}}})
	waitFor(t, func() bool {
		cur, err := e.tp.Cursors(context.Background(), "phone")
		return err == nil && cur["sport"].ID == s2 && cur[topics.Everyone].ID == all3
	})
	s3 := e.publishTopic("sport", "s3")
	tab := e.dialTCP()
	h := hello(e.token("alice", "tablet", time.Hour))
	h.GetHello().Topics = []*gatewaypb.TopicCursor{{Topic: "sport", Id: s2, Epoch: epoch}, {Topic: topics.Everyone, Id: all3, Epoch: epoch}}
	tab.send(h)
	_, items, _ = tab.syncAll()
	if got := topicItems(items); !slices.Equal(got, []string{key("sport", s3)}) {
		t.Fatalf("tablet with cursors got %v, want [sport:%d]", got, s3)
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// TestFollowUnfollowRacingWithPublishes: while messages are published
// without pause, the user follows and unfollows a topic again and again;
// the online device gets exactly the messages inside the follow intervals
// (from, until] the follow events recorded: no gap, no extra, no repeat.
func TestFollowUnfollowRacingWithPublishes(t *testing.T) {
	e := newEnvWith(t, envOptions{topics: true}, nil)
	e.createTopic("feed", 0)
	c := e.dialTCP()
	c.send(hello(e.token("bob", "phone", time.Hour)))
	c.syncAll()

	var mu sync.Mutex
	var published []uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			id := e.publishTopic("feed", fmt.Sprint(i))
			mu.Lock()
			published = append(published, id)
			mu.Unlock()
		}
	})
	received := map[uint64]int{}
	var rmu sync.Mutex
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		for {
			f, err := c.read(3 * time.Second)
			if err != nil {
				return
			}
			rmu.Lock()
			for _, it := range append(f.GetLive().GetItems(), f.GetSync().GetItems()...) {
				if it.Topic == "feed" {
					received[it.Id]++
				}
			}
			rmu.Unlock()
		}
	}()
	type interval struct{ from, until uint64 }
	var intervals []interval
	for range 6 {
		f, err := e.tp.Follow(tctx(t), "bob", "feed")
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(30 * time.Millisecond) // let publishes land inside the interval
		u, err := e.tp.Unfollow(tctx(t), "bob", "feed")
		if err != nil {
			t.Fatal(err)
		}
		intervals = append(intervals, interval{f.From, u.Until})
		// Before following again, let the device get what the interval
		// holds (a re-follow replaces the relation; the index keeps the
		// last one).
		waitFor(t, func() bool {
			mu.Lock()
			var want []uint64
			for _, id := range published {
				if id > f.From && id <= u.Until {
					want = append(want, id)
				}
			}
			mu.Unlock()
			rmu.Lock()
			defer rmu.Unlock()
			for _, id := range want {
				if received[id] == 0 {
					return false
				}
			}
			return true
		})
	}
	close(stop)
	wg.Wait()
	<-readerDone
	want := 0
	for _, id := range published {
		in := false
		for _, iv := range intervals {
			in = in || (id > iv.from && id <= iv.until)
		}
		switch n := received[id]; {
		case in && n != 1:
			t.Errorf("message %d inside a follow interval received %d times", id, n)
		case !in && n != 0:
			t.Errorf("message %d outside every follow interval received %d times", id, n)
		}
		if in {
			want++
		}
	}
	if want == 0 {
		t.Fatal("no message fell inside a follow interval: the test proved nothing")
	}
	t.Logf("%d messages published, %d inside %d follow intervals, each received once", len(published), want, len(intervals))
}
