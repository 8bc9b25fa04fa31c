package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unique"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
)

// Limits on what a client may send.
const (
	maxPoints = 1000 // sync points in one Hello or Ack
	maxTopics = 1000
)

// session is one link past (or waiting for) Hello. Its goroutines:
//   - Hello's, until the session starts;
//   - the reader (run), for the life of the link, except a polled TLV
//     link's, which the poller reads (readable) only while it has data;
//   - a flusher, only while frames are queued (no idle writer);
//   - a sync round, only while one runs;
//   - the liveness timer's callback, briefly.
//
// Live entries arrive on the projection's goroutine (onLive) and are only
// queued there.
type session struct {
	srv  *Server
	link link
	id   string

	// Set by hello, then read-only.
	device, app string

	polled    atomic.Bool // the poller reads the link (no reader goroutine)
	pollToken uint64
	finished  sync.Once

	lastRecv atomic.Int64 // unix nanos of the last frame read
	probe    atomic.Uint64
	probeAt  atomic.Int64 // unix nanos a probe went out; 0: none outstanding
	timer    *time.Timer

	tokens float64 // inbound rate limiter: the reader's own
	tokenT time.Time

	roundDone chan struct{} // closed when the running sync round ends

	mu          sync.Mutex
	user        string
	attrs       unique.Handle[oplog.Attrs] // interned: devices share few distinct attributes
	userWatch   *oplog.Watch
	devWatch    *oplog.Watch
	queue       []*gatewaypb.Frame
	queued      int // bytes, roughly
	writing     bool
	room        *sync.Cond // a sync round waits on it for queue space
	closing     bool       // no more frames are queued
	closed      bool
	gen         uint64                     // bumped when the bound user changes
	roundCancel context.CancelFunc         // cancels the running round's reads
	syncing     bool                       // a sync round runs: live entries are held
	again       bool                       // another round after this one
	held        []*oplogpb.Entry           // live entries held during a round
	sent        map[string]oplog.SyncPoint // highest id sent per business
	points      map[string]oplog.SyncPoint // the next round's starting points
	resets      []string                   // businesses to report reset in the next Sync
	topics      *topicState                // nil unless the server serves topics
	deferral    *deferral                  // nil unless a round deferred buckets
	view        *viewState                 // nil unless the client wants views

	analyticsAcks atomic.Bool  // the client wants AnalyticsAck frames
	ingests       atomic.Int32 // its tracking batches being stored
	closeOnce     sync.Once
}

func newSession(s *Server, l link) *session {
	ss := &session{srv: s, link: l, id: newID(), sent: map[string]oplog.SyncPoint{}, attrs: noAttrs}
	ss.room = sync.NewCond(&ss.mu)
	return ss
}

// logAt starts a log event at level l carrying the session's fields. The
// session keeps no logger of its own: a per-link logger context would cost
// every idle link half a kilobyte for lines that are rarely written.
func (ss *session) logAt(l zerolog.Level) *zerolog.Event {
	e := ss.srv.log.WithLevel(l)
	if e == nil {
		return nil // level disabled; zerolog's methods accept a nil event
	}
	e = e.Str("session", ss.id).Str("transport", ss.link.transport()).Str("remote", ss.link.remote())
	if ss.device != "" {
		e = e.Str("device", ss.device).Str("app", ss.app)
	}
	return e
}

// run serves the link until it ends.
func (ss *session) run() {
	handedOff := false
	defer func() {
		if !handedOff {
			ss.finish()
		}
	}()
	// Hello runs on a goroutine of its own: token verification, watches
	// and protobuf decoding grow a stack to 8 KiB, and the reader's stack,
	// which an idle link keeps, should stay the size an idle read needs.
	helloed := make(chan bool)
	go func() { helloed <- ss.hello() }()
	if !<-helloed {
		return
	}
	ss.touch()
	ss.mu.Lock()
	if !ss.closed {
		ss.timer = time.AfterFunc(ss.srv.cfg.Heartbeat, ss.checkLiveness)
	}
	ss.mu.Unlock()
	if ss.poll() {
		handedOff = true // the poller reads from now on, and finishes
		return
	}
	for {
		f, err := ss.link.read(time.Time{})
		if err != nil {
			ss.readFailed(err)
			return
		}
		ss.touch()
		if !ss.allow() {
			ss.fail(gatewaypb.Error_CODE_RATE_LIMITED, gatewaypb.GoAway_REASON_PROTOCOL, "more than the allowed frames per second")
			return
		}
		if !ss.handle(f) {
			return
		}
	}
}

func (ss *session) touch() { ss.lastRecv.Store(time.Now().UnixNano()) }

// readFailed logs why the reader stopped and closes the link.
func (ss *session) readFailed(err error) {
	switch {
	case errors.Is(err, wire.ErrFrameTooLarge):
		ss.fail(gatewaypb.Error_CODE_FRAME_TOO_LARGE, gatewaypb.GoAway_REASON_PROTOCOL, err.Error())
	case errors.Is(err, wire.ErrBadFrame):
		ss.fail(gatewaypb.Error_CODE_BAD_FRAME, gatewaypb.GoAway_REASON_PROTOCOL, err.Error())
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, errPeerClosed):
		ss.logAt(zerolog.DebugLevel).Err(err).Msg("link closed")
		ss.shut()
	default:
		ss.logAt(zerolog.DebugLevel).Err(err).Msg("link read failed")
		ss.shut()
	}
}

// hello waits for the client's Hello, authenticates it and starts the
// session: welcome, watches, first sync round.
func (ss *session) hello() bool {
	cfg := &ss.srv.cfg
	f, err := ss.link.read(time.Now().Add(cfg.HelloTimeout))
	if err != nil {
		if errors.Is(err, wire.ErrBadFrame) || errors.Is(err, wire.ErrFrameTooLarge) {
			ss.readFailed(err)
		} else {
			ss.logAt(zerolog.DebugLevel).Err(err).Msg("no hello")
			ss.shut()
		}
		return false
	}
	h := f.GetHello()
	if h == nil {
		ss.fail(gatewaypb.Error_CODE_BAD_FRAME, gatewaypb.GoAway_REASON_PROTOCOL, fmt.Sprintf("first frame must be hello, got type %d", wire.TypeOf(f)))
		return false
	}
	if h.Version != wire.Version {
		ss.fail(gatewaypb.Error_CODE_UNSUPPORTED_VERSION, gatewaypb.GoAway_REASON_PROTOCOL, fmt.Sprintf("protocol version %d; this server speaks %d", h.Version, wire.Version))
		return false
	}
	claims, err := cfg.Tokens.Verify(h.Token, time.Now())
	if err != nil {
		code := gatewaypb.Error_CODE_UNAUTHENTICATED
		if errors.Is(err, ErrTokenExpired) {
			code = gatewaypb.Error_CODE_TOKEN_EXPIRED
		}
		ss.fail(code, gatewaypb.GoAway_REASON_AUTH, err.Error())
		return false
	}
	points, err := syncPoints(h.Points)
	var cursors map[string]topics.Cursor
	if err == nil {
		cursors, err = topicCursors(h.Topics)
	}
	if err != nil {
		ss.fail(gatewaypb.Error_CODE_INVALID, gatewaypb.GoAway_REASON_PROTOCOL, err.Error())
		return false
	}
	ss.device, ss.app = claims.Device, claims.App
	var resets []string
	if h.PointsUser != claims.User {
		// Points earned under another user say nothing about this one's
		// inboxes: those businesses start over, and the client is told.
		for _, b := range cfg.Inbox.Log().Businesses() {
			if p, ok := points[b.Code]; ok && b.Dimension != oplogpb.Dimension_DIMENSION_DEVICE {
				points[b.Code] = oplog.SyncPoint{}
				if p.ID != 0 {
					resets = append(resets, b.Code)
				}
			}
		}
	}
	ss.mu.Lock()
	ss.user = claims.User
	ss.attrs = attrsOf(h.Attrs)
	ss.points = points
	ss.resets = resets
	if cfg.Topics != nil {
		ss.topics = newTopicState(cursors)
	}
	if cfg.Views != nil && h.Views {
		ss.view = &viewState{digest: h.ViewDigest}
	}
	ss.analyticsAcks.Store(h.Analytics)
	ss.mu.Unlock()

	compress := !cfg.NoCompression && ss.link.canCompress() && slices.Contains(h.Compression, gatewaypb.Compression_COMPRESSION_ZSTD)
	w := &gatewaypb.Welcome{
		SessionId:        ss.id,
		ServerTimeMs:     time.Now().UnixMilli(),
		HeartbeatMs:      uint32(cfg.Heartbeat / time.Millisecond),
		IdleTimeoutMs:    uint32(ss.deadAfter() / time.Millisecond),
		CompressMinBytes: uint32(ss.srv.codec.CompressMin()),
		MaxFrameBytes:    uint32(ss.srv.codec.MaxFrame()),
		User:             claims.User,
		Device:           claims.Device,
		Version:          wire.Version,
	}
	if compress {
		w.Compression = gatewaypb.Compression_COMPRESSION_ZSTD
	}
	// Welcome goes out first and uncompressed, before anything is queued;
	// every frame after it may be compressed.
	ctx, cancel := context.WithTimeout(context.Background(), cfg.WriteTimeout)
	err = ss.link.write(ctx, []*gatewaypb.Frame{{Body: &gatewaypb.Frame_Welcome{Welcome: w}}})
	cancel()
	if err != nil {
		ss.logAt(zerolog.DebugLevel).Err(err).Msg("welcome not written")
		ss.shut()
		return false
	}
	ss.link.setCompress(compress)
	// Hold live entries from the moment the watches exist until the first
	// round has read the backlog: an entry sent live before the round
	// began would move the round's starting point past entries it has not
	// read yet.
	ss.mu.Lock()
	ss.syncing = true
	ss.roundDone = make(chan struct{})
	done := ss.roundDone
	ss.mu.Unlock()
	if err := ss.watch(claims.User); err != nil {
		close(done)
		ss.logAt(zerolog.ErrorLevel).Err(err).Msg("watch failed")
		ss.fail(gatewaypb.Error_CODE_UNAVAILABLE, gatewaypb.GoAway_REASON_SHUTDOWN, "cannot follow the inbox now")
		return false
	}
	// Registered only now: a newer link of the device, or a shutdown, may
	// close this session from here on, never while Welcome is written.
	if !ss.srv.register(ss) {
		close(done)
		ss.fail(gatewaypb.Error_CODE_UNAVAILABLE, gatewaypb.GoAway_REASON_SHUTDOWN, "server shutting down")
		return false
	}
	ss.logAt(zerolog.InfoLevel).Str("user", claims.User).Str("previous", h.SessionId).Int("points", len(points)).Bool("zstd", compress).Msg("session started")
	ss.deviceChanged(h.Push)
	go ss.syncRounds(done)
	return true
}

// syncPoints converts and checks client sync points.
func syncPoints(in []*gatewaypb.SyncPoint) (map[string]oplog.SyncPoint, error) {
	if len(in) > maxPoints {
		return nil, fmt.Errorf("%d sync points, at most %d", len(in), maxPoints)
	}
	out := make(map[string]oplog.SyncPoint, len(in))
	for _, p := range in {
		if !oplog.ValidBusiness(p.Business) {
			return nil, fmt.Errorf("sync point of business %.40q: bad code", p.Business)
		}
		out[p.Business] = oplog.SyncPoint{ID: p.Id, Epoch: p.Epoch}
	}
	return out, nil
}

// noAttrs is the attributes of a client that reported none.
var noAttrs = unique.Make(oplog.Attrs{})

// attrsOf interns a client's attributes: sessions with the same ones
// share one copy.
func attrsOf(a *gatewaypb.Attrs) unique.Handle[oplog.Attrs] {
	if a == nil {
		return noAttrs
	}
	return unique.Make(oplog.Attrs{AppVersion: a.AppVersion, OS: a.Os, OSVersion: a.OsVersion, Model: a.Model,
		Region: a.Region, Network: a.Network, Channel: a.Channel, CPU: a.Cpu})
}

// watch follows the device's inbox and, if bound, the user's.
func (ss *session) watch(user string) error {
	in := ss.srv.cfg.Inbox
	dw, err := in.Watch(oplogpb.Dimension_DIMENSION_DEVICE, ss.device, ss.onLive)
	if err != nil {
		return err
	}
	ss.mu.Lock()
	closed := ss.closed
	if !closed {
		ss.devWatch = dw
	}
	ss.mu.Unlock()
	if closed {
		dw.Stop()
		return nil
	}
	return ss.bindUser(user, false)
}

// bindUser follows user's inbox instead of the current user's ("" for
// none). With round set, a change of user starts a sync round in the same
// critical section, so that no live entry of the new user is sent before
// the round has read the backlog.
func (ss *session) bindUser(user string, round bool) error {
	var uw *oplog.Watch
	if user != "" {
		var err error
		if uw, err = ss.srv.cfg.Inbox.Watch(oplogpb.Dimension_DIMENSION_USER, user, ss.onLive); err != nil {
			return err
		}
	}
	plan, err := ss.prepareTopics(user)
	if err != nil {
		if uw != nil {
			uw.Stop()
		}
		return err
	}
	ss.mu.Lock()
	old := ss.userWatch
	if user != ss.user {
		// Ids of user businesses belong to one user: what was sent or
		// presented for the previous one says nothing about this one. The
		// next round starts these businesses over and tells the client.
		for _, b := range ss.srv.cfg.Inbox.Log().Businesses() {
			if b.Dimension == oplogpb.Dimension_DIMENSION_DEVICE {
				continue
			}
			_, sent := ss.sent[b.Code]
			_, presented := ss.points[b.Code]
			if ss.user != "" || sent || presented {
				delete(ss.sent, b.Code)
				ss.points[b.Code] = oplog.SyncPoint{}
				ss.resets = append(ss.resets, b.Code)
			}
		}
		// A round running for the previous user must not commit what it
		// read, nor queue more of it.
		ss.gen++
		ss.room.Broadcast()
	}
	ss.user, ss.userWatch = user, uw
	oldTopics, late := ss.applyTopicsLocked(plan)
	closed := ss.closed
	if round {
		ss.startRoundLocked()
	}
	ss.mu.Unlock()
	if old != nil {
		old.Stop()
	}
	oldTopics.release()
	if closed {
		if uw != nil {
			uw.Stop()
		}
		ss.stopTopicWatches()
		return nil
	}
	ss.deviceChanged(nil)
	if len(late) > 0 {
		// Followed while the index was read: watch, then read again.
		for _, name := range late {
			if err := ss.watchTopic(user, name); err != nil {
				return err
			}
		}
		ss.startRound()
	}
	return nil
}

// handle acts on one client frame; false ends the session.
func (ss *session) handle(f *gatewaypb.Frame) bool {
	switch b := f.Body.(type) {
	case *gatewaypb.Frame_Ping:
		ss.enqueue(&gatewaypb.Frame{Body: &gatewaypb.Frame_Pong{Pong: &gatewaypb.Pong{
			ClientTimeMs: b.Ping.ClientTimeMs, ServerTimeMs: time.Now().UnixMilli()}}})
	case *gatewaypb.Frame_Probe:
		ss.enqueue(&gatewaypb.Frame{Body: &gatewaypb.Frame_ProbeEcho{ProbeEcho: &gatewaypb.ProbeEcho{Seq: b.Probe.Seq}}})
	case *gatewaypb.Frame_ProbeEcho:
		if b.ProbeEcho.Seq == ss.probe.Load() {
			ss.probeAt.Store(0)
		}
	case *gatewaypb.Frame_Pong:
		// Answers a ping the server never sends; harmless.
	case *gatewaypb.Frame_Ack:
		return ss.ack(b.Ack)
	case *gatewaypb.Frame_Event:
		return ss.event(b.Event)
	default:
		ss.fail(gatewaypb.Error_CODE_BAD_FRAME, gatewaypb.GoAway_REASON_PROTOCOL, fmt.Sprintf("a client does not send frame type %d", wire.TypeOf(f)))
		return false
	}
	return true
}

// ack records the client's sync points. A refused point gets a non-fatal
// error: the client keeps its data, the server its older sync point.
func (ss *session) ack(a *gatewaypb.Ack) bool {
	points, err := syncPoints(a.Points)
	var cursors map[string]topics.Cursor
	if err == nil {
		cursors, err = topicCursors(a.Topics)
	}
	if err != nil {
		ss.fail(gatewaypb.Error_CODE_INVALID, gatewaypb.GoAway_REASON_PROTOCOL, err.Error())
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), ss.srv.cfg.WriteTimeout)
	defer cancel()
	if len(cursors) > 0 && ss.srv.cfg.Topics != nil {
		if err := ss.srv.cfg.Topics.Ack(ctx, ss.device, cursors); err != nil {
			code := gatewaypb.Error_CODE_INVALID
			if errors.Is(err, oplog.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
				code = gatewaypb.Error_CODE_UNAVAILABLE
			}
			ss.logAt(zerolog.WarnLevel).Err(err).Msg("topic ack refused")
			ss.enqueue(errorFrame(code, "topic ack not recorded: "+err.Error(), false))
		}
	}
	if len(points) == 0 {
		return true
	}
	ss.mu.Lock()
	user := ss.user
	ss.mu.Unlock()
	if err := ss.srv.cfg.Inbox.Ack(ctx, user, ss.device, points); err != nil {
		code := gatewaypb.Error_CODE_INVALID
		if errors.Is(err, oplog.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
			code = gatewaypb.Error_CODE_UNAVAILABLE
		}
		ss.logAt(zerolog.WarnLevel).Err(err).Msg("ack refused")
		ss.enqueue(errorFrame(code, "ack not recorded: "+err.Error(), false))
	}
	return true
}

// event handles a client event: foreground and login start a sync round;
// logout unbinds the user; attrs, with any type (or none), replace the
// session's attributes; receipts and a push address, with any type, are
// recorded.
func (ss *session) event(e *gatewaypb.ClientEvent) bool {
	if e.Attrs != nil {
		ss.mu.Lock()
		ss.attrs = attrsOf(e.Attrs)
		ss.mu.Unlock()
	}
	if e.Attrs != nil || e.Push != nil {
		ss.deviceChanged(e.Push)
	}
	if e.Analytics != nil {
		ss.ingest(e)
	}
	if len(e.Receipts) > maxReceipts {
		ss.enqueue(errorFrame(gatewaypb.Error_CODE_INVALID, fmt.Sprintf("%d receipts in one event, at most %d", len(e.Receipts), maxReceipts), false))
	} else if rc := ss.srv.cfg.Receipts; rc != nil {
		for _, r := range e.Receipts {
			rc.Received(ss.device, r)
		}
	}
	switch e.Type {
	case gatewaypb.ClientEvent_TYPE_UNSPECIFIED:
		if e.Attrs == nil && e.Push == nil && len(e.Receipts) == 0 && e.Analytics == nil {
			ss.enqueue(errorFrame(gatewaypb.Error_CODE_INVALID, "event without a type, attrs, receipts, push address or tracking events", false))
		}
	case gatewaypb.ClientEvent_TYPE_FOREGROUND:
		ss.startRound()
	case gatewaypb.ClientEvent_TYPE_BACKGROUND:
	case gatewaypb.ClientEvent_TYPE_LOGIN:
		c, err := ss.srv.cfg.Tokens.Verify(e.Token, time.Now())
		switch {
		case errors.Is(err, ErrTokenExpired):
			ss.enqueue(errorFrame(gatewaypb.Error_CODE_TOKEN_EXPIRED, "login token: "+err.Error(), false))
			return true
		case err != nil:
			ss.enqueue(errorFrame(gatewaypb.Error_CODE_UNAUTHENTICATED, "login token: "+err.Error(), false))
			return true
		case c.Device != ss.device || c.App != ss.app || c.User == "":
			ss.enqueue(errorFrame(gatewaypb.Error_CODE_UNAUTHENTICATED, "login token must name this device and app, and a user", false))
			return true
		}
		if err := ss.bindUser(c.User, true); err != nil {
			ss.logAt(zerolog.ErrorLevel).Err(err).Msg("login: watch failed")
			ss.enqueue(errorFrame(gatewaypb.Error_CODE_UNAVAILABLE, "login not done; retry", false))
			return true
		}
		ss.logAt(zerolog.InfoLevel).Str("user", c.User).Msg("user bound")
	case gatewaypb.ClientEvent_TYPE_LOGOUT:
		// The round that follows tells the client which businesses to drop.
		if err := ss.bindUser("", true); err != nil {
			ss.logAt(zerolog.ErrorLevel).Err(err).Msg("logout failed")
		}
		ss.logAt(zerolog.InfoLevel).Msg("user unbound")
	default:
		ss.enqueue(errorFrame(gatewaypb.Error_CODE_INVALID, fmt.Sprintf("unknown event type %d", e.Type), false))
	}
	return true
}

// allow is the inbound rate limit: a token bucket of InboundRate frames
// per second, holding at most twice that.
func (ss *session) allow() bool {
	rate := float64(ss.srv.cfg.InboundRate)
	now := time.Now()
	if ss.tokenT.IsZero() {
		ss.tokens = 2 * rate
	} else {
		ss.tokens = min(2*rate, ss.tokens+now.Sub(ss.tokenT).Seconds()*rate)
	}
	ss.tokenT = now
	if ss.tokens < 1 {
		return false
	}
	ss.tokens--
	return true
}

// deadAfter is the longest a silent link lives: a probe after a heartbeat
// and a half of silence, then the probe timeout.
func (ss *session) deadAfter() time.Duration {
	return ss.srv.cfg.Heartbeat + ss.srv.cfg.Heartbeat/2 + ss.srv.cfg.ProbeTimeout
}

// checkLiveness runs on the liveness timer: a link silent past a
// heartbeat and a half gets a probe; a probe unanswered past ProbeTimeout
// closes it as dead.
func (ss *session) checkLiveness() {
	cfg := &ss.srv.cfg
	now := time.Now()
	silent := now.Sub(time.Unix(0, ss.lastRecv.Load()))
	if at := ss.probeAt.Load(); at != 0 && now.Sub(time.Unix(0, at)) >= cfg.ProbeTimeout {
		ss.logAt(zerolog.InfoLevel).Dur("silent", silent).Msg("probe unanswered: dead link")
		ss.softClose(gatewaypb.GoAway_REASON_DEAD_LINK, "probe unanswered", 0)
		return
	}
	next := cfg.Heartbeat + cfg.Heartbeat/2 - silent
	if silent >= cfg.Heartbeat+cfg.Heartbeat/2 && ss.probeAt.Load() == 0 {
		seq := ss.probe.Add(1)
		ss.probeAt.Store(now.UnixNano())
		ss.enqueue(&gatewaypb.Frame{Body: &gatewaypb.Frame_Probe{Probe: &gatewaypb.Probe{Seq: seq}}})
		next = cfg.ProbeTimeout
	}
	if at := ss.probeAt.Load(); at != 0 {
		next = min(next, cfg.ProbeTimeout-now.Sub(time.Unix(0, at)))
	}
	ss.mu.Lock()
	if !ss.closed {
		ss.timer.Reset(max(next, 10*time.Millisecond))
	}
	ss.mu.Unlock()
}

// onLive receives a live entry from the inbox (on the projection's
// goroutine, or the transient dispatcher): it is filtered for this client
// and queued, or held while a sync round runs. It never blocks.
func (ss *session) onLive(e *oplogpb.Entry) {
	now := time.Now()
	if (e.ExpiresAt != nil && !e.ExpiresAt.AsTime().After(now)) || ss.srv.suppressed(e) {
		return
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.closing || (e.Conditions != nil && !oplog.Match(e.Conditions, ss.attrs.Value())) || !ss.ownsLocked(e) {
		return
	}
	if e.Id == 0 { // transient: now or never, unordered with stored items
		if !ss.deferredLocked(e.Business) { // a deferred bucket gets nothing live
			ss.enqueueLocked(liveFrame(e), true)
			ss.sentPush(e)
		}
		return
	}
	if ss.holdLocked(e) {
		return
	}
	ss.sendLiveLocked(e)
}

// holdLocked keeps a stored live entry (inbox or topic) while a sync round
// runs, and reports whether it did; the round's end sends what is held.
// Too much arriving during a round drops what is held and asks for
// another round, which reads it from the store (a gap on the live path
// becomes a backlog read).
func (ss *session) holdLocked(e *oplogpb.Entry) bool {
	if !ss.syncing {
		return false
	}
	if len(ss.held) >= ss.srv.cfg.HeldLive {
		ss.held = ss.held[:0]
		ss.again = true
		return true
	}
	ss.held = append(ss.held, e)
	return true
}

// sendLiveLocked queues a stored live entry unless the client has it.
func (ss *session) sendLiveLocked(e *oplogpb.Entry) {
	if !ss.ownsLocked(e) {
		return // held before the user changed
	}
	if ss.deferredLocked(e.Business) {
		return // its bucket was deferred: a later round reads it
	}
	last, ok := ss.sent[e.Business]
	if ok && last.Epoch != e.Epoch && last.ID != 0 {
		// The stream was recreated while the client was online: resync
		// (startRoundLocked asks the running round for another, if any).
		ss.startRoundLocked()
		return
	}
	if ok && e.Id <= last.ID {
		return // sent already, by the backlog
	}
	if p, ok := ss.points[e.Business]; ok && p.Epoch == e.Epoch && e.Id <= p.ID {
		return // the client had it before this link
	}
	ss.sent[e.Business] = oplog.SyncPoint{ID: e.Id, Epoch: e.Epoch}
	ss.enqueueLocked(liveFrame(e), true)
	ss.sentPush(e)
}

// ownsLocked reports whether e belongs to an inbox this session follows
// now: a watch being stopped may still deliver the previous user's entries.
func (ss *session) ownsLocked(e *oplogpb.Entry) bool {
	if e.Dimension == oplogpb.Dimension_DIMENSION_DEVICE {
		return e.Target == ss.device
	}
	return ss.user != "" && e.Target == ss.user
}

func liveFrame(e *oplogpb.Entry) *gatewaypb.Frame {
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Live{Live: &gatewaypb.Live{Items: []*gatewaypb.Item{itemOf(e)}}}}
}

func itemOf(e *oplogpb.Entry) *gatewaypb.Item {
	it := &gatewaypb.Item{Id: e.Id, Epoch: e.Epoch, Business: e.Business, Kind: int32(e.Kind),
		Payload: e.Payload, ContentType: e.ContentType, MessageId: e.MessageId, Topic: e.Topic}
	if e.CreatedAt != nil {
		it.CreatedMs = e.CreatedAt.AsTime().UnixMilli()
	}
	if e.ExpiresAt != nil {
		it.ExpiresMs = e.ExpiresAt.AsTime().UnixMilli()
	}
	return it
}

func (ss *session) isClosing() bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	return ss.closing
}

// enqueue queues a frame for the flusher.
func (ss *session) enqueue(f *gatewaypb.Frame) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.enqueueLocked(f, false)
}

// enqueueLocked queues f and starts a flusher if none runs. A live frame
// (bounded) over the queue's limits makes the client a slow consumer: it
// is disconnected, and resyncs from its sync point when it returns.
func (ss *session) enqueueLocked(f *gatewaypb.Frame, bounded bool) {
	if ss.closing {
		return
	}
	size := frameSize(f)
	if bounded && (len(ss.queue) >= ss.srv.cfg.SendQueue || ss.queued+size > ss.srv.cfg.SendBytes) {
		ss.closing = true
		ss.queue = append(ss.queue[:0], errorFrame(gatewaypb.Error_CODE_SLOW_CONSUMER, "send queue full", true),
			goAwayFrame(gatewaypb.GoAway_REASON_SLOW_CONSUMER, "send queue full; reconnect and resync", ss.srv.reconnectHint()))
		ss.queued = 0
		ss.room.Broadcast()
		ss.srv.slow.Add(1)
		ss.logAt(zerolog.WarnLevel).Msg("slow consumer disconnected")
		// Its socket may be full: give the goodbye a moment, not the
		// whole write timeout.
		go ss.drainAndClose(slowConsumerGrace)
		return
	}
	ss.queue = append(ss.queue, f)
	ss.queued += size
	if !ss.writing {
		ss.writing = true
		go ss.flush()
	}
}

// frameSize estimates the bytes a frame takes in the queue.
func frameSize(f *gatewaypb.Frame) int {
	n := 64
	switch b := f.Body.(type) {
	case *gatewaypb.Frame_Live:
		for _, it := range b.Live.Items {
			n += itemSize(it)
		}
	case *gatewaypb.Frame_Sync:
		for _, it := range b.Sync.Items {
			n += itemSize(it)
		}
	}
	return n
}

// maxLiveBatch is the most live items merged into one Live frame.
const maxLiveBatch = 256

// flush writes queued frames until the queue is empty, then exits: an idle
// session has no writer goroutine. Consecutive Live frames go out as one.
func (ss *session) flush() {
	for {
		ss.mu.Lock()
		frames := ss.queue
		ss.queue, ss.queued = nil, 0
		if len(frames) == 0 {
			ss.writing = false
			ss.room.Broadcast()
			ss.mu.Unlock()
			return
		}
		ss.room.Broadcast()
		ss.mu.Unlock()
		frames = mergeLive(frames, ss.srv.codec.MaxFrame()/2)
		ctx, cancel := context.WithTimeout(context.Background(), ss.srv.cfg.WriteTimeout)
		err := ss.link.write(ctx, frames)
		cancel()
		if err != nil {
			ss.logAt(zerolog.DebugLevel).Err(err).Msg("write failed")
			ss.mu.Lock()
			ss.writing = false
			ss.closing = true
			ss.queue = nil
			ss.room.Broadcast()
			ss.mu.Unlock()
			ss.shut() // not a bare close: a polled link has no reader to see it
			return
		}
	}
}

// mergeLive merges runs of Live frames into frames of up to maxLiveBatch
// items and maxBytes of items.
func mergeLive(frames []*gatewaypb.Frame, maxBytes int) []*gatewaypb.Frame {
	out := frames[:0]
	var cur *gatewaypb.Live
	size := 0
	for _, f := range frames {
		l := f.GetLive()
		if l == nil {
			out, cur = append(out, f), nil
			continue
		}
		n := 0
		for _, it := range l.Items {
			n += itemSize(it)
		}
		if cur != nil && len(cur.Items)+len(l.Items) <= maxLiveBatch && size+n <= maxBytes {
			cur.Items = append(cur.Items, l.Items...)
			size += n
			continue
		}
		// Merging appends to the first frame's item slice: copy it so the
		// frame's owner (a watcher's entry) is never written to.
		first := &gatewaypb.Live{Items: slices.Clone(l.Items)}
		out, cur, size = append(out, &gatewaypb.Frame{Body: &gatewaypb.Frame_Live{Live: first}}), first, n
	}
	return out
}

// fail reports a fatal error to the client, says goodbye and closes. A
// failure on the server's side (the client is not at fault) comes with a
// spread reconnect hint, so that an outage does not bring every client
// back in the same instant.
func (ss *session) fail(code gatewaypb.Error_Code, reason gatewaypb.GoAway_Reason, msg string) {
	ss.logAt(zerolog.WarnLevel).Str("code", code.String()).Str("reason", msg).Msg("session refused")
	var hint time.Duration
	if code == gatewaypb.Error_CODE_UNAVAILABLE || code == gatewaypb.Error_CODE_INTERNAL {
		hint = ss.srv.reconnectHint()
	}
	ss.mu.Lock()
	if ss.closing {
		ss.mu.Unlock()
		ss.shut()
		return
	}
	ss.queue = append(ss.queue, errorFrame(code, msg, true), goAwayFrame(reason, msg, hint))
	ss.closing = true
	ss.room.Broadcast()
	ss.mu.Unlock()
	ss.drainAndClose(ss.srv.cfg.WriteTimeout)
}

// softClose stops new traffic, lets the frames already queued go out,
// sends GoAway and closes the link: nothing queued is lost.
func (ss *session) softClose(reason gatewaypb.GoAway_Reason, msg string, after time.Duration) {
	ss.mu.Lock()
	if ss.closing {
		ss.mu.Unlock()
		return
	}
	ss.queue = append(ss.queue, goAwayFrame(reason, msg, after))
	ss.closing = true
	ss.room.Broadcast()
	ss.mu.Unlock()
	ss.drainAndClose(ss.srv.cfg.WriteTimeout)
}

// slowConsumerGrace is how long a slow consumer's link may take to take
// its Error and GoAway before it is closed.
const slowConsumerGrace = 500 * time.Millisecond

// drainAndClose writes what is queued (when no flusher runs) and closes,
// waiting at most timeout.
func (ss *session) drainAndClose(timeout time.Duration) {
	ss.stopWatches()
	deadline := time.Now().Add(timeout)
	for {
		ss.mu.Lock()
		writing := ss.writing
		frames := ss.queue
		if !writing {
			ss.queue = nil
		}
		ss.mu.Unlock()
		if !writing {
			if len(frames) > 0 {
				ctx, cancel := context.WithDeadline(context.Background(), deadline)
				_ = ss.link.write(ctx, mergeLive(frames, ss.srv.codec.MaxFrame()/2))
				cancel()
			}
			break
		}
		if time.Now().After(deadline) {
			// The flusher is stuck in a write: a graceful close would
			// wait behind it.
			ss.shut()
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	ss.link.closeGracefully()
	ss.shut()
}

func (ss *session) stopWatches() {
	ss.mu.Lock()
	uw, dw := ss.userWatch, ss.devWatch
	ss.userWatch, ss.devWatch = nil, nil
	ss.mu.Unlock()
	if uw != nil {
		uw.Stop()
	}
	if dw != nil {
		dw.Stop()
	}
	ss.stopTopicWatches()
}

// shut closes the link at once and releases the session.
func (ss *session) shut() {
	ss.closeOnce.Do(func() {
		ss.mu.Lock()
		ss.closing, ss.closed = true, true
		if ss.roundCancel != nil {
			ss.roundCancel()
		}
		ss.room.Broadcast()
		if ss.timer != nil {
			ss.timer.Stop()
		}
		if ss.deferral != nil {
			ss.deferral.retry.Stop()
		}
		ss.mu.Unlock()
		ss.stopWatches()
		ss.link.close()
		if ss.polled.Load() {
			// No reader goroutine will see the close: finish here.
			go ss.finish()
		}
	})
}

// finish releases the session once its link ended: when the reader ends,
// or for a polled link when it is shut. Idempotent.
func (ss *session) finish() {
	ss.finished.Do(func() {
		ss.shut()
		ss.mu.Lock()
		done := ss.roundDone
		ss.mu.Unlock()
		if done != nil {
			<-done
		}
		if ss.polled.Load() {
			ss.srv.poller.remove(ss.pollToken)
		}
		ss.srv.unregister(ss)
		ss.logAt(zerolog.DebugLevel).Msg("session ended")
		ss.srv.conns.Add(-1)
		ss.srv.wg.Done()
	})
}
