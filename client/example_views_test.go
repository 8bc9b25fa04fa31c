package client_test

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sluicehq/sluice/client"
)

// installedVersions stands for what the app knows it has installed of
// each package: the version and the bytes (nil if it kept none).
func installedVersions(pkg string) (string, []byte) { return "", nil }

// An app that reads switches and installs the releases the server signs:
// the view comes on the link, and HandleView installs what it names.
func ExampleClient_HandleView() {
	serverKey := ed25519.PublicKey(make([]byte, ed25519.PublicKeySize)) // pinned in the app
	c, err := client.New(client.Config{
		URL:          "wss://gw.example.com:7481/v1/ws", // HTTP base: https://gw.example.com:7481
		Token:        fetchToken,
		StateDir:     filepath.Join(os.TempDir(), "sluice-example"),
		Views:        true,
		ManifestKeys: []ed25519.PublicKey{serverKey},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	// Switches answer at once, from the view persisted by the last run.
	if c.SwitchBool("new-checkout", false) {
		fmt.Println("new checkout on")
	}
	c.HandleView(func(ctx context.Context, v *client.View) {
		for _, m := range v.Releases {
			installed, old := installedVersions(m.Package)
			if err := c.CheckInstall(m, installed); err != nil {
				continue // up to date, expired, stale or a downgrade
			}
			// Keep handlers quick: a real app downloads on a goroutine of
			// its own.
			data, err := c.Install(ctx, m, installed, old)
			if errors.Is(err, client.ErrDownload) {
				continue // the next view or update check tries again
			}
			if err == nil {
				fmt.Printf("install %s %s: %d bytes\n", m.Package, m.Version, len(data))
			}
		}
	})
	_ = c.Run(context.Background())
}
