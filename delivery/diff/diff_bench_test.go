package diff_test

import (
	"testing"

	"github.com/sluicehq/sluice/delivery/diff"
)

// benchPairs are the test packages: an H5 bundle (~770 KB) and a binary
// (~1.9 MB).
var benchPairs = []struct{ name, old, new string }{
	{"H5_770KB", "h5-v1.zip", "h5-v2.zip"},
	{"Binary_1900KB", "app-v1.bin", "app-v2.bin"},
}

// BenchmarkMake reports, besides the time, the patch's size and its
// share of the full package.
func BenchmarkMake(b *testing.B) {
	for _, p := range benchPairs {
		b.Run(p.name, func(b *testing.B) {
			old, new := mustRead(b, p.old), mustRead(b, p.new)
			b.ReportAllocs()
			b.SetBytes(int64(len(new)))
			var patch []byte
			for b.Loop() {
				var err error
				if patch, err = diff.Make(old, new, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(patch)), "patch-bytes")
			b.ReportMetric(float64(len(patch))/float64(len(new)), "patch/full")
		})
	}
}

func BenchmarkApply(b *testing.B) {
	for _, p := range benchPairs {
		b.Run(p.name, func(b *testing.B) {
			old, new := mustRead(b, p.old), mustRead(b, p.new)
			patch := mustMake(b, old, new)
			b.ReportAllocs()
			b.SetBytes(int64(len(new)))
			for b.Loop() {
				if _, err := diff.Apply(old, patch, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
