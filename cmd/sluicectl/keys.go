package main

// Credentials for development and operations: client tokens signed with
// sluiced's key, and a self-signed TLS certificate. Neither command needs a
// running sluiced.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sluicehq/sluice/gateway"
)

// tokenKeyFile is the name, in the data directory, of the Ed25519 key
// sluiced signs and verifies client tokens with.
const tokenKeyFile = "token.key"

// adminTokenFile is the name, in the data directory, of the admin API
// token sluiced generates at its first start (unless given one).
const adminTokenFile = "admin.token"

// token prints a client token signed with sluiced's key.
func (c *cli) token(args []string) error {
	fs := flag.NewFlagSet("token", flag.ContinueOnError)
	device := fs.String("device", "", "device id (required)")
	app := fs.String("app", "", "app id (required)")
	user := fs.String("user", "", "user id (empty: no user signed in on the device)")
	ttl := fs.Duration("ttl", 24*time.Hour, "validity period")
	keyPath := fs.String("key", filepath.Join(c.data, tokenKeyFile), "signing key (PEM, Ed25519 PKCS #8)")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("token: unexpected argument %q", fs.Arg(0))
	}
	if *device == "" || *app == "" {
		return errors.New("token: --device and --app are required")
	}
	if *ttl <= 0 {
		return fmt.Errorf("token: --ttl %v: want a positive duration", *ttl)
	}
	// LoadOrCreateKey would create a missing key; sluicectl only reads
	// one, so that it never signs with a key sluiced does not know.
	if _, err := os.Stat(*keyPath); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("token: no signing key at %s: sluiced creates it at start (run sluiced once with this --data, or pass --key)", *keyPath)
	} else if err != nil {
		return fmt.Errorf("token: %w", err)
	}
	key, err := gateway.LoadOrCreateKey(*keyPath)
	if err != nil {
		return fmt.Errorf("token: %w", err)
	}
	now := time.Now()
	tok, err := gateway.NewSigner(key).Issue(gateway.Claims{User: *user, Device: *device, App: *app, IssuedAt: now, Expires: now.Add(*ttl)})
	if err != nil {
		return fmt.Errorf("token: %w", err)
	}
	fmt.Fprintln(c.out, tok)
	return nil
}

// cert writes a self-signed development certificate and its key.
func (c *cli) cert(args []string) error {
	fs := flag.NewFlagSet("cert", flag.ContinueOnError)
	out := fs.String("out", filepath.Join(c.data, "tls"), "directory for cert.pem and key.pem")
	hosts := fs.String("hosts", "localhost,127.0.0.1,::1", "comma-separated host names and IP addresses the certificate is valid for")
	valid := fs.Duration("valid", 720*time.Hour, "validity period")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("cert: unexpected argument %q", fs.Arg(0))
	}
	if *valid <= 0 {
		return fmt.Errorf("cert: --valid %v: want a positive duration", *valid)
	}
	certPEM, keyPEM, err := selfSigned(strings.Split(*hosts, ","), time.Now(), *valid)
	if err != nil {
		return fmt.Errorf("cert: %w", err)
	}
	certPath, keyPath := filepath.Join(*out, "cert.pem"), filepath.Join(*out, "key.pem")
	if err := os.MkdirAll(*out, 0o700); err != nil {
		return fmt.Errorf("cert: %w", err)
	}
	if err := writeAtomic(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("cert: %w", err)
	}
	if err := writeAtomic(certPath, certPEM, 0o644); err != nil {
		return fmt.Errorf("cert: %w", err)
	}
	fmt.Fprintf(c.out, "certificate %s\nkey         %s\n", certPath, keyPath)
	fmt.Fprintf(c.out, "hint: serve TLS with these two files; clients trust cert.pem as a root (it is its own CA), for development only\n")
	return nil
}

// selfSigned returns a PEM certificate and PEM PKCS #8 ECDSA P-256 key: a
// TLS server certificate for hosts (IP SANs for IP addresses, DNS SANs for
// the rest), valid from an hour before now (for clock skew) until now+valid.
// It is its own CA, so a client can put it in its root pool.
func selfSigned(hosts []string, now time.Time, valid time.Duration) (certPEM, keyPEM []byte, err error) {
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"sluice development"}, CommonName: "sluice development certificate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(valid),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		switch ip := net.ParseIP(h); {
		case h == "":
		case ip != nil:
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		default:
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	if len(tmpl.IPAddresses)+len(tmpl.DNSNames) == 0 {
		return nil, nil, errors.New("--hosts names no host")
	}
	tmpl.SerialNumber, err = rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// writeAtomic replaces path with data, with mode perm, through a temporary
// file and a rename: a reader sees the old or the new file, and a key file
// is never readable with a wider mode, even for a moment.
func writeAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*") // mode 0600
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // fails harmlessly after the rename
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
