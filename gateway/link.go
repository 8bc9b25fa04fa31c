package gateway

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// link is one client connection, whatever its transport. read is called by
// one goroutine (the session's reader), write by one at a time (the
// session's flusher); close may be called by anyone, any number of times.
type link interface {
	// read returns the next frame; a zero deadline waits forever.
	read(deadline time.Time) (*gatewaypb.Frame, error)
	// write sends frames in order.
	write(ctx context.Context, frames []*gatewaypb.Frame) error
	// setCompress allows zstd on frames written from now on.
	setCompress(bool)
	// canCompress reports whether the transport can carry zstd frames.
	canCompress() bool
	// close ends the link at once; graceful closes after a goodbye.
	close()
	closeGracefully()
	transport() string
	remote() string
}

// tcpLink is a TCP (or TLS) connection carrying TLV frames. An idle link
// holds no buffer but its 5-byte header array: frame values are allocated
// once their length is read, and writes borrow a pooled buffer.
type tcpLink struct {
	codec    *wire.Codec
	c        net.Conn
	raw      syscall.RawConn // plain TCP only: lets the poller read it
	hdr      [wire.HeaderSize]byte
	pending  []byte // polled links: bytes of a frame not yet complete
	compress atomic.Bool
	once     sync.Once
}

func newTCPLink(s *Server, c net.Conn) *tcpLink {
	l := &tcpLink{codec: s.codec, c: c}
	if tc, ok := c.(*net.TCPConn); ok {
		if raw, err := tc.SyscallConn(); err == nil {
			l.raw = raw
		}
	}
	return l
}

// nextFrame takes the next complete frame out of the bytes a polled link
// has read; nil if none is complete yet. A declared length over the frame
// limit is refused before the rest arrives.
func (l *tcpLink) nextFrame() (*gatewaypb.Frame, error) {
	if len(l.pending) < wire.HeaderSize {
		return nil, nil
	}
	n := binary.BigEndian.Uint32(l.pending[1:wire.HeaderSize])
	if int64(n) > int64(l.codec.MaxFrame()) {
		return nil, fmt.Errorf("wire: frame of %d bytes over %d: %w", n, l.codec.MaxFrame(), wire.ErrFrameTooLarge)
	}
	end := wire.HeaderSize + int(n)
	if len(l.pending) < end {
		return nil, nil
	}
	f, err := l.codec.DecodeTLV(l.pending[0], l.pending[wire.HeaderSize:end])
	if rest := l.pending[end:]; len(rest) == 0 {
		l.pending = nil // an idle link holds no buffer
	} else {
		l.pending = append([]byte(nil), rest...)
	}
	return f, err
}

func (l *tcpLink) read(deadline time.Time) (*gatewaypb.Frame, error) {
	if err := l.c.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	f, _, err := l.codec.ReadTLV(l.c, l.hdr[:])
	return f, err
}

// writeBufs pools the buffers frames are encoded into.
var writeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func (l *tcpLink) write(ctx context.Context, frames []*gatewaypb.Frame) error {
	bp := writeBufs.Get().(*[]byte)
	defer func() {
		if cap(*bp) <= 1<<20 {
			writeBufs.Put(bp)
		}
	}()
	buf := (*bp)[:0]
	compress := l.compress.Load()
	for _, f := range frames {
		var err error
		if buf, err = l.codec.AppendTLV(buf, f, compress); err != nil {
			return err
		}
	}
	*bp = buf
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	if err := l.c.SetWriteDeadline(deadline); err != nil {
		return err
	}
	_, err := l.c.Write(buf)
	return err
}

func (l *tcpLink) setCompress(on bool) { l.compress.Store(on) }
func (l *tcpLink) canCompress() bool   { return true }
func (l *tcpLink) close()              { l.once.Do(func() { _ = l.c.Close() }) }
func (l *tcpLink) closeGracefully()    { l.close() }
func (l *tcpLink) transport() string   { return "tcp" }
func (l *tcpLink) remote() string      { return l.c.RemoteAddr().String() }

// wsLink is a WebSocket connection: one frame per message, binary
// (protobuf) or, with the JSON sub-protocol, text (protojson).
type wsLink struct {
	codec    *wire.Codec
	c        *websocket.Conn
	json     bool
	addr     string
	compress atomic.Bool
	once     sync.Once
}

func acceptWebSocket(s *Server, w http.ResponseWriter, r *http.Request, origins []string) (*wsLink, error) {
	c, err := websocket.Accept(smallBuffers{w}, r, &websocket.AcceptOptions{
		Subprotocols:   []string{wire.SubprotocolProto, wire.SubprotocolJSON},
		OriginPatterns: origins,
		// Frames are compressed with zstd above a threshold, by agreement
		// in hello; per-message deflate would cost a compressor per link.
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, err
	}
	c.SetReadLimit(int64(s.codec.MaxFrame()))
	// The library matches sub-protocols without regard to case.
	json := strings.EqualFold(c.Subprotocol(), wire.SubprotocolJSON)
	return &wsLink{codec: s.codec, c: c, json: json, addr: r.RemoteAddr}, nil
}

func (l *wsLink) read(deadline time.Time) (*gatewaypb.Frame, error) {
	ctx := context.Background()
	if !deadline.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, deadline)
		defer cancel()
	}
	typ, b, err := l.c.Read(ctx)
	if err != nil {
		var ce websocket.CloseError
		if errors.As(err, &ce) {
			return nil, fmt.Errorf("websocket closed by peer (%d %s): %w", ce.Code, ce.Reason, errPeerClosed)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("websocket read: %w", errTimeout)
		}
		return nil, err
	}
	if l.json {
		if typ != websocket.MessageText {
			return nil, fmt.Errorf("binary message on the JSON sub-protocol: %w", wire.ErrBadFrame)
		}
		return l.codec.DecodeJSON(b)
	}
	if typ != websocket.MessageBinary {
		return nil, fmt.Errorf("text message on the protobuf sub-protocol: %w", wire.ErrBadFrame)
	}
	return l.codec.DecodeBinary(b)
}

func (l *wsLink) write(ctx context.Context, frames []*gatewaypb.Frame) error {
	compress := l.compress.Load()
	for _, f := range frames {
		var (
			b   []byte
			err error
			typ = websocket.MessageBinary
		)
		if l.json {
			b, err = l.codec.EncodeJSON(f)
			typ = websocket.MessageText
		} else {
			b, err = l.codec.EncodeBinary(f, compress)
		}
		if err != nil {
			return err
		}
		if err := l.c.Write(ctx, typ, b); err != nil {
			return err
		}
	}
	return nil
}

func (l *wsLink) setCompress(on bool) { l.compress.Store(on && !l.json) }
func (l *wsLink) canCompress() bool   { return !l.json }
func (l *wsLink) close()              { l.once.Do(func() { _ = l.c.CloseNow() }) }
func (l *wsLink) closeGracefully() {
	l.once.Do(func() { _ = l.c.Close(websocket.StatusNormalClosure, "") })
}
func (l *wsLink) transport() string {
	if l.json {
		return "ws-json"
	}
	return "ws"
}
func (l *wsLink) remote() string { return l.addr }

// smallBuffers hands coder/websocket, on Hijack, a reader and a writer
// with small buffers in place of net/http's 4 KiB ones, which it would keep
// for the life of the link: 8 KiB of every idle WebSocket. Larger reads and
// writes bypass a bufio buffer anyway.
type smallBuffers struct{ http.ResponseWriter }

const (
	wsReadBuffer  = 512
	wsWriteBuffer = 1024
)

func (w smallBuffers) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	hj, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("http.ResponseWriter does not implement http.Hijacker")
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	// Bytes the client sent after its upgrade request (or the byte
	// net/http's background read took) are already in net/http's reader.
	// They must be buffered in ours too: coder/websocket keeps what the
	// reader has buffered and re-points it at the connection.
	n := brw.Reader.Buffered()
	if n == 0 {
		return c, bufio.NewReadWriter(bufio.NewReaderSize(c, wsReadBuffer), bufio.NewWriterSize(c, wsWriteBuffer)), nil
	}
	b, _ := brw.Reader.Peek(n)
	r := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(b)), c), max(wsReadBuffer, n))
	if _, err := r.Peek(n); err != nil {
		_ = c.Close()
		return nil, nil, fmt.Errorf("hijack: %w", err)
	}
	return c, bufio.NewReadWriter(r, bufio.NewWriterSize(c, wsWriteBuffer)), nil
}

var (
	errPeerClosed = errors.New("closed by peer")
	errTimeout    = errors.New("timeout")
)
