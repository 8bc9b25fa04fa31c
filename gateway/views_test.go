package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// newDelivery opens and runs a Delivery, with receipts, on the env's log.
func newDelivery(t *testing.T, e *env) *delivery.Delivery {
	t.Helper()
	return deliverytest.MustRun(t, delivery.Config{Log: e.l}, true)
}

// envWithViews is a gateway serving the views of a Delivery opened on its
// own log (the server needs the Delivery at construction, the Delivery
// needs the log: the Views hook is filled in once both exist).
func envWithViews(t *testing.T) (*env, *delivery.Delivery) {
	t.Helper()
	hook := &lateViews{ready: make(chan struct{})}
	e := newEnv(t, func(c *gateway.Config) {
		c.Views = hook
		c.Suppress = func(en *oplogpb.Entry) bool {
			<-hook.ready
			return hook.d.Suppressed(en)
		}
		c.Receipts = hook
	})
	d := newDelivery(t, e)
	hook.set(d)
	return e, d
}

// lateViews forwards to a Delivery set after the server started.
type lateViews struct {
	ready chan struct{}
	d     *delivery.Delivery
}

func (l *lateViews) set(d *delivery.Delivery) { l.d = d; close(l.ready) }

func (l *lateViews) View(dev *delivery.Device) *deliverypb.View {
	<-l.ready
	return l.d.View(dev)
}

func (l *lateViews) Sent(device string, e *oplogpb.Entry) {
	<-l.ready
	l.d.Sent(device, e)
}

func (l *lateViews) Received(device string, r *deliverypb.Receipt) {
	<-l.ready
	l.d.Received(device, r)
}

func (l *lateViews) Changed() <-chan struct{} {
	<-l.ready
	return l.d.Changed()
}

func viewHello(token, os, digest string) *gatewaypb.Frame {
	f := hello(token)
	h := f.GetHello()
	h.Attrs.Os, h.Views, h.ViewDigest = os, true, digest
	return f
}

// firstRound reads Welcome and the first round and returns the View frame
// sent among them (nil if none).
func (c *client) firstRound() *deliverypb.View {
	c.t.Helper()
	if c.must(5*time.Second).GetWelcome() == nil {
		c.t.Fatal("first frame is not welcome")
	}
	var v *deliverypb.View
	for {
		f := c.must(5 * time.Second)
		if fv := f.GetView(); fv != nil {
			v = fv
			continue
		}
		if s := f.GetSync(); s != nil && s.Done {
			return v
		}
	}
}

// nextView reads until a View frame arrives.
func (c *client) nextView(timeout time.Duration) (*deliverypb.View, time.Duration) {
	c.t.Helper()
	start := time.Now()
	for {
		f, err := c.read(time.Until(start.Add(timeout)))
		if err != nil {
			c.t.Fatalf("no view within %v: %v", timeout, err)
		}
		if v := f.GetView(); v != nil {
			return v, time.Since(start)
		}
	}
}

// noView checks that no View frame arrives for a while.
func (c *client) noView(wait time.Duration) {
	c.t.Helper()
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		f, err := c.read(time.Until(deadline))
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) {
			return
		}
		if err != nil {
			c.t.Fatalf("read: %v", err)
		}
		if f.GetView() != nil {
			c.t.Fatalf("unexpected view: %v", f.GetView())
		}
	}
}

func boolOf(t *testing.T, v *deliverypb.View, key string) string {
	t.Helper()
	for _, sw := range v.Switches {
		if sw.Key == key {
			if sw.Value.GetBoolValue() {
				return "true/" + sw.Variant
			}
			return "false/" + sw.Variant
		}
	}
	return "absent"
}

// TestViews: clients that ask get their switches on connect, again when a
// switch changes, when their attributes change and when a user binds;
// clients presenting the current digest get nothing; others never.
func TestViews(t *testing.T) {
	e, d := envWithViews(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bv := func(b bool) *deliverypb.Value {
		return &deliverypb.Value{Kind: &deliverypb.Value_BoolValue{BoolValue: b}}
	}
	p0 := 0.0
	sw, err := d.SetSwitch(ctx, &deliverypb.Switch{Key: "dark", Type: deliverypb.SwitchType_SWITCH_TYPE_BOOL, DefaultValue: bv(false),
		Variants: []*deliverypb.Variant{
			{Name: "staff", Rule: &deliverypb.Rule{Users: []string{"boss"}, Percent: &p0}, Value: bv(true)},
			{Name: "droid", Rule: &deliverypb.Rule{Os: []string{"android"}}, Value: bv(true)},
		}}, "admin", 0)
	if err != nil {
		t.Fatal(err)
	}

	a := e.dialTCP()
	a.send(viewHello(e.token("", "dev-a", time.Hour), "android", ""))
	va := a.firstRound()
	b := e.dialWS("")
	b.send(viewHello(e.token("", "dev-b", time.Hour), "ios", ""))
	vb := b.firstRound()
	plain := e.dialTCP()
	plain.send(hello(e.token("", "dev-c", time.Hour)))
	if v := plain.firstRound(); v != nil {
		t.Fatalf("a client that did not ask got a view: %v", v)
	}
	if va == nil || vb == nil {
		t.Fatalf("no view on connect: %v, %v", va, vb)
	}
	if got := boolOf(t, va, "dark"); got != "true/droid" {
		t.Errorf("android: %s", got)
	}
	if got := boolOf(t, vb, "dark"); got != "false/" {
		t.Errorf("ios: %s", got)
	}

	// A switch change reaches both online clients.
	sw.DefaultValue = bv(true)
	if _, err := d.SetSwitch(ctx, sw, "admin", sw.Version); err != nil {
		t.Fatal(err)
	}
	vb2, took := b.nextView(5 * time.Second)
	if got := boolOf(t, vb2, "dark"); got != "true/" {
		t.Errorf("ios after the change: %s", got)
	}
	t.Logf("switch change reached an online client in %v", took)
	va2, _ := a.nextView(5 * time.Second)
	if va2.Digest == va.Digest {
		t.Error("android's digest did not change with the switch version")
	}
	plain.noView(200 * time.Millisecond)

	// Attributes change: re-evaluated at once.
	a.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Attrs: &gatewaypb.Attrs{Os: "ios"}}}})
	va3, _ := a.nextView(5 * time.Second)
	if got := boolOf(t, va3, "dark"); got != "true/" {
		t.Errorf("android turned ios: %s", got)
	}

	// A user binds: the whitelist applies.
	b.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{
		Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: e.token("boss", "dev-b", time.Hour)}}})
	vb3, _ := b.nextView(5 * time.Second)
	if got := boolOf(t, vb3, "dark"); got != "true/staff" {
		t.Errorf("after the boss logged in: %s", got)
	}

	// Kill: everyone that asked gets the kill value.
	if _, err := d.Kill(ctx, "dark", true, "oncall"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*client{a, b} {
		v, took := c.nextView(5 * time.Second)
		if got := boolOf(t, v, "dark"); got != "false/kill" {
			t.Errorf("killed: %s", got)
		}
		t.Logf("kill reached an online client in %v", took)
	}

	// Reconnecting with the digest it holds, a client is sent no view;
	// with an old digest it is.
	b2 := e.dialTCP()
	cur := d.View(&delivery.Device{ID: "dev-b2", Attrs: attrsOS("ios")}).Digest
	b2.send(viewHello(e.token("", "dev-b2", time.Hour), "ios", cur))
	if v := b2.firstRound(); v != nil {
		t.Errorf("a client holding the current view got it again: %v", v)
	}
	b3 := e.dialTCP()
	b3.send(viewHello(e.token("", "dev-b3", time.Hour), "ios", vb.Digest))
	if v := b3.firstRound(); v == nil || boolOf(t, v, "dark") != "false/kill" {
		t.Errorf("a client holding an old view: %v", v)
	}
}

func attrsOS(os string) oplog.Attrs { return oplog.Attrs{OS: os, AppVersion: "2.0.0"} }

// TestRecalledPushesAreNotSent: entries of a recalled push are dropped
// from rounds and from live delivery.
func TestRecalledPushesAreNotSent(t *testing.T) {
	e, d := envWithViews(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	push := func(id string) {
		t.Helper()
		if _, err := d.Push(ctx, &deliverypb.Push{Id: id, Title: id,
			Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"u1"}}}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	push("keep")
	push("oops")
	if err := d.Recall(ctx, "oops", "ops"); err != nil {
		t.Fatal(err)
	}
	c := e.dialTCP()
	c.send(hello(e.token("u1", "dev-1", time.Hour)))
	_, items, _ := c.syncAll()
	var got []string
	for _, it := range items {
		got = append(got, it.MessageId)
	}
	if len(got) != 1 || got[0] != "push-keep" {
		t.Fatalf("round sent %v, want only push-keep", got)
	}
	// Live: a push recalled before it is sent never arrives; the next does.
	if err := d.Recall(ctx, "late", "ops"); err != nil {
		t.Fatal(err)
	}
	push("late")
	push("next")
	live := c.live(1)
	if live[0].MessageId != "push-next" {
		t.Fatalf("live: %s, want push-next (push-late was recalled)", live[0].MessageId)
	}
}

// TestPushReceipts: the gateway records a push as sent when it hands it
// to the link (round and live), and the client's receipts; the funnel
// counts them.
func TestPushReceipts(t *testing.T) {
	e, d := envWithViews(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	push := func(id string) {
		t.Helper()
		if _, err := d.Push(ctx, &deliverypb.Push{Id: id, Title: id,
			Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"u7"}}}}, "test"); err != nil {
			t.Fatal(err)
		}
	}
	push("in-round")
	c := e.dialTCP()
	c.send(hello(e.token("u7", "dev-7", time.Hour)))
	_, items, _ := c.syncAll()
	push("live")
	items = append(items, c.live(1)...)
	if len(items) != 2 {
		t.Fatalf("got %d items", len(items))
	}
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Receipts: []*deliverypb.Receipt{
		{PushId: "in-round", State: deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED},
		{PushId: "live", State: deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED},
		{PushId: "live", State: deliverypb.ReceiptState_RECEIPT_STATE_OPENED},
		{PushId: "live", State: deliverypb.ReceiptState_RECEIPT_STATE_SENT}, // only the server says sent: ignored
	}}}})
	want := map[string][3]uint64{"in-round": {1, 1, 0}, "live": {1, 1, 1}}
	deadline := time.Now().Add(10 * time.Second)
	for id, w := range want {
		for {
			f, err := d.Funnel(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			if got := [3]uint64{f.Sent, f.Delivered, f.Opened}; got == w {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("%s: funnel sent/delivered/opened %v, want %v", id, got, w)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// Too many receipts in one event: a non-fatal error.
	c.send(&gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Receipts: make([]*deliverypb.Receipt, 300)}}})
	for {
		f := c.must(5 * time.Second)
		if er := f.GetError(); er != nil {
			if er.Fatal || er.Code != gatewaypb.Error_CODE_INVALID {
				t.Fatalf("error %v", er)
			}
			break
		}
	}
}

// TestViewsFollowRapidChanges: switch changes made back to back, while
// the node is still telling its clients of the previous ones, all reach
// them: every client ends with the last value (a wake-up lost between
// evaluations would leave some on an older one).
func TestViewsFollowRapidChanges(t *testing.T) {
	e, d := envWithViews(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	iv := func(n int64) *deliverypb.Value {
		return &deliverypb.Value{Kind: &deliverypb.Value_IntValue{IntValue: n}}
	}
	sw := &deliverypb.Switch{Key: "n", Type: deliverypb.SwitchType_SWITCH_TYPE_INT, DefaultValue: iv(0)}
	if _, err := d.SetSwitch(ctx, sw, "x", 0); err != nil {
		t.Fatal(err)
	}
	var clients []*client
	for i := range 20 {
		c := e.dialTCP()
		c.send(viewHello(e.token("", fmt.Sprintf("dev-%d", i), time.Hour), "android", ""))
		if v := c.firstRound(); v == nil {
			t.Fatal("no first view")
		}
		clients = append(clients, c)
	}
	const last = 40
	for n := int64(1); n <= last; n++ {
		sw.DefaultValue = iv(n)
		if _, err := d.SetSwitch(ctx, sw, "x", 0); err != nil {
			t.Fatal(err)
		}
	}
	for i, c := range clients {
		deadline := time.Now().Add(5 * time.Second)
		for {
			v, _ := c.nextView(time.Until(deadline))
			if got := v.Switches[0].Value.GetIntValue(); got == last {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("client %d never got value %d", i, last)
			}
		}
	}
}

// TestViewOverFrameLimitKeepsTheLink: a view that would not fit a frame
// is not sent (and logged); the link and its sync go on.
func TestViewOverFrameLimitKeepsTheLink(t *testing.T) {
	hook := &lateViews{ready: make(chan struct{})}
	e := newEnv(t, func(c *gateway.Config) { c.Views, c.MaxFrame = hook, 32<<10 })
	d := newDelivery(t, e)
	hook.set(d)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.SetSwitch(ctx, &deliverypb.Switch{Key: "copy", Type: deliverypb.SwitchType_SWITCH_TYPE_STRING,
		DefaultValue: &deliverypb.Value{Kind: &deliverypb.Value_StringValue{StringValue: strings.Repeat("x", 40<<10)}}}, "x", 0); err != nil {
		t.Fatal(err)
	}
	c := e.dialTCP()
	c.send(viewHello(e.token("u1", "dev-a", time.Hour), "android", ""))
	if v := c.firstRound(); v != nil {
		t.Fatalf("a view over the frame limit was sent: %d bytes", len(v.String()))
	}
	id := e.append("chat", "u1")
	if items := c.live(1); items[0].Id != id {
		t.Fatalf("live after the refused view: %v", items)
	}
}
