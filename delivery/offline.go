package delivery

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// OfflineMessage is one push for one device through a vendor channel.
type OfflineMessage struct {
	Device       string
	Token        string // the device's token at the vendor
	Notification *deliverypb.Notification
}

// OfflineChannel is a vendor push service (APNs, FCM, Huawei, Xiaomi, a
// webhook bridge): pushes that do not reach a device over its link in time
// go through the channel the device registered (Hello.push). Send returns
// one error per message (nil: accepted by the vendor), or a nil slice when
// all were accepted.
type OfflineChannel interface {
	Name() string
	Send(ctx context.Context, msgs []OfflineMessage) []error
}

// StreamPushChecks holds the offline checks of pushes: each scheduled
// (JetStream message scheduling) on sluice.pushcheck.at.<push> to fire on
// sluice.pushcheck.due.<push> when the push's offline deadline passes.
const StreamPushChecks = "SLUICE_PUSH_CHECKS"

const (
	subjectCheckAt  = "sluice.pushcheck.at."
	subjectCheckDue = "sluice.pushcheck.due."
	checkConsumer   = "sluice-pushcheck"
	// DefaultOfflineAfter is how long a push has to reach a device over its
	// link before the vendor channel is used.
	DefaultOfflineAfter = 30 * time.Second
	// maxOfflineBatch is the most messages handed to a channel at once.
	maxOfflineBatch = 500
)

// offline schedules and runs the offline checks.
type offline struct {
	d        *Delivery
	js       jetstream.JetStream
	channels map[string]OfflineChannel
	reg      *Registry
}

func openOffline(ctx context.Context, d *Delivery) (*offline, error) {
	if len(d.cfg.OfflineChannels) == 0 {
		return nil, nil
	}
	if d.cfg.Registry == nil || d.rc == nil {
		return nil, errors.New("delivery: offline channels need Config.Registry (push addresses) and Config.Dir (receipts)")
	}
	o := &offline{d: d, js: d.cfg.Log.JetStream(), channels: map[string]OfflineChannel{}, reg: d.cfg.Registry}
	for _, c := range d.cfg.OfflineChannels {
		if !validName(c.Name()) {
			return nil, fmt.Errorf("delivery: offline channel name %q: want 1-64 of [a-z0-9_-]", c.Name())
		}
		o.channels[c.Name()] = c
	}
	if _, err := d.cfg.Log.EnsureStream(ctx, jetstream.StreamConfig{
		Name:              StreamPushChecks,
		Description:       "Sluice push offline checks, scheduled to fire at each push's deadline",
		Subjects:          []string{"sluice.pushcheck.>"},
		Storage:           jetstream.FileStorage,
		Replicas:          d.cfg.Log.Replicas(),
		AllowMsgSchedules: true,
		MaxAge:            MaxPushValidity + 24*time.Hour,
	}); err != nil {
		return nil, err
	}
	if _, err := o.js.CreateOrUpdateConsumer(ctx, StreamPushChecks, jetstream.ConsumerConfig{
		Durable: checkConsumer, FilterSubject: subjectCheckDue + ">", AckPolicy: jetstream.AckExplicitPolicy,
		AckWait: 2 * time.Minute, MaxDeliver: 5, DeliverPolicy: jetstream.DeliverAllPolicy,
	}); err != nil {
		return nil, fmt.Errorf("delivery: push check consumer: %w", err)
	}
	return o, nil
}

// schedule stores a push's offline check, to fire after. The check
// message is durable before Push returns, so a restart loses none.
func (o *offline) schedule(ctx context.Context, pc *deliverypb.PushCheck, after time.Duration) error {
	data, err := proto.Marshal(pc)
	if err != nil {
		return err
	}
	// Schedules have second resolution: round up, so a check never fires
	// before its deadline.
	at := o.d.cfg.Now().Add(after + time.Second - 1).Truncate(time.Second)
	_, err = o.js.Publish(ctx, subjectCheckAt+pc.PushId, data, jetstream.WithMsgID("check-"+pc.PushId),
		jetstream.WithScheduleAt(at), jetstream.WithScheduleTarget(subjectCheckDue+pc.PushId))
	if err != nil {
		return fmt.Errorf("push %s: scheduling the offline check: %v: %w", pc.PushId, err, oplog.ErrUnavailable)
	}
	return nil
}

// run processes due checks until ctx ends.
func (o *offline) run(ctx context.Context) error {
	cons, err := o.js.Consumer(ctx, StreamPushChecks, checkConsumer)
	if err != nil {
		return fmt.Errorf("delivery: push check consumer: %w", err)
	}
	for ctx.Err() == nil {
		batch, err := cons.Fetch(16, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			o.d.lg.Warn().Err(err).Msg("fetching push checks")
			time.Sleep(time.Second)
			continue
		}
		for msg := range batch.Messages() {
			pc := &deliverypb.PushCheck{}
			if err := proto.Unmarshal(msg.Data(), pc); err != nil {
				o.d.lg.Error().Err(err).Str("subject", msg.Subject()).Msg("push check skipped: malformed")
				_ = msg.Term()
				continue
			}
			if err := o.check(ctx, pc, func() { _ = msg.InProgress() }); err != nil {
				o.d.lg.Warn().Err(err).Str("push", pc.PushId).Msg("push check failed; retried")
				_ = msg.NakWithDelay(10 * time.Second)
				continue
			}
			_ = msg.Ack()
		}
	}
	return nil
}

// check hands the push to the vendor channel of each device of its
// audience that has not received it and has a push address.
func (o *offline) check(ctx context.Context, pc *deliverypb.PushCheck, progress func()) error {
	if o.d.ctl.Snapshot().recalled[pc.PushId] || o.d.cfg.Now().UnixMilli() >= pc.ExpiresMs {
		return nil
	}
	n := &deliverypb.Notification{}
	if err := protojson.Unmarshal(pc.Notification, n); err != nil {
		return fmt.Errorf("notification: %w", err)
	}
	cond, err := conditionsOf(pc.Conditions)
	if err != nil {
		return fmt.Errorf("conditions: %w", err)
	}
	// own returns the notification of a target with variables of its own.
	own := func(target string) (*deliverypb.Notification, error) {
		b, ok := pc.TargetNotifications[target]
		if !ok {
			return n, nil
		}
		tn := &deliverypb.Notification{}
		if err := protojson.Unmarshal(b, tn); err != nil {
			return nil, fmt.Errorf("notification of %s: %w", target, err)
		}
		return tn, nil
	}
	// The receipts stored before the check are the ones that count.
	if err := o.d.rc.proj.CatchUp(ctx); err != nil {
		return err
	}
	var devices []*deliverypb.Device
	add := func(dev *deliverypb.Device) {
		if dev.PushToken != "" && oplog.Match(cond, attrsOfRecord(dev)) {
			devices = append(devices, proto.Clone(dev).(*deliverypb.Device))
		}
	}
	switch {
	case len(pc.Users) > 0:
		for _, u := range pc.Users {
			devs, err := o.reg.DevicesOf(u)
			if err != nil {
				return err
			}
			for _, dev := range devs {
				add(dev)
			}
		}
	case len(pc.Devices) > 0:
		for _, id := range pc.Devices {
			dev, ok, err := o.reg.Get(id)
			if err != nil {
				return err
			}
			if ok {
				add(dev)
			}
		}
	case pc.Segment != "" || pc.Everyone:
		var members map[string]struct{}
		if pc.Segment != "" {
			var err error
			if o.d.cfg.Fanout == nil {
				return nil
			}
			if members, err = o.d.cfg.Fanout.SegmentMembers(ctx, pc.Segment, maxDryRunSegment); err != nil {
				return err
			}
		}
		if err := o.reg.Each(ctx, func(dev *deliverypb.Device) bool {
			if _, in := members[dev.User]; members == nil || in {
				add(dev)
			}
			return true
		}); err != nil {
			return err
		}
	}
	byChannel := map[string][]OfflineMessage{}
	for _, dev := range devices {
		if _, ok := o.channels[dev.PushChannel]; !ok {
			continue
		}
		// Skip devices that have it, and those a previous run of this
		// check (redelivered, or on another node) sent it to already.
		done := false
		for _, state := range []string{"delivered", stateOffline} {
			got, err := o.d.rc.has(pc.PushId, state, dev.Device)
			if err != nil {
				return err
			}
			done = done || got
		}
		if done {
			continue
		}
		target := dev.Device
		if len(pc.Users) > 0 {
			target = dev.User
		}
		dn, err := own(target)
		if err != nil {
			return err
		}
		byChannel[dev.PushChannel] = append(byChannel[dev.PushChannel], OfflineMessage{Device: dev.Device, Token: dev.PushToken, Notification: dn})
	}
	for name, msgs := range byChannel {
		ch := o.channels[name]
		for start := 0; start < len(msgs); start += maxOfflineBatch {
			batch := msgs[start:min(start+maxOfflineBatch, len(msgs))]
			if progress != nil {
				progress() // a long check is not redelivered meanwhile
			}
			errs := ch.Send(ctx, batch)
			if errs != nil && len(errs) != len(batch) {
				o.d.lg.Error().Str("channel", name).Int("errors", len(errs)).Int("messages", len(batch)).Msg("offline channel answered a wrong number of results: counted as failed")
				errs = repeatErr(errors.New("no result"), len(batch))
			}
			failed := 0
			for i, m := range batch {
				if errs != nil && errs[i] != nil {
					failed++
					continue
				}
				o.d.rc.record(pc.PushId, receiptStates[deliverypb.ReceiptState_RECEIPT_STATE_SENT], m.Device)
				o.d.rc.record(pc.PushId, stateOffline, m.Device)
			}
			o.d.lg.Info().Str("push", pc.PushId).Str("channel", name).Int("sent", len(batch)-failed).Int("failed", failed).Msg("push handed to the offline channel")
		}
	}
	return nil
}

// WebhookConfig configures a Webhook offline channel.
type WebhookConfig struct {
	// Name is the channel's name, which devices give in their push
	// address. Default "webhook".
	Name string
	// URL receives the POSTs. Required.
	URL string
	// Secret signs each request (X-Sluice-Signature). Required.
	Secret []byte
	// Timeout bounds one request. Default 10 s.
	Timeout time.Duration
	// Attempts is how many times a request that failed for a transient
	// reason (network, 5xx, 429) is tried. Default 3.
	Attempts int
	// Client. Default a client with Timeout.
	Client *http.Client
}

// Webhook is an offline channel that POSTs pushes to an HTTP endpoint —
// a bridge to a vendor service, or the app maker's own. The request body
// is JSON:
//
//	{"channel": "webhook", "messages": [{"device": "...", "token": "...", "notification": {...}}]}
//
// with X-Sluice-Timestamp (unix seconds) and X-Sluice-Signature:
// "sha256=" + hex(HMAC-SHA256(secret, timestamp + "." + body)), which the
// receiver checks with VerifyWebhook. A 2xx answer accepts every message,
// unless its body is {"results": [{"error": "..."}, ...]} (one per message,
// in order; an empty error accepts it). A 4xx refuses them all; network
// errors, 429 and 5xx are retried with backoff.
type Webhook struct {
	cfg WebhookConfig
}

// NewWebhook returns a webhook channel.
func NewWebhook(cfg WebhookConfig) (*Webhook, error) {
	if cfg.URL == "" || len(cfg.Secret) == 0 {
		return nil, errors.New("delivery: WebhookConfig.URL and Secret are required")
	}
	if cfg.Name == "" {
		cfg.Name = "webhook"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Attempts <= 0 {
		cfg.Attempts = 3
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{Timeout: cfg.Timeout}
	}
	return &Webhook{cfg: cfg}, nil
}

// Name is the channel's name.
func (w *Webhook) Name() string { return w.cfg.Name }

type webhookMessage struct {
	Device       string          `json:"device"`
	Token        string          `json:"token"`
	Notification json.RawMessage `json:"notification"`
}

type webhookBody struct {
	Channel  string           `json:"channel"`
	Messages []webhookMessage `json:"messages"`
}

type webhookAnswer struct {
	Results []struct {
		Error string `json:"error"`
	} `json:"results"`
}

// Send posts the messages in one request.
func (w *Webhook) Send(ctx context.Context, msgs []OfflineMessage) []error {
	body := webhookBody{Channel: w.cfg.Name, Messages: make([]webhookMessage, len(msgs))}
	for i, m := range msgs {
		n, err := protojson.Marshal(m.Notification)
		if err != nil {
			return repeatErr(err, len(msgs))
		}
		body.Messages[i] = webhookMessage{Device: m.Device, Token: m.Token, Notification: n}
	}
	data, err := json.Marshal(body)
	if err != nil {
		return repeatErr(err, len(msgs))
	}
	var last error
	for attempt := range w.cfg.Attempts {
		if attempt > 0 {
			select {
			case <-time.After(time.Duration(100<<attempt) * time.Millisecond):
			case <-ctx.Done():
				return repeatErr(ctx.Err(), len(msgs))
			}
		}
		errs, retry, err := w.post(ctx, data, len(msgs))
		if err == nil {
			return errs
		}
		last = err
		if !retry {
			break
		}
	}
	return repeatErr(fmt.Errorf("webhook %s: %w", w.cfg.Name, last), len(msgs))
}

// post makes one request: per-message errors, or an error and whether it
// is worth retrying.
func (w *Webhook) post(ctx context.Context, data []byte, n int) ([]error, bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.cfg.URL, bytes.NewReader(data))
	if err != nil {
		return nil, false, err
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Sluice-Timestamp", ts)
	req.Header.Set("X-Sluice-Signature", "sha256="+webhookMAC(w.cfg.Secret, ts, data))
	resp, err := w.cfg.Client.Do(req)
	if err != nil {
		return nil, true, err
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch {
	case resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return nil, true, fmt.Errorf("status %d", resp.StatusCode)
	case resp.StatusCode >= 300:
		return nil, false, fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(answer))
	}
	var a webhookAnswer
	if len(bytes.TrimSpace(answer)) == 0 || json.Unmarshal(answer, &a) != nil || a.Results == nil {
		return nil, false, nil // accepted whole
	}
	if len(a.Results) != n {
		return nil, false, fmt.Errorf("%d results for %d messages", len(a.Results), n)
	}
	errs := make([]error, n)
	for i, r := range a.Results {
		if r.Error != "" {
			errs[i] = errors.New(r.Error)
		}
	}
	return errs, false, nil
}

func webhookMAC(secret []byte, ts string, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(ts))
	m.Write([]byte("."))
	m.Write(body)
	return hex.EncodeToString(m.Sum(nil))
}

// VerifyWebhook checks a webhook request's signature and that its
// timestamp is within maxSkew of now; body is the request body, read.
func VerifyWebhook(secret []byte, h http.Header, body []byte, maxSkew time.Duration) error {
	ts := h.Get("X-Sluice-Timestamp")
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return errors.New("webhook: no timestamp")
	}
	if d := time.Since(time.Unix(sec, 0)); d > maxSkew || d < -maxSkew {
		return errors.New("webhook: timestamp too old or in the future")
	}
	want := "sha256=" + webhookMAC(secret, ts, body)
	if !hmac.Equal([]byte(h.Get("X-Sluice-Signature")), []byte(want)) {
		return errors.New("webhook: bad signature")
	}
	return nil
}

func repeatErr(err error, n int) []error {
	out := make([]error, n)
	for i := range out {
		out[i] = err
	}
	return out
}
