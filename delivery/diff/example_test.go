package diff_test

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"

	"github.com/sluicehq/sluice/delivery/diff"
)

// A server makes a patch at upload; a device checks that the patch leads
// to the version the release announces, then applies it.
func Example() {
	v1 := []byte(strings.Repeat("func main() { println(\"v1\") }\n", 2000))
	v2 := append(bytes.Clone(v1), "func init() { println(\"v2\") }\n"...)

	// Server, at upload.
	patch, err := diff.Make(v1, v2, nil)
	if errors.Is(err, diff.ErrNotSmaller) {
		return // ship the full package
	}
	if err != nil {
		panic(err)
	}
	announced := sha256.Sum256(v2) // the release's digest of the package

	// Device, holding v1.
	h, err := diff.ReadHeader(patch)
	if err != nil || h.Format != diff.FormatBytes || h.Target != announced {
		return // download the full package
	}
	out, err := diff.Apply(v1, patch, nil)
	if err != nil {
		return // download the full package
	}
	fmt.Println(h.Format, bytes.Equal(out, v2), len(patch) < len(v2)/100)
	// Output: bytes true true
}

// For zip packages the release announces the tree digest too: the
// rebuilt archive has the new archive's files, not necessarily its bytes.
func Example_zip() {
	bundle := func(js string) []byte {
		var buf bytes.Buffer
		zw := zip.NewWriter(&buf)
		for name, data := range map[string]string{"index.html": "<script src=app.js></script>", "app.js": js} {
			w, _ := zw.Create(name)
			w.Write([]byte(data))
		}
		zw.Close()
		return buf.Bytes()
	}
	js := strings.Repeat("export function total(cart) { return cart.items.length }\n", 500)
	v1, v2 := bundle(js), bundle(js+"export const version = 2\n")

	patch, err := diff.Make(v1, v2, nil)
	if err != nil {
		panic(err)
	}
	announced, err := diff.TreeDigest(v2, nil)
	if err != nil {
		panic(err)
	}

	h, _ := diff.ReadHeader(patch)
	out, err := diff.Apply(v1, patch, nil)
	if err != nil || h.Target != announced {
		return // download the full package
	}
	got, _ := diff.TreeDigest(out, nil)
	fmt.Println(h.Format, got == announced)
	// Output: zip true
}
