package fanout

import (
	"context"
	"math/bits"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Progress is summed from the chunk markers: each chunk is counted once,
// whoever wrote it and however often it was delivered, so the figures are
// exact after any crash.

// tally sums chunk markers.
type tally struct {
	seen     []uint64 // bitmap of the chunk numbers counted
	count    uint32   // chunks counted
	targets  uint64
	appended uint64
	failed   uint64
	started  time.Time // earliest chunk start
	finished time.Time // latest chunk end
	firstErr string
}

// add counts the marker of chunk n, once.
func (t *tally) add(n uint32, d *fanoutpb.ChunkDone) {
	if n >= MaxChunks {
		return // never added through the API
	}
	w, bit := int(n/64), uint64(1)<<(n%64)
	if w >= len(t.seen) {
		t.seen = append(t.seen, make([]uint64, w+1-len(t.seen))...)
	}
	if t.seen[w]&bit != 0 {
		return
	}
	t.seen[w] |= bit
	t.count++
	t.targets += uint64(d.Targets)
	t.appended += uint64(d.Appended)
	t.failed += uint64(d.Failed)
	if s := d.StartedAt; s != nil && (t.started.IsZero() || s.AsTime().Before(t.started)) {
		t.started = s.AsTime()
	}
	if e := d.FinishedAt; e != nil && e.AsTime().After(t.finished) {
		t.finished = e.AsTime()
	}
	if t.firstErr == "" {
		t.firstErr = d.FirstError
	}
}

// below counts the chunks numbered below n.
func (t *tally) below(n uint32) uint32 {
	c := 0
	for w := 0; w < len(t.seen) && uint64(w)*64 < uint64(n); w++ {
		word := t.seen[w]
		if rem := uint64(n) - uint64(w)*64; rem < 64 {
			word &= 1<<rem - 1
		}
		c += bits.OnesCount64(word)
	}
	return uint32(c)
}

// into writes the sums into a job state.
func (t *tally) into(st *fanoutpb.JobState) {
	st.Total, st.Done, st.Failed, st.ChunksDone = t.targets, t.appended, t.failed, t.count
	if !t.started.IsZero() {
		st.StartedAt = timestamppb.New(t.started)
	}
	if st.Error == "" {
		st.Error = t.firstErr
	}
}

// addEntry counts one entry of the done bucket; other keys (start
// markers) are ignored.
func (f *Fanout) addEntry(t *tally, job string, e jetstream.KeyValueEntry) {
	rest, ok := strings.CutPrefix(e.Key(), job+".")
	if !ok || e.Operation() != jetstream.KeyValuePut {
		return
	}
	n, err := strconv.ParseUint(rest, 10, 32)
	if err != nil {
		return
	}
	d := new(fanoutpb.ChunkDone)
	if err := proto.Unmarshal(e.Value(), d); err != nil {
		f.log.Error().Str("job", job).Str("key", e.Key()).Msg("unreadable chunk marker skipped")
		return
	}
	t.add(uint32(n), d)
}

// tally sums the markers of a job's chunks stored so far.
func (f *Fanout) tally(ctx context.Context, spec *fanoutpb.Job) (*tally, error) {
	t := &tally{}
	if spec.GetEveryone() != nil {
		return t, nil
	}
	w, err := f.done.Watch(ctx, spec.Id+".*", jetstream.IgnoreDeletes())
	if err != nil {
		return nil, unavailable("read chunk markers", err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok || e == nil {
				return t, nil
			}
			f.addEntry(t, spec.Id, e)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// track follows the markers of a sealed job until every chunk has one,
// then ends the job. It returns when the job has ended or ctx ends.
func (f *Fanout) track(ctx context.Context, job string, chunks uint32) {
	spec, err := f.spec(ctx, job)
	if err != nil {
		f.log.Warn().Err(err).Str("job", job).Msg("job not tracked")
		return
	}
	w, err := f.done.Watch(ctx, job+".*", jetstream.IgnoreDeletes())
	if err != nil {
		f.log.Warn().Err(err).Str("job", job).Msg("job not tracked")
		return
	}
	defer func() { _ = w.Stop() }()
	t := &tally{}
	caughtUp := false
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil {
				caughtUp = true
			} else {
				f.addEntry(t, job, e)
			}
			if caughtUp && t.count >= chunks && t.below(chunks) == chunks {
				f.finish(ctx, spec, t)
				return
			}
		case <-ctx.Done():
			return
		}
	}
}

// finish ends a sealed job whose chunks are all written: DONE, or FAILED
// when nothing could be written.
func (f *Fanout) finish(ctx context.Context, spec *fanoutpb.Job, t *tally) {
	st, err := f.update(ctx, spec.Id, func(st *fanoutpb.JobState) error {
		if terminal(st.State) || !st.Sealed || t.below(st.Chunks) < st.Chunks {
			return errNoChange
		}
		t.into(st)
		end := t.finished
		if end.IsZero() {
			end = time.Now()
		}
		st.FinishedAt = timestamppb.New(end)
		if st.StartedAt == nil {
			st.StartedAt = st.FinishedAt
		}
		st.State = fanoutpb.State_STATE_DONE
		if st.Done == 0 && st.Failed > 0 {
			st.State = fanoutpb.State_STATE_FAILED
		}
		return nil
	})
	if err != nil {
		if ctx.Err() == nil {
			f.log.Warn().Err(err).Str("job", spec.Id).Msg("job not finished, will retry")
		}
		return
	}
	if terminal(st.State) {
		f.log.Info().Str("job", spec.Id).Str("state", stateName(st.State)).Uint64("total", st.Total).
			Uint64("done", st.Done).Uint64("failed", st.Failed).Msg("job ended")
	}
}
