package oplog

import "fmt"

// Alphabets. Target ids and business codes become NATS subject tokens, so
// they are restricted to characters that are safe there and in file names.
const (
	// MaxIDLen is the longest user, device or topic id: 1 to 64 characters
	// of A–Z, a–z, 0–9, '_' and '-' (the base64url alphabet). Hash or
	// base64url-encode anything else (e-mail addresses, phone numbers).
	MaxIDLen = 64
	// MaxBusinessLen is the longest business code: 1 to 32 characters of
	// a–z, 0–9, '_' and '-'.
	MaxBusinessLen = 32
	// MaxMessageIDLen is the longest producer message id: 1 to 128
	// printable ASCII characters without spaces.
	MaxMessageIDLen = 128
)

// ValidID reports whether s is a valid user, device or topic id.
func ValidID(s string) bool {
	if len(s) == 0 || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// ValidBusiness reports whether s is a valid business code.
func ValidBusiness(s string) bool { return ValidName(s, MaxBusinessLen) }

// ValidName reports whether s is 1 to max characters of a–z, 0–9, '_'
// and '-': the alphabet of business codes, and of the other names that
// become subject tokens (buckets, switches, packages, breaker rules).
func ValidName(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// ValidMessageID reports whether s is a valid producer message id.
func ValidMessageID(s string) bool {
	if len(s) == 0 || len(s) > MaxMessageIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] > '~' {
			return false
		}
	}
	return true
}

func checkID(what, s string) error {
	if !ValidID(s) {
		return fmt.Errorf("%s %q: want 1-%d of [A-Za-z0-9_-]: %w", what, clip(s), MaxIDLen, ErrInvalidID)
	}
	return nil
}

// clip shortens untrusted strings quoted in errors and logs.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
