package web_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/web"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

func TestHandler(t *testing.T) {
	h := web.Handler()
	for _, tc := range []struct {
		method, path string
		status       int
		mediaType    string
		contains     string
	}{
		{"GET", "/", http.StatusOK, "text/html", `<script src="sluice.js">`},
		{"HEAD", "/", http.StatusOK, "text/html", ""},
		{"GET", "/sluice.js", http.StatusOK, "application/javascript", "root.Sluice = "},
		{"GET", "/nope", http.StatusNotFound, "", ""},
		{"GET", "/index.html", http.StatusNotFound, "", ""},
		{"GET", "/sluice.js/", http.StatusNotFound, "", ""},
		{"POST", "/sluice.js", http.StatusMethodNotAllowed, "", ""},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
			if rec.Code != tc.status {
				t.Fatalf("status %d, want %d", rec.Code, tc.status)
			}
			if tc.status != http.StatusOK {
				return
			}
			mt, params, err := mime.ParseMediaType(rec.Header().Get("Content-Type"))
			if err != nil || mt != tc.mediaType || params["charset"] != "utf-8" {
				t.Errorf("Content-Type %q, want %s; charset=utf-8", rec.Header().Get("Content-Type"), tc.mediaType)
			}
			if got := rec.Header().Get("Cache-Control"); got != "no-cache" {
				t.Errorf("Cache-Control %q, want no-cache", got)
			}
			if !strings.Contains(rec.Body.String(), tc.contains) {
				t.Errorf("body does not contain %q", tc.contains)
			}
			// Revalidation with the ETag: not modified.
			etag := rec.Header().Get("ETag")
			req := httptest.NewRequest(tc.method, tc.path, nil)
			req.Header.Set("If-None-Match", etag)
			rec = httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if etag == "" || rec.Code != http.StatusNotModified {
				t.Errorf("revalidation with ETag %q: status %d, want 304", etag, rec.Code)
			}
		})
	}
}

var (
	chat   = &oplogpb.Business{Code: "chat", Dimension: oplogpb.Dimension_DIMENSION_USER}
	config = &oplogpb.Business{Code: "config", Dimension: oplogpb.Dimension_DIMENSION_DEVICE}
)

// testPage drives sluice.js the way an app would and reports to /result at
// each phase; the test answers each report once it has checked it and
// done the next step. The first load reports "backlog" and "live", then
// reloads itself; the second reports "connected", "after-reload", "flaky"
// (a handler that failed once), "edges" (replaced by another client,
// refused token), "dedupe" (a link lost in the middle of a backlog),
// "probe" (a client whose pings are lost answers the gateway's probes) and
// "switch" (points saved under another user are dropped).
const testPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>sluice.js test</title></head><body>
<script src="/sluice.js"></script>
<script>
"use strict";
(async function () {
  const reloaded = sessionStorage.getItem("sluice-test-reloaded") === "1";
  const post = (body) => fetch("/result", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const fail = (msg) => post({phase: "error", message: String(msg)});
  window.addEventListener("error", (e) => fail("page error: " + e.message));
  window.addEventListener("unhandledrejection", (e) => fail("unhandled rejection: " + (e.reason && e.reason.stack || e.reason)));
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const until = async (cond) => { while (!cond()) await sleep(20); };
  const token = () => new URLSearchParams(location.search).get("token");

  const items = [], states = [], handlerErrors = [];
  let busy = false, flakyCalls = 0;
  const c = new Sluice.Client({
    token: token,
    attrs: {appVersion: "1.2.3", os: "web"},
    ackInterval: 50,
    minBackoff: 50,
    onState: (s, d) => states.push(typeof d === "string" ? s + ":" + d : s),
    onError: (e) => {
      if (e.code === "HANDLER" && e.message.indexOf("flaky") >= 0) handlerErrors.push(e.message);
      else fail("client error " + e.code + ": " + e.message);
    },
  });
  c.handleDefault(async (it) => {
    if (busy) fail("handlers overlap");
    busy = true;
    await sleep(5); // a slow handler: the next item must wait for it
    busy = false;
    if (it.text.indexOf("flaky") === 0 && flakyCalls++ === 0) {
      await sleep(200); // the next item arrives meanwhile, and must not be handled
      throw new Error("flaky handler fails once");
    }
    items.push({business: it.business, id: it.id, epoch: it.epoch, text: it.text,
      bytes: it.payload instanceof Uint8Array ? it.payload.length : -1, transient: it.transient});
  });
  const stored = () => items.filter((i) => !i.transient);
  const report = (phase) => ({phase: phase, items: items.slice(), points: c.points(),
    protocol: c.stats().protocol, states: states.slice(), stats: c.stats()});
  try {
    c.start();
    if (!reloaded) {
      await until(() => stored().length >= 3 && c.state === "live");
      await post(report("backlog"));
      await until(() => stored().length >= 5 && items.some((i) => i.transient) &&
        c.stats().unacked === 0 && c.stats().pongs >= 1);
      await post(report("live"));
      sessionStorage.setItem("sluice-test-reloaded", "1");
      location.reload();
      return;
    }
    await until(() => c.state === "live");
    await post(report("connected"));
    await until(() => items.length >= 1 && c.stats().unacked === 0);
    await sleep(300); // anything more would show up meanwhile
    await post(report("after-reload"));

    // The test appended an item whose handler fails the first time, and
    // one after it: the client reconnects and gets both again.
    await until(() => items.some((i) => i.text.indexOf("after flaky") === 0) && c.state === "live" && c.stats().unacked === 0);
    await post(Object.assign(report("flaky"), {flakyCalls: flakyCalls, handlerErrors: handlerErrors}));

    // Another client of the same device, without saved points, replaces
    // this one and gets nothing old (the gateway has the acked points).
    const other = [];
    const c2 = new Sluice.Client({token: token, storage: null, onError: (e) => fail("c2: " + e.code + ": " + e.message)});
    c2.handleDefault((it) => { other.push(it.id); });
    c2.start();
    await until(() => c.state === "closed" && c2.state === "live");
    await sleep(200);
    const otherConnects = c2.stats().connects;
    c2.stop();

    // A forged token: the client stops with an error and does not retry.
    let authError = null;
    const c3 = new Sluice.Client({token: "forged", storage: null, minBackoff: 10,
      onState: (s, d) => { if (s === "error") authError = d; }});
    c3.start();
    await until(() => c3.state === "error");
    await sleep(300);
    const next = await (await post({phase: "edges", states: states.slice(), otherItems: other, otherConnects: otherConnects,
      authError: authError, authConnects: c3.stats().connects})).json();

    // A client whose saved chat point is old gets the chat backlog after
    // it. Its link is closed while it handles the first item: the items
    // already received are still handled, the next link's backlog repeats
    // them, and the client drops those duplicates.
    const sockets = [], seen = [];
    const NativeWebSocket = window.WebSocket;
    window.WebSocket = function (url, protocol) {
      const ws = new NativeWebSocket(url, protocol);
      sockets.push(ws);
      return ws;
    };
    const saved = {"sluice.points": JSON.stringify({version: 1, user: next.user, points: {chat: {id: next.from, epoch: next.epoch}}})};
    // Its ack timer never fires: the acks go out at the end of each round.
    const c4 = new Sluice.Client({token: token, minBackoff: 10, ackInterval: 60000,
      storage: {getItem: (k) => saved[k] || null, setItem: (k, v) => { saved[k] = v; }},
      onError: (e) => fail("c4: " + e.code + ": " + e.message)});
    c4.handleDefault(async (it) => {
      await sleep(100);
      seen.push(it.id);
      if (seen.length === 1) sockets[0].close();
    });
    c4.start();
    await until(() => seen.length >= next.count && c4.state === "live" && c4.stats().queued === 0 && c4.stats().unacked === 0);
    await sleep(300);
    const st = c4.stats();
    c4.stop();
    window.WebSocket = NativeWebSocket;
    await post({phase: "dedupe", otherItems: seen, otherConnects: st.connects, stats: st, points: c4.points()});

    // A client whose pings are lost: the gateway probes it, it answers,
    // and the link lives on.
    let dropped = 0;
    window.WebSocket = function (url, protocol) {
      const ws = new NativeWebSocket(url, protocol);
      const send = ws.send.bind(ws);
      ws.send = (data) => {
        if (String(data).indexOf('{"ping"') === 0) dropped++;
        else send(data);
      };
      return ws;
    };
    const c5 = new Sluice.Client({token: token, storage: null, onError: (e) => fail("c5: " + e.code + ": " + e.message)});
    c5.start();
    await until(() => c5.state === "live");
    await sleep(2000);
    const st5 = c5.stats();
    c5.stop();
    window.WebSocket = NativeWebSocket;
    await post({phase: "probe", otherConnects: st5.connects, stats: st5, dropped: dropped});

    // Points saved under another user: the client drops them all and says
    // Hello again without them; the gateway resumes from what it recorded
    // for this user, so nothing old comes.
    const bobs = {"sluice.points": JSON.stringify({version: 1, user: "bob",
      points: {chat: {id: "1", epoch: next.epoch}, config: {id: "1", epoch: next.epoch}}})};
    const switched = [];
    const c6 = new Sluice.Client({token: token, minBackoff: 10,
      storage: {getItem: (k) => bobs[k] || null, setItem: (k, v) => { bobs[k] = v; }},
      onError: (e) => fail("c6: " + e.code + ": " + e.message)});
    c6.handleDefault((it) => { switched.push(it.id); });
    c6.start();
    await until(() => c6.state === "live");
    await sleep(300);
    const st6 = c6.stats();
    c6.stop();
    await post({phase: "switch", otherItems: switched, otherConnects: st6.connects, stats: st6,
      points: c6.points(), saved: JSON.parse(bobs["sluice.points"])});
  } catch (e) {
    fail(e && e.stack || e);
  }
})();
</script>
</body></html>
`

// pageReport is what the test page posts.
type pageReport struct {
	Phase    string               `json:"phase"`
	Message  string               `json:"message"`
	Items    []pageItem           `json:"items"`
	Points   map[string]pagePoint `json:"points"`
	Protocol string               `json:"protocol"`
	States   []string             `json:"states"`
	// The flaky and edges phases.
	FlakyCalls    int      `json:"flakyCalls"`
	HandlerErrors []string `json:"handlerErrors"`
	OtherItems    []string `json:"otherItems"`
	OtherConnects int      `json:"otherConnects"`
	AuthError     struct {
		Code  string `json:"code"`
		Fatal bool   `json:"fatal"`
	} `json:"authError"`
	AuthConnects int `json:"authConnects"`
	Stats        struct {
		Delivered  int    `json:"delivered"`
		Duplicates int    `json:"duplicates"`
		Transient  int    `json:"transient"`
		Acks       int    `json:"acks"`
		Unacked    int    `json:"unacked"`
		Pings      int    `json:"pings"`
		Pongs      int    `json:"pongs"`
		Probes     int    `json:"probes"`
		User       string `json:"user"`
	} `json:"stats"`
	Dropped int `json:"dropped"`
	Saved   struct {
		Version int                  `json:"version"`
		User    string               `json:"user"`
		Points  map[string]pagePoint `json:"points"`
	} `json:"saved"`
}

type pageItem struct {
	Business  string `json:"business"`
	ID        string `json:"id"`
	Epoch     string `json:"epoch"`
	Text      string `json:"text"`
	Bytes     int    `json:"bytes"`
	Transient bool   `json:"transient"`
}

type pagePoint struct {
	ID    string `json:"id"`
	Epoch string `json:"epoch"`
}

// report is a page report awaiting the test: the page's POST is answered
// with what the test sends on reply.
type report struct {
	pageReport
	reply chan any
}

// appended is an entry the test appended.
type appended struct {
	business, text string
}

// TestBrowserClient runs sluice.js in headless Chromium against a real
// gateway: backlog, live items and a transient one, acks recorded by the
// server, a reload that resumes from the saved points without
// redelivering anything; then a failing handler, a replaced link, a
// forged token, a link lost mid-backlog, lost pings and points of another
// user (see testPage).
func TestBrowserClient(t *testing.T) {
	chromium := findChromium(t)
	begin := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
	defer cancel()

	const user, device = "ann", "ann-web"
	var logs lockedBuffer
	logger := zerolog.New(&logs)
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat, config)
	in := oplogtest.MustRunInbox(t, l, "")
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := gateway.NewServer(gateway.Config{Inbox: in, Tokens: gateway.NewVerifier(pub),
		Heartbeat: 500 * time.Millisecond, ProbeTimeout: 300 * time.Millisecond, Logger: &logger})
	if err != nil {
		t.Fatal(err)
	}
	token, err := gateway.NewSigner(priv).Issue(gateway.Claims{User: user, Device: device, App: "web", Expires: time.Now().Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}

	reports := make(chan report)
	stop := make(chan struct{})
	mux := http.NewServeMux()
	mux.Handle("/", web.Handler())
	mux.Handle("/v1/ws", gw.WebSocketHandler(nil))
	mux.HandleFunc("GET /test.html", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = io.WriteString(w, testPage)
	})
	mux.HandleFunc("POST /result", func(w http.ResponseWriter, r *http.Request) {
		var rep report
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&rep.pageReport); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		rep.reply = make(chan any, 1)
		select {
		case reports <- rep:
		case <-stop:
			return
		}
		var v any
		select {
		case v = <-rep.reply:
		case <-stop:
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(v)
	})
	hs := httptest.NewServer(mux)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := gw.Shutdown(ctx); err != nil {
			t.Errorf("gateway shutdown: %v", err)
		}
		hs.Close()
	})
	t.Cleanup(func() { close(stop) })

	sent := map[string]appended{} // by id
	add := func(biz, target, text string, transient bool) string {
		t.Helper()
		r, err := l.Append(ctx, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: biz, Targets: []string{target},
			Payload: []byte(text), Transient: transient})
		if err != nil {
			t.Fatalf("append: %v", err)
		}
		id := strconv.FormatUint(r[0].Id, 10)
		if !transient {
			sent[id] = appended{biz, text}
		}
		return id
	}
	backlog := []string{
		add("chat", user, "chat 1: héllo wörld ✓", false),
		add("config", device, `config 1: {"theme":"dark"}`, false),
		add("chat", user, "chat 2: 日本語 🚀", false),
	}
	envReady := time.Since(begin)

	b := startBrowser(ctx, t, chromium, hs.URL+"/test.html?token="+url.QueryEscape(token))
	browserStart := time.Now()
	// next answers the previous report (see answer), then waits for the
	// page's report of phase.
	var prev *report
	answer := func(v any) {
		if prev != nil {
			prev.reply <- v
			prev = nil
		}
	}
	next := func(phase string) pageReport {
		t.Helper()
		answer(struct{}{})
		select {
		case r := <-reports:
			prev = &r
			if r.Phase == "error" {
				t.Fatalf("page: %s", r.Message)
			}
			if r.Phase != phase {
				t.Fatalf("page reported %q, want %q: %+v", r.Phase, phase, r.pageReport)
			}
			t.Logf("%-12s at %v", phase, time.Since(browserStart).Round(time.Millisecond))
			return r.pageReport
		case <-b.exited:
			t.Fatalf("chromium exited before %q: %v\n%s", phase, b.err, b.output())
		case <-ctx.Done():
			t.Fatalf("no %q report: %v\nchromium:\n%s", phase, ctx.Err(), b.output())
		}
		panic("unreachable")
	}
	// checkItems compares the page's stored items with the entries of ids,
	// business by business in id order.
	checkItems := func(phase string, got []pageItem, ids []string) {
		t.Helper()
		var stored []pageItem
		for _, it := range got {
			if !it.Transient {
				stored = append(stored, it)
			}
		}
		if len(stored) != len(ids) {
			t.Fatalf("%s: page has %d items %+v, want ids %v", phase, len(stored), stored, ids)
		}
		want := map[string][]string{}
		for _, id := range ids {
			want[sent[id].business] = append(want[sent[id].business], id)
		}
		have := map[string][]string{}
		for _, it := range stored {
			have[it.Business] = append(have[it.Business], it.ID)
			s, ok := sent[it.ID]
			if !ok || s.business != it.Business || s.text != it.Text || it.Bytes != len(s.text) {
				t.Errorf("%s: page item %+v, want %+v (%d bytes)", phase, it, s, len(s.text))
			}
		}
		for biz, w := range want {
			if !slices.Equal(have[biz], w) {
				t.Errorf("%s: %s ids %v, want %v", phase, biz, have[biz], w)
			}
		}
	}
	// checkPoints compares the page's saved points with the last ids, and
	// waits for the gateway to have recorded them as the device's sync
	// points.
	checkPoints := func(phase string, got map[string]pagePoint, last map[string]string, epoch string) {
		t.Helper()
		for biz, id := range last {
			if p := got[biz]; p.ID != id || p.Epoch != epoch {
				t.Errorf("%s: page point of %s %+v, want id %s epoch %s", phase, biz, p, id, epoch)
			}
		}
		var sp map[string]oplog.SyncPoint
		deadline := time.Now().Add(5 * time.Second)
		for {
			sp, err = in.SyncPoints(ctx, device)
			if err != nil {
				t.Fatal(err)
			}
			ok := true
			for biz, id := range last {
				if strconv.FormatUint(sp[biz].ID, 10) != id || strconv.FormatUint(sp[biz].Epoch, 10) != epoch {
					ok = false
				}
			}
			if ok {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: gateway sync points %+v, want %v (epoch %s)", phase, sp, last, epoch)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	r := next("backlog")
	checkItems("backlog", r.Items, backlog)
	if r.Protocol != "sluice.v1.json" {
		t.Errorf("page's WebSocket protocol %q, want sluice.v1.json", r.Protocol)
	}
	epoch := r.Items[0].Epoch
	live := []string{add("chat", user, "chat 3: live", false), add("config", device, "config 2: live", false)}
	add("chat", user, "typing…", true) // last: it must not move the chat point

	r = next("live")
	checkItems("live", r.Items, append(slices.Clone(backlog), live...))
	if n := len(r.Items) - 5; n != 1 || r.Stats.Transient != 1 {
		t.Errorf("live: %d transient items (stats %d), want 1", n, r.Stats.Transient)
	}
	for _, it := range r.Items {
		if it.Transient && (it.ID != "0" || it.Text != "typing…" || it.Business != "chat") {
			t.Errorf("transient item %+v", it)
		}
	}
	if r.Stats.Pongs < 1 || r.Stats.Acks < 1 || r.Stats.Unacked != 0 {
		t.Errorf("live: stats %+v, want pongs, acks and nothing unacked", r.Stats)
	}
	lastPoints := map[string]string{"chat": live[0], "config": live[1]}
	checkPoints("live", r.Points, lastPoints, epoch)
	livePoints := r.Points
	firstStates := r.States

	// The page reloads: its new client starts from the saved points.
	r = next("connected")
	if len(r.Items) != 0 {
		t.Fatalf("after reload the page got old items again: %+v", r.Items)
	}
	if fmt.Sprint(r.Points) != fmt.Sprint(livePoints) {
		t.Errorf("points loaded after reload %v, want %v", r.Points, livePoints)
	}
	fresh := add("chat", user, "chat 4: after reload", false)

	r = next("after-reload")
	checkItems("after-reload", r.Items, []string{fresh})
	if len(r.Items) != 1 {
		t.Errorf("after reload: %+v, want only id %s", r.Items, fresh)
	}
	lastPoints["chat"] = fresh
	checkPoints("after-reload", r.Points, lastPoints, epoch)
	if r.Stats.Duplicates != 0 {
		t.Logf("after reload: %d duplicates dropped by the client", r.Stats.Duplicates)
	}
	t.Logf("states: first load %v", firstStates)

	// A handler that fails once: the item and the one after it come again
	// on a new link.
	flaky := add("chat", user, "flaky: fails once", false)
	follower := add("chat", user, "after flaky", false)
	r = next("flaky")
	checkItems("flaky", r.Items, []string{fresh, flaky, follower})
	if r.FlakyCalls != 2 || len(r.HandlerErrors) != 1 {
		t.Errorf("flaky: handler called %d times with errors %q, want 2 calls and 1 error", r.FlakyCalls, r.HandlerErrors)
	}
	if got := strings.Join(r.States, " "); got != "connecting syncing live connecting syncing live" {
		t.Errorf("flaky: states %q, want a reconnect", got)
	}
	lastPoints["chat"] = follower
	checkPoints("flaky", r.Points, lastPoints, epoch)

	r = next("edges")
	if n := len(r.States); n == 0 || r.States[n-1] != "closed:replaced" {
		t.Errorf("replaced client: states %v, want closed:replaced last", r.States)
	}
	if len(r.OtherItems) != 0 || r.OtherConnects != 1 {
		t.Errorf("client without saved points: got items %v in %d connects, want none in 1", r.OtherItems, r.OtherConnects)
	}
	if r.AuthError.Code != "CODE_UNAUTHENTICATED" || !r.AuthError.Fatal || r.AuthConnects != 1 {
		t.Errorf("forged token: error %+v after %d connects, want fatal CODE_UNAUTHENTICATED and no retry", r.AuthError, r.AuthConnects)
	}

	// The chat backlog after the first chat item, with the link lost in
	// the middle: every item once, in order.
	wantChat := []string{backlog[2], live[0], fresh, flaky, follower}
	answer(map[string]any{"from": backlog[0], "epoch": epoch, "count": len(wantChat), "user": user})
	r = next("dedupe")
	if !slices.Equal(r.OtherItems, wantChat) || r.OtherConnects != 2 {
		t.Errorf("dedupe: handled %v in %d links, want %v in 2", r.OtherItems, r.OtherConnects, wantChat)
	}
	if r.Stats.Duplicates == 0 || r.Points["chat"].ID != follower {
		t.Errorf("dedupe: %d duplicates dropped, chat point %+v; want some, and id %s", r.Stats.Duplicates, r.Points["chat"], follower)
	}
	t.Logf("dedupe: %d duplicates dropped", r.Stats.Duplicates)

	r = next("probe")
	if r.OtherConnects != 1 || r.Dropped < 2 || r.Stats.Probes < 1 {
		t.Errorf("probe: %d connects, %d pings lost, %d probes answered; want 1 connect, pings lost, probes answered",
			r.OtherConnects, r.Dropped, r.Stats.Probes)
	}
	t.Logf("probe: %d pings lost, %d probes answered", r.Dropped, r.Stats.Probes)

	r = next("switch")
	if len(r.OtherItems) != 0 || r.OtherConnects != 2 || len(r.Points) != 0 || r.Stats.User != user {
		t.Errorf("switch: items %v in %d connects, points %v, user %q; want none in 2, none, %q",
			r.OtherItems, r.OtherConnects, r.Points, r.Stats.User, user)
	}
	if r.Saved.Version != 1 || r.Saved.User != user || len(r.Saved.Points) != 0 {
		t.Errorf("switch: saved %+v, want version 1, user %q, no points", r.Saved, user)
	}

	// Every link spoke the JSON sub-protocol, and the gateway accepted
	// every ack.
	var sessions, refused int
	for line := range strings.SplitSeq(logs.String(), "\n") {
		switch {
		case strings.Contains(line, `"message":"session started"`):
			sessions++
			if !strings.Contains(line, `"transport":"ws-json"`) {
				t.Errorf("session not on the JSON sub-protocol: %s", line)
			}
		case strings.Contains(line, `"message":"session refused"`):
			refused++
			if !strings.Contains(line, "CODE_UNAUTHENTICATED") {
				t.Errorf("gateway: %s", line)
			}
		case strings.Contains(line, "ack refused"), strings.Contains(line, "probe unanswered"), strings.Contains(line, "idle link"):
			t.Errorf("gateway: %s", line)
		}
	}
	// First load, reload, reconnect after the flaky handler, other client,
	// two links of the dedupe client, the probed client, two links of the
	// user switch.
	if sessions != 9 || refused != 1 {
		t.Errorf("%d sessions started and %d refused, want 9 and 1 (the forged token)", sessions, refused)
	}
	answer(struct{}{})
	t.Logf("env ready in %v; browser phases in %v; total %v", envReady.Round(time.Millisecond),
		time.Since(browserStart).Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
}

// findChromium returns the Chromium binary, or skips the test without one
// (fails it in CI, which installs Chromium).
func findChromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"/usr/bin/chromium", "chromium"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	const msg = "no Chromium (/usr/bin/chromium, or chromium on PATH): the browser test of sluice.js needs it (apt-get install chromium)"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + "; CI=true, so this is a failure")
	}
	t.Skip(msg)
	return ""
}

// browser is a headless Chromium process run by a test.
type browser struct {
	cmd    *exec.Cmd
	out    *os.File
	exited chan struct{} // closed once the process has exited
	err    error         // Wait's error, set before exited closes
}

// startBrowser opens url in headless Chromium, in a profile of its own.
// At the end of the test the browser and every process it started are
// stopped and waited for.
func startBrowser(ctx context.Context, t *testing.T, chromium, url string) *browser {
	t.Helper()
	dir := t.TempDir()
	out, err := os.Create(dir + "/chromium.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, chromium,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--user-data-dir="+dir+"/profile", url)
	// A file, not a pipe: helpers that outlive the browser and keep its
	// output open cannot hold Wait up.
	cmd.Stdout, cmd.Stderr = out, out
	cmd.WaitDelay = 2 * time.Second
	isolate(cmd)
	if err := cmd.Start(); err != nil {
		out.Close()
		t.Fatalf("start chromium: %v", err)
	}
	b := &browser{cmd: cmd, out: out, exited: make(chan struct{})}
	go func() {
		b.err = cmd.Wait()
		close(b.exited)
	}()
	t.Cleanup(func() {
		if left := terminate(b); len(left) > 0 {
			t.Errorf("chromium processes left behind: %v", left)
		}
		out.Close()
		if t.Failed() {
			t.Logf("chromium output:\n%s", b.output())
		}
	})
	return b
}

// output returns the end of Chromium's output, without its D-Bus noise.
func (b *browser) output() string {
	data, err := os.ReadFile(b.out.Name())
	if err != nil {
		return err.Error()
	}
	var keep []string
	for line := range strings.SplitSeq(string(data), "\n") {
		if line != "" && !strings.Contains(line, "dbus") {
			keep = append(keep, line)
		}
	}
	if len(keep) > 40 {
		keep = keep[len(keep)-40:]
	}
	return strings.Join(keep, "\n")
}

// lockedBuffer is a bytes.Buffer safe for concurrent use (the gateway's
// log).
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
