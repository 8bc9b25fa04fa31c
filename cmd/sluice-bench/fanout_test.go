package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"regexp"
	"testing"
	"time"
)

// progressTo is where a smoke test's progress goes: stderr with -v.
func progressTo() io.Writer {
	if testing.Verbose() {
		return os.Stderr
	}
	return io.Discard
}

// runSmoke runs one benchmark with args and checks that its output has a
// line matching each pattern and holds each string once. No timing is
// asserted.
func runSmoke(t *testing.T, limit time.Duration, args []string, patterns, once []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	var out bytes.Buffer
	if err := run(ctx, args, &out, progressTo()); err != nil {
		t.Fatalf("run %v: %v\noutput:\n%s", args, err, out.String())
	}
	got := out.String()
	for _, p := range patterns {
		if !regexp.MustCompile(`(?m)` + p).MatchString(got) {
			t.Errorf("output has no line matching %q", p)
		}
	}
	for _, s := range once {
		if n := bytes.Count(out.Bytes(), []byte(s)); n != 1 {
			t.Errorf("output holds %q %d times, want once", s, n)
		}
	}
	if t.Failed() || testing.Verbose() {
		t.Logf("output:\n%s", got)
	}
}

// TestFanoutSmoke runs the fanout benchmark with tiny counts: the job must
// end DONE with every recipient written once, next to the raw baseline.
func TestFanoutSmoke(t *testing.T) {
	num := `\d+\.\d\d`
	runSmoke(t, time.Minute,
		[]string{"fanout", "-users", "3000", "-lat-n", "20", "-lat-gap", "1ms", "-lat-delay", "0s", "-poll", "20ms", "-timeout", "1m"},
		[]string{
			`^raw\s+3000\s+` + num + `\s+\d+\s+-\s`,
			`^fanout\s+3000\s+` + num + `\s+\d+\s+` + num + `x\s`,
			`^  during fanout\s+p50 ` + num + `ms`,
			`^interval fanout/raw ` + num + `x at 3000 users`,
		},
		[]string{
			"verify: oplog stream +3020 entries (3000 recipients + 20 single appends during the fanout): OK",
			"Status STATE_DONE total 3000 done 3000 failed 0, chunks 3 of 3 done: OK",
		})
}

func TestFanoutFlags(t *testing.T) {
	for _, args := range [][]string{
		{"fanout", "-users", "0"},
		{"fanout", "-fsync", "sometimes"},
		{"fanout", "-chunk", "20000"},
		{"fanout", "-transport", "udp"},
		{"fanout", "extra"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want a flag error", args)
		}
	}
}
