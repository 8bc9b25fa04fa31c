package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"github.com/sluicehq/sluice/topics/topicspb"
)

// The topic benchmark: one message to the online followers of a topic
// with a million followers, stored once (read diffusion), against the
// same clients receiving it as one oplog entry each (write diffusion).

// benchTopic is the topic every follower follows.
const benchTopic = "big"

// topicConfig is the command line of the topic benchmark.
type topicConfig struct {
	followers int
	online    int
	messages  int
	interval  time.Duration
	payload   int
	mode      string
	transport string
	dialPar   int
	sources   int
	heartbeat time.Duration
	timeout   time.Duration
	verbose   bool
}

func parseTopicFlags(args []string, stderr io.Writer) (*topicConfig, error) {
	c := &topicConfig{}
	fs := flag.NewFlagSet("sluice-bench topic", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), `usage: sluice-bench topic [flags]

Loads -followers followers into one topic with topics.FollowMany, connects
-online of them to a gateway with topics enabled, publishes -messages topic
messages one at a time, and times each from the publish request until the last
online client has it. Baseline, in the same run, on the same server and
clients: the same payload written to each online user's inbox (write
diffusion, events of up to 1,000 targets through the producer API). Counts the
copies each side stores per message. The server runs in a child process (this
binary, re-executed) on loopback; clients run in this process.

flags:`)
		fs.PrintDefaults()
	}
	fs.IntVar(&c.followers, "followers", 1_000_000, "followers of the topic, loaded with FollowMany")
	fs.IntVar(&c.online, "online", 15_000, "followers connected to the gateway (one client each; the first ones)")
	fs.IntVar(&c.messages, "messages", 50, "timed messages per side (after one warm-up message)")
	fs.DurationVar(&c.interval, "interval", 100*time.Millisecond, "publish interval; a message is sent once the previous one reached every client, and no sooner than this after it")
	fs.IntVar(&c.payload, "payload", 128, "payload bytes of every message (at least 16)")
	fs.StringVar(&c.mode, "fsync", fsyncInterval, "JetStream fsync of the server: interval (the server's default) or always (sluiced's default; FollowMany is then bound by one fsync per follow)")
	fs.StringVar(&c.transport, "transport", transportTCP, "client transport: tcp (TLV) or ws")
	fs.IntVar(&c.dialPar, "dial-parallel", 128, "clients connecting at once")
	fs.IntVar(&c.sources, "sources", 8, "loopback source addresses clients dial from (127.0.0.2 up; Linux only)")
	fs.DurationVar(&c.heartbeat, "heartbeat", 5*time.Minute, "gateway heartbeat: long, so clients are not probed")
	fs.DurationVar(&c.timeout, "timeout", 20*time.Minute, "abort the whole run after this long")
	fs.BoolVar(&c.verbose, "v", false, "the child logs its components' warnings to its stderr log")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var errs []error
	if c.followers < 1 || c.followers > 10_000_000 {
		errs = append(errs, errors.New("-followers: want 1 to 10000000"))
	}
	if c.online < 1 || c.online > c.followers || c.online > 99_999 {
		errs = append(errs, errors.New("-online: want 1 to min(-followers, 99999)"))
	}
	if c.messages < 1 || c.messages > 10_000 || c.interval < 0 {
		errs = append(errs, errors.New("-messages: want 1 to 10000; -interval not negative"))
	}
	if c.payload < 16 || c.payload > 64<<10 {
		errs = append(errs, errors.New("-payload: want 16 to 65536 bytes"))
	}
	if c.mode != fsyncInterval && c.mode != fsyncAlways {
		errs = append(errs, fmt.Errorf("-fsync %q: want interval or always", c.mode))
	}
	if c.transport != transportTCP && c.transport != transportWS {
		errs = append(errs, fmt.Errorf("-transport %q: want tcp or ws", c.transport))
	}
	if c.dialPar < 1 || c.dialPar > 10_000 || c.sources < 1 || c.sources > 200 {
		errs = append(errs, errors.New("-dial-parallel: want 1 to 10000; -sources 1 to 200"))
	}
	if c.heartbeat < 100*time.Millisecond || c.timeout <= 0 {
		errs = append(errs, errors.New("-heartbeat: want at least 100ms; -timeout positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return c, nil
}

// childConfig is what starting a server child and dialling it takes.
func (c *topicConfig) childConfig() *gatewayConfig {
	return &gatewayConfig{heartbeat: c.heartbeat, payload: c.payload, atomicBatch: -1, verbose: c.verbose,
		sources: sourceIPs(c.sources), dialPar: c.dialPar, transport: c.transport}
}

// fdMargin is the open files a process needs besides its client links or
// server connections (listeners, NATS, badger and JetStream files).
const fdMargin = 1000

// topicResult is what the topic benchmark measured.
type topicResult struct {
	followers uint64
	written   int
	load      time.Duration // FollowMany in the child
	loadWall  time.Duration // the admin request, as seen here
	connect   time.Duration
	topic     topicSide
	diffusion topicSide
}

// topicSide is one way of delivering the messages.
type topicSide struct {
	bcastSide            // the timed messages
	warm      bcastRound // the warm-up message
	published int        // messages sent, warm-up included
	stored    uint64     // messages added to SLUICE_TOPICS meanwhile
	entries   uint64     // entries added to the oplog meanwhile
	late      int        // timed messages that took longer than the interval
}

func (s topicSide) p99() time.Duration { return percentile(s.lasts(), 0.99) }

// copies is the stored copies per message.
func (s topicSide) copies() float64 { return float64(s.stored+s.entries) / float64(s.published) }

// lostDups counts over every message, warm-up included.
func (s topicSide) lostDups(clients int) (lost, dups int) {
	lost, dups = s.lost(clients)
	return lost + clients - s.warm.got, dups + s.warm.dups
}

func runTopic(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseTopicFlags(args, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	log := progressLogger(stderr).With().Str("bench", "topic").Logger()
	gcfg := cfg.childConfig()
	d, err := prepareClients(ctx, gcfg, log)
	if err != nil {
		return err
	}
	if soft := gcfg.files[0]; soft > 0 && uint64(cfg.online+fdMargin) > soft {
		return fmt.Errorf("-online %d: %d client links and %d other files exceed the open-file limit %d of this process (and of the server child): lower -online", cfg.online, cfg.online, fdMargin, soft)
	}
	w := &topicReport{gwReport: gwReport{out: stdout, cfg: gcfg}, tc: cfg}
	w.header()
	r, err := topicRun(ctx, cfg, gcfg, d, log)
	if err != nil {
		return err
	}
	w.results(r)
	return nil
}

func topicRun(ctx context.Context, cfg *topicConfig, gcfg *gatewayConfig, d *dialer, log zerolog.Logger) (r topicResult, err error) {
	srv, err := startChild(ctx, gcfg, modeSluice, "topic", "-topics", "-fsync", cfg.mode)
	if err != nil {
		return r, err
	}
	defer srv.stop()
	nc, err := nats.Connect(srv.info.NATS, nats.Name("sluice-bench-producer"), nats.MaxReconnects(0))
	if err != nil {
		return r, fmt.Errorf("connect producer: %w", err)
	}
	defer closeConn(nc)
	if err := waitService(ctx, nc); err != nil {
		return r, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return r, fmt.Errorf("jetstream: %w", err)
	}
	tc := topics.NewClient(nc)
	rctx, rcancel := context.WithTimeout(ctx, requestTimeout)
	_, err = tc.Create(rctx, &topicspb.Topic{Name: benchTopic, Description: "sluice-bench topic"})
	rcancel()
	if err != nil {
		return r, fmt.Errorf("create topic: %w", err)
	}

	// The followers, in one FollowMany in the child.
	log.Info().Int("followers", cfg.followers).Msg("loading followers")
	var fm followManyReply
	start := time.Now()
	q := url.Values{"topic": {benchTopic}, "from": {"0"}, "n": {strconv.Itoa(cfg.followers)}}
	limit := time.Until(deadlineOf(ctx, time.Now().Add(time.Hour)))
	if err := srv.callFor(ctx, limit, http.MethodPost, "/topics/follow-many", q, &fm); err != nil {
		return r, fmt.Errorf("follow many: %w", err)
	}
	r.loadWall, r.load, r.written, r.followers = time.Since(start), time.Duration(fm.TookNS), fm.Written, fm.Followers
	if r.written != cfg.followers || r.followers != uint64(cfg.followers) {
		return r, fmt.Errorf("follow many wrote %d follows, the topic has %d followers, want %d", r.written, r.followers, cfg.followers)
	}
	log.Info().Dur("took", r.load).Float64("follows_per_s", float64(r.written)/r.load.Seconds()).Msg("followers loaded")

	var rs rounds
	start = time.Now()
	fl, err := connectFleet(ctx, d, srv, cfg.transport, cfg.online, cfg.dialPar, true, rs.onItems)
	if err != nil {
		return r, fmt.Errorf("connect: %w", err)
	}
	defer fl.close()
	r.connect = time.Since(start)
	log.Info().Int("clients", cfg.online).Dur("took", r.connect).Msg("followers online")

	users := make([]string, cfg.online)
	for i := range users {
		users[i] = userID5(i)
	}
	tag := uint64(0)
	publish := func(ctx context.Context, payload []byte) (time.Time, time.Duration, error) {
		t0 := time.Now()
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		defer cancel()
		a, err := tc.Publish(rctx, &oplogpb.Event{Topic: benchTopic, Payload: payload})
		if err != nil {
			return t0, 0, err
		}
		if a.Id == 0 || a.Duplicate {
			return t0, 0, fmt.Errorf("publish answered %v", a)
		}
		return t0, time.Since(t0), nil
	}
	diffuse := func(ctx context.Context, payload []byte) (time.Time, time.Duration, error) {
		t0, acked, _, err := appendAll(ctx, nc, chunkEvents(users, 1000, payload))
		return t0, acked, err
	}
	for _, side := range []struct {
		name string
		out  *topicSide
		send func(context.Context, []byte) (time.Time, time.Duration, error)
	}{{"topic", &r.topic, publish}, {"write-diffusion", &r.diffusion, diffuse}} {
		if *side.out, err = topicMessages(ctx, cfg, srv, js, &rs, &tag, side.name, side.send, log); err != nil {
			return r, fmt.Errorf("%s: %w", side.name, err)
		}
	}
	if err := fl.check(); err != nil {
		return r, err
	}
	return r, srv.alive()
}

// deadlineOf is ctx's deadline, or def without one.
func deadlineOf(ctx context.Context, def time.Time) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return def
}

// topicMessages sends a warm-up message, then cfg.messages timed ones,
// one at a time, with send; each waits until every online client has it
// (or roundWait), and no sooner than cfg.interval after the previous one
// went out. It counts what the topic stream and the oplog stored
// meanwhile.
func topicMessages(ctx context.Context, cfg *topicConfig, srv *child, js jetstream.JetStream, rs *rounds, tag *uint64,
	name string, send func(context.Context, []byte) (time.Time, time.Duration, error), log zerolog.Logger) (topicSide, error) {
	var side topicSide
	before, err := storedCounts(ctx, js)
	if err != nil {
		return side, err
	}
	one := func() (bcastRound, error) {
		*tag++
		payload := make([]byte, cfg.payload)
		binary.BigEndian.PutUint64(payload, *tag)
		tr := newTracker(*tag, cfg.online)
		rs.cur.Store(tr)
		defer rs.cur.Store(nil)
		ph := startPhase(srv)
		t0, acked, err := send(ctx, payload)
		side.published++
		if err != nil {
			return bcastRound{}, err
		}
		res, err := tr.finish(ctx, t0)
		res.acked = acked
		res.cpu = ph.end()
		return res, err
	}
	if side.warm, err = one(); err != nil {
		return side, fmt.Errorf("warm-up message: %w", err)
	}
	next := time.Now()
	for i := range cfg.messages {
		pause(ctx, time.Until(next))
		next = time.Now().Add(cfg.interval)
		res, err := one()
		if err != nil {
			return side, fmt.Errorf("message %d: %w", i+1, err)
		}
		if res.last > cfg.interval {
			side.late++
		}
		side.rounds = append(side.rounds, res)
		if (i+1)%10 == 0 || i == cfg.messages-1 {
			log.Info().Str("side", name).Int("message", i+1).Dur("last_client", res.last).Dur("acked", res.acked).Int("got", res.got).Msg("delivered")
		}
	}
	side.stray = rs.stray.Swap(0)
	after, err := storedCounts(ctx, js)
	if err != nil {
		return side, err
	}
	side.stored, side.entries = after[0]-before[0], after[1]-before[1]
	return side, srv.alive()
}

// storedCounts returns the messages in the topic stream and the entries
// in the oplog (one shard).
func storedCounts(ctx context.Context, js jetstream.JetStream) ([2]uint64, error) {
	var out [2]uint64
	for i, name := range []string{topics.StreamTopics, oplog.StreamOplog(0)} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			return out, fmt.Errorf("stream %s: %w", name, err)
		}
		st, err := streamState(ctx, s)
		if err != nil {
			return out, err
		}
		out[i] = st.Msgs
	}
	return out, nil
}

// topicReport prints the topic benchmark's results.
type topicReport struct {
	gwReport
	tc *topicConfig
}

func (w *topicReport) header() {
	c, g := w.tc, w.cfg
	w.printf("sluice-bench topic\n")
	w.printf("machine:   %s\n", machineInfo())
	w.printf("files:     open-file limit %d (hard %d): %d client links in this process, as many in the server child; clients dial from %s\n", g.files[0], g.files[1], c.online, sourceRange(g))
	w.printf("server:    a child process (`sluice-bench %s`), fsync %s: oplog.Log (atomic batch as sluiced) + Inbox (LocalFeed, SoleWriter) + Service,\n", childCommand, c.mode)
	w.printf("           topics.Topics (SoleWriter, as sluiced) + topics.Service, gateway.Server with Config.Topics (heartbeat %v)\n", c.heartbeat)
	w.printf("followers: %d follow topic %q (topics.FollowMany, users u00000...); the first %d connect over %s, each with a token for its own user\n", c.followers, benchTopic, c.online, c.transport)
	w.printf("messages:  per side one warm-up, then %d timed, one at a time: the next when every client has the previous one, and not sooner than %v after it; payload %d B\n", c.messages, c.interval, c.payload)
	w.printf("           topic: a request to topics.Service (sluice.api.v1.topics publish) over loopback NATS, stored once in %s\n", topics.StreamTopics)
	w.printf("           write diffusion (baseline): one oplog entry per online user, events of up to 1000 targets to sluice.api.v1.append, all in flight at once\n")
	w.printf("figures:   time from the send to the moment the LAST online client has the message; cpu: server = the child, clients = this process\n")
}

func (w *topicReport) results(r topicResult) {
	c := w.tc
	w.printf("\nload:      %d follows written in %.2f s (%.0f follows/s; the request took %.2f s); the topic has %d followers\n",
		r.written, r.load.Seconds(), float64(r.written)/r.load.Seconds(), r.loadWall.Seconds(), r.followers)
	w.printf("online:    %d clients connected (Hello, Welcome, first sync round) in %.2f s\n\n", c.online, r.connect.Seconds())
	w.printf("%-16s %8s %9s %9s %9s %6s %5s %6s %14s %13s\n", "side", "messages", "p50 ms", "p99 ms", "max ms", "lost", "dups", "stray", "stored copies", "oplog entries")
	for _, s := range []struct {
		name string
		side topicSide
	}{{"topic", r.topic}, {"write diffusion", r.diffusion}} {
		lost, dups := s.side.lostDups(c.online)
		w.printf("%-16s %8d %9s %9s %9s %6d %5d %6d %14.2f %13d\n", s.name, len(s.side.rounds), msec(s.side.p50()), msec(s.side.p99()),
			msec(s.side.p100()), lost, dups, s.side.stray, s.side.copies(), s.side.entries)
	}
	w.printf("%-16s %8s %9s %9s %9s\n", "ratio", "", ratio(float64(r.topic.p50()), float64(r.diffusion.p50())),
		ratio(float64(r.topic.p99()), float64(r.diffusion.p99())), ratio(float64(r.topic.p100()), float64(r.diffusion.p100())))
	for _, s := range []struct {
		name string
		side topicSide
		ack  string
	}{{"topic", r.topic, "publish acked"}, {"diffusion", r.diffusion, "appends acked"}} {
		acks := sortedDurations(s.side.rounds, func(x bcastRound) time.Duration { return x.acked })
		w.printf("  %-9s %s p50 %s p99 %s ms; %d of %d messages took longer than %v; stored: %d topic messages + %d oplog entries for %d messages (warm-up included)\n",
			s.name, s.ack, msec(percentile(acks, 0.5)), msec(percentile(acks, 0.99)), s.side.late, len(s.side.rounds), c.interval,
			s.side.stored, s.side.entries, s.side.published)
		w.printf("  %-9s %s\n", "", w.cpuLine("topic "+s.name, s.side.cpu(), len(s.side.rounds), "message"))
	}
	w.printf("\nsummary (read diffusion: one stored copy per message, whatever the follower count)\n")
	check := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	lost, dups := r.topic.lostDups(c.online)
	w.printf("topic: stored copies per message %.2f (write diffusion %.2f): goal 1: %s\n", r.topic.copies(), r.diffusion.copies(), check(r.topic.stored == uint64(r.topic.published) && r.topic.entries == 0))
	w.printf("topic: oplog entries added %d: goal 0: %s\n", r.topic.entries, check(r.topic.entries == 0))
	w.printf("topic: lost %d, duplicated %d, stray %d: goal 0: %s\n", lost, dups, r.topic.stray, check(lost+dups == 0 && r.topic.stray == 0))
	w.printf("topic: to the last of %d online clients p50 %s p99 %s ms, write diffusion p50 %s p99 %s ms (%s at p50)\n", c.online,
		msec(r.topic.p50()), msec(r.topic.p99()), msec(r.diffusion.p50()), msec(r.diffusion.p99()), ratio(float64(r.topic.p50()), float64(r.diffusion.p50())))
	if len(w.disturbed) > 0 {
		w.printf("WARNING: the rest of the machine kept more than %.1f cores busy during: %s; figures are noisy\n", busyThreshold, strings.Join(w.disturbed, ", "))
	}
}
