// Package diff makes and applies diff packages: patches that turn the
// version of a package a device has into the version being released, so
// that the device downloads the patch instead of the full package.
//
// Make runs at upload, once against each of the previous versions kept;
// Apply runs on the device. The client SDK imports this package, which
// depends only on the standard library and github.com/klauspost/compress.
// When a patch would not be smaller than the package, Make returns
// ErrNotSmaller and the full package ships instead. Make applies every
// patch it makes before returning it.
//
// # Two formats
//
// Zip archives (H5 offline bundles, and anything whose bytes start as a
// zip's) are diffed by file: FormatZip. A zip compresses each file on its
// own, so one changed line changes a whole run of compressed bytes, and the
// same files compressed by another tool, or another version of one, share
// no bytes at all: a delta of the archive's bytes finds little, so a
// compressed container is never diffed as bytes. Instead, entries are
// compared by name and by the SHA-256 of their uncompressed content. An
// entry whose content the old archive holds (unchanged, moved or
// duplicated) is copied from the old archive's compressed data and costs
// a few bytes of manifest; a deleted entry costs nothing; any other entry
// is carried in the smallest of three forms: as is (already compressed
// content such as PNG), zstd-compressed, or as a zstd delta against old
// content: the old entry of the same name (a changed file), else one whose
// name differs only in content-hash segments, as bundlers name files
// (app.1f3e9c0a.js for app.77ab2045.js), else, for an added file, the old
// entries with the same extension, up to 4 MiB (a new chunk of an app
// shares much with the others).
//
// Anything else (binaries, single files, a zip against a non-zip, an
// archive using a feature listed under Archives) gets a byte-level delta:
// FormatBytes, the new package compressed by zstd at its best level
// (zstd.SpeedBestCompression) with the old package as a raw dictionary and
// a window of the next power of two of the old plus the new package, so
// that all of the old package stays in reach.
//
// # Patch format
//
// A patch is a fixed header, a body and a checksum:
//
//	"SLDF" | version (1 byte: 1) | format (1 byte: 1 bytes, 2 zip)
//	| base digest (32 bytes) | target digest (32 bytes) | size (8 bytes)
//	| body | CRC-32C of everything before (4 bytes)
//
// Integers are big-endian. The body of a FormatBytes patch is one zstd
// frame, without dictionary ID or checksum, to be decoded with the old
// package as raw dictionary. The body of a FormatZip patch is the
// manifest's size and compressed size (uvarints), the manifest as one zstd
// frame, then the data carried for the entries, in their order. The
// manifest holds the entry count and the archive comment, then for each
// entry of the new archive, in its order: name, comment, method, MS-DOS
// date and time, creator version, external attributes, a UTF-8 flag, the
// uncompressed size, and where the content comes from: copy (an old
// entry's index), raw, zstd (data length) or delta (old entries' indices,
// data length). Old entries are indexed in byte order of their names, so a
// FormatZip patch depends only on the old archive's tree, not its bytes.
//
// # What is verified
//
// Apply checks the checksum and the header; that old has the patch's base
// digest (else ErrWrongBase); every length, index and size in the body
// against the patch and the limits (else ErrCorrupt or ErrTooLarge); and
// that its output has the patch's target digest (else ErrMismatch). The
// digests depend on the format:
//
//   - FormatBytes: base = SHA-256 of old, target = SHA-256 of new. The
//     output is byte-identical to the full package, and the target is the
//     full package's own SHA-256.
//   - FormatZip: base = TreeDigest(old), target = TreeDigest(new). A
//     byte-identical archive cannot be rebuilt in general (a changed file
//     must be compressed again, and other tools and versions of deflate
//     write other bytes), so Apply writes a new archive deterministically
//     and verifies its tree: every name, content and mode. The rebuilt
//     archive has the new archive's entries in its order, with their
//     names, comments, modes, MS-DOS timestamps and methods; copied
//     entries keep the old archive's compressed data and method. Extra
//     fields (extended timestamps, Unix owners) are not kept.
//
// The checksum catches damage in transit, and Apply's verification catches
// a wrong base or a bad patch; neither proves where the patch came from.
// A client trusts the output after comparing the patch's target
// (ReadHeader) with the digest the release announces over a trusted
// channel: the package's SHA-256 for FormatBytes, its TreeDigest for
// FormatZip. A release of a zip package therefore announces both.
//
// Archives whose bytes are signed (Android APKs with signature scheme v2
// and later) do not survive a rebuild: a zip rebuilt from its tree no
// longer verifies. Such packages need a byte-identical output; this
// package does not yet offer to diff them as bytes on request.
//
// # Archives
//
// File-level diffing, and TreeDigest, handle zip archives that start with
// a local file header (or, when empty, with the end of central directory
// record), whose entries are stored or deflated, not encrypted, named and
// commented in at most MaxNameLen bytes, each name once, and are files,
// directories or symbolic links. Make diffs other archives as bytes;
// TreeDigest refuses them with ErrArchive.
//
// # Limits
//
// Options.MaxSize (default 256 MiB, at most 512 MiB) bounds each input,
// the uncompressed content of an archive, and the output a patch declares;
// Options.MaxEntries (default 65,536) bounds an archive's entries. Apply
// never decompresses more than the patch declares, nor a zip entry beyond
// the size its header declares, nor more than MaxSize of an archive's
// content in all, so a zip bomb costs what the limit allows and no more.
// Apply never panics on any patch (FuzzApply). Memory: Make holds old,
// new and a zstd encoder whose buffers are about twice its window; Apply
// holds old, the patch and the output, and for archives the old entries
// it uses as dictionaries.
//
// # Concurrency
//
// Make, Apply, ReadHeader and TreeDigest share no state and are safe for
// concurrent use. They are CPU-bound and do not block. On the test
// packages (testdata/packages, one core) Make takes 0.15 to 0.25 s, Apply
// 4 ms for the 1.9 MB binary and 40 ms for the 770 KB bundle, which it
// inflates twice (to check the base and the output) and partly deflates.
package diff
