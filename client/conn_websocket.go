package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// wsConn is a WebSocket connection: one frame per message, binary
// (protobuf, maybe zstd) or, with the JSON sub-protocol, text (protojson).
type wsConn struct {
	c        *websocket.Conn
	raw      net.Conn // the socket under c, to bound a graceful close
	json     bool
	codec    *wire.Codec
	compress bool
	once     sync.Once
}

func dialWebSocket(ctx context.Context, u string, tlsConf *tls.Config, json bool, codec *wire.Codec) (*wsConn, error) {
	sub := wire.SubprotocolProto
	if json {
		sub = wire.SubprotocolJSON
	}
	// A transport per link: it pools nothing (the connection is taken over
	// by the WebSocket) and hands us the socket, so that a close handshake
	// with an unresponsive server can be cut short.
	var (
		mu  sync.Mutex
		raw net.Conn
	)
	var nd net.Dialer
	tr := &http.Transport{
		Proxy:           http.ProxyFromEnvironment,
		TLSClientConfig: tlsConf,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := nd.DialContext(ctx, network, addr)
			if err == nil {
				mu.Lock()
				raw = c
				mu.Unlock()
			}
			return c, err
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	c, _, err := websocket.Dial(ctx, u, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: tr},
		Subprotocols: []string{sub},
		// Frames are compressed with zstd by agreement in Hello, not with
		// per-message deflate.
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		return nil, err
	}
	if got := c.Subprotocol(); !strings.EqualFold(got, sub) {
		_ = c.CloseNow()
		return nil, fmt.Errorf("server chose sub-protocol %q, want %q", got, sub)
	}
	c.SetReadLimit(int64(codec.MaxFrame()))
	mu.Lock()
	defer mu.Unlock()
	return &wsConn{c: c, raw: raw, json: json, codec: codec}, nil
}

func (w *wsConn) read(deadline time.Time) (*gatewaypb.Frame, error) {
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	typ, b, err := w.c.Read(ctx)
	if err != nil {
		return nil, err
	}
	if w.json {
		if typ != websocket.MessageText {
			return nil, fmt.Errorf("binary message on the JSON sub-protocol: %w", wire.ErrBadFrame)
		}
		return w.codec.DecodeJSON(b)
	}
	if typ != websocket.MessageBinary {
		return nil, fmt.Errorf("text message on the protobuf sub-protocol: %w", wire.ErrBadFrame)
	}
	return w.codec.DecodeBinary(b)
}

func (w *wsConn) write(ctx context.Context, f *gatewaypb.Frame) error {
	var (
		b   []byte
		err error
		typ = websocket.MessageBinary
	)
	if w.json {
		b, err = w.codec.EncodeJSON(f)
		typ = websocket.MessageText
	} else {
		b, err = w.codec.EncodeBinary(f, w.compress)
	}
	if err != nil {
		return err
	}
	return w.c.Write(ctx, typ, b)
}

func (w *wsConn) configure(codec *wire.Codec, compress bool) {
	w.codec, w.compress = codec, compress && !w.json
	w.c.SetReadLimit(int64(codec.MaxFrame()))
}

// close ends the connection. A graceful close sends a normal closure and
// waits for the server's, at most closeTimeout: then the socket is closed
// under the library, which returns at once.
func (w *wsConn) close(graceful bool) {
	w.once.Do(func() {
		if !graceful || w.raw == nil {
			_ = w.c.CloseNow()
			return
		}
		cut := time.AfterFunc(closeTimeout, func() { _ = w.raw.Close() })
		err := w.c.Close(websocket.StatusNormalClosure, "")
		cut.Stop()
		if err != nil && !errors.Is(err, net.ErrClosed) {
			_ = w.c.CloseNow()
		}
	})
}
