package delivery_test

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/oplog"
)

// vendor is a local HTTP server speaking the webhook channel's protocol:
// it checks each request's signature and records the messages.
type vendor struct {
	secret []byte
	mu     sync.Mutex
	got    map[string]string // device → notification title
	calls  int
	status []int           // status to answer per call (then 200)
	refuse map[string]bool // devices answered with a per-message error
}

func (v *vendor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	v.mu.Lock()
	defer v.mu.Unlock()
	v.calls++
	if len(v.status) > 0 {
		st := v.status[0]
		v.status = v.status[1:]
		w.WriteHeader(st)
		return
	}
	if err := delivery.VerifyWebhook(v.secret, r.Header, body, time.Minute); err != nil {
		http.Error(w, err.Error(), http.StatusUnauthorized)
		return
	}
	var req struct {
		Channel  string `json:"channel"`
		Messages []struct {
			Device       string `json:"device"`
			Token        string `json:"token"`
			Notification struct {
				PushID string `json:"pushId"`
				Title  string `json:"title"`
			} `json:"notification"`
		} `json:"messages"`
	}
	if err := json.Unmarshal(body, &req); err != nil || req.Channel != "webhook" {
		http.Error(w, "bad body", http.StatusBadRequest)
		return
	}
	type result struct {
		Error string `json:"error"`
	}
	var res []result
	for _, m := range req.Messages {
		if m.Token != "tok-"+m.Device {
			res = append(res, result{Error: "unknown token"})
			continue
		}
		if v.refuse[m.Device] {
			res = append(res, result{Error: "unregistered"})
			continue
		}
		v.got[m.Device] = m.Notification.Title
		res = append(res, result{})
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"results": res})
}

func (v *vendor) devices() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	var out []string
	for d := range v.got {
		out = append(out, d)
	}
	slices.Sort(out)
	return out
}

// offlineEnv is a push stack with receipts, a registry and a webhook
// channel to a local vendor.
func offlineEnv(t *testing.T, v *vendor) (*pushEnv, *delivery.Registry) {
	t.Helper()
	e := newPushEnv(t)
	reg := deliverytest.MustRunRegistry(t, delivery.RegistryConfig{Log: e.l})
	srv := httptest.NewServer(v)
	t.Cleanup(srv.Close)
	hook, err := delivery.NewWebhook(delivery.WebhookConfig{URL: srv.URL, Secret: v.secret})
	if err != nil {
		t.Fatal(err)
	}
	// A second Delivery on the same log with receipts and the channel.
	e.d = deliverytest.MustRun(t, delivery.Config{Log: e.l, Fanout: e.f, Registry: reg,
		OfflineChannels: []delivery.OfflineChannel{hook}}, true)
	return e, reg
}

// TestOfflineChannelAndFunnel: a push not received over the link within
// its deadline goes to each such device's vendor channel (not to devices
// that have it, nor to devices without an address); the funnel counts
// targeted, sent, delivered, opened and offline.
func TestOfflineChannelAndFunnel(t *testing.T) {
	v := &vendor{secret: []byte("s3cret"), got: map[string]string{}, status: []int{503}, refuse: map[string]bool{"b2": true}}
	e, reg := offlineEnv(t, v)
	web := &deliverypb.PushAddress{Channel: "webhook"}
	addr := func(dev string) *deliverypb.PushAddress {
		return &deliverypb.PushAddress{Channel: web.Channel, Token: "tok-" + dev}
	}
	for _, s := range []struct {
		dev, user string
		push      *deliverypb.PushAddress
	}{
		{"a1", "alice", addr("a1")}, {"a2", "alice", addr("a2")}, {"b1", "bob", addr("b1")},
		{"b2", "bob", addr("b2")}, {"b3", "bob", nil}, {"c1", "carol", addr("c1")},
	} {
		reg.Seen("app", &delivery.Device{ID: s.dev, User: s.user}, s.push)
	}
	waitKnown(t, reg, 6)
	res, err := e.d.Push(ctx(t), &deliverypb.Push{Id: "promo-9", Title: "Sale", OfflineAfterMs: 500,
		Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"alice", "bob"}}}}, "crm")
	if err != nil {
		t.Fatal(err)
	}
	// a2 got it over its link (sent and delivered), and opened it.
	bl, _ := e.in.Backlog(ctx(t), oplog.BacklogRequest{User: "alice", Device: "a2"})
	e.d.Sent("a2", bl.Entries[0])
	for _, st := range []deliverypb.ReceiptState{deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED, deliverypb.ReceiptState_RECEIPT_STATE_OPENED} {
		e.d.Received("a2", &deliverypb.Receipt{PushId: res.PushId, State: st})
	}
	deadline := time.Now().Add(15 * time.Second)
	for !slices.Equal(v.devices(), []string{"a1", "b1"}) {
		if time.Now().After(deadline) {
			t.Fatalf("vendor got %v, want a1 and b1 (a2 has it, b2 refused, b3 has no address, c1 not targeted)", v.devices())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if v.got["a1"] != "Sale" {
		t.Fatalf("vendor got %q", v.got["a1"])
	}
	var f *deliverypb.Funnel
	for {
		if f, err = e.d.Funnel(ctx(t), "promo-9"); err != nil {
			t.Fatal(err)
		}
		if f.Offline == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if f.Targeted != 5 || !f.TargetedDevices || f.Sent != 3 || f.Delivered != 1 || f.Opened != 1 || f.Offline != 2 || f.Expired != 0 {
		t.Fatalf("funnel %v, want targeted 5 devices (alice's and bob's), sent 3 (a2 by link, a1 and b1 offline), delivered 1, opened 1, offline 2", f)
	}
	v.mu.Lock()
	calls := v.calls
	v.mu.Unlock()
	if calls < 2 {
		t.Fatalf("vendor saw %d calls: the 503 was not retried", calls)
	}
	// A receipt twice counts once.
	e.d.Received("a2", &deliverypb.Receipt{PushId: "promo-9", State: deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED})
	time.Sleep(200 * time.Millisecond)
	if f, _ = e.d.Funnel(ctx(t), "promo-9"); f.Delivered != 1 {
		t.Fatalf("a repeated receipt counted again: %v", f)
	}
	if _, err := e.d.Funnel(ctx(t), "never-sent"); err == nil {
		t.Fatal("funnel of an unknown push")
	}
}

// TestFunnelExpired: targets that never got a push by the end of its
// validity count as expired; a recalled push sends nothing offline.
func TestFunnelExpired(t *testing.T) {
	v := &vendor{secret: []byte("k"), got: map[string]string{}}
	e, reg := offlineEnv(t, v)
	reg.Seen("app", &delivery.Device{ID: "d1"}, &deliverypb.PushAddress{Channel: "webhook", Token: "tok-d1"})
	reg.Seen("app", &delivery.Device{ID: "d2"}, &deliverypb.PushAddress{Channel: "webhook", Token: "tok-d2"})
	waitKnown(t, reg, 2)
	if _, err := e.d.Push(ctx(t), &deliverypb.Push{Id: "short", Title: "x", ExpiresMs: time.Now().Add(1200 * time.Millisecond).UnixMilli(),
		OfflineAfterMs: -1, Audience: &deliverypb.Push_Devices{Devices: &deliverypb.Targets{Ids: []string{"d1", "d2", "d3"}}}}, "x"); err != nil {
		t.Fatal(err)
	}
	e.d.Received("d1", &deliverypb.Receipt{PushId: "short", State: deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED})
	if _, err := e.d.Push(ctx(t), &deliverypb.Push{Id: "oops", Title: "x", OfflineAfterMs: 500,
		Audience: &deliverypb.Push_Devices{Devices: &deliverypb.Targets{Ids: []string{"d2"}}}}, "x"); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Recall(ctx(t), "oops", "x"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond)
	f, err := e.d.Funnel(ctx(t), "short")
	if err != nil {
		t.Fatal(err)
	}
	if f.Targeted != 2 || f.Delivered != 1 || f.Expired != 1 {
		t.Fatalf("funnel %v, want 2 targeted (d3 is unknown), 1 delivered, 1 expired", f)
	}
	// A receipt of a push never sent counts nothing.
	e.d.Received("d1", &deliverypb.Receipt{PushId: "made-up", State: deliverypb.ReceiptState_RECEIPT_STATE_OPENED})
	time.Sleep(100 * time.Millisecond)
	if _, err := e.d.Funnel(ctx(t), "made-up"); !errors.Is(err, oplog.ErrNotFound) {
		t.Fatalf("funnel of a made-up push: %v", err)
	}
	if got := v.devices(); len(got) != 0 {
		t.Fatalf("vendor got %v: no push here may go offline (one opted out, one recalled)", got)
	}
	if f, _ := e.d.Funnel(ctx(t), "oops"); !f.Recalled {
		t.Fatalf("recalled push's funnel: %v", f)
	}
}

func TestVerifyWebhookRefuses(t *testing.T) {
	h := http.Header{}
	h.Set("X-Sluice-Timestamp", "1")
	h.Set("X-Sluice-Signature", "sha256=00")
	if err := delivery.VerifyWebhook([]byte("k"), h, []byte("{}"), time.Minute); err == nil {
		t.Fatal("an old timestamp and a bad signature verified")
	}
}

// TestOfflineHonoursConditionsAndTargetVars: the vendor channel gets a
// push only for devices its conditions match, rendered with the target's
// own variables.
func TestOfflineHonoursConditionsAndTargetVars(t *testing.T) {
	v := &vendor{secret: []byte("k"), got: map[string]string{}}
	e, reg := offlineEnv(t, v)
	for _, s := range []struct{ dev, user, os string }{{"a1", "alice", "android"}, {"i1", "ivan", "ios"}, {"i2", "alice", "ios"}} {
		reg.Seen("app", &delivery.Device{ID: s.dev, User: s.user, Attrs: oplog.Attrs{OS: s.os}},
			&deliverypb.PushAddress{Channel: "webhook", Token: "tok-" + s.dev})
	}
	waitKnown(t, reg, 3)
	if _, err := e.d.Push(ctx(t), &deliverypb.Push{Id: "ios-hi", Title: "Hi {{name}}", Vars: map[string]string{"name": "there"},
		TargetVars: map[string]*deliverypb.Vars{"ivan": {Vars: map[string]string{"name": "Ivan"}}},
		Conditions: &deliverypb.Rule{Os: []string{"ios"}}, OfflineAfterMs: 500,
		Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"alice", "ivan"}}}}, "x"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Equal(v.devices(), []string{"i1", "i2"}) {
		if time.Now().After(deadline) {
			t.Fatalf("vendor got %v, want the iOS devices i1 and i2 only", v.devices())
		}
		time.Sleep(50 * time.Millisecond)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.got["i1"] != "Hi Ivan" || v.got["i2"] != "Hi there" {
		t.Fatalf("titles %v, want Ivan's own and the common one", v.got)
	}
}
