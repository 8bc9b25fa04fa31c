package fanout

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// The manager.
//
// Every node running Run watches the states of all jobs (the "*.state"
// keys of BucketJobs) and starts, for each job that has not ended:
//
//   - a tracker once the job is sealed: it sums the chunk markers and ends
//     the job when every chunk has one. Several nodes may track a job;
//     the compare-and-set that ends it lets one win.
//   - an expander for a segment job not yet sealed, or an everyone job,
//     when the job is this node's (Create on a running node makes it so),
//     has no owner, or its owner's lease ran out (the owner stopped or
//     crashed). The expander takes the lease by compare-and-set and
//     renews it at every step; a node that loses it stops at its next
//     step.

var (
	errLost = errors.New("fanout: lease lost")
	errStop = errors.New("fanout: nothing to expand")
)

// manage runs trackers and expanders until ctx ends.
func (f *Fanout) manage(ctx context.Context) error {
	var w jetstream.KeyWatcher
	for w == nil {
		var err error
		if w, err = f.jobs.Watch(ctx, "*.state", jetstream.IgnoreDeletes()); err != nil {
			f.log.Warn().Err(err).Msg("watching jobs failed")
			if !sleep(ctx, time.Second) {
				return nil
			}
		}
	}
	defer func() { _ = w.Stop() }()

	var wg sync.WaitGroup
	live := map[string]*fanoutpb.JobState{} // jobs not ended
	trackers := map[string]context.CancelFunc{}
	expanders := map[string]context.CancelFunc{}
	type end struct {
		job     string
		tracker bool
	}
	ended := make(chan end)
	defer func() {
		for _, c := range trackers {
			c()
		}
		for _, c := range expanders {
			c()
		}
		wg.Wait()
	}()
	start := func(job string, tracker bool, fn func(context.Context)) context.CancelFunc {
		tctx, cancel := context.WithCancel(ctx)
		wg.Go(func() {
			defer cancel()
			fn(tctx)
			select {
			case ended <- end{job, tracker}:
			case <-ctx.Done():
			}
		})
		return cancel
	}
	consider := func(st *fanoutpb.JobState) {
		job := st.Job
		if terminal(st.State) {
			delete(live, job)
			for _, m := range []map[string]context.CancelFunc{trackers, expanders} {
				if c := m[job]; c != nil {
					c()
					delete(m, job)
				}
			}
			f.forget(job)
			return
		}
		live[job] = st
		if st.Sealed && trackers[job] == nil {
			chunks := st.Chunks
			trackers[job] = start(job, true, func(ctx context.Context) { f.track(ctx, job, chunks) })
		}
		if expanders[job] == nil && f.mayExpand(ctx, st) {
			expanders[job] = start(job, false, func(ctx context.Context) { f.expand(ctx, job) })
		}
	}
	tick := time.NewTicker(f.lease / 4)
	defer tick.Stop()
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil {
				continue // the initial states are in
			}
			st := new(fanoutpb.JobState)
			if err := proto.Unmarshal(e.Value(), st); err != nil || st.Job+".state" != e.Key() {
				f.log.Error().Str("key", e.Key()).Msg("unreadable job state skipped")
				continue
			}
			consider(st)
		case x := <-ended:
			if x.tracker {
				delete(trackers, x.job)
			} else {
				delete(expanders, x.job)
			}
		case <-tick.C:
			for _, st := range live {
				consider(st)
			}
		case <-ctx.Done():
			return nil
		}
	}
}

// mayExpand reports whether this node should try to expand a job now.
func (f *Fanout) mayExpand(ctx context.Context, st *fanoutpb.JobState) bool {
	if st.Sealed {
		return false
	}
	if st.Owner != "" && st.Owner != f.node && st.LeaseUntil != nil && time.Now().Before(st.LeaseUntil.AsTime()) {
		return false
	}
	spec, err := f.spec(ctx, st.Job)
	if err != nil {
		return false // tried again at the next tick
	}
	return spec.GetSegment() != "" || spec.GetEveryone() != nil
}

// expand takes the lease of a segment or everyone job and expands it.
func (f *Fanout) expand(ctx context.Context, job string) {
	spec, err := f.spec(ctx, job)
	if err != nil {
		return
	}
	st, err := f.update(ctx, job, func(st *fanoutpb.JobState) error {
		switch {
		case terminal(st.State) || st.Sealed:
			return errStop
		case st.Owner != "" && st.Owner != f.node && st.LeaseUntil != nil && time.Now().Before(st.LeaseUntil.AsTime()):
			return errLost
		}
		if st.Owner != "" && st.Owner != f.node {
			f.log.Info().Str("job", job).Str("previous", st.Owner).Msg("expansion taken over")
		}
		st.Owner, st.LeaseUntil = f.node, timestamppb.New(time.Now().Add(f.lease))
		return nil
	})
	if err != nil {
		if !errors.Is(err, errStop) && !errors.Is(err, errLost) && ctx.Err() == nil {
			f.log.Warn().Err(err).Str("job", job).Msg("expansion not started")
		}
		return
	}
	if spec.GetEveryone() != nil {
		err = f.publishGlobal(ctx, spec)
	} else {
		err = f.expandSegment(ctx, spec, st)
	}
	if err != nil && !errors.Is(err, errLost) && ctx.Err() == nil {
		f.log.Warn().Err(err).Str("job", job).Msg("expansion stopped, will resume")
	}
}

// own updates the state of a job this node expands, renewing its lease. It
// fails with errLost if another node took the job over or it ended.
func (f *Fanout) own(ctx context.Context, job string, fn func(*fanoutpb.JobState)) (*fanoutpb.JobState, error) {
	return f.update(ctx, job, func(st *fanoutpb.JobState) error {
		if st.Owner != f.node || terminal(st.State) {
			return errLost
		}
		fn(st)
		st.LeaseUntil = timestamppb.New(time.Now().Add(f.lease))
		return nil
	})
}

// expandSegment publishes a segment's members in chunks from the job's
// cursor on, then seals the job. See doc.go (Segments) for which members
// a job reaches.
func (f *Fanout) expandSegment(ctx context.Context, spec *fanoutpb.Job, st *fanoutpb.JobState) error {
	seg := spec.GetSegment()
	for ctx.Err() == nil {
		// Changes stored before this scan are in it.
		if err := f.seg.CatchUp(ctx); err != nil {
			return err
		}
		if st.ChunkEnd == "" {
			ids, err := f.members(seg, st.Cursor, "", f.chunkSize)
			if err != nil {
				return err
			}
			full := st.NextChunk >= MaxChunks
			if len(ids) == 0 || full {
				st, err = f.own(ctx, spec.Id, func(st *fanoutpb.JobState) {
					st.Sealed, st.Chunks, st.AddedChunks = true, st.NextChunk, st.NextChunk
					if full {
						st.Error = fmt.Sprintf("segment over %d chunks: members after %q left out", MaxChunks, st.Cursor)
					}
				})
				if err == nil {
					f.log.Info().Str("job", spec.Id).Str("segment", seg).Uint32("chunks", st.Chunks).Uint64("recipients", st.Recipients).Msg("segment expanded")
				}
				return err
			}
			// Plan the chunk before publishing it: a retry publishes the
			// same range under the same chunk number.
			last := ids[len(ids)-1]
			if st, err = f.own(ctx, spec.Id, func(st *fanoutpb.JobState) { st.ChunkEnd = last }); err != nil {
				return err
			}
		}
		ids, err := f.members(seg, st.Cursor, st.ChunkEnd, f.chunkSize)
		if err != nil {
			return err
		}
		ack, err := f.publishChunk(ctx, &fanoutpb.Chunk{Job: spec.Id, N: st.NextChunk, Ids: ids})
		if err != nil {
			return err
		}
		st, err = f.own(ctx, spec.Id, func(st *fanoutpb.JobState) {
			st.Cursor, st.ChunkEnd = st.ChunkEnd, ""
			st.NextChunk++
			st.AddedChunks = st.NextChunk
			if !ack.Duplicate {
				st.Recipients += uint64(len(ids))
			}
		})
		if err != nil {
			return err
		}
	}
	return ctx.Err()
}

// publishGlobal stores an everyone job once through Global, retrying while
// it is unavailable, and ends the job.
func (f *Fanout) publishGlobal(ctx context.Context, spec *fanoutpb.Job) error {
	ev := proto.Clone(spec.Event).(*oplogpb.Event)
	ev.MessageId = MessageID(spec.Id)
	started := timestamppb.Now()
	wait := f.retryDelay
	for {
		_, err := f.global.Publish(ctx, ev)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if c := oplog.CodeOf(err); c == oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE || c == oplogpb.ErrorCode_ERROR_CODE_INTERNAL {
			f.log.Warn().Err(err).Str("job", spec.Id).Dur("retry_in", wait).Msg("global publish failed")
			if _, err := f.own(ctx, spec.Id, func(*fanoutpb.JobState) {}); err != nil {
				return err
			}
			if !sleep(ctx, wait) {
				return ctx.Err()
			}
			wait = min(2*wait, 30*time.Second)
			continue
		}
		f.log.Info().Err(err).Str("job", spec.Id).Msg("global publish refused")
		reason := err.Error()
		_, err = f.own(ctx, spec.Id, func(st *fanoutpb.JobState) {
			st.State, st.Sealed, st.Total, st.Failed, st.Error = fanoutpb.State_STATE_FAILED, true, 1, 1, reason
			st.StartedAt, st.FinishedAt = started, timestamppb.Now()
		})
		return err
	}
	_, err := f.own(ctx, spec.Id, func(st *fanoutpb.JobState) {
		st.State, st.Sealed, st.Total, st.Done = fanoutpb.State_STATE_DONE, true, 1, 1
		st.StartedAt, st.FinishedAt = started, timestamppb.Now()
	})
	if err == nil {
		f.log.Info().Str("job", spec.Id).Msg("job ended")
	}
	return err
}
