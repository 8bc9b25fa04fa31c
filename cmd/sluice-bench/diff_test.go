package main

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestDiffSmoke runs the diff benchmark once over the test packages: each
// patch must be made, applied and checked, and be smaller than the
// package. No timing is asserted.
func TestDiffSmoke(t *testing.T) {
	num := `\d+\.\d`
	size := `(\d+|-)` // "-" without the zstd command
	ratio := `0\.\d{3}`
	runSmoke(t, time.Minute,
		[]string{"diff", "-runs", "1"},
		[]string{
			`^app\s+bytes\s+1863842\s+` + size + `\s+\d+\s+\d+\s+` + ratio + `\s+(` + ratio + `|-)\s+` + num + `\s+` + num + `$`,
			`^h5\s+zip\s+768351\s+` + size + `\s+\d+\s+\d+\s+` + ratio + `\s+(` + ratio + `|-)\s+` + num + `\s+` + num + `$`,
			`^  app\s+(\d+ B \(patch/patch-from \d+\.\d{3}\)|-)$`,
		},
		[]string{
			"verify: 2 pairs, each output checked apart from Apply (the same bytes as v2, or for a zip the same tree): OK",
		})
}

// TestDiffFull: a pair with no smaller patch is reported as shipped full.
func TestDiffFull(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{"a-v1.txt": "one", "a-v2.txt": "two"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	runSmoke(t, time.Minute,
		[]string{"diff", "-dir", dir, "-runs", "1", "-zstd", "none"},
		[]string{`^a\s+full\s+3\s+-\s+\d+\s+3\s+1\.000\s+-\s+\d+\.\d\s+-$`},
		[]string{"verify: 1 pairs, each output checked apart from Apply (the same bytes as v2, or for a zip the same tree): OK"})
}

func TestDiffFlags(t *testing.T) {
	for _, args := range [][]string{
		{"diff", "-runs", "0"},
		{"diff", "-dir", t.TempDir()}, // no pairs
		{"diff", "-dir", filepath.Join(t.TempDir(), "missing")},
		{"diff", "extra"},
	} {
		if err := run(context.Background(), args, io.Discard, io.Discard); err == nil {
			t.Errorf("run %v: got nil error, want an error", args)
		}
	}
}
