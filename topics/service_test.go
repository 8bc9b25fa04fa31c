package topics_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
	"github.com/sluicehq/sluice/topics/topicstest"
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

func TestService(t *testing.T) {
	e := newEnv(t, topics.Config{})
	topicstest.MustRunService(t, e.s)
	c := topics.NewClient(e.nc)

	def, err := c.Create(ctx(t), &topicspb.Topic{Name: "shop", Backfill: 2, Description: "a shop"})
	if err != nil || def.Name != "shop" || def.Backfill != 2 || def.CreatedAt == nil {
		t.Fatalf("create: %v, %v", def, err)
	}
	var published []uint64
	for range 3 {
		res, err := c.Publish(ctx(t), &oplogpb.Event{Topic: "shop", Business: "news", Payload: []byte("sale")})
		if err != nil || res.Target != "shop" || res.Epoch != e.s.Epoch() {
			t.Fatalf("publish: %v, %v", res, err)
		}
		published = append(published, res.Id)
	}
	f, err := c.Follow(ctx(t), "alice", "shop")
	if err != nil || !f.Following || f.From != published[0] {
		t.Fatalf("follow: %+v, %v; want from %d (backfill 2)", f, err, published[0])
	}
	if n, err := c.Followers(ctx(t), "shop"); err != nil || n != 1 {
		t.Fatalf("followers: %d, %v", n, err)
	}
	if fs, err := c.Following(ctx(t), "alice"); err != nil || len(fs) != 1 || !eqFollow(fs[0], f) {
		t.Fatalf("following: %+v, %v; want %+v", fs, err, f)
	}
	if u, err := c.Unfollow(ctx(t), "alice", "shop"); err != nil || u.Following || u.Until != published[2] {
		t.Fatalf("unfollow: %+v, %v", u, err)
	}
	// Typed errors across the wire.
	if _, err := c.Unfollow(ctx(t), "alice", "shop"); !errors.Is(err, oplog.ErrNotFound) {
		t.Fatalf("unfollow twice: %v", err)
	}
	if _, err := c.Publish(ctx(t), &oplogpb.Event{Topic: "ghost"}); !errors.Is(err, oplog.ErrUnknownTopic) {
		t.Fatalf("publish to an unknown topic: %v", err)
	}
	if _, err := c.Publish(ctx(t), &oplogpb.Event{Topic: "shop", Payload: make([]byte, 2000)}); !errors.Is(err, oplog.ErrPayloadTooLarge) {
		t.Fatalf("oversized payload: %v", err)
	}
	if _, err := c.Create(ctx(t), &topicspb.Topic{Name: "_sys"}); !errors.Is(err, oplog.ErrInvalidID) {
		t.Fatalf("reserved name: %v", err)
	}
	if _, err := c.Follow(ctx(t), "bad user", "shop"); !errors.Is(err, oplog.ErrInvalidID) {
		t.Fatalf("bad user: %v", err)
	}
	if err := c.Delete(ctx(t), "shop"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Followers(ctx(t), "shop"); !errors.Is(err, oplog.ErrUnknownTopic) {
		t.Fatalf("followers of a deleted topic: %v", err)
	}

	// Malformed and oversized bodies, and JSON.
	for _, subj := range []string{topics.SubjectCreate, topics.SubjectDelete, topics.SubjectPublish, topics.SubjectFollow,
		topics.SubjectUnfollow, topics.SubjectFollowers, topics.SubjectFollowing} {
		for _, body := range [][]byte{[]byte("\xff\xff\xff"), make([]byte, e.l.Limits().MaxBody+1)} {
			resp := request(t, e.nc, subj, "", body)
			code := replyCode(t, subj, resp.Data, false)
			want := oplogpb.ErrorCode_ERROR_CODE_MALFORMED
			if len(body) > 3 {
				want = oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE
			}
			if code != want {
				t.Fatalf("%s with a %d-byte bad body: %v, want %v", subj, len(body), code, want)
			}
		}
	}
	resp := request(t, e.nc, topics.SubjectCreate, oplog.ContentTypeJSON, []byte(`{"name":"jsontopic","backfill":1}`))
	if resp.Header.Get(oplog.HeaderContentType) != oplog.ContentTypeJSON {
		t.Fatalf("reply content type %q", resp.Header.Get(oplog.HeaderContentType))
	}
	r := new(topicspb.TopicReply)
	if err := protojson.Unmarshal(resp.Data, r); err != nil || r.Error != nil || r.Topic.GetName() != "jsontopic" {
		t.Fatalf("json create: %s (%v)", resp.Data, err)
	}
	resp = request(t, e.nc, topics.SubjectPublish, oplog.ContentTypeJSON, []byte(`{"topic":"jsontopic","payload":"aGk=","messageId":"j-1"}`))
	ar := new(oplogpb.AppendReply)
	if err := protojson.Unmarshal(resp.Data, ar); err != nil || ar.Error != nil || len(ar.Results) != 1 {
		t.Fatalf("json publish: %s (%v)", resp.Data, err)
	}
	if code := replyCode(t, topics.SubjectFollow, request(t, e.nc, topics.SubjectFollow, oplog.ContentTypeJSON, []byte(`{not json`)).Data, true); code != oplogpb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Fatalf("bad json: %v", code)
	}
}

// replyCode decodes the error code of any topic API reply.
func replyCode(t *testing.T, subject string, data []byte, json bool) oplogpb.ErrorCode {
	t.Helper()
	var m interface {
		proto.Message
		GetError() *oplogpb.Error
	}
	switch subject {
	case topics.SubjectPublish:
		m = new(oplogpb.AppendReply)
	case topics.SubjectFollow, topics.SubjectUnfollow:
		m = new(topicspb.FollowReply)
	case topics.SubjectFollowers:
		m = new(topicspb.FollowersReply)
	case topics.SubjectFollowing:
		m = new(topicspb.FollowingReply)
	default:
		m = new(topicspb.TopicReply)
	}
	var err error
	if json {
		err = protojson.Unmarshal(data, m)
	} else {
		err = proto.Unmarshal(data, m)
	}
	if err != nil {
		t.Fatalf("%s reply %q: %v", subject, strings.ToValidUTF8(string(data), "?"), err)
	}
	return m.GetError().GetCode()
}
