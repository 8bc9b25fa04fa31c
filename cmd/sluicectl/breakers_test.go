package main

import (
	"regexp"
	"testing"
)

// TestBreakersAndDiagnostics drives circuit breakers and diagnostics
// requests through sluicectl against the real sluiced binary.
func TestBreakersAndDiagnostics(t *testing.T) {
	t.Setenv("SLUICE_ADMIN_TOKEN", "")
	data := startSluiced(t)
	must := func(want string, args ...string) string {
		t.Helper()
		out, err := ctl(t, append([]string{"--data", data}, args...)...)
		if err != nil {
			t.Fatalf("sluicectl %v: %v\n%s", args, err, out)
		}
		if !regexp.MustCompile(want).MatchString(out) {
			t.Fatalf("sluicectl %v printed:\n%s\nwant %q", args, out, want)
		}
		return out
	}
	fails := func(want string, args ...string) {
		t.Helper()
		out, err := ctl(t, append([]string{"--data", data}, args...)...)
		if err == nil || !regexp.MustCompile(want).MatchString(err.Error()) {
			t.Fatalf("sluicectl %v: %v\n%s\nwant an error matching %q", args, err, out, want)
		}
	}
	must(`breaker shop-crash set`, "breaker", "set", "shop-crash", "--app", "shop", "--package", "shop-h5", "--version", "2.0",
		"--threshold", "0.1", "--min-sessions", "50", "--window", "15m")
	must(`breaker feed-freeze set`, "breaker", "set", "feed-freeze", "--app", "shop", "--switch", "new-feed", "--model", "Pixel 8",
		"--metric", "freeze", "--action", "off", "--threshold", "0.3")
	must(`(?m)^shop-crash\s+shop-h5 2\.0\s+METRIC_CRASH_RATE\s+10\.00%\s+50\s+15m0s\s+ACTION_PAUSE`, "breaker", "list")
	must(`(?m)^feed-freeze\s+switch new-feed=\s+Pixel 8\s+METRIC_FREEZE_RATE`, "breaker", "list")
	fails(`ERROR_CODE_INVALID`, "breaker", "set", "bad", "--app", "shop", "--package", "p", "--version", "1", "--threshold", "2")
	fails(`ERROR_CODE_INVALID`, "breaker", "set", "bad", "--app", "shop", "--switch", "k", "--action", "pause")
	must(`breaker shop-crash removed`, "breaker", "rm", "shop-crash")
	fails(`ERROR_CODE_NOT_FOUND`, "breaker", "rm", "shop-crash")

	out := must(`diagnostics \S+ requested \(DIAGNOSTIC_STATUS_REQUESTED\)`, "diag", "request", "--device", "phone-1", "--note", "ticket 42")
	id := regexp.MustCompile(`diagnostics (\S+) requested`).FindStringSubmatch(out)[1]
	must(`"phone-1"`, "diag", "show", id)
	must(id, "diag", "list")
	fails(`ERROR_CODE_NOT_FOUND`, "diag", "logs", id, "phone-1")
	fails(`ERROR_CODE`, "diag", "request")
}
