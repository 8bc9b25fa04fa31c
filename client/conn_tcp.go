package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"sync"
	"time"

	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// tcpConn is a TCP (or TLS) connection carrying TLV frames.
type tcpConn struct {
	nc       net.Conn
	br       *bufio.Reader
	hdr      [wire.HeaderSize]byte
	codec    *wire.Codec
	compress bool
	buf      []byte // the frame being written (writes are serialized)
	once     sync.Once
}

func dialTCP(ctx context.Context, addr string, tlsConf *tls.Config, codec *wire.Codec) (*tcpConn, error) {
	var (
		nd  net.Dialer
		nc  net.Conn
		err error
	)
	if tlsConf != nil {
		td := tls.Dialer{NetDialer: &nd, Config: tlsConf}
		nc, err = td.DialContext(ctx, "tcp", addr)
	} else {
		nc, err = nd.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return nil, err
	}
	return &tcpConn{nc: nc, br: bufio.NewReaderSize(nc, 16<<10), codec: codec}, nil
}

func (t *tcpConn) read(deadline time.Time) (*gatewaypb.Frame, error) {
	if err := t.nc.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	f, _, err := t.codec.ReadTLV(t.br, t.hdr[:])
	return f, err
}

func (t *tcpConn) write(ctx context.Context, f *gatewaypb.Frame) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b, err := t.codec.AppendTLV(t.buf[:0], f, t.compress)
	if err != nil {
		return err
	}
	if cap(b) <= 64<<10 {
		t.buf = b
	}
	deadline, _ := ctx.Deadline()
	if err := t.nc.SetWriteDeadline(deadline); err != nil {
		return err
	}
	_, err = t.nc.Write(b)
	return err
}

func (t *tcpConn) configure(codec *wire.Codec, compress bool) {
	t.codec, t.compress = codec, compress
}

// close closes the socket. TLV has no closing handshake: the server takes
// the end of the stream as the end of the link.
func (t *tcpConn) close(bool) { t.once.Do(func() { _ = t.nc.Close() }) }
