package main

import (
	"bytes"
	"context"
	"io"
	"regexp"
	"testing"
	"time"
)

// TestOplogSmoke runs the oplog benchmark with tiny counts: it must finish
// without error and print a ratio and a summary. No timing is asserted.
func TestOplogSmoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out bytes.Buffer
	args := []string{"oplog", "-n", "2000", "-users", "100", "-fsync", "interval", "-lat-n", "200", "-timeout", "1m"}
	if err := run(ctx, args, &out, io.Discard); err != nil {
		t.Fatalf("run %v: %v\noutput:\n%s", args, err, out.String())
	}
	got := out.String()
	row := regexp.MustCompile(`(?m)^interval\s+100\s+2000\s+\d+\s+\d+\s+\d+\.\d\dx`)
	if !row.MatchString(got) {
		t.Errorf("output has no result row with a ratio:\n%s", got)
	}
	for _, want := range []string{"sluice append", "raw js.Publish", "summary"} {
		if !bytes.Contains(out.Bytes(), []byte(want)) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	t.Logf("output:\n%s", got)
}

func TestUnknownBenchmark(t *testing.T) {
	if err := run(context.Background(), []string{"nope"}, io.Discard, io.Discard); err == nil {
		t.Fatal("run nope: got nil error, want a usage error")
	}
}
