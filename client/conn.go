package client

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"time"

	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// conn is one transport connection carrying frames. read is called by one
// goroutine at a time; write by one at a time (link serializes them);
// close may be called by anyone, any number of times, and unblocks read
// and write.
type conn interface {
	// read returns the next frame; it fails once deadline passes.
	read(deadline time.Time) (*gatewaypb.Frame, error)
	// write sends one frame, giving up when ctx ends.
	write(ctx context.Context, f *gatewaypb.Frame) error
	// configure applies what Welcome agreed: the codec of its frame limits,
	// and whether frames sent may be compressed. Called before the link's
	// goroutines start.
	configure(codec *wire.Codec, compress bool)
	// close ends the connection; graceful tries a closing handshake first,
	// bounded by closeTimeout.
	close(graceful bool)
}

// closeTimeout bounds a graceful close.
const closeTimeout = time.Second

// endpoint is one parsed address of Config.URL or Config.URLs.
type endpoint struct {
	raw      string // as configured, for logs
	ws       bool   // WebSocket (ws:// or wss://); else TLV over TCP
	tls      bool   // wss:// or tls://
	url      string // ws: the URL to dial
	hostport string // tcp: the address to dial
	http     string // ws: the HTTP base of the same listener, http(s)://host:port
}

// parseEndpoint checks one configured address.
func parseEndpoint(s string) (endpoint, error) {
	u, err := url.Parse(s)
	if err != nil {
		return endpoint{}, fmt.Errorf("client: URL %q: %v", s, err)
	}
	if u.Host == "" {
		return endpoint{}, fmt.Errorf("client: URL %q has no host", s)
	}
	e := endpoint{raw: s}
	switch u.Scheme {
	case "ws", "wss":
		e.ws, e.tls, e.url = true, u.Scheme == "wss", s
		e.http = "http://" + u.Host
		if e.tls {
			e.http = "https://" + u.Host
		}
	case "tcp", "tls":
		if u.Port() == "" {
			return endpoint{}, fmt.Errorf("client: URL %q has no port", s)
		}
		if u.Path != "" && u.Path != "/" {
			return endpoint{}, fmt.Errorf("client: URL %q: a %s:// address takes no path", s, u.Scheme)
		}
		e.tls, e.hostport = u.Scheme == "tls", u.Host
	default:
		return endpoint{}, fmt.Errorf("client: URL %q: scheme must be ws, wss, tcp or tls", s)
	}
	return e, nil
}

// dial opens a connection to e, with the codec used until Welcome.
func (c *Client) dial(ctx context.Context, e endpoint, codec *wire.Codec) (conn, error) {
	var tlsConf *tls.Config
	if e.tls {
		tlsConf = c.tls
	}
	if e.ws {
		return dialWebSocket(ctx, e.url, tlsConf, c.cfg.JSON, codec)
	}
	return dialTCP(ctx, e.hostport, tlsConf, codec)
}
