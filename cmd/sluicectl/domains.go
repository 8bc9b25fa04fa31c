package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/fanout"
	"github.com/sluicehq/sluice/fanout/fanoutpb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// topic runs the topic commands over the topics producer API (NATS).
//
//	topic create NAME [--backfill N] [--description TEXT]
//	topic delete NAME
//	topic publish NAME [--biz CODE] [--payload TEXT] [--ttl D] [--msg-id ID]
//	topic follow|unfollow NAME USER...
//	topic followers NAME
//	topic following USER
//	topic list
func (c *cli) topic(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("topic: want create, delete, publish, follow, unfollow, followers, following or list: %w", errUsage)
	}
	sub, args := args[0], args[1:]
	if sub == "list" {
		var out struct {
			Topics []struct {
				Topic     json.RawMessage `json:"topic"`
				Followers any             `json:"followers"`
			} `json:"topics"`
		}
		if err := c.get(ctx, "/v1/topics", nil, &out); err != nil {
			return err
		}
		for _, t := range out.Topics {
			var def struct {
				Name     string `json:"name"`
				Backfill uint32 `json:"backfill"`
			}
			_ = json.Unmarshal(t.Topic, &def)
			fmt.Fprintf(c.out, "%-24s followers=%v backfill=%d\n", def.Name, t.Followers, def.Backfill)
		}
		return nil
	}
	fs := flag.NewFlagSet("topic "+sub, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	backfill := fs.Uint("backfill", 0, "create: the last N messages a new follower gets (0: from the follow on)")
	desc := fs.String("description", "", "create: description")
	biz := fs.String("biz", "", "publish: business that handles the message on the client (optional)")
	payload := fs.String("payload", "hello from sluicectl", "publish: payload text")
	ttl := fs.Duration("ttl", 0, "publish: validity period (0: none)")
	msgID := fs.String("msg-id", "", "publish: producer message id")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	need := func(n int, what string) error {
		if len(pos) < n {
			return fmt.Errorf("topic %s: want %s: %w", sub, what, errUsage)
		}
		return nil
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	tc := topics.NewClient(nc)
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	switch sub {
	case "create":
		if err := need(1, "NAME"); err != nil {
			return err
		}
		def, err := tc.Create(rctx, &topicspb.Topic{Name: pos[0], Backfill: uint32(*backfill), Description: *desc})
		if err != nil {
			return err
		}
		fmt.Fprintf(c.out, "topic %s backfill=%d\n", def.Name, def.Backfill)
	case "delete":
		if err := need(1, "NAME"); err != nil {
			return err
		}
		if err := tc.Delete(rctx, pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "topic %s deleted\n", pos[0])
	case "publish":
		if err := need(1, "NAME"); err != nil {
			return err
		}
		ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_TOPIC_MESSAGE, Topic: pos[0], Business: *biz, Payload: []byte(*payload), MessageId: *msgID}
		if *ttl > 0 {
			ev.ExpiresAt = timestamppb.New(time.Now().Add(*ttl))
		}
		a, err := tc.Publish(rctx, ev)
		if err != nil {
			return err
		}
		dup := ""
		if a.Duplicate {
			dup = " (duplicate: original message)"
		}
		fmt.Fprintf(c.out, "published %s id=%d epoch=%d%s\n", pos[0], a.Id, a.Epoch, dup)
	case "follow", "unfollow":
		if err := need(2, "NAME USER..."); err != nil {
			return err
		}
		for _, user := range pos[1:] {
			var f topics.Follow
			if sub == "follow" {
				f, err = tc.Follow(rctx, user, pos[0])
			} else {
				f, err = tc.Unfollow(rctx, user, pos[0])
			}
			if err != nil {
				return fmt.Errorf("%s %s: %w", sub, user, err)
			}
			fmt.Fprintf(c.out, "%s %s %s from=%d until=%d\n", user, sub, pos[0], f.From, f.Until)
		}
	case "followers":
		if err := need(1, "NAME"); err != nil {
			return err
		}
		n, err := tc.Followers(rctx, pos[0])
		if err != nil {
			return err
		}
		fmt.Fprintf(c.out, "%s followers=%d\n", pos[0], n)
	case "following":
		if err := need(1, "USER"); err != nil {
			return err
		}
		list, err := tc.Following(rctx, pos[0])
		if err != nil {
			return err
		}
		for _, f := range list {
			fmt.Fprintf(c.out, "%s from=%d\n", f.Topic, f.From)
		}
	default:
		return fmt.Errorf("topic %q: %w", sub, errUsage)
	}
	return nil
}

// fanoutCmd runs the fanout commands: send over the fanout producer API,
// progress over the admin API.
//
//	fanout send --biz CODE [--payload TEXT] [--id JOB] (--users a,b | --users-file F|- | --segment S | --everyone) [--wait]
//	fanout status JOB
//	fanout list
//	fanout cancel JOB
func (c *cli) fanoutCmd(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("fanout: want send, status, list or cancel: %w", errUsage)
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "status", "cancel":
		if len(args) != 1 {
			return fmt.Errorf("fanout %s JOB: %w", sub, errUsage)
		}
		var st map[string]any
		var err error
		if sub == "status" {
			err = c.get(ctx, "/v1/fanout/"+url.PathEscape(args[0]), nil, &st)
		} else {
			err = c.post(ctx, "/v1/fanout/"+url.PathEscape(args[0])+"/cancel", nil, nil, &st)
		}
		if err != nil {
			return err
		}
		c.printStatus(st)
		return nil
	case "list":
		var out struct{ Jobs []map[string]any }
		if err := c.get(ctx, "/v1/fanout", nil, &out); err != nil {
			return err
		}
		for _, st := range out.Jobs {
			c.printStatus(st)
		}
		return nil
	case "send":
		return c.fanoutSend(ctx, args)
	}
	return fmt.Errorf("fanout %q: %w", sub, errUsage)
}

func (c *cli) printStatus(st map[string]any) {
	f := func(k string) any {
		if v, ok := st[k]; ok && v != nil {
			return v
		}
		return 0
	}
	fmt.Fprintf(c.out, "%v %v %v total=%v done=%v failed=%v rate=%.0f/s chunks=%v/%v\n", f("job"), f("audience"), f("state"),
		f("total"), f("done"), f("failed"), toFloat(f("rate")), f("chunks_done"), f("chunks"))
}

func toFloat(v any) float64 {
	switch x := v.(type) {
	case float64:
		return x
	case string:
		var f float64
		_, _ = fmt.Sscan(x, &f)
		return f
	}
	return 0
}

func (c *cli) fanoutSend(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("fanout send", flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	biz := fs.String("biz", "demo", "business code")
	payload := fs.String("payload", "hello from sluicectl", "payload text")
	kind := fs.String("kind", "push", "kind: sync, push, release, switch or command")
	id := fs.String("id", "", "job id (the idempotency key; default: generated)")
	users := fs.String("users", "", "recipients, comma-separated")
	usersFile := fs.String("users-file", "", "file of recipients, one per line (- for stdin); streamed in chunks")
	segment := fs.String("segment", "", "a segment name: its members")
	everyone := fs.Bool("everyone", false, "every device: one global entry (read diffusion)")
	ttl := fs.Duration("ttl", 0, "validity period (0: none)")
	wait := fs.Bool("wait", false, "show progress until the job is done")
	if err := fs.Parse(args); err != nil {
		return err
	}
	k, ok := oplogpb.Kind_value["KIND_"+strings.ToUpper(*kind)]
	if !ok {
		return fmt.Errorf("--kind %q: want sync, push, release, switch or command", *kind)
	}
	job := &fanoutpb.Job{Id: *id, Event: &oplogpb.Event{Kind: oplogpb.Kind(k), Business: *biz, Payload: []byte(*payload)}}
	if job.Id == "" {
		job.Id = fmt.Sprintf("job-%d", time.Now().UnixNano())
	}
	if *ttl > 0 {
		job.Event.ExpiresAt = timestamppb.New(time.Now().Add(*ttl))
	}
	var src io.Reader
	switch {
	case *everyone:
		job.Audience = &fanoutpb.Job_Everyone{Everyone: &fanoutpb.Everyone{}}
	case *segment != "":
		job.Audience = &fanoutpb.Job_Segment{Segment: *segment}
	case *users != "":
		job.Audience = &fanoutpb.Job_List{List: &fanoutpb.List{}}
		src = strings.NewReader(strings.ReplaceAll(*users, ",", "\n"))
	case *usersFile == "-":
		job.Audience = &fanoutpb.Job_List{List: &fanoutpb.List{}}
		src = os.Stdin
	case *usersFile != "":
		f, err := os.Open(*usersFile)
		if err != nil {
			return err
		}
		defer f.Close()
		job.Audience = &fanoutpb.Job_List{List: &fanoutpb.List{}}
		src = f
	default:
		return fmt.Errorf("fanout send: want --users, --users-file, --segment or --everyone: %w", errUsage)
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	reply := new(fanoutpb.JobReply)
	if err := request(ctx, nc, fanout.SubjectCreate, &fanoutpb.CreateRequest{Job: job}, reply); err != nil {
		return err
	}
	if src != nil {
		// Stream the list: one chunk of up to 1,000 ids per request.
		sc := bufio.NewScanner(src)
		var chunk []string
		n := uint32(0)
		flush := func() error {
			if len(chunk) == 0 {
				return nil
			}
			r := new(fanoutpb.JobReply)
			if err := request(ctx, nc, fanout.SubjectAdd, &fanoutpb.AddRequest{Job: job.Id, N: n, Ids: chunk}, r); err != nil {
				return fmt.Errorf("chunk %d: %w", n, err)
			}
			n++
			chunk = chunk[:0]
			return nil
		}
		for sc.Scan() {
			if u := strings.TrimSpace(sc.Text()); u != "" {
				chunk = append(chunk, u)
			}
			if len(chunk) == fanout.DefaultChunkSize {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		if err := sc.Err(); err != nil {
			return err
		}
		if err := flush(); err != nil {
			return err
		}
		if err := request(ctx, nc, fanout.SubjectSeal, &fanoutpb.SealRequest{Job: job.Id, Chunks: n}, reply); err != nil {
			return err
		}
	}
	fmt.Fprintf(c.out, "job %s created\n", job.Id)
	if !*wait {
		return nil
	}
	for {
		var st map[string]any
		if err := c.get(ctx, "/v1/fanout/"+url.PathEscape(job.Id), nil, &st); err != nil {
			return err
		}
		c.printStatus(st)
		switch st["state"] {
		case "STATE_DONE", "STATE_FAILED", "STATE_CANCELLED":
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// segment runs the segment commands over the fanout API.
//
//	segment add|remove SEGMENT USER...
//	segment size SEGMENT
func (c *cli) segment(ctx context.Context, args []string) error {
	if len(args) < 2 || (args[0] != "size" && len(args) < 3) {
		return fmt.Errorf("segment add|remove SEGMENT USER... | segment size SEGMENT: %w", errUsage)
	}
	subj := map[string]string{"add": fanout.SubjectSegmentAdd, "remove": fanout.SubjectSegmentRemove, "size": fanout.SubjectSegmentSize}[args[0]]
	if subj == "" {
		return fmt.Errorf("segment %q: %w", args[0], errUsage)
	}
	nc, err := c.connect()
	if err != nil {
		return err
	}
	defer nc.Close()
	reply := new(fanoutpb.SegmentReply)
	if err := request(ctx, nc, subj, &fanoutpb.SegmentRequest{Segment: args[1], Users: args[2:]}, reply); err != nil {
		return err
	}
	fmt.Fprintf(c.out, "segment %s size=%d\n", args[1], reply.Size)
	return nil
}

// bucketsCmd shows and changes the bucket map over the admin API.
//
//	buckets                                   buckets, businesses and metrics
//	buckets define NAME --priority P [--rate R] [--burst B]
//	buckets remove NAME
//	buckets assign BUSINESS BUCKET            ("" or - for the default rule)
func (c *cli) bucketsCmd(ctx context.Context, args []string) error {
	if len(args) == 0 || args[0] == "list" {
		var out struct {
			Buckets []struct {
				Name     string  `json:"name"`
				Priority int     `json:"priority"`
				Rate     float64 `json:"rate"`
				Burst    int     `json:"burst"`
			} `json:"buckets"`
			Businesses map[string]string `json:"businesses"`
			Metrics    struct {
				Buckets map[string]map[string]any `json:"buckets"`
				Totals  map[string]any            `json:"totals"`
			} `json:"metrics"`
		}
		if err := c.get(ctx, "/v1/buckets", nil, &out); err != nil {
			return err
		}
		for _, b := range out.Buckets {
			var members []string
			for biz, bk := range out.Businesses {
				if bk == b.Name {
					members = append(members, biz)
				}
			}
			sort.Strings(members) // the businesses come from a map
			m := out.Metrics.Buckets[b.Name]
			fmt.Fprintf(c.out, "%-14s priority=%d rate=%g burst=%d computations=%v reads=%v deferrals=%v p99_ms=%v businesses=%s\n",
				b.Name, b.Priority, b.Rate, b.Burst, m["computations"], m["reads"], m["deferrals"], m["p99_ms"], strings.Join(members, ","))
		}
		t := out.Metrics.Totals
		fmt.Fprintf(c.out, "computations=%v reads=%v reads_per_computation=%v\n", t["computations"], t["reads"], t["reads_per_computation"])
		return nil
	}
	switch args[0] {
	case "define":
		fs := flag.NewFlagSet("buckets define", flag.ContinueOnError)
		fs.SetOutput(c.errOut)
		prio := fs.Int("priority", 3, "0 runs first and is never deferred under overload")
		rate := fs.Float64("rate", 0, "computations per second per node (0: unlimited)")
		burst := fs.Int("burst", 0, "token bucket size (0: max(1, rate))")
		if len(args) < 2 {
			return fmt.Errorf("buckets define NAME: %w", errUsage)
		}
		if err := fs.Parse(args[2:]); err != nil {
			return err
		}
		body, _ := json.Marshal(map[string]any{"name": args[1], "priority": *prio, "rate": *rate, "burst": *burst})
		var out map[string]any
		if err := c.post(ctx, "/v1/buckets", nil, strings.NewReader(string(body)), &out); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "bucket %v priority=%v rate=%v burst=%v\n", out["name"], out["priority"], out["rate"], out["burst"])
	case "remove":
		if len(args) != 2 {
			return fmt.Errorf("buckets remove NAME: %w", errUsage)
		}
		var out map[string]any
		if err := c.do(ctx, http.MethodDelete, "/v1/buckets/"+url.PathEscape(args[1]), nil, nil, &out); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "bucket %s removed\n", args[1])
	case "assign":
		if len(args) != 3 {
			return fmt.Errorf("buckets assign BUSINESS BUCKET: %w", errUsage)
		}
		bucket := args[2]
		if bucket == "-" {
			bucket = ""
		}
		var out map[string]string
		if err := c.post(ctx, "/v1/buckets/assign", url.Values{"business": {args[1]}, "bucket": {bucket}}, nil, &out); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "business %s in bucket %s\n", out["business"], out["bucket"])
	default:
		return fmt.Errorf("buckets %q: %w", args[0], errUsage)
	}
	return nil
}

func (c *cli) post(ctx context.Context, path string, q url.Values, body io.Reader, v any) error {
	return c.do(ctx, http.MethodPost, path, q, body, v)
}

func (c *cli) do(ctx context.Context, method, path string, q url.Values, body io.Reader, v any) error {
	resp, err := c.call(ctx, method, path, q, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return decodeAnswer(resp, v)
}

// errorReply is a reply of a producer API that carries a typed error.
type errorReply interface {
	proto.Message
	GetError() *oplogpb.Error
}

// request sends a protobuf request and decodes its reply, turning a typed
// error into an error.
func request(ctx context.Context, nc *nats.Conn, subject string, req proto.Message, reply errorReply) error {
	body, err := proto.Marshal(req)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := nc.RequestWithContext(rctx, subject, body)
	if err != nil {
		return fmt.Errorf("%s: %w", subject, err)
	}
	if err := proto.Unmarshal(resp.Data, reply); err != nil {
		return fmt.Errorf("%s: reply: %w", subject, err)
	}
	if err := oplog.ErrorFromPB(reply.GetError()); err != nil {
		return fmt.Errorf("refused: %w (%s)", err, reply.GetError().Code)
	}
	return nil
}
