package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/gateway"
)

// runCtl runs one sluicectl command in-process, without a sluiced, and
// returns its standard output and error output apart.
func runCtl(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	err = run(ctx, args, &out, &errOut)
	return out.String(), errOut.String(), err
}

func TestToken(t *testing.T) {
	data := t.TempDir()
	keyPath := filepath.Join(data, "token.key")
	if _, err := gateway.LoadOrCreateKey(keyPath); err != nil { // as sluiced does at start
		t.Fatal(err)
	}
	pub, err := gateway.LoadPublicKey(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	v := gateway.NewVerifier(pub)

	for _, tc := range []struct {
		args []string
		want gateway.Claims
		ttl  time.Duration
	}{
		{[]string{"--device", "phone-1", "--app", "demo", "--user", "alice", "--ttl", "2h"}, gateway.Claims{User: "alice", Device: "phone-1", App: "demo"}, 2 * time.Hour},
		{[]string{"--device", "kiosk", "--app", "demo_app"}, gateway.Claims{Device: "kiosk", App: "demo_app"}, 24 * time.Hour},
	} {
		before := time.Now().Truncate(time.Second)
		out, errOut, err := runCtl(t, append([]string{"--data", data, "token"}, tc.args...)...)
		if err != nil {
			t.Fatalf("token %v: %v\n%s", tc.args, err, errOut)
		}
		if strings.Count(out, "\n") != 1 || !strings.HasSuffix(out, "\n") {
			t.Fatalf("token printed %q, want one line", out)
		}
		got, err := v.Verify(strings.TrimSpace(out), time.Now())
		if err != nil {
			t.Fatalf("Verify token of %v: %v", tc.args, err)
		}
		if got.User != tc.want.User || got.Device != tc.want.Device || got.App != tc.want.App {
			t.Errorf("token of %v carries %+v, want %+v", tc.args, got, tc.want)
		}
		if got.IssuedAt.Before(before) || got.IssuedAt.After(time.Now()) {
			t.Errorf("issued at %v, want now (%v)", got.IssuedAt, before)
		}
		if d := got.Expires.Sub(got.IssuedAt); d != tc.ttl {
			t.Errorf("token of %v valid for %v, want %v", tc.args, d, tc.ttl)
		}
	}

	// --key overrides the data directory's key.
	otherPath := filepath.Join(t.TempDir(), "other.key")
	if _, err := gateway.LoadOrCreateKey(otherPath); err != nil {
		t.Fatal(err)
	}
	out, errOut, err := runCtl(t, "--data", data, "token", "--device", "d", "--app", "a", "--key", otherPath)
	if err != nil {
		t.Fatalf("token --key: %v\n%s", err, errOut)
	}
	if _, err := v.Verify(strings.TrimSpace(out), time.Now()); !errors.Is(err, gateway.ErrTokenInvalid) {
		t.Errorf("token signed with --key verifies with the data key: %v", err)
	}
	otherPub, err := gateway.LoadPublicKey(otherPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gateway.NewVerifier(otherPub).Verify(strings.TrimSpace(out), time.Now()); err != nil {
		t.Errorf("token signed with --key: %v", err)
	}
}

func TestTokenRefuses(t *testing.T) {
	// No key: a clear error, and sluicectl does not create one.
	empty := t.TempDir()
	_, _, err := runCtl(t, "--data", empty, "token", "--device", "d", "--app", "a")
	if err == nil || !strings.Contains(err.Error(), "sluiced creates it at start") || !strings.Contains(err.Error(), filepath.Join(empty, "token.key")) {
		t.Errorf("token without a key: %v, want the path and that sluiced creates the key", err)
	}
	if _, err := os.Stat(filepath.Join(empty, "token.key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("token created a key file: %v", err)
	}

	data := t.TempDir()
	if _, err := gateway.LoadOrCreateKey(filepath.Join(data, "token.key")); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--app", "a"},
		{"--device", "d"},
		{"--device", "d", "--app", "a", "--ttl", "0s"},
		{"--device", "d", "--app", "a", "--ttl", "-1h"},
		{"--device", "d", "--app", "a", "extra"},
	} {
		if out, _, err := runCtl(t, append([]string{"--data", data, "token"}, args...)...); err == nil {
			t.Errorf("token %v printed %q, want an error", args, out)
		}
	}
	for _, args := range [][]string{
		{"--device", "d.1", "--app", "a"},
		{"--device", "d", "--app", "com.example.app"},
		{"--device", "d", "--app", "a", "--user", "a@b.c"},
	} {
		if out, _, err := runCtl(t, append([]string{"--data", data, "token"}, args...)...); !errors.Is(err, gateway.ErrTokenInvalid) {
			t.Errorf("token %v: %q, %v; want ErrTokenInvalid", args, out, err)
		}
	}
}

func TestCert(t *testing.T) {
	data := t.TempDir()
	out, errOut, err := runCtl(t, "--data", data, "cert", "--hosts", "localhost, 127.0.0.1,::1", "--valid", "1h")
	if err != nil {
		t.Fatalf("cert: %v\n%s", err, errOut)
	}
	dir := filepath.Join(data, "tls")
	certPath, keyPath := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	for _, p := range []string{certPath, keyPath} {
		if !strings.Contains(out, p) {
			t.Errorf("cert printed %q, want the path %s", out, p)
		}
	}
	if !strings.Contains(out, "hint:") {
		t.Errorf("cert printed %q, want a hint", out)
	}
	checkMode(t, keyPath, 0o600)
	checkMode(t, dir, 0o700)

	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatalf("cert.pem holds %q, want a CERTIFICATE block", certPEM)
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, ip := range cert.IPAddresses {
		ips = append(ips, ip.String())
	}
	if !slices.Equal(cert.DNSNames, []string{"localhost"}) || !slices.Equal(ips, []string{"127.0.0.1", "::1"}) {
		t.Errorf("SANs: DNS %v, IP %v; want [localhost], [127.0.0.1 ::1]", cert.DNSNames, ips)
	}
	if !cert.IsCA || !slices.Contains(cert.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || cert.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("IsCA %v, ExtKeyUsage %v, key %v; want a CA, server auth, ECDSA", cert.IsCA, cert.ExtKeyUsage, cert.PublicKeyAlgorithm)
	}
	if d := time.Until(cert.NotAfter); d < 55*time.Minute || d > time.Hour {
		t.Errorf("NotAfter %v is %v away, want about 1h", cert.NotAfter, d)
	}

	pair, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		t.Fatalf("load key pair: %v", err)
	}
	addr := serveTLS(t, &tls.Config{Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS13})
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(certPEM) {
		t.Fatal("cert.pem does not load into a pool")
	}
	// The IP SAN (no server name) and the DNS SAN both verify.
	for _, name := range []string{"", "localhost"} {
		cfg := &tls.Config{RootCAs: roots, ServerName: name, MinVersion: tls.VersionTLS13}
		state, err := handshake(addr, cfg)
		if err != nil {
			t.Fatalf("handshake as %q: %v", name, err)
		}
		if state.Version != tls.VersionTLS13 {
			t.Errorf("negotiated %s, want TLS 1.3", tls.VersionName(state.Version))
		}
	}
	// A host outside the SANs, and a client without the root, are refused.
	for name, cfg := range map[string]*tls.Config{
		"other host": {RootCAs: roots, ServerName: "example.com"},
		"no root":    {ServerName: "localhost"},
	} {
		if _, err := handshake(addr, cfg); err == nil {
			t.Errorf("%s: handshake succeeded", name)
		}
	}

	// Running it again replaces both files; a key file someone widened is
	// written back with mode 0600.
	if err := os.Chmod(keyPath, 0o644); err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if _, errOut, err := runCtl(t, "--data", other, "cert", "--out", dir); err != nil {
		t.Fatalf("cert again: %v\n%s", err, errOut)
	}
	checkMode(t, keyPath, 0o600)
	again, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(again, certPEM) {
		t.Error("second cert run left the certificate unchanged")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("%s holds %d files, want cert.pem and key.pem only", dir, len(entries))
	}
	if _, err := os.Stat(filepath.Join(other, "tls")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cert --out wrote into the data directory too: %v", err)
	}
}

func TestCertRefuses(t *testing.T) {
	for _, args := range [][]string{
		{"--hosts", ""},
		{"--hosts", " , "},
		{"--valid", "0s"},
	} {
		dir := t.TempDir()
		if out, _, err := runCtl(t, append([]string{"cert", "--out", dir}, args...)...); err == nil {
			t.Errorf("cert %v printed %q, want an error", args, out)
		}
	}
}

func checkMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != want {
		t.Errorf("%s has mode %v, want %v", path, got, want)
	}
}

// serveTLS accepts TLS connections on a loopback port until the test ends;
// each completed handshake is answered with "ok\n". It returns the address.
func serveTLS(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return // closed at cleanup
			}
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			if conn.(*tls.Conn).Handshake() == nil {
				_, _ = io.WriteString(conn, "ok\n")
			}
			conn.Close()
		}
	})
	return ln.Addr().String()
}

// handshake dials addr with cfg and reads the server's answer.
func handshake(addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(conn)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	if string(got) != "ok\n" {
		return tls.ConnectionState{}, errors.New("server answered " + string(got))
	}
	return conn.(*tls.Conn).ConnectionState(), nil
}
