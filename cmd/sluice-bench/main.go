// Command sluice-bench measures Sluice against the engine it is built on,
// on this machine, in one run. Each subcommand is one benchmark:
//
//	sluice-bench oplog [flags]     producer path vs raw JetStream publish
//	sluice-bench gateway [flags]   gateway memory, fan-out, latency, catch-up vs baselines
//	sluice-bench fanout [flags]    one event to a million users (fanout) vs raw JetStream publish
//	sluice-bench topic [flags]     a topic message to its online followers vs write diffusion
//	sluice-bench storm [flags]     a connect storm: bucketed vs per-business sync rounds
//	sluice-bench diff [flags]      diff package sizes vs full and zstd-compressed packages
//	sluice-bench delivery [flags]  rule evaluations, update checks, switch changes vs baselines
//	sluice-bench analytics [flags] event ingestion vs raw JetStream publish; queries over 1M users
//
// Every benchmark but diff starts its own embedded NATS servers on temporary
// directories (loopback or in-process only), is bounded in time and count,
// and removes what it created when it ends. Results go to stdout, progress
// to stderr.
//
// # oplog
//
// For each fsync mode (always, interval) and each user count (-users,
// default 1000 and 1,000,000) it measures, on fresh servers:
//
//   - raw: one producer publishing -n messages with js.PublishAsync into a
//     bare file stream (no RePublish, TTL or consumers), over the same
//     number of distinct subjects, each message the size of the entry Sluice
//     stores for one event; time until every ack is in.
//   - sluice: oplog.Log, oplog.Inbox and oplog.Service wired as sluiced
//     wires them; -inflight producers send EventBatch requests of -batch
//     events to sluice.api.v1.append.batch; time from the first send until
//     every reply is in and the inbox projection has applied the last id.
//     Every reply is checked (no error, one new id per event, each id
//     once) and the stream must hold exactly the events sent.
//   - latency: -lat-n single-event requests to sluice.api.v1.append, and as
//     many synchronous js.Publish calls, -lat-inflight at a time.
//
// Before timing, -prefill stores one entry per user (on a server without
// fsync, then restarted in the measured mode), so the 1,000,000-user
// scenario runs against streams and an inbox that already hold every
// target. Each side runs -runs times; the median is reported with every
// run's rate. The process's CPU time per message, and the CPU time other
// processes used meanwhile, are reported too: on a small machine a busy
// neighbour depresses the rates, and the report says so.
//
// -cpuprofile writes one CPU profile per timed throughput phase; the
// server is embedded, so the profile covers server, Sluice and producers.
//
// # gateway
//
// Measures the four goals of the gateway, each next to a baseline
// measured in the same run (-scenario selects them): idle memory per
// connection at 10,000 WebSocket and 10,000 TLV connections against
// naive one-reader-one-writer servers; one message to 10,000 online
// clients, stored and transient, against a server writing from memory;
// publish-to-client latency for 1,000 clients at 5,000 events/s against
// raw JetStream publish and consume on the same server; and 1,000 clients
// reconnecting at once to catch up 50 entries each, against the same
// bytes sent from memory. Every server under test runs in a child process
// (this binary, re-executed with the hidden subcommand gateway-server;
// see gateway_server.go) so its memory is measured apart from the
// clients, which run in this process on loopback. Children run in their
// own process group and die with this process.
//
// # fanout
//
// One event to -users (default 1,000,000) users through fanout.Fanout,
// wired as sluiced wires it (oplog.Log with the atomic batch of the fsync
// mode, Inbox with LocalFeed and SoleWriter, fanout with its own Dir and
// the default Concurrency), all in this process on one embedded server
// (-fsync interval by default; always on request). A list job is created,
// fed in chunks of 1,000 by AddRecipients, sealed, and polled with Status
// until DONE; the time until the inbox projection applied every entry is
// reported too. Baseline, on the same server in the same run: raw
// js.PublishAsync of as many messages of the stored entry's size into a
// bare file stream, one subject per recipient. Ratio = fanout rate / raw
// rate, goal at least 0.5. While the fanout runs, -lat-n single appends
// through oplog.Log.Append, 10 ms apart, are timed next to the same on
// the idle server. At the end the oplog stream must hold exactly the
// recipients (plus the single appends) more, and Status must say DONE
// with total == done == users and failed 0.
//
// # topic
//
// A topic with -followers (default 1,000,000) followers loaded by
// topics.FollowMany (timed), -online (default 15,000) of them connected to
// a gateway child with topics enabled; -messages (default 50) topic
// messages are published one at a time, at most every 100 ms, each timed
// until the last online client has it, with lost and duplicate counts,
// the messages the topic stream and the oplog stored per message (1 and
// 0). Baseline on the same child and clients: the same payload as one
// oplog entry per online user (write diffusion, events of up to 1,000
// targets through the producer API), with its latency and its copies
// (one per online user). 15,000 client links here and as many in the
// child fit this machine's 20,000 open files per process.
//
// # storm
//
// -devices (default 10,000) devices, each its own user, with backlogs
// across -businesses (default 80: 60 user-dimension multi-device, 10
// user-dimension single-device, 10 device-dimension; each device has
// entries in 10 random ones) reconnect at once (128 dialling at a time)
// with no sync points, as devices that never acked: each reads its whole
// backlog. Measured per storm: the time until every device's sync round
// is done with all its entries, and the store reads per connect from the
// child's buckets.Scheduler Stats (reset before each storm), for rounds
// computed by bucket (gateway.Config.Buckets and Scheduler, as sluiced)
// and for every business on its own (Config.PerBusiness). Each storm runs
// in a fresh child over one shared data directory, the modes alternating.
// Goal: bucketed at least 80% fewer reads per connect and a lower total
// time. Every device must get exactly its entries.
//
// # diff
//
// For each pair of packages <name>-v1.<ext>, <name>-v2.<ext> in -dir
// (default: the repository's testdata/packages, an H5 bundle and a
// binary), the patch delivery/diff.Make makes from v1 to v2, applied and
// checked, next to the full v2 and the full v2 compressed by zstd -19 (the
// baseline: what a client downloads without diffs when the transport
// compresses), with Make and Apply times, and zstd -19 --patch-from as a
// reference when the zstd command is installed.
//
// # delivery
//
// The delivery targets, on one embedded server (-fsync always by default,
// as sluiced) whose Delivery holds -switches (50) switches of 2 variants
// and -packages (5) packages, each with a full release and a 10% gray one;
// -scenario selects:
//
//   - rules: evaluations per second on one core (GOMAXPROCS 1, one
//     goroutine) of a typical gray rule (app version range, 2 OSes, 3
//     regions, wifi, 10% sticky) over -devices (100,000) devices of varied
//     attributes, next to oplog.Match of the same predicates as
//     oplogpb.Conditions, in alternating slices; every device's answer is
//     checked against oplog.Match and Place. Then Delivery.View per second
//     on one core.
//   - http: GET /v1/updates (Delivery.UpdatesHandler, the device's gateway
//     token verified as sluiced does) next to a trivial handler on the same
//     net/http server: -concurrency (64) keep-alive connections of a lean
//     HTTP/1.1 client in this process, -http-time (5 s) per phase, trivial,
//     updates, trivial again, over -http-devices (1,000) devices, every
//     other request with If-None-Match. Requests/s, p50/p99, the 200/304
//     mix and the ratio to the trivial mean (goal at least 0.6).
//   - switch: -clients (1,000) clients on a gateway.Server with
//     Config.Views (raw protocol clients, or client.Client with -client
//     sdk), half of them matching a switch's variant; -changes (20)
//     changes, each timed from just before SetSwitch until every matching
//     client has the new value, alternating with as many topics.Everyone
//     messages to the same clients (the baseline), one at a time and at
//     least -interval (200 ms) apart. Goal: p99 and max under 1 s. Every
//     matching client must get every change, and every client the right
//     value and every message once.
//
// Everything runs in this process, so on a small machine the clients
// compete with the server: the report gives each phase's CPU time and the
// CPU other processes used meanwhile, and -cpuprofile writes one CPU
// profile per scenario. A failed correctness check makes the command exit
// non-zero; a missed goal does not.
//
// # analytics
//
// Tracking events through analytics, in this process on embedded servers
// (-scenario selects):
//
//   - ingest: one server (-fsync always by default, as sluiced) with
//     oplog.Log and analytics.Ingestor, whose Handler serves /v1/analytics
//     on a loopback net/http server behind gateway.DeviceAuth (a cached
//     gateway.Verifier, as sluiced). -concurrency (16) keep-alive clients
//     of the lean HTTP/1.1 client post batches of -batch (100) events of
//     one device, protobuf and gzip, encoded before timing from -devices
//     (1,000) devices with tokens: page views, custom events with
//     properties, performance samples, session starts and ends, crashes
//     and freezes with stacks of 0.9 to 1.4 KB. The side runs for -time
//     (10 s) or -n (200,000) events; every reply must accept its whole
//     batch. Baseline, on the same server after it: raw js.PublishAsync
//     from one goroutine of the same encoded events (one message per
//     event, with the message id "<device>:<event id>" Ingest sets) into a
//     bare file stream, as many, until every ack is in. Goal: at least
//     0.5x. The analytics stream is read back: each event sent exactly
//     once, nothing else. Ingestion over the gateway link will be another
//     side (ingestSide) next to HTTP.
//   - query: -users (1,000,000) users over -days (30) days ending yesterday,
//     each first seen on a day of its own and back k days later with
//     probability 0.12/sqrt(k) (1.7 active days per user), one to four
//     events a day (1.15 on average); loaded through Ingestor.Ingest on a
//     server of its own (fsync interval and a 5 s duplicate window: the
//     loading is not measured), then analytics.Aggregates projects them
//     from an empty store (apply rate timed) and every day's DAU and new
//     users and every cohort's retention are checked against the
//     generator's counts. Then -queries (200) timed calls each of
//     Counters(app, day) and Retention(app, cohort, 30), with p50/p99/max,
//     next to raw badger reads of the same keys in the same store
//     (reopened after Close: one counter, the day's counters by prefix,
//     a cohort's 31 days), and the store's size.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		fmt.Fprintln(os.Stderr, "sluice-bench:", err)
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "sluice-bench:", err)
		os.Exit(1)
	}
}

// progressLogger logs a benchmark's progress to stderr, in colour on a
// terminal.
func progressLogger(stderr io.Writer) zerolog.Logger {
	color := false
	if f, ok := stderr.(*os.File); ok {
		color = isatty.IsTerminal(f.Fd())
	}
	return zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: "15:04:05", NoColor: !color}).
		Level(zerolog.InfoLevel).With().Timestamp().Str("component", "bench").Logger()
}

// errUsage marks a command line that names no known benchmark.
var errUsage = errors.New("usage: sluice-bench <benchmark> [flags]; benchmarks: oplog, gateway, fanout, topic, storm, diff, delivery, analytics")

// run runs the benchmark named by args[0] with the rest of args as its flags.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return errUsage
	}
	switch args[0] {
	case "oplog":
		return runOplog(ctx, args[1:], stdout, stderr)
	case "gateway":
		return runGateway(ctx, args[1:], stdout, stderr)
	case "fanout":
		return runFanoutBench(ctx, args[1:], stdout, stderr)
	case "topic":
		return runTopic(ctx, args[1:], stdout, stderr)
	case "storm":
		return runStorm(ctx, args[1:], stdout, stderr)
	case "diff":
		return runDiff(ctx, args[1:], stdout, stderr)
	case "delivery":
		return runDelivery(ctx, args[1:], stdout, stderr)
	case "analytics":
		return runAnalytics(ctx, args[1:], stdout, stderr)
	case childCommand: // the gateway benchmark's server, run as a child
		return runGatewayServer(ctx, args[1:], stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprintln(stdout, errUsage.Error())
		fmt.Fprintln(stdout, "run 'sluice-bench <benchmark> -h' for the flags of one benchmark")
		return nil
	default:
		return fmt.Errorf("unknown benchmark %q: %w", args[0], errUsage)
	}
}

// parseSet reads a comma-separated flag value naming some of valid (and,
// with withAll, "all" for every one) into a set.
func parseSet(flagName, value string, withAll bool, valid ...string) (map[string]bool, error) {
	set := map[string]bool{}
	var errs []error
	for s := range strings.SplitSeq(value, ",") {
		switch s = strings.TrimSpace(s); {
		case withAll && s == "all":
			for _, v := range valid {
				set[v] = true
			}
		case slices.Contains(valid, s):
			set[s] = true
		default:
			want := strings.Join(valid, ", ")
			if withAll {
				want = "all, " + want
			}
			errs = append(errs, fmt.Errorf("%s %q: want %s", flagName, s, want))
		}
	}
	return set, errors.Join(errs...)
}
