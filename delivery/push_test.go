package delivery_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/delivery/deliverytest"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicstest"
	"google.golang.org/protobuf/encoding/protojson"
)

// pushEnv is the whole push path on a real stack: embedded JetStream,
// oplog with its inbox, topics, fanout and delivery.
type pushEnv struct {
	l  *oplog.Log
	in *oplog.Inbox
	tp *topics.Topics
	f  *fanout.Fanout
	d  *delivery.Delivery
}

// everyone publishes a fanout's everyone event to the built-in topic, as
// sluiced does.
type everyone struct{ tp *topics.Topics }

func (e everyone) Publish(ctx context.Context, ev *oplogpb.Event) (*oplogpb.Appended, error) {
	ev.Topic = topics.Everyone
	ev.Dimension, ev.DeviceMode = oplogpb.Dimension_DIMENSION_UNSPECIFIED, oplogpb.DeviceMode_DEVICE_MODE_UNSPECIFIED
	return e.tp.Publish(ctx, ev)
}

func newPushEnv(t *testing.T) *pushEnv {
	t.Helper()
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	e := &pushEnv{l: oplogtest.MustOpenLog(t, nc, oplog.Config{})}
	e.in = oplogtest.MustRunInbox(t, e.l, "")
	e.tp = topicstest.MustRun(t, topics.Config{Log: e.l})
	f, err := fanout.Open(ctx(t), fanout.Config{Log: e.l, Inbox: e.in, Global: everyone{e.tp}, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	e.f = f
	stop := oplogtest.RunUntilCleanup(t, "fanout", f.Run)
	t.Cleanup(func() {
		stop()
		_ = f.Close()
	})
	e.d = deliverytest.MustRun(t, delivery.Config{Log: e.l, Fanout: f}, false)
	return e
}

// notifications returns the push notifications in a user's (or with user
// "", a device's) backlog.
func (e *pushEnv) notifications(t *testing.T, user, device string) []*deliverypb.Notification {
	t.Helper()
	bl, err := e.in.Backlog(ctx(t), oplog.BacklogRequest{User: user, Device: device, Attrs: oplog.Attrs{OS: "android", AppVersion: "5.0"}})
	if err != nil {
		t.Fatal(err)
	}
	var out []*deliverypb.Notification
	for _, en := range bl.Entries {
		if en.Kind != oplogpb.Kind_KIND_PUSH {
			continue
		}
		if en.ContentType != delivery.ContentTypeNotification {
			t.Fatalf("push entry of content type %q", en.ContentType)
		}
		n := &deliverypb.Notification{}
		if err := protojson.Unmarshal(en.Payload, n); err != nil {
			t.Fatalf("push payload: %v", err)
		}
		if delivery.PushIDOf(en) != n.PushId {
			t.Fatalf("entry message id %q does not name push %s", en.MessageId, n.PushId)
		}
		out = append(out, n)
	}
	return out
}

func titles(ns []*deliverypb.Notification) string {
	var s []string
	for _, n := range ns {
		s = append(s, n.Title)
	}
	return strings.Join(s, "|")
}

func TestPushToUsersAndDevices(t *testing.T) {
	e := newPushEnv(t)
	c := ctx(t)
	expires := time.Now().Add(time.Hour).UnixMilli()
	p := &deliverypb.Push{Id: "welcome-1", Title: "Hi {{name}}", Body: "Your code: {{code}}",
		Vars:       map[string]string{"name": "there", "code": "{{name}}"}, // a value is never parsed again
		TargetVars: map[string]*deliverypb.Vars{"alice": {Vars: map[string]string{"name": "Alice\x07"}}},
		ActionUri:  "app://offers/42", Priority: deliverypb.Priority_PRIORITY_HIGH, ExpiresMs: expires,
		Data: []byte(`{"offer":42}`), DataType: "application/json",
		Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"alice", "bob"}}}}
	res, err := e.d.Push(c, p, "crm")
	if err != nil {
		t.Fatal(err)
	}
	if res.Targets != 2 || res.Duplicate || res.ExpiresMs != expires {
		t.Fatalf("result %v", res)
	}
	a, b := e.notifications(t, "alice", "a-phone"), e.notifications(t, "bob", "b-phone")
	if titles(a) != "Hi Alice" || titles(b) != "Hi there" {
		t.Fatalf("titles: alice %q, bob %q", titles(a), titles(b))
	}
	if n := a[0]; n.Body != "Your code: {{name}}" || n.ActionUri != "app://offers/42" || n.Priority != deliverypb.Priority_PRIORITY_HIGH ||
		string(n.Data) != `{"offer":42}` || n.ExpiresMs != expires {
		t.Fatalf("notification %v", n)
	}
	// The same id again sends nothing new.
	if res, err := e.d.Push(c, p, "crm"); err != nil || !res.Duplicate {
		t.Fatalf("resend: %v, %v", res, err)
	}
	if n := len(e.notifications(t, "alice", "a-phone")); n != 1 {
		t.Fatalf("alice has %d notifications after a resend", n)
	}
	// Devices.
	if _, err := e.d.Push(c, &deliverypb.Push{Id: "dev-1", Title: "For this phone",
		Audience: &deliverypb.Push_Devices{Devices: &deliverypb.Targets{Ids: []string{"d-1"}}}}, "crm"); err != nil {
		t.Fatal(err)
	}
	if got := titles(e.notifications(t, "", "d-1")); got != "For this phone" {
		t.Fatalf("device d-1: %q", got)
	}
	// Conditions are the oplog's: a device outside them does not get it.
	if _, err := e.d.Push(c, &deliverypb.Push{Id: "ios-only", Title: "iOS",
		Conditions: &deliverypb.Rule{Os: []string{"ios"}},
		Audience:   &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"bob"}}}}, "crm"); err != nil {
		t.Fatal(err)
	}
	if got := titles(e.notifications(t, "bob", "b-phone")); got != "Hi there" {
		t.Fatalf("an android device got an iOS push: %q", got)
	}
}

// TestPushValidity: an offline device gets a push when it connects within
// its validity, never after.
func TestPushValidity(t *testing.T) {
	e := newPushEnv(t)
	if _, err := e.d.Push(ctx(t), &deliverypb.Push{Id: "flash", Title: "Flash sale", ExpiresMs: time.Now().Add(1500 * time.Millisecond).UnixMilli(),
		Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"carol"}}}}, "crm"); err != nil {
		t.Fatal(err)
	}
	if got := titles(e.notifications(t, "carol", "c1")); got != "Flash sale" {
		t.Fatalf("within validity: %q", got)
	}
	time.Sleep(1600 * time.Millisecond)
	if got := titles(e.notifications(t, "carol", "c2")); got != "" {
		t.Fatalf("after validity: %q", got)
	}
}

func TestPushCollapseAndRecall(t *testing.T) {
	e := newPushEnv(t)
	c := ctx(t)
	to := &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"dave"}}}
	for i, title := range []string{"1-0", "2-0", "3-1"} {
		if _, err := e.d.Push(c, &deliverypb.Push{Id: fmt.Sprint("score-", i), Title: title, CollapseKey: "match-7", Audience: to}, "x"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.d.Push(c, &deliverypb.Push{Id: "news", Title: "news", Audience: to}, "x"); err != nil {
		t.Fatal(err)
	}
	if got := titles(e.notifications(t, "dave", "d")); got != "3-1|news" {
		t.Fatalf("collapsed backlog: %q, want the newest score and the news", got)
	}
	// Recall: the gateway asks Suppressed for every entry.
	if err := e.d.Recall(c, "news", "ops"); err != nil {
		t.Fatal(err)
	}
	bl, _ := e.in.Backlog(c, oplog.BacklogRequest{User: "dave", Device: "d"})
	var kept []string
	for _, en := range bl.Entries {
		if !e.d.Suppressed(en) {
			kept = append(kept, delivery.PushIDOf(en))
		}
	}
	if strings.Join(kept, ",") != "score-2" {
		t.Fatalf("after recalling news: %v", kept)
	}
	if got := e.d.Recalled(); len(got) != 1 || got[0] != "news" {
		t.Fatalf("recalled: %v", got)
	}
	if err := e.d.Recall(c, "bad id", "ops"); !errors.Is(err, oplog.ErrInvalidID) {
		t.Fatalf("bad recall: %v", err)
	}
}

// waitJob waits for a fanout job to finish.
func (e *pushEnv) waitJob(t *testing.T, job string) *fanoutpb.Status {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := e.f.Status(ctx(t), job)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == fanoutpb.State_STATE_DONE || st.State == fanoutpb.State_STATE_FAILED || st.State == fanoutpb.State_STATE_CANCELLED {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("job %s: %v", job, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestPushToListSegmentAndEveryone(t *testing.T) {
	e := newPushEnv(t)
	c := ctx(t)
	// A list bigger than one event's targets goes through fanout.
	ids := make([]string, 2500)
	for i := range ids {
		ids[i] = fmt.Sprintf("u%04d", i)
	}
	res, err := e.d.Push(c, &deliverypb.Push{Id: "big", Title: "Hello {{who}}", Vars: map[string]string{"who": "all"},
		Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: ids}}}, "x")
	if err != nil {
		t.Fatal(err)
	}
	if res.Job == "" || res.Targets != 2500 {
		t.Fatalf("result %v", res)
	}
	if st := e.waitJob(t, res.Job); st.State != fanoutpb.State_STATE_DONE || st.Done != 2500 {
		t.Fatalf("list job: %v", st)
	}
	for _, u := range []string{"u0000", "u1234", "u2499"} {
		if got := titles(e.notifications(t, u, "p-"+u)); got != "Hello all" {
			t.Fatalf("%s: %q", u, got)
		}
	}
	// A segment.
	if err := e.f.SegmentAdd(c, "vip", "v1", "v2"); err != nil {
		t.Fatal(err)
	}
	res, err = e.d.Push(c, &deliverypb.Push{Id: "vip-news", Title: "VIP", Audience: &deliverypb.Push_Segment{Segment: "vip"}}, "x")
	if err != nil {
		t.Fatal(err)
	}
	if st := e.waitJob(t, res.Job); st.State != fanoutpb.State_STATE_DONE || st.Done != 2 {
		t.Fatalf("segment job: %v", st)
	}
	if got := titles(e.notifications(t, "v2", "v2-phone")); got != "VIP" {
		t.Fatalf("segment member: %q", got)
	}
	if got := titles(e.notifications(t, "u0001", "p")); got != "Hello all" {
		t.Fatalf("a non-member got the segment push: %q", got)
	}
	// Everyone: one message of the topic every device reads.
	res, err = e.d.Push(c, &deliverypb.Push{Id: "all-1", Title: "Maintenance tonight", Audience: &deliverypb.Push_Everyone{Everyone: true}}, "x")
	if err != nil {
		t.Fatal(err)
	}
	e.waitJob(t, res.Job)
	bl, err := e.tp.Backlog(c, topics.BacklogRequest{Device: "any-device"})
	if err != nil {
		t.Fatal(err)
	}
	if len(bl.Entries) != 1 || delivery.PushIDOf(bl.Entries[0]) != "all-1" {
		t.Fatalf("everyone's topic: %v", bl.Entries)
	}
	// Recalling it: gateways skip the topic message too.
	if err := e.d.Recall(c, "all-1", "ops"); err != nil {
		t.Fatal(err)
	}
	if !e.d.Suppressed(bl.Entries[0]) {
		t.Fatal("a recalled everyone push is not suppressed")
	}
}

func TestPushRefusesBadInput(t *testing.T) {
	e := newPushEnv(t)
	users := &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"u1"}}}
	for _, c := range []struct {
		name string
		p    *deliverypb.Push
		want error
	}{
		{"bad id", &deliverypb.Push{Id: "a b", Title: "x", Audience: users}, oplog.ErrInvalidID},
		{"empty", &deliverypb.Push{Id: "p", Audience: users}, oplog.ErrInvalid},
		{"no audience", &deliverypb.Push{Id: "p", Title: "x"}, oplog.ErrNoTargets},
		{"no targets", &deliverypb.Push{Id: "p", Title: "x", Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{}}}, oplog.ErrNoTargets},
		{"bad target", &deliverypb.Push{Id: "p", Title: "x", Audience: &deliverypb.Push_Devices{Devices: &deliverypb.Targets{Ids: []string{"a/b"}}}}, oplog.ErrInvalidID},
		{"missing variable", &deliverypb.Push{Id: "p", Title: "Hi {{name}}", Audience: users}, oplog.ErrInvalid},
		{"long title", &deliverypb.Push{Id: "p", Title: strings.Repeat("x", 300), Audience: users}, oplog.ErrInvalid},
		{"title too long once rendered", &deliverypb.Push{Id: "p", Title: "{{v}}", Vars: map[string]string{"v": strings.Repeat("y", 300)}, Audience: users}, oplog.ErrInvalid},
		{"bad variable name", &deliverypb.Push{Id: "p", Title: "x", Vars: map[string]string{"a b": "c"}, Audience: users}, oplog.ErrInvalid},
		{"bad action", &deliverypb.Push{Id: "p", Title: "x", ActionUri: "no-scheme", Audience: users}, oplog.ErrInvalid},
		{"bad collapse key", &deliverypb.Push{Id: "p", Title: "x", CollapseKey: "a b", Audience: users}, oplog.ErrInvalidID},
		{"expired", &deliverypb.Push{Id: "p", Title: "x", ExpiresMs: time.Now().Add(-time.Second).UnixMilli(), Audience: users}, oplog.ErrExpired},
		{"too long validity", &deliverypb.Push{Id: "p", Title: "x", ExpiresMs: time.Now().Add(40 * 24 * time.Hour).UnixMilli(), Audience: users}, oplog.ErrInvalid},
		{"data too big", &deliverypb.Push{Id: "p", Data: make([]byte, delivery.MaxPushData+1), Audience: users}, oplog.ErrPayloadTooLarge},
		{"percent in conditions", &deliverypb.Push{Id: "p", Title: "x", Conditions: &deliverypb.Rule{Percent: pct(5)}, Audience: users}, oplog.ErrInvalid},
		{"except in conditions", &deliverypb.Push{Id: "p", Title: "x", Conditions: &deliverypb.Rule{Os: []string{"ios"}, Except: &deliverypb.Rule{Models: []string{"Pixel 8"}}}, Audience: users}, oplog.ErrInvalid},
		{"target vars for a segment", &deliverypb.Push{Id: "p", Title: "x", TargetVars: map[string]*deliverypb.Vars{"u1": {}},
			Audience: &deliverypb.Push_Segment{Segment: "s"}}, oplog.ErrInvalid},
		{"bad priority", &deliverypb.Push{Id: "p", Title: "x", Priority: 7, Audience: users}, oplog.ErrInvalid},
	} {
		if _, err := e.d.Push(ctx(t), c.p, "x"); !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", c.name, err, c.want)
		}
	}
	if got := titles(e.notifications(t, "u1", "d")); got != "" {
		t.Fatalf("refused pushes stored: %q", got)
	}
}

func TestRender(t *testing.T) {
	vars := map[string]string{"name": "Ann", "n": "{{name}}", "bell": "a\x07b\nc"}
	for _, c := range []struct {
		tmpl, want string
	}{
		{"Hi {{name}}!", "Hi Ann!"},
		{"Hi {{ name }}", "Hi Ann"},
		{"{{n}}", "{{name}}"},
		{"{{bell}}", "ab\nc"},
		{"{ {{name}} }", "{ Ann }"},
		{"{{not a var}} {{name}}", "{{not a var}} Ann"},
		{"unclosed {{name", "unclosed {{name"},
		{"", ""},
	} {
		got, err := delivery.Render(c.tmpl, vars, 100)
		if err != nil || got != c.want {
			t.Errorf("Render(%q) = %q, %v; want %q", c.tmpl, got, err, c.want)
		}
	}
	if _, err := delivery.Render("{{missing}}", vars, 100); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("missing variable: %v", err)
	}
	if _, err := delivery.Render("{{name}}{{name}}", vars, 5); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("over the limit: %v", err)
	}
}

// TestPushDryRun counts the known devices of each audience.
func TestPushDryRun(t *testing.T) {
	e := newPushEnv(t)
	reg := deliverytest.MustRunRegistry(t, delivery.RegistryConfig{Log: e.l})
	devs := fleet(300) // users u0, u10, ... on every tenth device; OS cycles android, ios, harmony
	for _, d := range devs {
		reg.Seen("app", d, nil)
	}
	waitKnown(t, reg, 300)
	if err := e.f.SegmentAdd(ctx(t), "s", "u0", "u10", "u20", "nobody"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		p    *deliverypb.Push
		want uint64
	}{
		{"users", &deliverypb.Push{Audience: &deliverypb.Push_Users{Users: &deliverypb.Targets{Ids: []string{"u0", "u10", "u11"}}}}, 2},
		{"devices", &deliverypb.Push{Audience: &deliverypb.Push_Devices{Devices: &deliverypb.Targets{Ids: []string{"dev-00001", "dev-00002", "x"}}}}, 2},
		{"segment", &deliverypb.Push{Audience: &deliverypb.Push_Segment{Segment: "s"}}, 3},
		{"everyone", &deliverypb.Push{Audience: &deliverypb.Push_Everyone{Everyone: true}}, 300},
		{"everyone on android", &deliverypb.Push{Conditions: &deliverypb.Rule{Os: []string{"android"}}, Audience: &deliverypb.Push_Everyone{Everyone: true}}, 100},
	} {
		got, err := e.d.DryRunPush(ctx(t), reg, c.p)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got.Known != 300 || got.Matching != c.want {
			t.Errorf("%s: %d of %d, want %d", c.name, got.Matching, got.Known, c.want)
		}
	}
}
