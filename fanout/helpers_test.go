package fanout

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/proto"
)

// promo is the business the tests fan out.
var promo = &oplogpb.Business{Code: "promo", Dimension: oplogpb.Dimension_DIMENSION_USER}

// env is a real stack: embedded NATS, Log, Inbox and Fanout.
type env struct {
	nc *nats.Conn
	l  *oplog.Log
	in *oplog.Inbox
	f  *Fanout
}

type envOptions struct {
	log       oplog.Config
	fanout    Config
	noRun     bool // leave Fanout.Run to the test (startRun)
	tune      func(*Fanout)
	natsURL   func(string)
	storeDir  string
	withInbox bool // open an Inbox even if noRun
}

// mustEnv starts a stack that stops at the end of the test.
func mustEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	ns, nc := oplogtest.RunJetStream(t, oplogtest.Options{StoreDir: o.storeDir})
	if o.natsURL != nil {
		o.natsURL(ns.ClientURL())
	}
	e := &env{nc: nc}
	e.l = oplogtest.MustOpenLog(t, nc, o.log, promo)
	if !o.noRun || o.withInbox {
		// Only this process writes the oplog: readers wait for what it
		// stored instead of asking the stream at every read.
		in, err := oplog.OpenInbox(oplog.InboxConfig{Log: e.l, Dir: t.TempDir(), LocalFeed: true, SoleWriter: true})
		if err != nil {
			t.Fatalf("open inbox: %v", err)
		}
		e.in = in
		stop := runUntil(t, "inbox", in.Run)
		t.Cleanup(func() {
			stop()
			_ = in.Close()
		})
	}
	cfg := o.fanout
	cfg.Log, cfg.Inbox = e.l, e.in
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	e.f = mustOpen(t, cfg)
	e.f.retryDelay = 100 * time.Millisecond
	if o.tune != nil {
		o.tune(e.f)
	}
	if !o.noRun {
		e.startRun(t)
	}
	return e
}

func mustOpen(t *testing.T, cfg Config) *Fanout {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f, err := Open(ctx, cfg)
	if err != nil {
		t.Fatalf("open fanout: %v", err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// startRun runs the Fanout until the end of the test.
func (e *env) startRun(t *testing.T) {
	t.Helper()
	stop := runUntil(t, "fanout", e.f.Run)
	t.Cleanup(stop) // before Close (cleanups run last first)
}

// runUntil runs fn until the returned stop is called (at the latest at
// the end of the test), and reports its error.
func runUntil(t *testing.T, name string, fn func(context.Context) error) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	var once atomic.Bool
	stop = func() {
		if !once.CompareAndSwap(false, true) {
			return
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s run: %v", name, err)
		}
	}
	t.Cleanup(stop)
	return stop
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// template is a valid event template.
func template() *oplogpb.Event {
	return &oplogpb.Event{Kind: oplogpb.Kind_KIND_PUSH, Business: "promo", Payload: []byte(`{"title":"sale"}`), ContentType: "application/json"}
}

func listJob(id string) *fanoutpb.Job {
	return &fanoutpb.Job{Id: id, Event: template(), Audience: &fanoutpb.Job_List{List: &fanoutpb.List{}}}
}

// users returns n ids: prefix000000, prefix000001, ...
func users(prefix string, from, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%06d", prefix, from+i)
	}
	return out
}

// addList streams ids into a list job in chunks of size and seals it.
func addList(t *testing.T, ctx context.Context, f interface {
	AddRecipients(context.Context, string, int, []string) error
	Seal(context.Context, string, int) (*fanoutpb.Status, error)
}, job string, ids []string, size int) {
	t.Helper()
	n := 0
	for i := 0; i < len(ids); i += size {
		if err := f.AddRecipients(ctx, job, n, ids[i:min(i+size, len(ids))]); err != nil {
			t.Fatalf("add chunk %d: %v", n, err)
		}
		n++
	}
	if _, err := f.Seal(ctx, job, n); err != nil {
		t.Fatalf("seal with %d chunks: %v", n, err)
	}
}

// waitEnded polls a job's status until it has ended.
func waitEnded(t *testing.T, ctx context.Context, f *Fanout, job string) *fanoutpb.Status {
	t.Helper()
	for {
		st, err := f.Status(ctx, job)
		if err != nil {
			t.Fatalf("status of %s: %v", job, err)
		}
		if terminal(st.State) {
			return st
		}
		select {
		case <-ctx.Done():
			t.Fatalf("job %s not ended: %v (last status %v)", job, ctx.Err(), st)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// entriesOf reads every oplog shard from the start, with an ordered
// consumer, and counts per target the entries carrying message id msgID;
// other counts the entries of other message ids.
func entriesOf(t *testing.T, ctx context.Context, js jetstream.JetStream, shards int, msgID string) (got map[string]int, other int) {
	t.Helper()
	got = map[string]int{}
	for shard := range shards {
		s, err := js.Stream(ctx, oplog.StreamOplog(uint32(shard)))
		if err != nil {
			t.Fatalf("stream: %v", err)
		}
		last := s.CachedInfo().State.LastSeq
		if last == 0 {
			continue
		}
		c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
		if err != nil {
			t.Fatalf("ordered consumer: %v", err)
		}
		for seq := uint64(0); seq < last; {
			batch, err := c.Fetch(int(min(1000, last-seq)), jetstream.FetchMaxWait(5*time.Second))
			if err != nil {
				t.Fatalf("fetch: %v", err)
			}
			for m := range batch.Messages() {
				md, _ := m.Metadata()
				seq = md.Sequence.Stream
				e := new(oplogpb.Entry)
				if err := proto.Unmarshal(m.Data(), e); err != nil {
					t.Fatalf("entry %d: %v", seq, err)
				}
				if e.MessageId == msgID {
					got[e.Target]++
				} else {
					other++
				}
			}
			if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
				t.Fatalf("fetch: %v", err)
			}
		}
	}
	return got, other
}

// checkExactlyOnce fails unless every id in want has exactly one entry of
// the job and no one else has any.
func checkExactlyOnce(t *testing.T, got map[string]int, want []string) {
	t.Helper()
	missing, twice := 0, 0
	for _, id := range want {
		switch n := got[id]; {
		case n == 0:
			if missing++; missing <= 5 {
				t.Errorf("%s: no entry", id)
			}
		case n > 1:
			if twice++; twice <= 5 {
				t.Errorf("%s: %d entries, want 1", id, n)
			}
		}
	}
	if len(got) != len(want)-missing {
		t.Errorf("%d recipients got an entry, want %d", len(got), len(want))
	}
	if missing+twice > 0 {
		t.Errorf("%d recipients without an entry, %d with several", missing, twice)
	}
}

// streamGlobal is a small real Global: it stores each event once in a
// JetStream stream, deduplicated by message id.
type streamGlobal struct {
	js    jetstream.JetStream
	calls atomic.Int32
}

func newStreamGlobal(t *testing.T, js jetstream.JetStream) *streamGlobal {
	t.Helper()
	if _, err := js.CreateStream(ctxFor(t, 10*time.Second), jetstream.StreamConfig{Name: "TEST_GLOBAL", Subjects: []string{"test.global"}}); err != nil {
		t.Fatalf("global stream: %v", err)
	}
	return &streamGlobal{js: js}
}

func (g *streamGlobal) Publish(ctx context.Context, ev *oplogpb.Event) (*oplogpb.Appended, error) {
	g.calls.Add(1)
	data, err := proto.Marshal(ev)
	if err != nil {
		return nil, err
	}
	ack, err := g.js.Publish(ctx, "test.global", data, jetstream.WithMsgID(ev.MessageId))
	if err != nil {
		return nil, fmt.Errorf("%v: %w", err, oplog.ErrUnavailable)
	}
	return &oplogpb.Appended{Target: "_all", Id: ack.Sequence, Duplicate: ack.Duplicate}, nil
}
