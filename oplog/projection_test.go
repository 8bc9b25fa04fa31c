package oplog_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/dgraph-io/badger/v4"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogtest"
)

// TestProjectionSplitsTooBigTransactions: when a batch outgrows one
// badger transaction, every record is applied exactly once. The apply
// below counts a record once (a marker key, as the analytics aggregates
// drop duplicate events): had the part of a record written before
// ErrTxnTooBig been committed, its second application would find the
// marker and skip the count.
func TestProjectionSplitsTooBigTransactions(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	const stream, records, keysPerRecord = "BIGTXN", 12, 20_000
	if _, err := js.CreateStream(ctx(t), jetstream.StreamConfig{Name: stream, Subjects: []string{"bigtxn.>"}}); err != nil {
		t.Fatal(err)
	}
	for i := range records {
		if _, err := js.Publish(ctx(t), fmt.Sprintf("bigtxn.%d", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	db, err := oplog.OpenStore(t.TempDir(), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	tooBig := 0
	apply := func(txn *badger.Txn, r *oplog.Record) error {
		marker := fmt.Appendf(nil, "m/%03d", r.Seq)
		if _, err := txn.Get(marker); err == nil {
			return nil
		} else if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		if err := txn.Set(marker, nil); err != nil {
			return err
		}
		for n := range keysPerRecord {
			if err := txn.Set(fmt.Appendf(nil, "k/%03d/%05d", r.Seq, n), nil); err != nil {
				if errors.Is(err, badger.ErrTxnTooBig) {
					tooBig++
				}
				return err
			}
		}
		n, err := oplog.GetUint64(txn, []byte("c/count"))
		if err != nil {
			return err
		}
		return txn.Set([]byte("c/count"), binary.BigEndian.AppendUint64(nil, n+1))
	}
	pr, err := oplog.NewProjection(oplog.ProjectionConfig{Stream: stream, DB: db, JetStream: js,
		Prefixes: [][]byte{[]byte("m/"), []byte("k/"), []byte("c/")}, Apply: apply})
	if err != nil {
		t.Fatal(err)
	}
	oplogtest.RunUntilCleanup(t, "projection", pr.Run)
	if err := pr.CatchUp(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if tooBig == 0 {
		t.Fatalf("no transaction grew too big: the test does not test the split (raise keysPerRecord)")
	}
	var count uint64
	if err := db.View(func(txn *badger.Txn) error {
		count, err = oplog.GetUint64(txn, []byte("c/count"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if count != records {
		t.Fatalf("%d records counted of %d (%d transactions split)", count, records, tooBig)
	}
	t.Logf("%d records counted once each; %d transactions split", count, tooBig)
}
