package client

import (
	"context"
	"fmt"
	"strings"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// ContentTypeNotification is the content type of a push item's payload.
const ContentTypeNotification = "application/vnd.sluice.push+json"

// maxReceipts is the most receipts in one client event (the server's
// limit).
const maxReceipts = 256

// PushKind is Item.Kind of a push.
const PushKind = 2

// PushID returns the push an item belongs to, or "" for an item that is
// not a push notification. Pushes sent to users and devices carry message
// ids "push-<id>", those of big lists, segments and everyone
// "fanout-push-<id>".
func PushID(it *Item) string {
	if it.Kind != PushKind {
		return ""
	}
	if id, ok := strings.CutPrefix(it.MessageId, "fanout-push-"); ok {
		return id
	}
	if id, ok := strings.CutPrefix(it.MessageId, "push-"); ok {
		return id
	}
	return ""
}

// Notification decodes a push item's payload: its title, body, deep link
// and data. The client sends the server a delivered receipt for every
// push item a handler accepts (with the next ack); call Opened when the
// user opens it.
func Notification(it *Item) (*deliverypb.Notification, error) {
	if PushID(it) == "" || it.ContentType != ContentTypeNotification {
		return nil, fmt.Errorf("client: item %d of %s is not a push notification", it.Id, it.Business)
	}
	n := &deliverypb.Notification{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(it.Payload, n); err != nil {
		return nil, fmt.Errorf("client: push notification: %w", err)
	}
	return n, nil
}

// Opened tells the server the user opened a push (the funnel's opened
// stage). It needs a link: ErrNotConnected otherwise, and the app may
// call it again later.
func (c *Client) Opened(ctx context.Context, pushID string) error {
	return c.event(ctx, &gatewaypb.ClientEvent{Receipts: []*deliverypb.Receipt{
		{PushId: pushID, State: deliverypb.ReceiptState_RECEIPT_STATE_OPENED}}})
}

// SetPushAddress changes the device's vendor push address (an empty
// token removes it): kept for the next connections, and sent on the
// current link if there is one.
func (c *Client) SetPushAddress(ctx context.Context, a *deliverypb.PushAddress) error {
	c.mu.Lock()
	c.cfg.PushAddress = proto.Clone(a).(*deliverypb.PushAddress)
	c.mu.Unlock()
	err := c.event(ctx, &gatewaypb.ClientEvent{Push: a})
	if err == ErrNotConnected {
		return nil // the next Hello carries it
	}
	return err
}

// pushAddress is the address for the next Hello.
func (c *Client) pushAddress() *deliverypb.PushAddress {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cfg.PushAddress
}
