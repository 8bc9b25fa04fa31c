package main

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/oplog/oplogpb"
)

func TestParseConfig(t *testing.T) {
	env := map[string]string{"SLUICE_DATA": "/env/data", "SLUICE_FSYNC": "interval", "SLUICE_SHARDS": "4"}
	c, err := parseConfig([]string{"--shards", "2", "--dedupe-window", "5m"}, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if c.DataDir != "/env/data" || c.Fsync != FsyncInterval || c.Shards != 2 || c.DuplicateWindow != 5*time.Minute {
		t.Fatalf("got %+v: want data and fsync from the environment, shards and window from flags", c)
	}
	d, err := parseConfig(nil, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	if d.DataDir != "./sluice-data" || d.Fsync != FsyncAlways || d.NATSListen != "127.0.0.1:4222" || d.AdminListen != "127.0.0.1:7480" {
		t.Fatalf("defaults %+v", d)
	}
	for _, bad := range [][]string{{"--fsync", "sometimes"}, {"--shards", "0"}, {"--log-level", "loud"}, {"extra"}} {
		if _, err := parseConfig(bad, func(string) string { return "" }); err == nil {
			t.Errorf("parseConfig(%q) accepted", bad)
		}
	}
	if _, err := parseConfig(nil, func(k string) string {
		if k == "SLUICE_SHARDS" {
			return "many"
		}
		return ""
	}); err == nil || !strings.Contains(err.Error(), "SLUICE_SHARDS") {
		t.Errorf("bad env var: %v", err)
	}
}

func TestParseBusinesses(t *testing.T) {
	bs, err := parseBusinesses("chat:user, settings:device ,coupons:user:single")
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 3 || bs[1].Dimension != oplogpb.Dimension_DIMENSION_DEVICE || bs[2].DeviceMode != oplogpb.DeviceMode_DEVICE_MODE_SINGLE {
		t.Fatalf("got %v", bs)
	}
	for _, bad := range []string{"Chat", "chat:group", "chat:user:twice", "a:user:single:x"} {
		if _, err := parseBusinesses(bad); err == nil {
			t.Errorf("parseBusinesses(%q) accepted", bad)
		}
	}
}

func TestParseConfigAdminToken(t *testing.T) {
	const tok = "0123456789abcdef0123"
	env := func(kv ...string) func(string) string {
		return func(k string) string {
			for i := 0; i+1 < len(kv); i += 2 {
				if kv[i] == k {
					return kv[i+1]
				}
			}
			return ""
		}
	}
	c, err := parseConfig(nil, env("SLUICE_ADMIN_TOKEN", tok))
	if err != nil {
		t.Fatal(err)
	}
	if c.AdminToken != tok || !c.adminTokenFromEnv {
		t.Errorf("from the environment: token %q, from env %v", c.AdminToken, c.adminTokenFromEnv)
	}
	c, err = parseConfig([]string{"--admin-token", tok}, env("SLUICE_ADMIN_TOKEN", "ignored-because-of-the-flag"))
	if err != nil {
		t.Fatal(err)
	}
	if c.AdminToken != tok || c.adminTokenFromEnv {
		t.Errorf("from the flag: token %q, from env %v", c.AdminToken, c.adminTokenFromEnv)
	}
	data, _ := json.Marshal(c)
	if strings.Contains(string(data), tok) {
		t.Errorf("the logged configuration shows the token: %s", data)
	}
	c, err = parseConfig([]string{"--admin-tokens", "/etc/sluice/admins"}, env())
	if err != nil || c.AdminTokens != "/etc/sluice/admins" || c.AdminToken != "" {
		t.Errorf("--admin-tokens: %+v, %v", c, err)
	}
	for _, bad := range [][]string{{"--admin-token", "short"}, {"--admin-token", tok, "--admin-tokens", "f"}, {"--admin-token", tok + " x"}} {
		_, err := parseConfig(bad, env())
		if err == nil {
			t.Errorf("parseConfig(%q) accepted", bad)
		} else if strings.Contains(err.Error(), tok) {
			t.Errorf("parseConfig(%q): %v shows the token", bad, err)
		}
	}
}
