package client

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// maxPoints is the most sync points the server takes in one Hello or Ack;
// maxTopics the most topic cursors.
const (
	maxPoints = 1000
	maxTopics = 1000
)

// marks are what the client processed of one kind of stream: sync points
// by business, or topic cursors by topic; and which of them the server was
// not sent yet.
type marks struct {
	at      map[string]SyncPoint
	unacked map[string]bool
}

func newMarks(at map[string]SyncPoint) marks {
	if at == nil {
		at = map[string]SyncPoint{}
	}
	return marks{at: at, unacked: map[string]bool{}}
}

// has reports whether a stored item of name with id and epoch is at or
// below the mark of the same epoch: a duplicate. Ids of another epoch are
// not comparable, so they are never duplicates.
func (m marks) has(name string, id, epoch uint64) bool {
	p, ok := m.at[name]
	return ok && p.Epoch == epoch && id <= p.ID
}

// advance sets the mark of name, to be acked.
func (m marks) advance(name string, id, epoch uint64) {
	m.at[name] = SyncPoint{ID: id, Epoch: epoch}
	m.unacked[name] = true
}

// drop forgets the mark of name.
func (m marks) drop(name string) {
	delete(m.at, name)
	delete(m.unacked, name)
}

// pending returns the names whose mark the server was not sent yet, in
// order.
func (m marks) pending() []string {
	return slices.Sorted(maps.Keys(m.unacked))
}

// run is the state of one Run across its links. Only Run's goroutine
// touches it: it delivers items, so handlers never run concurrently.
type run struct {
	c   *Client
	log zerolog.Logger

	points  marks  // sync points, by business
	topics  marks  // topic cursors, by topic: kept when the user changes
	owner   string // the user bound when the points were earned
	dirty   bool   // points, topics (or owner) differ from the file
	session string // the last Welcome's session id, for the next Hello

	timer        *time.Timer // persist-and-ack timer, running while armed
	armed        bool
	persistErrAt time.Time // when a failed persist was last logged

	// retry asks the server for the buckets it deferred (a FOREGROUND
	// event) on the link of the round that deferred them: armed by the
	// round's done frame, disarmed by a done frame without deferrals and
	// when the link ends.
	retry      *time.Timer
	retryArmed bool

	receipts []*deliverypb.Receipt // delivered receipts to send with the next ack
}

// linkResult is how one connection attempt ended, and what Run does next.
type linkResult struct {
	reason  string        // for the log
	err     error         // Run returns it
	rotate  bool          // try the next URL
	healthy bool          // the session completed a sync round or lasted: reset the backoff
	after   time.Duration // the server's reconnect hint
	again   bool          // connect again at once (the Hello's points were void)
}

func newRun(c *Client) *run {
	c.mu.Lock()
	points, owner, topics := maps.Clone(c.persisted), c.persistedUser, maps.Clone(c.persistedTopics)
	c.mu.Unlock()
	t := time.NewTimer(time.Hour)
	t.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	return &run{c: c, log: c.log, points: newMarks(points), topics: newMarks(topics), owner: owner, timer: t, retry: retry}
}

// runLink makes one connection and serves it until it ends.
func (r *run) runLink(ctx context.Context, ep endpoint) linkResult {
	token, err := r.c.cfg.Token(ctx)
	if err != nil {
		r.c.count(func(s *Stats) { s.DialFailures++ })
		return linkResult{reason: "token: " + err.Error()}
	}
	l, res := r.open(ctx, ep, token)
	if l == nil {
		if !res.again {
			r.c.count(func(s *Stats) { s.DialFailures++ })
		}
		return res
	}
	r.c.setLink(l)
	defer r.c.clearLink(l)
	l.log.Info().Str("user", l.welcome.User).Bool("zstd", l.welcome.Compression == gatewaypb.Compression_COMPRESSION_ZSTD).Msg("connected")
	return r.serve(ctx, l)
}

// open dials ep, says Hello and waits for Welcome. Until then the dial
// timeout bounds every step.
func (r *run) open(ctx context.Context, ep endpoint, token string) (*link, linkResult) {
	c := r.c
	dctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	cn, err := c.dial(dctx, ep, c.codec)
	if err != nil {
		return nil, linkResult{reason: "dial: " + err.Error(), rotate: true}
	}
	stop := context.AfterFunc(dctx, func() { cn.close(false) })
	fail := func(res linkResult) (*link, linkResult) {
		stop()
		cn.close(false)
		return nil, res
	}
	if err := cn.write(dctx, r.hello(ep, token)); err != nil {
		return fail(linkResult{reason: "hello: " + err.Error(), rotate: true})
	}
	deadline, _ := dctx.Deadline()
	var end linkEnd
	for {
		f, err := cn.read(deadline)
		if err != nil {
			end.err = err
			res := r.classify(end)
			res.rotate = res.rotate || end.fatal == nil
			return fail(res)
		}
		switch b := f.Body.(type) {
		case *gatewaypb.Frame_Welcome:
			if !stop() { // the dial timeout or ctx fired: cn is closed
				return fail(linkResult{reason: "welcome too late", rotate: true})
			}
			if r.switchUser(b.Welcome.User) {
				cn.close(false)
				return nil, linkResult{reason: "bound user changed: hello again without sync points", again: true}
			}
			return r.newLink(cn, ep, b.Welcome)
		case *gatewaypb.Frame_Error:
			e := b.Error
			c.count(func(s *Stats) { s.LastError = &ServerError{Code: e.Code, Message: e.Message, Fatal: e.Fatal} })
			if e.Fatal {
				end.fatal = e
			}
		case *gatewaypb.Frame_Goaway:
			end.goAway = b.Goaway
			return fail(r.classify(end))
		}
	}
}

// switchUser records the user a Welcome binds. When the client holds
// points earned under another user, the Hello that presented them asked
// for the wrong part of the new user's inbox: the points are dropped, and
// switchUser reports that the client must say Hello again without them.
// The client does not know which businesses are the user's, so it drops
// all: the server resumes each from its recorded sync point (device
// businesses as acked, user ones as acked under this user). Topic cursors
// stay: topic ids are the same for every user.
func (r *run) switchUser(user string) (again bool) {
	if user == r.owner {
		return false
	}
	again = len(r.points.at) > 0
	if again {
		r.log.Info().Str("user", user).Str("previous", r.owner).Int("points", len(r.points.at)).Msg("bound user changed: sync points dropped")
	}
	r.owner = user
	clear(r.points.at)
	clear(r.points.unacked)
	r.dirty = true
	r.flush(context.Background(), nil)
	return again
}

// hello is the Hello frame for ep: the token, the attributes, the sync
// points and topic cursors, the digest of the view held (with
// Config.Views), the compression the client takes, the previous session.
func (r *run) hello(ep endpoint, token string) *gatewaypb.Frame {
	h := &gatewaypb.Hello{Version: wire.Version, Token: token, Attrs: r.c.attrs, SessionId: r.session, PointsUser: r.owner,
		Push: r.c.pushAddress(), Analytics: r.c.tracker != nil}
	for _, biz := range slices.Sorted(maps.Keys(r.points.at)) {
		if len(h.Points) == maxPoints {
			// Omitted businesses resume from the device's recorded points.
			r.log.Warn().Int("points", len(r.points.at)).Msg("too many sync points for one hello")
			break
		}
		p := r.points.at[biz]
		h.Points = append(h.Points, &gatewaypb.SyncPoint{Business: biz, Id: p.ID, Epoch: p.Epoch})
	}
	for _, topic := range slices.Sorted(maps.Keys(r.topics.at)) {
		if len(h.Topics) == maxTopics {
			// Omitted topics resume from the device's recorded cursors.
			r.log.Warn().Int("topics", len(r.topics.at)).Msg("too many topic cursors for one hello")
			break
		}
		p := r.topics.at[topic]
		h.Topics = append(h.Topics, &gatewaypb.TopicCursor{Topic: topic, Id: p.ID, Epoch: p.Epoch})
	}
	if r.c.cfg.Views {
		h.Views, h.ViewDigest = true, r.c.viewDigest()
	}
	if !r.c.cfg.NoCompression && !(ep.ws && r.c.cfg.JSON) {
		h.Compression = []gatewaypb.Compression{gatewaypb.Compression_COMPRESSION_ZSTD}
	}
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Hello{Hello: h}}
}

// newLink applies Welcome to cn and wraps it in a link, not yet started.
func (r *run) newLink(cn conn, ep endpoint, w *gatewaypb.Welcome) (*link, linkResult) {
	c := r.c
	codec, err := c.codecFor(int(w.MaxFrameBytes), int(w.CompressMinBytes))
	if err != nil {
		cn.close(false)
		return nil, linkResult{reason: "welcome: " + err.Error()}
	}
	compress := w.Compression == gatewaypb.Compression_COMPRESSION_ZSTD && !c.cfg.NoCompression && !(ep.ws && c.cfg.JSON)
	cn.configure(codec, compress)
	hb := time.Duration(w.HeartbeatMs) * time.Millisecond
	if hb <= 0 {
		hb = DefaultHeartbeat
	}
	r.session = w.SessionId
	return &link{
		c: c, conn: cn, ep: ep, welcome: w, hb: hb,
		offset: time.Until(time.UnixMilli(w.ServerTimeMs)),
		log:    r.log.With().Str("url", ep.raw).Str("session", w.SessionId).Logger(),
		frames: make(chan *gatewaypb.Frame, frameQueue),
		done:   make(chan struct{}),
	}, linkResult{}
}

// classify maps how a link ended to what Run does next.
func (r *run) classify(e linkEnd) linkResult {
	var res linkResult
	if f := e.fatal; f != nil {
		se := &ServerError{Code: f.Code, Message: f.Message, Fatal: true}
		switch f.Code {
		case gatewaypb.Error_CODE_UNAUTHENTICATED, gatewaypb.Error_CODE_UNSUPPORTED_VERSION:
			return linkResult{reason: se.Error(), err: se}
		case gatewaypb.Error_CODE_UNAVAILABLE, gatewaypb.Error_CODE_TOO_MANY_CONNECTIONS:
			res.rotate = true
		}
		res.reason = se.Error()
	}
	if g := e.goAway; g != nil {
		r.c.count(func(s *Stats) { s.LastGoAway, s.LastGoAwayMessage = g.Reason, g.Message })
		res.after = time.Duration(g.ReconnectAfterMs) * time.Millisecond
		if res.reason == "" {
			res.reason = "goaway " + g.Reason.String() + ": " + g.Message
		}
		switch g.Reason {
		case gatewaypb.GoAway_REASON_REPLACED:
			res.err = fmt.Errorf("client: %s: %w", g.Message, ErrReplaced)
		case gatewaypb.GoAway_REASON_SLOW_CONSUMER, gatewaypb.GoAway_REASON_IDLE,
			gatewaypb.GoAway_REASON_DEAD_LINK, gatewaypb.GoAway_REASON_AUTH:
			// Same node; AUTH (an expired token) asks Config.Token again.
		case gatewaypb.GoAway_REASON_PROTOCOL:
			// A client bug: retrying soon would repeat it.
			res.after = max(res.after, r.c.cfg.MaxBackoff/2)
		default: // SHUTDOWN, unspecified or unknown: elsewhere
			res.rotate = true
		}
		return res
	}
	if res.reason == "" && e.err != nil {
		res.reason = e.err.Error()
	}
	return res
}

// serve delivers the link's items until it ends, ctx ends or a handler
// fails.
func (r *run) serve(ctx context.Context, l *link) linkResult {
	started := time.Now()
	roundDone := false
	l.start()
	defer r.disarmRetry() // a deferral is the link's: the next Hello starts a round anyway
	var track <-chan time.Time
	var kick chan struct{}
	if t := r.c.tracker; t != nil {
		tick := time.NewTicker(t.cfg.Interval)
		defer tick.Stop()
		defer t.linkEnded()
		track, kick = tick.C, t.kick
		t.send(r, l) // what waited for a link
	}
	if len(r.points.unacked) > 0 || len(r.topics.unacked) > 0 {
		r.arm() // acks the previous link could not send
	}
	for {
		if ctx.Err() != nil {
			// Last acks, bounded: the server may be gone.
			fctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
			r.flush(fctx, l)
			cancel()
			l.stop(true)
			return linkResult{reason: "stopped"}
		}
		select {
		case <-ctx.Done():
		case <-r.timer.C:
			r.armed = false
			r.flush(context.Background(), l)
		case <-r.retry.C:
			r.retryArmed = false
			r.retryDeferred(l)
		case <-track:
			r.c.tracker.send(r, l)
		case <-kick:
			r.c.tracker.send(r, l)
		case f, ok := <-l.frames:
			if !ok {
				l.stop(false)
				r.flush(context.Background(), nil)
				res := r.classify(l.end)
				res.healthy = roundDone || time.Since(started) > healthySession
				return res
			}
			done, err := r.handle(ctx, l, f)
			if err != nil {
				r.flush(context.Background(), l)
				l.stop(true)
				return linkResult{reason: err.Error()} // not healthy: the backoff grows
			}
			roundDone = roundDone || done
		}
	}
}

// handle delivers one Sync or Live frame, or applies a View; done reports
// the end of a sync round, err a handler's failure.
func (r *run) handle(ctx context.Context, l *link, f *gatewaypb.Frame) (done bool, err error) {
	switch b := f.Body.(type) {
	case *gatewaypb.Frame_Sync:
		for _, biz := range b.Sync.Resets {
			if err := r.reset(ctx, biz, false); err != nil || ctx.Err() != nil {
				return false, err
			}
		}
		for _, topic := range b.Sync.TopicResets {
			if err := r.reset(ctx, topic, true); err != nil || ctx.Err() != nil {
				return false, err
			}
		}
		if err := r.deliver(ctx, l, b.Sync.Items); err != nil || ctx.Err() != nil {
			return false, err
		}
		if b.Sync.Done { // its items, if any, are delivered: it may have none
			r.c.count(func(s *Stats) { s.Rounds++ })
			r.deferred(b.Sync)
			r.flush(context.Background(), l)
			return true, nil
		}
	case *gatewaypb.Frame_Live:
		return false, r.deliver(ctx, l, b.Live.Items)
	case *gatewaypb.Frame_View:
		r.c.applyView(ctx, b.View)
	case *gatewaypb.Frame_AnalyticsAck:
		if r.c.tracker != nil {
			r.c.tracker.acked(r.c, b.AnalyticsAck)
		}
	}
	return false, nil
}

// reset forgets a business (or a topic) whose stream the server
// recreated, after the app dropped its state.
func (r *run) reset(ctx context.Context, name string, topic bool) error {
	what, m := "business", r.points
	if topic {
		what, m = "topic", r.topics
	}
	if h := r.c.resetHandler(topic); h != nil {
		if err := h(ctx, name); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			r.c.count(func(s *Stats) { s.HandlerErrors++ })
			return fmt.Errorf("reset handler of %s %s failed: %v", what, name, err)
		}
	}
	if topic {
		r.log.Info().Str("topic", name).Msg("topic reset by the server")
		r.c.count(func(s *Stats) { s.TopicResets++ })
	} else {
		r.log.Info().Str("business", name).Msg("business reset by the server")
		r.c.count(func(s *Stats) { s.Resets++ })
	}
	m.drop(name)
	r.dirty = true
	r.arm()
	return nil
}

// deferred arms the deferral retry when the done frame s lists buckets the
// server deferred, re-arming one already armed; without any it disarms
// it, as the round read everything.
func (r *run) deferred(s *gatewaypb.Sync) {
	if len(s.Deferred) == 0 {
		r.disarmRetry()
		return
	}
	d := deferDelay(s.RetryAfterMs)
	r.log.Info().Strs("bucket", s.Deferred).Dur("retry_in", d).Msg("buckets deferred by the server")
	r.c.count(func(st *Stats) { st.Deferrals++ })
	r.retry.Reset(d)
	r.retryArmed = true
}

// deferDelay is the wait before asking again for deferred buckets:
// retry_after_ms (DefaultDeferRetry if 0) plus a uniform jitter of up to
// DeferJitter of it.
func deferDelay(retryAfterMs uint32) time.Duration {
	d := time.Duration(retryAfterMs) * time.Millisecond
	if d <= 0 {
		d = DefaultDeferRetry
	}
	return d + rand.N(time.Duration(float64(d)*DeferJitter)+1)
}

func (r *run) disarmRetry() {
	if r.retryArmed {
		r.retry.Stop()
		r.retryArmed = false
	}
}

// retryDeferred asks the server for the buckets it deferred: a FOREGROUND
// event starts a round. If the link is gone the next Hello's round reads
// them.
func (r *run) retryDeferred(l *link) {
	ev := &gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_FOREGROUND}}}
	if err := l.send(context.Background(), ev); err != nil {
		l.log.Debug().Err(err).Msg("deferral retry not sent")
		return
	}
	r.c.count(func(s *Stats) { s.DeferRetries++ })
}

// deliver passes items to their handlers in order, dropping duplicates
// and expired items, and advances the sync points (of businesses, or the
// cursors of topics for topic items).
func (r *run) deliver(ctx context.Context, l *link, items []*Item) error {
	for _, it := range items {
		if ctx.Err() != nil {
			return nil
		}
		m, name := r.points, it.Business
		if it.Topic != "" {
			m, name = r.topics, it.Topic
		}
		if it.Id != 0 && m.has(name, it.Id, it.Epoch) {
			r.c.count(func(s *Stats) { s.Duplicates++ })
			continue
		}
		switch h := r.c.handler(it); {
		case it.ExpiresMs != 0 && it.ExpiresMs <= time.Now().Add(l.offset).UnixMilli():
			r.c.count(func(s *Stats) { s.Expired++ })
		case h == nil:
			r.log.Debug().Str("business", it.Business).Str("topic", it.Topic).Uint64("id", it.Id).Msg("no handler: item dropped")
			r.c.count(func(s *Stats) { s.Unhandled++ })
		default:
			if err := h(ctx, it); err != nil {
				if ctx.Err() != nil {
					return nil // stopping, not failing: the item comes again
				}
				r.c.count(func(s *Stats) { s.HandlerErrors++ })
				if it.Id == 0 { // transient: it cannot come again
					r.log.Warn().Err(err).Str("business", it.Business).Str("topic", it.Topic).Msg("handler failed on a transient item")
					continue
				}
				// Run logs it as the reason the link ended.
				if it.Topic != "" {
					return fmt.Errorf("handler of topic %s failed at id %d: %v", it.Topic, it.Id, err)
				}
				return fmt.Errorf("handler of %s failed at id %d: %v", it.Business, it.Id, err)
			}
			r.c.count(func(s *Stats) {
				s.Delivered++
				if it.Topic != "" {
					s.TopicItems++
				}
			})
			if id := PushID(it); id != "" {
				r.receipts = append(r.receipts, &deliverypb.Receipt{PushId: id, State: deliverypb.ReceiptState_RECEIPT_STATE_DELIVERED})
				r.arm()
			}
		}
		if it.Id != 0 {
			m.advance(name, it.Id, it.Epoch)
			r.dirty = true
			r.arm()
		}
	}
	return nil
}

// arm starts the persist-and-ack timer unless it runs.
func (r *run) arm() {
	if !r.armed {
		r.timer.Reset(r.c.cfg.AckInterval)
		r.armed = true
	}
}

// flush persists the sync points and topic cursors if they changed, then
// acks on l (if not nil), within ctx, those the server was not sent. They
// reach the disk before the server hears of them.
func (r *run) flush(ctx context.Context, l *link) {
	if r.armed {
		r.timer.Stop()
		r.armed = false
	}
	if r.dirty {
		if err := savePoints(r.c.cfg.StateDir, r.owner, r.points.at, r.topics.at); err != nil {
			if time.Since(r.persistErrAt) >= time.Minute {
				r.log.Error().Err(err).Msg("sync points not persisted; acks wait")
				r.persistErrAt = time.Now()
			}
			r.arm() // try again
			return
		}
		r.dirty = false
		r.c.setPersisted(r.owner, maps.Clone(r.points.at), maps.Clone(r.topics.at))
	}
	if l == nil {
		return
	}
	for len(r.receipts) > 0 {
		n := min(len(r.receipts), maxReceipts)
		ev := &gatewaypb.ClientEvent{Receipts: r.receipts[:n]}
		if err := l.send(ctx, &gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: ev}}); err != nil {
			l.log.Debug().Err(err).Msg("receipts not sent")
			break // they go with the next flush, on this link or the next
		}
		r.c.count(func(s *Stats) { s.Receipts += n })
		r.receipts = r.receipts[n:]
	}
	bizs, topics := r.points.pending(), r.topics.pending()
	for len(bizs) > 0 || len(topics) > 0 {
		nb, nt := min(len(bizs), maxPoints), min(len(topics), maxTopics)
		ack := &gatewaypb.Ack{}
		for _, biz := range bizs[:nb] {
			p := r.points.at[biz]
			ack.Points = append(ack.Points, &gatewaypb.SyncPoint{Business: biz, Id: p.ID, Epoch: p.Epoch})
		}
		for _, topic := range topics[:nt] {
			p := r.topics.at[topic]
			ack.Topics = append(ack.Topics, &gatewaypb.TopicCursor{Topic: topic, Id: p.ID, Epoch: p.Epoch})
		}
		if err := l.send(ctx, &gatewaypb.Frame{Body: &gatewaypb.Frame_Ack{Ack: ack}}); err != nil {
			l.log.Debug().Err(err).Msg("ack not sent")
			return // the next link sends them
		}
		r.c.count(func(s *Stats) { s.Acks++ })
		for _, biz := range bizs[:nb] {
			delete(r.points.unacked, biz)
		}
		for _, topic := range topics[:nt] {
			delete(r.topics.unacked, topic)
		}
		bizs, topics = bizs[nb:], topics[nt:]
	}
}
