package diff_test

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery/diff"
)

// packagesDir holds the realistic test packages (see its README.md).
const packagesDir = "../../testdata/packages"

// mustRead returns a test package's bytes.
func mustRead(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(packagesDir, name))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// zfile is one entry of a zip built by mustZip.
type zfile struct {
	name  string
	data  string
	mode  fs.FileMode // 0 means 0o644
	store bool        // zip.Store, else zip.Deflate
}

// mustZip builds a zip archive of files, in their order.
func mustZip(tb testing.TB, files ...zfile) []byte {
	tb.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, f := range files {
		h := &zip.FileHeader{Name: f.name, Method: zip.Deflate, Modified: time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)}
		if f.store {
			h.Method = zip.Store
		}
		mode := f.mode
		if mode == 0 {
			mode = 0o644
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			tb.Fatal(err)
		}
		if _, err := io.WriteString(w, f.data); err != nil {
			tb.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// files returns the content and mode of every entry of a zip archive.
func files(tb testing.TB, b []byte) map[string]string {
	tb.Helper()
	r, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		tb.Fatal(err)
	}
	m := map[string]string{}
	for _, f := range r.File {
		rc, err := f.Open()
		if err != nil {
			tb.Fatal(err)
		}
		data, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			tb.Fatalf("%s: %v", f.Name, err)
		}
		if _, dup := m[f.Name]; dup {
			tb.Fatalf("%s twice", f.Name)
		}
		m[f.Name] = fmt.Sprintf("%v %s", f.Mode(), data)
	}
	return m
}

// sameFiles fails tb unless archives a and b hold the same files with the
// same content and modes.
func sameFiles(tb testing.TB, got, want []byte) {
	tb.Helper()
	g, w := files(tb, got), files(tb, want)
	for name, wv := range w {
		gv, ok := g[name]
		switch {
		case !ok:
			tb.Errorf("rebuilt archive lacks %s", name)
		case gv != wv:
			tb.Errorf("rebuilt %s differs: %d bytes, want %d", name, len(gv), len(wv))
		}
	}
	for name := range g {
		if _, ok := w[name]; !ok {
			tb.Errorf("rebuilt archive has %s, which the new one has not", name)
		}
	}
}

func mustTree(tb testing.TB, b []byte) [32]byte {
	tb.Helper()
	d, err := diff.TreeDigest(b, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

func mustMake(tb testing.TB, old, new []byte) []byte {
	tb.Helper()
	p, err := diff.Make(old, new, nil)
	if err != nil {
		tb.Fatalf("Make: %v", err)
	}
	return p
}

func mustHeader(tb testing.TB, patch []byte) diff.Header {
	tb.Helper()
	h, err := diff.ReadHeader(patch)
	if err != nil {
		tb.Fatal(err)
	}
	return h
}

// fixCRC rewrites the checksum at the end of a patch, as a forger would.
func fixCRC(p []byte) {
	if len(p) < 4 {
		return
	}
	end := len(p) - 4
	binary.BigEndian.PutUint32(p[end:], crc32.Checksum(p[:end], crc32.MakeTable(crc32.Castagnoli)))
}

// TestRoundTripPackages makes and applies patches between the realistic
// test packages: the rebuilt H5 bundle must have the new bundle's tree
// and files, the rebuilt binary its bytes; each patch must be a small
// fraction of the package.
func TestRoundTripPackages(t *testing.T) {
	for _, tc := range []struct {
		old, new string
		format   diff.Format
		maxRatio float64 // patch/full at most; measured 0.25 (h5), 0.05 (app)
	}{
		{"h5-v1.zip", "h5-v2.zip", diff.FormatZip, 0.3},
		{"app-v1.bin", "app-v2.bin", diff.FormatBytes, 0.1},
	} {
		t.Run(tc.new, func(t *testing.T) {
			old, new := mustRead(t, tc.old), mustRead(t, tc.new)
			patch := mustMake(t, old, new)
			h := mustHeader(t, patch)
			if h.Format != tc.format {
				t.Errorf("format %v, want %v", h.Format, tc.format)
			}
			ratio := float64(len(patch)) / float64(len(new))
			t.Logf("%s -> %s: full %d bytes, patch %d bytes (%.1f%%), format %v", tc.old, tc.new, len(new), len(patch), 100*ratio, h.Format)
			if ratio > tc.maxRatio {
				t.Errorf("patch is %.3f of the package, want at most %.2f", ratio, tc.maxRatio)
			}
			out, err := diff.Apply(old, patch, nil)
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			switch tc.format {
			case diff.FormatZip:
				if got, want := mustTree(t, out), mustTree(t, new); got != want || h.Target != want {
					t.Errorf("tree digest %x, want %x (header says %x)", got, want, h.Target)
				}
				if h.Base != mustTree(t, old) {
					t.Errorf("base %x is not the old tree digest", h.Base)
				}
				sameFiles(t, out, new)
			default:
				if !bytes.Equal(out, new) {
					t.Errorf("rebuilt %d bytes differ from the new package (%d bytes)", len(out), len(new))
				}
				if h.Target != sha256.Sum256(new) || h.Base != sha256.Sum256(old) {
					t.Errorf("header digests are not the packages' SHA-256")
				}
			}
			// The same patch is refused by the other version and by the
			// other pair's old package.
			for _, other := range []string{tc.new, "h5-v2.zip", "app-v2.bin"} {
				if _, err := diff.Apply(mustRead(t, other), patch, nil); !errors.Is(err, diff.ErrWrongBase) {
					t.Errorf("Apply to %s: got %v, want ErrWrongBase", other, err)
				}
			}
		})
	}
}

// randomBytes returns n bytes no compressor can shrink.
func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// text returns n bytes of compressible, code-like text.
func text(seed uint64, n int) string {
	r := rand.New(rand.NewPCG(seed, 7))
	words := []string{"const", "return", "order", "cart", "item", "price", "function", "(", ")", "{", "}", ";\n", "=", "user", "total"}
	var b strings.Builder
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		b.WriteByte(' ')
	}
	return b.String()[:n]
}

func TestNotSmaller(t *testing.T) {
	old, new := randomBytes(1, 20000), randomBytes(2, 20000)
	if _, err := diff.Make(old, new, nil); !errors.Is(err, diff.ErrNotSmaller) {
		t.Errorf("unrelated random files: got %v, want ErrNotSmaller", err)
	}
	// Unrelated archives: the patch carries every file whole. It can still
	// be a little smaller than the archive, whose per-entry headers take
	// more room than the patch's manifest, but not by more than those.
	zold := mustZip(t, zfile{name: "a.bin", data: string(randomBytes(3, 5000)), store: true})
	znew := mustZip(t, zfile{name: "a.bin", data: string(randomBytes(4, 5000)), store: true}, zfile{name: "b.bin", data: string(randomBytes(5, 5000))})
	patch, err := diff.Make(zold, znew, nil)
	switch {
	case errors.Is(err, diff.ErrNotSmaller):
	case err != nil:
		t.Fatal(err)
	case len(patch) < 10000:
		t.Errorf("unrelated archives of %d bytes: patch of %d, want at least the 10000 bytes of content", len(znew), len(patch))
	default:
		t.Logf("unrelated archives: new %d bytes, patch %d", len(znew), len(patch))
	}
}

func TestEmpty(t *testing.T) {
	content := []byte(text(1, 50000))
	for _, tc := range []struct {
		name     string
		old, new []byte
		smaller  bool
	}{
		{"both empty", nil, nil, false},
		{"old empty", nil, content, true},
		{"new empty", content, nil, false},
		{"empty archives", mustZip(t), mustZip(t), false},
		{"old archive empty", mustZip(t), mustZip(t, zfile{name: "a.js", data: string(content)}), true},
		{"new archive empty", mustZip(t, zfile{name: "a.js", data: string(content)}), mustZip(t), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			patch, err := diff.Make(tc.old, tc.new, nil)
			if !tc.smaller {
				if !errors.Is(err, diff.ErrNotSmaller) {
					t.Fatalf("Make: got %v, want ErrNotSmaller", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Make: %v", err)
			}
			out, err := diff.Apply(tc.old, patch, nil)
			if err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if mustHeader(t, patch).Format == diff.FormatZip {
				sameFiles(t, out, tc.new)
			} else if !bytes.Equal(out, tc.new) {
				t.Errorf("output differs")
			}
		})
	}
}

// TestEmptyOutput applies patches whose output is empty: Make never
// returns one (it is never smaller than nothing), but a patch may say so.
func TestEmptyOutput(t *testing.T) {
	old := []byte(text(2, 3000))
	base := mustMake(t, old, append(slices.Clone(old), "more"...))
	// An empty zstd frame as body, size 0, target SHA-256 of nothing.
	h := mustHeader(t, base)
	p := slices.Clone(base[:78])
	binary.BigEndian.PutUint64(p[70:], 0)
	sum := sha256.Sum256(nil)
	copy(p[38:70], sum[:])
	p = append(p, 0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x00, 0x01, 0x00, 0x00) // frame: single segment, size 0, one empty raw block
	p = append(p, 0, 0, 0, 0)
	fixCRC(p)
	out, err := diff.Apply(old, p, nil)
	if err != nil || len(out) != 0 {
		t.Errorf("Apply: %d bytes, %v; want 0 bytes, nil (base %x)", len(out), err, h.Base[:4])
	}
}

func TestIdentical(t *testing.T) {
	content := text(3, 100000)
	bin := []byte(content)
	arch := mustZip(t, zfile{name: "index.html", data: content[:2000]}, zfile{name: "app.js", data: content}, zfile{name: "img/", mode: fs.ModeDir | 0o755})
	for _, tc := range []struct {
		name string
		pkg  []byte
	}{{"bytes", bin}, {"zip", arch}} {
		t.Run(tc.name, func(t *testing.T) {
			patch := mustMake(t, tc.pkg, slices.Clone(tc.pkg))
			t.Logf("identical %s of %d bytes: patch of %d", tc.name, len(tc.pkg), len(patch))
			if len(patch) > 200 {
				t.Errorf("patch of %d bytes for identical versions, want at most 200", len(patch))
			}
			out, err := diff.Apply(tc.pkg, patch, nil)
			if err != nil {
				t.Fatal(err)
			}
			if tc.name == "bytes" && !bytes.Equal(out, tc.pkg) {
				t.Errorf("output differs")
			}
			if tc.name == "zip" {
				sameFiles(t, out, tc.pkg)
			}
		})
	}
}

func TestOnlyDeletes(t *testing.T) {
	js := text(4, 60000)
	old := mustZip(t,
		zfile{name: "a.js", data: js},
		zfile{name: "b.js", data: js[:30000] + "changed"},
		zfile{name: "c.png", data: string(randomBytes(6, 40000)), store: true},
		zfile{name: "d.css", data: js[:10000]},
		zfile{name: "e/", mode: fs.ModeDir | 0o755},
	)
	new := mustZip(t,
		zfile{name: "a.js", data: js},
		zfile{name: "c.png", data: string(randomBytes(6, 40000)), store: true},
	)
	patch := mustMake(t, old, new)
	if f := mustHeader(t, patch).Format; f != diff.FormatZip {
		t.Errorf("format %v, want zip", f)
	}
	t.Logf("deletes only: new %d bytes, patch %d", len(new), len(patch))
	if len(patch) > 300 {
		t.Errorf("patch of %d bytes for deletes only, want at most 300", len(patch))
	}
	out, err := diff.Apply(old, patch, nil)
	if err != nil {
		t.Fatal(err)
	}
	sameFiles(t, out, new)
}

// TestArchiveChanges covers what a release does to a bundle: a changed
// file, a file renamed by its content hash, a moved one, an added one, a
// deleted one, a mode change, a replaced image, a new directory.
func TestArchiveChanges(t *testing.T) {
	js := text(5, 80000)
	css := text(6, 20000)
	img1, img2 := string(randomBytes(7, 30000)), string(randomBytes(8, 30000))
	old := mustZip(t,
		zfile{name: "index.html", data: js[:3000]},
		zfile{name: "js/app.1f3e9c0a.js", data: js},
		zfile{name: "js/old.js", data: js[40000:]},
		zfile{name: "css/app.css", data: css},
		zfile{name: "img/a.png", data: img1, store: true},
		zfile{name: "bin/run.sh", data: "#!/bin/sh\necho hi\n"},
		zfile{name: "docs/readme.txt", data: css[:5000]},
	)
	new := mustZip(t,
		zfile{name: "bin/run.sh", data: "#!/bin/sh\necho hi\n", mode: 0o755},
		zfile{name: "index.html", data: strings.Replace(js[:3000], "cart", "basket", 3)},
		zfile{name: "js/app.77ab2045.js", data: js[:50000] + "function added() { return 42; }\n" + js[50000:]},
		zfile{name: "js/chunk.a1b2c3d4.js", data: text(9, 30000)},
		zfile{name: "css/app.css", data: strings.ReplaceAll(css, "price", "cost")},
		zfile{name: "img/a.png", data: img2, store: true},
		zfile{name: "readme.txt", data: css[:5000]},
		zfile{name: "fonts/", mode: fs.ModeDir | 0o755},
	)
	patch := mustMake(t, old, new)
	h := mustHeader(t, patch)
	if h.Format != diff.FormatZip {
		t.Errorf("format %v, want zip", h.Format)
	}
	// The image is carried whole (30000 bytes); everything else is small.
	t.Logf("new %d bytes, patch %d", len(new), len(patch))
	if len(patch) > 30000+8000 {
		t.Errorf("patch of %d bytes, want at most %d", len(patch), 38000)
	}
	ops, err := diff.Ops(old, patch)
	if err != nil {
		t.Fatal(err)
	}
	wantOps := []string{
		"bin/run.sh copy bin/run.sh", // a mode change alone carries no content
		"index.html delta index.html",
		"js/app.77ab2045.js delta js/app.1f3e9c0a.js",
		"js/chunk.a1b2c3d4.js delta js/app.1f3e9c0a.js+js/old.js",
		"css/app.css delta css/app.css",
		"img/a.png raw",
		"readme.txt copy docs/readme.txt",
		"fonts/ raw",
	}
	if !slices.Equal(ops, wantOps) {
		t.Errorf("operations:\n%s\nwant:\n%s", strings.Join(ops, "\n"), strings.Join(wantOps, "\n"))
	}
	out, err := diff.Apply(old, patch, nil)
	if err != nil {
		t.Fatal(err)
	}
	sameFiles(t, out, new)
	if mustTree(t, out) != mustTree(t, new) {
		t.Errorf("tree digests differ")
	}
	// The rebuilt archive keeps the new archive's order.
	var names []string
	r, err := zip.NewReader(bytes.NewReader(out), int64(len(out)))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range r.File {
		names = append(names, f.Name)
	}
	want := []string{"bin/run.sh", "index.html", "js/app.77ab2045.js", "js/chunk.a1b2c3d4.js", "css/app.css", "img/a.png", "readme.txt", "fonts/"}
	if !slices.Equal(names, want) {
		t.Errorf("entries %q, want %q", names, want)
	}
}

// TestMixed: a zip and a file that is not one are diffed as bytes (or not
// at all), as are archives this package does not diff by file.
func TestMixed(t *testing.T) {
	js := text(10, 40000)
	arch := mustZip(t, zfile{name: "app.js", data: js, store: true})
	file := []byte(js[:39000] + "tail")
	dup := mustZip(t, zfile{name: "app.js", data: js, store: true}, zfile{name: "app.js", data: js[:100], store: true})
	for _, tc := range []struct {
		name     string
		old, new []byte
	}{
		{"zip to file", arch, file},
		{"file to zip", file, arch},
		{"zip with a duplicate name", arch, dup},
		{"not a zip but named like one", append([]byte("xPK"), arch...), arch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			patch, err := diff.Make(tc.old, tc.new, nil)
			if errors.Is(err, diff.ErrNotSmaller) {
				t.Logf("not smaller: the full package ships")
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f := mustHeader(t, patch).Format; f != diff.FormatBytes {
				t.Errorf("format %v, want bytes", f)
			}
			t.Logf("new %d bytes, patch %d", len(tc.new), len(patch))
			out, err := diff.Apply(tc.old, patch, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out, tc.new) {
				t.Errorf("output differs")
			}
		})
	}
	// A zip patch applied to something that is not a zip.
	patch := mustMake(t, arch, mustZip(t, zfile{name: "app.js", data: js + "x", store: true}))
	if _, err := diff.Apply(file, patch, nil); !errors.Is(err, diff.ErrWrongBase) {
		t.Errorf("zip patch to a file: got %v, want ErrWrongBase", err)
	}
}

// smallPair returns a small old and new package of each format.
func smallPairs(tb testing.TB) map[diff.Format][2][]byte {
	js := text(11, 6000)
	return map[diff.Format][2][]byte{
		diff.FormatBytes: {[]byte(js), []byte(strings.Replace(js, "cart", "basket", 5) + "extra")},
		diff.FormatZip: {
			mustZip(tb, zfile{name: "a.js", data: js}, zfile{name: "b.txt", data: js[:500]}, zfile{name: "c.bin", data: "abc"}),
			mustZip(tb, zfile{name: "a.js", data: strings.Replace(js, "cart", "basket", 5)}, zfile{name: "b.txt", data: js[:500]}, zfile{name: "d.js", data: js[1000:1800]}),
		},
	}
}

// TestFlippedByte flips every byte of small patches: each must fail with
// ErrCorrupt (the checksum). With the checksum forged to match, each must
// still fail, with ErrCorrupt, ErrMismatch or (a flip in the base digest)
// ErrWrongBase, or give an output that verifies: never a wrong output.
func TestFlippedByte(t *testing.T) {
	for format, pair := range smallPairs(t) {
		t.Run(format.String(), func(t *testing.T) {
			old, new := pair[0], pair[1]
			patch := mustMake(t, old, new)
			if f := mustHeader(t, patch).Format; f != format {
				t.Fatalf("format %v, want %v", f, format)
			}
			var corrupt, mismatch, wrongBase, ok int
			for i := range patch {
				p := slices.Clone(patch)
				p[i] ^= 0x10
				if _, err := diff.Apply(old, p, nil); !errors.Is(err, diff.ErrCorrupt) {
					t.Fatalf("byte %d flipped: got %v, want ErrCorrupt", i, err)
				}
				fixCRC(p)
				out, err := diff.Apply(old, p, nil)
				switch {
				case err == nil:
					// Some bits change nothing that is verified: zstd's
					// unused header bit, or a zip timestamp, which the tree
					// leaves out. The output must still be right.
					ok++
					if format == diff.FormatBytes && !bytes.Equal(out, new) {
						t.Fatalf("byte %d flipped, checksum forged: a wrong output verified", i)
					}
					if format == diff.FormatZip && mustTree(t, out) != mustTree(t, new) {
						t.Fatalf("byte %d flipped, checksum forged: a wrong tree verified", i)
					}
				case errors.Is(err, diff.ErrCorrupt):
					corrupt++
				case errors.Is(err, diff.ErrMismatch):
					mismatch++
				case errors.Is(err, diff.ErrWrongBase) && i >= 6 && i < 38:
					wrongBase++
				case errors.Is(err, diff.ErrTooLarge) && i >= 70 && i < 78: // the declared size
					corrupt++
				default:
					t.Fatalf("byte %d flipped, checksum forged: got %v", i, err)
				}
			}
			t.Logf("%d bytes flipped one by one, checksum forged: corrupt %d, mismatch %d, wrong base %d, verified output %d",
				len(patch), corrupt, mismatch, wrongBase, ok)
			if wrongBase != 32 {
				t.Errorf("%d flips in the base digest gave ErrWrongBase, want 32", wrongBase)
			}
		})
	}
}

func TestTruncated(t *testing.T) {
	for format, pair := range smallPairs(t) {
		patch := mustMake(t, pair[0], pair[1])
		for n := range len(patch) {
			p := slices.Clone(patch[:n])
			if _, err := diff.Apply(pair[0], p, nil); !errors.Is(err, diff.ErrCorrupt) {
				t.Fatalf("%v patch cut to %d bytes: got %v, want ErrCorrupt", format, n, err)
			}
			fixCRC(p)
			if _, err := diff.Apply(pair[0], p, nil); err == nil {
				t.Fatalf("%v patch cut to %d bytes, checksum forged: Apply succeeded", format, n)
			}
		}
	}
}

func TestLimits(t *testing.T) {
	js := text(12, 300000)
	old, new := []byte(js), []byte(js+"more")
	small := &diff.Options{MaxSize: 100000}
	if _, err := diff.Make(old, new, small); !errors.Is(err, diff.ErrTooLarge) {
		t.Errorf("Make over MaxSize: got %v, want ErrTooLarge", err)
	}
	patch := mustMake(t, []byte(js[:1000]), new)
	if _, err := diff.Apply([]byte(js[:1000]), patch, small); !errors.Is(err, diff.ErrTooLarge) {
		t.Errorf("Apply of an output over MaxSize: got %v, want ErrTooLarge", err)
	}
	// A patch whose frame decodes to more than its header declares.
	p := slices.Clone(patch)
	binary.BigEndian.PutUint64(p[70:78], uint64(len(new)-1))
	fixCRC(p)
	if _, err := diff.Apply([]byte(js[:1000]), p, nil); !errors.Is(err, diff.ErrCorrupt) {
		t.Errorf("Apply of a frame longer than declared: got %v, want ErrCorrupt", err)
	}
	for _, o := range []*diff.Options{{MaxSize: -1}, {MaxSize: diff.MaxSizeLimit + 1}, {MaxEntries: diff.MaxEntriesLimit + 1}} {
		if _, err := diff.Make(old, new, o); err == nil || errors.Is(err, diff.ErrNotSmaller) {
			t.Errorf("Make with %+v: got %v, want an options error", *o, err)
		}
	}

	// A zip bomb: 8 MiB of zeros in a few KB.
	bomb := mustZip(t, zfile{name: "zeros", data: strings.Repeat("\x00", 8<<20)})
	if len(bomb) > 64<<10 {
		t.Fatalf("bomb of %d bytes", len(bomb))
	}
	if _, err := diff.TreeDigest(bomb, &diff.Options{MaxSize: 1 << 20}); !errors.Is(err, diff.ErrTooLarge) {
		t.Errorf("TreeDigest of a bomb: got %v, want ErrTooLarge", err)
	}
	many := mustZip(t, zfile{name: "a"}, zfile{name: "b"}, zfile{name: "c"})
	if _, err := diff.TreeDigest(many, &diff.Options{MaxEntries: 2}); !errors.Is(err, diff.ErrTooLarge) {
		t.Errorf("TreeDigest over MaxEntries: got %v, want ErrTooLarge", err)
	}
	long := mustZip(t, zfile{name: strings.Repeat("x", diff.MaxNameLen+1)})
	if _, err := diff.TreeDigest(long, nil); !errors.Is(err, diff.ErrArchive) {
		t.Errorf("TreeDigest of a long name: got %v, want ErrArchive", err)
	}
}

// TestZipLies: an archive whose header understates an entry's size.
func TestZipLies(t *testing.T) {
	arch := mustZip(t, zfile{name: "a.txt", data: strings.Repeat("abc", 1000)})
	// Patch the uncompressed size in the local and central headers to 100.
	lied := slices.Clone(arch)
	n := 0
	for i := 0; i+4 <= len(lied); i++ {
		if binary.LittleEndian.Uint32(lied[i:]) == 3000 {
			binary.LittleEndian.PutUint32(lied[i:], 100)
			n++
		}
	}
	if n == 0 {
		t.Fatal("size field not found")
	}
	if _, err := diff.TreeDigest(lied, nil); !errors.Is(err, diff.ErrArchive) {
		t.Errorf("TreeDigest: got %v, want ErrArchive", err)
	}
}

// TestTreeDigest recomputes the documented digest independently and
// checks what it covers and what it leaves out.
func TestTreeDigest(t *testing.T) {
	a := mustZip(t,
		zfile{name: "b.txt", data: "bee"},
		zfile{name: "a/", mode: fs.ModeDir | 0o755},
		zfile{name: "a/run", data: "#!", mode: 0o755},
	)
	var want []byte
	for _, e := range []struct {
		name, data string
		mode       uint32
	}{{"a/", "", 0o040755}, {"a/run", "#!", 0o100755}, {"b.txt", "bee", 0o100644}} {
		want = binary.BigEndian.AppendUint32(want, uint32(len(e.name)))
		want = append(want, e.name...)
		sum := sha256.Sum256([]byte(e.data))
		want = append(want, sum[:]...)
		want = binary.BigEndian.AppendUint32(want, e.mode)
	}
	if got := mustTree(t, a); got != sha256.Sum256(want) {
		t.Errorf("TreeDigest %x, want %x", got, sha256.Sum256(want))
	}
	// Order and compression are not part of the tree.
	b := mustZip(t,
		zfile{name: "a/run", data: "#!", mode: 0o755, store: true},
		zfile{name: "a/", mode: fs.ModeDir | 0o755},
		zfile{name: "b.txt", data: "bee", store: true},
	)
	if mustTree(t, a) != mustTree(t, b) {
		t.Errorf("order or compression changed the tree digest")
	}
	for name, c := range map[string][]byte{
		"mode":    mustZip(t, zfile{name: "b.txt", data: "bee"}, zfile{name: "a/", mode: fs.ModeDir | 0o755}, zfile{name: "a/run", data: "#!", mode: 0o644}),
		"content": mustZip(t, zfile{name: "b.txt", data: "bea"}, zfile{name: "a/", mode: fs.ModeDir | 0o755}, zfile{name: "a/run", data: "#!", mode: 0o755}),
		"name":    mustZip(t, zfile{name: "c.txt", data: "bee"}, zfile{name: "a/", mode: fs.ModeDir | 0o755}, zfile{name: "a/run", data: "#!", mode: 0o755}),
	} {
		if mustTree(t, c) == mustTree(t, a) {
			t.Errorf("a change of %s left the tree digest unchanged", name)
		}
	}
	if d := mustTree(t, mustZip(t)); d != sha256.Sum256(nil) {
		t.Errorf("empty archive: %x, want SHA-256 of nothing", d)
	}
	for name, bad := range map[string][]byte{
		"not a zip": []byte("hello"),
		"empty":     nil,
		"duplicate": mustZip(t, zfile{name: "x", data: "1"}, zfile{name: "x", data: "2"}),
		"truncated": mustZip(t, zfile{name: "x", data: "1"})[:40],
	} {
		if _, err := diff.TreeDigest(bad, nil); !errors.Is(err, diff.ErrArchive) {
			t.Errorf("%s: got %v, want ErrArchive", name, err)
		}
	}
}

func TestReadHeader(t *testing.T) {
	for _, bad := range [][]byte{nil, []byte("SLDF"), bytes.Repeat([]byte{0}, 100)} {
		if _, err := diff.ReadHeader(bad); !errors.Is(err, diff.ErrCorrupt) {
			t.Errorf("ReadHeader(%q): got %v, want ErrCorrupt", bad, err)
		}
	}
	for format, pair := range smallPairs(t) {
		patch := mustMake(t, pair[0], pair[1])
		// An unknown version or format is refused even with a valid checksum.
		for i, v := range map[int]byte{4: 2, 5: 3} {
			p := slices.Clone(patch)
			p[i] = v
			fixCRC(p)
			if _, err := diff.ReadHeader(p); !errors.Is(err, diff.ErrCorrupt) {
				t.Errorf("%v patch with byte %d = %d: got %v, want ErrCorrupt", format, i, v, err)
			}
		}
	}
}
