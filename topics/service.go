package topics

import (
	"context"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// ServiceConfig configures a Service. A zero field takes the default.
type ServiceConfig struct {
	// Topics served. Required.
	Topics *Topics
	// QueueGroup shared by every node serving the API. Default "sluice-api".
	QueueGroup string
	// Workers is the number of requests handled at once per node. Default 16.
	Workers int
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Service serves the topic API to producers and admins over NATS
// request/reply: SubjectCreate, SubjectDelete, SubjectPublish,
// SubjectFollow, SubjectUnfollow, SubjectFollowers and SubjectFollowing.
// Bodies are protobuf, or protojson with the Content-Type header
// application/json (the reply then is JSON too). Every refusal is a typed
// error in the reply (oplogpb.Error; see Client) and one log line; a body
// over the oplog's MaxBody is refused before it is decoded.
type Service struct {
	s       *Topics
	queue   string
	workers int
	log     zerolog.Logger
	ready   chan struct{}
}

// NewService validates cfg. Run serves.
func NewService(cfg ServiceConfig) (*Service, error) {
	if cfg.Topics == nil {
		return nil, errors.New("topics: ServiceConfig.Topics is required")
	}
	sv := &Service{s: cfg.Topics, queue: cfg.QueueGroup, workers: cfg.Workers, log: zerolog.Nop(), ready: make(chan struct{})}
	if sv.queue == "" {
		sv.queue = "sluice-api"
	}
	if sv.workers <= 0 {
		sv.workers = 16
	}
	if cfg.Logger != nil {
		sv.log = cfg.Logger.With().Str("component", "topic-api").Logger()
	}
	return sv, nil
}

var serviceSubjects = []string{SubjectCreate, SubjectDelete, SubjectPublish, SubjectFollow, SubjectUnfollow, SubjectFollowers, SubjectFollowing}

// Run serves until ctx ends, then unsubscribes and waits for the requests
// under way.
func (sv *Service) Run(ctx context.Context) error {
	err := oplog.ServeRequests(ctx, oplog.RequestsConfig{Conn: sv.s.lg.Conn(), Subjects: serviceSubjects,
		Queue: sv.queue, Workers: sv.workers, Handle: sv.serve, Logger: sv.log}, sv.ready)
	if err != nil {
		return fmt.Errorf("topics: %w", err)
	}
	return nil
}

// Ready is closed once the API is subscribed.
func (sv *Service) Ready() <-chan struct{} { return sv.ready }

// serve runs one request and returns its reply, with the error the reply
// carries (for the log).
func (sv *Service) serve(ctx context.Context, subject, ct string, body []byte) (proto.Message, error) {
	maxBody := sv.s.lg.Limits().MaxBody
	switch subject {
	case SubjectCreate:
		req := new(topicspb.Topic)
		err := decode(ct, body, maxBody, req)
		var def *topicspb.Topic
		if err == nil {
			def, err = sv.s.Create(ctx, req)
		}
		return &topicspb.TopicReply{Topic: def, Error: errorPB(err)}, err
	case SubjectDelete:
		req := new(topicspb.DeleteRequest)
		err := decode(ct, body, maxBody, req)
		if err == nil {
			err = sv.s.Delete(ctx, req.Name)
		}
		return &topicspb.TopicReply{Error: errorPB(err)}, err
	case SubjectPublish:
		ev, err := oplog.DecodeEvent(ct, body, maxBody)
		var res *oplogpb.Appended
		if err == nil {
			res, err = sv.s.Publish(ctx, ev)
		}
		if err != nil {
			return &oplogpb.AppendReply{Error: errorPB(err)}, err
		}
		return &oplogpb.AppendReply{Results: []*oplogpb.Appended{res}}, nil
	case SubjectFollow, SubjectUnfollow:
		req := new(topicspb.FollowRequest)
		err := decode(ct, body, maxBody, req)
		var f Follow
		if err == nil && subject == SubjectFollow {
			f, err = sv.s.Follow(ctx, req.User, req.Topic)
		} else if err == nil {
			f, err = sv.s.Unfollow(ctx, req.User, req.Topic)
		}
		if err != nil {
			return &topicspb.FollowReply{Error: errorPB(err)}, err
		}
		return &topicspb.FollowReply{Follow: followPB(f)}, nil
	case SubjectFollowers:
		req := new(topicspb.FollowersRequest)
		err := decode(ct, body, maxBody, req)
		var n uint64
		if err == nil {
			n, err = sv.s.Followers(ctx, req.Topic)
		}
		return &topicspb.FollowersReply{Count: n, Error: errorPB(err)}, err
	case SubjectFollowing:
		req := new(topicspb.FollowingRequest)
		err := decode(ct, body, maxBody, req)
		var fs []Follow
		if err == nil {
			fs, err = sv.s.Following(ctx, req.User)
		}
		r := &topicspb.FollowingReply{Error: errorPB(err)}
		for _, f := range fs {
			r.Follows = append(r.Follows, followPB(f))
		}
		return r, err
	}
	err := fmt.Errorf("subject %q: %w", subject, oplog.ErrInvalid)
	return &topicspb.TopicReply{Error: errorPB(err)}, err
}

func errorPB(err error) *oplogpb.Error {
	if err == nil {
		return nil
	}
	return oplog.ErrorPB(err)
}

// decode reads a request body as protobuf or, for oplog.ContentTypeJSON,
// protojson, after checking its size.
func decode(ct string, body []byte, maxBody int, m proto.Message) error {
	if maxBody > 0 && len(body) > maxBody {
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
