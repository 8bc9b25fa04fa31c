package client_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
)

// TestPushReceiptsAndOpened: a push item reaches the handler, decodes as a
// notification, and the client reports it delivered (with the next ack)
// and opened (Opened); the server's funnel counts both. The push address
// given in Config reaches the device registry.
func TestPushReceiptsAndOpened(t *testing.T) {
	noLeaks(t)
	de := newDeliveryEnv(t, nil)
	ctx := testCtx(t)
	var mu sync.Mutex
	var got []*deliverypb.Notification
	cfg := de.config(t, "phone-1")
	cfg.Token = tokens(de.token("zoe", "phone-1"))
	cfg.PushAddress = &deliverypb.PushAddress{Channel: "webhook", Token: "tok"}
	r := start(t, cfg, func(c *client.Client) {
		c.Handle(delivery.BusinessPush.Code, func(_ context.Context, it *client.Item) error {
			n, err := client.Notification(it)
			if err != nil {
				return err
			}
			mu.Lock()
			got = append(got, n)
			mu.Unlock()
			return nil
		})
	})
	if _, err := de.d.Push(ctx, &deliverypb.Push{Id: "hello-zoe", Title: "Hi {{n}}", Vars: map[string]string{"n": "Zoe"},
		ActionUri: "app://inbox", Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"zoe"}}}}, "test"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the push did not reach the handler")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got[0].Title != "Hi Zoe" || got[0].ActionUri != "app://inbox" || got[0].PushId != "hello-zoe" {
		t.Fatalf("notification %v", got[0])
	}
	if err := r.Opened(ctx, "hello-zoe"); err != nil {
		t.Fatal(err)
	}
	for {
		f, err := de.d.Funnel(ctx, "hello-zoe")
		if err != nil {
			t.Fatal(err)
		}
		if f.Sent == 1 && f.Delivered == 1 && f.Opened == 1 && f.Targeted == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("funnel %v, want 1 targeted, sent, delivered and opened", f)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if st := r.Stats(); st.Receipts != 1 {
		t.Fatalf("stats: %d receipts sent", st.Receipts)
	}
	// The gateway told the registry the device's push address.
	for {
		_ = de.reg.CatchUp(ctx)
		dev, ok, err := de.reg.Get("phone-1")
		if err != nil {
			t.Fatal(err)
		}
		if ok && dev.PushChannel == "webhook" && dev.PushToken == "tok" && dev.User == "zoe" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("registry record %v", dev)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
