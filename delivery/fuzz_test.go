package delivery_test

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/proto"
)

// FuzzRender: any template and value render without panicking, within the
// limit, as valid UTF-8, and a value is never parsed as a template.
// Seeds: testdata/fuzz/FuzzRender.
func FuzzRender(f *testing.F) {
	f.Add("Hi {{name}}!", "Ann")
	f.Add("{{name}}{{name}}", "{{name}}")
	f.Add("{{ name }} {{x}} {{", "\x00\x07")
	f.Fuzz(func(t *testing.T, tmpl, value string) {
		out, err := delivery.Render(tmpl, map[string]string{"name": value}, 512)
		if err != nil {
			return
		}
		if len(out) > 512 || !utf8.ValidString(out) {
			t.Fatalf("Render(%q) = %q: over the limit or not UTF-8", tmpl, out)
		}
		if !strings.Contains(tmpl, "{{") && out != tmpl && utf8.ValidString(tmpl) {
			t.Fatalf("a template without placeholders changed: %q → %q", tmpl, out)
		}
	})
}

// FuzzRule: any bytes decoded as a rule either fail Compile with a typed
// error or compile to a rule whose Match never panics. Seeds:
// testdata/fuzz/FuzzRule.
func FuzzRule(f *testing.F) {
	for _, r := range []*deliverypb.Rule{
		{Percent: pct(10), Os: []string{"android"}, AppVersionMin: "1.2"},
		{Users: []string{"u1"}, Percent: pct(0), NotBeforeMs: 1, NotAfterMs: 2},
		{Cpus: []string{"arm64"}, OsVersionMax: "14.1-beta"},
	} {
		b, _ := proto.Marshal(r)
		f.Add(b, "dev-1", "10.2.3")
	}
	f.Fuzz(func(t *testing.T, data []byte, device, version string) {
		pb := &deliverypb.Rule{}
		if proto.Unmarshal(data, pb) != nil {
			return
		}
		r, err := delivery.Compile(pb, "salt")
		if err != nil {
			return
		}
		d := &delivery.Device{ID: device, User: device, Attrs: oplog.Attrs{AppVersion: version, OSVersion: version, OS: "android", CPU: "arm64"}}
		r.Match(d, 1)
		if p := delivery.Place("salt", device); p >= delivery.PercentScale {
			t.Fatalf("place %d out of range", p)
		}
	})
}
