package diff

import (
	"crypto/sha256"
	"fmt"
	"math/bits"

	"github.com/klauspost/compress/zstd"
)

// makeBytes returns a FormatBytes patch: new as one zstd frame with old as
// raw dictionary.
func makeBytes(old, new []byte) ([]byte, error) {
	encs := encoders{}
	defer encs.close()
	body, err := encs.encode(old, new)
	if err != nil {
		return nil, err
	}
	h := Header{Format: FormatBytes, Base: sha256.Sum256(old), Target: sha256.Sum256(new), Size: int64(len(new))}
	return h.seal(body), nil
}

// window is the zstd window for n bytes of history and input: the next
// power of two, within zstd's bounds (1 KiB to 512 MiB). With the window
// at least len(dict)+len(src), every byte of the dictionary stays in reach
// until the end of the input.
func window(n int) int {
	if n <= zstd.MinWindowSize {
		return zstd.MinWindowSize
	}
	return min(1<<bits.Len(uint(n-1)), zstd.MaxWindowSize)
}

// encoders reuses zstd encoders within one Make: a best-level encoder
// allocates tens of MB of match tables, more than most entries of an
// archive weigh. Encoders are kept by window (at least minWindow) and by
// whether they have a dictionary; a window cannot change on reset, a
// dictionary can. Not safe for concurrent use.
type encoders map[encoderKey]*zstd.Encoder

type encoderKey struct {
	window int
	dict   bool
}

// minWindow is the smallest window encoders uses, so that small entries
// share an encoder. A frame declares the window its input needs, not the
// encoder's, so a larger encoder window costs decoders nothing.
const minWindow = 1 << 20

// encode compresses src as one zstd frame at the best level, with dict,
// if not empty, as raw dictionary (initial history). The frame has no
// checksum and no dictionary ID: the patch checks both.
func (es encoders) encode(dict, src []byte) ([]byte, error) {
	k := encoderKey{window: max(window(len(dict)+len(src)), minWindow), dict: len(dict) > 0}
	enc, ok := es[k]
	switch {
	case !ok:
		opts := []zstd.EOption{
			zstd.WithEncoderLevel(zstd.SpeedBestCompression),
			zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(false),
			zstd.WithWindowSize(k.window),
		}
		if k.dict {
			opts = append(opts, zstd.WithEncoderDictRaw(0, dict))
		}
		var err error
		if enc, err = zstd.NewWriter(nil, opts...); err != nil {
			return nil, fmt.Errorf("diff: zstd encoder: %w", err)
		}
		es[k] = enc
	case k.dict:
		if err := enc.ResetWithOptions(nil, zstd.WithEncoderDictRaw(0, dict)); err != nil {
			return nil, fmt.Errorf("diff: zstd encoder: %w", err)
		}
	}
	return enc.EncodeAll(src, nil), nil
}

func (es encoders) close() {
	for _, enc := range es {
		_ = enc.Close() // an encoder used only through EncodeAll has nothing to flush
	}
}

// decode decompresses src, made by encode with the same dict, which must
// give exactly size bytes. It decodes no more than size bytes, and
// refuses frames whose window exceeds twice size (encode's never do).
func decode(dict, src []byte, size int64) ([]byte, error) {
	opts := []zstd.DOption{
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderLowmem(true),
		zstd.WithDecodeAllCapLimit(true),
		zstd.WithDecoderMaxMemory(uint64(max(2*size, 64<<10))),
	}
	if len(dict) > 0 {
		opts = append(opts, zstd.WithDecoderDictRaw(0, dict))
	}
	dec, err := zstd.NewReader(nil, opts...)
	if err != nil {
		return nil, fmt.Errorf("diff: zstd decoder: %w", err)
	}
	defer dec.Close()
	out, err := dec.DecodeAll(src, make([]byte, 0, size))
	if err != nil {
		return nil, fmt.Errorf("zstd: %v: %w", err, ErrCorrupt)
	}
	if int64(len(out)) != size {
		return nil, fmt.Errorf("decoded %d bytes, want %d: %w", len(out), size, ErrCorrupt)
	}
	return out, nil
}
