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

// TestProjectionProgressKeyOverflow: Records that fill a transaction to
// its last entry leave no room for the progress key; the projector cuts
// the transaction before the last Record instead of retrying forever.
func TestProjectionProgressKeyOverflow(t *testing.T) {
	// The first Record takes all but one of a transaction's sets, the
	// second the last one; then the batch ends (the progress key does
	// not fit) or a third Record follows (it does not fit, and the
	// progress key does not fit with the first two).
	for _, tail := range [][]int{{1}, {1, 5}} {
		t.Run(fmt.Sprint(len(tail)+1, "-records"), func(t *testing.T) { progressKeyOverflow(t, tail) })
	}
}

func progressKeyOverflow(t *testing.T, tail []int) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	db, err := oplog.OpenStore(t.TempDir(), zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	// A transaction holds MaxBatchCount-2 sets (its count starts at 1
	// and must stay under the limit).
	sizes := append([]int{int(db.MaxBatchCount()) - 3}, tail...)
	const stream = "FULLTXN"
	if _, err := js.CreateStream(ctx(t), jetstream.StreamConfig{Name: stream, Subjects: []string{"fulltxn.>"}}); err != nil {
		t.Fatal(err)
	}
	for i, n := range sizes {
		if _, err := js.Publish(ctx(t), fmt.Sprintf("fulltxn.%d", i), []byte(fmt.Sprint(n))); err != nil {
			t.Fatal(err)
		}
	}
	applied := map[uint64]int{}
	apply := func(txn *badger.Txn, r *oplog.Record) error {
		var n int
		if _, err := fmt.Sscan(string(r.Data), &n); err != nil {
			return err
		}
		for k := range n {
			if err := txn.Set(fmt.Appendf(nil, "k/%d/%06d", r.Seq, k), nil); err != nil {
				return err
			}
		}
		applied[r.Seq]++
		return nil
	}
	pr, err := oplog.NewProjection(oplog.ProjectionConfig{Stream: stream, DB: db, JetStream: js, Prefixes: [][]byte{[]byte("k/")}, Apply: apply})
	if err != nil {
		t.Fatal(err)
	}
	oplogtest.RunUntilCleanup(t, "projection", pr.Run)
	if err := pr.CatchUp(ctx(t)); err != nil {
		t.Fatalf("%v (applications per record: %v)", err, applied)
	}
	var keys int
	if err := db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("k/")})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			keys++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	want := 0
	for _, n := range sizes {
		want += n
	}
	if keys != want {
		t.Fatalf("%d keys, want %d", keys, want)
	}
	t.Logf("%d keys; applications per record %v", keys, applied)
}
