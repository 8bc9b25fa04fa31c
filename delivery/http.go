package delivery

import (
	"bytes"
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Identity is who an HTTP request comes from, as its token says.
type Identity struct {
	Device, User string
}

// Authenticator checks a device's request (its bearer token) and returns
// who it is, or an error (the request is refused with 401).
type Authenticator func(r *http.Request) (Identity, error)

// HTTP limits.
const (
	// MaxCachedBytes bounds the package bytes the download handler keeps
	// in memory (the object store is the truth; the cache saves a read of
	// every chunk per download).
	MaxCachedBytes = 256 << 20
	contentProto   = "application/x-protobuf"
)

// Header values set on every update check, allocated once.
var (
	noCache   = []string{"no-cache"}
	protoType = []string{contentProto}
)

// UpdatesHandler serves the check for updates over HTTP:
//
//	GET /v1/updates?app_version=…&os=…&os_version=…&model=…&region=…&network=…&channel=…&cpu=…
//	Authorization: Bearer <device token>
//
// It answers the device's View (protobuf, or protojson when Accept asks
// for application/json) with the digest as its ETag; a request whose
// If-None-Match holds the current digest gets 304 Not Modified and no
// body. The device and user come from the token, the attributes from the
// query.
func (d *Delivery) UpdatesHandler(auth Authenticator) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			httpError(w, http.StatusMethodNotAllowed, "use GET")
			return
		}
		id, err := auth(r)
		if err != nil {
			d.lg.Debug().Err(err).Str("remote", r.RemoteAddr).Msg("update check refused")
			httpError(w, http.StatusUnauthorized, err.Error())
			return
		}
		q := r.URL.Query()
		dev := &Device{ID: id.Device, User: id.User}
		a := &dev.Attrs
		for _, f := range []struct {
			name string
			to   *string
		}{{"app_version", &a.AppVersion}, {"os", &a.OS}, {"os_version", &a.OSVersion}, {"model", &a.Model},
			{"region", &a.Region}, {"network", &a.Network}, {"channel", &a.Channel}, {"cpu", &a.CPU}} {
			v := q.Get(f.name)
			if len(v) > maxValueLen {
				httpError(w, http.StatusBadRequest, fmt.Sprintf("%s: over %d bytes", f.name, maxValueLen))
				return
			}
			*f.to = v
		}
		cv, err := d.encodedView(dev)
		if err != nil {
			d.lg.Error().Err(err).Msg("encoding a view")
			httpError(w, http.StatusInternalServerError, "internal error")
			return
		}
		etag := `"` + cv.digest + `"`
		h := w.Header()
		h["Etag"] = []string{etag}
		h["Cache-Control"] = noCache
		if inm := r.Header.Get("If-None-Match"); inm != "" && strings.Contains(inm, etag) {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		body := cv.body
		if strings.Contains(r.Header.Get("Accept"), oplog.ContentTypeJSON) {
			v := &deliverypb.View{}
			if err = proto.Unmarshal(cv.body, v); err == nil {
				body, err = protojson.Marshal(v)
			}
			h["Content-Type"] = []string{oplog.ContentTypeJSON}
		} else {
			h["Content-Type"] = protoType
			h["Content-Length"] = []string{strconv.Itoa(len(body))}
		}
		if err != nil {
			d.lg.Error().Err(err).Msg("encoding a view")
			httpError(w, http.StatusInternalServerError, "internal error")
			return
		}
		if r.Method == http.MethodHead {
			return
		}
		_, _ = w.Write(body)
	})
}

// DownloadHandler serves package bytes to devices:
//
//	GET /v1/packages/<package>/<version>              the package
//	GET /v1/packages/<package>/<version>/from/<old>   the diff from <old>
//	Authorization: Bearer <device token>
//
// with range requests (a broken download resumes), an ETag of the
// content's SHA-256 and a Digest header (sha-256, base64). Every uploaded
// version is served to an authenticated device: what it may install is
// decided by the signed manifest, not by the download.
func (d *Delivery) DownloadHandler(prefix string, auth Authenticator) http.Handler {
	cache := newByteCache(MaxCachedBytes)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			httpError(w, http.StatusMethodNotAllowed, "use GET")
			return
		}
		if _, err := auth(r); err != nil {
			httpError(w, http.StatusUnauthorized, err.Error())
			return
		}
		parts := strings.Split(strings.TrimPrefix(r.URL.Path, prefix), "/")
		if len(parts) != 2 && !(len(parts) == 4 && parts[2] == "from") {
			httpError(w, http.StatusNotFound, "want "+prefix+"<package>/<version>[/from/<version>]")
			return
		}
		rel, ok := d.Release(parts[0], parts[1])
		if !ok {
			httpError(w, http.StatusNotFound, "no such package version")
			return
		}
		v := rel.Version
		object, sum, size := v.Object, v.Sha256, v.Size
		if len(parts) == 4 {
			object = ""
			for _, df := range v.Diffs {
				if df.FromVersion == parts[3] {
					object, sum, size = df.Object, df.Sha256, df.Size
				}
			}
			if object == "" {
				httpError(w, http.StatusNotFound, "no diff from that version: download the package")
				return
			}
		}
		etag := fmt.Sprintf(`"%x"`, sum)
		w.Header().Set("ETag", etag)
		w.Header().Set("Digest", "sha-256="+b64std(sum))
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Cache-Control", "private, max-age=31536000, immutable")
		if size > maxCachedObject {
			d.streamObject(w, r, object, size, etag)
			return
		}
		data, err := cache.get(r.Context(), object, d.obs)
		if err != nil {
			d.lg.Error().Err(err).Str("object", object).Msg("reading a package")
			httpError(w, http.StatusServiceUnavailable, "package not readable now; retry or use the fallback URL")
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
	})
}

// maxCachedObject is the largest package or diff the download handler
// reads whole into memory (and caches); bigger ones are streamed from the
// object store, so a device asking for many of them costs no memory.
var maxCachedObject int64 = 32 << 20

// streamObject serves a big object straight from the object store,
// honouring a single byte range ("bytes=N-" or "bytes=N-M", with If-Range
// naming its ETag): a range's start is reached by reading past it.
func (d *Delivery) streamObject(w http.ResponseWriter, r *http.Request, object string, size int64, etag string) {
	start, end := int64(0), size-1
	status := http.StatusOK
	if rg := r.Header.Get("Range"); rg != "" && (r.Header.Get("If-Range") == "" || r.Header.Get("If-Range") == etag) {
		s, e, ok := parseRange(rg, size)
		if !ok {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			httpError(w, http.StatusRequestedRangeNotSatisfiable, "unsatisfiable range")
			return
		}
		start, end, status = s, e, http.StatusPartialContent
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end, size))
	}
	w.Header().Set("Accept-Ranges", "bytes")
	w.Header().Set("Content-Length", strconv.FormatInt(end-start+1, 10))
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return
	}
	res, err := d.obs.Get(r.Context(), object)
	if err != nil {
		d.lg.Error().Err(err).Str("object", object).Msg("reading a package")
		w.Header().Del("Content-Range")
		w.Header().Del("Content-Length")
		httpError(w, http.StatusServiceUnavailable, "package not readable now; retry or use the fallback URL")
		return
	}
	defer res.Close()
	if _, err := io.CopyN(io.Discard, res, start); err != nil {
		d.lg.Error().Err(err).Str("object", object).Msg("reading a package")
		httpError(w, http.StatusServiceUnavailable, "package not readable now")
		return
	}
	w.WriteHeader(status)
	if _, err := io.CopyN(w, res, end-start+1); err != nil {
		d.lg.Debug().Err(err).Str("object", object).Msg("download ended early")
	}
}

// parseRange parses one byte range of an object of size bytes.
func parseRange(h string, size int64) (start, end int64, ok bool) {
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	a, b, found := strings.Cut(spec, "-")
	if !found {
		return 0, 0, false
	}
	if a == "" { // the last b bytes
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n <= 0 {
			return 0, 0, false
		}
		return max(size-n, 0), size - 1, size > 0
	}
	start, err := strconv.ParseInt(a, 10, 64)
	if err != nil || start < 0 || start >= size {
		return 0, 0, false
	}
	end = size - 1
	if b != "" {
		if end, err = strconv.ParseInt(b, 10, 64); err != nil || end < start {
			return 0, 0, false
		}
		end = min(end, size-1)
	}
	return start, end, true
}

func httpError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = fmt.Fprintln(w, msg)
}

// byteCache keeps recently downloaded objects in memory, up to a total
// size, evicting the least recently used. Objects are immutable (a new
// version is a new object), so entries never go stale.
type byteCache struct {
	mu    sync.Mutex
	max   int
	size  int
	order *list.List // of *cacheEntry, most recent first
	byKey map[string]*list.Element
	// loading dedupes concurrent loads of one object.
	loading map[string]*load
}

type cacheEntry struct {
	key  string
	data []byte
}

type load struct {
	done chan struct{}
	data []byte
	err  error
}

func newByteCache(max int) *byteCache {
	return &byteCache{max: max, order: list.New(), byKey: map[string]*list.Element{}, loading: map[string]*load{}}
}

func (c *byteCache) get(ctx context.Context, key string, obs jetstream.ObjectStore) ([]byte, error) {
	c.mu.Lock()
	if e, ok := c.byKey[key]; ok {
		c.order.MoveToFront(e)
		c.mu.Unlock()
		return e.Value.(*cacheEntry).data, nil
	}
	if l, ok := c.loading[key]; ok {
		c.mu.Unlock()
		select {
		case <-l.done:
			return l.data, l.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	l := &load{done: make(chan struct{})}
	c.loading[key] = l
	c.mu.Unlock()

	l.data, l.err = obs.GetBytes(context.WithoutCancel(ctx), key)
	if errors.Is(l.err, jetstream.ErrObjectNotFound) {
		l.err = fmt.Errorf("object %s: %w", key, oplog.ErrNotFound)
	}
	c.mu.Lock()
	delete(c.loading, key)
	if l.err == nil && len(l.data) <= c.max {
		c.byKey[key] = c.order.PushFront(&cacheEntry{key: key, data: l.data})
		c.size += len(l.data)
		for c.size > c.max {
			last := c.order.Back()
			e := last.Value.(*cacheEntry)
			c.order.Remove(last)
			delete(c.byKey, e.key)
			c.size -= len(e.data)
		}
	}
	c.mu.Unlock()
	close(l.done)
	return l.data, l.err
}
