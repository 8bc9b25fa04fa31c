package delivery

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// StreamReceipts holds push receipts, one message per push, state and
// device (sluice.receipt.<push>.<state>.<device>, last one kept), and each
// push's record (sluice.receipt.<push>.targeted).
const StreamReceipts = "SLUICE_RECEIPTS"

const subjectReceipts = "sluice.receipt."

// receiptStates name the receipt subjects' state tokens.
var receiptStates = map[deliverypb.ReceiptState]string{
	deliverypb.ReceiptState_RECEIPT_STATE_SENT:      "sent",
	deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED: "delivered",
	deliverypb.ReceiptState_RECEIPT_STATE_OPENED:    "opened",
}

// stateOffline marks a device a push was handed to through its vendor
// channel (counted in Funnel.offline, beside a sent receipt).
const stateOffline = "offline"

// receiptsMaxAge is how long receipts and push records are kept, in the
// stream and in the projection alike (so a rebuild gives the same funnel).
const receiptsMaxAge = MaxPushValidity + 5*24*time.Hour

// receiptQueue bounds the receipts waiting to be published: Sent runs on
// gateways' delivery paths and must never block, so beyond it receipts are
// dropped (and counted).
const receiptQueue = 1 << 16

// receipts records push receipts as events and projects them into the
// funnel: per push and state, the devices (presence keys) and their count.
type receipts struct {
	js      jetstream.JetStream
	db      *badger.DB
	proj    *oplog.Projection
	lg      zerolog.Logger
	queue   chan string // subjects to publish (receipts carry no body)
	dropped atomic.Int64
}

// Projection keys: r/<push>/<state>/<device> presence, c/<push>/<state>
// count, p/<push> the PushRecord.
var (
	receiptPrefixes = [][]byte{[]byte("r/"), []byte("c/"), []byte("p/")}
)

func openReceipts(ctx context.Context, l *oplog.Log, dir string, lg zerolog.Logger) (*receipts, error) {
	if _, err := l.EnsureStream(ctx, jetstream.StreamConfig{
		Name:              StreamReceipts,
		Description:       "Sluice push receipts: sent, delivered and opened, per push and device",
		Subjects:          []string{subjectReceipts + ">"},
		Storage:           jetstream.FileStorage,
		Replicas:          l.Replicas(),
		MaxMsgsPerSubject: 1,
		MaxAge:            receiptsMaxAge,
	}); err != nil {
		return nil, err
	}
	db, err := oplog.OpenStore(dir, lg)
	if err != nil {
		return nil, err
	}
	rc := &receipts{js: l.JetStream(), db: db, lg: lg, queue: make(chan string, receiptQueue)}
	rc.proj, err = oplog.NewProjection(oplog.ProjectionConfig{Stream: StreamReceipts, DB: db, JetStream: rc.js,
		Prefixes: receiptPrefixes, Apply: rc.apply, Logger: &lg})
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return rc, nil
}

// apply projects one receipt or push record. Every key of a push expires
// with its record, when the stream drops it (receiptsMaxAge after it was
// stored). Receipts of a push without a record (one never sent, or
// reported by a device making ids up) count nothing.
func (rc *receipts) apply(txn *badger.Txn, r *oplog.Record) error {
	rest, _ := strings.CutPrefix(r.Subject, subjectReceipts)
	parts := strings.Split(rest, ".")
	switch {
	case len(parts) == 2 && parts[1] == "targeted":
		ttl := receiptsMaxAge - time.Since(r.Stored)
		if ttl <= 0 {
			return nil
		}
		return txn.SetEntry(badger.NewEntry([]byte("p/"+parts[0]), r.Data).WithTTL(ttl))
	case len(parts) == 3:
		rec, err := txn.Get([]byte("p/" + parts[0]))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		} else if err != nil {
			return err
		}
		ttl := time.Until(time.Unix(int64(rec.ExpiresAt()), 0))
		if ttl <= 0 {
			return nil
		}
		presence := []byte("r/" + parts[0] + "/" + parts[1] + "/" + parts[2])
		if _, err := txn.Get(presence); err == nil {
			return nil // counted already
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		if err := txn.SetEntry(badger.NewEntry(presence, nil).WithTTL(ttl)); err != nil {
			return err
		}
		count := []byte("c/" + parts[0] + "/" + parts[1])
		n, err := oplog.GetUint64(txn, count)
		if err != nil {
			return err
		}
		return txn.SetEntry(badger.NewEntry(count, binary.BigEndian.AppendUint64(nil, n+1)).WithTTL(ttl))
	}
	rc.lg.Warn().Uint64("seq", r.Seq).Str("subject", r.Subject).Msg("receipt skipped: malformed subject")
	return nil
}

// run publishes queued receipts and runs the projection until ctx ends.
func (rc *receipts) run(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		rc.publish(ctx)
	}()
	err := rc.proj.Run(ctx)
	<-done
	return err
}

// publish drains the queue: each receipt is an empty message whose
// subject says it all, deduplicated by JetStream (the subject is its
// message id) and kept once per subject.
func (rc *receipts) publish(ctx context.Context) {
	sampled := rc.lg.Sample(&zerolog.BurstSampler{Burst: 1, Period: 10 * time.Second})
	for {
		select {
		case <-ctx.Done():
			return
		case subj := <-rc.queue:
			if _, err := rc.js.PublishAsync(subj, nil, jetstream.WithMsgID(subj)); err != nil {
				sampled.Warn().Err(err).Str("subject", subj).Msg("receipt not published")
			}
		}
	}
}

// record queues one receipt; it never blocks.
func (rc *receipts) record(push, state, device string) {
	if !oplog.ValidID(push) || !oplog.ValidID(device) {
		return
	}
	select {
	case rc.queue <- subjectReceipts + push + "." + state + "." + device:
	default:
		rc.dropped.Add(1)
	}
}

// has reports whether the projection holds a receipt.
func (rc *receipts) has(push, state, device string) (bool, error) {
	found := false
	err := rc.db.View(func(txn *badger.Txn) error {
		_, err := txn.Get([]byte("r/" + push + "/" + state + "/" + device))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		found = err == nil
		return err
	})
	return found, err
}

func (rc *receipts) close() error { return rc.db.Close() }

// errNoReceipts: the node keeps no receipts (Config.Dir unset).
var errNoReceipts = fmt.Errorf("delivery: this node keeps no push receipts (no Config.Dir): %w", oplog.ErrInvalid)

// Sent records that a push entry was handed to a device's link. Gateways
// call it for every push entry they send; it never blocks.
func (d *Delivery) Sent(device string, e *oplogpb.Entry) {
	if d.rc == nil {
		return
	}
	if id := PushIDOf(e); id != "" {
		d.rc.record(id, receiptStates[deliverypb.ReceiptState_RECEIPT_STATE_SENT], device)
	}
}

// Received records a device's receipt (delivered or opened). It never
// blocks; a receipt of another state is ignored.
func (d *Delivery) Received(device string, r *deliverypb.Receipt) {
	if d.rc == nil || r == nil {
		return
	}
	if r.State != deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED && r.State != deliverypb.ReceiptState_RECEIPT_STATE_OPENED {
		return
	}
	d.rc.record(r.PushId, receiptStates[r.State], device)
}

// recordPush stores a push's record, what its funnel counts against.
func (d *Delivery) recordPush(ctx context.Context, rec *deliverypb.PushRecord) error {
	if d.rc == nil {
		return nil
	}
	data, err := proto.Marshal(rec)
	if err != nil {
		return err
	}
	subj := subjectReceipts + rec.PushId + ".targeted"
	if _, err := d.rc.js.Publish(ctx, subj, data, jetstream.WithMsgID(subj)); err != nil {
		return fmt.Errorf("push %s: record: %v: %w", rec.PushId, err, oplog.ErrUnavailable)
	}
	return nil
}

// Funnel returns what became of a push: targeted, sent, delivered, opened
// and expired, once the projection holds every receipt stored before the
// call. Errors: oplog.ErrNotFound for a push never sent (or older than
// the receipts kept), oplog.ErrInvalid on a node without receipts.
func (d *Delivery) Funnel(ctx context.Context, push string) (*deliverypb.Funnel, error) {
	if d.rc == nil {
		return nil, errNoReceipts
	}
	if !oplog.ValidID(push) {
		return nil, fmt.Errorf("push id %q: %w", clip(push), oplog.ErrInvalidID)
	}
	if err := d.rc.proj.CatchUp(ctx); err != nil {
		return nil, fmt.Errorf("funnel: %v: %w", err, oplog.ErrUnavailable)
	}
	f := &deliverypb.Funnel{PushId: push, Recalled: d.ctl.Snapshot().recalled[push]}
	rec := &deliverypb.PushRecord{}
	found := false
	err := d.rc.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get([]byte("p/" + push))
		if err == nil {
			found = true
			if err := it.Value(func(v []byte) error { return proto.Unmarshal(v, rec) }); err != nil {
				return err
			}
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		for state, to := range map[string]*uint64{"sent": &f.Sent, "delivered": &f.Delivered, "opened": &f.Opened, stateOffline: &f.Offline} {
			if *to, err = oplog.GetUint64(txn, []byte("c/"+push+"/"+state)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("funnel: %w", err)
	}
	if !found {
		return nil, fmt.Errorf("push %s: no record: %w", push, oplog.ErrNotFound)
	}
	f.Targeted, f.ExpiresMs, f.TargetedDevices = rec.Targeted, rec.ExpiresMs, rec.TargetedDevices
	if d.cfg.Now().UnixMilli() >= rec.ExpiresMs && rec.Targeted > f.Delivered {
		f.Expired = rec.Targeted - f.Delivered
	}
	return f, nil
}

// ReceiptsDropped counts receipts dropped because the queue was full.
func (d *Delivery) ReceiptsDropped() int64 {
	if d.rc == nil {
		return 0
	}
	return d.rc.dropped.Load()
}
