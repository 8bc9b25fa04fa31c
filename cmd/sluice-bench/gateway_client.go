package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// Client transports.
const (
	transportWS = "ws"
	// transportTCP ("tcp", shared with the oplog benchmark) is TLV on TCP.
)

// handshakeTimeout bounds a client's dial, hello and first sync round.
const handshakeTimeout = 60 * time.Second

// dialer opens benchmark clients: raw protocol clients that send and read
// frames and nothing more, dialling from several loopback source
// addresses in turn.
type dialer struct {
	codec  *wire.Codec
	signer *gateway.Signer
	ips    []net.IP
	next   atomic.Uint64
	hc     *http.Client
}

func newDialer(cfg *gatewayConfig) (*dialer, error) {
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		return nil, err
	}
	d := &dialer{codec: codec, signer: gateway.NewSigner(cfg.tokenKey), ips: cfg.sources}
	d.hc = &http.Client{Transport: &http.Transport{
		DialContext:         func(ctx context.Context, _, addr string) (net.Conn, error) { return d.dialTCP(ctx, addr) },
		MaxIdleConnsPerHost: -1,
	}}
	return d, nil
}

// dialTCP connects to addr from the next source address. The connection
// closes with a reset (linger 0), so that closing tens of thousands of
// clients leaves no TIME_WAIT behind to hold the ports.
func (d *dialer) dialTCP(ctx context.Context, addr string) (net.Conn, error) {
	ip := d.ips[int(d.next.Add(1)%uint64(len(d.ips)))]
	nd := net.Dialer{LocalAddr: &net.TCPAddr{IP: ip}, Timeout: 10 * time.Second}
	c, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	return c, nil
}

// userID5 and deviceID5 name client i's user and device: five digits,
// so every id has one length.
func userID5(i int) string   { return fmt.Sprintf("u%05d", i) }
func deviceID5(i int) string { return fmt.Sprintf("d%05d", i) }

// hello builds client i's Hello: a token for its own user and device, and
// its sync points if it has some (earned under that same user).
func (d *dialer) hello(i int, points []*gatewaypb.SyncPoint) (*gatewaypb.Frame, error) {
	tok, err := d.signer.Issue(gateway.Claims{User: userID5(i), Device: deviceID5(i), App: benchApp, Expires: time.Now().Add(2 * time.Hour)})
	if err != nil {
		return nil, err
	}
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Hello{Hello: &gatewaypb.Hello{
		Version: wire.Version, Token: tok, Points: points, PointsUser: userID5(i),
		Attrs: &gatewaypb.Attrs{AppVersion: "1.0.0", Os: "android", Sdk: "sluice-bench"}}}}, nil
}

// benchConn is one client link.
type benchConn struct {
	idx   int
	codec *wire.Codec
	tcp   net.Conn
	br    *bufio.Reader
	hdr   [wire.HeaderSize]byte
	ws    *websocket.Conn
	wmu   sync.Mutex
	once  sync.Once
}

// dial opens client i's link to srv over transport.
func (d *dialer) dial(ctx context.Context, srv *child, transport string, i int) (*benchConn, error) {
	b := &benchConn{idx: i, codec: d.codec}
	if transport == transportWS {
		c, _, err := websocket.Dial(ctx, srv.info.WS, &websocket.DialOptions{HTTPClient: d.hc, Subprotocols: []string{wire.SubprotocolProto}})
		if err != nil {
			return nil, err
		}
		c.SetReadLimit(8 << 20)
		b.ws = c
		return b, nil
	}
	c, err := d.dialTCP(ctx, srv.info.TCP)
	if err != nil {
		return nil, err
	}
	b.tcp, b.br = c, bufio.NewReaderSize(c, 4096)
	return b, nil
}

func (b *benchConn) send(ctx context.Context, f *gatewaypb.Frame) error {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	if b.ws != nil {
		msg, err := b.codec.EncodeBinary(f, false)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		return b.ws.Write(ctx, websocket.MessageBinary, msg)
	}
	msg, err := b.codec.AppendTLV(nil, f, false)
	if err != nil {
		return err
	}
	_ = b.tcp.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err = b.tcp.Write(msg)
	return err
}

// read returns the next frame; timeout 0 waits until the link closes.
func (b *benchConn) read(ctx context.Context, timeout time.Duration) (*gatewaypb.Frame, error) {
	if b.ws != nil {
		if timeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, timeout)
			defer cancel()
		}
		_, msg, err := b.ws.Read(ctx)
		if err != nil {
			return nil, err
		}
		return b.codec.DecodeBinary(msg)
	}
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	_ = b.tcp.SetReadDeadline(deadline)
	f, _, err := b.codec.ReadTLV(b.br, b.hdr[:])
	return f, err
}

// close drops the link at once (a reset on TCP). Idempotent.
func (b *benchConn) close() {
	b.once.Do(func() {
		if b.ws != nil {
			_ = b.ws.CloseNow()
			return
		}
		_ = b.tcp.Close()
	})
}

// errEnded is a link the server ended with GoAway or a fatal Error.
var errEnded = errors.New("server ended the link")

// endError describes a server's Error or GoAway frame.
func endError(f *gatewaypb.Frame) error {
	if e := f.GetError(); e != nil {
		return fmt.Errorf("%w: error %s: %s", errEnded, e.Code, e.Message)
	}
	if g := f.GetGoaway(); g != nil {
		return fmt.Errorf("%w: goaway %s: %s", errEnded, g.Reason, g.Message)
	}
	return nil
}

// handshake sends hello and reads the Welcome, then (withSync) the Sync
// frames of the first round until one has done set, returning their
// items. The naive servers answer a welcome only.
func (b *benchConn) handshake(ctx context.Context, hello *gatewaypb.Frame, withSync bool) ([]*gatewaypb.Item, error) {
	if err := b.send(ctx, hello); err != nil {
		return nil, fmt.Errorf("hello: %w", err)
	}
	f, err := b.read(ctx, handshakeTimeout)
	if err != nil {
		return nil, fmt.Errorf("welcome: %w", err)
	}
	if f.GetWelcome() == nil {
		if err := endError(f); err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("first frame is type %d, not welcome", wire.TypeOf(f))
	}
	if !withSync {
		return nil, nil
	}
	var items []*gatewaypb.Item
	for {
		f, err := b.read(ctx, handshakeTimeout)
		if err != nil {
			return nil, fmt.Errorf("sync round: %w", err)
		}
		switch body := f.Body.(type) {
		case *gatewaypb.Frame_Sync:
			items = append(items, body.Sync.Items...)
			if body.Sync.Done {
				return items, nil
			}
		case *gatewaypb.Frame_Probe:
			if err := b.echo(ctx, body.Probe); err != nil {
				return nil, err
			}
		default:
			if err := endError(f); err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("frame type %d during the sync round", wire.TypeOf(f))
		}
	}
}

func (b *benchConn) echo(ctx context.Context, p *gatewaypb.Probe) error {
	return b.send(ctx, &gatewaypb.Frame{Body: &gatewaypb.Frame_ProbeEcho{ProbeEcho: &gatewaypb.ProbeEcho{Seq: p.Seq}}})
}

// itemsFunc receives the items of a Live (live true) or later Sync frame,
// read at the given time, on the client's reader goroutine.
type itemsFunc func(b *benchConn, items []*gatewaypb.Item, at time.Time, live bool)

// serve reads until the link ends: items go to fn, probes are echoed. It
// returns the reason the link ended (a server's Error frame ends it too).
func (b *benchConn) serve(ctx context.Context, fn itemsFunc) error {
	for {
		f, err := b.read(ctx, 0)
		if err != nil {
			return err
		}
		at := time.Now()
		switch body := f.Body.(type) {
		case *gatewaypb.Frame_Live:
			if fn != nil {
				fn(b, body.Live.Items, at, true)
			}
		case *gatewaypb.Frame_Sync:
			if fn != nil && len(body.Sync.Items) > 0 {
				fn(b, body.Sync.Items, at, false)
			}
		case *gatewaypb.Frame_Probe:
			if err := b.echo(ctx, body.Probe); err != nil {
				return err
			}
		default:
			if err := endError(f); err != nil {
				return err
			}
		}
	}
}

// fleet is a set of connected clients and their reader goroutines.
type fleet struct {
	conns  []*benchConn
	wg     sync.WaitGroup
	ended  atomic.Int64 // links that ended while the fleet was open
	closed atomic.Bool
	mu     sync.Mutex
	why    error // the first unexpected end
}

// connectFleet connects n clients to srv, at most par at once: each sends
// its hello and reads the welcome and (withSync) the first sync round, then
// serve runs in its own goroutine with fn. Any failure closes what was
// opened and is returned.
func connectFleet(ctx context.Context, d *dialer, srv *child, transport string, n, par int, withSync bool, fn itemsFunc) (*fleet, error) {
	fl := &fleet{conns: make([]*benchConn, n)}
	var next atomic.Int64
	errs := make([]error, par)
	var wg sync.WaitGroup
	for w := range par {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				b, err := d.open(ctx, srv, transport, i, nil, withSync)
				if err != nil {
					errs[w] = fmt.Errorf("client %d: %w", i, err)
					next.Store(int64(n))
					return
				}
				fl.conns[i] = b
				fl.wg.Go(func() {
					err := b.serve(context.Background(), fn)
					if !fl.closed.Load() {
						fl.ended.Add(1)
						fl.mu.Lock()
						if fl.why == nil {
							fl.why = fmt.Errorf("client %d: %w", b.idx, err)
						}
						fl.mu.Unlock()
					}
				})
			}
		})
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		fl.close()
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		fl.close()
		return nil, err
	}
	return fl, nil
}

// open dials client i and runs its handshake.
func (d *dialer) open(ctx context.Context, srv *child, transport string, i int, points []*gatewaypb.SyncPoint, withSync bool) (*benchConn, error) {
	hello, err := d.hello(i, points)
	if err != nil {
		return nil, err
	}
	b, _, err := d.openWith(ctx, srv, transport, i, hello, withSync)
	return b, err
}

// openWith dials client i, sends hello and reads the welcome and
// (withSync) the first sync round, whose items it returns.
func (d *dialer) openWith(ctx context.Context, srv *child, transport string, i int, hello *gatewaypb.Frame, withSync bool) (*benchConn, []*gatewaypb.Item, error) {
	hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	b, err := d.dial(hctx, srv, transport, i)
	if err != nil {
		return nil, nil, fmt.Errorf("dial: %w", err)
	}
	items, err := b.handshake(hctx, hello, withSync)
	if err != nil {
		b.close()
		return nil, nil, err
	}
	return b, items, nil
}

// ackConfirmed sends an Ack of points, then a Ping, and reads until the
// Pong: the server handles a link's frames in order, so the ack has been
// recorded (or refused, with an Error frame) by then.
func (b *benchConn) ackConfirmed(ctx context.Context, points []*gatewaypb.SyncPoint) error {
	if err := b.send(ctx, &gatewaypb.Frame{Body: &gatewaypb.Frame_Ack{Ack: &gatewaypb.Ack{Points: points}}}); err != nil {
		return fmt.Errorf("ack: %w", err)
	}
	if err := b.send(ctx, &gatewaypb.Frame{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{ClientTimeMs: time.Now().UnixMilli()}}}); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	for {
		f, err := b.read(ctx, handshakeTimeout)
		if err != nil {
			return fmt.Errorf("waiting for pong: %w", err)
		}
		switch body := f.Body.(type) {
		case *gatewaypb.Frame_Pong:
			return nil
		case *gatewaypb.Frame_Probe:
			if err := b.echo(ctx, body.Probe); err != nil {
				return err
			}
		case *gatewaypb.Frame_Error:
			return fmt.Errorf("ack refused: %s: %s", body.Error.Code, body.Error.Message)
		case *gatewaypb.Frame_Goaway:
			return endError(f)
		}
	}
}

// check reports links that ended while they should have stayed open.
func (fl *fleet) check() error {
	if n := fl.ended.Load(); n > 0 {
		fl.mu.Lock()
		defer fl.mu.Unlock()
		return fmt.Errorf("%d client links ended early; first: %w", n, fl.why)
	}
	return nil
}

// close closes every link and waits for the readers. Idempotent.
func (fl *fleet) close() {
	fl.closed.Store(true)
	for _, b := range fl.conns {
		if b != nil {
			b.close()
		}
	}
	fl.wg.Wait()
}

// firstError returns the first non-nil error of errs, saying how many
// more there were (workers stopped by the first one fail alike).
func firstError(errs []error) error {
	var first error
	n := 0
	for _, err := range errs {
		if err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	if n > 1 {
		return fmt.Errorf("%w (and %d more errors)", first, n-1)
	}
	return first
}
