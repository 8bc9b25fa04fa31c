package diff

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash/crc32"

	"github.com/klauspost/compress/zstd"
)

// Format is the kind of a patch.
type Format uint8

const (
	// FormatBytes is a byte-level delta: the new package compressed with
	// zstd using the old package as a raw dictionary. Apply's output is
	// byte-identical to the new package.
	FormatBytes Format = 1
	// FormatZip is a file-level diff of two zip archives. Apply's output
	// is a zip archive with the new archive's tree (see TreeDigest), not
	// necessarily its bytes.
	FormatZip Format = 2
)

func (f Format) String() string {
	switch f {
	case FormatBytes:
		return "bytes"
	case FormatZip:
		return "zip"
	}
	return fmt.Sprintf("Format(%d)", uint8(f))
}

// Limits. See Options.
const (
	// DefaultMaxSize is the default of Options.MaxSize: 256 MiB.
	DefaultMaxSize = 256 << 20
	// MaxSizeLimit is the largest Options.MaxSize: 512 MiB, zstd's
	// largest window (klauspost/compress zstd.MaxWindowSize), so that
	// the whole old package stays in reach of the delta.
	MaxSizeLimit = zstd.MaxWindowSize
	// DefaultMaxEntries is the default of Options.MaxEntries.
	DefaultMaxEntries = 1 << 16
	// MaxEntriesLimit is the largest Options.MaxEntries.
	MaxEntriesLimit = 1 << 20
	// MaxNameLen bounds the length in bytes of an archive entry's name
	// and of its comment.
	MaxNameLen = 4096
)

// Options bounds what Make, Apply and TreeDigest accept. A nil *Options,
// and any zero field, means the default. The side that makes patches and
// the side that applies them should use the same limits: Apply refuses a
// patch whose output exceeds its own.
type Options struct {
	// MaxSize bounds, in bytes: each of old and new (Make) and old
	// (Apply); the uncompressed content of an archive, all its entries
	// together; and the output a patch declares (Apply). Zero means
	// DefaultMaxSize (256 MiB); at most MaxSizeLimit (512 MiB).
	MaxSize int64
	// MaxEntries bounds the entries of an archive. Zero means
	// DefaultMaxEntries (65,536); at most MaxEntriesLimit (1,048,576).
	MaxEntries int
}

// limits is Options with the defaults filled in.
type limits struct {
	maxSize    int64
	maxEntries int
}

func (o *Options) limits() (limits, error) {
	l := limits{maxSize: DefaultMaxSize, maxEntries: DefaultMaxEntries}
	if o == nil {
		return l, nil
	}
	switch {
	case o.MaxSize < 0 || o.MaxSize > MaxSizeLimit:
		return l, fmt.Errorf("diff: Options.MaxSize %d: want 0 to %d", o.MaxSize, MaxSizeLimit)
	case o.MaxEntries < 0 || o.MaxEntries > MaxEntriesLimit:
		return l, fmt.Errorf("diff: Options.MaxEntries %d: want 0 to %d", o.MaxEntries, MaxEntriesLimit)
	}
	if o.MaxSize > 0 {
		l.maxSize = o.MaxSize
	}
	if o.MaxEntries > 0 {
		l.maxEntries = o.MaxEntries
	}
	return l, nil
}

// Header is the self-describing head of a patch.
type Header struct {
	Format Format
	// Base is the digest of the old package the patch applies to:
	// SHA-256 of its bytes for FormatBytes, its TreeDigest for FormatZip.
	Base [32]byte
	// Target is the digest of the package Apply produces, which Apply
	// verifies: SHA-256 of its bytes for FormatBytes (the full new
	// package's SHA-256), its TreeDigest for FormatZip.
	Target [32]byte
	// Size is the size of the output for FormatBytes, and the
	// uncompressed size of all the output's entries together for
	// FormatZip.
	Size int64
}

// Patch layout: header, body, trailer.
const (
	magic      = "SLDF"
	version    = 1
	headerLen  = len(magic) + 1 + 1 + 32 + 32 + 8
	trailerLen = 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// seal returns the patch made of h, body and the trailer.
func (h Header) seal(body []byte) []byte {
	p := make([]byte, 0, headerLen+len(body)+trailerLen)
	p = append(p, magic...)
	p = append(p, version, byte(h.Format))
	p = append(p, h.Base[:]...)
	p = append(p, h.Target[:]...)
	p = binary.BigEndian.AppendUint64(p, uint64(h.Size))
	p = append(p, body...)
	return binary.BigEndian.AppendUint32(p, crc32.Checksum(p, castagnoli))
}

// ReadHeader returns the header of patch after checking its framing and
// checksum. It returns an error wrapping ErrCorrupt for anything that is
// not a whole patch of a version and format this package knows.
func ReadHeader(patch []byte) (Header, error) {
	h, _, err := open(patch)
	return h, err
}

// open checks patch and splits it into its header and body.
func open(patch []byte) (Header, []byte, error) {
	var h Header
	if len(patch) < headerLen+trailerLen {
		return h, nil, fmt.Errorf("%d bytes, shorter than a patch: %w", len(patch), ErrCorrupt)
	}
	if string(patch[:len(magic)]) != magic {
		return h, nil, fmt.Errorf("not a patch: %w", ErrCorrupt)
	}
	end := len(patch) - trailerLen
	if crc32.Checksum(patch[:end], castagnoli) != binary.BigEndian.Uint32(patch[end:]) {
		return h, nil, fmt.Errorf("checksum mismatch: %w", ErrCorrupt)
	}
	if v := patch[4]; v != version {
		return h, nil, fmt.Errorf("format version %d, want %d: %w", v, version, ErrCorrupt)
	}
	h.Format = Format(patch[5])
	if h.Format != FormatBytes && h.Format != FormatZip {
		return h, nil, fmt.Errorf("unknown format %d: %w", patch[5], ErrCorrupt)
	}
	copy(h.Base[:], patch[6:38])
	copy(h.Target[:], patch[38:70])
	size := binary.BigEndian.Uint64(patch[70:78])
	if size > MaxSizeLimit {
		return h, nil, fmt.Errorf("declared size %d: %w", size, ErrCorrupt)
	}
	h.Size = int64(size)
	return h, patch[headerLen:end], nil
}

// Make returns a patch that turns old into new. If both are zip archives
// (recognised by content, not by name), it is a file-level diff
// (FormatZip); otherwise, or if either archive uses a feature this
// package does not handle, a byte-level zstd delta (FormatBytes).
//
// Make applies the patch before returning it, so it never returns one
// that Apply would refuse. It returns ErrNotSmaller if the patch is not
// smaller than new, and ErrTooLarge if old or new exceeds opts.MaxSize.
// It holds old, new and the encoder's window (about twice the next power
// of two of len(old)+len(new)) in memory.
func Make(old, new []byte, opts *Options) ([]byte, error) {
	lim, err := opts.limits()
	if err != nil {
		return nil, err
	}
	if err := lim.check("old", int64(len(old))); err != nil {
		return nil, err
	}
	if err := lim.check("new", int64(len(new))); err != nil {
		return nil, err
	}
	var patch []byte
	if ot, nt, ok := readZips(old, new, lim); ok {
		patch, err = makeZip(ot, nt)
	} else {
		patch, err = makeBytes(old, new)
	}
	if err != nil {
		return nil, err
	}
	if len(patch) >= len(new) {
		return nil, fmt.Errorf("patch of %d bytes for a package of %d: %w", len(patch), len(new), ErrNotSmaller)
	}
	if _, err := Apply(old, patch, opts); err != nil {
		return nil, fmt.Errorf("diff: the patch made does not apply: %w", err)
	}
	return patch, nil
}

// readZips reads old and new as zip archives, if both are ones this
// package diffs by file.
func readZips(old, new []byte, lim limits) (ot, nt *tree, ok bool) {
	if !isZip(old) || !isZip(new) {
		return nil, nil, false
	}
	ot, err := readTree(old, lim)
	if err != nil {
		return nil, nil, false
	}
	nt, err = readTree(new, lim)
	if err != nil {
		return nil, nil, false
	}
	return ot, nt, true
}

// Apply rebuilds the new package from old and patch, and verifies it:
// old must have the patch's Base digest (else ErrWrongBase), the patch
// must be well formed and within opts (else ErrCorrupt or ErrTooLarge),
// and the output must have the patch's Target digest (else ErrMismatch).
// For a FormatBytes patch the output is byte-identical to the package the
// patch was made for; for a FormatZip patch it is a zip archive with the
// same tree (TreeDigest), rebuilt deterministically.
//
// Apply never panics on any patch. It verifies the output against the
// digest the patch carries; to trust the output, also compare the
// patch's Target (ReadHeader) with the digest the release announces.
func Apply(old, patch []byte, opts *Options) ([]byte, error) {
	lim, err := opts.limits()
	if err != nil {
		return nil, err
	}
	h, body, err := open(patch)
	if err != nil {
		return nil, err
	}
	if err := lim.check("the patch's output", h.Size); err != nil {
		return nil, err
	}
	if err := lim.check("old", int64(len(old))); err != nil {
		return nil, err
	}
	if h.Format == FormatZip {
		return applyZip(old, h, body, lim)
	}
	if sha256.Sum256(old) != h.Base {
		return nil, fmt.Errorf("SHA-256 of old %x, patch for %x: %w", short(sha256.Sum256(old)), short(h.Base), ErrWrongBase)
	}
	out, err := decode(old, body, h.Size)
	if err != nil {
		return nil, err
	}
	if got := sha256.Sum256(out); got != h.Target {
		return nil, fmt.Errorf("SHA-256 %x, want %x: %w", short(got), short(h.Target), ErrMismatch)
	}
	return out, nil
}

func (l limits) check(what string, n int64) error {
	if n > l.maxSize {
		return fmt.Errorf("%s is %d bytes, more than %d: %w", what, n, l.maxSize, ErrTooLarge)
	}
	return nil
}

// short is the head of a digest, for messages.
func short(d [32]byte) []byte { return d[:6] }
