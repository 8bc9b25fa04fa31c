package diff

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"slices"
	"strings"
)

// TreeDigest returns the digest of a zip archive's tree: SHA-256 over its
// entries in byte order of their names, each entry written as
//
//	name length (4 bytes, big-endian) | name | SHA-256 of the uncompressed content (32 bytes) | mode (4 bytes, big-endian)
//
// where mode is the Unix st_mode of the entry: 0o100000 for a file,
// 0o040000 for a directory, 0o120000 for a symbolic link, or'ed with the
// permission bits and setuid (0o4000), setgid (0o2000) and sticky
// (0o1000), as archive/zip's FileHeader.Mode reports them. Names are the
// bytes stored in the archive; directory entries count as entries, with
// empty content. Compression, timestamps, comments, extra fields and the
// order of entries are not part of the tree.
//
// TreeDigest returns an error wrapping ErrArchive for input that is not a
// zip archive it handles (see the package doc), and ErrTooLarge beyond
// opts' limits. An archive holding no entries has the digest of an empty
// input, the SHA-256 of nothing.
func TreeDigest(zipBytes []byte, opts *Options) ([32]byte, error) {
	lim, err := opts.limits()
	if err != nil {
		return [32]byte{}, err
	}
	t, err := readTree(zipBytes, lim)
	if err != nil {
		return [32]byte{}, err
	}
	return t.digest, nil
}

// tree is a zip archive read by readTree.
type tree struct {
	entries []*entry // in archive order
	sorted  []*entry // by name; an entry's index here names it in a patch
	digest  [32]byte
	size    int64 // uncompressed size of all entries
	comment string
}

// entry is one file of a tree.
type entry struct {
	f    *zip.File
	mode uint32
	sum  [32]byte
}

// isZip reports whether b starts as a zip archive does: with a local
// file header, or, for an empty archive, the end of central directory.
func isZip(b []byte) bool {
	return bytes.HasPrefix(b, []byte("PK\x03\x04")) || bytes.HasPrefix(b, []byte("PK\x05\x06"))
}

// readTree reads a zip archive and the digest of every entry, within lim:
// it decompresses at most lim.maxSize bytes in all, and no entry beyond
// the size its header declares.
func readTree(b []byte, lim limits) (*tree, error) {
	if !isZip(b) {
		return nil, fmt.Errorf("no zip signature at the start: %w", ErrArchive)
	}
	r, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) { // names are data here, never paths to write to
		return nil, fmt.Errorf("%v: %w", err, ErrArchive)
	}
	if len(r.File) > lim.maxEntries {
		return nil, fmt.Errorf("%d entries, more than %d: %w", len(r.File), lim.maxEntries, ErrTooLarge)
	}
	t := &tree{entries: make([]*entry, len(r.File)), comment: r.Comment}
	buf := make([]byte, 32<<10)
	for i, f := range r.File {
		e, err := readEntry(f, lim.maxSize-t.size, buf)
		if err != nil {
			return nil, fmt.Errorf("entry %d %.64q: %w", i, f.Name, err)
		}
		t.size += int64(f.UncompressedSize64)
		t.entries[i] = e
	}
	t.sorted = slices.Clone(t.entries)
	slices.SortFunc(t.sorted, func(a, b *entry) int { return strings.Compare(a.f.Name, b.f.Name) })
	h := sha256.New()
	for i, e := range t.sorted {
		if i > 0 && t.sorted[i-1].f.Name == e.f.Name {
			return nil, fmt.Errorf("two entries named %.64q: %w", e.f.Name, ErrArchive)
		}
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(e.f.Name))))
		h.Write([]byte(e.f.Name))
		h.Write(e.sum[:])
		h.Write(binary.BigEndian.AppendUint32(nil, e.mode))
	}
	h.Sum(t.digest[:0])
	return t, nil
}

// readEntry checks f and hashes its content, refusing more than budget
// bytes.
func readEntry(f *zip.File, budget int64, buf []byte) (*entry, error) {
	switch {
	case len(f.Name) > MaxNameLen || len(f.Comment) > MaxNameLen:
		return nil, fmt.Errorf("name or comment longer than %d bytes: %w", MaxNameLen, ErrArchive)
	case f.Flags&0x1 != 0:
		return nil, fmt.Errorf("encrypted: %w", ErrArchive)
	case f.Method != zip.Store && f.Method != zip.Deflate:
		return nil, fmt.Errorf("compression method %d: %w", f.Method, ErrArchive)
	case f.UncompressedSize64 > uint64(budget):
		return nil, fmt.Errorf("%d bytes uncompressed, over the archive's remaining %d: %w", f.UncompressedSize64, budget, ErrTooLarge)
	}
	mode, ok := unixMode(f.Mode())
	if !ok {
		return nil, fmt.Errorf("mode %v: %w", f.Mode(), ErrArchive)
	}
	rc, err := f.Open()
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrArchive)
	}
	defer rc.Close()
	h := sha256.New()
	// archive/zip fails a read past the declared size, or short of it, or
	// with a wrong CRC-32; the limit is a second guard.
	n, err := io.CopyBuffer(h, io.LimitReader(rc, int64(f.UncompressedSize64)+1), buf)
	if err == nil && uint64(n) != f.UncompressedSize64 {
		err = fmt.Errorf("%d bytes, header says %d", n, f.UncompressedSize64)
	}
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, ErrArchive)
	}
	e := &entry{f: f, mode: mode}
	h.Sum(e.sum[:0])
	return e, nil
}

// content returns e's uncompressed content, of the size readTree checked.
func (e *entry) content() ([]byte, error) {
	rc, err := e.f.Open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	size := int64(e.f.UncompressedSize64)
	buf := bytes.NewBuffer(make([]byte, 0, size+bytes.MinRead))
	// Reading to EOF makes archive/zip check the CRC-32.
	if _, err := buf.ReadFrom(io.LimitReader(rc, size+1)); err != nil {
		return nil, err
	}
	if int64(buf.Len()) != size {
		return nil, fmt.Errorf("%d bytes, header says %d", buf.Len(), size)
	}
	return buf.Bytes(), nil
}

// unixMode maps m to a Unix st_mode, for files, directories and symbolic
// links only.
func unixMode(m fs.FileMode) (uint32, bool) {
	u := uint32(m.Perm())
	switch m.Type() {
	case 0:
		u |= 0o100000
	case fs.ModeDir:
		u |= 0o040000
	case fs.ModeSymlink:
		u |= 0o120000
	default:
		return 0, false
	}
	if m&fs.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		u |= 0o1000
	}
	return u, true
}
