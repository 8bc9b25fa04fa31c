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

	// AdminToken is the admin API's bearer token, for one admin named
	// "admin"; never logged. AdminTokens is a file of "name token" lines,
	// one per admin; the two exclude each other. Neither set: the token
	// in <data>/admin.token, generated at the first start.
	AdminToken  string `json:"-"`
	AdminTokens string `json:"admin_tokens,omitempty"`

	WSListen        string        `json:"ws_listen"`
	TCPListen       string        `json:"tcp_listen"`
	AdvertiseWS     string        `json:"advertise_ws,omitempty"`
	AdvertiseTCP    string        `json:"advertise_tcp,omitempty"`
	TLSCert         string        `json:"tls_cert,omitempty"`
	TLSKey          string        `json:"tls_key,omitempty"`
	TokenKey        string        `json:"token_key,omitempty"`
	TokenPublicKeys string        `json:"token_public_keys,omitempty"`
	WSOrigins       string        `json:"ws_origins,omitempty"`
	Heartbeat       time.Duration `json:"heartbeat"`
	MaxConns        int           `json:"max_conns"`
	MaxFrame        int           `json:"max_frame"`
	DrainTimeout    time.Duration `json:"drain_timeout"`

	FanoutConcurrency int `json:"fanout_concurrency"`
	SyncOverload      int `json:"sync_overload"`

	DeliveryKey string        `json:"delivery_key,omitempty"`
	MaxPackage  int64         `json:"max_package"`
	ManifestTTL time.Duration `json:"manifest_ttl"`

	PushWebhook       string        `json:"push_webhook,omitempty"`
	PushWebhookSecret string        `json:"-"`
	OfflineAfter      time.Duration `json:"offline_after"`

	adminTokenFromEnv bool // AdminToken came from SLUICE_ADMIN_TOKEN, for the start log
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
	fs.StringVar(&c.AdminToken, "admin-token", "", "bearer token of the admin API for one admin named \"admin\" (at least 16 characters; prefer SLUICE_ADMIN_TOKEN: flags show in ps); default: <data>/admin.token, a random token written at the first start")
	fs.StringVar(&c.AdminTokens, "admin-tokens", "", "file of admin API tokens, one \"name token\" a line (# comments); the name is recorded as the actor of the admin's changes; excludes --admin-token")
	fs.IntVar(&c.AtomicBatch, "atomic-batch", -1, "group commit: fewest concurrent appends to one shard written as one atomic batch (one fsync); 0 never, -1 auto (32 with the embedded server and --fsync always, else 0)")
	fs.IntVar(&c.Shards, "shards", 1, "oplog shards (streams); fixed for the life of the data")
	fs.IntVar(&c.Replicas, "replicas", 1, "stream replicas (with --nats on a cluster)")
	fs.DurationVar(&c.DuplicateWindow, "dedupe-window", 2*time.Minute, "how long a producer message id is remembered")
	fs.IntVar(&c.MaxPayload, "max-payload", 64<<10, "largest event payload in bytes")
	fs.IntVar(&c.MaxTargets, "max-targets", 1000, "most targets in one event")
	fs.StringVar(&c.Businesses, "businesses", "demo:user", "businesses to register at start if absent: code:user|device[:single], comma-separated")
	fs.StringVar(&c.WSListen, "ws-listen", "127.0.0.1:7481", "gateway HTTP listen address: WebSocket at /v1/ws, dispatch at /v1/dispatch, the browser demo at /")
	fs.StringVar(&c.TCPListen, "tcp-listen", "127.0.0.1:7482", "gateway TLV socket listen address")
	fs.StringVar(&c.AdvertiseWS, "advertise-ws", "", "host:port clients reach the WebSocket listener at, for dispatch (default: the listener's address)")
	fs.StringVar(&c.AdvertiseTCP, "advertise-tcp", "", "host:port clients reach the TLV listener at, for dispatch (default: the listener's address)")
	fs.StringVar(&c.TLSCert, "tls-cert", "", "PEM certificate: both gateway listeners speak TLS 1.3 only (sluicectl cert makes a development one)")
	fs.StringVar(&c.TLSKey, "tls-key", "", "PEM private key of --tls-cert")
	fs.StringVar(&c.TokenKey, "token-key", "", "Ed25519 key that signs client tokens (default <data>/token.key, created if missing)")
	fs.StringVar(&c.TokenPublicKeys, "token-public-keys", "", "further PEM public keys whose tokens are accepted (key rotation), comma-separated")
	fs.StringVar(&c.WSOrigins, "ws-origins", "", "browser origins allowed to open WebSockets besides the server's own host, comma-separated patterns (e.g. app.example.com)")
	fs.DurationVar(&c.Heartbeat, "heartbeat", 25*time.Second, "ping interval suggested to clients; silence of 1.5x gets a probe, 3x closes the link")
	fs.IntVar(&c.MaxConns, "max-conns", 100_000, "most client links served at once")
	fs.IntVar(&c.MaxFrame, "max-frame", 1<<20, "largest protocol frame in bytes, either way")
	fs.DurationVar(&c.DrainTimeout, "drain-timeout", 10*time.Second, "on shutdown, how long clients' queues may take to drain after GoAway")
	fs.IntVar(&c.FanoutConcurrency, "fanout-concurrency", 2, "fanout chunks (of 1,000 recipients) this node expands at once; bounded so producers' own appends keep flowing")
	fs.IntVar(&c.SyncOverload, "sync-overload", 256, "bucket computations in flight on this node above which buckets of priority > 0 are deferred (clients are told when to come back)")
	fs.StringVar(&c.DeliveryKey, "delivery-key", "", "Ed25519 key that signs release manifests; apps pin its public key (default <data>/delivery.key, created if missing)")
	fs.Int64Var(&c.MaxPackage, "max-package", 256<<20, "largest package upload in bytes")
	fs.DurationVar(&c.ManifestTTL, "manifest-ttl", 7*24*time.Hour, "how long a signed release manifest is valid (re-signed at half of it)")
	fs.StringVar(&c.PushWebhook, "push-webhook", "", "URL of the webhook offline channel (named \"webhook\"): pushes a device with that push address has not received over its link in time are POSTed there, signed with --push-webhook-secret")
	fs.StringVar(&c.PushWebhookSecret, "push-webhook-secret", "", "HMAC secret of --push-webhook requests (prefer SLUICE_PUSH_WEBHOOK_SECRET: flags show in ps)")
	fs.DurationVar(&c.OfflineAfter, "offline-after", 30*time.Second, "how long a push has to reach a device over its link before its vendor channel is used")
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
	if c.AdminToken != "" {
		c.adminTokenFromEnv = true
		fs.Visit(func(f *flag.Flag) { // flags given on the command line
			if f.Name == "admin-token" {
				c.adminTokenFromEnv = false
			}
		})
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
	if (c.PushWebhook == "") != (c.PushWebhookSecret == "") {
		errs = append(errs, errors.New("--push-webhook and --push-webhook-secret go together"))
	}
	if c.PushWebhook != "" && !strings.HasPrefix(c.PushWebhook, "http://") && !strings.HasPrefix(c.PushWebhook, "https://") {
		errs = append(errs, fmt.Errorf("--push-webhook %q: want an http(s) URL", c.PushWebhook))
	}
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
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, errors.New("--tls-cert and --tls-key go together"))
	}
	if c.Heartbeat < 100*time.Millisecond {
		errs = append(errs, errors.New("--heartbeat must be at least 100ms"))
	}
	if c.MaxConns < 1 {
		errs = append(errs, errors.New("--max-conns must be positive"))
	}
	if c.MaxFrame < 4096 || c.MaxFrame > 64<<20 {
		errs = append(errs, errors.New("--max-frame must be 4096 to 67108864"))
	}
	if c.DrainTimeout <= 0 {
		errs = append(errs, errors.New("--drain-timeout must be positive"))
	}
	if c.FanoutConcurrency < 1 || c.FanoutConcurrency > 64 {
		errs = append(errs, errors.New("--fanout-concurrency must be 1 to 64"))
	}
	if c.SyncOverload < 1 {
		errs = append(errs, errors.New("--sync-overload must be positive"))
	}
	if c.AdminToken != "" && c.AdminTokens != "" {
		errs = append(errs, errors.New("--admin-token (or SLUICE_ADMIN_TOKEN) and --admin-tokens exclude each other"))
	}
	if c.AdminToken != "" {
		if err := checkAdminToken(c.AdminToken); err != nil {
			errs = append(errs, fmt.Errorf("--admin-token: %w", err))
		}
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
