package web_test

import (
	"cmp"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/sluicehq/sluice/gateway/web"
)

// topicsPage drives sluice.js against a scripted gateway: window.WebSocket
// is replaced by a fake whose frames the page writes out, as the gateway's
// topics and buckets would send them. It posts one report to /result with
// what the client sent and did.
const topicsPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>sluice.js topics test</title></head><body>
<script src="/sluice.js"></script>
<script>
"use strict";
(async function () {
  const post = (body) => fetch("/result", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (what, cond) => {
    const deadline = Date.now() + 5000;
    while (!cond()) {
      if (Date.now() > deadline) throw new Error("not within 5 s: " + what);
      await sleep(5);
    }
  };
  window.addEventListener("error", (e) => post({error: "page error: " + e.message}));

  // The scripted gateway: every link the client opens, with the frames it
  // sent (parsed) and when.
  const links = [];
  class FakeWebSocket {
    constructor(url, protocol) {
      this.url = url;
      this.protocol = protocol;
      this.readyState = 0;
      this.sent = [];
      links.push(this);
      setTimeout(() => { this.readyState = 1; this.onopen(); }, 0);
    }
    send(data) { this.sent.push({f: JSON.parse(data), at: performance.now()}); }
    close(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      setTimeout(() => this.onclose({code: code || 1005, reason: reason || ""}), 0);
    }
    serve(frame) { this.onmessage({data: JSON.stringify(frame)}); }
    hangUp() { this.readyState = 3; this.onclose({code: 1006, reason: ""}); }
    frames(key) { return this.sent.filter((s) => s.f[key]); }
    foregrounds() { return this.sent.filter((s) => s.f.event && s.f.event.type === "TYPE_FOREGROUND"); }
  }
  window.WebSocket = FakeWebSocket;
  const welcome = (user) => ({welcome: {sessionId: "c2Vzc2lvbg", serverTimeMs: String(Date.now()), heartbeatMs: 60000, user: user, device: "d", version: 1}});

  try {
    // Points saved by an older client: no topic cursors. Loads.
    const oldStore = {"sluice.points": JSON.stringify({version: 1, user: "ann", points: {chat: {id: "3", epoch: "1"}}})};
    const old = new Sluice.Client({url: "ws://fake/v1/ws", token: "tok", storage: {getItem: (k) => oldStore[k] || null, setItem: (k, v) => { oldStore[k] = v; }}});
    const oldLoaded = {points: old.points(), topics: old.topicCursors()};

    const store = {"sluice.points": JSON.stringify({version: 1, user: "ann", points: {chat: {id: "3", epoch: "1"}},
      topics: {news: {id: "5", epoch: "1"}, old: {id: "50", epoch: "1"}}})};
    const handled = [], resets = [], errors = [];
    const rec = (who) => (it) => { handled.push(who + ":" + it.topic + "/" + it.business + "#" + it.id); };
    const c = new Sluice.Client({url: "ws://fake/v1/ws", token: "tok", minBackoff: 10, maxBackoff: 20, ackInterval: 30,
      storage: {getItem: (k) => store[k] || null, setItem: (k, v) => { store[k] = v; }},
      onReset: (b) => { resets.push("business " + b); },
      onTopicReset: (t) => { resets.push("topic " + t); },
      onError: (e) => errors.push(e.code + ": " + e.message)});
    c.handleTopic("news", rec("news"));
    c.handle("chat", rec("chat"));
    c.handleDefault(rec("default"));
    c.start();

    // A round: a topic reset, topic and business items, and a done frame
    // without items that defers a bucket.
    await until("first link", () => links.length === 1 && links[0].sent.length === 1);
    const l1 = links[0];
    l1.serve(welcome("ann"));
    l1.serve({sync: {topicResets: ["old"], items: [
      {id: "1", epoch: "2", topic: "old", kind: 6},
      {id: "5", epoch: "1", topic: "news", kind: 6},
      {id: "6", epoch: "1", topic: "news", business: "chat", kind: 6},
      {id: "4", epoch: "1", business: "chat", kind: 1},
      {id: "1", epoch: "1", topic: "sports", business: "chat", kind: 6},
      {id: "2", epoch: "3", topic: "_all", kind: 6},
    ]}});
    l1.serve({sync: {done: true, deferred: ["low"], retryAfterMs: 300}});
    const doneAt = performance.now();
    await until("live", () => c.state === "live" && c.stats().unacked === 0);
    const afterRound = {handled: handled.slice(), resets: resets.slice(), acks: l1.frames("ack").map((s) => s.f.ack),
      saved: JSON.parse(store["sluice.points"]), topics: c.topicCursors(), stats: c.stats()};
    await until("foreground", () => l1.foregrounds().length >= 1);
    await sleep(500);
    const foregroundMs = l1.foregrounds().map((s) => s.at - doneAt);

    // A live topic item.
    l1.serve({live: {items: [{id: "7", epoch: "1", topic: "news", kind: 6}]}});
    await until("live ack", () => c.stats().unacked === 0 && l1.frames("ack").length >= 2);
    const liveAck = l1.frames("ack").slice(-1)[0].f.ack;

    // Re-armed by a second deferral, cancelled by a round without any.
    l1.serve({sync: {done: true, deferred: ["low"], retryAfterMs: 150}});
    await sleep(50);
    l1.serve({sync: {done: true, deferred: ["low", "mid"], retryAfterMs: 300}});
    const rearmedAt = performance.now();
    await until("foreground again", () => l1.foregrounds().length >= 2);
    const rearmedMs = l1.foregrounds()[1].at - rearmedAt;
    l1.serve({sync: {done: true, deferred: ["low"], retryAfterMs: 150}});
    await sleep(50);
    l1.serve({sync: {done: true}});
    await sleep(400);
    const cancelledByRound = l1.foregrounds().length - 2;

    // Cancelled by the end of the link.
    l1.serve({sync: {done: true, deferred: ["low"], retryAfterMs: 150}});
    await sleep(50);
    l1.hangUp();
    await until("second link", () => links.length === 2 && links[1].sent.length === 1);
    const l2 = links[1];
    // Bound to another user: the points go, the topic cursors stay, and the
    // client says Hello again.
    l2.serve(welcome("bob"));
    await until("third link", () => links.length === 3 && links[2].sent.length === 1);
    const l3 = links[2];
    l3.serve(welcome("bob"));
    await sleep(400);
    const cancelledByLink = l1.foregrounds().length - 2 + l2.foregrounds().length + l3.foregrounds().length;

    const st = c.stats();
    c.stop();
    await post({
      oldLoaded: oldLoaded,
      hellos: links.map((l) => l.sent[0].f.hello),
      afterRound: afterRound,
      foregroundMs: foregroundMs,
      liveAck: liveAck,
      rearmedMs: rearmedMs,
      cancelledByRound: cancelledByRound,
      cancelledByLink: cancelledByLink,
      handled: handled,
      errors: errors,
      stats: st,
      points: c.points(),
      topics: c.topicCursors(),
      saved: JSON.parse(store["sluice.points"]),
    });
  } catch (e) {
    await post({error: String(e && e.stack || e)});
  }
})();
</script>
</body></html>
`

type jsMark struct {
	ID    string `json:"id"`
	Epoch string `json:"epoch"`
}

type jsCursor struct {
	Topic string `json:"topic"`
	ID    string `json:"id"`
	Epoch string `json:"epoch"`
}

type jsPoint struct {
	Business string `json:"business"`
	ID       string `json:"id"`
	Epoch    string `json:"epoch"`
}

type jsAck struct {
	Points []jsPoint  `json:"points"`
	Topics []jsCursor `json:"topics"`
}

type jsSaved struct {
	Version int               `json:"version"`
	User    string            `json:"user"`
	Points  map[string]jsMark `json:"points"`
	Topics  map[string]jsMark `json:"topics"`
}

type jsStats struct {
	Delivered    int `json:"delivered"`
	Duplicates   int `json:"duplicates"`
	TopicItems   int `json:"topicItems"`
	TopicResets  int `json:"topicResets"`
	Resets       int `json:"resets"`
	Deferrals    int `json:"deferrals"`
	DeferRetries int `json:"deferRetries"`
	Unacked      int `json:"unacked"`
}

// topicsReport is what topicsPage posts.
type topicsReport struct {
	Error     string `json:"error"`
	OldLoaded struct {
		Points map[string]jsMark `json:"points"`
		Topics map[string]jsMark `json:"topics"`
	} `json:"oldLoaded"`
	Hellos []struct {
		Points     []jsPoint  `json:"points"`
		Topics     []jsCursor `json:"topics"`
		PointsUser string     `json:"pointsUser"`
	} `json:"hellos"`
	AfterRound struct {
		Handled []string          `json:"handled"`
		Resets  []string          `json:"resets"`
		Acks    []jsAck           `json:"acks"`
		Saved   jsSaved           `json:"saved"`
		Topics  map[string]jsMark `json:"topics"`
		Stats   jsStats           `json:"stats"`
	} `json:"afterRound"`
	ForegroundMs     []float64         `json:"foregroundMs"`
	LiveAck          jsAck             `json:"liveAck"`
	RearmedMs        float64           `json:"rearmedMs"`
	CancelledByRound int               `json:"cancelledByRound"`
	CancelledByLink  int               `json:"cancelledByLink"`
	Handled          []string          `json:"handled"`
	Errors           []string          `json:"errors"`
	Stats            jsStats           `json:"stats"`
	Points           map[string]jsMark `json:"points"`
	Topics           map[string]jsMark `json:"topics"`
	Saved            jsSaved           `json:"saved"`
}

// TestBrowserTopics runs sluice.js in headless Chromium against a scripted
// gateway (see topicsPage): topic cursors loaded, presented in Hello,
// advanced, deduped and acked; topic resets; routing by topic, business,
// default; cursors kept across a change of user; the FOREGROUND after a
// deferral, once, re-armed, and cancelled by a round without deferrals or
// the end of the link.
func TestBrowserTopics(t *testing.T) {
	chromium := findChromium(t)
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()

	reports := make(chan topicsReport, 1)
	mux := http.NewServeMux()
	mux.Handle("/", web.Handler())
	mux.HandleFunc("GET /test-topics.html", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = io.WriteString(w, topicsPage)
	})
	mux.HandleFunc("POST /result", func(w http.ResponseWriter, r *http.Request) {
		var rep topicsReport
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&rep); err != nil {
			rep.Error = "bad report: " + err.Error()
		}
		select {
		case reports <- rep:
		default:
		}
	})
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)

	b := startBrowser(ctx, t, chromium, hs.URL+"/test-topics.html")
	var r topicsReport
	select {
	case r = <-reports:
	case <-b.exited:
		t.Fatalf("chromium exited before the report: %v\n%s", b.err, b.output())
	case <-ctx.Done():
		t.Fatalf("no report: %v\nchromium:\n%s", ctx.Err(), b.output())
	}
	if r.Error != "" {
		t.Fatalf("page: %s", r.Error)
	}
	if len(r.Errors) != 0 {
		t.Errorf("client errors: %q", r.Errors)
	}

	// An older client's points load, without topic cursors.
	if r.OldLoaded.Points["chat"].ID != "3" || len(r.OldLoaded.Topics) != 0 {
		t.Errorf("older saved points: loaded %+v", r.OldLoaded)
	}

	// Hellos: the saved cursors; after the round, the new ones; after the
	// change of user, the cursors without the points.
	if len(r.Hellos) != 3 {
		t.Fatalf("%d hellos, want 3", len(r.Hellos))
	}
	h := r.Hellos[0]
	if !slices.Equal(h.Topics, []jsCursor{{"news", "5", "1"}, {"old", "50", "1"}}) || len(h.Points) != 1 || h.PointsUser != "ann" {
		t.Errorf("first hello %+v", h)
	}
	wantCursors := []jsCursor{{"news", "7", "1"}, {"old", "1", "2"}, {"sports", "1", "1"}, {"_all", "2", "3"}}
	sortCursors := func(cs []jsCursor) []jsCursor {
		cs = slices.Clone(cs)
		slices.SortFunc(cs, func(a, b jsCursor) int { return cmp.Compare(a.Topic, b.Topic) })
		return cs
	}
	for i, h := range r.Hellos[1:] {
		if !slices.Equal(sortCursors(h.Topics), sortCursors(wantCursors)) {
			t.Errorf("hello %d: topics %+v, want %+v", i+2, h.Topics, wantCursors)
		}
	}
	if h := r.Hellos[1]; len(h.Points) != 1 || h.Points[0].ID != "4" || h.PointsUser != "ann" {
		t.Errorf("second hello %+v", h)
	}
	if h := r.Hellos[2]; len(h.Points) != 0 || h.PointsUser != "bob" {
		t.Errorf("third hello (after the change of user) %+v", h)
	}

	// The round: the reset first, routing, dedupe, one ack of both kinds,
	// saved first.
	ar := r.AfterRound
	if want := []string{"topic old"}; !slices.Equal(ar.Resets, want) {
		t.Errorf("resets %q, want %q", ar.Resets, want)
	}
	wantHandled := []string{"default:old/#1", "news:news/chat#6", "chat:/chat#4", "chat:sports/chat#1", "default:_all/#2"}
	if !slices.Equal(ar.Handled, wantHandled) {
		t.Errorf("handled %q, want %q", ar.Handled, wantHandled)
	}
	if len(ar.Acks) != 1 {
		t.Fatalf("acks after the round %+v, want 1", ar.Acks)
	}
	if a := ar.Acks[0]; !slices.Equal(a.Points, []jsPoint{{"chat", "4", "1"}}) ||
		!slices.Equal(sortCursors(a.Topics), []jsCursor{{"_all", "2", "3"}, {"news", "6", "1"}, {"old", "1", "2"}, {"sports", "1", "1"}}) {
		t.Errorf("ack after the round %+v", a)
	}
	if s := ar.Saved; s.Version != 1 || s.User != "ann" || s.Topics["news"] != (jsMark{"6", "1"}) || s.Topics["old"] != (jsMark{"1", "2"}) || s.Points["chat"] != (jsMark{"4", "1"}) {
		t.Errorf("saved after the round %+v", s)
	}
	if st := ar.Stats; st.TopicResets != 1 || st.Resets != 0 || st.Duplicates != 1 || st.TopicItems != 4 || st.Delivered != 5 || st.Deferrals != 1 {
		t.Errorf("stats after the round %+v", st)
	}

	// The deferral: one FOREGROUND, 300 ms + up to 25% later (timers may
	// run late in a busy browser).
	if len(r.ForegroundMs) != 1 || r.ForegroundMs[0] < 299 || r.ForegroundMs[0] > 375+200 {
		t.Errorf("FOREGROUND after the deferral at %v ms, want one at 300-375 ms", r.ForegroundMs)
	}
	if !slices.Equal(r.LiveAck.Topics, []jsCursor{{"news", "7", "1"}}) || len(r.LiveAck.Points) != 0 {
		t.Errorf("ack of a live topic item %+v", r.LiveAck)
	}
	if r.RearmedMs < 299 || r.RearmedMs > 375+200 {
		t.Errorf("re-armed FOREGROUND at %v ms after the second deferral, want 300-375", r.RearmedMs)
	}
	if r.CancelledByRound != 0 || r.CancelledByLink != 0 {
		t.Errorf("FOREGROUND events after a round without deferrals: %d, after the link ended: %d; want none",
			r.CancelledByRound, r.CancelledByLink)
	}
	if st := r.Stats; st.Deferrals != 5 || st.DeferRetries != 2 {
		t.Errorf("final stats %+v, want 5 deferrals and 2 retries", st)
	}

	// After the change of user: no points, the cursors kept and saved.
	if len(r.Points) != 0 || r.Topics["news"] != (jsMark{"7", "1"}) || len(r.Topics) != 4 {
		t.Errorf("after the change of user: points %v, topics %v", r.Points, r.Topics)
	}
	if s := r.Saved; s.User != "bob" || len(s.Points) != 0 || s.Topics["news"] != (jsMark{"7", "1"}) || len(s.Topics) != 4 {
		t.Errorf("saved after the change of user %+v", s)
	}
}
