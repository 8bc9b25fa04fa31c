package diff_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/sluicehq/sluice/delivery/diff"
)

var update = flag.Bool("update", false, "rewrite the FuzzApply seed corpus in testdata/fuzz/FuzzApply")

// fuzzOpts keeps what a fuzzed patch may ask for small.
var fuzzOpts = &diff.Options{MaxSize: 1 << 20, MaxEntries: 64}

// FuzzApply feeds Apply an old package and a patch; with forge set, the
// patch's checksum is rewritten to match, so that mutations reach the
// parsers behind it. Apply must not panic, must fail only with its
// documented errors, and any output it returns must have the patch's
// Target digest.
func FuzzApply(f *testing.F) {
	for _, s := range seeds(f) {
		f.Add(s.old, s.patch, s.forge)
	}
	f.Fuzz(func(t *testing.T, old, patch []byte, forge bool) {
		if forge {
			patch = slices.Clone(patch)
			fixCRC(patch)
		}
		out, err := diff.Apply(old, patch, fuzzOpts)
		if err != nil {
			for _, want := range []error{diff.ErrCorrupt, diff.ErrWrongBase, diff.ErrMismatch, diff.ErrTooLarge} {
				if errors.Is(err, want) {
					return
				}
			}
			t.Fatalf("Apply: undocumented error %v", err)
		}
		h, err := diff.ReadHeader(patch)
		if err != nil {
			t.Fatalf("Apply succeeded on a patch ReadHeader refuses: %v", err)
		}
		switch h.Format {
		case diff.FormatBytes:
			if sha256.Sum256(out) != h.Target {
				t.Fatalf("output's SHA-256 is not the target")
			}
		case diff.FormatZip:
			d, err := diff.TreeDigest(out, fuzzOpts)
			if err != nil || d != h.Target {
				t.Fatalf("output's tree digest %x (%v) is not the target %x", d, err, h.Target)
			}
		}
	})
}

// seed is one entry of the FuzzApply corpus.
type seed struct {
	name       string
	old, patch []byte
	forge      bool
	valid      bool // Apply must succeed
}

// seeds returns valid patches of both formats and damaged ones.
func seeds(tb testing.TB) []seed {
	var s []seed
	pairs := smallPairs(tb)
	for _, format := range []diff.Format{diff.FormatBytes, diff.FormatZip} {
		old, new := pairs[format][0], pairs[format][1]
		patch := mustMake(tb, old, new)
		other := pairs[3-format][0]
		name := format.String()
		flip := func(i int) []byte {
			p := slices.Clone(patch)
			p[i] ^= 0x55
			return p
		}
		s = append(s,
			seed{name + "-valid", old, patch, false, true},
			seed{name + "-wrong-base", other, patch, false, false},
			seed{name + "-truncated-body", old, patch[:len(patch)/2], true, false},
			seed{name + "-truncated-header", old, patch[:40], true, false},
			seed{name + "-flipped-body", old, flip(90), true, false},
			seed{name + "-flipped-end", old, flip(len(patch) - 10), true, false},
			seed{name + "-flipped-size", old, flip(77), true, false},
			seed{name + "-bad-checksum", old, flip(len(patch) - 1), false, false},
		)
	}
	return s
}

// corpusLine encodes one value in the Go fuzz corpus format.
func corpusFile(s seed) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n[]byte(%q)\nbool(%v)\n", s.old, s.patch, s.forge)
}

// readCorpusFile decodes a corpus file written by corpusFile.
func readCorpusFile(b []byte) (old, patch []byte, forge bool, err error) {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 4 || lines[0] != "go test fuzz v1" {
		return nil, nil, false, fmt.Errorf("%d lines, header %q", len(lines), lines[0])
	}
	var vals [2][]byte
	for i := range vals {
		l := lines[1+i]
		if !strings.HasPrefix(l, "[]byte(") || !strings.HasSuffix(l, ")") {
			return nil, nil, false, fmt.Errorf("line %d: %.20q", 2+i, l)
		}
		s, err := strconv.Unquote(l[len("[]byte(") : len(l)-1])
		if err != nil {
			return nil, nil, false, fmt.Errorf("line %d: %v", 2+i, err)
		}
		vals[i] = []byte(s)
	}
	return vals[0], vals[1], lines[3] == "bool(true)", nil
}

// TestFuzzCorpus checks the committed seed corpus of FuzzApply: it holds
// every seed, and the valid ones still apply (the format has not moved
// on). With -update it rewrites the corpus.
func TestFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzApply")
	all := seeds(t)
	if *update {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, s := range all {
			if err := os.WriteFile(filepath.Join(dir, s.name), corpusFile(s), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, s := range all {
		b, err := os.ReadFile(filepath.Join(dir, s.name))
		if err != nil {
			t.Fatalf("%v (run go test -run TestFuzzCorpus -update)", err)
		}
		old, patch, forge, err := readCorpusFile(b)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if forge {
			fixCRC(patch)
		}
		_, err = diff.Apply(old, patch, fuzzOpts)
		if s.valid && err != nil {
			t.Errorf("%s: Apply: %v (the format changed? run go test -run TestFuzzCorpus -update)", s.name, err)
		}
		if !s.valid && err == nil {
			t.Errorf("%s: Apply succeeded on a damaged patch", s.name)
		}
		if s.valid && !bytes.Equal(corpusFile(s), b) {
			t.Logf("%s: the committed seed differs from a fresh one (still valid)", s.name)
		}
	}
}
