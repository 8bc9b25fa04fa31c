package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/oplog"
)

// Config is the effective configuration of sluiced. Every field has a flag
// and a SLUICE_<FLAG> environment variable (dashes as underscores); a flag
// given on the command line wins over the environment.
type Config struct {
	DataDir         string        `json:"data"`
	NATSURL         string        `json:"nats"`
	NATSListen      string        `json:"nats_listen"`
	Fsync           string        `json:"fsync"`
	FsyncInterval   time.Duration `json:"fsync_interval"`
	AdminListen     string        `json:"admin"`
	AtomicBatch     int           `json:"atomic_batch"`
	Shards          int           `json:"shards"`
	Replicas        int           `json:"replicas"`
	DuplicateWindow time.Duration `json:"dedupe_window"`
	MaxPayload      int           `json:"max_payload"`
	MaxTargets      int           `json:"max_targets"`
	Businesses      string        `json:"businesses"`
	LogLevel        string        `json:"log_level"`
	LogFormat       string        `json:"log_format"`
}

// Fsync modes.
const (
	FsyncAlways   = "always"
	FsyncInterval = "interval"
)

// parseConfig reads flags and environment.
func parseConfig(args []string, getenv func(string) string) (Config, error) {
	var c Config
	fs := flag.NewFlagSet("sluiced", flag.ContinueOnError)
	fs.StringVar(&c.DataDir, "data", "./sluice-data", "data directory (JetStream store and projections)")
	fs.StringVar(&c.NATSURL, "nats", "", "external NATS URL(s), comma-separated; empty runs an embedded server")
	fs.StringVar(&c.NATSListen, "nats-listen", "127.0.0.1:4222", "client listen address of the embedded NATS server (port 0: any free port)")
	fs.StringVar(&c.Fsync, "fsync", FsyncAlways, "embedded JetStream fsync policy: always (an ack means on disk) or interval (faster; a power loss can lose up to --fsync-interval of acknowledged writes)")
	fs.DurationVar(&c.FsyncInterval, "fsync-interval", 2*time.Minute, "fsync period with --fsync interval")
	fs.StringVar(&c.AdminListen, "admin", "127.0.0.1:7480", "admin HTTP listen address (/healthz, /readyz, /v1/...)")
	fs.IntVar(&c.AtomicBatch, "atomic-batch", -1, "group commit: fewest concurrent appends to one shard written as one atomic batch (one fsync); 0 never, -1 auto (32 with the embedded server and --fsync always, else 0)")
	fs.IntVar(&c.Shards, "shards", 1, "oplog shards (streams); fixed for the life of the data")
	fs.IntVar(&c.Replicas, "replicas", 1, "stream replicas (with --nats on a cluster)")
	fs.DurationVar(&c.DuplicateWindow, "dedupe-window", 2*time.Minute, "how long a producer message id is remembered")
	fs.IntVar(&c.MaxPayload, "max-payload", 64<<10, "largest event payload in bytes")
	fs.IntVar(&c.MaxTargets, "max-targets", 1000, "most targets in one event")
	fs.StringVar(&c.Businesses, "businesses", "demo:user", "businesses to register at start if absent: code:user|device[:single], comma-separated")
	fs.StringVar(&c.LogLevel, "log-level", "info", "trace, debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", "auto", "auto (console on a terminal, JSON otherwise), console or json")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: sluiced [flags]\n\nEvery flag can also be set as SLUICE_<FLAG> (e.g. SLUICE_DATA, SLUICE_NATS_LISTEN).\n\n")
		fs.PrintDefaults()
	}
	// Environment first, then the command line over it.
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		key := "SLUICE_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v := getenv(key); v != "" {
			if err := f.Value.Set(v); err != nil && envErr == nil {
				envErr = fmt.Errorf("%s=%q: %w", key, v, err)
			}
		}
	})
	if envErr != nil {
		return c, envErr
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.AtomicBatch == -1 {
		c.AtomicBatch = 0
		if c.NATSURL == "" && c.Fsync == FsyncAlways {
			c.AtomicBatch = oplog.DefaultAtomicBatch
		}
	}
	return c, c.validate()
}

func (c Config) validate() error {
	var errs []error
	if c.Fsync != FsyncAlways && c.Fsync != FsyncInterval {
		errs = append(errs, fmt.Errorf("--fsync %q: want always or interval", c.Fsync))
	}
	if c.FsyncInterval <= 0 {
		errs = append(errs, errors.New("--fsync-interval must be positive"))
	}
	if c.AtomicBatch < -1 || c.AtomicBatch > 1000 {
		errs = append(errs, errors.New("--atomic-batch must be -1 (auto) to 1000"))
	}
	if c.Shards < 1 || c.Shards > 1024 {
		errs = append(errs, errors.New("--shards must be 1 to 1024"))
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		errs = append(errs, errors.New("--replicas must be 1 to 5"))
	}
	if _, err := zerolog.ParseLevel(c.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("--log-level: %w", err))
	}
	if c.LogFormat != "auto" && c.LogFormat != "json" && c.LogFormat != "console" {
		errs = append(errs, fmt.Errorf("--log-format %q: want auto, console or json", c.LogFormat))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("--data must not be empty"))
	}
	return errors.Join(errs...)
}

// newLogger builds the root logger.
func newLogger(c Config, isTTY bool) zerolog.Logger {
	lvl, _ := zerolog.ParseLevel(c.LogLevel)
	var l zerolog.Logger
	if c.LogFormat == "console" || (c.LogFormat == "auto" && isTTY) {
		l = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: "15:04:05.000"})
	} else {
		l = zerolog.New(os.Stderr)
	}
	return l.Level(lvl).With().Timestamp().Logger()
}
