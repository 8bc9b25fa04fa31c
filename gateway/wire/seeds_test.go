package wire_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/sluicehq/sluice/gateway/wire"
)

// TestWriteSeeds rewrites the fuzz seed corpora in testdata/fuzz when
// SLUICE_WRITE_SEEDS=1 (after a protocol change); otherwise it checks that
// every corpus exists.
func TestWriteSeeds(t *testing.T) {
	c := codec(t, wire.Options{})
	seeds := map[string][][]byte{}
	var stream []byte
	for _, fr := range append(frames(), big()) {
		for _, z := range []bool{false, true} {
			b, _ := c.AppendTLV(nil, fr, z)
			seeds["FuzzReadTLV"] = append(seeds["FuzzReadTLV"], b)
			stream = append(stream, b...)
			m, _ := c.EncodeBinary(fr, z)
			seeds["FuzzDecodeBinary"] = append(seeds["FuzzDecodeBinary"], m)
		}
		j, _ := c.EncodeJSON(fr)
		seeds["FuzzDecodeJSON"] = append(seeds["FuzzDecodeJSON"], j)
	}
	seeds["FuzzReadTLV"] = append(seeds["FuzzReadTLV"], stream,
		[]byte{99, 0, 0, 0, 0}, []byte{7, 0xff, 0xff, 0xff, 0xff}, []byte{7 | wire.FlagZstd, 0, 0, 0, 3, 1, 2, 3}, []byte{7, 0})
	seeds["FuzzDecodeBinary"] = append(seeds["FuzzDecodeBinary"], []byte{}, []byte{0xff, 0xff}, []byte{0x28, 0xb5, 0x2f, 0xfd, 1, 2})
	seeds["FuzzDecodeJSON"] = append(seeds["FuzzDecodeJSON"], []byte(`{}`), []byte(`{"ping":`), []byte(`{"hello":{"version":"x"}}`))
	for name, list := range seeds {
		dir := filepath.Join("testdata", "fuzz", name)
		if os.Getenv("SLUICE_WRITE_SEEDS") != "1" {
			if entries, err := os.ReadDir(dir); err != nil || len(entries) < len(list) {
				t.Errorf("%s: %d seeds in %s, want %d (run with SLUICE_WRITE_SEEDS=1)", name, len(entries), dir, len(list))
			}
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for i, b := range list {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%s)\n", strconv.Quote(string(b)))
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}
