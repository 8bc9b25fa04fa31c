package delivery

import "testing"

// SetMaxCachedObject lowers the size above which downloads are streamed,
// for the test.
func SetMaxCachedObject(t testing.TB, n int64) {
	old := maxCachedObject
	maxCachedObject = n
	t.Cleanup(func() { maxCachedObject = old })
}
