package fanout

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// work writes chunks one at a time until ctx ends. Each node runs
// Concurrency of these on the shared consumer.
func (f *Fanout) work(ctx context.Context, cons jetstream.Consumer) error {
	var warned time.Time
	for ctx.Err() == nil {
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		m, err := cons.Next(jetstream.FetchContext(fctx))
		cancel()
		switch {
		case err == nil:
			f.handle(ctx, m)
		case ctx.Err() != nil:
		case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout), errors.Is(err, jetstream.ErrNoMessages):
		default:
			if time.Since(warned) > 30*time.Second {
				f.log.Warn().Err(err).Msg("fetching chunks failed")
				warned = time.Now()
			}
			sleep(ctx, time.Second)
		}
	}
	return nil
}

// handle writes one chunk: appends, then its done marker, then the ack.
// See doc.go for why this is exactly once.
func (f *Fanout) handle(ctx context.Context, m jetstream.Msg) {
	c := new(fanoutpb.Chunk)
	if err := proto.Unmarshal(m.Data(), c); err != nil || !oplog.ValidID(c.Job) || m.Subject() != SubjectChunk(c.Job) {
		f.log.Error().Str("subject", m.Subject()).Msg("unreadable chunk dropped")
		_ = m.Term()
		return
	}
	log := f.log.With().Str("job", c.Job).Uint32("chunk", c.N).Logger()
	var tries uint64 = 1
	if md, err := m.Metadata(); err == nil {
		tries = md.NumDelivered
	}
	retry := func(err error) {
		// Back off exponentially, and log the 1st, 2nd, 4th, 8th... failure.
		wait := min(f.retryDelay<<min(tries-1, 10), time.Minute)
		if ctx.Err() == nil && tries&(tries-1) == 0 {
			log.Warn().Err(err).Uint64("tries", tries).Dur("retry_in", wait).Msg("chunk not written")
		}
		_ = m.NakWithDelay(wait)
	}
	// Written already: a redelivery after a crash between marker and ack,
	// or a second copy of the chunk.
	if _, err := f.done.Get(ctx, doneKey(c.Job, c.N)); err == nil {
		_ = m.Ack()
		return
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		retry(err)
		return
	}
	spec, err := f.spec(ctx, c.Job)
	if errors.Is(err, oplog.ErrNotFound) {
		log.Warn().Msg("chunk of an unknown job dropped")
		_ = m.Term()
		return
	}
	if err != nil {
		retry(err)
		return
	}
	st, _, err := f.state(ctx, c.Job)
	if err != nil {
		retry(err) // a state not found yet comes with the creator's retry
		return
	}
	switch {
	case st.State == fanoutpb.State_STATE_CANCELLED:
		_ = m.Ack()
		return
	case terminal(st.State) || st.Sealed && c.N >= st.Chunks:
		log.Info().Str("state", stateName(st.State)).Uint32("chunks", st.Chunks).Msg("chunk of an ended job or beyond its seal dropped")
		_ = m.Ack()
		return
	}
	stop := f.heartbeat(m)
	defer stop()
	d, err := f.write(ctx, spec, c, log)
	if err == nil && f.afterAppend != nil {
		err = f.afterAppend(c.Job, c.N)
	}
	if err != nil {
		retry(err)
		return
	}
	data, err := proto.Marshal(d)
	if err != nil {
		retry(err)
		return
	}
	if _, err := f.done.Create(ctx, doneKey(c.Job, c.N), data); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		retry(unavailable("store chunk marker", err))
		return
	}
	// A lost ack only brings the chunk back, to find its marker.
	_ = m.Ack()
}

// heartbeat tells the server, every third of the ack wait, that a chunk
// is still being written, until stop is called.
func (f *Fanout) heartbeat(m jetstream.Msg) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(f.ackWait / 3)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				_ = m.InProgress()
			case <-done:
				return
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// write appends the entries of one chunk and reports the result. An error
// means the attempt must be retried (the log was unavailable); refused
// appends and invalid ids are counted as failed instead.
func (f *Fanout) write(ctx context.Context, spec *fanoutpb.Job, c *fanoutpb.Chunk, log zerolog.Logger) (*fanoutpb.ChunkDone, error) {
	d := &fanoutpb.ChunkDone{Targets: uint32(len(c.Ids)), StartedAt: timestamppb.Now(), Node: f.node}
	fail := func(k int, reason string) {
		d.Failed += uint32(k)
		if d.FirstError == "" {
			d.FirstError = reason
		}
	}
	targets := make([]string, 0, len(c.Ids))
	seen := make(map[string]struct{}, len(c.Ids))
	for _, id := range c.Ids {
		if !oplog.ValidID(id) {
			fail(1, fmt.Sprintf("%s: recipient %q outside the id alphabet", oplogpb.ErrorCode_ERROR_CODE_INVALID_ID, clip(id)))
			continue
		}
		if _, dup := seen[id]; dup {
			d.Appended++ // its first occurrence carries it
			continue
		}
		seen[id] = struct{}{}
		targets = append(targets, id)
	}
	first, since, err := f.attempt(ctx, c)
	if err != nil {
		return nil, err
	}
	if !first && time.Since(since) > f.dupes/2 {
		// An earlier attempt may have appended some of these longer ago
		// than the duplicate window remembers: look them up.
		if targets, err = f.unwritten(ctx, spec, targets, d); err != nil {
			return nil, err
		}
		log.Info().Uint32("recovered", d.Recovered).Msg("chunk resumed past the duplicate window")
	}
	msgID := MessageID(spec.Id)
	per := f.lg.Limits().MaxTargets
	evs := make([]*oplogpb.Event, 0, (len(targets)+per-1)/per)
	for i := 0; i < len(targets); i += per {
		ev := proto.Clone(spec.Event).(*oplogpb.Event)
		ev.Targets, ev.MessageId = targets[i:min(i+per, len(targets))], msgID
		evs = append(evs, ev)
	}
	if len(evs) > 0 {
		for i, r := range f.lg.AppendBatch(oplog.WithBulk(ctx), evs) {
			switch {
			case r.Error == nil:
				d.Appended += uint32(len(evs[i].Targets))
			case r.Error.Code == oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE || r.Error.Code == oplogpb.ErrorCode_ERROR_CODE_INTERNAL:
				return nil, oplog.ErrorFromPB(r.Error)
			default:
				fail(len(evs[i].Targets), r.Error.Code.String()+": "+r.Error.Message)
			}
		}
	}
	d.FinishedAt = timestamppb.Now()
	return d, nil
}

// attempt records the first attempt at a chunk (its start marker), and
// reports whether this is it, and when the first began. Every append of
// the chunk, by any attempt, comes after that time.
func (f *Fanout) attempt(ctx context.Context, c *fanoutpb.Chunk) (first bool, since time.Time, err error) {
	key := startedKey(c.Job, c.N)
	if _, err := f.done.Create(ctx, key, []byte(f.node)); err == nil {
		return true, time.Now(), nil
	} else if !errors.Is(err, jetstream.ErrKeyExists) {
		return false, time.Time{}, unavailable("store chunk start", err)
	}
	e, err := f.done.Get(ctx, key)
	if err != nil {
		return false, time.Time{}, unavailable("read chunk start", err)
	}
	return false, e.Created(), nil
}

// unwritten returns the targets that have no entry of the job yet in this
// node's inbox projection, counting the others as appended and recovered.
func (f *Fanout) unwritten(ctx context.Context, spec *fanoutpb.Job, targets []string, d *fanoutpb.ChunkDone) ([]string, error) {
	msgID := MessageID(spec.Id)
	out := targets[:0]
	for _, t := range targets {
		var since uint64
		if shard := oplog.ShardOf(t, f.lg.Shards()); int(shard) < len(spec.StartSeqs) {
			since = spec.StartSeqs[shard]
		}
		_, found, err := f.in.Find(ctx, spec.Event.Dimension, t, since, msgID)
		if err != nil {
			return nil, err
		}
		if found {
			d.Appended++
			d.Recovered++
			continue
		}
		out = append(out, t)
	}
	return out, nil
}
