package fanout

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Create validates a job and stores it; a list job then takes chunks
// (AddRecipients) until sealed, segment and everyone jobs are expanded by
// Run on some node. Only the spec is read from job: id, event template
// (no targets, no message id) and audience. Creating an existing id again
// with the same spec returns its status; with another spec it fails with
// oplog.ErrInvalid. A refused job writes nothing.
func (f *Fanout) Create(ctx context.Context, job *fanoutpb.Job) (*fanoutpb.Status, error) {
	spec, err := f.normalise(job, time.Now())
	if err != nil {
		return nil, err
	}
	data, err := proto.Marshal(spec)
	if err != nil {
		return nil, fmt.Errorf("fanout: marshal job: %w", err)
	}
	created := true
	if _, err := f.jobs.Create(ctx, specKey(spec.Id), data); err != nil {
		created = false
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, unavailable("store job", err)
		}
		old, err := f.spec(ctx, spec.Id)
		if err != nil {
			return nil, err
		}
		if !sameSpec(old, spec, job.GetEvent().GetCreatedAt() == nil) {
			return nil, fmt.Errorf("job %q exists with another spec: %w", spec.Id, oplog.ErrInvalid)
		}
		spec = old
	}
	f.specs.Store(spec.Id, spec)
	// The state follows the spec: a crash in between leaves a spec alone,
	// which the producer's retry of Create completes.
	st := &fanoutpb.JobState{Job: spec.Id, State: fanoutpb.State_STATE_PENDING}
	if spec.GetSegment() != "" || spec.GetEveryone() != nil {
		// Expanded by this node if it runs, else by whichever node does.
		if f.running.Load() {
			st.Owner, st.LeaseUntil = f.node, timestamppb.New(time.Now().Add(f.lease))
		}
	}
	if data, err = proto.Marshal(st); err != nil {
		return nil, fmt.Errorf("fanout: marshal job state: %w", err)
	}
	if _, err := f.jobs.Create(ctx, stateKey(spec.Id), data); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return nil, unavailable("store job state", err)
	}
	if created {
		f.log.Info().Str("job", spec.Id).Str("audience", audience(spec)).Str("business", spec.Event.Business).Msg("job created")
	}
	return f.Status(ctx, spec.Id)
}

// normalise checks a job spec and returns the record to store: the spec
// with the event's defaults resolved, created_at and start_seqs.
func (f *Fanout) normalise(in *fanoutpb.Job, now time.Time) (*fanoutpb.Job, error) {
	if in == nil {
		return nil, fmt.Errorf("no job: %w", oplog.ErrInvalid)
	}
	if err := checkJobID(in.Id); err != nil {
		return nil, err
	}
	out := &fanoutpb.Job{Id: in.Id, CreatedAt: timestamppb.New(now)}
	switch a := in.Audience.(type) {
	case *fanoutpb.Job_List:
		out.Audience = &fanoutpb.Job_List{List: &fanoutpb.List{}}
	case *fanoutpb.Job_Segment:
		if !oplog.ValidID(a.Segment) {
			return nil, fmt.Errorf("segment %q: want 1-%d of [A-Za-z0-9_-]: %w", clip(a.Segment), oplog.MaxIDLen, oplog.ErrInvalidID)
		}
		out.Audience = &fanoutpb.Job_Segment{Segment: a.Segment}
	case *fanoutpb.Job_Everyone:
		if f.global == nil {
			return nil, fmt.Errorf("everyone jobs need a global publisher, none configured: %w", oplog.ErrInvalid)
		}
		out.Audience = &fanoutpb.Job_Everyone{Everyone: &fanoutpb.Everyone{}}
	default:
		return nil, fmt.Errorf("audience missing: want list, segment or everyone: %w", oplog.ErrInvalid)
	}
	if in.Event == nil {
		return nil, fmt.Errorf("event template missing: %w", oplog.ErrInvalid)
	}
	ev := proto.Clone(in.Event).(*oplogpb.Event)
	if err := f.checkTemplate(ev, now); err != nil {
		return nil, err
	}
	out.Event = ev
	if out.GetEveryone() == nil {
		out.StartSeqs = f.startSeqs()
	}
	return out, nil
}

// startSeqs returns, per oplog shard, a sequence every entry appended from
// now on is above: the inbox's applied sequence (or 0 without one, which
// makes a crash recovery scan whole inboxes).
func (f *Fanout) startSeqs() []uint64 {
	seqs := make([]uint64, f.lg.Shards())
	if f.in != nil {
		for i := range seqs {
			seqs[i] = f.in.LastSeq(uint32(i))
		}
	}
	return seqs
}

// sameSpec reports whether two stored specs are the same job. When the
// producer left created_at to the server, it is not compared.
func sameSpec(a, b *fanoutpb.Job, ignoreCreated bool) bool {
	a, b = proto.Clone(a).(*fanoutpb.Job), proto.Clone(b).(*fanoutpb.Job)
	a.CreatedAt, b.CreatedAt, a.StartSeqs, b.StartSeqs = nil, nil, nil, nil
	if ignoreCreated {
		a.Event.CreatedAt, b.Event.CreatedAt = nil, nil
	}
	return proto.Equal(a, b)
}

func checkJobID(id string) error {
	if !oplog.ValidID(id) {
		return fmt.Errorf("job id %q: want 1-%d of [A-Za-z0-9_-]: %w", clip(id), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	return nil
}

// AddRecipients adds chunk n (0, 1, 2, ...) of a list job: at most
// ChunkSize ids. It returns once the chunk is durable; writing starts at
// once. Adding chunk n again is harmless (it is written once), so a
// producer retries a failed call with the same n and ids. Invalid ids are
// not refused here: they count as failed recipients.
func (f *Fanout) AddRecipients(ctx context.Context, job string, n int, ids []string) error {
	if err := checkJobID(job); err != nil {
		return err
	}
	switch {
	case n < 0 || n >= MaxChunks:
		return fmt.Errorf("chunk number %d: want 0 to %d: %w", n, MaxChunks-1, oplog.ErrInvalid)
	case len(ids) == 0:
		return fmt.Errorf("chunk %d: %w", n, oplog.ErrNoTargets)
	case len(ids) > f.chunkSize:
		return fmt.Errorf("chunk %d has %d ids, limit %d: %w", n, len(ids), f.chunkSize, oplog.ErrTooManyTargets)
	}
	spec, err := f.spec(ctx, job)
	if err != nil {
		return err
	}
	if spec.GetList() == nil {
		return fmt.Errorf("job %q is not a list job: %w", job, oplog.ErrInvalid)
	}
	st, _, err := f.state(ctx, job)
	if err != nil {
		return err
	}
	if err := addable(st, uint32(n)); err != nil {
		return err
	}
	ack, err := f.publishChunk(ctx, &fanoutpb.Chunk{Job: job, N: uint32(n), Ids: ids})
	if err != nil {
		return err
	}
	_, err = f.update(ctx, job, func(st *fanoutpb.JobState) error {
		st.AddedChunks = max(st.AddedChunks, uint32(n)+1)
		if !ack.Duplicate {
			st.Recipients += uint64(len(ids))
		}
		return nil
	})
	return err
}

func addable(st *fanoutpb.JobState, n uint32) error {
	switch {
	case terminal(st.State):
		return fmt.Errorf("job %q is %s: %w", st.Job, stateName(st.State), oplog.ErrInvalid)
	case st.Sealed && n >= st.Chunks:
		return fmt.Errorf("job %q is sealed with %d chunks, chunk %d is beyond: %w", st.Job, st.Chunks, n, oplog.ErrInvalid)
	}
	return nil
}

// publishChunk stores a chunk in the work queue, deduplicated by its
// message id within the duplicate window.
func (f *Fanout) publishChunk(ctx context.Context, c *fanoutpb.Chunk) (*jetstream.PubAck, error) {
	data, err := proto.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("fanout: marshal chunk: %w", err)
	}
	m := nats.NewMsg(SubjectChunk(c.Job))
	m.Data = data
	ack, err := f.js.PublishMsg(ctx, m, jetstream.WithMsgID(c.Job+"/"+strconv.FormatUint(uint64(c.N), 10)))
	if err != nil {
		return nil, unavailable("store chunk", err)
	}
	return ack, nil
}

// Seal declares that a list job has exactly chunks chunks, numbered from
// 0: the job is done once each has been written. It fails with
// oplog.ErrInvalid if chunks is not the number of chunks added, or if the
// job was sealed with another count. Sealing again with the same count
// returns the status.
func (f *Fanout) Seal(ctx context.Context, job string, chunks int) (*fanoutpb.Status, error) {
	if err := checkJobID(job); err != nil {
		return nil, err
	}
	if chunks < 0 || chunks > MaxChunks {
		return nil, fmt.Errorf("chunk count %d: want 0 to %d: %w", chunks, MaxChunks, oplog.ErrInvalid)
	}
	spec, err := f.spec(ctx, job)
	if err != nil {
		return nil, err
	}
	if spec.GetList() == nil {
		return nil, fmt.Errorf("job %q is not a list job: %w", job, oplog.ErrInvalid)
	}
	_, err = f.update(ctx, job, func(st *fanoutpb.JobState) error {
		switch {
		case st.Sealed && st.Chunks == uint32(chunks):
			return errNoChange
		case st.Sealed:
			return fmt.Errorf("job %q is sealed with %d chunks, not %d: %w", job, st.Chunks, chunks, oplog.ErrInvalid)
		case terminal(st.State):
			return fmt.Errorf("job %q is %s: %w", job, stateName(st.State), oplog.ErrInvalid)
		case uint32(chunks) != st.AddedChunks:
			return fmt.Errorf("job %q: sealed with %d chunks, %d added: %w", job, chunks, st.AddedChunks, oplog.ErrInvalid)
		}
		st.Sealed, st.Chunks = true, uint32(chunks)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return f.Status(ctx, job)
}

// Cancel stops a job: a segment stops expanding, and the chunks not yet
// written are dropped (acked without appends). Entries written stay. A
// job that has ended is left as it is. It returns the status.
func (f *Fanout) Cancel(ctx context.Context, job string) (*fanoutpb.Status, error) {
	if err := checkJobID(job); err != nil {
		return nil, err
	}
	spec, err := f.spec(ctx, job)
	if err != nil {
		return nil, err
	}
	t, err := f.tally(ctx, spec)
	if err != nil {
		return nil, err
	}
	st, err := f.update(ctx, job, func(st *fanoutpb.JobState) error {
		if terminal(st.State) {
			return errNoChange
		}
		t.into(st)
		st.Total = max(st.Total, st.Recipients)
		st.State, st.FinishedAt = fanoutpb.State_STATE_CANCELLED, timestamppb.Now()
		return nil
	})
	if err != nil {
		return nil, err
	}
	f.log.Info().Str("job", job).Msg("job cancelled")
	return f.statusOf(ctx, spec, st)
}

// Status reports a job's progress. An unknown job fails with
// oplog.ErrNotFound.
func (f *Fanout) Status(ctx context.Context, job string) (*fanoutpb.Status, error) {
	if err := checkJobID(job); err != nil {
		return nil, err
	}
	spec, err := f.spec(ctx, job)
	if err != nil {
		return nil, err
	}
	st, _, err := f.state(ctx, job)
	if err != nil {
		return nil, err
	}
	if terminal(st.State) {
		f.forget(job)
	}
	return f.statusOf(ctx, spec, st)
}

// statusOf computes a status: an ended job's figures are in its state; a
// running job's are summed from its chunk markers.
func (f *Fanout) statusOf(ctx context.Context, spec *fanoutpb.Job, st *fanoutpb.JobState) (*fanoutpb.Status, error) {
	s := &fanoutpb.Status{
		Job: spec.Id, State: st.State, CreatedAt: spec.CreatedAt, Sealed: st.Sealed,
		Chunks: st.AddedChunks, Audience: audience(spec), Error: st.Error,
	}
	if st.Sealed {
		s.Chunks = st.Chunks
	}
	if !terminal(st.State) && spec.GetEveryone() == nil {
		t, err := f.tally(ctx, spec)
		if err != nil {
			return nil, err
		}
		t.into(st)
		st.Total = max(st.Total, st.Recipients)
		if st.ChunksDone > 0 || st.NextChunk > 0 {
			s.State = fanoutpb.State_STATE_RUNNING
		}
	}
	s.Total, s.Done, s.Failed, s.ChunksDone = st.Total, st.Done, st.Failed, st.ChunksDone
	s.StartedAt, s.FinishedAt = st.StartedAt, st.FinishedAt
	if st.Error != "" {
		s.Error = st.Error
	}
	if s.StartedAt != nil {
		end := time.Now()
		if s.FinishedAt != nil {
			end = s.FinishedAt.AsTime()
		}
		if d := end.Sub(s.StartedAt.AsTime()).Seconds(); d > 0 {
			s.Rate = float64(s.Done) / d
		}
	}
	return s, nil
}

// List returns the statuses of the most recent jobs (at most limit,
// default 100), newest first.
func (f *Fanout) List(ctx context.Context, limit int) ([]*fanoutpb.Status, error) {
	if limit <= 0 {
		limit = 100
	}
	w, err := f.jobs.Watch(ctx, "*.spec", jetstream.IgnoreDeletes())
	if err != nil {
		return nil, unavailable("list jobs", err)
	}
	defer func() { _ = w.Stop() }()
	var specs []*fanoutpb.Job
	for done := false; !done; {
		select {
		case e, ok := <-w.Updates():
			if !ok || e == nil {
				done = true
				break
			}
			spec := new(fanoutpb.Job)
			if err := proto.Unmarshal(e.Value(), spec); err != nil {
				f.log.Error().Str("key", e.Key()).Msg("unreadable job skipped")
				continue
			}
			specs = append(specs, spec)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	slices.SortFunc(specs, func(a, b *fanoutpb.Job) int { return b.CreatedAt.AsTime().Compare(a.CreatedAt.AsTime()) })
	specs = specs[:min(limit, len(specs))]
	out := make([]*fanoutpb.Status, 0, len(specs))
	for _, spec := range specs {
		st, _, err := f.state(ctx, spec.Id)
		if errors.Is(err, oplog.ErrNotFound) {
			continue // Create did not finish
		}
		if err != nil {
			return nil, err
		}
		s, err := f.statusOf(ctx, spec, st)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// spec returns a job's spec, from memory when seen before (specs never
// change).
func (f *Fanout) spec(ctx context.Context, job string) (*fanoutpb.Job, error) {
	if v, ok := f.specs.Load(job); ok {
		return v.(*fanoutpb.Job), nil
	}
	e, err := f.jobs.Get(ctx, specKey(job))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("job %q: %w", job, oplog.ErrNotFound)
	}
	if err != nil {
		return nil, unavailable("read job", err)
	}
	spec := new(fanoutpb.Job)
	if err := proto.Unmarshal(e.Value(), spec); err != nil || spec.Id != job || spec.Event == nil {
		return nil, fmt.Errorf("fanout: job %q: unreadable record", job)
	}
	f.specs.Store(job, spec)
	return spec, nil
}

// forget drops a spec from memory once its job has ended.
func (f *Fanout) forget(job string) { f.specs.Delete(job) }

// state reads a job's state and its revision.
func (f *Fanout) state(ctx context.Context, job string) (*fanoutpb.JobState, uint64, error) {
	e, err := f.jobs.Get(ctx, stateKey(job))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, fmt.Errorf("job %q: %w", job, oplog.ErrNotFound)
	}
	if err != nil {
		return nil, 0, unavailable("read job state", err)
	}
	st := new(fanoutpb.JobState)
	if err := proto.Unmarshal(e.Value(), st); err != nil || st.Job != job {
		return nil, 0, fmt.Errorf("fanout: job %q: unreadable state", job)
	}
	return st, e.Revision(), nil
}

// errNoChange makes an update leave the state as it is.
var errNoChange = errors.New("no change")

// update changes a job's state with compare-and-set: it reads the state,
// applies fn and writes it back if nobody wrote in between, else tries
// again. fn returning errNoChange leaves the state unchanged; any other
// error is returned.
func (f *Fanout) update(ctx context.Context, job string, fn func(*fanoutpb.JobState) error) (*fanoutpb.JobState, error) {
	for {
		st, rev, err := f.state(ctx, job)
		if err != nil {
			return nil, err
		}
		if err := fn(st); errors.Is(err, errNoChange) {
			return st, nil
		} else if err != nil {
			return nil, err
		}
		data, err := proto.Marshal(st)
		if err != nil {
			return nil, fmt.Errorf("fanout: marshal job state: %w", err)
		}
		_, err = f.jobs.Update(ctx, stateKey(job), data, rev)
		switch {
		case err == nil:
			return st, nil
		case errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists):
			if ctx.Err() != nil {
				return nil, unavailable("update job state", ctx.Err())
			}
		default:
			return nil, unavailable("update job state", err)
		}
	}
}

// unavailable wraps a NATS failure as oplog.ErrUnavailable: the caller may
// retry.
func unavailable(what string, err error) error {
	return fmt.Errorf("%s: %v: %w", what, err, oplog.ErrUnavailable)
}

func audience(spec *fanoutpb.Job) string {
	switch {
	case spec.GetSegment() != "":
		return "segment:" + spec.GetSegment()
	case spec.GetEveryone() != nil:
		return "everyone"
	}
	return "list"
}

func stateName(s fanoutpb.State) string {
	if n, ok := fanoutpb.State_name[int32(s)]; ok {
		return n
	}
	return strconv.Itoa(int(s))
}
