// Package deliverytest has test helpers for the delivery package: a
// Delivery and a device registry run on a real oplog until the test ends.
package deliverytest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

// MustRun opens a Delivery with cfg (a new signing key if cfg.Signer is
// nil; a temporary Dir for receipts if withReceipts), runs it until the
// end of the test and closes it.
func MustRun(tb testing.TB, cfg delivery.Config, withReceipts bool) *delivery.Delivery {
	tb.Helper()
	if cfg.Signer == nil {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			tb.Fatal(err)
		}
		cfg.Signer = delivery.NewSigner(key)
	}
	if withReceipts && cfg.Dir == "" {
		cfg.Dir = tb.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	d, err := delivery.Open(ctx, cfg)
	if err != nil {
		tb.Fatalf("open delivery: %v", err)
	}
	stop := oplogtest.RunUntilCleanup(tb, "delivery", d.Run)
	tb.Cleanup(func() {
		stop()
		_ = d.Close()
	})
	return d
}

// MustRunRegistry opens a device registry (in a temporary Dir unless cfg
// names one), runs it until the end of the test and closes it.
func MustRunRegistry(tb testing.TB, cfg delivery.RegistryConfig) *delivery.Registry {
	tb.Helper()
	if cfg.Dir == "" {
		cfg.Dir = tb.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	reg, err := delivery.OpenRegistry(ctx, cfg)
	if err != nil {
		tb.Fatalf("open registry: %v", err)
	}
	stop := oplogtest.RunUntilCleanup(tb, "registry", reg.Run)
	tb.Cleanup(func() {
		stop()
		_ = reg.Close()
	})
	return reg
}
