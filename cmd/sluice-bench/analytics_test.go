package main

import (
	"context"
	"io"
	"testing"
	"time"
)

// TestAnalyticsSmoke runs both scenarios of the analytics benchmark with
// tiny counts: every batch, over HTTP and over links, must be accepted whole, the stream must hold
// each event sent once, and the aggregates must agree with the
// generator's counts. No timing is asserted.
func TestAnalyticsSmoke(t *testing.T) {
	num := `\d+\.\d\d`
	runSmoke(t, time.Minute,
		[]string{"analytics", "-fsync", "interval", "-n", "3000", "-time", "5s", "-concurrency", "4", "-batch", "50", "-devices", "20",
			"-users", "3000", "-days", "8", "-queries", "20"},
		[]string{
			`^  events: \d+ B each encoded, mean; page \d+\.\d%, custom \d+\.\d%`,
			`^HTTP /v1/analytics\s+3000\s+` + num + `\s+\d+\s+` + num + `x\s+\d+\.\d\s+` + num + `\s+(` + num + `|-)\s+` + num + `\s+` + num + `$`,
			`^gateway link \(TLV\)\s+3000\s+` + num + `\s+\d+\s+` + num + `x\s+\d+\.\d\s+` + num + `\s+(` + num + `|-)\s+` + num + `\s+` + num + `$`,
			`^raw js\.PublishAsync\s+3000\s+` + num + `\s+\d+\s+-\s+`,
			`^  HTTP /v1/analytics: 60 requests, latency per request`,
			`^  gateway link \(TLV\): 60 requests, latency per request`,
			`^  stored: SLUICE_ANALYTICS held 6000 messages, \d+ B each \(each side into a new stream\); the raw stream \d+ B each$`,
			`^  projection: analytics\.Aggregates applied the last side's 3000 events from an empty store in \d+\.\d\d s: \d+ events/s`,
			`^query \(3000 users over 8 days, \d{8}-\d{8}: \d+ user-days, \d+ events\)$`,
			`^  projection: analytics\.Aggregates caught up with \d+ events in \d+\.\d s: \d+ events/s applied`,
			`^Counters\(app, day\) \(DAU\)\s+20\s+\d+\.\d{3}\s+\d+\.\d{3}\s+\d+\.\d{3}\s+\d+$`,
			`^Retention\(app, cohort, 30\)\s+20\s+`,
			`^raw badger: 1 point read \(n/<app>/<day>/dau\)\s+20\s+`,
			`^raw badger: 31 point reads \(r/<app>/<cohort>/<n>\)\s+20\s+`,
			`^ingest: HTTP /v1/analytics \d+ events/s, ` + num + `x raw js\.PublishAsync's \d+ events/s \(fsync interval\): goal at least 0\.50x: (MET|NOT MET)$`,
			`^ingest: gateway link \(TLV\) \d+ events/s, ` + num + `x raw js\.PublishAsync's \d+ events/s \(fsync interval\): goal at least 0\.50x: (MET|NOT MET)$`,
			`^query: 3000 users: Counters \(DAU\) p50 `,
		},
		[]string{
			"verify HTTP /v1/analytics: 3000 messages read back: 0 events missing, 0 duplicated, 0 not sent, 0 undecodable: OK",
			"verify gateway link (TLV): 3000 messages read back: 0 events missing, 0 duplicated, 0 not sent, 0 undecodable: OK",
			"check: DAU and new users of 8 days, retention of 8 cohorts against the generator's counts: OK",
			"correctness: OK",
		})
}

func TestAnalyticsFlags(t *testing.T) {
	for _, args := range [][]string{
		{"analytics", "-scenario", "ingest,nope"},
		{"analytics", "-fsync", "never"},
		{"analytics", "-sides", "http,ftp"},
		{"analytics", "-batch", "1001"},
		{"analytics", "-n", "10", "-batch", "100"},
		{"analytics", "-days", "1"},
		{"analytics", "-time", "0"},
		{"analytics", "extra"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want a flag error", args)
		}
	}
}
