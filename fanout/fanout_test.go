package fanout

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// A list of 20,000 recipients streamed in chunks: each gets exactly one
// entry in its inbox, and the status adds up.
func TestListJob(t *testing.T) {
	e := mustEnv(t, envOptions{log: oplog.Config{Shards: 2}})
	ctx := ctxFor(t, 60*time.Second)
	const n = 20_000
	ids := users("u", 0, n)
	start := time.Now()
	st, err := e.f.Create(ctx, listJob("spring-sale"))
	if err != nil {
		t.Fatal(err)
	}
	if st.State != fanoutpb.State_STATE_PENDING || st.Audience != "list" {
		t.Errorf("new job: state %s, audience %q; want pending list", st.State, st.Audience)
	}
	addList(t, ctx, e.f, "spring-sale", ids, DefaultChunkSize)
	st = waitEnded(t, ctx, e.f, "spring-sale")
	took := time.Since(start)
	if st.State != fanoutpb.State_STATE_DONE || st.Total != n || st.Done != n || st.Failed != 0 || st.Chunks != 20 || st.ChunksDone != 20 {
		t.Fatalf("status %v; want done, %d total and done, 20 chunks", st, n)
	}
	if st.Rate <= 0 || st.StartedAt == nil || st.FinishedAt == nil || st.FinishedAt.AsTime().Before(st.StartedAt.AsTime()) {
		t.Errorf("rate %v from %v to %v; want a positive rate over a positive span", st.Rate, st.StartedAt, st.FinishedAt)
	}
	if want := float64(st.Done) / st.FinishedAt.AsTime().Sub(st.StartedAt.AsTime()).Seconds(); st.Rate != want {
		t.Errorf("rate %v, want done/(finished-started) = %v", st.Rate, want)
	}
	t.Logf("%d recipients in %v (%.0f/s end to end, %.0f/s as reported)", n, took, n/took.Seconds(), st.Rate)

	// Every recipient's inbox holds exactly one entry of the job, and
	// every entry carries the template's created_at.
	spec, err := e.f.spec(ctx, "spring-sale")
	if err != nil {
		t.Fatal(err)
	}
	created := spec.Event.CreatedAt
	var wrong atomic.Int32
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < n; i += 4 {
				b, err := e.in.Backlog(ctx, oplog.BacklogRequest{User: ids[i], Device: "d" + ids[i]})
				if err != nil {
					t.Errorf("backlog of %s: %v", ids[i], err)
					return
				}
				if len(b.Entries) != 1 || b.Entries[0].MessageId != MessageID("spring-sale") || string(b.Entries[0].Payload) != `{"title":"sale"}` ||
					!proto.Equal(b.Entries[0].CreatedAt, created) {
					if wrong.Add(1) <= 5 {
						t.Errorf("backlog of %s: %v; want the job's one entry", ids[i], b.Entries)
					}
				}
			}
		})
	}
	wg.Wait()
	if wrong.Load() > 0 {
		t.Errorf("%d inboxes wrong", wrong.Load())
	}
	// Someone not on the list got nothing.
	if b, err := e.in.Backlog(ctx, oplog.BacklogRequest{User: "stranger", Device: "d1"}); err != nil || len(b.Entries) != 0 {
		t.Errorf("backlog of a stranger: %v, %v; want empty", b, err)
	}
	got, other := entriesOf(t, ctx, e.l.JetStream(), 2, MessageID("spring-sale"))
	checkExactlyOnce(t, got, ids)
	if other != 0 {
		t.Errorf("%d other entries", other)
	}

	// List shows it; Create again with the same spec is idempotent.
	jobs, err := e.f.List(ctx, 10)
	if err != nil || len(jobs) != 1 || jobs[0].Job != "spring-sale" || jobs[0].State != fanoutpb.State_STATE_DONE {
		t.Errorf("List: %v, %v; want the one done job", jobs, err)
	}
	if st, err := e.f.Create(ctx, listJob("spring-sale")); err != nil || st.State != fanoutpb.State_STATE_DONE {
		t.Errorf("Create again: %v, %v; want the done job's status", st, err)
	}
}

// Invalid ids in a chunk are counted as failed; the others are written.
func TestListJobInvalidRecipients(t *testing.T) {
	e := mustEnv(t, envOptions{})
	ctx := ctxFor(t, 30*time.Second)
	if _, err := e.f.Create(ctx, listJob("mixed")); err != nil {
		t.Fatal(err)
	}
	addList(t, ctx, e.f, "mixed", []string{"ok1", "not ok", "ok2", "ok1", "also/bad"}, 3)
	st := waitEnded(t, ctx, e.f, "mixed")
	if st.State != fanoutpb.State_STATE_DONE || st.Total != 5 || st.Done != 3 || st.Failed != 2 || st.Error == "" {
		t.Errorf("status %v; want done, 5 total, 3 done (ok1 twice), 2 failed, an error", st)
	}
	got, _ := entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("mixed"))
	checkExactlyOnce(t, got, []string{"ok1", "ok2"})
}

// A segment job reaches exactly the members; the segment projection
// rebuilds to the same digest.
func TestSegmentJob(t *testing.T) {
	e := mustEnv(t, envOptions{fanout: Config{ChunkSize: 500}})
	ctx := ctxFor(t, 60*time.Second)
	all := users("m", 0, 3000)
	for i := 0; i < len(all); i += 500 {
		if err := e.f.SegmentAdd(ctx, "vip", all[i:i+500]...); err != nil {
			t.Fatal(err)
		}
	}
	var gone, members []string
	for i, u := range all {
		if i%10 == 3 {
			gone = append(gone, u)
		} else {
			members = append(members, u)
		}
	}
	if err := e.f.SegmentRemove(ctx, "vip", gone...); err != nil {
		t.Fatal(err)
	}
	// Adding a member again and removing a stranger change nothing.
	if err := e.f.SegmentAdd(ctx, "vip", all[0]); err != nil {
		t.Fatal(err)
	}
	if err := e.f.SegmentRemove(ctx, "vip", "stranger"); err != nil {
		t.Fatal(err)
	}
	if err := e.f.SegmentAdd(ctx, "other", "x1", "x2"); err != nil {
		t.Fatal(err)
	}
	if n, err := e.f.SegmentSize(ctx, "vip"); err != nil || n != uint64(len(members)) {
		t.Fatalf("size %d, %v; want %d", n, err, len(members))
	}
	job := &fanoutpb.Job{Id: "vip-offer", Event: template(), Audience: &fanoutpb.Job_Segment{Segment: "vip"}}
	if _, err := e.f.Create(ctx, job); err != nil {
		t.Fatal(err)
	}
	st := waitEnded(t, ctx, e.f, "vip-offer")
	if st.State != fanoutpb.State_STATE_DONE || st.Total != uint64(len(members)) || st.Done != st.Total || !st.Sealed || st.Chunks != 6 {
		t.Errorf("status %v; want done with %d recipients in 6 chunks", st, len(members))
	}
	got, other := entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("vip-offer"))
	checkExactlyOnce(t, got, members)
	if other != 0 {
		t.Errorf("%d other entries", other)
	}

	// Rebuild the projection from zero: same digest, same answers.
	name := e.f.Projections()[0]
	before, err := e.f.Digest(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := e.f.Rebuild(ctx, name, 0, time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	if sum.Digest != before {
		t.Errorf("digest after rebuild %s, before %s", sum.Digest, before)
	}
	if n, err := e.f.SegmentSize(ctx, "vip"); err != nil || n != uint64(len(members)) {
		t.Errorf("size after rebuild %d, %v; want %d", n, err, len(members))
	}
	if a := e.f.Applied()[name]; a != sum.Applied || a == 0 {
		t.Errorf("applied %d, rebuild says %d", a, sum.Applied)
	}
}

// A segment job whose expander's node is gone is taken over once its
// lease runs out.
func TestSegmentJobTakenOver(t *testing.T) {
	e := mustEnv(t, envOptions{noRun: true, withInbox: true, fanout: Config{ChunkSize: 100}, tune: func(f *Fanout) { f.lease = 400 * time.Millisecond }})
	ctx := ctxFor(t, 30*time.Second)
	members := users("s", 0, 250)
	for i := 0; i < len(members); i += 100 {
		if err := e.f.SegmentAdd(ctx, "beta", members[i:min(i+100, len(members))]...); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.f.Create(ctx, &fanoutpb.Job{Id: "beta-news", Event: template(), Audience: &fanoutpb.Job_Segment{Segment: "beta"}}); err != nil {
		t.Fatal(err)
	}
	// Another node took it and died.
	if _, err := e.f.update(ctx, "beta-news", func(st *fanoutpb.JobState) error {
		st.Owner, st.LeaseUntil = "ghost", timestampIn(300*time.Millisecond)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	e.startRun(t)
	st := waitEnded(t, ctx, e.f, "beta-news")
	if st.State != fanoutpb.State_STATE_DONE || st.Done != 250 || st.Chunks != 3 {
		t.Errorf("status %v; want done, 250 in 3 chunks", st)
	}
	got, _ := entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("beta-news"))
	checkExactlyOnce(t, got, members)
}

// An everyone job is one Global publish.
func TestEveryoneJob(t *testing.T) {
	var g *streamGlobal
	e := mustEnv(t, envOptions{noRun: true, withInbox: true})
	g = newStreamGlobal(t, e.l.JetStream())
	e.f.global = g
	e.startRun(t)
	ctx := ctxFor(t, 30*time.Second)
	job := &fanoutpb.Job{Id: "release-notes", Event: template(), Audience: &fanoutpb.Job_Everyone{Everyone: &fanoutpb.Everyone{}}}
	if _, err := e.f.Create(ctx, job); err != nil {
		t.Fatal(err)
	}
	st := waitEnded(t, ctx, e.f, "release-notes")
	if st.State != fanoutpb.State_STATE_DONE || st.Total != 1 || st.Done != 1 || st.Audience != "everyone" {
		t.Errorf("status %v; want done, 1 of 1", st)
	}
	if _, err := e.f.Create(ctx, job); err != nil {
		t.Fatal(err)
	}
	if n := g.calls.Load(); n != 1 {
		t.Errorf("%d global publishes, want 1", n)
	}
	s, err := e.l.JetStream().Stream(ctx, "TEST_GLOBAL")
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 1 {
		t.Errorf("global stream holds %d messages, want 1", n)
	}
	m, err := s.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	ev := new(oplogpb.Event)
	if err := proto.Unmarshal(m.Data, ev); err != nil || ev.MessageId != MessageID("release-notes") || len(ev.Targets) != 0 {
		t.Errorf("global event %v, %v; want message id %s, no targets", ev, err, MessageID("release-notes"))
	}
}

// A chunk retried after the duplicate window (a crash between its
// appends and its marker, longer than the window) is looked up in the
// inbox rather than appended again.
func TestRetryPastDuplicateWindow(t *testing.T) {
	var calls atomic.Int32
	e := mustEnv(t, envOptions{
		log: oplog.Config{DuplicateWindow: time.Second, Shards: 2},
		tune: func(f *Fanout) {
			f.afterAppend = func(job string, n uint32) error {
				if calls.Add(1) > 1 {
					return nil
				}
				time.Sleep(1500 * time.Millisecond) // the window forgets the ids
				return errors.New("crash before the marker")
			}
		},
	})
	ctx := ctxFor(t, 30*time.Second)
	ids := users("r", 0, 300)
	if _, err := e.f.Create(ctx, listJob("late")); err != nil {
		t.Fatal(err)
	}
	addList(t, ctx, e.f, "late", ids, 300)
	st := waitEnded(t, ctx, e.f, "late")
	if st.State != fanoutpb.State_STATE_DONE || st.Done != 300 {
		t.Fatalf("status %v; want done 300", st)
	}
	if calls.Load() != 2 {
		t.Errorf("chunk attempted %d times, want 2", calls.Load())
	}
	ent, err := e.f.done.Get(ctx, doneKey("late", 0))
	if err != nil {
		t.Fatal(err)
	}
	d := new(fanoutpb.ChunkDone)
	if err := proto.Unmarshal(ent.Value(), d); err != nil || d.Recovered != 300 || d.Appended != 300 {
		t.Errorf("marker %v, %v; want 300 appended, all recovered", d, err)
	}
	got, other := entriesOf(t, ctx, e.l.JetStream(), 2, MessageID("late"))
	checkExactlyOnce(t, got, ids)
	if other != 0 {
		t.Errorf("%d other entries", other)
	}
}

// A redelivered chunk within the duplicate window is appended again and
// deduplicated by the stream.
func TestRetryWithinDuplicateWindow(t *testing.T) {
	var calls atomic.Int32
	e := mustEnv(t, envOptions{tune: func(f *Fanout) {
		f.afterAppend = func(job string, n uint32) error {
			if calls.Add(1) == 1 {
				return errors.New("crash before the marker")
			}
			return nil
		}
	}})
	ctx := ctxFor(t, 30*time.Second)
	ids := users("w", 0, 500)
	if _, err := e.f.Create(ctx, listJob("quick")); err != nil {
		t.Fatal(err)
	}
	addList(t, ctx, e.f, "quick", ids, 500)
	if st := waitEnded(t, ctx, e.f, "quick"); st.Done != 500 {
		t.Fatalf("status %v; want 500 done", st)
	}
	got, _ := entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("quick"))
	checkExactlyOnce(t, got, ids)
}

// Single-user appends keep flowing while a big job runs: the fanout
// writes in the bulk lane with bounded concurrency.
func TestSingleAppendsDuringFanout(t *testing.T) {
	if testing.Short() {
		t.Skip("100,000 recipients")
	}
	e := mustEnv(t, envOptions{})
	ctx := ctxFor(t, 120*time.Second)
	const n = 100_000
	if _, err := e.f.Create(ctx, listJob("big")); err != nil {
		t.Fatal(err)
	}
	// progress is the job's done count as last polled; a single append
	// counts if it was acked while the job was under way: 0 < done < n,
	// both before and after it.
	var progress atomic.Uint64
	var during, singles atomic.Int32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			before := progress.Load()
			_, err := e.l.Append(ctx, &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: "promo", Targets: []string{"single"}, Payload: []byte("hi")})
			if err != nil {
				t.Errorf("single append: %v", err)
				return
			}
			singles.Add(1)
			if after := progress.Load(); before > 0 && after < n {
				during.Add(1)
			}
			time.Sleep(time.Millisecond) // a busy user, not a flood
		}
	})
	// Stream the list while the job is already running.
	addList(t, ctx, e.f, "big", users("b", 0, n), DefaultChunkSize)
	for {
		st, err := e.f.Status(ctx, "big")
		if err != nil {
			t.Fatal(err)
		}
		progress.Store(st.Done)
		if terminal(st.State) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	st := waitEnded(t, ctx, e.f, "big")
	if st.Done != n {
		t.Fatalf("status %v; want %d done", st, n)
	}
	t.Logf("%d recipients at %.0f/s; %d single appends acked while it ran (%d in all)", n, st.Rate, during.Load(), singles.Load())
	if during.Load() < 20 {
		t.Errorf("%d single appends acked while the job ran, want at least 20", during.Load())
	}
}

// Cancel drops the chunks not written yet.
func TestCancel(t *testing.T) {
	e := mustEnv(t, envOptions{noRun: true, withInbox: true})
	ctx := ctxFor(t, 30*time.Second)
	if _, err := e.f.Create(ctx, listJob("oops")); err != nil {
		t.Fatal(err)
	}
	for n := range 3 {
		if err := e.f.AddRecipients(ctx, "oops", n, users("c", n*100, 100)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := e.f.Cancel(ctx, "oops")
	if err != nil || st.State != fanoutpb.State_STATE_CANCELLED || st.Done != 0 || st.Total != 300 || st.FinishedAt == nil {
		t.Fatalf("cancel: %v, %v; want cancelled, 0 of 300 done", st, err)
	}
	if err := e.f.AddRecipients(ctx, "oops", 3, []string{"late"}); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("add after cancel: %v, want ErrInvalid", err)
	}
	if st, err := e.f.Cancel(ctx, "oops"); err != nil || st.State != fanoutpb.State_STATE_CANCELLED {
		t.Errorf("cancel again: %v, %v", st, err)
	}
	e.startRun(t)
	// The chunks leave the queue without a write.
	for {
		s, err := e.l.JetStream().Stream(ctx, StreamFanout)
		if err != nil {
			t.Fatal(err)
		}
		if info, err := s.Info(ctx); err == nil && info.State.Msgs == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("chunks of the cancelled job still queued")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got, _ := entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("oops")); len(got) != 0 {
		t.Errorf("%d entries of a job cancelled before it ran", len(got))
	}
}

// Bad input is refused with typed errors and writes nothing.
func TestBadInput(t *testing.T) {
	e := mustEnv(t, envOptions{noRun: true, withInbox: true})
	ctx := ctxFor(t, 30*time.Second)
	js := e.l.JetStream()
	mod := func(fn func(*fanoutpb.Job)) *fanoutpb.Job {
		j := listJob("bad")
		fn(j)
		return j
	}
	for _, tc := range []struct {
		name string
		job  *fanoutpb.Job
		want error
	}{
		{"nil", nil, oplog.ErrInvalid},
		{"bad id", mod(func(j *fanoutpb.Job) { j.Id = "no spaces" }), oplog.ErrInvalidID},
		{"empty id", mod(func(j *fanoutpb.Job) { j.Id = "" }), oplog.ErrInvalidID},
		{"no audience", mod(func(j *fanoutpb.Job) { j.Audience = nil }), oplog.ErrInvalid},
		{"bad segment", mod(func(j *fanoutpb.Job) { j.Audience = &fanoutpb.Job_Segment{Segment: "a.b"} }), oplog.ErrInvalidID},
		{"everyone without global", mod(func(j *fanoutpb.Job) { j.Audience = &fanoutpb.Job_Everyone{Everyone: &fanoutpb.Everyone{}} }), oplog.ErrInvalid},
		{"no event", mod(func(j *fanoutpb.Job) { j.Event = nil }), oplog.ErrInvalid},
		{"unknown business", mod(func(j *fanoutpb.Job) { j.Event.Business = "nope" }), oplog.ErrUnknownBusiness},
		{"bad business", mod(func(j *fanoutpb.Job) { j.Event.Business = "No!" }), oplog.ErrInvalidID},
		{"no kind", mod(func(j *fanoutpb.Job) { j.Event.Kind = 0 }), oplog.ErrUnknownKind},
		{"topic kind", mod(func(j *fanoutpb.Job) { j.Event.Kind = oplogpb.Kind_KIND_FOLLOW }), oplog.ErrUnknownKind},
		{"targets", mod(func(j *fanoutpb.Job) { j.Event.Targets = []string{"u1"} }), oplog.ErrInvalid},
		{"message id", mod(func(j *fanoutpb.Job) { j.Event.MessageId = "m1" }), oplog.ErrInvalid},
		{"transient", mod(func(j *fanoutpb.Job) { j.Event.Transient = true }), oplog.ErrInvalid},
		{"payload", mod(func(j *fanoutpb.Job) { j.Event.Payload = make([]byte, 65<<10) }), oplog.ErrPayloadTooLarge},
		{"expired", mod(func(j *fanoutpb.Job) { j.Event.ExpiresAt = timestampIn(-time.Minute) }), oplog.ErrExpired},
		{"device dimension", mod(func(j *fanoutpb.Job) { j.Event.Dimension = oplogpb.Dimension_DIMENSION_DEVICE }), oplog.ErrInvalid},
		{"conditions", mod(func(j *fanoutpb.Job) { j.Event.Conditions = &oplogpb.Conditions{AppVersionMin: "1 0"} }), oplog.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := e.f.Create(ctx, tc.job); !errors.Is(err, tc.want) {
				t.Errorf("Create: %v, want %v", err, tc.want)
			}
		})
	}
	if keys, err := e.f.jobs.ListKeys(ctx); err == nil {
		for k := range keys.Keys() {
			t.Errorf("refused jobs wrote %s", k)
		}
	}

	// A good job, then bad calls on it.
	if _, err := e.f.Create(ctx, listJob("good")); err != nil {
		t.Fatal(err)
	}
	other := listJob("good")
	other.Event.Payload = []byte("different")
	if _, err := e.f.Create(ctx, other); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("Create with another spec: %v, want ErrInvalid", err)
	}
	if err := e.f.AddRecipients(ctx, "good", 0, users("g", 0, 10)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		job  string
		n    int
		ids  []string
		want error
	}{
		{"unknown job", "ghost", 0, []string{"u1"}, oplog.ErrNotFound},
		{"bad job id", "a b", 0, []string{"u1"}, oplog.ErrInvalidID},
		{"oversize chunk", "good", 1, users("g", 0, DefaultChunkSize+1), oplog.ErrTooManyTargets},
		{"empty chunk", "good", 1, nil, oplog.ErrNoTargets},
		{"negative chunk", "good", -1, []string{"u1"}, oplog.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := e.f.AddRecipients(ctx, tc.job, tc.n, tc.ids); !errors.Is(err, tc.want) {
				t.Errorf("AddRecipients: %v, want %v", err, tc.want)
			}
		})
	}
	s, err := js.Stream(ctx, StreamFanout)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.CachedInfo().State.Msgs; n != 1 {
		t.Errorf("chunk stream holds %d chunks, want the 1 good one", n)
	}
	if err := e.f.AddRecipients(ctx, "good", 1, users("g", 10, 10)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.f.Seal(ctx, "good", 1); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("Seal with fewer chunks than added: %v, want ErrInvalid", err)
	}
	if _, err := e.f.Seal(ctx, "good", 3); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("Seal with more chunks than added: %v, want ErrInvalid", err)
	}
	if _, err := e.f.Seal(ctx, "ghost", 1); !errors.Is(err, oplog.ErrNotFound) {
		t.Errorf("Seal unknown: %v, want ErrNotFound", err)
	}
	if st, err := e.f.Seal(ctx, "good", 2); err != nil || !st.Sealed || st.Chunks != 2 {
		t.Errorf("Seal: %v, %v", st, err)
	}
	if _, err := e.f.Seal(ctx, "good", 2); err != nil {
		t.Errorf("Seal again: %v", err)
	}
	if err := e.f.AddRecipients(ctx, "good", 2, []string{"u1"}); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("add beyond the seal: %v, want ErrInvalid", err)
	}
	if _, err := e.f.Status(ctx, "ghost"); !errors.Is(err, oplog.ErrNotFound) {
		t.Errorf("Status unknown: %v, want ErrNotFound", err)
	}
	if _, err := e.f.Cancel(ctx, "ghost"); !errors.Is(err, oplog.ErrNotFound) {
		t.Errorf("Cancel unknown: %v, want ErrNotFound", err)
	}
	if _, err := e.f.Create(ctx, &fanoutpb.Job{Id: "seg", Event: template(), Audience: &fanoutpb.Job_Segment{Segment: "s"}}); err != nil {
		t.Fatal(err)
	}
	if err := e.f.AddRecipients(ctx, "seg", 0, []string{"u1"}); !errors.Is(err, oplog.ErrInvalid) {
		t.Errorf("add to a segment job: %v, want ErrInvalid", err)
	}

	// Segments.
	if err := e.f.SegmentAdd(ctx, "vip", "ok", "not ok"); !errors.Is(err, oplog.ErrInvalidID) {
		t.Errorf("SegmentAdd with a bad user: %v, want ErrInvalidID", err)
	}
	if err := e.f.SegmentAdd(ctx, "v.i.p", "ok"); !errors.Is(err, oplog.ErrInvalidID) {
		t.Errorf("SegmentAdd to a bad segment: %v, want ErrInvalidID", err)
	}
	if err := e.f.SegmentRemove(ctx, "vip"); !errors.Is(err, oplog.ErrNoTargets) {
		t.Errorf("SegmentRemove of nobody: %v, want ErrNoTargets", err)
	}
	if err := e.f.SegmentAdd(ctx, "vip", users("v", 0, DefaultChunkSize+1)...); !errors.Is(err, oplog.ErrTooManyTargets) {
		t.Errorf("SegmentAdd of too many: %v, want ErrTooManyTargets", err)
	}
	if s, err := js.Stream(ctx, StreamSegments); err != nil || s.CachedInfo().State.Msgs != 0 {
		t.Errorf("segment stream after refusals: %v", err)
	}
}

func timestampIn(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(time.Now().Add(d)) }

// Two nodes share the work of a list job, and one of them expands a
// segment job: still exactly one entry each.
func TestTwoNodes(t *testing.T) {
	e := mustEnv(t, envOptions{})
	ctx := ctxFor(t, 60*time.Second)
	other := mustOpen(t, Config{Log: e.l, Inbox: e.in, Dir: t.TempDir()})
	runUntil(t, "second fanout", other.Run)

	ids := users("t", 0, 10_000)
	if _, err := e.f.Create(ctx, listJob("shared")); err != nil {
		t.Fatal(err)
	}
	addList(t, ctx, other, "shared", ids, DefaultChunkSize)
	if st := waitEnded(t, ctx, other, "shared"); st.State != fanoutpb.State_STATE_DONE || st.Done != 10_000 {
		t.Fatalf("status %v; want 10000 done", st)
	}
	got, _ := entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("shared"))
	checkExactlyOnce(t, got, ids)
	byNode := map[string]int{}
	for n := range uint32(10) {
		ent, err := e.f.done.Get(ctx, doneKey("shared", n))
		if err != nil {
			t.Fatal(err)
		}
		d := new(fanoutpb.ChunkDone)
		if err := proto.Unmarshal(ent.Value(), d); err != nil {
			t.Fatal(err)
		}
		byNode[d.Node]++
	}
	t.Logf("chunks per node: %v", byNode)

	members := users("p", 0, 1500)
	for i := 0; i < len(members); i += 500 {
		if err := other.SegmentAdd(ctx, "pro", members[i:i+500]...); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := other.Create(ctx, &fanoutpb.Job{Id: "pro-news", Event: template(), Audience: &fanoutpb.Job_Segment{Segment: "pro"}}); err != nil {
		t.Fatal(err)
	}
	if st := waitEnded(t, ctx, e.f, "pro-news"); st.State != fanoutpb.State_STATE_DONE || st.Done != 1500 {
		t.Fatalf("status %v; want 1500 done", st)
	}
	got, _ = entriesOf(t, ctx, e.l.JetStream(), 1, MessageID("pro-news"))
	checkExactlyOnce(t, got, members)
}

// TestRunStoppedWhileStarting: a Run whose ctx ends before its consumer is
// set up returns nil, as one stopped later does (sluiced stopped right
// after start used to exit with "fanout: consumer: context canceled").
func TestRunStoppedWhileStarting(t *testing.T) {
	e := mustEnv(t, envOptions{noRun: true, withInbox: true})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := e.f.Run(ctx); err != nil {
		t.Fatalf("Run with its ctx ended: %v, want nil", err)
	}
}
