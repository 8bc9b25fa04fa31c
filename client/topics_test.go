package client_test

import (
	"context"
	"maps"
	"testing"
	"time"

	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
)

// publish stores one message of a topic (for business biz, if not empty)
// and returns its id.
func (e *env) publish(topic, biz string) uint64 {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := e.tp.Publish(ctx, &oplogpb.Event{Kind: oplogpb.Kind_KIND_TOPIC_MESSAGE, Topic: topic, Business: biz, Payload: []byte(topic)})
	if err != nil {
		e.t.Fatalf("publish to %s: %v", topic, err)
	}
	return a.Id
}

// serverCursors returns the topic cursors the server recorded for device.
func (e *env) serverCursors(device string) map[string]topics.Cursor {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := e.tp.Cursors(ctx, device)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// TestTopics: a client follows topics through its user. It gets their
// messages and Everyone's in the sync round and then live, routed by
// topic, then business, then to the default handler; it persists and acks
// the topic cursors; after a restart it presents them and gets only what
// is new; and it keeps them when another user signs in on the device.
func TestTopics(t *testing.T) {
	noLeaks(t)
	e := newEnv(t).withTopics()
	n := e.node(nil)
	ctx := context.Background()
	for _, name := range []string{"news", "sport"} {
		if _, err := e.tp.Create(ctx, &topicspb.Topic{Name: name}); err != nil {
			t.Fatal(err)
		}
		if _, err := e.tp.Follow(ctx, "tia", name); err != nil {
			t.Fatal(err)
		}
	}
	n1, s1, a1 := e.publish("news", ""), e.publish("sport", "chat"), e.publish(topics.Everyone, "")

	dir := t.TempDir()
	cfg := client.Config{URL: n.tcp, Token: tokens(e.token("tia", "tphone")), StateDir: dir}
	handlers := func(news, chat, rest *recorder) func(*client.Client) {
		return func(c *client.Client) {
			c.HandleTopic("news", news.handle)
			c.Handle("chat", chat.handle) // sport's messages name chat
			c.HandleDefault(rest.handle)
		}
	}
	news, chat, rest := newRecorder(), newRecorder(), newRecorder()
	r := start(t, cfg, handlers(news, chat, rest))
	news.waitIDs(t, "#news", n1)
	chat.waitIDs(t, "#sport", s1)
	rest.waitIDs(t, "#"+topics.Everyone, a1)
	waitFor(t, "first round", func() bool { return r.Stats().Rounds >= 1 })

	// Live, the business's handler comes after the topic's.
	n2, a2 := e.publish("news", "chat"), e.publish(topics.Everyone, "")
	news.waitIDs(t, "#news", n1, n2)
	rest.waitIDs(t, "#"+topics.Everyone, a1, a2)
	if it := news.item("#news", 1); it.Business != "chat" || it.Epoch != e.tp.Epoch() || it.Kind != int32(oplogpb.Kind_KIND_TOPIC_MESSAGE) {
		t.Fatalf("live topic item %v", it)
	}

	// Persisted, then acked.
	epoch := e.tp.Epoch()
	want := map[string]client.SyncPoint{"news": {ID: n2, Epoch: epoch}, "sport": {ID: s1, Epoch: epoch}, topics.Everyone: {ID: a2, Epoch: epoch}}
	waitFor(t, "persisted topic cursors", func() bool { return maps.Equal(r.TopicCursors(), want) })
	waitFor(t, "server topic cursors", func() bool {
		sc := e.serverCursors("tphone")
		return sc["news"].ID == n2 && sc["sport"].ID == s1 && sc[topics.Everyone].ID == a2
	})
	if st := r.Stats(); st.TopicItems != 5 || st.Delivered != 5 || st.Duplicates != 0 {
		t.Fatalf("stats %+v", st)
	}
	if err := r.stop(t); err != nil {
		t.Fatal(err)
	}

	// A restart presents the cursors: only what is new comes.
	n3 := e.publish("news", "")
	news2, chat2, rest2 := newRecorder(), newRecorder(), newRecorder()
	r2 := start(t, cfg, handlers(news2, chat2, rest2))
	news2.waitIDs(t, "#news", n3)
	waitFor(t, "round after restart", func() bool { return r2.Stats().Rounds >= 1 })
	time.Sleep(100 * time.Millisecond)
	news2.waitIDs(t, "#news", n3)
	if st := r2.Stats(); st.Delivered != 1 || st.Duplicates != 0 || len(chat2.ids("#sport")) != 0 || len(rest2.ids("#"+topics.Everyone)) != 0 {
		t.Fatalf("after restart: stats %+v", st)
	}
	if err := r2.stop(t); err != nil {
		t.Fatal(err)
	}

	// Another user on the device: the topic cursors stay (Everyone's old
	// messages do not come again), the user's topics are the new user's.
	a3 := e.publish(topics.Everyone, "")
	e.publish("news", "") // tia's, not uma's
	cfg.Token = tokens(e.token("uma", "tphone"))
	news3, chat3, rest3 := newRecorder(), newRecorder(), newRecorder()
	r3 := start(t, cfg, handlers(news3, chat3, rest3))
	rest3.waitIDs(t, "#"+topics.Everyone, a3)
	waitFor(t, "round for uma", func() bool { return r3.Stats().Rounds >= 1 })
	time.Sleep(100 * time.Millisecond)
	rest3.waitIDs(t, "#"+topics.Everyone, a3)
	if got := news3.ids("#news"); len(got) != 0 {
		t.Fatalf("uma got tia's news %v", got)
	}
	if tc := r3.TopicCursors(); tc["news"].ID != n3 || tc[topics.Everyone].ID != a3 {
		t.Fatalf("topic cursors after the change of user %v", tc)
	}
}
