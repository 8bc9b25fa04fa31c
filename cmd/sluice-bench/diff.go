package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/sluicehq/sluice/delivery/diff"
)

// The diff benchmark: for each pair of test packages, the patch
// delivery/diff makes, next to the full package and the full package
// compressed (what a client downloads without diffs).

// diffConfig is the command line of the diff benchmark.
type diffConfig struct {
	dir  string
	runs int
	zstd string
}

func parseDiffFlags(args []string, stderr io.Writer) (*diffConfig, error) {
	c := &diffConfig{}
	fs := flag.NewFlagSet("sluice-bench diff", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench diff [flags]

For each pair of packages <name>-v1.<ext> and <name>-v2.<ext> in -dir, makes
the patch from v1 to v2 with delivery/diff.Make, applies it with Apply and
checks the output (the same bytes as v2, or for a zip the same tree), and
prints the full size, the full package compressed by zstd -19 (the baseline:
what a client downloads without diffs when the transport compresses), the
patch size, the ratios and the Make and Apply times (median of -runs). When the
zstd command is found, it also prints zstd -19 --patch-from=v1 v2, the
reference tool's byte-level delta (for a zip: diffing the archive as bytes).

flags:`)
		fs.PrintDefaults()
	}
	fs.StringVar(&c.dir, "dir", "", "directory of the package pairs (default: testdata/packages of the repository holding the working directory)")
	fs.IntVar(&c.runs, "runs", 3, "times Make and Apply run per pair, the median reported")
	fs.StringVar(&c.zstd, "zstd", "zstd", `the zstd command for the -19 baseline and the --patch-from reference; "none" to use only Go's zstd`)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.runs < 1 || c.runs > 100 {
		return nil, errors.New("-runs: want 1 to 100")
	}
	return c, nil
}

// diffPair is two versions of a package.
type diffPair struct {
	name     string
	old, new string // paths
}

// diffPairs finds the pairs <name>-v1.<ext>, <name>-v2.<ext> in dir.
func diffPairs(dir string) ([]diffPair, error) {
	v1s, err := filepath.Glob(filepath.Join(dir, "*-v1.*"))
	if err != nil {
		return nil, err
	}
	var pairs []diffPair
	for _, old := range v1s {
		base := filepath.Base(old)
		i := strings.LastIndex(base, "-v1.")
		new := filepath.Join(dir, base[:i]+"-v2."+base[i+len("-v1."):])
		if _, err := os.Stat(new); err == nil {
			pairs = append(pairs, diffPair{name: base[:i], old: old, new: new})
		}
	}
	if len(pairs) == 0 {
		return nil, fmt.Errorf("no package pairs <name>-v1.<ext>, <name>-v2.<ext> in %s", dir)
	}
	slices.SortFunc(pairs, func(a, b diffPair) int { return strings.Compare(a.name, b.name) })
	return pairs, nil
}

// packagesDir returns testdata/packages of the module holding the working
// directory.
func packagesDir() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return filepath.Join(dir, "testdata", "packages"), nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory: give -dir")
		}
		dir = parent
	}
}

// diffResult is the measure of one pair.
type diffResult struct {
	pair       diffPair
	format     string // "bytes", "zip", or "full" when no patch is smaller
	full       int
	patch      int
	goZstd     int // full package, Go zstd at its best level
	cliZstd    int // full package, zstd -19; -1 without the command
	patchFrom  int // zstd -19 --patch-from; -1 without the command
	make       time.Duration
	apply      time.Duration
	verifiedOK bool
}

func runDiff(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	c, err := parseDiffFlags(args, stderr)
	if err != nil {
		return err
	}
	if c.dir == "" {
		if c.dir, err = packagesDir(); err != nil {
			return err
		}
	}
	pairs, err := diffPairs(c.dir)
	if err != nil {
		return err
	}
	cli, cliVersion := "", "not used"
	if c.zstd != "none" {
		cliVersion = "not found"
		if path, err := exec.LookPath(c.zstd); err == nil {
			cli = path
			cliVersion = "zstd, version unknown"
			out, _ := exec.CommandContext(ctx, cli, "-V").Output()
			for f := range strings.FieldsSeq(string(out)) { // *** Zstandard CLI (64-bit) v1.5.4, by Yann Collet ***
				if len(f) > 1 && f[0] == 'v' && strings.Contains(f, ".") {
					cliVersion = "zstd " + strings.TrimSuffix(f, ",")
				}
			}
		}
	}
	log := progressLogger(stderr)
	var results []diffResult
	for _, p := range pairs {
		log.Info().Str("pair", p.name).Msg("diffing")
		r, err := measurePair(ctx, p, c.runs, cli)
		if err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		results = append(results, r)
	}
	writeDiffReport(stdout, c, cliVersion, results)
	return nil
}

// measurePair makes and applies the patch of p runs times and measures
// the baselines.
func measurePair(ctx context.Context, p diffPair, runs int, cli string) (diffResult, error) {
	r := diffResult{pair: p, cliZstd: -1, patchFrom: -1}
	old, err := os.ReadFile(p.old)
	if err != nil {
		return r, err
	}
	new, err := os.ReadFile(p.new)
	if err != nil {
		return r, err
	}
	r.full = len(new)

	var patch []byte
	var makes, applies []time.Duration
	for range runs {
		if err := ctx.Err(); err != nil {
			return r, err
		}
		start := time.Now()
		patch, err = diff.Make(old, new, nil)
		makes = append(makes, time.Since(start))
		if errors.Is(err, diff.ErrNotSmaller) {
			patch = nil
			break
		}
		if err != nil {
			return r, fmt.Errorf("making the patch: %w", err)
		}
	}
	r.make = median(makes, func(d time.Duration) float64 { return float64(d) })
	if patch == nil {
		r.format, r.patch, r.verifiedOK = "full", len(new), true
	} else {
		h, err := diff.ReadHeader(patch)
		if err != nil {
			return r, err
		}
		r.format, r.patch = h.Format.String(), len(patch)
		var out []byte
		for range runs {
			start := time.Now()
			if out, err = diff.Apply(old, patch, nil); err != nil {
				return r, fmt.Errorf("applying the patch: %w", err)
			}
			applies = append(applies, time.Since(start))
		}
		r.apply = median(applies, func(d time.Duration) float64 { return float64(d) })
		if r.verifiedOK, err = sameOutput(h.Format, out, new); err != nil {
			return r, err
		}
	}

	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return r, err
	}
	r.goZstd = len(enc.EncodeAll(new, nil))
	_ = enc.Close()
	if cli != "" {
		if r.cliZstd, err = zstdSize(ctx, cli, "-19", p.new); err != nil {
			return r, err
		}
		if r.patchFrom, err = zstdSize(ctx, cli, "-19", "--patch-from="+p.old, p.new); err != nil {
			return r, err
		}
	}
	return r, nil
}

// sameOutput checks Apply's output against the new package, independently
// of Apply's own verification.
func sameOutput(f diff.Format, out, new []byte) (bool, error) {
	if f != diff.FormatZip {
		return bytes.Equal(out, new), nil
	}
	got, err := diff.TreeDigest(out, nil)
	if err != nil {
		return false, err
	}
	want, err := diff.TreeDigest(new, nil)
	if err != nil {
		return false, err
	}
	return got == want, nil
}

// zstdSize returns the size of a file compressed by the zstd command.
func zstdSize(ctx context.Context, cli string, args ...string) (int, error) {
	cmd := exec.CommandContext(ctx, cli, append([]string{"-q", "-c"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return 0, fmt.Errorf("zstd %s: %v: %s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return len(out), nil
}

func writeDiffReport(w io.Writer, c *diffConfig, cliVersion string, results []diffResult) {
	printf := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	printf("sluice-bench diff\n")
	printf("machine:   %d CPUs, GOMAXPROCS %d, %s %s/%s\n", runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	printf("packages:  %s\n", c.dir)
	printf("patch:     delivery/diff.Make (zip: by file; else: zstd SpeedBestCompression, old as raw dictionary), Apply; median of %d runs,\n", c.runs)
	printf("           one goroutine each; Make's time includes the Apply it runs to check its patch\n")
	printf("baseline:  zstd-19 = the full v2 compressed by the zstd command at -19 (%s): what a client downloads without diffs\n", cliVersion)
	printf("           when the transport compresses; go-zstd = the same by klauspost/compress at SpeedBestCompression\n\n")
	printf("%-8s %-6s %9s %9s %9s %9s %10s %13s %9s %9s\n", "pair", "format", "full B", "zstd-19 B", "go-zstd B", "patch B", "patch/full", "patch/zstd-19", "make ms", "apply ms")
	size := func(n int) string {
		if n < 0 {
			return "-"
		}
		return fmt.Sprint(n)
	}
	ok := true
	for _, r := range results {
		vsZstd := "-"
		if r.cliZstd > 0 {
			vsZstd = fmt.Sprintf("%.3f", float64(r.patch)/float64(r.cliZstd))
		}
		apply := "-"
		if r.format != "full" {
			apply = fmt.Sprintf("%.1f", float64(r.apply)/float64(time.Millisecond))
		}
		printf("%-8s %-6s %9d %9s %9d %9d %10.3f %13s %9.1f %9s\n", r.pair.name, r.format, r.full, size(r.cliZstd), r.goZstd, r.patch,
			float64(r.patch)/float64(r.full), vsZstd, float64(r.make)/float64(time.Millisecond), apply)
		ok = ok && r.verifiedOK
	}
	printf("\nreference: zstd -19 --patch-from=v1 v2 (the zstd command's byte-level delta; for a zip, diffing the archive's bytes)\n")
	for _, r := range results {
		if r.patchFrom < 0 {
			printf("  %-8s -\n", r.pair.name)
			continue
		}
		printf("  %-8s %9d B (patch/patch-from %.3f)\n", r.pair.name, r.patchFrom, float64(r.patch)/float64(r.patchFrom))
	}
	verdict := "OK"
	if !ok {
		verdict = "FAILED"
	}
	printf("\nverify: %d pairs, each output checked apart from Apply (the same bytes as v2, or for a zip the same tree): %s\n", len(results), verdict)
}
