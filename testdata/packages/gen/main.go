// Command gen writes the test packages of testdata/packages: two versions
// of an H5 offline bundle (h5-v1.zip, h5-v2.zip) and two builds of a small
// Go program (app-v1.bin, app-v2.bin). See ../README.md.
//
// Run it from the repository root:
//
//	go run ./testdata/packages/gen
//
// The bundles are deterministic (a seeded generator, fixed timestamps);
// the binaries depend on the Go toolchain that builds them. Go skips
// testdata directories in ./... patterns, so this program is neither built
// nor vetted by go test ./... or go vet ./....
package main

import (
	"archive/zip"
	"bytes"
	"flag"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

func main() {
	dir := flag.String("dir", "testdata/packages", "directory to write the packages to")
	flag.Parse()
	if err := run(*dir); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	v1, v2 := bundles()
	for name, files := range map[string][]file{"h5-v1.zip": v1, "h5-v2.zip": v2} {
		if err := writeZip(filepath.Join(dir, name), files); err != nil {
			return err
		}
	}
	for _, b := range []struct{ out, version, tags string }{
		{"app-v1.bin", "1.4.1", ""},
		{"app-v2.bin", "1.4.2", "v2"},
	} {
		out, err := filepath.Abs(filepath.Join(dir, b.out))
		if err != nil {
			return err
		}
		cmd := exec.Command("go", "build", "-tags", b.tags, "-trimpath",
			"-ldflags", "-s -w -X main.version="+b.version, "-o", out, ".")
		cmd.Dir = filepath.Join(dir, "src", "app")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("build %s: %w", b.out, err)
		}
	}
	return nil
}

// file is one entry of a bundle.
type file struct {
	name string
	data []byte
	mod  time.Time
}

// writeZip writes files, sorted by name, as a zip archive with every
// entry deflated (as zip -r and most bundlers do).
func writeZip(path string, files []file) error {
	files = slices.Clone(files)
	slices.SortFunc(files, func(a, b file) int { return strings.Compare(a.name, b.name) })
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, f := range files {
		h := &zip.FileHeader{Name: f.name, Method: zip.Deflate, Modified: f.mod}
		h.SetMode(0o644)
		w, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		if _, err := w.Write(f.data); err != nil {
			return err
		}
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return os.WriteFile(path, buf.Bytes(), 0o644)
}

// bundles returns the two versions of the H5 bundle. Between them, as a
// release would: app.js (4 modules edited, one added, one removed) and
// chunk-orders.js (one module edited) change in a few places, so their
// content-hashed names change too; the CSS gets a few new rules and a new
// theme colour,
// index.html and config.json follow, chunk-coupons.js is deleted,
// chunk-reviews.js is added, banner.png is replaced; vendor.js, the font,
// the other images and manifest.json are left untouched.
func bundles() (v1, v2 []file) {
	t1 := time.Date(2025, 3, 4, 10, 20, 30, 0, time.UTC)
	t2 := time.Date(2025, 4, 18, 16, 5, 0, 0, time.UTC)
	g := &jsGen{r: rand.New(rand.NewPCG(1, 2))}

	vendor := g.minified(190 << 10)
	appMods := g.modules("app", 40)
	ordersMods := g.modules("orders", 22)
	couponsMods := g.modules("coupons", 14)
	reviewsMods := g.modules("reviews", 16)
	css1 := g.css(220)
	font := randomBytes(rand.New(rand.NewPCG(3, 4)), 88<<10)
	imgs := map[string][]byte{
		"img/logo.png":      pngImage(5, 160, 64, 2),
		"img/icon-cart.png": pngImage(6, 64, 64, 1),
		"img/icon-user.png": pngImage(7, 64, 64, 1),
		"img/product-1.png": pngImage(8, 240, 180, 10),
		"img/product-2.png": pngImage(11, 240, 180, 10),
		"img/product-3.png": pngImage(12, 240, 180, 10),
		"img/product-4.png": pngImage(13, 240, 180, 10),
	}
	banner1 := pngImage(9, 480, 180, 12)
	banner2 := pngImage(10, 480, 180, 12)
	manifest := []byte(`{
  "name": "Sluice Shop",
  "short_name": "Shop",
  "start_url": "/index.html",
  "display": "standalone",
  "background_color": "#ffffff",
  "theme_color": "#1f6feb"
}
`)

	app1 := joinModules(appMods)
	orders1 := joinModules(ordersMods)
	coupons1 := joinModules(couponsMods)

	// v2: edit a few modules of app.js and one of the orders chunk, add
	// a module to app.js and drop one.
	appMods2 := slices.Clone(appMods)
	for _, i := range []int{7, 18, 19, 31} {
		appMods2[i] = g.edit(appMods2[i])
	}
	appMods2 = slices.Insert(appMods2, 26, g.module("app", 900))
	appMods2 = slices.Delete(appMods2, 12, 13)
	ordersMods2 := slices.Clone(ordersMods)
	ordersMods2[9] = g.edit(ordersMods2[9])
	app2 := joinModules(appMods2)
	orders2 := joinModules(ordersMods2)
	reviews2 := joinModules(reviewsMods)
	css2 := bytes.Replace(css1, []byte(".app-footer {"), append(g.css(6), []byte(".app-footer {")...), 1)
	css2 = bytes.ReplaceAll(css2, []byte("#1f6feb"), []byte("#0b5cd5"))

	vendorName := hashed("js/vendor", ".js", vendor)
	app1Name, app2Name := hashed("js/app", ".js", app1), hashed("js/app", ".js", app2)
	orders1Name, orders2Name := hashed("js/chunk-orders", ".js", orders1), hashed("js/chunk-orders", ".js", orders2)
	couponsName := hashed("js/chunk-coupons", ".js", coupons1)
	reviewsName := hashed("js/chunk-reviews", ".js", reviews2)

	common := func(t time.Time) []file {
		fs := []file{
			{vendorName, vendor, t},
			{"fonts/iconfont.woff2", font, t},
			{"manifest.json", manifest, t},
		}
		for name, data := range imgs {
			fs = append(fs, file{name, data, t})
		}
		return fs
	}
	v1 = append(common(t1),
		file{"index.html", indexHTML("1.8.0", vendorName, app1Name, "css/app.css"), t1},
		file{"config.json", configJSON("1.8.0", []string{orders1Name, couponsName}), t1},
		file{app1Name, app1, t1},
		file{orders1Name, orders1, t1},
		file{couponsName, coupons1, t1},
		file{"css/app.css", css1, t1},
		file{"img/banner.png", banner1, t1},
	)
	v2 = append(common(t2),
		file{"index.html", indexHTML("1.9.0", vendorName, app2Name, "css/app.css"), t2},
		file{"config.json", configJSON("1.9.0", []string{orders2Name, reviewsName}), t2},
		file{app2Name, app2, t2},
		file{orders2Name, orders2, t2},
		file{reviewsName, reviews2, t2},
		file{"css/app.css", css2, t2},
		file{"img/banner.png", banner2, t2},
	)
	return v1, v2
}

// hashed names a file by its content, as bundlers do: base.<8 hex>.ext.
func hashed(base, ext string, data []byte) string {
	var h uint32 = 2166136261
	for _, b := range data {
		h = (h ^ uint32(b)) * 16777619
	}
	return fmt.Sprintf("%s.%08x%s", base, h, ext)
}

func joinModules(mods [][]byte) []byte {
	return bytes.Join(mods, []byte("\n"))
}

func indexHTML(version, vendor, app, css string) []byte {
	return fmt.Appendf(nil, `<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
  <meta name="app-version" content="%[1]s">
  <title>Sluice Shop</title>
  <link rel="manifest" href="manifest.json">
  <link rel="stylesheet" href="%[4]s">
  <link rel="preload" href="fonts/iconfont.woff2" as="font" type="font/woff2" crossorigin>
</head>
<body>
  <div id="app" class="app-root" data-version="%[1]s">
    <header class="app-header"><img src="img/logo.png" alt="Sluice Shop" width="160" height="64"></header>
    <main class="app-main"><div class="app-loading">Loading…</div></main>
    <footer class="app-footer">Sluice Shop %[1]s</footer>
  </div>
  <script>window.__BOOT__ = { version: "%[1]s", api: "https://api.example.com/v2", offline: true };</script>
  <script src="%[2]s" defer></script>
  <script src="%[3]s" defer></script>
</body>
</html>
`, version, vendor, app, css)
}

func configJSON(version string, chunks []string) []byte {
	return fmt.Appendf(nil, `{
  "version": %q,
  "minClientVersion": "5.2.0",
  "entry": "index.html",
  "chunks": [%q, %q],
  "features": {
    "newCheckout": true,
    "reviews": %v,
    "coupons": %v,
    "darkMode": false
  },
  "cache": { "maxAgeSeconds": 86400, "staleWhileRevalidate": 3600 },
  "endpoints": {
    "api": "https://api.example.com/v2",
    "images": "https://img.example.com",
    "log": "https://log.example.com/collect"
  }
}
`, version, chunks[0], chunks[1], strings.Contains(chunks[1], "reviews"), strings.Contains(chunks[1], "coupons"))
}

// jsGen writes code-like text: readable modules (an application bundle)
// and minified code (a vendor bundle).
type jsGen struct {
	r *rand.Rand
}

var (
	nouns = []string{"user", "order", "cart", "item", "product", "price", "coupon", "address", "payment",
		"session", "token", "page", "list", "filter", "query", "result", "image", "banner", "review",
		"rating", "stock", "category", "shipping", "invoice", "profile", "message", "badge", "config",
		"route", "state", "event", "cache", "request", "response", "error", "count", "total", "discount"}
	verbs = []string{"get", "set", "load", "fetch", "update", "render", "build", "parse", "format",
		"validate", "compute", "apply", "remove", "create", "select", "sync", "track", "resolve", "merge",
		"normalize", "open", "close", "toggle", "refresh", "submit"}
	props = []string{"id", "name", "title", "price", "count", "items", "status", "type", "value", "url",
		"width", "height", "visible", "enabled", "createdAt", "updatedAt", "total", "currency", "code",
		"label", "children", "key", "page", "size", "offset", "limit"}
	strs = []string{"loading", "error", "success", "pending", "/api/v2/orders", "/api/v2/cart",
		"Add to cart", "Checkout", "Out of stock", "Free shipping", "Apply coupon", "Sign in",
		"Your order has been placed", "Please try again later", "yyyy-MM-dd", "USD", "CNY", "click",
		"touchstart", "visibilitychange", "app-header", "app-main", "cart-item", "price--sale"}
)

func (g *jsGen) pick(xs []string) string { return xs[g.r.IntN(len(xs))] }

func (g *jsGen) ident() string {
	n := g.pick(nouns)
	if g.r.IntN(3) == 0 {
		n += strings.ToUpper(g.pick(nouns)[:1]) + g.pick(nouns)[1:]
	}
	return n
}

func (g *jsGen) fname() string {
	n := g.pick(nouns)
	return g.pick(verbs) + strings.ToUpper(n[:1]) + n[1:]
}

func (g *jsGen) expr() string {
	switch g.r.IntN(9) {
	case 0:
		return fmt.Sprintf("%s.%s", g.ident(), g.pick(props))
	case 1:
		return fmt.Sprintf("%q", g.pick(strs))
	case 2:
		return fmt.Sprintf("%d", g.r.IntN(1000))
	case 3:
		return fmt.Sprintf("%s(%s, %s)", g.fname(), g.ident(), g.ident())
	case 4:
		return fmt.Sprintf("%s.%s.filter((x) => x.%s && x.%s > %d)", g.ident(), g.pick(props), g.pick(props), g.pick(props), g.r.IntN(10))
	case 5:
		return fmt.Sprintf("{ %s: %s, %s: %q }", g.pick(props), g.ident(), g.pick(props), g.pick(strs))
	case 6:
		return fmt.Sprintf("%s.%s || %d", g.ident(), g.pick(props), g.r.IntN(100))
	case 7:
		return fmt.Sprintf("await api.request(%q, { method: \"POST\", body: JSON.stringify(%s) })", g.pick(strs), g.ident())
	default:
		return fmt.Sprintf("%s.map((%s) => %s.%s)", g.ident(), g.pick(nouns), g.pick(nouns), g.pick(props))
	}
}

func (g *jsGen) stmt(b *strings.Builder, indent string, depth int) {
	switch k := g.r.IntN(10); {
	case k < 3:
		fmt.Fprintf(b, "%sconst %s = %s;\n", indent, g.ident(), g.expr())
	case k < 5:
		fmt.Fprintf(b, "%s%s.%s = %s;\n", indent, g.ident(), g.pick(props), g.expr())
	case k < 6 && depth < 2:
		fmt.Fprintf(b, "%sif (%s.%s === %s) {\n", indent, g.ident(), g.pick(props), g.expr())
		for range 1 + g.r.IntN(3) {
			g.stmt(b, indent+"  ", depth+1)
		}
		fmt.Fprintf(b, "%s}\n", indent)
	case k < 7 && depth < 2:
		fmt.Fprintf(b, "%sfor (const %s of %s.%s) {\n", indent, g.pick(nouns), g.ident(), g.pick(props))
		for range 1 + g.r.IntN(3) {
			g.stmt(b, indent+"  ", depth+1)
		}
		fmt.Fprintf(b, "%s}\n", indent)
	case k < 8:
		fmt.Fprintf(b, "%s// %s the %s before the %s is %s\n", indent, g.pick(verbs), g.pick(nouns), g.pick(nouns), g.pick(strs))
	case k < 9:
		fmt.Fprintf(b, "%sthis.emit(%q, %s);\n", indent, g.pick(strs), g.expr())
	default:
		fmt.Fprintf(b, "%s%s(%s);\n", indent, g.fname(), g.expr())
	}
}

func (g *jsGen) function(b *strings.Builder) {
	fmt.Fprintf(b, "  %s(%s, %s) {\n", g.fname(), g.ident(), g.ident())
	for range 3 + g.r.IntN(8) {
		g.stmt(b, "    ", 0)
	}
	fmt.Fprintf(b, "    return %s;\n  },\n", g.expr())
}

// module is one webpack-style module of an application bundle.
func (g *jsGen) module(prefix string, id int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "/***/ \"./src/%s/%s.js\":\n/***/ (function(module, exports, __webpack_require__) {\n\"use strict\";\n", prefix, g.ident())
	fmt.Fprintf(&b, "const %s = __webpack_require__(%d);\nmodule.exports = {\n", g.ident(), id)
	for range 4 + g.r.IntN(6) {
		g.function(&b)
	}
	b.WriteString("};\n/***/ }),\n")
	return []byte(b.String())
}

func (g *jsGen) modules(prefix string, n int) [][]byte {
	mods := make([][]byte, n)
	for i := range mods {
		mods[i] = g.module(prefix, i)
	}
	return mods
}

// edit changes a module as a small code change would: a few lines
// rewritten and one inserted.
func (g *jsGen) edit(mod []byte) []byte {
	lines := strings.Split(string(mod), "\n")
	for range 3 {
		i := 4 + g.r.IntN(len(lines)-6)
		var b strings.Builder
		g.stmt(&b, "    ", 2)
		lines[i] = strings.TrimSuffix(b.String(), "\n")
	}
	var b strings.Builder
	g.stmt(&b, "    ", 2)
	i := 4 + g.r.IntN(len(lines)-6)
	lines = slices.Insert(lines, i, strings.TrimSuffix(b.String(), "\n"))
	return []byte(strings.Join(lines, "\n"))
}

// minified is a vendor bundle: short names, long lines.
func (g *jsGen) minified(size int) []byte {
	var b strings.Builder
	b.WriteString("/*! vendor bundle | (c) example authors | MIT */\n")
	short := func() string {
		const letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$"
		n := 1 + g.r.IntN(2)
		s := make([]byte, n)
		for i := range s {
			s[i] = letters[g.r.IntN(len(letters))]
		}
		return string(s)
	}
	for b.Len() < size {
		fmt.Fprintf(&b, "function %s(%s,%s){", short(), short(), short())
		for range 2 + g.r.IntN(6) {
			switch g.r.IntN(6) {
			case 0:
				fmt.Fprintf(&b, "var %s=%s.%s||%d;", short(), short(), g.pick(props), g.r.IntN(64))
			case 1:
				fmt.Fprintf(&b, "if(%s&&%s.%s)return %s(%s,%q);", short(), short(), g.pick(props), short(), short(), g.pick(strs))
			case 2:
				fmt.Fprintf(&b, "for(var %s=0;%s<%s.length;%s++)%s[%s]=%s(%s[%s]);", "i", "i", short(), "i", short(), "i", short(), short(), "i")
			case 3:
				fmt.Fprintf(&b, "%s.prototype.%s=function(%s){return this.%s=%s,this};", short(), g.fname(), short(), g.pick(props), short())
			case 4:
				fmt.Fprintf(&b, "%s=Object.assign({},%s,{%s:%s});", short(), short(), g.pick(props), short())
			default:
				fmt.Fprintf(&b, "return %s?%s:%s(%s);", short(), short(), short(), short())
			}
		}
		b.WriteString("}")
		if g.r.IntN(12) == 0 {
			b.WriteString("\n")
		}
	}
	return []byte(b.String())
}

// css writes n rules.
func (g *jsGen) css(n int) []byte {
	var b strings.Builder
	decls := []string{"display: flex", "display: block", "align-items: center", "justify-content: space-between",
		"color: #1f6feb", "color: #24292f", "background: #f6f8fa", "border-radius: 6px", "font-size: 14px",
		"font-weight: 600", "line-height: 1.5", "margin: 0 auto", "padding: 8px 12px", "transition: opacity .2s",
		"box-shadow: 0 1px 3px rgba(0,0,0,.12)", "overflow: hidden", "text-overflow: ellipsis", "white-space: nowrap"}
	for i := range n {
		if i == n/2 {
			b.WriteString(".app-footer {\n  padding: 16px;\n  color: #57606a;\n}\n\n")
		}
		fmt.Fprintf(&b, ".%s-%s__%s {\n", g.pick(nouns), g.pick(nouns), g.pick(props))
		for range 2 + g.r.IntN(5) {
			fmt.Fprintf(&b, "  %s;\n", g.pick(decls))
		}
		b.WriteString("}\n\n")
	}
	return []byte(b.String())
}

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// pngImage draws a w×h picture: smooth gradients and shapes with noise of
// the given amplitude (0 for flat art, ~10 for photo-like content), so the
// PNG compresses as real ones do.
func pngImage(seed uint64, w, h, noise int) []byte {
	r := rand.New(rand.NewPCG(seed, 99))
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	c1 := [3]float64{float64(r.IntN(256)), float64(r.IntN(256)), float64(r.IntN(256))}
	c2 := [3]float64{float64(r.IntN(256)), float64(r.IntN(256)), float64(r.IntN(256))}
	cx, cy, rad := float64(r.IntN(w)), float64(r.IntN(h)), float64(min(w, h))/3
	for y := range h {
		for x := range w {
			t := float64(x+y) / float64(w+h)
			var px [3]uint8
			for i := range px {
				v := c1[i]*(1-t) + c2[i]*t
				if math.Hypot(float64(x)-cx, float64(y)-cy) < rad {
					v = 255 - v
				}
				if noise > 0 {
					v += float64(r.IntN(2*noise+1) - noise)
				}
				px[i] = uint8(max(0, min(255, v)))
			}
			img.SetNRGBA(x, y, color.NRGBA{px[0], px[1], px[2], 255})
		}
	}
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		panic(err)
	}
	return buf.Bytes()
}
