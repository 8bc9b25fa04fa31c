package diff

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"path"
	"strings"
	"unicode/utf8"
)

// Where a FormatZip entry's content comes from.
const (
	opCopy  = 0 // the compressed data of an old entry with the same content, copied raw
	opRaw   = 1 // carried as is (already compressed content, tiny files)
	opZstd  = 2 // carried zstd-compressed
	opDelta = 3 // carried as a zstd delta against old entries
)

const (
	// maxManifest bounds the decompressed manifest of a FormatZip patch.
	maxManifest = 64 << 20
	// maxGroupDict bounds the dictionary made of old entries of the same
	// kind, for an added file (see deltaBase).
	maxGroupDict = 4 << 20
)

// zipEntry is one entry of a FormatZip manifest: the header fields the
// rebuilt archive keeps, and where the content comes from.
type zipEntry struct {
	name, comment    string
	method           uint16 // for carried entries; copies keep the old entry's
	modDate, modTime uint16 // MS-DOS date and time
	creator          uint16 // CreatorVersion, whose high byte makes Mode Unix or MS-DOS
	attrs            uint32 // ExternalAttrs
	nonUTF8          bool
	size             int64 // uncompressed
	op               byte
	old              int    // index into the old tree's sorted entries (opCopy)
	bases            []int  // increasing indices of the old entries whose content, concatenated, is the dictionary (opDelta)
	blob             []byte // carried data (opRaw, opZstd, opDelta)
}

// makeZip returns a FormatZip patch from archive ot to archive nt. An
// entry whose content some old entry has (unchanged, moved or duplicated)
// is copied from it; any other is carried as is, zstd-compressed, or as a
// zstd delta against the old entries deltaBase picks, whichever is
// smallest.
func makeZip(ot, nt *tree) ([]byte, error) {
	byName := make(map[string]int, len(ot.sorted))
	bySum := make(map[[32]byte]int, len(ot.sorted))
	byStem := make(map[string][]int)
	for i, e := range ot.sorted {
		byName[e.f.Name] = i
		if _, ok := bySum[e.sum]; !ok {
			bySum[e.sum] = i
		}
		if s := stem(e.f.Name); s != e.f.Name {
			byStem[s] = append(byStem[s], i)
		}
	}
	inNew := make(map[string]bool, len(nt.entries))
	for _, e := range nt.entries {
		inNew[e.f.Name] = true
	}

	encs := encoders{}
	defer encs.close()
	var m, blobs []byte
	m = binary.AppendUvarint(m, uint64(len(nt.entries)))
	m = appendString(m, nt.comment)
	for _, e := range nt.entries {
		ze := zipEntry{
			name: e.f.Name, comment: e.f.Comment, method: e.f.Method,
			modDate: e.f.ModifiedDate, modTime: e.f.ModifiedTime,
			creator: e.f.CreatorVersion, attrs: e.f.ExternalAttrs, nonUTF8: e.f.NonUTF8,
			size: int64(e.f.UncompressedSize64),
		}
		if i, ok := byName[e.f.Name]; ok && ot.sorted[i].sum == e.sum {
			ze.op, ze.old = opCopy, i
		} else if i, ok := bySum[e.sum]; ok {
			ze.op, ze.old = opCopy, i
		} else if err := carry(encs, &ze, e, ot, deltaBase(e, ot, byName, byStem, inNew)); err != nil {
			return nil, err
		}
		m = ze.append(m)
		blobs = append(blobs, ze.blob...)
	}

	zm, err := encs.encode(nil, m)
	if err != nil {
		return nil, err
	}
	body := binary.AppendUvarint(nil, uint64(len(m)))
	body = binary.AppendUvarint(body, uint64(len(zm)))
	body = append(body, zm...)
	body = append(body, blobs...)
	h := Header{Format: FormatZip, Base: ot.digest, Target: nt.digest, Size: nt.size}
	return h.seal(body), nil
}

// carry sets ze to carry e's content in the smallest of its forms: as is,
// zstd-compressed, or as a delta against the old entries bases (if any).
func carry(encs encoders, ze *zipEntry, e *entry, ot *tree, bases []int) error {
	content, err := e.content()
	if err != nil {
		return fmt.Errorf("diff: reading new entry %.64q: %w", e.f.Name, err)
	}
	ze.op, ze.blob = opRaw, content
	z, err := encs.encode(nil, content)
	if err != nil {
		return err
	}
	if len(z) < len(ze.blob) {
		ze.op, ze.blob = opZstd, z
	}
	if len(bases) == 0 {
		return nil
	}
	var dict []byte
	for _, i := range bases {
		c, err := ot.sorted[i].content()
		if err != nil {
			return fmt.Errorf("diff: reading old entry %.64q: %w", ot.sorted[i].f.Name, err)
		}
		dict = append(dict, c...)
	}
	d, err := encs.encode(dict, content)
	if err != nil {
		return err
	}
	if len(d) < len(ze.blob) {
		ze.op, ze.bases, ze.blob = opDelta, bases, d
	}
	return nil
}

// deltaBase returns the indices of the old entries whose content makes
// the best dictionary for e, in order of preference: the old entry of the
// same name (a changed file); else, among old entries whose names differ
// from e's only in content-hash segments (app.1f3e9c.js for app.77ab20.js),
// one not in the new archive and closest in size (a renamed file); else,
// for an added file, the old entries with the same extension, up to
// maxGroupDict bytes (a new chunk of an app shares much with the others).
func deltaBase(e *entry, ot *tree, byName map[string]int, byStem map[string][]int, inNew map[string]bool) []int {
	if i, ok := byName[e.f.Name]; ok {
		return []int{i}
	}
	best, bestDist := -1, uint64(0)
	for _, i := range byStem[stem(e.f.Name)] {
		o := ot.sorted[i].f
		if inNew[o.Name] {
			continue
		}
		dist := max(o.UncompressedSize64, e.f.UncompressedSize64) - min(o.UncompressedSize64, e.f.UncompressedSize64)
		if best < 0 || dist < bestDist {
			best, bestDist = i, dist
		}
	}
	if best >= 0 {
		return []int{best}
	}
	ext := path.Ext(e.f.Name)
	if ext == "" || strings.HasSuffix(e.f.Name, "/") {
		return nil
	}
	var group []int
	var n uint64
	for i, o := range ot.sorted {
		if path.Ext(o.f.Name) == ext && o.f.UncompressedSize64 > 0 && n+o.f.UncompressedSize64 <= maxGroupDict {
			group = append(group, i)
			n += o.f.UncompressedSize64
		}
	}
	return group
}

// stem returns name with every content-hash-like segment of its base name
// (between '.', '-' and '_') replaced by '*'.
func stem(name string) string {
	dir, base := path.Split(name)
	var b strings.Builder
	b.WriteString(dir)
	start := 0
	for i := 0; i <= len(base); i++ {
		if i < len(base) && base[i] != '.' && base[i] != '-' && base[i] != '_' {
			continue
		}
		if seg := base[start:i]; hashLike(seg) {
			b.WriteByte('*')
		} else {
			b.WriteString(seg)
		}
		if i < len(base) {
			b.WriteByte(base[i])
		}
		start = i + 1
	}
	return b.String()
}

// hashLike reports whether s looks like a content hash: at least 6 hex
// digits, or at least 8 letters and digits with both.
func hashLike(s string) bool {
	if len(s) < 6 {
		return false
	}
	hex, digit, letter := true, false, false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case '0' <= c && c <= '9':
			digit = true
		case 'a' <= c && c <= 'f':
			letter = true
		case 'g' <= c && c <= 'z' || 'A' <= c && c <= 'Z':
			letter, hex = true, false
		default:
			return false
		}
	}
	return hex || len(s) >= 8 && digit && letter
}

// append appends ze's manifest record to m.
func (ze *zipEntry) append(m []byte) []byte {
	m = appendString(m, ze.name)
	m = appendString(m, ze.comment)
	flags := uint64(0)
	if ze.nonUTF8 {
		flags = 1
	}
	for _, v := range []uint64{uint64(ze.method), uint64(ze.modDate), uint64(ze.modTime),
		uint64(ze.creator), uint64(ze.attrs), flags, uint64(ze.size)} {
		m = binary.AppendUvarint(m, v)
	}
	m = append(m, ze.op)
	switch ze.op {
	case opCopy:
		m = binary.AppendUvarint(m, uint64(ze.old))
	case opZstd:
		m = binary.AppendUvarint(m, uint64(len(ze.blob)))
	case opDelta:
		m = binary.AppendUvarint(m, uint64(len(ze.bases)))
		prev := -1
		for _, i := range ze.bases {
			m = binary.AppendUvarint(m, uint64(i-prev-1))
			prev = i
		}
		m = binary.AppendUvarint(m, uint64(len(ze.blob)))
	}
	return m
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// applyZip applies the body of a FormatZip patch to old.
func applyZip(old []byte, h Header, body []byte, lim limits) ([]byte, error) {
	ot, err := readTree(old, lim)
	if err != nil {
		return nil, fmt.Errorf("old: %v: %w", err, ErrWrongBase)
	}
	if ot.digest != h.Base {
		return nil, fmt.Errorf("tree digest of old %x, patch for %x: %w", short(ot.digest), short(h.Base), ErrWrongBase)
	}
	entries, comment, err := readManifest(body, ot, h, lim)
	if err != nil {
		return nil, err
	}
	out, err := writeZip(ot, entries, comment)
	if err != nil {
		return nil, err
	}
	nt, err := readTree(out, lim)
	if err != nil {
		return nil, fmt.Errorf("the rebuilt archive: %v: %w", err, ErrCorrupt)
	}
	if nt.digest != h.Target {
		return nil, fmt.Errorf("tree digest %x, want %x: %w", short(nt.digest), short(h.Target), ErrMismatch)
	}
	return out, nil
}

// readManifest parses and checks the body of a FormatZip patch: every
// size, index and length within the patch and the limits, the entries'
// sizes adding up to h.Size.
func readManifest(body []byte, ot *tree, h Header, lim limits) ([]zipEntry, string, error) {
	r := reader{b: body}
	rawLen := r.uvarint(maxManifest)
	zm := r.next(r.uvarint(uint64(len(body))))
	if r.err != nil {
		return nil, "", fmt.Errorf("manifest: %v: %w", r.err, ErrCorrupt)
	}
	man, err := decode(nil, zm, int64(rawLen))
	if err != nil {
		return nil, "", fmt.Errorf("manifest: %w", err)
	}
	blobs := reader{b: r.b}

	m := reader{b: man}
	n := m.uvarint(uint64(lim.maxEntries))
	comment := m.str(0xffff)
	if n > uint64(len(man))/10 { // an entry takes at least 10 bytes
		return nil, "", fmt.Errorf("manifest: %d entries in %d bytes: %w", n, len(man), ErrCorrupt)
	}
	entries := make([]zipEntry, n)
	remaining := uint64(h.Size)
	for i := range entries {
		ze := &entries[i]
		ze.name = m.str(MaxNameLen)
		ze.comment = m.str(MaxNameLen)
		ze.method = uint16(m.uvarint(0xffff))
		ze.modDate = uint16(m.uvarint(0xffff))
		ze.modTime = uint16(m.uvarint(0xffff))
		ze.creator = uint16(m.uvarint(0xffff))
		ze.attrs = uint32(m.uvarint(0xffffffff))
		ze.nonUTF8 = m.uvarint(1) == 1
		size := m.uvarint(remaining)
		remaining -= size
		ze.size = int64(size)
		ze.op = m.byte()
		switch ze.op {
		case opCopy:
			ze.old = m.index(len(ot.sorted))
			if m.err == nil && ot.sorted[ze.old].f.UncompressedSize64 != size {
				m.fail("copy of %d bytes from an entry of %d", size, ot.sorted[ze.old].f.UncompressedSize64)
			}
		case opRaw:
			ze.blob = blobs.next(size)
		case opZstd:
			ze.blob = blobs.next(m.uvarint(uint64(len(blobs.b))))
		case opDelta:
			ze.bases = m.bases(len(ot.sorted))
			ze.blob = blobs.next(m.uvarint(uint64(len(blobs.b))))
		default:
			m.fail("operation %d", ze.op)
		}
		if ze.op != opCopy && ze.method != zip.Store && ze.method != zip.Deflate {
			m.fail("compression method %d", ze.method)
		}
		if m.err != nil {
			return nil, "", fmt.Errorf("manifest entry %d: %v: %w", i, m.err, ErrCorrupt)
		}
	}
	switch {
	case blobs.err != nil:
		return nil, "", fmt.Errorf("data: %v: %w", blobs.err, ErrCorrupt)
	case m.err != nil || len(m.b) > 0 || len(blobs.b) > 0 || remaining > 0:
		return nil, "", fmt.Errorf("manifest: %v, %d bytes left, %d data bytes left, %d of the size unaccounted for: %w",
			m.err, len(m.b), len(blobs.b), remaining, ErrCorrupt)
	}
	return entries, comment, nil
}

// writeZip writes the archive entries describe, in their order.
func writeZip(ot *tree, entries []zipEntry, comment string) ([]byte, error) {
	est := int64(22 + len(comment))
	for _, e := range entries {
		est += 2 * int64(64+len(e.name)+len(e.comment))
		if e.op == opCopy {
			est += int64(ot.sorted[e.old].f.CompressedSize64)
		} else {
			est += e.size + e.size>>10
		}
	}
	var buf bytes.Buffer
	buf.Grow(int(est))
	zw := zip.NewWriter(&buf)
	if err := zw.SetComment(comment); err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	dicts := make(map[int][]byte) // old entries' content, read once however many deltas use them
	for i := range entries {
		if err := writeEntry(zw, ot, &entries[i], dicts); err != nil {
			return nil, fmt.Errorf("entry %d %.64q: %w", i, entries[i].name, err)
		}
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	return buf.Bytes(), nil
}

func writeEntry(zw *zip.Writer, ot *tree, e *zipEntry, dicts map[int][]byte) error {
	fh := &zip.FileHeader{
		Name: e.name, Comment: e.comment, NonUTF8: e.nonUTF8,
		CreatorVersion: e.creator&0xff00 | 20, ReaderVersion: 20, ExternalAttrs: e.attrs,
	}
	//lint:ignore SA1019 CreateRaw writes only these MS-DOS fields, and they round-trip exactly (Modified would add an extra field)
	fh.ModifiedDate, fh.ModifiedTime = e.modDate, e.modTime
	if e.op == opCopy {
		o := ot.sorted[e.old].f
		fh.Method, fh.CRC32 = o.Method, o.CRC32
		fh.CompressedSize64, fh.UncompressedSize64 = o.CompressedSize64, o.UncompressedSize64
		if !e.nonUTF8 && needsUTF8(e.name, e.comment) {
			fh.Flags |= 0x800 // as CreateHeader would set
		}
		w, err := zw.CreateRaw(fh)
		if err != nil {
			return fmt.Errorf("%v: %w", err, ErrCorrupt)
		}
		raw, err := o.OpenRaw()
		if err != nil {
			return fmt.Errorf("old entry: %v: %w", err, ErrWrongBase)
		}
		if _, err := io.Copy(w, raw); err != nil {
			return fmt.Errorf("%v: %w", err, ErrCorrupt)
		}
		return nil
	}
	content := e.blob
	switch e.op {
	case opZstd:
		var err error
		if content, err = decode(nil, e.blob, e.size); err != nil {
			return err
		}
	case opDelta:
		var dict []byte
		for _, i := range e.bases {
			c, ok := dicts[i]
			if !ok {
				var err error
				if c, err = ot.sorted[i].content(); err != nil {
					return fmt.Errorf("old entry: %v: %w", err, ErrWrongBase)
				}
				dicts[i] = c
			}
			if len(e.bases) == 1 {
				dict = c
			} else {
				dict = append(dict, c...)
			}
		}
		var err error
		if content, err = decode(dict, e.blob, e.size); err != nil {
			return err
		}
	}
	fh.Method = e.method
	w, err := zw.CreateHeader(fh)
	if err != nil {
		return fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	if _, err := w.Write(content); err != nil {
		return fmt.Errorf("%v: %w", err, ErrCorrupt)
	}
	return nil
}

// needsUTF8 reports whether a name and comment need the UTF-8 flag: they
// are valid UTF-8 and not all ASCII.
func needsUTF8(name, comment string) bool {
	s := name + comment
	if !utf8.ValidString(s) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return true
		}
	}
	return false
}

// reader reads a patch's fields; the first error sticks and later reads
// return zero values.
type reader struct {
	b   []byte
	err error
}

func (r *reader) fail(format string, args ...any) {
	if r.err == nil {
		r.err = fmt.Errorf(format, args...)
	}
}

// uvarint reads a uvarint of at most max.
func (r *reader) uvarint(max uint64) uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail("bad varint")
		return 0
	}
	if v > max {
		r.fail("value %d over %d", v, max)
		return 0
	}
	r.b = r.b[n:]
	return v
}

// bases reads a count and that many increasing indices below n, each
// stored as its distance from the previous one, minus one.
func (r *reader) bases(n int) []int {
	k := r.uvarint(uint64(n))
	if k == 0 {
		r.fail("delta against nothing")
	}
	if r.err != nil {
		return nil
	}
	idx := make([]int, k)
	next := uint64(0)
	for j := range idx {
		gap := r.uvarint(uint64(n))
		if r.err != nil || next+gap >= uint64(n) {
			r.fail("base index out of range")
			return nil
		}
		idx[j] = int(next + gap)
		next += gap + 1
	}
	return idx
}

// index reads an index below n.
func (r *reader) index(n int) int {
	if n == 0 {
		r.fail("index into nothing")
		return 0
	}
	return int(r.uvarint(uint64(n - 1)))
}

func (r *reader) byte() byte {
	if r.err != nil {
		return 0
	}
	if len(r.b) == 0 {
		r.fail("truncated")
		return 0
	}
	c := r.b[0]
	r.b = r.b[1:]
	return c
}

// next returns the next n bytes.
func (r *reader) next(n uint64) []byte {
	if r.err != nil {
		return nil
	}
	if n > uint64(len(r.b)) {
		r.fail("%d bytes wanted, %d left", n, len(r.b))
		return nil
	}
	b := r.b[:n:n]
	r.b = r.b[n:]
	return b
}

// str reads a length-prefixed string of at most max bytes.
func (r *reader) str(max uint64) string {
	return string(r.next(r.uvarint(max)))
}
