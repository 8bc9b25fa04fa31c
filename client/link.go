package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// writeTimeout bounds one frame write.
const writeTimeout = 10 * time.Second

// deadHeartbeats is how many heartbeats of silence from the server make
// the client take a link for dead.
const deadHeartbeats = 3

// errStopped is the reader's end when the link was stopped by the client.
var errStopped = errors.New("link stopped")

// link is one connection past Welcome. Its goroutines, owned by start and
// stop:
//   - the reader, for the link's life: it answers Probes (and Pings) at
//     once, records Error and GoAway, and hands Sync, Live and View frames
//     to the session loop over frames, blocking while the loop is busy;
//   - the pinger, which sends a Ping every heartbeat.
//
// Writes come from the reader, the pinger, the session loop and the app
// (events); wmu serializes them. A failed write closes the connection.
type link struct {
	c       *Client
	conn    conn
	ep      endpoint
	welcome *gatewaypb.Welcome
	hb      time.Duration // heartbeat: ping interval, and a third of the dead-link silence
	offset  time.Duration // server clock minus ours, from Welcome
	log     zerolog.Logger

	wmu sync.Mutex

	frames   chan *gatewaypb.Frame // reader → session loop; closed when the reader ends
	done     chan struct{}         // closed by stop
	stopOnce sync.Once
	wg       sync.WaitGroup

	// end is written by the reader before it closes frames; read after.
	end linkEnd
}

// linkEnd is how a link ended, as the reader saw it.
type linkEnd struct {
	err    error             // the read error, or errStopped
	goAway *gatewaypb.GoAway // the server's goodbye, if any
	fatal  *gatewaypb.Error  // the fatal Error before it, if any
}

// frameQueue is how many Sync, Live and View frames the reader may read
// ahead of the handlers.
const frameQueue = 8

// start runs the reader and, unless pings are off, the pinger.
func (l *link) start() {
	l.wg.Go(l.readLoop)
	if !l.c.noPings {
		l.wg.Go(l.pingLoop)
	}
}

// stop closes the connection and waits for the link's goroutines.
func (l *link) stop(graceful bool) {
	l.stopOnce.Do(func() {
		close(l.done)
		l.conn.close(graceful)
		l.wg.Wait()
	})
}

// send writes one frame. It fails with ErrNotConnected once the link is
// stopped or broken.
func (l *link) send(ctx context.Context, f *gatewaypb.Frame) error {
	ctx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	l.wmu.Lock()
	defer l.wmu.Unlock()
	select {
	case <-l.done:
		return ErrNotConnected
	default:
	}
	if err := l.conn.write(ctx, f); err != nil {
		// The stream may hold half a frame: the link is over.
		l.conn.close(false)
		return fmt.Errorf("client: write: %v: %w", err, ErrNotConnected)
	}
	return nil
}

// readLoop reads frames until the link ends.
func (l *link) readLoop() {
	defer close(l.frames)
	for {
		f, err := l.conn.read(time.Now().Add(deadHeartbeats * l.hb))
		if err != nil {
			select {
			case <-l.done:
				err = errStopped
			default:
			}
			l.end.err = err
			return
		}
		switch b := f.Body.(type) {
		case *gatewaypb.Frame_Probe:
			err := l.send(context.Background(), &gatewaypb.Frame{Body: &gatewaypb.Frame_ProbeEcho{ProbeEcho: &gatewaypb.ProbeEcho{Seq: b.Probe.Seq}}})
			if err != nil {
				l.end.err = err
				return
			}
			l.c.count(func(s *Stats) { s.ProbesEchoed++ })
		case *gatewaypb.Frame_Ping:
			// v1 servers send none; answer as the protocol asks.
			err := l.send(context.Background(), &gatewaypb.Frame{Body: &gatewaypb.Frame_Pong{Pong: &gatewaypb.Pong{
				ClientTimeMs: b.Ping.ClientTimeMs, ServerTimeMs: time.Now().UnixMilli()}}})
			if err != nil {
				l.end.err = err
				return
			}
		case *gatewaypb.Frame_Pong:
			l.c.count(func(s *Stats) { s.RTT = time.Since(time.UnixMilli(b.Pong.ClientTimeMs)) })
		case *gatewaypb.Frame_Error:
			e := b.Error
			l.c.count(func(s *Stats) { s.LastError = &ServerError{Code: e.Code, Message: e.Message, Fatal: e.Fatal} })
			if e.Fatal {
				l.end.fatal = e
			} else {
				l.log.Warn().Str("code", e.Code.String()).Str("reason", e.Message).Msg("server error")
			}
		case *gatewaypb.Frame_Goaway:
			l.end.goAway = b.Goaway
			return
		case *gatewaypb.Frame_Sync, *gatewaypb.Frame_Live, *gatewaypb.Frame_View, *gatewaypb.Frame_AnalyticsAck:
			select {
			case l.frames <- f:
			case <-l.done:
				l.end.err = errStopped
				return
			}
		default:
			// A second Welcome or a frame a server does not send: ignored,
			// as frames of unknown types are.
			l.log.Debug().Int("type", int(wire.TypeOf(f))).Msg("unexpected frame ignored")
		}
	}
}

// pingLoop sends a Ping every heartbeat until the link stops.
func (l *link) pingLoop() {
	t := time.NewTicker(l.hb)
	defer t.Stop()
	for {
		select {
		case <-l.done:
			return
		case <-t.C:
			ping := &gatewaypb.Frame{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{ClientTimeMs: time.Now().UnixMilli()}}}
			if err := l.send(context.Background(), ping); err != nil {
				return
			}
		}
	}
}
