package deliverypb

import "encoding/hex"

// HotPatchMessage is what a hot patch's producer signs with ed25519: the
// package, the version and the SHA-256 of the bytes, so that a signature
// cannot be replayed for another package or version. The server checks it
// at upload, clients before installing.
func HotPatchMessage(pkg, version string, sha256 []byte) []byte {
	return []byte("sluice hot patch v1\n" + pkg + "\n" + version + "\n" + hex.EncodeToString(sha256))
}
