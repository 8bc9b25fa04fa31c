package fanout

import (
	"context"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Subjects of the fanout API: NATS request/reply, protobuf bodies, or
// protojson with the header Content-Type: application/json (the reply
// comes in the same encoding). Errors come back typed, as in the oplog
// API (oplogpb.Error; oplog.ErrorFromPB turns them back into sentinels).
const (
	// SubjectCreate takes a CreateRequest and answers a JobReply.
	SubjectCreate = "sluice.api.v1.fanout.create"
	// SubjectAdd takes an AddRequest and answers a JobReply (no status).
	SubjectAdd = "sluice.api.v1.fanout.add"
	// SubjectSeal takes a SealRequest and answers a JobReply.
	SubjectSeal = "sluice.api.v1.fanout.seal"
	// SubjectStatus takes a JobRequest and answers a JobReply.
	SubjectStatus = "sluice.api.v1.fanout.status"
	// SubjectList takes a ListRequest and answers a ListReply.
	SubjectList = "sluice.api.v1.fanout.list"
	// SubjectCancel takes a JobRequest and answers a JobReply.
	SubjectCancel = "sluice.api.v1.fanout.cancel"
	// SubjectSegmentAdd takes a SegmentRequest and answers a SegmentReply.
	SubjectSegmentAdd = "sluice.api.v1.segment.add"
	// SubjectSegmentRemove takes a SegmentRequest and answers a SegmentReply.
	SubjectSegmentRemove = "sluice.api.v1.segment.remove"
	// SubjectSegmentSize takes a SegmentRequest and answers a SegmentReply.
	SubjectSegmentSize = "sluice.api.v1.segment.size"
)

// ServiceConfig configures a Service. A zero field takes the default.
type ServiceConfig struct {
	// Fanout serves the requests. Required.
	Fanout *Fanout
	// QueueGroup shared by every node serving the API. Default "sluice-api".
	QueueGroup string
	// Workers is the number of requests handled at once per node. Default 16.
	Workers int
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Service serves the fanout and segment API over NATS request/reply.
type Service struct {
	f       *Fanout
	queue   string
	workers int
	log     zerolog.Logger
	ready   chan struct{}
}

// NewService validates cfg. Run serves.
func NewService(cfg ServiceConfig) (*Service, error) {
	if cfg.Fanout == nil {
		return nil, errors.New("fanout: ServiceConfig.Fanout is required")
	}
	s := &Service{f: cfg.Fanout, queue: cfg.QueueGroup, workers: cfg.Workers, log: zerolog.Nop(), ready: make(chan struct{})}
	if s.queue == "" {
		s.queue = "sluice-api"
	}
	if s.workers <= 0 {
		s.workers = 16
	}
	if cfg.Logger != nil {
		s.log = cfg.Logger.With().Str("component", "fanout-api").Logger()
	}
	return s, nil
}

// Ready is closed once the API is subscribed.
func (s *Service) Ready() <-chan struct{} { return s.ready }

// Run serves until ctx ends, then unsubscribes and waits for the requests
// under way.
func (s *Service) Run(ctx context.Context) error {
	err := oplog.ServeRequests(ctx, oplog.RequestsConfig{Conn: s.f.lg.Conn(), Subjects: []string{SubjectCreate, SubjectAdd,
		SubjectSeal, SubjectStatus, SubjectList, SubjectCancel, SubjectSegmentAdd, SubjectSegmentRemove, SubjectSegmentSize},
		Queue: s.queue, Workers: s.workers, Handle: s.handle, Logger: s.log}, s.ready)
	if err != nil {
		return fmt.Errorf("fanout: %w", err)
	}
	return nil
}

// handle answers one request: the reply carries the typed error, if any.
func (s *Service) handle(ctx context.Context, subject, ct string, body []byte) (proto.Message, error) {
	reply, err := s.serve(ctx, subject, ct, body)
	if err != nil {
		e := oplog.ErrorPB(err)
		switch r := reply.(type) {
		case *fanoutpb.JobReply:
			r.Status, r.Error = nil, e
		case *fanoutpb.ListReply:
			r.Jobs, r.Error = nil, e
		case *fanoutpb.SegmentReply:
			r.Size, r.Error = 0, e
		}
	}
	return reply, err
}

// serve decodes and runs one request. The reply is never nil; on error
// the caller fills its error.
func (s *Service) serve(ctx context.Context, subject, ct string, body []byte) (proto.Message, error) {
	f := s.f
	small := 4 << 10
	ids := f.chunkSize*(oplog.MaxIDLen+3) + small
	switch subject {
	case SubjectCreate:
		r, req := &fanoutpb.JobReply{}, &fanoutpb.CreateRequest{}
		if err := decode(ct, body, f.lg.Limits().MaxBody+small, req); err != nil {
			return r, err
		}
		st, err := f.Create(ctx, req.Job)
		r.Status = st
		return r, err
	case SubjectAdd:
		r, req := &fanoutpb.JobReply{}, &fanoutpb.AddRequest{}
		if err := decode(ct, body, ids, req); err != nil {
			return r, err
		}
		return r, f.AddRecipients(ctx, req.Job, int(req.N), req.Ids)
	case SubjectSeal:
		r, req := &fanoutpb.JobReply{}, &fanoutpb.SealRequest{}
		if err := decode(ct, body, small, req); err != nil {
			return r, err
		}
		st, err := f.Seal(ctx, req.Job, int(req.Chunks))
		r.Status = st
		return r, err
	case SubjectStatus, SubjectCancel:
		r, req := &fanoutpb.JobReply{}, &fanoutpb.JobRequest{}
		if err := decode(ct, body, small, req); err != nil {
			return r, err
		}
		var err error
		if subject == SubjectStatus {
			r.Status, err = f.Status(ctx, req.Job)
		} else {
			r.Status, err = f.Cancel(ctx, req.Job)
		}
		return r, err
	case SubjectList:
		r, req := &fanoutpb.ListReply{}, &fanoutpb.ListRequest{}
		if err := decode(ct, body, small, req); err != nil {
			return r, err
		}
		jobs, err := f.List(ctx, int(min(req.Limit, 1000)))
		r.Jobs = jobs
		return r, err
	default: // the segment subjects
		r, req := &fanoutpb.SegmentReply{}, &fanoutpb.SegmentRequest{}
		if err := decode(ct, body, ids, req); err != nil {
			return r, err
		}
		var err error
		switch subject {
		case SubjectSegmentAdd:
			err = f.SegmentAdd(ctx, req.Segment, req.Users...)
		case SubjectSegmentRemove:
			err = f.SegmentRemove(ctx, req.Segment, req.Users...)
		}
		if err == nil {
			r.Size, err = f.SegmentSize(ctx, req.Segment)
		}
		return r, err
	}
}

// decode reads a request as protobuf or, for oplog.ContentTypeJSON, as
// protojson, refusing bodies over maxBody.
func decode(ct string, body []byte, maxBody int, m proto.Message) error {
	if len(body) > maxBody {
		return fmt.Errorf("body of %d bytes over the limit of %d: %w", len(body), maxBody, oplog.ErrPayloadTooLarge)
	}
	var err error
	if ct == oplog.ContentTypeJSON {
		err = protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(body, m)
	} else {
		err = proto.Unmarshal(body, m)
	}
	if err != nil {
		return fmt.Errorf("%v: %w", err, oplog.ErrMalformed)
	}
	return nil
}
