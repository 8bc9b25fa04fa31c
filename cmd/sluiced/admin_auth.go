package main

// Admin API authentication. Every request but GET /healthz and GET /readyz
// carries "Authorization: Bearer <token>". The tokens come from one of, in
// this order:
//
//   - --admin-tokens FILE: several admins, one "name token" a line (blank
//     lines and lines starting with # are skipped); the name is the actor
//     recorded in the control events the admin's changes write;
//   - --admin-token / SLUICE_ADMIN_TOKEN: one admin, named "admin";
//   - <data>/admin.token: one admin, named "admin"; a random 32-byte token
//     (hex) written there, mode 0600, at the first start, and read at
//     every later one. sluicectl on the same host reads it too.
//
// Tokens are read once, at start. A request is compared with every token in
// constant time (SHA-256 of each side, then subtle.ConstantTimeCompare), so
// the answer's timing tells nothing of the tokens.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
)

const (
	// adminTokenFile is the default token's file in the data directory.
	adminTokenFile = "admin.token"
	// defaultAdmin names the admin of a single token.
	defaultAdmin = "admin"
	// minAdminTokenLen is the shortest token accepted (the generated one
	// has 64 hex characters).
	minAdminTokenLen = 16
	// maxAdminTokenLen bounds a token, given or presented.
	maxAdminTokenLen = 1024
	// codeUnauthenticated is the code of a refusal's JSON body. It is not
	// an oplog error code: no oplog operation fails this way.
	codeUnauthenticated = "UNAUTHENTICATED"
)

// adminAuth checks the bearer tokens of admin requests. It is immutable
// after loadAdminAuth, so safe for concurrent use.
type adminAuth struct {
	admins []adminCred
	source string         // where the tokens came from, for the start log
	log    zerolog.Logger // refusals, sampled
}

// adminCred is one admin: a name and the SHA-256 of its token.
type adminCred struct {
	name string
	sum  [sha256.Size]byte
}

// loadAdminAuth reads (or, for <data>/admin.token, creates) the admin
// tokens the configuration names. log gets the refusals, at most ten a
// second.
func loadAdminAuth(c Config, log zerolog.Logger) (*adminAuth, error) {
	a := &adminAuth{log: log.With().Str("component", "admin").Logger().
		Sample(&zerolog.BurstSampler{Burst: 10, Period: time.Second})}
	switch {
	case c.AdminTokens != "":
		data, err := os.ReadFile(c.AdminTokens)
		if err != nil {
			return nil, fmt.Errorf("--admin-tokens: %w", err)
		}
		if a.admins, err = parseAdminTokens(c.AdminTokens, data); err != nil {
			return nil, err
		}
		a.source = "--admin-tokens " + c.AdminTokens
	case c.AdminToken != "":
		a.admins = []adminCred{{name: defaultAdmin, sum: sha256.Sum256([]byte(c.AdminToken))}}
		a.source = "--admin-token"
		if c.adminTokenFromEnv {
			a.source = "SLUICE_ADMIN_TOKEN"
		}
	default:
		path := filepath.Join(c.DataDir, adminTokenFile)
		tok, created, err := loadOrCreateAdminToken(path)
		if err != nil {
			return nil, err
		}
		a.admins = []adminCred{{name: defaultAdmin, sum: sha256.Sum256([]byte(tok))}}
		a.source = path
		if created {
			a.source += " (generated)"
		}
	}
	return a, nil
}

// names returns the admins' names, for the start log.
func (a *adminAuth) names() []string {
	out := make([]string, len(a.admins))
	for i, ad := range a.admins {
		out[i] = ad.name
	}
	return out
}

// parseAdminTokens reads a tokens file: "name token" lines. Names are ids
// (1-64 of A-Z a-z 0-9 _ -), tokens at least minAdminTokenLen characters
// without spaces; neither may repeat. Errors name the line, never a token.
func parseAdminTokens(path string, data []byte) ([]adminCred, error) {
	var out []adminCred
	names := map[string]bool{}
	sums := map[[sha256.Size]byte]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			return nil, fmt.Errorf("--admin-tokens %s:%d: want \"name token\"", path, n)
		}
		name, tok := f[0], f[1]
		if !oplog.ValidID(name) {
			return nil, fmt.Errorf("--admin-tokens %s:%d: name %q: want 1-64 of A-Z a-z 0-9 _ -", path, n, name)
		}
		if err := checkAdminToken(tok); err != nil {
			return nil, fmt.Errorf("--admin-tokens %s:%d: %s: %w", path, n, name, err)
		}
		sum := sha256.Sum256([]byte(tok))
		if names[name] || sums[sum] {
			return nil, fmt.Errorf("--admin-tokens %s:%d: %s: the name or the token is on an earlier line", path, n, name)
		}
		names[name], sums[sum] = true, true
		out = append(out, adminCred{name: name, sum: sum})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("--admin-tokens %s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("--admin-tokens %s: no \"name token\" line", path)
	}
	return out, nil
}

// checkAdminToken checks a configured token's length and characters.
func checkAdminToken(tok string) error {
	if len(tok) < minAdminTokenLen || len(tok) > maxAdminTokenLen {
		return fmt.Errorf("token of %d characters: want %d to %d", len(tok), minAdminTokenLen, maxAdminTokenLen)
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] <= ' ' || tok[i] >= 0x7f {
			return errors.New("token: want printable ASCII without spaces")
		}
	}
	return nil
}

// loadOrCreateAdminToken reads the token in path, or writes a new random
// one there (mode 0600, through a temporary file and a rename) if the file
// does not exist.
func loadOrCreateAdminToken(path string) (tok string, created bool, err error) {
	data, err := os.ReadFile(path)
	if err == nil {
		tok = strings.TrimSpace(string(data))
		if err := checkAdminToken(tok); err != nil {
			return "", false, fmt.Errorf("admin token %s: %w", path, err)
		}
		return tok, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", false, fmt.Errorf("admin token: %w", err)
	}
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", false, fmt.Errorf("admin token: %w", err)
	}
	tok = hex.EncodeToString(b[:])
	f, err := os.CreateTemp(filepath.Dir(path), "."+adminTokenFile+".tmp-*") // mode 0600
	if err != nil {
		return "", false, fmt.Errorf("admin token: %w", err)
	}
	defer os.Remove(f.Name()) // fails harmlessly after the rename
	_, err = f.WriteString(tok + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return "", false, fmt.Errorf("admin token: %w", err)
	}
	return tok, true, nil
}

// authenticate returns the name of the admin whose token the header
// carries. Every token is compared, whichever matches.
func (a *adminAuth) authenticate(header string) (name, reason string) {
	scheme, tok, _ := strings.Cut(header, " ")
	tok = strings.TrimSpace(tok)
	switch {
	case header == "":
		return "", "no authorization header"
	case !strings.EqualFold(scheme, "Bearer") || tok == "":
		return "", "not a bearer token"
	case len(tok) > maxAdminTokenLen:
		return "", "wrong token"
	}
	sum := sha256.Sum256([]byte(tok))
	for _, ad := range a.admins {
		if subtle.ConstantTimeCompare(sum[:], ad.sum[:]) == 1 {
			name = ad.name
		}
	}
	if name == "" {
		return "", "wrong token"
	}
	return name, ""
}

// wrap lets /healthz and /readyz through, and every other request only
// with an admin's token, whose name it puts in the request's context
// (actor reads it).
func (a *adminAuth) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" || r.URL.Path == "/readyz" {
			next.ServeHTTP(w, r)
			return
		}
		name, reason := a.authenticate(r.Header.Get("Authorization"))
		if name == "" {
			a.log.Warn().Str("remote", r.RemoteAddr).Str("path", r.URL.Path).Str("reason", reason).Msg("admin request unauthenticated")
			challenge := `Bearer realm="sluice admin"`
			if reason == "wrong token" {
				challenge += `, error="invalid_token"`
			}
			w.Header().Set("WWW-Authenticate", challenge)
			writeJSON(w, http.StatusUnauthorized, map[string]string{
				"error": "admin API: " + reason + ": send Authorization: Bearer <admin token>", "code": codeUnauthenticated})
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), actorKey{}, name)))
	})
}
