package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

type global struct {
	nats  string
	admin string
	data  string // data directory of sluiced

	// adminTok is the admin API's bearer token, from adminTokFrom: --admin-token,
	// SLUICE_ADMIN_TOKEN, or (read at the first admin request) the file
	// <data>/admin.token that sluiced writes.
	adminTok, adminTokFrom string
}

// parseGlobal reads the flags before the command.
func parseGlobal(args []string) (global, []string, error) {
	fs := flag.NewFlagSet("sluicectl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	data := fs.String("data", envOr("SLUICE_DATA", "./sluice-data"), "sluiced data directory (for endpoints.json)")
	natsURL := fs.String("nats", os.Getenv("SLUICE_NATS_URL"), "NATS URL of sluiced (default: from endpoints.json, else nats://127.0.0.1:4222)")
	admin := fs.String("admin", os.Getenv("SLUICE_ADMIN_URL"), "admin URL of sluiced (default: from endpoints.json, else http://127.0.0.1:7480)")
	token := fs.String("admin-token", "", "admin API token (default: $SLUICE_ADMIN_TOKEN, which ps does not show, else <data>/admin.token)")
	if err := fs.Parse(args); err != nil {
		return global{}, nil, fmt.Errorf("%v (command flags go after the command): %w", err, errUsage)
	}
	g := global{nats: *natsURL, admin: *admin, data: *data, adminTok: *token, adminTokFrom: "--admin-token"}
	if g.adminTok == "" {
		g.adminTok, g.adminTokFrom = os.Getenv("SLUICE_ADMIN_TOKEN"), "SLUICE_ADMIN_TOKEN"
	}
	var ep struct{ NATS, Admin string }
	if raw, err := os.ReadFile(filepath.Join(*data, "endpoints.json")); err == nil {
		_ = json.Unmarshal(raw, &ep)
	}
	if g.nats == "" {
		g.nats = cmp(ep.NATS, "nats://127.0.0.1:4222")
	}
	if g.admin == "" {
		g.admin = cmp(ep.Admin, "http://127.0.0.1:7480")
	}
	g.admin = strings.TrimRight(g.admin, "/")
	return g, fs.Args(), nil
}

func envOr(k, def string) string { return cmp(os.Getenv(k), def) }

func cmp(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

type cli struct {
	global
	out, errOut io.Writer
}

func (c *cli) connect() (*nats.Conn, error) {
	nc, err := nats.Connect(c.nats, nats.Name("sluicectl"), nats.Timeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", c.nats, err)
	}
	return nc, nil
}

// get decodes a JSON answer of the admin API into v.
func (c *cli) get(ctx context.Context, path string, q url.Values, v any) error {
	resp, err := c.call(ctx, http.MethodGet, path, q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return decodeAnswer(resp, v)
}

// errUnauthenticated: sluiced refused the admin token, or sluicectl found
// none to send.
var errUnauthenticated = errors.New("admin API: not authenticated")

// adminToken returns the token to send, reading <data>/admin.token when
// neither --admin-token nor SLUICE_ADMIN_TOKEN gave one.
func (c *cli) adminToken() (string, error) {
	if c.adminTok != "" {
		return c.adminTok, nil
	}
	path := filepath.Join(c.data, adminTokenFile)
	raw, err := os.ReadFile(path)
	if err != nil || strings.TrimSpace(string(raw)) == "" {
		if err == nil {
			err = errors.New("empty file")
		}
		return "", fmt.Errorf("no admin token: give --admin-token or SLUICE_ADMIN_TOKEN, or --data for the directory whose %s sluiced wrote (%v): %w",
			adminTokenFile, err, errUnauthenticated)
	}
	c.adminTok, c.adminTokFrom = strings.TrimSpace(string(raw)), path
	return c.adminTok, nil
}

// call sends one request to the admin API, with the admin token; the
// caller closes the body.
func (c *cli) call(ctx context.Context, method, path string, q url.Values, body io.Reader) (*http.Response, error) {
	tok, err := c.adminToken()
	if err != nil {
		return nil, err
	}
	u := c.admin + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	if sr, ok := body.(*io.SectionReader); ok {
		req.ContentLength = sr.Size() // a file upload
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("admin API %s: %w", c.admin, err)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		var e struct{ Code string }
		_ = json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&e)
		resp.Body.Close()
		return nil, fmt.Errorf("%s refused the admin token from %s (%s): %w", c.admin, c.adminTokFrom, cmp(e.Code, resp.Status), errUnauthenticated)
	}
	return resp, nil
}

// callOK is call for an answer that is not JSON (a stream, a download):
// an answer other than 200 OK becomes its error.
func (c *cli) callOK(ctx context.Context, method, path string, q url.Values, body io.Reader) (*http.Response, error) {
	resp, err := c.call(ctx, method, path, q, body)
	if err != nil || resp.StatusCode == http.StatusOK {
		return resp, err
	}
	defer resp.Body.Close()
	var v json.RawMessage
	return nil, decodeAnswer(resp, &v)
}

func decodeAnswer(resp *http.Response, v any) error {
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error, Code string }
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s (%s)", e.Error, e.Code)
		}
		return fmt.Errorf("admin API: %s", resp.Status)
	}
	return json.Unmarshal(body, v)
}

type info struct {
	NATS   string   `json:"nats"`
	Shards int      `json:"shards"`
	Epochs []uint64 `json:"epochs"`
	Fsync  string   `json:"fsync"`
}

func (c *cli) publish(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("publish", flag.ContinueOnError)
	biz := fs.String("biz", "demo", "business code")
	user := fs.String("user", "", "target user id (user-dimension businesses)")
	device := fs.String("device", "", "target device id (device-dimension businesses)")
	payload := fs.String("payload", "hello from sluicectl", "payload text")
	ctype := fs.String("content-type", "text/plain", "payload content type")
	msgID := fs.String("msg-id", "", "producer message id (idempotency key)")
	ttl := fs.Duration("ttl", 0, "validity period (0: none)")
	transient := fs.Bool("transient", false, "push to online clients only, never store")
	single := fs.Bool("single", false, "single-device mode")
	kind := fs.String("kind", "sync", "kind: sync, push, release, switch or command")
	asJSON := fs.Bool("json", false, "send the event as JSON (protojson) instead of protobuf")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	k, ok := oplogpb.Kind_value["KIND_"+strings.ToUpper(*kind)]
	if !ok {
		return fmt.Errorf("--kind %q: want sync, push, release, switch or command", *kind)
	}
	ev := &oplogpb.Event{Kind: oplogpb.Kind(k), Business: *biz, Payload: []byte(*payload), ContentType: *ctype, MessageId: *msgID, Transient: *transient}
	target, dim, err := oneTarget("publish", *user, *device)
	if err != nil {
		return err
	}
	ev.Targets, ev.Dimension = []string{target}, dim
	if *ttl > 0 {
		ev.ExpiresAt = timestamppb.New(time.Now().Add(*ttl))
	}
	if *single {
		ev.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_SINGLE
	}
	ct := ""
	if *asJSON {
		ct = oplog.ContentTypeJSON
	}
	body, err := oplog.Encode(ct, ev)
	if err != nil {
		return err
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	msg := nats.NewMsg(oplog.SubjectAppend)
	msg.Data = body
	if ct != "" {
		msg.Header.Set(oplog.HeaderContentType, ct)
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := nc.RequestMsgWithContext(rctx, msg)
	if err != nil {
		return fmt.Errorf("append request: %w", err)
	}
	reply := new(oplogpb.AppendReply)
	if err := decodeReply(ct, resp.Data, reply); err != nil {
		return err
	}
	if err := oplog.ErrorFromPB(reply.Error); err != nil {
		return fmt.Errorf("refused: %w (%s)", err, reply.Error.Code)
	}
	for _, r := range reply.Results {
		dup := ""
		if r.Duplicate {
			dup = " (duplicate: original entry)"
		}
		if ev.Transient {
			fmt.Fprintf(c.out, "published transient event to %s (not stored)\n", r.Target)
			continue
		}
		fmt.Fprintf(c.out, "appended %s/%s id=%d epoch=%d shard=%d%s\n", *biz, r.Target, r.Id, r.Epoch, r.Shard, dup)
	}
	return nil
}

// oneTarget picks the target of a command given --user or --device.
func oneTarget(cmd, user, device string) (string, oplogpb.Dimension, error) {
	switch {
	case user != "" && device == "":
		return user, oplogpb.Dimension_DIMENSION_USER, nil
	case device != "" && user == "":
		return device, oplogpb.Dimension_DIMENSION_DEVICE, nil
	}
	return "", 0, fmt.Errorf("%s: give exactly one of --user or --device", cmd)
}

func decodeReply(ct string, data []byte, m proto.Message) error {
	var err error
	if ct == oplog.ContentTypeJSON {
		err = protojson.Unmarshal(data, m)
	} else {
		err = proto.Unmarshal(data, m)
	}
	if err != nil {
		return fmt.Errorf("decode reply: %w", err)
	}
	return nil
}

func (c *cli) inspect(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	user := fs.String("user", "", "user id")
	device := fs.String("device", "sluicectl", "device id (its sync points decide where the backlog starts)")
	limit := fs.Int("limit", 100, "most entries shown")
	asJSON := fs.Bool("json", false, "print JSON")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	var backlog struct {
		Entries []json.RawMessage `json:"entries"`
		More    bool              `json:"more"`
	}
	if err := c.get(ctx, "/v1/backlog", url.Values{"user": {*user}, "device": {*device}, "limit": {strconv.Itoa(*limit)}}, &backlog); err != nil {
		return err
	}
	var sp struct {
		SyncPoints map[string]oplog.SyncPoint `json:"sync_points"`
	}
	if err := c.get(ctx, "/v1/syncpoints", url.Values{"device": {*device}}, &sp); err != nil {
		return err
	}
	if *asJSON {
		return json.NewEncoder(c.out).Encode(map[string]any{"backlog": backlog.Entries, "more": backlog.More, "sync_points": sp.SyncPoints})
	}
	fmt.Fprintf(c.out, "sync points of device %s:\n", *device)
	if len(sp.SyncPoints) == 0 {
		fmt.Fprintln(c.out, "  (none)")
	}
	for biz, p := range sp.SyncPoints {
		fmt.Fprintf(c.out, "  %-16s id=%d epoch=%d\n", biz, p.ID, p.Epoch)
	}
	fmt.Fprintf(c.out, "backlog of user %q on device %s: %d entries\n", *user, *device, len(backlog.Entries))
	fmt.Fprintf(c.out, "  %-10s %-20s %-12s %-10s %-20s %s\n", "ID", "EPOCH", "BUSINESS", "TARGET", "CREATED", "PAYLOAD")
	for _, raw := range backlog.Entries {
		e := new(oplogpb.Entry)
		if err := protojson.Unmarshal(raw, e); err != nil {
			return fmt.Errorf("decode entry: %w", err)
		}
		fmt.Fprintf(c.out, "  %-10d %-20d %-12s %-10s %-20s %s\n", e.Id, e.Epoch, e.Business, e.Target,
			e.CreatedAt.AsTime().Format(time.DateTime), preview(e.Payload))
	}
	if backlog.More {
		fmt.Fprintf(c.out, "  … more (raise --limit)\n")
	}
	return nil
}

func preview(p []byte) string {
	s := strconv.Quote(string(p))
	if len(s) > 60 {
		s = s[:57] + "…"
	}
	return s
}

func (c *cli) tail(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("tail", flag.ContinueOnError)
	user := fs.String("user", "", "user id")
	device := fs.String("device", "", "device id")
	count := fs.Int("n", 0, "stop after this many entries (0: until interrupted)")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	target, dim, err := oneTarget("tail", *user, *device)
	if err != nil {
		return err
	}
	var in info
	if err := c.get(ctx, "/v1/info", nil, &in); err != nil {
		return err
	}
	if !oplog.ValidID(target) {
		return fmt.Errorf("tail: id %q is outside [A-Za-z0-9_-]{1,64}", target)
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	// Stored entries come from the oplog stream through an ordered
	// consumer that starts at the next entry; transient ones from the
	// target's live subject.
	shard := oplog.ShardOf(target, in.Shards)
	transient := make(chan *nats.Msg, 1024)
	sub, err := nc.ChanSubscribe(oplog.SubjectLiveTarget(shard, dim, target), transient)
	if err != nil {
		return fmt.Errorf("subscribe: %w", err)
	}
	defer sub.Unsubscribe()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	cons, err := js.OrderedConsumer(ctx, oplog.StreamOplog(shard), jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{oplog.SubjectOplogTarget(shard, dim, target)},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return fmt.Errorf("tail %s: %w", target, err)
	}
	stored := make(chan jetstream.Msg, 1024)
	done := make(chan struct{})
	defer close(done)
	cc, err := cons.Consume(func(m jetstream.Msg) {
		select {
		case stored <- m:
		case <-done:
		}
	})
	if err != nil {
		return fmt.Errorf("tail %s: %w", target, err)
	}
	defer cc.Stop()
	fmt.Fprintf(c.errOut, "tailing %s (ctrl-c to stop)\n", oplog.SubjectOplogTarget(shard, dim, target))
	show := func(id, subject string, data []byte) {
		e := new(oplogpb.Entry)
		if err := proto.Unmarshal(data, e); err != nil {
			fmt.Fprintf(c.errOut, "undecodable entry on %s: %v\n", subject, err)
			return
		}
		fmt.Fprintf(c.out, "id=%s business=%s target=%s kind=%s payload=%s\n", id, e.Business, e.Target, e.Kind, preview(e.Payload))
	}
	for n := 0; *count == 0 || n < *count; n++ {
		select {
		case <-ctx.Done():
			return nil
		case m := <-transient:
			show("transient", m.Subject, m.Data)
		case m := <-stored:
			id := "?"
			if md, err := m.Metadata(); err == nil {
				id = strconv.FormatUint(md.Sequence.Stream, 10)
			}
			show(id, m.Subject(), m.Data())
		}
	}
	return nil
}

func (c *cli) rebuild(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("rebuild", flag.ContinueOnError)
	proj := fs.String("projection", "SLUICE_OPLOG_0", "projection to rebuild: SLUICE_OPLOG_<shard>, SLUICE_ACKS, SLUICE_TOPICS, SLUICE_FOLLOWS, SLUICE_TOPIC_ACKS or SLUICE_SEGMENTS")
	from := fs.Uint64("from", 0, "replay from this stream sequence (0: drop the projection and replay everything)")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	q := url.Values{"projection": {*proj}, "from": {strconv.FormatUint(*from, 10)}}
	resp, err := c.callOK(ctx, http.MethodPost, "/v1/rebuild", q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var line struct {
			Progress *oplog.Progress       `json:"progress"`
			Summary  *oplog.RebuildSummary `json:"summary"`
			Error    string                `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			return fmt.Errorf("rebuild: bad line %q: %w", sc.Text(), err)
		}
		switch {
		case line.Error != "":
			fmt.Fprintln(c.errOut)
			return fmt.Errorf("rebuild: %s", line.Error)
		case line.Progress != nil:
			fmt.Fprint(c.errOut, "\r"+bar(*line.Progress))
		case line.Summary != nil:
			s := line.Summary
			fmt.Fprintln(c.errOut)
			fmt.Fprintf(c.out, "rebuilt %s from %d: %d messages replayed, applied up to %d, took %s\ndigest %s\n",
				s.Projection, s.From, s.Messages, s.Applied, s.Took.Round(time.Millisecond), s.Digest)
			return nil
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("rebuild: %w", err)
	}
	return errors.New("rebuild: the answer ended without a summary")
}

// bar renders a progress line.
func bar(p oplog.Progress) string {
	const width = 30
	frac := 1.0
	if p.Target > 0 {
		frac = min(float64(p.Applied)/float64(p.Target), 1)
	}
	n := int(frac * width)
	return fmt.Sprintf("%s [%s%s] %3.0f%% %d/%d %.0f msg/s", p.Projection, strings.Repeat("#", n), strings.Repeat(".", width-n), frac*100, p.Applied, p.Target, p.Rate)
}

func (c *cli) digest(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("digest", flag.ContinueOnError)
	proj := fs.String("projection", "SLUICE_OPLOG_0", "projection")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args); err != nil {
		return err
	}
	var d struct {
		Digest  string `json:"digest"`
		Applied uint64 `json:"applied"`
	}
	if err := c.get(ctx, "/v1/digest", url.Values{"projection": {*proj}}, &d); err != nil {
		return err
	}
	fmt.Fprintf(c.out, "%s applied=%d digest=%s\n", *proj, d.Applied, d.Digest)
	return nil
}

func (c *cli) biz(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] == "list" {
		var out struct {
			Businesses []json.RawMessage `json:"businesses"`
		}
		if err := c.get(ctx, "/v1/businesses", nil, &out); err != nil {
			return err
		}
		for _, raw := range out.Businesses {
			b := new(oplogpb.Business)
			if err := protojson.Unmarshal(raw, b); err != nil {
				return err
			}
			fmt.Fprintf(c.out, "%-16s %-18s %s\n", b.Code, b.Dimension, b.DeviceMode)
		}
		return nil
	}
	if args[0] != "add" || len(args) < 2 {
		return errors.New("biz: want 'biz list' or 'biz add CODE [--dim user|device] [--single]'")
	}
	fs := flag.NewFlagSet("biz add", flag.ContinueOnError)
	dim := fs.String("dim", "user", "dimension: user or device")
	single := fs.Bool("single", false, "single-device mode by default")
	desc := fs.String("description", "", "description")
	fs.SetOutput(c.errOut)
	if err := fs.Parse(args[2:]); err != nil {
		return err
	}
	b := &oplogpb.Business{Code: args[1], Description: *desc, Dimension: oplogpb.Dimension_DIMENSION_USER}
	switch *dim {
	case "user":
	case "device":
		b.Dimension = oplogpb.Dimension_DIMENSION_DEVICE
	default:
		return fmt.Errorf("--dim %q: want user or device", *dim)
	}
	if *single {
		b.DeviceMode = oplogpb.DeviceMode_DEVICE_MODE_SINGLE
	}
	body, _ := protojson.Marshal(b)
	resp, err := c.call(ctx, http.MethodPost, "/v1/businesses", nil, bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var v json.RawMessage
	if err := decodeAnswer(resp, &v); err != nil {
		return err
	}
	fmt.Fprintf(c.out, "registered %s\n", v)
	return nil
}
