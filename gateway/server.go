package gateway

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
)

// Defaults of Config.
const (
	DefaultHeartbeat    = 25 * time.Second
	DefaultProbeTimeout = 10 * time.Second
	DefaultHelloTimeout = 10 * time.Second
	DefaultWriteTimeout = 10 * time.Second
	DefaultMaxConns     = 100_000
	DefaultSendQueue    = 1024 // frames
	DefaultSendBytes    = 4 << 20
	DefaultInboundRate  = 50 // frames per second, with a burst of twice that
	DefaultSyncBatch    = 256
	DefaultHeldLive     = 4096
	DefaultDrainHint    = 2 * time.Second
)

// Config configures a Server. A zero field takes the default.
type Config struct {
	// Inbox serves backlogs, live entries and acks. Required.
	Inbox *oplog.Inbox
	// Topics serves topic messages (read diffusion) and topics.Everyone.
	// Optional: without it sessions get inbox entries only.
	Topics *topics.Topics
	// Views serves switches and releases (delivery.Delivery) to the
	// clients that ask for them in their Hello. Optional.
	Views Views
	// Devices is told of every device that connects (delivery.Registry),
	// for dry runs. Optional.
	Devices Devices
	// Suppress, if set, is asked of every entry before it is sent: true
	// drops it (delivery.Delivery.Suppressed: recalled pushes). It must be
	// fast and must not block.
	Suppress func(*oplogpb.Entry) bool
	// Receipts records push receipts (delivery.Delivery). Optional.
	Receipts Receipts
	// Analytics stores the tracking events clients send over their link
	// (analytics.Ingestor). Optional.
	Analytics Analytics
	// Buckets groups businesses for sync rounds: one read per non-empty
	// bucket, in priority order. Optional: without it a round reads every
	// business together (one read per inbox).
	Buckets *buckets.Map
	// Scheduler admits bucket computations and defers low-priority
	// buckets under load; it also keeps the per-bucket metrics. Optional.
	Scheduler *buckets.Scheduler
	// PerBusiness computes every business on its own (one read each):
	// the baseline the buckets are measured against. Benchmarks only.
	PerBusiness bool
	// Tokens verifies client tokens. Required.
	Tokens *Verifier
	// MaxFrame and CompressMin bound and tune frames (wire defaults).
	MaxFrame, CompressMin int
	// NoCompression refuses zstd even to clients that offer it.
	NoCompression bool
	// Heartbeat is the Ping interval suggested to clients. A link silent for
	// Heartbeat plus half of it gets a Probe; one silent for three
	// Heartbeats is closed as idle.
	Heartbeat time.Duration
	// ProbeTimeout is how long a Probe may go unanswered before the link is
	// closed as dead.
	ProbeTimeout time.Duration
	// HelloTimeout bounds the time from accept (and TLS handshake) to Hello.
	HelloTimeout time.Duration
	// WriteTimeout bounds one write to a link.
	WriteTimeout time.Duration
	// MaxConns is the most links served at once; more are refused.
	MaxConns int
	// SendQueue and SendBytes bound a link's queue of frames not yet
	// written; live traffic beyond them disconnects the link as a slow
	// consumer (it resyncs from its sync point when it reconnects).
	SendQueue, SendBytes int
	// InboundRate is the most frames per second a client may send (with a
	// burst of twice as many); beyond it the link is closed.
	InboundRate int
	// SyncBatch is the most items per Sync frame.
	SyncBatch int
	// HeldLive is the most live entries a link holds while a sync round
	// runs; beyond it they are dropped and the round is run again, reading
	// them from the inbox (a gap on the live path becomes a backlog read).
	HeldLive int
	// NoPoller keeps a reader goroutine on every link. By default idle
	// plain-TCP links on Linux have none: epoll watches them.
	NoPoller bool
	// DrainHint is the spread of the reconnect hints sent on shutdown, so
	// that clients do not all come back in the same millisecond.
	DrainHint time.Duration
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
}

func (c *Config) defaults() error {
	if c.Inbox == nil || c.Tokens == nil {
		return errors.New("gateway: Config.Inbox and Tokens are required")
	}
	def := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	defInt := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&c.Heartbeat, DefaultHeartbeat)
	def(&c.ProbeTimeout, DefaultProbeTimeout)
	def(&c.HelloTimeout, DefaultHelloTimeout)
	def(&c.WriteTimeout, DefaultWriteTimeout)
	def(&c.DrainHint, DefaultDrainHint)
	defInt(&c.MaxConns, DefaultMaxConns)
	defInt(&c.SendQueue, DefaultSendQueue)
	defInt(&c.SendBytes, DefaultSendBytes)
	defInt(&c.InboundRate, DefaultInboundRate)
	defInt(&c.SyncBatch, DefaultSyncBatch)
	defInt(&c.HeldLive, DefaultHeldLive)
	return nil
}

// Server serves apps over TCP (TLV frames) and WebSocket. Safe for
// concurrent use.
type Server struct {
	cfg   Config
	codec *wire.Codec
	log   zerolog.Logger

	conns    atomic.Int64 // links accepted and not yet closed
	draining atomic.Bool
	slow     atomic.Int64 // links cut as slow consumers

	poller *poller // nil: every link keeps a reader goroutine

	mu        sync.Mutex
	sessions  map[*session]struct{}
	byDevice  map[string]*session // the newest session of each app/device
	listeners map[net.Listener]struct{}
	everyone  *topics.Watch       // Everyone's messages, for every session
	follows   *topics.FollowWatch // every user's follow events

	// everyoneBuf is onEveryone's snapshot of the sessions, reused: only
	// the messages projection's goroutine (one) touches it.
	everyoneBuf []*session

	umu    sync.Mutex
	byUser map[string][]userWatch // sessions following a user's follow events
	done   chan struct{}          // closed by Shutdown

	ingestSlots chan struct{} // tracking batches being stored, at most maxIngests
	wg          sync.WaitGroup
}

// NewServer returns a server; serve links with ServeTCP and
// WebSocketHandler, stop with Shutdown.
func NewServer(cfg Config) (*Server, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	codec, err := wire.NewCodec(wire.Options{MaxFrame: cfg.MaxFrame, CompressMin: cfg.CompressMin})
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg: cfg, codec: codec, log: zerolog.Nop(),
		sessions:    map[*session]struct{}{},
		byDevice:    map[string]*session{},
		listeners:   map[net.Listener]struct{}{},
		done:        make(chan struct{}),
		ingestSlots: make(chan struct{}, maxIngests),
	}
	if cfg.Logger != nil {
		s.log = cfg.Logger.With().Str("component", "gateway").Logger()
	}
	if !cfg.NoPoller {
		if s.poller, err = newPoller(); err != nil {
			s.log.Warn().Err(err).Msg("no poller: every link keeps a reader goroutine")
		}
	}
	if cfg.Topics != nil {
		// Everyone's messages go to every session: one watch for the
		// node, not one per link.
		if s.everyone, err = cfg.Topics.Watch(topics.Everyone, s.onEveryone); err != nil {
			if s.poller != nil {
				s.poller.close()
			}
			return nil, fmt.Errorf("gateway: watch %s: %w", topics.Everyone, err)
		}
		// Follow events likewise: one watch, routed to the user's sessions.
		s.byUser = map[string][]userWatch{}
		if s.follows, err = cfg.Topics.WatchAllFollows(s.routesUser, s.onFollowEvent); err != nil {
			s.everyone.Stop()
			if s.poller != nil {
				s.poller.close()
			}
			return nil, fmt.Errorf("gateway: watch follows: %w", err)
		}
	}
	if cfg.Views != nil {
		s.wg.Add(1)
		go s.followViews()
	}
	return s, nil
}

// userWatch is a session following a user's follow events, with the gate
// of the plan that registered it.
type userWatch struct {
	ss   *session
	gate *followGate
}

// watchUser routes user's follow events to ss (through gate) until
// unwatchUser.
func (s *Server) watchUser(user string, ss *session, gate *followGate) {
	s.umu.Lock()
	s.byUser[user] = append(s.byUser[user], userWatch{ss, gate})
	s.umu.Unlock()
}

func (s *Server) unwatchUser(user string, gate *followGate) {
	s.umu.Lock()
	defer s.umu.Unlock()
	list := slices.DeleteFunc(s.byUser[user], func(w userWatch) bool { return w.gate == gate })
	if len(list) == 0 {
		delete(s.byUser, user)
		return
	}
	s.byUser[user] = list
}

// routesUser reports whether a session of user follows its follow events:
// topics decodes a follow relation only for such a user.
func (s *Server) routesUser(user string) bool {
	s.umu.Lock()
	defer s.umu.Unlock()
	_, ok := s.byUser[user]
	return ok
}

// onFollowEvent hands a follow event to the sessions of its user, on the
// follows projection's goroutine.
func (s *Server) onFollowEvent(f topics.Follow) {
	s.umu.Lock()
	list := slices.Clone(s.byUser[f.User])
	s.umu.Unlock()
	for _, w := range list {
		w.ss.onFollow(w.gate, f)
	}
}

// onEveryone hands a message of topics.Everyone to every session past
// Hello, on the topics projection's goroutine. A session registers before
// its first round reads the backlog, so none misses one. The checks that
// hold for every session (expiry, Suppress) run once.
func (s *Server) onEveryone(e *oplogpb.Entry) {
	if s.dropLive(e) {
		return
	}
	sessions := s.sessionList(s.everyoneBuf)
	for _, ss := range sessions {
		ss.offerTopic(e)
	}
	clear(sessions) // keep no finished session alive until the next message
	s.everyoneBuf = sessions[:0]
}

// sessionList returns the sessions past Hello, appended to buf[:0].
func (s *Server) sessionList(buf []*session) []*session {
	s.mu.Lock()
	defer s.mu.Unlock()
	buf = buf[:0]
	for ss := range s.sessions {
		buf = append(buf, ss)
	}
	return buf
}

// Stats is a snapshot of the server's load.
type Stats struct {
	Conns         int64 `json:"conns"`          // links open, including those not past Hello
	Sessions      int   `json:"sessions"`       // links past Hello
	Draining      bool  `json:"draining"`       //
	SlowConsumers int64 `json:"slow_consumers"` // links cut because their send queue overflowed, since start
}

// Stats returns the server's load now.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Conns: s.conns.Load(), Sessions: len(s.sessions), Draining: s.draining.Load(), SlowConsumers: s.slow.Load()}
}

// admit counts a new link, or refuses it when the server is full or
// draining.
func (s *Server) admit() (ok bool, why gatewaypb.Error_Code) {
	if s.draining.Load() {
		return false, gatewaypb.Error_CODE_UNAVAILABLE
	}
	if s.conns.Add(1) > int64(s.cfg.MaxConns) {
		s.conns.Add(-1)
		return false, gatewaypb.Error_CODE_TOO_MANY_CONNECTIONS
	}
	return true, 0
}

// refuse tells a link the server will not serve it, and closes it.
func (s *Server) refuse(l link, code gatewaypb.Error_Code) {
	s.log.Warn().Str("transport", l.transport()).Str("remote", l.remote()).Str("code", code.String()).Msg("link refused")
	frames := []*gatewaypb.Frame{
		errorFrame(code, "server full or draining; reconnect later", true),
		goAwayFrame(gatewaypb.GoAway_REASON_SHUTDOWN, code.String(), s.reconnectHint()),
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = l.write(ctx, frames)
	l.close()
}

// reconnectHint is a random delay in [DrainHint/4, DrainHint).
func (s *Server) reconnectHint() time.Duration {
	d := s.cfg.DrainHint
	var b [8]byte
	_, _ = rand.Read(b[:])
	n := uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24
	return d/4 + time.Duration(n%uint64(max(d*3/4, 1)))
}

// serve runs one link to its end; the session's finish releases the
// link's place in s.conns and s.wg.
func (s *Server) serve(l link) { newSession(s, l).run() }

// register adds a session past Hello. A previous session of the same
// device is replaced: it is drained and closed (soft close).
func (s *Server) register(ss *session) (ok bool) {
	s.mu.Lock()
	if s.draining.Load() {
		s.mu.Unlock()
		return false
	}
	s.sessions[ss] = struct{}{}
	key := ss.app + "/" + ss.device
	old := s.byDevice[key]
	s.byDevice[key] = ss
	s.mu.Unlock()
	if old != nil {
		old.logAt(zerolog.InfoLevel).Str("by", ss.id).Msg("session replaced by a newer link")
		go old.softClose(gatewaypb.GoAway_REASON_REPLACED, "the device opened a newer link", 0)
	}
	return true
}

func (s *Server) unregister(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.sessions, ss)
	if key := ss.app + "/" + ss.device; s.byDevice[key] == ss {
		delete(s.byDevice, key)
	}
}

// Shutdown stops accepting links, tells every client to go away (with a
// spread reconnect hint), drains their queues and closes them, waiting at
// most until ctx ends; links still open then are closed hard.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.draining.Swap(true) {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	close(s.done)
	for l := range s.listeners {
		_ = l.Close()
	}
	s.mu.Unlock()
	// Draining: register admits no session now, so the list only shrinks.
	sessions := s.sessionList(nil)
	s.log.Info().Int("sessions", len(sessions)).Msg("draining")
	var wg sync.WaitGroup
	for _, ss := range sessions {
		wg.Go(func() { ss.softClose(gatewaypb.GoAway_REASON_SHUTDOWN, "server shutting down", s.reconnectHint()) })
	}
	finished := make(chan struct{})
	go func() {
		wg.Wait()
		s.wg.Wait()
		close(finished)
	}()
	defer func() {
		if s.everyone != nil {
			s.everyone.Stop()
			s.follows.Stop()
		}
		if s.poller != nil {
			s.poller.close()
		}
	}()
	select {
	case <-finished:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for ss := range s.sessions {
			ss.shut() // a polled link has no reader to notice a bare close
		}
		s.mu.Unlock()
		<-finished
		return fmt.Errorf("gateway: drain cut short: %w", ctx.Err())
	}
}

// ServeTCP accepts TLV links on ln until Shutdown (it then returns nil) or
// an accept error.
func (s *Server) ServeTCP(ln net.Listener) error {
	s.mu.Lock()
	if s.draining.Load() {
		s.mu.Unlock()
		return nil
	}
	s.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			select {
			case <-s.done:
				return nil
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("gateway: accept: %w", err)
			}
			// Out of file descriptors and the like: wait it out, as
			// net/http does.
			delay = min(max(delay*2, 5*time.Millisecond), time.Second)
			s.log.Warn().Err(err).Dur("retry_in", delay).Msg("accept failed")
			time.Sleep(delay)
			continue
		}
		delay = 0
		l := newTCPLink(s, c)
		if ok, why := s.admit(); !ok {
			go s.refuse(l, why)
			continue
		}
		s.wg.Add(1)
		go s.serve(l)
	}
}

// WebSocketHandler serves WebSocket links (sub-protocols sluice.v1.proto
// and sluice.v1.json). originPatterns lists the browser origins allowed
// besides the server's own host (see coder/websocket AcceptOptions).
func (s *Server) WebSocketHandler(originPatterns []string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Count the link in s.wg before the upgrade, under the lock that
		// Shutdown takes to start draining, so that Shutdown waits for it.
		s.mu.Lock()
		ok, why := s.admit()
		if ok {
			s.wg.Add(1)
		}
		s.mu.Unlock()
		if !ok {
			http.Error(w, why.String(), http.StatusServiceUnavailable)
			return
		}
		l, err := acceptWebSocket(s, w, r, originPatterns)
		if err != nil {
			s.conns.Add(-1)
			s.wg.Done()
			s.log.Warn().Err(err).Str("remote", r.RemoteAddr).Msg("websocket upgrade refused")
			return
		}
		// The session gets a goroutine of its own and the handler returns:
		// the link is hijacked, and net/http's goroutine (with its grown
		// stack) and request need not live as long as it.
		go s.serve(l)
	})
}

// newID returns a random session id.
func newID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func errorFrame(code gatewaypb.Error_Code, msg string, fatal bool) *gatewaypb.Frame {
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Error{Error: &gatewaypb.Error{Code: code, Message: msg, Fatal: fatal}}}
}

func goAwayFrame(reason gatewaypb.GoAway_Reason, msg string, after time.Duration) *gatewaypb.Frame {
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Goaway{Goaway: &gatewaypb.GoAway{
		Reason: reason, Message: msg, ReconnectAfterMs: uint32(after / time.Millisecond)}}}
}
