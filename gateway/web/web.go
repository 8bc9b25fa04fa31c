// Package web serves the browser side of Sluice: sluice.js, a
// dependency-free JavaScript client of the gateway's JSON sub-protocol
// (sluice.v1.json, see gateway/PROTOCOL.md), and a demo page that uses it.
// Both are embedded in the binary.
//
// Handler serves
//
//	GET /           index.html, the demo page
//	GET /sluice.js  the client, as a classic script that sets window.Sluice
//
// and 404 for any other path. Responses carry Cache-Control: no-cache and
// an ETag, so a browser revalidates on every load and gets 304 until the
// binary changes. Mount it beside the gateway's WebSocket handler, which
// the client expects at /v1/ws on the page's host:
//
//	mux.Handle("/v1/ws", gw.WebSocketHandler(nil))
//	mux.Handle("/", web.Handler())
//
// The client delivers items to its handlers one at a time, in the order
// they arrive, and advances a business's sync point only when the handler
// resolves; points are saved in localStorage, then acknowledged. Delivery
// is at least once, with duplicates of saved points dropped. The comment
// at the top of sluice.js describes the API.
//
// The files are read-only: Handler and what it returns are safe for
// concurrent use.
package web

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"net/http"
	"time"
)

//go:embed sluice.js index.html
var files embed.FS

// asset is one embedded file as served.
type asset struct {
	body        []byte
	contentType string
	etag        string
}

var assets = map[string]asset{
	"/":          mustAsset("index.html", "text/html; charset=utf-8"),
	"/sluice.js": mustAsset("sluice.js", "application/javascript; charset=utf-8"),
}

func mustAsset(name, contentType string) asset {
	b, err := files.ReadFile(name)
	if err != nil {
		panic("web: embedded " + name + ": " + err.Error()) // cannot happen: go:embed checked it
	}
	sum := sha256.Sum256(b)
	return asset{body: b, contentType: contentType, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
}

// Handler serves the demo page at / and the client at /sluice.js.
func Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a, ok := assets[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, http.StatusText(http.StatusMethodNotAllowed), http.StatusMethodNotAllowed)
			return
		}
		h := w.Header()
		h.Set("Content-Type", a.contentType)
		h.Set("Cache-Control", "no-cache")
		h.Set("ETag", a.etag)
		h.Set("X-Content-Type-Options", "nosniff")
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(a.body))
	})
}
