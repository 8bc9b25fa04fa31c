// Command sluicectl administers a running sluiced: it publishes test
// events, tails a user's oplog live, shows a device's backlog and sync
// points, registers businesses, rebuilds projections by replay, and runs
// delivery: switches, package releases, producer keys and pushes, and
// queries the analytics aggregates.
//
// It finds sluiced through <data>/endpoints.json (written by sluiced at
// start), or through --nats and --admin. It authenticates to the admin API
// with --admin-token, else $SLUICE_ADMIN_TOKEN, else <data>/admin.token
// (written by sluiced at its first start unless given tokens).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `Usage: sluicectl [--data DIR | --nats URL --admin URL] [--admin-token TOKEN] COMMAND [flags]

The admin token: --admin-token, else $SLUICE_ADMIN_TOKEN, else <data>/admin.token.

Commands:
  publish   append a test event and print its id and epoch
  inspect   show a user's/device's backlog and the device's sync points
  tail      print a user's or device's oplog entries live as they are stored
  rebuild   replay a projection from zero or from a sequence, with progress
  digest    print the SHA-256 digest of a projection
  biz       list or add businesses (biz list | biz add CODE --dim user|device [--single])
  topic     topics: create, delete, publish, follow, unfollow, followers, following, list
  fanout    send one event to a list, a segment or everyone; status, list, cancel jobs
  segment   add or remove segment members, or show a segment's size
  buckets   show buckets, businesses and metrics; define, remove, assign
  switch    switches: list, get KEY, set KEY --file F [--expect V], kill|unkill|rm KEY
  package   packages: list, show, upload, gray, full, pause, resume, stop, rollback, dry-run
  producer-key  hot-patch signing keys: list, add ID, revoke ID, gen OUTFILE
  push      push notifications: send, dry-run, recall ID, recalled, funnel ID
  device    device show ID: what the device registry knows
  delivery  key (the manifest key apps pin), view DEVICE, dry-run [rule flags]
  analytics counters APP PERIOD, retention APP COHORT [--days N], crashes APP DAY
  breaker   circuit breakers: list (rules and trips), set ID [flags | --file F], rm ID
  diag      diagnostics: request (--device D | --user U), list, show ID, logs ID DEVICE [-o FILE]
  token     print a client token signed with <data>/token.key (no sluiced needed)
  cert      write a self-signed development TLS certificate and key to <data>/tls

Run "sluicectl COMMAND -h" for the flags of a command.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	if errors.Is(err, errUsage) {
		if err != errUsage {
			fmt.Fprintln(os.Stderr, "sluicectl:", err)
		}
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "sluicectl:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

// run executes one command; tests call it directly.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	g, rest, err := parseGlobal(args)
	if err != nil {
		return err
	}
	if len(rest) == 0 {
		return errUsage
	}
	cmd, rest := rest[0], rest[1:]
	c := &cli{global: g, out: stdout, errOut: stderr}
	switch cmd {
	case "publish":
		return c.publish(ctx, rest)
	case "inspect":
		return c.inspect(ctx, rest)
	case "tail":
		return c.tail(ctx, rest)
	case "rebuild":
		return c.rebuild(ctx, rest)
	case "digest":
		return c.digest(ctx, rest)
	case "biz":
		return c.biz(ctx, rest)
	case "topic":
		return c.topic(ctx, rest)
	case "fanout":
		return c.fanoutCmd(ctx, rest)
	case "segment":
		return c.segment(ctx, rest)
	case "buckets":
		return c.bucketsCmd(ctx, rest)
	case "switch":
		return c.switchCmd(ctx, rest)
	case "package":
		return c.packageCmd(ctx, rest)
	case "producer-key":
		return c.producerKeyCmd(ctx, rest)
	case "push":
		return c.pushCmd(ctx, rest)
	case "device":
		return c.deviceCmd(ctx, rest)
	case "delivery":
		return c.deliveryCmd(ctx, rest)
	case "analytics":
		return c.analyticsCmd(ctx, rest)
	case "breaker":
		return c.breakerCmd(ctx, rest)
	case "diag":
		return c.diagCmd(ctx, rest)
	case "token":
		return c.token(rest)
	case "cert":
		return c.cert(rest)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return fmt.Errorf("unknown command %q: %w", cmd, errUsage)
}
