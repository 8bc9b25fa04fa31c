package fanout

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// call sends a request, protobuf or protojson, and decodes the reply.
func call(t *testing.T, ctx context.Context, nc *nats.Conn, subject string, json bool, req, reply proto.Message) {
	t.Helper()
	m := nats.NewMsg(subject)
	var err error
	if json {
		m.Header.Set(oplog.HeaderContentType, oplog.ContentTypeJSON)
		m.Data, err = protojson.Marshal(req)
	} else {
		m.Data, err = proto.Marshal(req)
	}
	if err != nil {
		t.Fatal(err)
	}
	callRaw(t, ctx, nc, m, reply)
}

func callRaw(t *testing.T, ctx context.Context, nc *nats.Conn, m *nats.Msg, reply proto.Message) {
	t.Helper()
	r, err := nc.RequestMsgWithContext(ctx, m)
	if err != nil {
		t.Fatalf("%s: %v", m.Subject, err)
	}
	if r.Header.Get(oplog.HeaderContentType) == oplog.ContentTypeJSON {
		err = protojson.Unmarshal(r.Data, reply)
	} else {
		err = proto.Unmarshal(r.Data, reply)
	}
	if err != nil {
		t.Fatalf("%s reply: %v", m.Subject, err)
	}
}

func TestService(t *testing.T) {
	e := mustEnv(t, envOptions{})
	s, err := NewService(ServiceConfig{Fanout: e.f})
	if err != nil {
		t.Fatal(err)
	}
	runUntil(t, "service", s.Run)
	<-s.Ready()
	ctx := ctxFor(t, 30*time.Second)
	nc := e.nc

	// A list job over the API, in JSON.
	var jr fanoutpb.JobReply
	call(t, ctx, nc, SubjectCreate, true, &fanoutpb.CreateRequest{Job: listJob("api-job")}, &jr)
	if jr.Error != nil || jr.Status.GetState() != fanoutpb.State_STATE_PENDING {
		t.Fatalf("create: %v", &jr)
	}
	ids := users("a", 0, 250)
	for n := range 3 {
		part := ids[n*100 : min(n*100+100, len(ids))]
		jr.Reset()
		call(t, ctx, nc, SubjectAdd, n == 1, &fanoutpb.AddRequest{Job: "api-job", N: uint32(n), Ids: part}, &jr)
		if jr.Error != nil {
			t.Fatalf("add %d: %v", n, jr.Error)
		}
	}
	jr.Reset()
	call(t, ctx, nc, SubjectSeal, false, &fanoutpb.SealRequest{Job: "api-job", Chunks: 3}, &jr)
	if jr.Error != nil || !jr.Status.GetSealed() {
		t.Fatalf("seal: %v", &jr)
	}
	for {
		jr.Reset()
		call(t, ctx, nc, SubjectStatus, false, &fanoutpb.JobRequest{Job: "api-job"}, &jr)
		if jr.Error != nil {
			t.Fatalf("status: %v", jr.Error)
		}
		if jr.Status.State == fanoutpb.State_STATE_DONE {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("job not done: %v", jr.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if jr.Status.Done != 250 || jr.Status.Total != 250 {
		t.Errorf("status %v; want 250 of 250", jr.Status)
	}
	var lr fanoutpb.ListReply
	call(t, ctx, nc, SubjectList, true, &fanoutpb.ListRequest{}, &lr)
	if lr.Error != nil || len(lr.Jobs) != 1 || lr.Jobs[0].Job != "api-job" {
		t.Errorf("list: %v", &lr)
	}

	// Segments.
	var sr fanoutpb.SegmentReply
	call(t, ctx, nc, SubjectSegmentAdd, false, &fanoutpb.SegmentRequest{Segment: "fans", Users: []string{"a", "b", "c"}}, &sr)
	if sr.Error != nil || sr.Size != 3 {
		t.Errorf("segment add: %v", &sr)
	}
	sr.Reset()
	call(t, ctx, nc, SubjectSegmentRemove, true, &fanoutpb.SegmentRequest{Segment: "fans", Users: []string{"b"}}, &sr)
	if sr.Error != nil || sr.Size != 2 {
		t.Errorf("segment remove: %v", &sr)
	}
	sr.Reset()
	call(t, ctx, nc, SubjectSegmentSize, false, &fanoutpb.SegmentRequest{Segment: "fans"}, &sr)
	if sr.Error != nil || sr.Size != 2 {
		t.Errorf("segment size: %v", &sr)
	}

	// Cancel a job that has no chunks yet.
	jr.Reset()
	call(t, ctx, nc, SubjectCreate, false, &fanoutpb.CreateRequest{Job: listJob("never")}, &jr)
	jr.Reset()
	call(t, ctx, nc, SubjectCancel, false, &fanoutpb.JobRequest{Job: "never"}, &jr)
	if jr.Error != nil || jr.Status.GetState() != fanoutpb.State_STATE_CANCELLED {
		t.Errorf("cancel: %v", &jr)
	}

	// Typed errors.
	for _, tc := range []struct {
		name    string
		subject string
		req     proto.Message
		want    error
	}{
		{"unknown job", SubjectStatus, &fanoutpb.JobRequest{Job: "ghost"}, oplog.ErrNotFound},
		{"bad job id", SubjectStatus, &fanoutpb.JobRequest{Job: "a b"}, oplog.ErrInvalidID},
		{"cancel unknown", SubjectCancel, &fanoutpb.JobRequest{Job: "ghost"}, oplog.ErrNotFound},
		{"unknown business", SubjectCreate, &fanoutpb.CreateRequest{Job: func() *fanoutpb.Job { j := listJob("x"); j.Event.Business = "nope"; return j }()}, oplog.ErrUnknownBusiness},
		{"oversize chunk", SubjectAdd, &fanoutpb.AddRequest{Job: "api-job", N: 9, Ids: users("o", 0, DefaultChunkSize+1)}, oplog.ErrTooManyTargets},
		{"add to sealed", SubjectAdd, &fanoutpb.AddRequest{Job: "api-job", N: 3, Ids: []string{"late"}}, oplog.ErrInvalid},
		{"seal fewer", SubjectSeal, &fanoutpb.SealRequest{Job: "api-job", Chunks: 2}, oplog.ErrInvalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r fanoutpb.JobReply
			call(t, ctx, nc, tc.subject, false, tc.req, &r)
			if err := oplog.ErrorFromPB(r.Error); !errors.Is(err, tc.want) || r.Status != nil {
				t.Errorf("reply %v; want %v and no status", &r, tc.want)
			}
		})
	}
	var ser fanoutpb.SegmentReply
	call(t, ctx, nc, SubjectSegmentAdd, false, &fanoutpb.SegmentRequest{Segment: "fans", Users: []string{"bad user"}}, &ser)
	if err := oplog.ErrorFromPB(ser.Error); !errors.Is(err, oplog.ErrInvalidID) {
		t.Errorf("segment add of a bad user: %v", &ser)
	}

	// Undecodable and oversize bodies.
	var r fanoutpb.JobReply
	callRaw(t, ctx, nc, &nats.Msg{Subject: SubjectStatus, Data: []byte{0xff, 0xff}}, &r)
	if r.Error.GetCode() != oplogpb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Errorf("garbage: %v, want MALFORMED", &r)
	}
	r.Reset()
	callRaw(t, ctx, nc, &nats.Msg{Subject: SubjectSeal, Data: make([]byte, 8<<10)}, &r)
	if r.Error.GetCode() != oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE {
		t.Errorf("oversize body: %v, want PAYLOAD_TOO_LARGE", &r)
	}
}
