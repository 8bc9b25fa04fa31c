package delivery_test

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/diff"
	"google.golang.org/protobuf/proto"
)

// packagesDir is the repository's testdata/packages.
var packagesDir = filepath.Join("..", "testdata", "packages")

func readPackage(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(packagesDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// tokenAuth accepts "Bearer <device>" and names that device: the HTTP
// handlers' authentication is sluiced's (gateway tokens), tested there.
func tokenAuth(r *http.Request) (delivery.Identity, error) {
	dev, ok := bytes.CutPrefix([]byte(r.Header.Get("Authorization")), []byte("Bearer "))
	if !ok || len(dev) == 0 {
		return delivery.Identity{}, errors.New("no token")
	}
	return delivery.Identity{Device: string(dev)}, nil
}

func get(t *testing.T, url string, header ...string) (*http.Response, []byte) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// TestUploadComputesDiffs uploads two versions of the H5 bundle and of the
// binary: the second of each gets a diff from the first, smaller than the
// package, served by the download handler, that rebuilds the package.
func TestUploadComputesDiffs(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	srv := httptest.NewServer(d.DownloadHandler("/v1/packages/", tokenAuth))
	defer srv.Close()
	for _, c := range []struct {
		pkg        string
		kind       deliverypb.PackageKind
		old, new   string
		wantFormat string
	}{
		{"mall-h5", deliverypb.PackageKind_PACKAGE_KIND_H5, "h5-v1.zip", "h5-v2.zip", "zip"},
		{"app", deliverypb.PackageKind_PACKAGE_KIND_APP, "app-v1.bin", "app-v2.bin", "bytes"},
	} {
		oldData, newData := readPackage(t, c.old), readPackage(t, c.new)
		for i, data := range [][]byte{oldData, newData} {
			if _, err := d.Upload(ctx(t), delivery.Upload{Package: c.pkg, Kind: c.kind, Version: fmt.Sprint(i + 1), Data: data}, "ci"); err != nil {
				t.Fatalf("%s: upload: %v", c.pkg, err)
			}
		}
		rel, _ := d.Release(c.pkg, "2")
		v := rel.Version
		if len(v.Diffs) != 1 {
			t.Fatalf("%s: %d diffs, want 1 from version 1", c.pkg, len(v.Diffs))
		}
		df := v.Diffs[0]
		if df.FromVersion != "1" || df.Format != c.wantFormat || df.Size >= v.Size {
			t.Fatalf("%s: diff %v (package %d bytes)", c.pkg, df, v.Size)
		}
		t.Logf("%s: package %d bytes, diff from 1 (%s) %d bytes (%.1f%%)", c.pkg, v.Size, df.Format, df.Size, 100*float64(df.Size)/float64(v.Size))

		// The full package, whole and by range.
		resp, body := get(t, srv.URL+"/v1/packages/"+c.pkg+"/2", "Authorization", "Bearer dev-1")
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, newData) {
			t.Fatalf("%s: download: %d, %d bytes", c.pkg, resp.StatusCode, len(body))
		}
		if want := fmt.Sprintf(`"%x"`, sha256.Sum256(newData)); resp.Header.Get("ETag") != want {
			t.Fatalf("%s: ETag %s, want %s", c.pkg, resp.Header.Get("ETag"), want)
		}
		resp, body = get(t, srv.URL+"/v1/packages/"+c.pkg+"/2", "Authorization", "Bearer dev-1", "Range", "bytes=1000-")
		if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, newData[1000:]) {
			t.Fatalf("%s: range: %d, %d bytes", c.pkg, resp.StatusCode, len(body))
		}
		// The diff, applied to the old version, rebuilds the new one.
		resp, patch := get(t, srv.URL+"/v1/packages/"+c.pkg+"/2/from/1", "Authorization", "Bearer dev-1")
		if resp.StatusCode != http.StatusOK || int64(len(patch)) != df.Size {
			t.Fatalf("%s: diff download: %d, %d bytes", c.pkg, resp.StatusCode, len(patch))
		}
		if sum := sha256.Sum256(patch); !bytes.Equal(sum[:], df.Sha256) {
			t.Fatalf("%s: diff bytes do not match their digest", c.pkg)
		}
		rebuilt, err := diff.Apply(oldData, patch, nil)
		if err != nil {
			t.Fatalf("%s: apply: %v", c.pkg, err)
		}
		if c.wantFormat == "bytes" && !bytes.Equal(rebuilt, newData) {
			t.Fatalf("%s: rebuilt package differs", c.pkg)
		}
		if c.wantFormat == "zip" {
			tree, err := diff.TreeDigest(rebuilt, nil)
			if err != nil || !bytes.Equal(tree[:], v.TreeSha256) {
				t.Fatalf("%s: rebuilt tree %x, manifest says %x (%v)", c.pkg, tree, v.TreeSha256, err)
			}
		}
	}
	for _, bad := range []struct{ path, auth string }{
		{"/v1/packages/app/2", ""},
		{"/v1/packages/app/9", "Bearer d"},
		{"/v1/packages/app/2/from/9", "Bearer d"},
		{"/v1/packages/nope/1", "Bearer d"},
		{"/v1/packages/app", "Bearer d"},
	} {
		resp, _ := get(t, srv.URL+bad.path, "Authorization", bad.auth)
		if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusNotFound {
			t.Errorf("%s (auth %q): status %d", bad.path, bad.auth, resp.StatusCode)
		}
	}
}

// TestUpdatesHandler: the HTTP check for updates answers the device's view
// with its digest as ETag, and 304 when the client has it.
func TestUpdatesHandler(t *testing.T) {
	e := newEnv(t)
	d := e.open(t, time.Now)
	srv := httptest.NewServer(d.UpdatesHandler(tokenAuth))
	defer srv.Close()
	if _, err := d.SetSwitch(ctx(t), &deliverypb.Switch{Key: "beta", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL,
		DefaultValue: boolValue(false), Variants: []*deliverypb.Variant{{Name: "ios", Value: boolValue(true),
			Rule: &deliverypb.Rule{Os: []string{"ios"}}}}}, "x", 0); err != nil {
		t.Fatal(err)
	}
	resp, body := get(t, srv.URL+"/v1/updates?os=ios&app_version=1.2", "Authorization", "Bearer dev-9")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	v := &deliverypb.View{}
	if err := proto.Unmarshal(body, v); err != nil || len(v.Switches) != 1 || !v.Switches[0].Value.GetBoolValue() {
		t.Fatalf("view %v (%v)", v, err)
	}
	if resp.Header.Get("ETag") != `"`+v.Digest+`"` {
		t.Fatalf("ETag %s, digest %s", resp.Header.Get("ETag"), v.Digest)
	}
	resp, body = get(t, srv.URL+"/v1/updates?os=ios&app_version=1.2", "Authorization", "Bearer dev-9", "If-None-Match", `"`+v.Digest+`"`)
	if resp.StatusCode != http.StatusNotModified || len(body) != 0 {
		t.Fatalf("with the current digest: %d, %d bytes", resp.StatusCode, len(body))
	}
	resp, body = get(t, srv.URL+"/v1/updates?os=android", "Authorization", "Bearer dev-9", "Accept", "application/json",
		"If-None-Match", `"`+v.Digest+`"`)
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte(`"beta"`)) {
		t.Fatalf("android, JSON: %d %s", resp.StatusCode, body)
	}
	// The answer is cached per device; a change, or a window opening,
	// shows at once all the same.
	if _, err := d.SetSwitch(ctx(t), &deliverypb.Switch{Key: "beta", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL,
		DefaultValue: boolValue(false), Variants: []*deliverypb.Variant{{Name: "ios", Value: boolValue(false),
			Rule: &deliverypb.Rule{Os: []string{"ios"}}}, {Name: "later", Value: boolValue(true),
			Rule: &deliverypb.Rule{NotBeforeMs: time.Now().Add(400 * time.Millisecond).UnixMilli()}}}}, "x", 0); err != nil {
		t.Fatal(err)
	}
	valueFor := func(os string) (bool, string) {
		t.Helper()
		resp, body := get(t, srv.URL+"/v1/updates?os="+os, "Authorization", "Bearer dev-9", "If-None-Match", `"`+v.Digest+`"`)
		got := &deliverypb.View{}
		if resp.StatusCode != http.StatusOK || proto.Unmarshal(body, got) != nil || len(got.Switches) != 1 {
			t.Fatalf("after a change: %d %v", resp.StatusCode, got)
		}
		return got.Switches[0].Value.GetBoolValue(), got.Switches[0].Variant
	}
	if on, variant := valueFor("ios"); on || variant != "ios" {
		t.Fatalf("ios after the change: %v %s", on, variant)
	}
	if on, _ := valueFor("android"); on {
		t.Fatal("android before the window opened: on")
	}
	time.Sleep(600 * time.Millisecond)
	if on, variant := valueFor("android"); !on || variant != "later" {
		t.Fatalf("android after the window opened: %v %s (a stale cached view?)", on, variant)
	}
	if resp, _ := get(t, srv.URL+"/v1/updates"); resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no token: %d", resp.StatusCode)
	}
	if resp, _ := get(t, srv.URL+"/v1/updates?os="+string(bytes.Repeat([]byte("x"), 100)), "Authorization", "Bearer d"); resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("oversized attribute: %d", resp.StatusCode)
	}
}

// TestDownloadStreamsBigPackages: a package over the in-memory limit is
// streamed from the object store, ranges included.
func TestDownloadStreamsBigPackages(t *testing.T) {
	delivery.SetMaxCachedObject(t, 1<<20)
	e := newEnv(t)
	d := e.open(t, time.Now)
	srv := httptest.NewServer(d.DownloadHandler("/v1/packages/", tokenAuth))
	defer srv.Close()
	data := make([]byte, 3<<20+123)
	for i := range data {
		data[i] = byte(i * 7 >> 3)
	}
	if _, err := d.Upload(ctx(t), delivery.Upload{Package: "big", Kind: deliverypb.PackageKind_PACKAGE_KIND_RESOURCE, Version: "1", Data: data}, "x"); err != nil {
		t.Fatal(err)
	}
	url := srv.URL + "/v1/packages/big/1"
	auth := "Bearer dev"
	etag := fmt.Sprintf(`"%x"`, sha256.Sum256(data))
	for _, c := range []struct {
		name, rng, ifRange string
		status             int
		want               []byte
	}{
		{"whole", "", "", http.StatusOK, data},
		{"from an offset", "bytes=1000000-", "", http.StatusPartialContent, data[1000000:]},
		{"a slice", "bytes=10-19", "", http.StatusPartialContent, data[10:20]},
		{"the end", "bytes=-500", "", http.StatusPartialContent, data[len(data)-500:]},
		{"If-Range of another version", "bytes=10-19", `"other"`, http.StatusOK, data},
		{"If-Range of this one", "bytes=10-19", etag, http.StatusPartialContent, data[10:20]},
		{"past the end", "bytes=999999999-", "", http.StatusRequestedRangeNotSatisfiable, nil},
	} {
		resp, body := get(t, url, "Authorization", auth, "Range", c.rng, "If-Range", c.ifRange)
		if resp.StatusCode != c.status || (c.want != nil && !bytes.Equal(body, c.want)) {
			t.Errorf("%s: status %d, %d bytes; want %d, %d bytes", c.name, resp.StatusCode, len(body), c.status, len(c.want))
		}
		if resp.Header.Get("ETag") != etag {
			t.Errorf("%s: ETag %s", c.name, resp.Header.Get("ETag"))
		}
	}
}
