package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway"
	"google.golang.org/protobuf/proto"
)

// TestAnalytics uploads tracking events to the real sluiced's gateway
// listener with device tokens, as apps do, and reads the aggregates back
// through sluicectl: counters, retention and crash rates, as tables and
// as JSON.
func TestAnalytics(t *testing.T) {
	data := startSluiced(t)
	raw, err := os.ReadFile(filepath.Join(data, "endpoints.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ep struct{ WebSocket string }
	if err := json.Unmarshal(raw, &ep); err != nil {
		t.Fatal(err)
	}
	uploadURL := strings.Replace(strings.Replace(ep.WebSocket, "ws://", "http://", 1), "/v1/ws", "/v1/analytics", 1)
	key, err := gateway.LoadOrCreateKey(filepath.Join(data, tokenKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	signer := gateway.NewSigner(key)

	// Three days inside the late window: D0 (the cohort), D1 and D2.
	today := time.Now().UTC().Truncate(24 * time.Hour)
	d0, d1, d2 := today.AddDate(0, 0, -3), today.AddDate(0, 0, -2), today.AddDate(0, 0, -1)
	at := func(d time.Time, h, m int) int64 {
		return d.Add(time.Duration(h)*time.Hour + time.Duration(m)*time.Minute).UnixMilli()
	}
	n := 0
	ev := func(typ analyticspb.Type, ms int64, mod ...func(*analyticspb.Event)) *analyticspb.Event {
		n++
		e := &analyticspb.Event{Id: fmt.Sprint("e", n), Type: typ, TimeMs: ms, App: "shop", AppVersion: "5.1", Os: "android",
			Model: "Pixel 8", Region: "eu", Network: "wifi"}
		for _, f := range mod {
			f(e)
		}
		return e
	}
	page := func(p, from string) func(*analyticspb.Event) {
		return func(e *analyticspb.Event) { e.Page, e.Referrer = p, from }
	}
	named := func(name string) func(*analyticspb.Event) { return func(e *analyticspb.Event) { e.Name = name } }
	v52 := func(e *analyticspb.Event) { e.AppVersion, e.Os = "5.2", "ios" }
	h5 := func(e *analyticspb.Event) { e.Releases = map[string]string{"shop-h5": "2.1"} }
	upload := func(user, device string, evs ...*analyticspb.Event) {
		t.Helper()
		tok, err := signer.Issue(gateway.Claims{Device: device, User: user, App: "shop", Expires: time.Now().Add(time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		body, _ := proto.Marshal(&analyticspb.Batch{Events: evs})
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		_, _ = zw.Write(body)
		_ = zw.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, uploadURL, &gz)
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Content-Type", "application/x-protobuf")
		req.Header.Set("Content-Encoding", "gzip")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		reply := &analyticspb.IngestReply{}
		if resp.StatusCode != http.StatusOK || proto.Unmarshal(b, reply) != nil || int(reply.Accepted) != len(evs) {
			t.Fatalf("upload of %s: %s %q (%v)", device, resp.Status, b, reply)
		}
	}
	// D0: four new users. u1 browses and buys in a 10-minute session; u2
	// (5.2, release shop-h5 2.1) crashes and freezes; u3 browses and buys;
	// u4 (5.2) views one page.
	upload("u1", "d1",
		ev(analyticspb.Type_TYPE_SESSION_START, at(d0, 10, 0)),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d0, 10, 1), page("home", "")),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d0, 10, 5), page("cart", "home")),
		ev(analyticspb.Type_TYPE_CUSTOM, at(d0, 10, 6), named("purchase")),
		ev(analyticspb.Type_TYPE_SESSION_END, at(d0, 10, 10)))
	upload("u2", "d2",
		ev(analyticspb.Type_TYPE_SESSION_START, at(d0, 11, 0), v52, h5),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d0, 11, 1), v52, h5, page("home", "")),
		ev(analyticspb.Type_TYPE_CRASH, at(d0, 11, 2), v52, h5, func(e *analyticspb.Event) { e.Stack = "panic: boom\nmain.main()" }),
		ev(analyticspb.Type_TYPE_FREEZE, at(d0, 11, 3), v52, h5, func(e *analyticspb.Event) { e.Stack = "main.loop()"; e.DurationMs = 5000 }))
	upload("u3", "d3",
		ev(analyticspb.Type_TYPE_SESSION_START, at(d0, 12, 0)),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d0, 12, 1), page("home", "")),
		ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d0, 12, 2), page("search", "home")),
		ev(analyticspb.Type_TYPE_CUSTOM, at(d0, 12, 3), named("purchase")))
	upload("u4", "d4", ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d0, 13, 0), v52, page("home", "")))
	// D1: u1 and u2 come back (u2's new session closes its D0 one, 3
	// minutes long). D2: u1 again.
	upload("u1", "d1", ev(analyticspb.Type_TYPE_PAGE_VIEW, at(d1, 9, 0), page("home", "")))
	upload("u2", "d2", ev(analyticspb.Type_TYPE_SESSION_START, at(d1, 9, 0), v52, h5))
	upload("u1", "d1", ev(analyticspb.Type_TYPE_SESSION_START, at(d2, 9, 0)))

	day := d0.Format(dayLayout)
	must := func(args ...string) string {
		t.Helper()
		out, err := ctl(t, append([]string{"--data", data, "analytics"}, args...)...)
		if err != nil {
			t.Fatalf("sluicectl analytics %v: %v\n%s", args, err, out)
		}
		return out
	}
	match := func(out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !regexp.MustCompile(`(?m)` + w).MatchString(out) {
				t.Errorf("output has no line matching %q:\n%s", w, out)
			}
		}
	}

	// Counters of D0. WAU and MAU: users active in D0's week and month.
	weekUsers, monthUsers := map[string]bool{}, map[string]bool{}
	for _, a := range []struct {
		user string
		d    time.Time
	}{{"u1", d0}, {"u2", d0}, {"u3", d0}, {"u4", d0}, {"u1", d1}, {"u2", d1}, {"u1", d2}} {
		if y, w := a.d.ISOWeek(); func() bool { y0, w0 := d0.ISOWeek(); return y == y0 && w == w0 }() {
			weekUsers[a.user] = true
		}
		if a.d.Month() == d0.Month() {
			monthUsers[a.user] = true
		}
	}
	y, w := d0.ISOWeek()
	out := must("counters", "shop", day)
	match(out,
		`^shop `+day+` \(day, UTC\)$`,
		fmt.Sprintf(`^active users\s+DAU 4, WAU %d \(%04dW%02d\), MAU %d \(%s\)$`, len(weekUsers), y, w, len(monthUsers), d0.Format(monthLayout)),
		`^new users\s+4$`,
		`^sessions\s+4 \(average length 4m0s\)$`,
		`^crashes\s+1 \(1 of 4 sessions crashed: crash-free sessions 75\.00%\)$`,
		`^freezes\s+1 \(1 of 4 sessions froze\)$`,
		`^top 10 pages\nPAGE\s+VIEWS\nhome\s+4\ncart\s+1\nsearch\s+1\n`,
		`^top 10 page transitions\nFROM\s+TO\s+COUNT\nhome\s+cart\s+1\nhome\s+search\s+1\n`,
		`^custom events\nEVENT\s+COUNT\npurchase\s+2\n`,
		`^active users by version\nVERSION\s+USERS\s+SHARE\n5\.1\s+2\s+50\.0%\n5\.2\s+2\s+50\.0%\n`,
		`^active users by os\nOS\s+USERS\s+SHARE\nandroid\s+2\s+50\.0%\nios\s+2\s+50\.0%\n`,
		`^active users by network\nNETWORK\s+USERS\s+SHARE\nwifi\s+4\s+100\.0%\n`,
		`^active users by release\nPACKAGE\s+VERSION\s+USERS\s+SHARE\nshop-h5\s+2\.1\s+1\s+25\.0%$`,
	)
	var js counters
	if err := json.Unmarshal([]byte(must("counters", "shop", day, "--json")), &js); err != nil {
		t.Fatal(err)
	}
	if c := js.Counters; js.Period != day || c["dau"] != 4 || c["sessions@"] != 4 || c["crashed-sessions@"] != 1 || c["page:home"] != 4 || c["session-ms"] != 16*60_000 {
		t.Errorf("counters --json: %+v", js)
	}
	// A week sums its days' counters next to its active users.
	out = must("counters", "shop", fmt.Sprintf("%04dw%02d", y, w))
	match(out, fmt.Sprintf(`^shop %04dW%02d \(ISO week, UTC; counters summed over \d days, \d{8}-\d{8}\)$`, y, w),
		fmt.Sprintf(`^active users\s+WAU %d; DAU mean \d+\.\d, max 4 \(%s\)$`, len(weekUsers), day),
		`^active user-days by version\nVERSION\s+USER-DAYS\s+SHARE\n`)

	// Retention of the D0 cohort: 4, then 2 (u1, u2), then 1 (u1); the
	// day after D2 is today, with nobody yet, and later days are to come.
	out = must("retention", "shop", day, "--days", "5")
	match(out,
		`^retention of shop, cohort `+day+` \(users first seen that day, UTC\): 4 users$`,
		`^\s*DAY\s+0\s+1\s+2\s+3\s+4\s+5$`,
		`^\s*USERS\s+4\s+2\s+1\s+0\s+-\s+-$`,
		`^\s*%\s+100\.0\s+50\.0\s+25\.0\s+0\.0\s+-\s+-$`)
	var ret struct {
		Active []uint64 `json:"active"`
	}
	if err := json.Unmarshal([]byte(must("retention", "shop", day, "--days", "2", "--json")), &ret); err != nil || !slices.Equal(ret.Active, []uint64{4, 2, 1}) {
		t.Errorf("retention --json: %v, %v; want [4 2 1]", ret.Active, err)
	}

	// Crash rates of D0: all, per version, per release.
	out = must("crashes", "shop", day)
	match(out,
		`^crashes and freezes of shop on `+day+` `,
		`^all sessions\nSLICE\s+SESSIONS\s+CRASHED SESSIONS\s+CRASH RATE\s+CRASH-FREE\s+CRASHES\s+CRASHED USERS\s+CRASH-FREE USERS\s+FREEZES\s+FROZEN SESSIONS\s+FREEZE RATE\n`+
			`all\s+4\s+1\s+25\.00%\s+75\.00%\s+1\s+1\s+75\.00%\s+1\s+1\s+25\.00%$`,
		`^by app version\nVERSION\s+SESSIONS.*\n5\.1\s+2\s+0\s+0\.00%\s+100\.00%\s+0\s+0\s+100\.00%\s+0\s+0\s+0\.00%\n5\.2\s+2\s+1\s+50\.00%\s+50\.00%\s+1\s+1\s+50\.00%\s+1\s+1\s+50\.00%$`,
		`^by os\nOS\s+SESSIONS.*\n`,
		`^by model\nMODEL\s+SESSIONS.*\n`,
		`^by release\nPACKAGE\s+VERSION\s+SESSIONS.*\nshop-h5\s+2\.1\s+1\s+1\s+100\.00%\s+0\.00%\s+1\s+1\s+0\.00%\s+1\s+1\s+100\.00%$`)
	var cr struct {
		Slices map[string]analytics.CrashRate `json:"slices"`
	}
	if err := json.Unmarshal([]byte(must("crashes", "shop", day, "--json")), &cr); err != nil {
		t.Fatal(err)
	}
	if r := cr.Slices["v:5.2"]; r.Sessions != 2 || r.CrashedSessions != 1 || r.Rate != 0.5 {
		t.Errorf("crashes --json, v:5.2: %+v", r)
	}

	// Bad arguments are refused before any request.
	for _, args := range [][]string{{"counters", "shop", "2026W54"}, {"counters", "shop", "20261341"}, {"counters", "sh.op", "today"},
		{"retention", "shop", "202611"}, {"crashes", "shop"}, {"nope"}} {
		if out, err := ctl(t, append([]string{"--data", data, "analytics"}, args...)...); err == nil {
			t.Errorf("analytics %v: no error\n%s", args, out)
		}
	}
}

func TestParsePeriod(t *testing.T) {
	now := time.Date(2026, 11, 21, 0, 30, 0, 0, time.FixedZone("UTC+2", 2*3600)) // 20261120 in UTC
	for _, tc := range []struct {
		in, name, kind string
		days           int
	}{
		{"today", "20261120", "day", 1},
		{"yesterday", "20261119", "day", 1},
		{"20261121", "20261121", "day", 1},
		{"2026W47", "2026W47", "ISO week", 5}, // Monday the 16th to today, the 20th
		{"2026w1", "2026W01", "ISO week", 7},
		{"2020W53", "2020W53", "ISO week", 7},
		{"202611", "202611", "month", 20},
		{"202602", "202602", "month", 28},
	} {
		p, err := parsePeriod(tc.in, now)
		if err != nil || p.name != tc.name || p.kind != tc.kind || len(p.days) != tc.days {
			t.Errorf("parsePeriod(%q) = %+v, %v; want %s, a %s of %d days so far", tc.in, p, err, tc.name, tc.kind, tc.days)
		}
	}
	for _, in := range []string{"", "2026W54", "2026W0", "2021W53", "20261131", "202613", "2026-11-21", "tomorrow", "2026W"} {
		if p, err := parsePeriod(in, now); err == nil {
			t.Errorf("parsePeriod(%q) = %+v, want an error", in, p)
		}
	}
}
