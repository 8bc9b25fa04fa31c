package diff

import "errors"

var (
	// ErrNotSmaller is returned by Make when the patch would not be
	// smaller than the new package: ship the full package instead.
	ErrNotSmaller = errors.New("diff: patch not smaller than the package")

	// ErrTooLarge is returned when an input, an archive's content or the
	// output a patch declares exceeds the limits of Options.
	ErrTooLarge = errors.New("diff: size limit exceeded")

	// ErrWrongBase is returned by Apply when old is not the package the
	// patch was made against (or, for a FormatZip patch, not a zip
	// archive with the same tree).
	ErrWrongBase = errors.New("diff: patch is for another base")

	// ErrCorrupt is returned by Apply and ReadHeader when the patch is
	// damaged, truncated or not a patch of a version this package reads.
	ErrCorrupt = errors.New("diff: corrupt patch")

	// ErrMismatch is returned by Apply when the package it rebuilt does
	// not have the digest the patch names.
	ErrMismatch = errors.New("diff: output does not match the patch's digest")

	// ErrArchive is returned by TreeDigest for input that is not a zip
	// archive this package handles (see the package doc, Archives).
	ErrArchive = errors.New("diff: unsupported or invalid zip archive")
)
