package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/diff"
)

// CheckInstall says whether the package a manifest names should be
// installed over the version installed ("" for none): nil if so, else
//   - ErrManifestExpired: its expires_ms has passed, by the server's clock
//     as estimated from the last Welcome (the local clock before any);
//   - ErrStaleManifest: its serial is below the highest the client
//     accepted for the package (replay protection, kept in StateDir);
//   - ErrSignature: a hot patch without its producer's signature, or
//     whose producer signature does not verify;
//   - ErrUpToDate: installed is its version, and it is no rollback from it;
//   - ErrDowngrade: its version is below installed (dotted versions
//     compare by segment, numerically when both are numbers), unless it is
//     a rollback (rollback set) and installed is in its rollback_from.
//
// m must come from the client's verified releases (Releases, View).
func (c *Client) CheckInstall(m *deliverypb.Manifest, installed string) error {
	if m.GetPackage() == "" || m.GetVersion() == "" {
		return errors.New("client: manifest without package or version")
	}
	c.mu.Lock()
	accepted, now := c.serials[m.Package], time.Now().Add(c.offset)
	c.mu.Unlock()
	if m.ExpiresMs != 0 && m.ExpiresMs <= now.UnixMilli() {
		return fmt.Errorf("client: %s %s: manifest valid until %s: %w", m.Package, m.Version,
			time.UnixMilli(m.ExpiresMs).UTC().Format(time.RFC3339), ErrManifestExpired)
	}
	if m.Serial < accepted {
		return fmt.Errorf("client: %s %s: serial %d, %d accepted: %w", m.Package, m.Version, m.Serial, accepted, ErrStaleManifest)
	}
	if m.Kind == deliverypb.PackageKind_PACKAGE_KIND_HOT_PATCH {
		// The server checked the producer's signature at upload and names
		// the key it was made with; check it again, bound to this package
		// and version (deliverypb.HotPatchMessage).
		if len(m.ProducerSignature) == 0 || len(m.ProducerPublicKey) != ed25519.PublicKeySize ||
			!ed25519.Verify(m.ProducerPublicKey, deliverypb.HotPatchMessage(m.Package, m.Version, m.Sha256), m.ProducerSignature) {
			return fmt.Errorf("client: %s %s: hot patch producer signature: %w", m.Package, m.Version, ErrSignature)
		}
	}
	if installed == "" {
		return nil
	}
	if m.Rollback && slices.ContainsFunc(m.RollbackFrom, func(v string) bool { return compareVersions(v, installed) == 0 }) {
		return nil
	}
	switch cmp := compareVersions(m.Version, installed); {
	case cmp > 0:
		return nil
	case cmp == 0:
		return fmt.Errorf("client: %s %s: %w", m.Package, m.Version, ErrUpToDate)
	default:
		return fmt.Errorf("client: %s: %s over %s: %w", m.Package, m.Version, installed, ErrDowngrade)
	}
}

// Install checks a manifest (CheckInstall), downloads the package it names
// and returns its bytes, verified against the manifest, for the app to
// install; installed is the version the device has ("" for none) and old
// its bytes, if the app has them.
//
// When old is given and the manifest has a diff from installed, it
// downloads the diff (verified by its SHA-256), applies it to old
// (delivery/diff) and verifies the result: the package's SHA-256, or for
// an archive its tree digest (tree_sha256), as a zip rebuilt from a diff
// has the package's files but not necessarily its bytes. Otherwise, or if
// that fails, it downloads the package from the gateway, resuming a broken
// transfer with a range request (a few attempts), and verifies its
// SHA-256 and size. If that fails too, it downloads the manifest's
// fallback_url (without the device token) and verifies it the same way.
// No body larger than the manifest announces is read. ctx bounds it all.
//
// On success the manifest's serial is recorded as accepted for the
// package (persisted in StateDir): older manifests of the package are
// refused from then on (ErrStaleManifest). It returns CheckInstall's
// errors, ctx's, or one wrapping ErrDownload when no source gave verified
// bytes.
func (c *Client) Install(ctx context.Context, m *deliverypb.Manifest, installed string, old []byte) ([]byte, error) {
	if err := c.CheckInstall(m, installed); err != nil {
		return nil, err
	}
	log := c.log.With().Str("package", m.Package).Str("version", m.Version).Logger()
	data, source, errs := c.download(ctx, m, installed, old)
	if data == nil {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("client: install %s %s: %w", m.Package, m.Version, err)
		}
		msgs := make([]string, len(errs))
		for i, err := range errs {
			msgs[i] = err.Error()
		}
		return nil, fmt.Errorf("client: install %s %s: %s: %w", m.Package, m.Version, strings.Join(msgs, "; "), ErrDownload)
	}
	if len(errs) > 0 {
		log.Warn().Errs("errors", errs).Str("source", source).Msg("package downloaded after failures")
	}
	if err := c.accept(m.Package, m.Serial); err != nil {
		// The serial holds in memory; the next accept writes it again.
		log.Error().Err(err).Msg("accepted manifest serial not persisted")
	}
	c.count(func(s *Stats) {
		s.Installs++
		switch source {
		case "diff":
			s.DiffInstalls++
		case "fallback":
			s.FallbackInstalls++
		}
	})
	log.Info().Str("installed", installed).Str("source", source).Int("size", len(data)).Msg("package downloaded")
	return data, nil
}

// download fetches the package m names: by diff, whole from the gateway,
// or from the fallback URL, in that order. It returns the verified bytes
// and their source ("diff", "sluice" or "fallback"), and the failures of
// the sources tried before (all of them when data is nil).
func (c *Client) download(ctx context.Context, m *deliverypb.Manifest, installed string, old []byte) (data []byte, source string, errs []error) {
	base := c.httpBase()
	var token string
	switch {
	case base == "":
		errs = append(errs, ErrNoHTTP)
	case m.Url == "":
		errs = append(errs, errors.New("the manifest has no url"))
	default:
		var err error
		if token, err = c.cfg.Token(ctx); err != nil {
			errs = append(errs, fmt.Errorf("token: %v", err))
			base = ""
		}
	}
	if base != "" && m.Url != "" {
		if df := diffFor(m, installed, old); df != nil {
			data, err := c.applyDiff(ctx, base, token, m, df, old)
			if err == nil {
				return data, "diff", errs
			}
			errs = append(errs, fmt.Errorf("diff from %s: %v", installed, err))
		}
		if ctx.Err() == nil {
			data, err := c.fetchSluice(ctx, base, m.Url, token, m.Size, m.Sha256)
			if err == nil {
				return data, "sluice", errs
			}
			errs = append(errs, fmt.Errorf("package: %v", err))
		}
	}
	if m.FallbackUrl != "" && ctx.Err() == nil {
		data, err := c.fetch(ctx, m.FallbackUrl, "", m.Size, m.Sha256)
		if err == nil {
			return data, "fallback", errs
		}
		errs = append(errs, fmt.Errorf("fallback: %v", err))
	}
	return nil, "", errs
}

// diffFor returns the diff of m from installed that applies to old, nil
// if none. A byte diff needs old's SHA-256 to be the diff's base; a zip
// diff applies to any archive of the same tree (diff.Apply checks it),
// such as one itself rebuilt from a diff, whose bytes differ.
func diffFor(m *deliverypb.Manifest, installed string, old []byte) *deliverypb.Diff {
	if old == nil || installed == "" {
		return nil
	}
	for _, df := range m.Diffs {
		if df.FromVersion != installed || df.Object == "" || len(df.Sha256) != sha256.Size {
			continue
		}
		if df.Format == diff.FormatZip.String() {
			return df
		}
		if sum := sha256.Sum256(old); bytes.Equal(sum[:], df.FromSha256) {
			return df
		}
	}
	return nil
}

// applyDiff downloads diff df, applies it to old and verifies the result
// against m.
func (c *Client) applyDiff(ctx context.Context, base, token string, m *deliverypb.Manifest, df *deliverypb.Diff, old []byte) ([]byte, error) {
	patch, err := c.fetchSluice(ctx, base, df.Object, token, df.Size, df.Sha256)
	if err != nil {
		return nil, err
	}
	out, err := diff.Apply(old, patch, nil)
	if err != nil {
		return nil, err
	}
	if sum := sha256.Sum256(out); bytes.Equal(sum[:], m.Sha256) && int64(len(out)) == m.Size {
		return out, nil
	}
	if len(m.TreeSha256) == sha256.Size {
		tree, err := diff.TreeDigest(out, nil)
		if err == nil && bytes.Equal(tree[:], m.TreeSha256) {
			return out, nil
		}
		return nil, errors.New("the rebuilt package has neither the manifest's digest nor its tree digest")
	}
	return nil, errors.New("the rebuilt package does not have the manifest's digest")
}

// fetchSluice downloads ref, a path on the gateway's HTTP base (or an
// absolute URL, which gets the device token only on the base's origin).
func (c *Client) fetchSluice(ctx context.Context, base, ref, token string, size int64, sum []byte) ([]byte, error) {
	u := base + ref
	if !strings.HasPrefix(ref, "/") || strings.HasPrefix(ref, "//") {
		abs, err := url.Parse(ref)
		if err != nil || (abs.Scheme != "http" && abs.Scheme != "https") || abs.Host == "" {
			return nil, fmt.Errorf("download path %q: want a path or an http(s) URL", ref)
		}
		if b, err := url.Parse(base); err != nil || b.Scheme != abs.Scheme || b.Host != abs.Host {
			token = ""
		}
		u = ref
	}
	return c.fetch(ctx, u, token, size, sum)
}

// Download attempts.
const (
	// downloadAttempts is how many requests one download makes at most:
	// the first and the resumptions of broken transfers. An HTTP error
	// status ends it at once.
	downloadAttempts = 4
	// resumeWait is the wait before the n-th resumption: n times it.
	resumeWait = 100 * time.Millisecond
)

// errTooLarge: a body longer than the manifest announces.
var errTooLarge = errors.New("body larger than announced")

// fetch downloads u (with the bearer token unless it is ""), expecting
// size bytes of SHA-256 sum. A transfer that breaks resumes with a range
// request, If-Range the first response's ETag; a server that answers the
// whole body instead restarts it.
func (c *Client) fetch(ctx context.Context, u, token string, size int64, sum []byte) ([]byte, error) {
	if len(sum) != sha256.Size || size < 0 {
		return nil, errors.New("the manifest gives no digest or size")
	}
	buf := make([]byte, 0, min(size, 1<<20)+1)
	var etag string
	var lastErr error
	for attempt := range downloadAttempts {
		if attempt > 0 {
			t := time.NewTimer(time.Duration(attempt) * resumeWait)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			case <-t.C:
			}
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if len(buf) > 0 {
			req.Header.Set("Range", "bytes="+strconv.Itoa(len(buf))+"-")
			if etag != "" {
				req.Header.Set("If-Range", etag)
			}
			c.count(func(s *Stats) { s.DownloadResumes++ })
		}
		resp, err := c.httpc.Do(req)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			lastErr = err
			continue
		}
		switch resp.StatusCode {
		case http.StatusOK:
			buf = buf[:0]
		case http.StatusPartialContent:
			if start, ok := rangeStart(resp.Header.Get("Content-Range")); !ok || start != int64(len(buf)) {
				resp.Body.Close()
				buf, lastErr = buf[:0], fmt.Errorf("range answered with %q", resp.Header.Get("Content-Range"))
				continue
			}
		default:
			msg := snippet(resp.Body)
			resp.Body.Close()
			return nil, fmt.Errorf("GET %s: %s: %s", redact(u), resp.Status, msg)
		}
		if et := resp.Header.Get("ETag"); et != "" && !strings.HasPrefix(et, "W/") {
			etag = et
		}
		if resp.ContentLength > size-int64(len(buf)) {
			resp.Body.Close()
			return nil, fmt.Errorf("GET %s: %d bytes from %d: %w", redact(u), resp.ContentLength, len(buf), errTooLarge)
		}
		buf, err = readBody(resp.Body, buf, size)
		resp.Body.Close()
		if errors.Is(err, errTooLarge) {
			return nil, fmt.Errorf("GET %s: over %d bytes: %w", redact(u), size, err)
		}
		if err == nil && int64(len(buf)) < size {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			lastErr = fmt.Errorf("GET %s: broken at %d of %d bytes: %v", redact(u), len(buf), size, err)
			continue
		}
		if got := sha256.Sum256(buf); !bytes.Equal(got[:], sum) {
			return nil, fmt.Errorf("GET %s: SHA-256 %x, the manifest says %x", redact(u), got[:8], sum[:8])
		}
		return buf, nil
	}
	return nil, lastErr
}

// readBody appends r's bytes to buf until EOF, failing with errTooLarge
// past size bytes in all.
func readBody(r io.Reader, buf []byte, size int64) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, int(min(max(int64(cap(buf)), 32<<10), size+1-int64(len(buf)))))
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > size {
			return buf[:size], errTooLarge
		}
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// rangeStart returns the first byte of a Content-Range "bytes a-b/n".
func rangeStart(cr string) (int64, bool) {
	rest, ok := strings.CutPrefix(cr, "bytes ")
	if !ok {
		return 0, false
	}
	a, _, ok := strings.Cut(rest, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(a, 10, 64)
	return n, err == nil && n >= 0
}

// redact drops the query of u (a fallback URL may carry credentials), for
// messages.
func redact(u string) string {
	if i := strings.IndexAny(u, "?#"); i >= 0 {
		return u[:i]
	}
	return u
}

// serialFile is the name of the file of accepted manifest serials in
// Config.StateDir; serialVersion the version of its format.
const (
	serialFile    = "serials.json"
	serialVersion = 1
)

// serialDoc is the serial file's content: by package, the highest serial
// of a manifest the client installed.
type serialDoc struct {
	Version int               `json:"version"`
	Serials map[string]uint64 `json:"serials"`
}

// loadSerials reads the accepted serials persisted in dir: none if there
// is no file yet.
func loadSerials(dir string) (map[string]uint64, error) {
	removeTemps(dir, serialFile)
	path := filepath.Join(dir, serialFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]uint64{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("client: read serials: %w", err)
	}
	var doc serialDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("client: %s: %v: %w", path, err, ErrBadState)
	}
	if doc.Version != serialVersion {
		return nil, fmt.Errorf("client: %s: format version %d, want %d: %w", path, doc.Version, serialVersion, ErrBadState)
	}
	if doc.Serials == nil {
		doc.Serials = map[string]uint64{}
	}
	return doc.Serials, nil
}

// accept records serial as accepted for pkg, if above the last, and
// persists the serials.
func (c *Client) accept(pkg string, serial uint64) error {
	c.serialMu.Lock()
	defer c.serialMu.Unlock()
	c.mu.Lock()
	if cur, ok := c.serials[pkg]; ok && cur >= serial {
		c.mu.Unlock()
		return nil
	}
	c.serials[pkg] = serial
	b, err := json.Marshal(serialDoc{Version: serialVersion, Serials: c.serials})
	c.mu.Unlock()
	if err != nil {
		return fmt.Errorf("client: encode serials: %w", err)
	}
	return writeFileAtomic(c.cfg.StateDir, serialFile, b)
}

// compareVersions compares dotted versions ("10.2.1" > "9.8") as the
// server does (oplog.CompareVersions): segment by segment, numerically
// when both are decimal numbers that fit in 64 bits, else as text; a
// missing segment counts as "0".
func compareVersions(a, b string) int {
	for a != "" || b != "" {
		var x, y string
		x, a = nextSegment(a)
		y, b = nextSegment(b)
		xn, xok := parseSegment(x)
		yn, yok := parseSegment(y)
		switch {
		case xok && yok:
			if xn != yn {
				if xn < yn {
					return -1
				}
				return 1
			}
		default:
			if c := strings.Compare(x, y); c != 0 {
				return c
			}
		}
	}
	return 0
}

// nextSegment splits the first dot-separated segment off v; an exhausted
// version yields "0".
func nextSegment(v string) (seg, rest string) {
	if v == "" {
		return "0", ""
	}
	if i := strings.IndexByte(v, '.'); i >= 0 {
		return v[:i], v[i+1:]
	}
	return v, ""
}

// parseSegment parses a decimal segment; ok false if it is not all digits
// or overflows 64 bits.
func parseSegment(s string) (n uint64, ok bool) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil
}
