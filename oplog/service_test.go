package oplog_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/oplog/oplogtest"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

func request(t *testing.T, nc *nats.Conn, subject, ct string, body []byte) *nats.Msg {
	t.Helper()
	m := nats.NewMsg(subject)
	m.Data = body
	if ct != "" {
		m.Header.Set(oplog.HeaderContentType, ct)
	}
	resp, err := nc.RequestMsg(m, 10*time.Second)
	if err != nil {
		t.Fatalf("request %s: %v", subject, err)
	}
	return resp
}

func TestServiceRequestReply(t *testing.T) {
	e := newEnv(t)
	oplogtest.MustRunService(t, e.l)

	// Protobuf.
	body, _ := proto.Marshal(syncEvent("chat", "alice"))
	r := new(oplogpb.AppendReply)
	if err := proto.Unmarshal(request(t, e.nc, oplog.SubjectAppend, "", body).Data, r); err != nil {
		t.Fatal(err)
	}
	if r.Error != nil || len(r.Results) != 1 || r.Results[0].Id == 0 || r.Results[0].Epoch != e.l.Epoch(0) {
		t.Fatalf("protobuf reply %v", r)
	}
	// JSON in, JSON out, with a message id: the retry gets the original id.
	js := `{"kind":"KIND_SYNC","business":"chat","targets":["bob"],"payload":"aGk=","messageId":"j-1"}`
	var first uint64
	for i := range 2 {
		resp := request(t, e.nc, oplog.SubjectAppend, oplog.ContentTypeJSON, []byte(js))
		if resp.Header.Get(oplog.HeaderContentType) != oplog.ContentTypeJSON {
			t.Fatalf("reply content type %q", resp.Header.Get(oplog.HeaderContentType))
		}
		r := new(oplogpb.AppendReply)
		if err := protojson.Unmarshal(resp.Data, r); err != nil {
			t.Fatalf("reply %s: %v", resp.Data, err)
		}
		if r.Error != nil || len(r.Results) != 1 {
			t.Fatalf("json reply %v", r)
		}
		if i == 0 {
			first = r.Results[0].Id
		} else if r.Results[0].Id != first || !r.Results[0].Duplicate {
			t.Fatalf("retry got %v, want id %d marked duplicate", r.Results[0], first)
		}
	}
	// Typed errors, not crashes.
	for _, c := range []struct {
		ct, body string
		want     oplogpb.ErrorCode
	}{
		{"", "\xff\xff\xff", oplogpb.ErrorCode_ERROR_CODE_MALFORMED},
		{oplog.ContentTypeJSON, "{not json", oplogpb.ErrorCode_ERROR_CODE_MALFORMED},
		{oplog.ContentTypeJSON, `{"kind":"KIND_SYNC","business":"chat","targets":["a b"]}`, oplogpb.ErrorCode_ERROR_CODE_INVALID_ID},
		{oplog.ContentTypeJSON, `{"kind":"KIND_SYNC","business":"ghost","targets":["a"]}`, oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_BUSINESS},
		{oplog.ContentTypeJSON, `{"kind":"KIND_SYNC","business":"chat","targets":["a"],"payload":"` + strings.Repeat("QUFB", 400) + `"}`, oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE},
	} {
		r := new(oplogpb.AppendReply)
		resp := request(t, e.nc, oplog.SubjectAppend, c.ct, []byte(c.body))
		if c.ct == oplog.ContentTypeJSON {
			_ = protojson.Unmarshal(resp.Data, r)
		} else {
			_ = proto.Unmarshal(resp.Data, r)
		}
		if r.Error.GetCode() != c.want || len(r.Results) != 0 {
			t.Errorf("body %.40q: got %v, want %v", c.body, r.Error, c.want)
		}
		if err := oplog.ErrorFromPB(r.Error); c.want == oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_BUSINESS && !errors.Is(err, oplog.ErrUnknownBusiness) {
			t.Errorf("ErrorFromPB(%v) = %v, want it to unwrap to ErrUnknownBusiness", r.Error, err)
		}
	}
	// Batch: one reply per event.
	batch, _ := proto.Marshal(&oplogpb.EventBatch{Events: []*oplogpb.Event{syncEvent("chat", "alice"), syncEvent("nope", "alice"), syncEvent("config", "phone")}})
	br := new(oplogpb.AppendBatchReply)
	if err := proto.Unmarshal(request(t, e.nc, oplog.SubjectAppendBatch, "", batch).Data, br); err != nil {
		t.Fatal(err)
	}
	if len(br.Replies) != 3 || br.Replies[0].Error != nil || br.Replies[1].Error.GetCode() != oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_BUSINESS || br.Replies[2].Error != nil {
		t.Fatalf("batch reply %v", br)
	}
}

func TestIngestAndDeadLetter(t *testing.T) {
	e := newEnv(t)
	oplogtest.MustRunService(t, e.l)
	js := e.l.JetStream()
	good, _ := proto.Marshal(&oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: "chat", Targets: []string{"carol"}, Payload: []byte("x"), MessageId: "ing-1"})
	for _, body := range [][]byte{good, good, []byte("\x0a\xff"), mustJSON(t, syncEvent("ghost", "carol"))} {
		m := nats.NewMsg(oplog.SubjectIngest + ".chat")
		m.Data = body
		if len(body) > 0 && body[0] == '{' {
			m.Header.Set(oplog.HeaderContentType, oplog.ContentTypeJSON)
		}
		if _, err := js.PublishMsg(ctx(t), m); err != nil {
			t.Fatalf("ingest publish: %v", err)
		}
	}
	// The valid event lands once (sent twice with one message id).
	deadline := time.Now().Add(10 * time.Second)
	for {
		b := mustBacklog(t, e.in, oplog.BacklogRequest{User: "carol", Device: "d"})
		if len(b.Entries) == 1 && b.Entries[0].MessageId == "ing-1" {
			break
		}
		if len(b.Entries) > 1 || time.Now().After(deadline) {
			t.Fatalf("carol's backlog has %d entries, want 1", len(b.Entries))
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The two bad ones are dead letters with their reason.
	cons, err := js.OrderedConsumer(ctx(t), oplog.StreamDeadLetter, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var codes []string
	for len(codes) < 2 {
		m, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
		if err != nil {
			t.Fatalf("dead letters: got %v, then %v", codes, err)
		}
		if m.Headers().Get(oplog.HeaderError) == "" {
			t.Errorf("dead letter on %s without a reason", m.Subject())
		}
		codes = append(codes, m.Headers().Get(oplog.HeaderErrorCode))
	}
	if codes[0] != "ERROR_CODE_MALFORMED" || codes[1] != "ERROR_CODE_UNKNOWN_BUSINESS" {
		t.Fatalf("dead letter codes %v", codes)
	}
	// The work queue is empty: everything was routed.
	s, _ := js.Stream(ctx(t), oplog.StreamIngest)
	for i := 0; s.CachedInfo().State.Msgs != 0 && i < 100; i++ {
		time.Sleep(50 * time.Millisecond)
		s, _ = js.Stream(ctx(t), oplog.StreamIngest)
	}
	if n := s.CachedInfo().State.Msgs; n != 0 {
		t.Fatalf("ingest stream still holds %d messages", n)
	}
}

func mustJSON(t *testing.T, m proto.Message) []byte {
	data, err := protojson.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestEpochChangesWhenStreamIsRecreated(t *testing.T) {
	_, nc := oplogtest.RunJetStream(t, oplogtest.Options{})
	l1 := oplogtest.MustOpenLog(t, nc, oplog.Config{}, chat)
	in := oplogtest.MustRunInbox(t, l1, "")
	id := mustAppend(t, l1, syncEvent("chat", "erin"))[0].Id
	old := l1.Epoch(0)
	// Reopening keeps the epoch.
	if l2 := oplogtest.MustOpenLog(t, nc, oplog.Config{}); l2.Epoch(0) != old {
		t.Fatalf("reopened epoch %d, want %d", l2.Epoch(0), old)
	}
	// A client at the old epoch asking a log whose stream was recreated is told to reset.
	if err := l1.JetStream().DeleteStream(ctx(t), oplog.StreamOplog(0)); err != nil {
		t.Fatal(err)
	}
	l3 := oplogtest.MustOpenLog(t, nc, oplog.Config{})
	if l3.Epoch(0) == old {
		t.Fatalf("recreated stream kept epoch %d", old)
	}
	in3 := oplogtest.MustRunInbox(t, l3, "")
	mustAppend(t, l3, syncEvent("chat", "erin"))
	b := mustBacklog(t, in3, oplog.BacklogRequest{User: "erin", Device: "d", Points: map[string]oplog.SyncPoint{"chat": {ID: id, Epoch: old}}})
	if len(b.Reset) != 1 || b.Reset[0] != "chat" || len(b.Entries) != 1 || b.Entries[0].Epoch != l3.Epoch(0) {
		t.Fatalf("backlog after recreate: reset %v, %d entries", b.Reset, len(b.Entries))
	}
	_ = in
}
