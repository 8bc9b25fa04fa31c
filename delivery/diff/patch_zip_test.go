package diff

import "testing"

func TestStem(t *testing.T) {
	for name, want := range map[string]string{
		"js/app.1f3e9c0a.js":         "js/app.*.js",
		"js/chunk-vendors.77ab20.js": "js/chunk-vendors.*.js",
		"assets/index-B2xYz9Qa.css":  "assets/index-*.css",
		"img/logo.png":               "img/logo.png",
		"js/app.v2.js":               "js/app.v2.js",
		"static/20250304/main.js":    "static/20250304/main.js", // directories are kept
		"build_1234567.txt":          "build_*.txt",             // 6 or more hex digits
		"a.deadbeef":                 "a.*",
		"readme":                     "readme",
	} {
		if got := stem(name); got != want {
			t.Errorf("stem(%q) = %q, want %q", name, got, want)
		}
	}
}
