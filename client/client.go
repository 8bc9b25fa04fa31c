package client

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"google.golang.org/protobuf/proto"
)

// Item is one oplog entry as the app sees it. Item.Topic is set for a
// topic message: its Id and Epoch are then the topic stream's, and
// Item.Business, if set, names the component that handles it.
type Item = gatewaypb.Item

// Handler processes the items of one business (or topic). It runs on the
// goroutine that called Run, one item at a time. A nil return means the
// item is processed: the client may ack it. An error stops the client from
// acking past the item: the client closes the link and reconnects with
// backoff, and the server sends the item again.
type Handler func(ctx context.Context, it *Item) error

// ResetHandler is told that the server recreated the stream of a business
// (HandleReset), or of a topic (HandleTopicReset): the app must drop what
// it holds of it, and takes the items that follow as new. An error is
// handled as a Handler's: the reset comes again after a reconnect.
type ResetHandler func(ctx context.Context, name string) error

// Defaults of Config.
const (
	DefaultMinBackoff  = 100 * time.Millisecond
	DefaultMaxBackoff  = 30 * time.Second
	DefaultAckInterval = 100 * time.Millisecond
	DefaultDialTimeout = 10 * time.Second
	// DefaultHeartbeat is the ping interval when Welcome names none.
	DefaultHeartbeat = 25 * time.Second
	// MinAckInterval keeps a busy client well under the server's inbound
	// rate limit (50 frames per second): at most 20 acks a second.
	MinAckInterval = 50 * time.Millisecond
	// DefaultDeferRetry is how long the client waits before asking for
	// deferred buckets when the server names no delay (Sync.retry_after_ms
	// 0); a jitter of up to DeferJitter of the delay is added to it.
	DefaultDeferRetry = time.Second
	// DeferJitter is the largest jitter added to a deferral's delay, as a
	// fraction of it, so that the clients a loaded server deferred at once
	// do not come back at once.
	DeferJitter = 0.25
)

// healthySession is how long a session must last to reset the backoff
// (a completed sync round does too).
const healthySession = 30 * time.Second

// sdkName goes in Attrs.sdk when the app sets none.
const sdkName = "sluice-go/1"

// Config configures a Client. A zero field takes the default in its
// comment.
type Config struct {
	// URL is the gateway: "ws://host:port/v1/ws", "wss://…",
	// "tcp://host:port" (TLV frames) or "tls://host:port" (TLV over TLS).
	URL string
	// URLs are more addresses, tried in order after URL (e.g. the nodes
	// /v1/dispatch returned); the client moves to the next one when a
	// connection fails or a node drains. If set, URL may be empty.
	URLs []string
	// Token returns the token to present, at each connection: tokens
	// expire, so return a fresh one when the last one is near its end. The
	// token names the device and the user; after Login or Logout it must
	// name the new user (or none), as the next connection binds that one.
	// Required.
	Token func(ctx context.Context) (string, error)
	// Attrs describe the client; entries with conditions are sent only to
	// clients whose attributes match. Default: none, with sdk set.
	Attrs *gatewaypb.Attrs
	// StateDir is where the sync points persist (one small file, replaced
	// atomically). One Client at a time per directory. Required.
	StateDir string
	// TLS configures wss:// and tls:// connections. MinVersion is raised to
	// TLS 1.3, the only version the gateway speaks. Default: system roots.
	TLS *tls.Config
	// JSON uses the sluice.v1.json sub-protocol on WebSocket (text frames,
	// for debugging). It has no effect on TCP.
	JSON bool
	// NoCompression declines zstd: frames either way are then never
	// compressed.
	NoCompression bool
	// MinBackoff and MaxBackoff bound the full-jitter backoff between
	// connection attempts: attempt n waits a random time in
	// [0, min(MaxBackoff, MinBackoff·2ⁿ)] (and at least the server's
	// reconnect hint). Defaults 100 ms and 30 s.
	MinBackoff, MaxBackoff time.Duration
	// AckInterval is the most time between processing an item and
	// persisting and acking its sync point; the end of a sync round is
	// persisted and acked at once. Default 100 ms; at least MinAckInterval.
	AckInterval time.Duration
	// DialTimeout bounds a connection attempt: dial, TLS, WebSocket upgrade,
	// Hello and Welcome. Default 10 s.
	DialTimeout time.Duration
	// Views asks the server for View frames: the device's switches and
	// releases (see "Switches and releases" in the package doc).
	// CheckUpdates works without it. The last view, however it came, is
	// kept in StateDir (view.pb) across restarts.
	Views bool
	// ManifestKeys are the server keys release manifests may be signed
	// with (several during a key rotation). A release whose manifest none
	// of them verifies is dropped (logged, Stats.ManifestsRejected); the
	// switches of its view still apply. Default: none, so no release is
	// trusted.
	ManifestKeys []ed25519.PublicKey
	// HTTPBase is the base URL of the gateway's HTTP endpoints, the update
	// check (/v1/updates) and the package downloads whose paths manifests
	// name: "http(s)://host:port", maybe with a path prefix. Default: from
	// the ws:// or wss:// URL of the current or last link, else of the
	// first such URL configured, as http(s)://host:port (the gateway
	// serves both on one listener); none with tcp:// and tls:// URLs only.
	HTTPBase string
	// Analytics turns on tracking (Track). Optional.
	Analytics *AnalyticsConfig
	// PushAddress is the device's address at a vendor push service (APNs,
	// FCM, a webhook bridge...), given in each Hello: pushes that do not
	// reach the device over its link in time go there. SetPushAddress
	// changes it while connected. Optional.
	PushAddress *deliverypb.PushAddress
	// HTTPClient makes the HTTP requests of CheckUpdates and Install.
	// Default: a client of the client's own, with TLS's roots and
	// certificates (its MinVersion is not raised: a fallback URL may be a
	// CDN's). The contexts of CheckUpdates and Install bound the requests.
	HTTPClient *http.Client
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

// Client syncs one device with a Sluice gateway: see the package doc. Its
// methods are safe for concurrent use.
type Client struct {
	cfg       Config
	endpoints []endpoint
	tls       *tls.Config
	attrs     *gatewaypb.Attrs
	codec     *wire.Codec // frames before Welcome
	log       zerolog.Logger
	noPings   bool     // tests: leave link health to the server's probes
	tracker   *tracker // nil without Config.Analytics

	running atomic.Bool

	httpc    *http.Client
	viewMu   sync.Mutex // serializes applying views: verify, persist, publish
	serialMu sync.Mutex // serializes writes of the serial file

	mu              sync.Mutex
	handlers        map[string]Handler // by business
	topicHandlers   map[string]Handler // by topic
	fallback        Handler
	onReset         ResetHandler
	onTopicReset    ResetHandler
	cur             *link                // the link up now, if any
	persisted       map[string]SyncPoint // the points in StateDir
	persistedUser   string               // the user they were earned under
	persistedTopics map[string]SyncPoint // the topic cursors in StateDir
	linkCodec       *wire.Codec          // frames after Welcome, by its limits
	stats           Stats
	offset          time.Duration     // server clock minus ours, from the last Welcome
	httpLast        string            // HTTP base of the last link's endpoint, if any
	view            *View             // the last view applied (or loaded), nil if none
	onView          ViewHandler       // HandleView's
	viewBusy        bool              // a ViewHandler call is under way
	viewPending     bool              // a view was applied meanwhile: call again
	serials         map[string]uint64 // highest manifest serial accepted, by package
}

// Stats are counters and the state of a Client, as Client.Stats returns
// them: a copy.
type Stats struct {
	Connected bool   // a link is up (past Welcome)
	URL       string // of the current or last link
	SessionID string // of the current or last link

	Connects     int64 // links that reached Welcome
	Reconnects   int64 // Connects after the first
	DialFailures int64 // attempts that ended before Welcome

	Rounds        int64 // sync rounds completed (Sync frames with done)
	Delivered     int64 // items a handler accepted (topic items included)
	TopicItems    int64 // topic items (Item.Topic set) a handler accepted
	Duplicates    int64 // items at or below the sync point or topic cursor, dropped
	Unhandled     int64 // items without a handler: acked and dropped
	Expired       int64 // items past their expires_ms (server clock): acked and dropped
	HandlerErrors int64 // handler (or reset handler) failures
	Resets        int64 // businesses the server reset (stream recreated)
	TopicResets   int64 // topics the server reset (topic stream recreated)
	Deferrals     int64 // rounds that ended with buckets deferred by the server
	DeferRetries  int64 // FOREGROUND events sent to fetch deferred buckets
	Acks          int64 // Ack frames sent
	ProbesEchoed  int64 // server probes answered

	RTT               time.Duration           // round trip of the last Ping
	LastGoAway        gatewaypb.GoAway_Reason // reason of the last GoAway
	LastGoAwayMessage string
	LastError         *ServerError // the last Error frame, fatal or not

	Views             int64 // views applied (View frames and CheckUpdates answers)
	ManifestsRejected int64 // release manifests dropped: untrusted key, bad signature or content
	Installs          int64 // Install calls that returned verified bytes
	DiffInstalls      int64 // of them, rebuilt from a diff
	FallbackInstalls  int64 // of them, downloaded from the fallback URL
	DownloadResumes   int64 // download requests resuming a broken transfer (Range)
	Receipts          int   // delivered receipts of push items sent to the server
	AnalyticsSent     int64 // tracking events sent (again after a lost link: counted again)
	AnalyticsStored   int64 // tracking events the server stored (or had)
	AnalyticsDropped  int64 // tracking events dropped: the queue was full
	AnalyticsOff      int64 // tracking events dropped: the reporting switch is off for this device
}

// New checks cfg, creates StateDir if needed and loads what is persisted
// there: the sync points and topic cursors, the last view and the
// manifest serials accepted. It starts nothing: see Run.
func New(cfg Config) (*Client, error) {
	if cfg.Token == nil {
		return nil, errors.New("client: Config.Token is required")
	}
	if cfg.StateDir == "" {
		return nil, errors.New("client: Config.StateDir is required")
	}
	urls := cfg.URLs
	if cfg.URL != "" {
		urls = append([]string{cfg.URL}, urls...)
	}
	if len(urls) == 0 {
		return nil, errors.New("client: Config.URL or URLs is required")
	}
	c := &Client{handlers: map[string]Handler{}, topicHandlers: map[string]Handler{}, log: zerolog.Nop()}
	if a := cfg.Analytics; a != nil {
		if a.App == "" {
			return nil, errors.New("client: Config.Analytics.App is required")
		}
		c.tracker = newTracker(*a)
	}
	for _, u := range urls {
		e, err := parseEndpoint(u)
		if err != nil {
			return nil, err
		}
		c.endpoints = append(c.endpoints, e)
	}
	def := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&cfg.MinBackoff, DefaultMinBackoff)
	def(&cfg.MaxBackoff, DefaultMaxBackoff)
	def(&cfg.AckInterval, DefaultAckInterval)
	def(&cfg.DialTimeout, DefaultDialTimeout)
	cfg.AckInterval = max(cfg.AckInterval, MinAckInterval)
	if cfg.MaxBackoff < cfg.MinBackoff {
		return nil, fmt.Errorf("client: MaxBackoff %v below MinBackoff %v", cfg.MaxBackoff, cfg.MinBackoff)
	}
	if cfg.HTTPBase != "" {
		u, err := url.Parse(cfg.HTTPBase)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("client: HTTPBase %q: want http(s)://host[:port][/path]", cfg.HTTPBase)
		}
		cfg.HTTPBase = strings.TrimRight(cfg.HTTPBase, "/")
	}
	for i, k := range cfg.ManifestKeys {
		if len(k) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("client: ManifestKeys[%d]: %d bytes, want an ed25519 public key", i, len(k))
		}
	}
	c.tls = &tls.Config{}
	if cfg.TLS != nil {
		c.tls = cfg.TLS.Clone()
	}
	c.tls.MinVersion = max(c.tls.MinVersion, tls.VersionTLS13)
	c.httpc = cfg.HTTPClient
	if c.httpc == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		if cfg.TLS != nil {
			tr.TLSClientConfig = cfg.TLS.Clone()
		}
		c.httpc = &http.Client{Transport: tr}
	}
	c.attrs = &gatewaypb.Attrs{}
	if cfg.Attrs != nil {
		c.attrs = proto.Clone(cfg.Attrs).(*gatewaypb.Attrs)
	}
	if c.attrs.Sdk == "" {
		c.attrs.Sdk = sdkName
	}
	if cfg.Logger != nil {
		c.log = cfg.Logger.With().Str("component", "client").Logger()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("client: state dir: %w", err)
	}
	state, err := loadPoints(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	c.persisted, c.persistedUser, c.persistedTopics = state.Points, state.User, state.Topics
	if c.serials, err = loadSerials(cfg.StateDir); err != nil {
		return nil, err
	}
	if c.codec, err = wire.NewCodec(wire.Options{}); err != nil {
		return nil, err
	}
	c.cfg = cfg
	c.loadView()
	if c.tracker != nil {
		c.tracker.load(c)
	}
	return c, nil
}

// Handle sets the handler of one business's items, replacing any. Set
// handlers before Run; one set later applies to the items that follow.
func (c *Client) Handle(business string, h Handler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.handlers[business] = h
}

// HandleTopic sets the handler of one topic's items (Item.Topic), replacing
// any. A topic item goes to the handler of its topic, else to that of its
// business (Item.Business, when the topic message names one), else to the
// default handler. Set handlers before Run; one set later applies to the
// items that follow.
func (c *Client) HandleTopic(topic string, h Handler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.topicHandlers[topic] = h
}

// HandleDefault sets the handler of the items no other handler takes.
// Without it such items are acked and dropped (logged at debug level).
func (c *Client) HandleDefault(h Handler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fallback = h
}

// HandleReset sets the function told when the server resets a business
// (its stream was recreated). Without it the client only forgets the
// business's sync point.
func (c *Client) HandleReset(h ResetHandler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onReset = h
}

// HandleTopicReset sets the function told when the server resets a topic
// (its topic stream was recreated). Without it the client only forgets the
// topic's cursor. HandleReset's function is not told of topics.
func (c *Client) HandleTopicReset(h ResetHandler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onTopicReset = h
}

// handler returns the handler of it: by topic, by business, or the
// default; nil if none.
func (c *Client) handler(it *Item) Handler {
	c.mu.Lock()
	defer c.mu.Unlock()
	if it.Topic != "" {
		if h, ok := c.topicHandlers[it.Topic]; ok {
			return h
		}
	}
	if h, ok := c.handlers[it.Business]; ok {
		return h
	}
	return c.fallback
}

// resetHandler returns the reset handler of businesses, or of topics.
func (c *Client) resetHandler(topic bool) ResetHandler {
	c.mu.Lock()
	defer c.mu.Unlock()
	if topic {
		return c.onTopicReset
	}
	return c.onReset
}

// Run connects, syncs and delivers items to the handlers, reconnecting
// with backoff, until ctx ends; it then persists the sync points and
// topic cursors, closes
// the link and returns nil, with none of its goroutines left. It returns
// early with a *ServerError wrapping ErrUnauthenticated or
// ErrUnsupportedVersion when the server refuses the client in a way a
// retry cannot cure, or an error wrapping ErrReplaced when another link
// of the device took over. Run again to resume.
func (c *Client) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer c.running.Store(false)
	if t := c.tracker; t != nil {
		kctx, stop := context.WithCancel(ctx)
		kept := make(chan struct{})
		go func() { t.keep(kctx, c); close(kept) }()
		defer func() {
			stop()
			<-kept
			t.save(c) // after the loop: what the last link left unanswered too
		}()
	}
	r := newRun(c)
	defer r.timer.Stop()
	attempt, next := 0, 0
	for {
		ep := c.endpoints[next%len(c.endpoints)]
		res := r.runLink(ctx, ep)
		if ctx.Err() != nil {
			return nil
		}
		if res.err != nil {
			return res.err
		}
		if res.healthy {
			attempt = 0
		}
		if res.rotate {
			next++
		}
		if res.again {
			continue
		}
		wait := max(res.after, backoff(attempt, c.cfg.MinBackoff, c.cfg.MaxBackoff))
		attempt = min(attempt+1, 62)
		c.log.Info().Str("url", ep.raw).Str("reason", res.reason).Dur("retry_in", wait).Msg("link ended")
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// Login binds the user named by token (a token for this device, app and
// that user) on the current link; the server then syncs the user's
// backlog. It does not wait for the server: a refused token comes back as
// Stats.LastError. Config.Token must return tokens for the user from now
// on, for the next connections.
func (c *Client) Login(ctx context.Context, token string) error {
	return c.event(ctx, &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: token})
}

// Logout unbinds the user on the current link: the user's items stop.
// Config.Token must return tokens without a user from now on.
func (c *Client) Logout(ctx context.Context) error {
	return c.event(ctx, &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGOUT})
}

// Foreground tells the server the app came to the foreground; it runs a
// sync round.
func (c *Client) Foreground(ctx context.Context) error {
	return c.event(ctx, &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_FOREGROUND})
}

// Background tells the server the app went to the background.
func (c *Client) Background(ctx context.Context) error {
	return c.event(ctx, &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_BACKGROUND})
}

// event sends e on the current link.
func (c *Client) event(ctx context.Context, e *gatewaypb.ClientEvent) error {
	c.mu.Lock()
	l := c.cur
	c.mu.Unlock()
	if l == nil {
		return ErrNotConnected
	}
	return l.send(ctx, &gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: e}})
}

// Points returns a copy of the sync points persisted in StateDir, by
// business.
func (c *Client) Points() map[string]SyncPoint {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.persisted)
}

// TopicCursors returns a copy of the topic cursors persisted in StateDir,
// by topic.
func (c *Client) TopicCursors() map[string]SyncPoint {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.persistedTopics)
}

// Stats returns the client's counters now.
func (c *Client) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stats
}

// count updates the stats under the lock.
func (c *Client) count(f func(*Stats)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(&c.stats)
}

func (c *Client) setPersisted(user string, points, topics map[string]SyncPoint) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.persisted, c.persistedUser, c.persistedTopics = points, user, topics
}

// setLink makes l the current link.
func (c *Client) setLink(l *link) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur = l
	c.offset, c.httpLast = l.offset, l.ep.http
	c.stats.Connected = true
	c.stats.URL, c.stats.SessionID = l.ep.raw, l.welcome.SessionId
	c.stats.Connects++
	if c.stats.Connects > 1 {
		c.stats.Reconnects++
	}
}

// clearLink forgets l, the link that ended.
func (c *Client) clearLink(l *link) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == l {
		c.cur = nil
		c.stats.Connected = false
	}
}

// codecFor returns a codec of the limits a Welcome announced, reusing the
// last one when they are the same.
func (c *Client) codecFor(maxFrame, compressMin int) (*wire.Codec, error) {
	if maxFrame <= 0 {
		maxFrame = wire.DefaultMaxFrame
	}
	maxFrame = min(maxFrame, 64<<20)
	if compressMin <= 0 {
		compressMin = wire.DefaultCompressMin
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if lc := c.linkCodec; lc != nil && lc.MaxFrame() == maxFrame && lc.CompressMin() == compressMin {
		return lc, nil
	}
	codec, err := wire.NewCodec(wire.Options{MaxFrame: maxFrame, CompressMin: compressMin})
	if err != nil {
		return nil, err
	}
	c.linkCodec = codec
	return codec, nil
}
