package client_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
)

// fetchToken stands for the app's call to its own back end, which signs
// tokens for the device (and the signed-in user).
func fetchToken(ctx context.Context) (string, error) { return "v1.…", nil }

// A typical app: one client per device, a handler per business, Run until
// the app stops.
func Example() {
	c, err := client.New(client.Config{
		URL:      "wss://gw.example.com:7481/v1/ws",
		URLs:     []string{"tls://gw.example.com:7482"}, // fallback: TLV over TLS
		Token:    fetchToken,
		Attrs:    &gatewaypb.Attrs{AppVersion: "10.3.2", Os: "android", Network: "wifi"},
		StateDir: filepath.Join(os.TempDir(), "sluice-example"),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	c.Handle("chat", func(ctx context.Context, it *client.Item) error {
		// Store the message; an error here has the item sent again.
		fmt.Printf("chat %d: %s\n", it.Id, it.Payload)
		return nil
	})
	c.HandleDefault(func(ctx context.Context, it *client.Item) error {
		fmt.Printf("%s %d: %d bytes\n", it.Business, it.Id, len(it.Payload))
		return nil
	})

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	switch err := c.Run(ctx); {
	case errors.Is(err, client.ErrUnauthenticated):
		fmt.Println("sign in again:", err)
	case errors.Is(err, client.ErrReplaced):
		fmt.Println("this device is connected elsewhere")
	case err != nil:
		fmt.Println(err)
	}
}

// Topics the user follows, and "_all" (every device), come on the same
// link: a topic item goes to its topic's handler, else to its business's,
// else to the default one. The client keeps a cursor per topic beside the
// sync points, and a reset topic goes to HandleTopicReset.
func ExampleClient_HandleTopic() {
	c, err := client.New(client.Config{
		URL:      "wss://gw.example.com:7481/v1/ws",
		Token:    fetchToken,
		StateDir: filepath.Join(os.TempDir(), "sluice-example"),
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	c.HandleTopic("news", func(ctx context.Context, it *client.Item) error {
		fmt.Printf("news %d: %s\n", it.Id, it.Payload)
		return nil
	})
	c.HandleTopic("_all", func(ctx context.Context, it *client.Item) error {
		fmt.Printf("announcement: %s\n", it.Payload)
		return nil
	})
	c.HandleTopicReset(func(ctx context.Context, topic string) error {
		fmt.Println("topic recreated, dropping what we had of", topic)
		return nil
	})
	_ = c.Run(context.Background())
}
