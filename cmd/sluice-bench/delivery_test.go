package main

import (
	"context"
	"io"
	"testing"
	"time"
)

// TestDeliverySmoke runs every scenario of the delivery benchmark with
// tiny counts: the rule must agree with oplog.Match and Place on every
// device, every update check must be answered right (half of them 304),
// and every switch change and baseline message must reach its clients.
// No timing is asserted.
func TestDeliverySmoke(t *testing.T) {
	num := `\d+\.\d\d`
	runSmoke(t, 2*time.Minute,
		[]string{"delivery", "-fsync", "interval", "-devices", "2000", "-rules-time", "100ms", "-switches", "5", "-packages", "2",
			"-concurrency", "4", "-http-time", "200ms", "-http-devices", "20", "-clients", "20", "-changes", "3", "-interval", "10ms"},
		[]string{
			`^gray rule \(Rule\.Match\)\s+\d+\s+\d+\s+\d+\.\d\s+\d+\.\d\d%$`,
			`^baseline \(oplog\.Match\)\s+\d+\s+\d+\s+\d+\.\d\s+\d+\.\d\d%$`,
			`^ratio rule/baseline\s+` + num + `x$`,
			`^view \(Delivery\.View\)\s+\d+\s+\d+\s+\d+\.\d\s+-$`,
			`^  view: 5\.0 switches and 2\.0 releases each`,
			`^  check: Rule\.Match == oplog\.Match && Place < 10% on all 2000 devices: 0 mismatches$`,
			`^http \(20 devices checked once first: view \d+ B, 5 switches, 2 releases each\)$`,
			`^trivial \(before\)\s+\d+\s+\d+\s+` + num + `\s+` + num + `\s+` + num + `\s+\d+\s+0\s+`,
			`^/v1/updates\s+\d+\s+\d+\s+` + num + `\s+` + num + `\s+` + num + `\s+\d+\s+\d+\s+`,
			`^trivial \(after\)\s+\d+\s+\d+\s+` + num + `\s+` + num + `\s+` + num + `\s+\d+\s+0\s+`,
			`^  /v1/updates: (49|50)\.\d% sent If-None-Match; (49|50)\.\d% answered 304, (49|50|51)\.\d% 200`,
			`^  ratio /v1/updates / trivial: ` + num + `x$`,
			`^switch \(20 clients online in ` + num + ` s, 10 matching; \d+ views sent to clients in all\)$`,
			`^switch change \(SetSwitch\)\s+3\s+30\s+` + num + `\s+` + num + `\s+` + num + `\s+0\s+0\s+`,
			`^Everyone message \(baseline\)\s+3\s+30\s+` + num + `\s+` + num + `\s+` + num + `\s+0\s+0\s+`,
			`^  final switch version \d+; stray items 0; slow-consumer cuts 0$`,
			`^http: /v1/updates \d+ req/s, ` + num + `x the trivial handler's \d+ req/s: goal at least 0\.60x: (MET|NOT MET)$`,
			`^switch: a change reached the matching clients in .*: (MET|NOT MET)$`,
		},
		[]string{"correctness: OK"})
}

// TestDeliverySwitchSDK runs the switch scenario with SDK clients: each
// must get every change through HandleView, with its manifests verified.
func TestDeliverySwitchSDK(t *testing.T) {
	num := `\d+\.\d\d`
	runSmoke(t, time.Minute,
		[]string{"delivery", "-scenario", "switch", "-fsync", "interval", "-switches", "3", "-packages", "1",
			"-clients", "10", "-changes", "2", "-interval", "10ms", "-client", "sdk"},
		[]string{
			`^switch change \(SetSwitch\)\s+2\s+10\s+` + num + `\s+` + num + `\s+` + num + `\s+0\s+0\s+`,
			`^Everyone message \(baseline\)\s+2\s+10\s+` + num + `\s+` + num + `\s+` + num + `\s+0\s+0\s+`,
			`; SDK reconnects 0$`,
		},
		[]string{"correctness: OK"})
}

func TestDeliveryFlags(t *testing.T) {
	for _, args := range [][]string{
		{"delivery", "-scenario", "rules,nope"},
		{"delivery", "-fsync", "never"},
		{"delivery", "-client", "ws"},
		{"delivery", "-clients", "1"},
		{"delivery", "-concurrency", "10", "-http-devices", "5"},
		{"delivery", "-rules-time", "0"},
		{"delivery", "extra"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want a flag error", args)
		}
	}
}
