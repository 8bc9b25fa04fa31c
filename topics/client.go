package topics

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
)

// Client calls the topic API (Service) over NATS, in protobuf. Errors the
// service answers unwrap to the oplog sentinels (errors.Is works across
// the wire); a failed request is oplog.ErrUnavailable. Safe for
// concurrent use.
type Client struct {
	nc *nats.Conn
}

// NewClient returns a client on nc.
func NewClient(nc *nats.Conn) *Client { return &Client{nc: nc} }

// Create defines or updates a topic; see Topics.Create.
func (c *Client) Create(ctx context.Context, def *topicspb.Topic) (*topicspb.Topic, error) {
	r := new(topicspb.TopicReply)
	if err := c.call(ctx, SubjectCreate, def, r); err != nil {
		return nil, err
	}
	if err := oplog.ErrorFromPB(r.Error); err != nil {
		return nil, err
	}
	return r.Topic, nil
}

// Delete deletes a topic; see Topics.Delete.
func (c *Client) Delete(ctx context.Context, name string) error {
	r := new(topicspb.TopicReply)
	if err := c.call(ctx, SubjectDelete, &topicspb.DeleteRequest{Name: name}, r); err != nil {
		return err
	}
	return oplog.ErrorFromPB(r.Error)
}

// Publish stores a topic message; see Topics.Publish.
func (c *Client) Publish(ctx context.Context, ev *oplogpb.Event) (*oplogpb.Appended, error) {
	r := new(oplogpb.AppendReply)
	if err := c.call(ctx, SubjectPublish, ev, r); err != nil {
		return nil, err
	}
	if err := oplog.ErrorFromPB(r.Error); err != nil {
		return nil, err
	}
	if len(r.Results) != 1 {
		return nil, fmt.Errorf("topics: publish answered %d results: %w", len(r.Results), oplog.ErrUnavailable)
	}
	return r.Results[0], nil
}

// Follow makes user follow topic; see Topics.Follow.
func (c *Client) Follow(ctx context.Context, user, topic string) (Follow, error) {
	return c.follow(ctx, SubjectFollow, user, topic)
}

// Unfollow ends user's follow of topic; see Topics.Unfollow.
func (c *Client) Unfollow(ctx context.Context, user, topic string) (Follow, error) {
	return c.follow(ctx, SubjectUnfollow, user, topic)
}

func (c *Client) follow(ctx context.Context, subject, user, topic string) (Follow, error) {
	r := new(topicspb.FollowReply)
	if err := c.call(ctx, subject, &topicspb.FollowRequest{User: user, Topic: topic}, r); err != nil {
		return Follow{}, err
	}
	if err := oplog.ErrorFromPB(r.Error); err != nil {
		return Follow{}, err
	}
	if r.Follow == nil {
		return Follow{}, fmt.Errorf("topics: empty follow reply: %w", oplog.ErrUnavailable)
	}
	return followOf(r.Follow), nil
}

// Followers returns the follower count of topic; see Topics.Followers.
func (c *Client) Followers(ctx context.Context, topic string) (uint64, error) {
	r := new(topicspb.FollowersReply)
	if err := c.call(ctx, SubjectFollowers, &topicspb.FollowersRequest{Topic: topic}, r); err != nil {
		return 0, err
	}
	return r.Count, oplog.ErrorFromPB(r.Error)
}

// Following returns the topics user follows; see Topics.Following.
func (c *Client) Following(ctx context.Context, user string) ([]Follow, error) {
	r := new(topicspb.FollowingReply)
	if err := c.call(ctx, SubjectFollowing, &topicspb.FollowingRequest{User: user}, r); err != nil {
		return nil, err
	}
	if err := oplog.ErrorFromPB(r.Error); err != nil {
		return nil, err
	}
	out := make([]Follow, 0, len(r.Follows))
	for _, f := range r.Follows {
		out = append(out, followOf(f))
	}
	return out, nil
}

func (c *Client) call(ctx context.Context, subject string, req, reply proto.Message) error {
	data, err := proto.Marshal(req)
	if err != nil {
		return fmt.Errorf("topics: marshal request: %w", err)
	}
	m, err := c.nc.RequestWithContext(ctx, subject, data)
	if err != nil {
		return fmt.Errorf("topics: %s: %v: %w", subject, err, oplog.ErrUnavailable)
	}
	if err := proto.Unmarshal(m.Data, reply); err != nil {
		return fmt.Errorf("topics: %s: reply: %v: %w", subject, err, oplog.ErrUnavailable)
	}
	return nil
}
