package delivery

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/sluicehq/sluice/oplog"
)

// Template limits.
const (
	MaxTitleLen = 256  // a rendered title, bytes
	MaxBodyLen  = 4096 // a rendered body, bytes
	maxVars     = 64
	maxVarLen   = 1024
)

// Render fills a push template: each {{name}} (name: 1-64 of
// [A-Za-z0-9_.-], spaces inside the braces allowed) is replaced by the
// value of the variable. It is deliberately not a template language:
// values are inserted as they are and never parsed again, so a value
// containing "{{x}}" stays literal text; there are no functions, loops or
// lookups. Other braces are left alone.
//
// Errors wrap oplog.ErrInvalid: a placeholder without a value, a rendered
// text over max bytes or not valid UTF-8. Control characters other than
// newline and tab are dropped from the values.
func Render(tmpl string, vars map[string]string, max int) (string, error) {
	var b strings.Builder
	rest := tmpl
	for {
		i := strings.Index(rest, "{{")
		if i < 0 {
			b.WriteString(rest)
			break
		}
		j := strings.Index(rest[i+2:], "}}")
		name := ""
		if j >= 0 {
			name = strings.TrimSpace(rest[i+2 : i+2+j])
		}
		if j < 0 || !validVarName(name) {
			// Not a placeholder: keep the braces as text.
			b.WriteString(rest[:i+2])
			rest = rest[i+2:]
			continue
		}
		v, ok := vars[name]
		if !ok {
			return "", fmt.Errorf("template: no value for {{%s}}: %w", name, oplog.ErrInvalid)
		}
		b.WriteString(rest[:i])
		writeClean(&b, v)
		rest = rest[i+2+j+2:]
		if b.Len() > max {
			break
		}
	}
	out := b.String()
	if len(out) > max {
		return "", fmt.Errorf("template: rendered text of %d bytes, over %d: %w", len(out), max, oplog.ErrInvalid)
	}
	if !utf8.ValidString(out) {
		return "", fmt.Errorf("template: rendered text is not valid UTF-8: %w", oplog.ErrInvalid)
	}
	return out, nil
}

func validVarName(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// writeClean writes v without control characters (but newlines and tabs).
func writeClean(b *strings.Builder, v string) {
	for _, r := range v {
		if unicode.IsControl(r) && r != '\n' && r != '\t' {
			continue
		}
		b.WriteRune(r)
	}
}

// checkVars validates template variables.
func checkVars(vars map[string]string) error {
	if len(vars) > maxVars {
		return fmt.Errorf("template: %d variables, over %d: %w", len(vars), maxVars, oplog.ErrInvalid)
	}
	for k, v := range vars {
		if !validVarName(k) {
			return fmt.Errorf("template: variable name %q: want 1-64 of [A-Za-z0-9_.-]: %w", clip(k), oplog.ErrInvalid)
		}
		if len(v) > maxVarLen {
			return fmt.Errorf("template: variable %s over %d bytes: %w", k, maxVarLen, oplog.ErrInvalid)
		}
	}
	return nil
}
