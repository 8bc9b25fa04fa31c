package oplog

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Key layout of the inbox projection (badger). Ids and business codes never
// contain '/', so prefixes never collide.
//
//	i/<shard>/<u|d>/<target>/<id:8 bytes BE>  Entry (id, epoch, shard not stored)
//	s/<device>/<business>                      sync point: id, epoch (8+8 bytes BE), user
//	w/<user>/<business>                        single-device watermark: id, epoch, user
//	a/<stream>                                 applied stream sequence (8 bytes BE)
func inboxPrefix(shard uint32, dim oplogpb.Dimension, target string) []byte {
	return []byte("i/" + strconv.FormatUint(uint64(shard), 10) + "/" + dimToken(dim) + "/" + target + "/")
}

func syncKey(device, business string) []byte { return []byte("s/" + device + "/" + business) }
func markKey(user, business string) []byte   { return []byte("w/" + user + "/" + business) }

// SyncPoint is the highest id a device has received of one business, with
// the epoch that id belongs to. A recorded sync point also names the user
// the device was bound to when it acked: ids of a user-dimension business
// are only meaningful for that user.
type SyncPoint struct {
	ID    uint64 `json:"id"`
	Epoch uint64 `json:"epoch"`
	User  string `json:"user,omitempty"`
}

// pointValue encodes a recorded sync point: id, epoch (8 bytes BE each),
// then the user.
func pointValue(id, epoch uint64, user string) []byte {
	return append(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, id), epoch), user...)
}

func decodePoint(v []byte) SyncPoint {
	if len(v) < 16 {
		return SyncPoint{}
	}
	return SyncPoint{ID: binary.BigEndian.Uint64(v), Epoch: binary.BigEndian.Uint64(v[8:]), User: string(v[16:])}
}

// InboxConfig configures an Inbox. A zero field takes the default.
type InboxConfig struct {
	// Log is the oplog the inbox projects. Required.
	Log *Log
	// Dir is the badger directory. Required.
	Dir string
	// LocalFeed makes the projection apply the entries this process
	// appends straight from memory, reading the stream only for what it did
	// not append (see projector). It saves a trip through NATS for every
	// entry; it stays correct with other writers, but then reads the stream
	// often. sluiced sets it with its embedded server. Default false.
	LocalFeed bool
	// SoleWriter declares that this process's Log writes every entry of
	// the oplog and ack streams (an embedded server that producers reach
	// through the producer API only). Readers (Backlog, SyncPoints) then
	// wait for what this process stored instead of asking the stream for
	// its last sequence at every call: three JetStream API round trips per
	// backlog read, 12% of a reconnect storm's CPU. Wrong with other
	// writers: their entries would not be waited for. Needs LocalFeed.
	// sluiced sets it with its embedded server. Default false.
	SoleWriter bool
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Inbox is the badger projection of the oplog: per-user and per-device
// inboxes, sync points and single-device watermarks. It is rebuildable by
// replaying the oplog and ack streams (Rebuild). Safe for concurrent use.
type Inbox struct {
	lg    *Log
	db    *badger.DB
	log   zerolog.Logger
	shard []*projector // one per oplog shard
	acks  *projector
	live  *live

	closeOnce sync.Once
	closeErr  error
}

// OpenInbox opens (or creates) the projection in cfg.Dir. Run applies the
// streams to it; Close closes the store.
func OpenInbox(cfg InboxConfig) (*Inbox, error) {
	if cfg.Log == nil || cfg.Dir == "" {
		return nil, errors.New("oplog: InboxConfig.Log and Dir are required")
	}
	if cfg.SoleWriter && !cfg.LocalFeed {
		return nil, errors.New("oplog: InboxConfig.SoleWriter needs LocalFeed")
	}
	in := &Inbox{lg: cfg.Log, log: zerolog.Nop(), live: newLive(cfg.Log.Shards())}
	if cfg.Logger != nil {
		in.log = cfg.Logger.With().Str("component", "inbox").Logger()
	}
	// The projection is rebuilt from the streams, so it needs no fsync:
	// after a crash it resumes from the last applied sequence it wrote.
	// Entries go to the value log, written once in apply order; the LSM
	// tree holds keys and value pointers only. Inbox keys arrive in random
	// target order, so every compaction rewrites the tree: with entries
	// inline that cost 21% of the producer path's CPU at 1,000,000 users
	// and made throughput swing 3x between runs; with pointers it is a few
	// percent (README, Performance). See OpenStore.
	db, err := OpenStore(cfg.Dir, in.log)
	if err != nil {
		return nil, fmt.Errorf("oplog: open inbox: %w", err)
	}
	in.db = db
	js := cfg.Log.JetStream()
	for i := range cfg.Log.Shards() {
		shard := uint32(i)
		p, err := newProjector(StreamOplog(shard), [][]byte{[]byte("i/" + strconv.Itoa(i) + "/")}, db, js,
			func(txn *badger.Txn, r *Record) error { return in.applyEntry(txn, shard, r) }, in.log)
		if err != nil {
			_ = db.Close()
			return nil, err
		}
		p.committed = func(recs []Record) { in.committed(shard, recs) }
		in.live.delivered[shard] = p.applied.Load()
		if cfg.LocalFeed {
			p.withFeed()
			cfg.Log.writers[shard].feedTo(p)
		}
		// After feedTo: an append from now on is recorded by the writer,
		// one before it is in the stream's last sequence.
		if cfg.SoleWriter {
			if err := p.soleWriter(); err != nil {
				_ = db.Close()
				return nil, err
			}
		}
		in.shard = append(in.shard, p)
	}
	in.acks, err = newProjector(StreamAcks, [][]byte{[]byte("s/"), []byte("w/")}, db, js, in.applyAck, in.log)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	if cfg.SoleWriter {
		if err := in.acks.soleWriter(); err != nil {
			_ = db.Close()
			return nil, err
		}
	}
	if err := in.subscribeTransient(); err != nil {
		_ = db.Close()
		return nil, err
	}
	return in, nil
}

// Log is the oplog the inbox projects.
func (in *Inbox) Log() *Log { return in.lg }

// Run applies the streams to the projection until ctx ends.
func (in *Inbox) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, p := range in.projectors() {
		g.Go(func() error { return p.run(ctx) })
	}
	g.Go(func() error { return in.gc(ctx) })
	g.Go(func() error { return in.dispatchTransient(ctx) })
	return g.Wait()
}

// gc runs badger's value-log garbage collection now and then.
func (in *Inbox) gc(ctx context.Context) error {
	t := time.NewTicker(5 * time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			for in.db.RunValueLogGC(0.5) == nil {
			}
		}
	}
}

func (in *Inbox) projectors() []*projector { return append(slices.Clone(in.shard), in.acks) }

// Close ends every watch and closes the store. Idempotent; call after Run
// has returned.
func (in *Inbox) Close() error {
	in.closeOnce.Do(func() {
		for _, w := range in.live.all() {
			w.Stop()
		}
		if err := in.live.sub.Unsubscribe(); err != nil && in.lg.nc.IsConnected() {
			in.log.Warn().Err(err).Msg("live subscription not removed")
		}
		in.closeErr = in.db.Close()
	})
	return in.closeErr
}

// applyEntry projects one oplog message. It stores the message body as
// is; target and dimension come from the subject and the end of validity
// from the Nats-TTL header and the stored time, so the entry need not be
// decoded here.
func (in *Inbox) applyEntry(txn *badger.Txn, shard uint32, r *Record) error {
	seq := r.Seq
	_, dim, target, business, err := ParseOplogSubject(r.Subject)
	if err != nil || !ValidID(target) {
		// Only Sluice writes these streams; a bad Record is skipped (and
		// logged) rather than stopping the projection for good.
		in.log.Error().Uint64("seq", seq).Str("stream", StreamOplog(shard)).Msg("unreadable oplog entry skipped")
		return nil
	}
	var ttl time.Duration
	if v := r.TTL; v != "" {
		d, err := time.ParseDuration(v)
		if n, nerr := strconv.ParseInt(v, 10, 64); err != nil && nerr == nil {
			d, err = time.Duration(n)*time.Second, nil // the server's other form: whole seconds
		}
		if err != nil {
			in.log.Error().Uint64("seq", seq).Str("stream", StreamOplog(shard)).Msg("oplog entry with unreadable ttl skipped")
			return nil
		}
		if ttl = time.Until(r.Stored.Add(d)); ttl <= 0 {
			return nil // expired already: never delivered, not kept
		}
	}
	collapse := r.Collapse != "" && ValidID(r.Collapse)
	expired := false
	if collapse && ttl > 0 {
		// A collapsing entry's Nats-TTL is its validity plus
		// CollapseGrace (see Log.message), rounded up to a second: its
		// validity is that, less the grace, without decoding the entry.
		// (Backlog reads check the entry's own ExpiresAt too.)
		ttl -= CollapseGrace
		expired = ttl <= 0
	}
	if !expired {
		key := binary.BigEndian.AppendUint64(inboxPrefix(shard, dim, target), seq)
		be := badger.NewEntry(key, r.Data)
		if ttl > 0 {
			be = be.WithTTL(ttl)
		}
		if err := txn.SetEntry(be); err != nil {
			return err
		}
	}
	if collapse {
		return setCollapse(txn, collapseKey(shard, dim, target, business, r.Collapse), seq, ttl, expired)
	}
	return nil
}

// CollapseGrace is how long past its validity a collapsing entry stays
// stored: an older entry with the same key stays replaced if its validity
// ends no later than that (30 days, the longest push validity).
const CollapseGrace = 30 * 24 * time.Hour

// collapseKey indexes the newest entry of a target and business with a
// collapse key: i/<shard>/k/<dim>/<target>/<business>/<key> → its id. It
// lives under the shard's prefix, so rebuilds and digests cover it.
func collapseKey(shard uint32, dim oplogpb.Dimension, target, business, key string) []byte {
	return []byte("i/" + strconv.FormatUint(uint64(shard), 10) + "/k/" + dimToken(dim) + "/" + target + "/" + business + "/" + key)
}

// setCollapse records seq as the newest entry of a collapse key. The index
// lives as long as the longest-lived entry it supersedes could: an older
// entry that outlives the newer one stays replaced. An entry applied
// already expired (a rebuild) still replaces the older ones, if any.
func setCollapse(txn *badger.Txn, key []byte, seq uint64, ttl time.Duration, expired bool) error {
	if ttl > 0 || expired {
		it, err := txn.Get(key)
		switch {
		case errors.Is(err, badger.ErrKeyNotFound) && expired:
			return nil // nothing older to replace
		case err == nil && it.ExpiresAt() == 0:
			ttl = 0
		case err == nil:
			ttl = max(ttl, time.Until(time.Unix(int64(it.ExpiresAt()), 0)))
			if ttl <= 0 {
				return nil
			}
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
	}
	be := badger.NewEntry(key, binary.BigEndian.AppendUint64(nil, seq))
	if ttl > 0 {
		be = be.WithTTL(ttl)
	}
	return txn.SetEntry(be)
}

// applyAck projects one ack: the device's sync point is the last ack in
// stream order, the user's single-device watermark the highest.
func (in *Inbox) applyAck(txn *badger.Txn, r *Record) error {
	seq := r.Seq
	a := new(oplogpb.Ack)
	if err := proto.Unmarshal(r.Data, a); err != nil || !ValidID(a.Device) || !ValidBusiness(a.Business) {
		in.log.Error().Uint64("seq", seq).Str("stream", StreamAcks).Msg("unreadable ack skipped")
		return nil
	}
	val := pointValue(a.Id, a.Epoch, a.User)
	if err := txn.Set(syncKey(a.Device, a.Business), val); err != nil {
		return err
	}
	if a.User == "" {
		return nil
	}
	cur, err := getPoint(txn, markKey(a.User, a.Business))
	if err != nil {
		return err
	}
	if cur.Epoch == a.Epoch && cur.ID >= a.Id {
		return nil
	}
	return txn.Set(markKey(a.User, a.Business), val)
}

func getPoint(txn *badger.Txn, key []byte) (SyncPoint, error) {
	it, err := txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return SyncPoint{}, nil
	}
	if err != nil {
		return SyncPoint{}, err
	}
	var sp SyncPoint
	err = it.Value(func(v []byte) error {
		sp = decodePoint(v)
		return nil
	})
	return sp, err
}

// targetOf returns the target (the user or the device, by the business's
// dimension) whose inbox holds business b's entries, and its shard.
func (in *Inbox) targetOf(b *oplogpb.Business, user, device string) (target string, shard uint32) {
	if businessDim(b) == oplogpb.Dimension_DIMENSION_DEVICE {
		return device, ShardOf(device, in.lg.Shards())
	}
	return user, ShardOf(user, in.lg.Shards())
}

// Ack records that a device has received every entry of each business up to
// its sync point. Points of an old epoch are refused with ErrEpochMismatch;
// a point at or below the recorded one is ignored (acks only move forward).
// It returns once the acks are durable in the ACKS stream.
func (in *Inbox) Ack(ctx context.Context, user, device string, points map[string]SyncPoint) error {
	if err := checkID("device", device); err != nil {
		return err
	}
	if user != "" {
		if err := checkID("user", user); err != nil {
			return err
		}
	}
	current, err := in.SyncPoints(ctx, device)
	if err != nil {
		return err
	}
	// Check every point before recording any: an ack is all or nothing.
	var acks []*oplogpb.Ack
	for code, sp := range points {
		b, ok := in.lg.Business(code)
		if !ok {
			return fmt.Errorf("ack of %q: %w", clip(code), ErrUnknownBusiness)
		}
		target, shard := in.targetOf(b, user, device)
		if target == "" {
			return fmt.Errorf("ack of user business %q without a user: %w", code, ErrInvalid)
		}
		if sp.Epoch != in.lg.Epoch(shard) {
			return fmt.Errorf("ack of %q: epoch %d, stream has %d: %w", code, sp.Epoch, in.lg.Epoch(shard), ErrEpochMismatch)
		}
		cur := current[code]
		sameInbox := businessDim(b) == oplogpb.Dimension_DIMENSION_DEVICE || cur.User == user
		if sameInbox && cur.Epoch == sp.Epoch && cur.ID >= sp.ID {
			continue
		}
		acks = append(acks, &oplogpb.Ack{User: user, Device: device, Business: code, Id: sp.ID, Epoch: sp.Epoch, At: timestamppb.Now()})
	}
	var futs []jetstream.PubAckFuture
	for _, a := range acks {
		data, err := proto.Marshal(a)
		if err != nil {
			return fmt.Errorf("oplog: marshal ack: %w", err)
		}
		fut, err := in.lg.JetStream().PublishAsync(SubjectAck(device, a.Business, user), data)
		if err != nil {
			return fmt.Errorf("ack: %v: %w", err, ErrUnavailable)
		}
		futs = append(futs, fut)
	}
	for _, f := range futs {
		select {
		case pa := <-f.Ok():
			in.acks.stored(pa.Sequence)
		case err := <-f.Err():
			return fmt.Errorf("ack: %v: %w", err, ErrUnavailable)
		case <-ctx.Done():
			return fmt.Errorf("ack: %v: %w", ctx.Err(), ErrUnavailable)
		}
	}
	return nil
}

// SyncPoints returns the recorded sync points of a device, by business.
func (in *Inbox) SyncPoints(ctx context.Context, device string) (map[string]SyncPoint, error) {
	if err := checkID("device", device); err != nil {
		return nil, err
	}
	if err := in.acks.catchUp(ctx); err != nil {
		return nil, err
	}
	out := make(map[string]SyncPoint)
	prefix := []byte("s/" + device + "/")
	err := in.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			v, err := it.Item().ValueCopy(nil)
			if err != nil {
				return err
			}
			if len(v) >= 16 {
				out[string(it.Item().Key()[len(prefix):])] = decodePoint(v)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("oplog: read sync points: %w", err)
	}
	return out, nil
}

// BacklogRequest asks for the entries a device has not received.
type BacklogRequest struct {
	// User bound to the device; empty for a device without a user, which
	// then only gets device-dimension businesses.
	User string
	// Device. Required.
	Device string
	// Points are the client's sync points by business. A business the
	// client does not name starts from the device's recorded sync point.
	Points map[string]SyncPoint
	// Attrs are matched against entry conditions.
	Attrs Attrs
	// Limit is the most entries returned. Default 10,000.
	Limit int
	// Businesses restricts the backlog to these business codes (a bucket);
	// nil means every registered business.
	Businesses []string
	// Recorded are the device's recorded sync points (SyncPoints), when
	// the caller read them already: a round of several bucket reads reads
	// them once. Nil: Backlog reads them (and counts the read).
	Recorded map[string]SyncPoint
}

// Backlog is the answer to a BacklogRequest.
type Backlog struct {
	// Entries in id order within each business; entries of one shard are
	// in id order overall.
	Entries []*oplogpb.Entry
	// More is set when Limit cut the backlog: ask again from the new points.
	More bool
	// Reset names businesses whose client sync point was of an old epoch:
	// their backlog starts from the beginning of the current epoch.
	Reset []string
	// Reads is the number of store reads the backlog took: one per inbox
	// (user, device) holding a business asked for, plus the device's sync
	// points unless the request carried them.
	Reads int
}

// Backlog returns the entries the device has not received, after waiting
// until the projection holds every entry stored before the call. Expired
// entries, entries whose conditions the client does not match, and
// single-device entries another device of the user has acked are left out.
func (in *Inbox) Backlog(ctx context.Context, req BacklogRequest) (*Backlog, error) {
	if err := checkID("device", req.Device); err != nil {
		return nil, err
	}
	if req.User != "" {
		if err := checkID("user", req.User); err != nil {
			return nil, err
		}
	}
	if req.Limit <= 0 {
		req.Limit = 10_000
	}
	out := &Backlog{}
	stored := req.Recorded
	if stored == nil {
		var err error
		if stored, err = in.SyncPoints(ctx, req.Device); err != nil {
			return nil, err
		}
		out.Reads++
	}
	// Group the businesses by the inbox they live in: at most two scans.
	type scan struct {
		shard  uint32
		dim    oplogpb.Dimension
		target string
		from   map[string]uint64 // business -> first id wanted
	}
	scans := map[oplogpb.Dimension]*scan{}
	var businesses []*oplogpb.Business
	if req.Businesses == nil {
		businesses = in.lg.Businesses()
	} else {
		for _, code := range req.Businesses {
			if b, ok := in.lg.Business(code); ok {
				businesses = append(businesses, b)
			}
		}
	}
	for _, b := range businesses {
		target, shard := in.targetOf(b, req.User, req.Device)
		if target == "" {
			continue
		}
		dim := businessDim(b)
		sc := scans[dim]
		if sc == nil {
			sc = &scan{shard: shard, dim: dim, target: target, from: map[string]uint64{}}
			scans[dim] = sc
		}
		epoch := in.lg.Epoch(shard)
		sp, given := req.Points[b.Code]
		if !given {
			sp = stored[b.Code]
			if dim == oplogpb.Dimension_DIMENSION_USER && sp.User != req.User {
				// Acked while another user was bound to the device: that
				// user's ids say nothing about this one's inbox.
				sp = SyncPoint{}
			}
		}
		if sp.Epoch != epoch {
			if given && sp.ID != 0 {
				out.Reset = append(out.Reset, b.Code)
			}
			sp = SyncPoint{}
		}
		sc.from[b.Code] = sp.ID + 1
	}
	slices.Sort(out.Reset)
	now := time.Now()
	for _, dim := range []oplogpb.Dimension{oplogpb.Dimension_DIMENSION_USER, oplogpb.Dimension_DIMENSION_DEVICE} {
		sc := scans[dim]
		if sc == nil {
			continue
		}
		if err := in.shard[sc.shard].catchUp(ctx); err != nil {
			return nil, err
		}
		lowest := uint64(0)
		for _, id := range sc.from {
			if lowest == 0 || id < lowest {
				lowest = id
			}
		}
		epoch := in.lg.Epoch(sc.shard)
		out.Reads++
		err := in.db.View(func(txn *badger.Txn) error {
			marks := map[string]SyncPoint{}
			mark := func(biz string) (SyncPoint, error) {
				if sp, ok := marks[biz]; ok {
					return sp, nil
				}
				sp, err := getPoint(txn, markKey(req.User, biz))
				marks[biz] = sp
				return sp, err
			}
			prefix := inboxPrefix(sc.shard, sc.dim, sc.target)
			it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 256})
			defer it.Close()
			for it.Seek(binary.BigEndian.AppendUint64(bytes.Clone(prefix), lowest)); it.Valid(); it.Next() {
				key := it.Item().Key()
				id := binary.BigEndian.Uint64(key[len(prefix):])
				e := new(oplogpb.Entry)
				if err := it.Item().Value(func(v []byte) error { return proto.Unmarshal(v, e) }); err != nil {
					return fmt.Errorf("entry %d: %w", id, err)
				}
				from, known := sc.from[e.Business]
				if !known || id < from {
					continue
				}
				if e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(now) {
					continue
				}
				if !Match(e.Conditions, req.Attrs) {
					continue
				}
				if e.CollapseKey != "" {
					newest, err := GetUint64(txn, collapseKey(sc.shard, sc.dim, sc.target, e.Business, e.CollapseKey))
					if err != nil {
						return err
					}
					if newest > id {
						continue // replaced by a newer entry with the same key
					}
				}
				if e.DeviceMode == oplogpb.DeviceMode_DEVICE_MODE_SINGLE && req.User != "" {
					w, err := mark(e.Business)
					if err != nil {
						return err
					}
					if w.Epoch == epoch && id <= w.ID {
						continue
					}
				}
				if len(out.Entries) == req.Limit {
					out.More = true
					return nil
				}
				e.Id, e.Epoch, e.Shard = id, epoch, sc.shard
				out.Entries = append(out.Entries, e)
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("oplog: read backlog: %w", err)
		}
		if out.More {
			break
		}
	}
	return out, nil
}

// Find looks in a target's inbox for an entry of a producer message id
// stored after sequence since, and returns its id. Fanout uses it to tell,
// after a crash longer than the duplicate window, whether a recipient got
// a job's entry already. It scans the inbox from since: keep since close.
func (in *Inbox) Find(ctx context.Context, dim oplogpb.Dimension, target string, since uint64, messageID string) (uint64, bool, error) {
	if err := checkID("target", target); err != nil {
		return 0, false, err
	}
	shard := ShardOf(target, in.lg.Shards())
	if err := in.shard[shard].catchUp(ctx); err != nil {
		return 0, false, err
	}
	prefix := inboxPrefix(shard, dim, target)
	var found uint64
	err := in.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: prefix, PrefetchValues: true, PrefetchSize: 64})
		defer it.Close()
		for it.Seek(binary.BigEndian.AppendUint64(bytes.Clone(prefix), since+1)); it.Valid(); it.Next() {
			e := new(oplogpb.Entry)
			if err := it.Item().Value(func(v []byte) error { return proto.Unmarshal(v, e) }); err != nil {
				return err
			}
			if e.MessageId == messageID {
				found = binary.BigEndian.Uint64(it.Item().Key()[len(prefix):])
				return nil
			}
		}
		return nil
	})
	if err != nil {
		return 0, false, fmt.Errorf("oplog: find in inbox: %w", err)
	}
	return found, found != 0, nil
}

// LastSeq returns the highest sequence the shard's projection has
// applied; a job that records it at its start can later Find its entries
// from there.
func (in *Inbox) LastSeq(shard uint32) uint64 { return in.shard[shard].applied.Load() }

// Projections lists the names of the projections Rebuild takes.
func (in *Inbox) Projections() []string {
	var names []string
	for _, p := range in.projectors() {
		names = append(names, p.name)
	}
	return names
}

func (in *Inbox) projector(name string) (*projector, error) {
	for _, p := range in.projectors() {
		if p.name == name {
			return p, nil
		}
	}
	return nil, fmt.Errorf("projection %q: want one of %v: %w", clip(name), in.Projections(), ErrInvalid)
}

// Progress reports a rebuild under way.
type Progress struct {
	Projection string  `json:"projection"`
	Applied    uint64  `json:"applied"`
	Target     uint64  `json:"target"`
	Rate       float64 `json:"rate"` // messages per second
}

// RebuildSummary reports a finished rebuild.
type RebuildSummary struct {
	Projection string        `json:"projection"`
	From       uint64        `json:"from"`
	Applied    uint64        `json:"applied"`
	Messages   uint64        `json:"messages"`
	Took       time.Duration `json:"took"`
	Digest     string        `json:"digest"`
}

// Rebuild replays a projection from sequence from (0 or 1: drop it and
// replay everything), reporting progress about every interval, until it
// has applied everything the stream held at the call. Live traffic goes
// on meanwhile. Inbox.Run must be running.
func (in *Inbox) Rebuild(ctx context.Context, name string, from uint64, interval time.Duration, progress func(Progress)) (*RebuildSummary, error) {
	p, err := in.projector(name)
	if err != nil {
		return nil, err
	}
	return p.rebuild(ctx, from, interval, progress)
}

// Digest returns a SHA-256 over every key and value a projection owns, in
// key order: two rebuilds of the same stream give the same digest.
func (in *Inbox) Digest(ctx context.Context, name string) (string, error) {
	p, err := in.projector(name)
	if err != nil {
		return "", err
	}
	return p.digest(ctx)
}

// Applied returns the stream sequence each projection has applied.
func (in *Inbox) Applied() map[string]uint64 {
	out := map[string]uint64{}
	for _, p := range in.projectors() {
		out[p.name] = p.applied.Load()
	}
	return out
}

// CatchUp blocks until every projection holds what its stream held at the
// call.
func (in *Inbox) CatchUp(ctx context.Context) error {
	for _, p := range in.projectors() {
		if err := p.catchUp(ctx); err != nil {
			return err
		}
	}
	return nil
}

// badgerLogger bridges badger's logger to zerolog.
type badgerLogger struct{ l zerolog.Logger }

func (b badgerLogger) Errorf(f string, a ...any)   { b.l.Error().Msgf(f, a...) }
func (b badgerLogger) Warningf(f string, a ...any) { b.l.Warn().Msgf(f, a...) }
func (b badgerLogger) Infof(f string, a ...any)    { b.l.Debug().Msgf(f, a...) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.l.Trace().Msgf(f, a...) }

// GetUint64 reads a big-endian uint64 stored under key (a counter, an
// id): 0 when the key is absent. Projections share it.
func GetUint64(txn *badger.Txn, key []byte) (uint64, error) {
	it, err := txn.Get(key)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var n uint64
	err = it.Value(func(v []byte) error {
		if len(v) == 8 {
			n = binary.BigEndian.Uint64(v)
		}
		return nil
	})
	return n, err
}
