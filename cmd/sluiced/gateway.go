package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/web"
	"golang.org/x/sync/errgroup"
)

// tokenKeyFile is where sluiced keeps the token signing key, under the data
// directory (sluicectl token reads it there).
const tokenKeyFile = "token.key"

// gatewayParts is the gateway side of sluiced: the server, its two
// listeners, the HTTP server of WebSocket and dispatch, and the dispatch
// registry.
type gatewayParts struct {
	srv      *gateway.Server
	registry *gateway.Registry
	tcp      net.Listener
	ws       net.Listener
	http     *http.Server
	wsURL    string
}

// startGateway builds the gateway and binds its listeners; serve runs it.
func (m *Main) startGateway(ctx context.Context) (*gatewayParts, error) {
	keys, err := m.tokenKeys()
	if err != nil {
		return nil, err
	}
	tokens := gateway.NewVerifier(keys...)
	srv, err := gateway.NewServer(gateway.Config{
		Views:     m.delivery,
		Devices:   m.devices,
		Suppress:  m.delivery.Suppressed,
		Receipts:  m.delivery,
		Analytics: m.analytics,
		Inbox:     m.inbox,
		Topics:    m.topics,
		Buckets:   m.buckets,
		Scheduler: m.sched,
		Tokens:    tokens,
		MaxFrame:  m.cfg.MaxFrame,
		Heartbeat: m.cfg.Heartbeat,
		MaxConns:  m.cfg.MaxConns,
		Logger:    &m.log,
	})
	if err != nil {
		return nil, err
	}
	var tlsCfg *tls.Config
	if m.cfg.TLSCert != "" {
		cert, err := tls.LoadX509KeyPair(m.cfg.TLSCert, m.cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		tlsCfg = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	}
	gp := &gatewayParts{srv: srv}
	listen := func(addr, what string) (net.Listener, error) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("%s listener: %w", what, err)
		}
		if tlsCfg != nil {
			ln = tls.NewListener(ln, tlsCfg)
		}
		return ln, nil
	}
	if gp.tcp, err = listen(m.cfg.TCPListen, "TLV"); err != nil {
		return nil, err
	}
	if gp.ws, err = listen(m.cfg.WSListen, "WebSocket"); err != nil {
		_ = gp.tcp.Close()
		return nil, err
	}
	scheme := "ws"
	if tlsCfg != nil {
		scheme = "wss"
	}
	gp.wsURL = scheme + "://" + advertised(m.cfg.AdvertiseWS, gp.ws.Addr()) + "/v1/ws"
	var id [8]byte
	_, _ = rand.Read(id[:])
	gp.registry, err = gateway.OpenRegistry(ctx, gateway.RegistryConfig{
		JetStream: m.lg.JetStream(),
		Node: gateway.Node{
			ID:        "node-" + hex.EncodeToString(id[:]),
			WebSocket: gp.wsURL,
			TCP:       advertised(m.cfg.AdvertiseTCP, gp.tcp.Addr()),
			TLS:       tlsCfg != nil,
		},
		Replicas: m.cfg.Replicas,
		Logger:   &m.log,
	})
	if err != nil {
		_ = gp.tcp.Close()
		_ = gp.ws.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/v1/ws", srv.WebSocketHandler(splitList(m.cfg.WSOrigins)))
	mux.Handle("/v1/dispatch", gp.registry.Handler())
	auth := gateway.DeviceAuth(tokens)
	mux.Handle("/v1/updates", m.delivery.UpdatesHandler(auth))
	mux.Handle("/v1/packages/", m.delivery.DownloadHandler("/v1/packages/", auth))
	deviceAuth := func(r *http.Request) (analytics.Identity, error) {
		id, err := auth(r)
		return analytics.Identity{Device: id.Device, User: id.User}, err
	}
	mux.Handle("/v1/analytics", m.analytics.Handler(deviceAuth))
	mux.Handle("/v1/diagnostics/", m.diagnostics.UploadHandler(deviceAuth))
	mux.Handle("/", web.Handler()) // the browser client and its demo page
	gp.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	return gp, nil
}

// serve runs the gateway on g until drain is closed, then drains it:
// the node leaves dispatch, every link gets GoAway and its queue, and the
// listeners close. The returned channel closes when the drain is over.
func (gp *gatewayParts) serve(ctx context.Context, g *errgroup.Group, drain <-chan struct{}, m *Main) <-chan struct{} {
	drained := make(chan struct{})
	g.Go(func() error { return gp.registry.Run(ctx) })
	g.Go(func() error {
		if err := gp.srv.ServeTCP(gp.tcp); err != nil {
			return fmt.Errorf("gateway TLV: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		if err := gp.http.Serve(gp.ws); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("gateway WebSocket: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		defer close(drained)
		<-drain
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := gp.registry.SetDraining(sctx); err != nil {
			m.log.Warn().Err(err).Msg("dispatch: draining not announced")
		}
		cancel()
		dctx, cancel := context.WithTimeout(context.Background(), m.cfg.DrainTimeout)
		defer cancel()
		err := gp.srv.Shutdown(dctx)
		// Hijacked WebSocket connections are the gateway's; the HTTP
		// server only has idle upgrades and dispatch requests left.
		hctx, hcancel := context.WithTimeout(context.Background(), time.Second)
		defer hcancel()
		_ = gp.http.Shutdown(hctx)
		if err != nil {
			m.log.Warn().Err(err).Msg("gateway drain cut short")
		}
		return nil
	})
	return drained
}

// tokenKeys loads (or creates) the signing key under the data directory
// and any further public keys accepted during a rotation.
func (m *Main) tokenKeys() ([]ed25519.PublicKey, error) {
	path := m.cfg.TokenKey
	if path == "" {
		path = filepath.Join(m.cfg.DataDir, tokenKeyFile)
	}
	priv, err := gateway.LoadOrCreateKey(path)
	if err != nil {
		return nil, fmt.Errorf("token key: %w", err)
	}
	keys := []ed25519.PublicKey{priv.Public().(ed25519.PublicKey)}
	for _, p := range splitList(m.cfg.TokenPublicKeys) {
		k, err := gateway.LoadPublicKey(p)
		if err != nil {
			return nil, fmt.Errorf("--token-public-keys: %w", err)
		}
		keys = append(keys, k)
	}
	return keys, nil
}

// advertised is the address to announce: the flag if set, else the
// listener's own.
func advertised(flag string, addr net.Addr) string {
	if flag != "" {
		return flag
	}
	return addr.String()
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}

// deliveryKeyFile is where sluiced keeps the manifest signing key, under
// the data directory.
const deliveryKeyFile = "delivery.key"

// openDelivery loads (or creates) the manifest signing key and opens the
// release and switch state.
func (m *Main) openDelivery(ctx context.Context) error {
	path := m.cfg.DeliveryKey
	if path == "" {
		path = filepath.Join(m.cfg.DataDir, deliveryKeyFile)
	}
	key, err := gateway.LoadOrCreateKey(path)
	if err != nil {
		return fmt.Errorf("delivery key: %w", err)
	}
	m.devices, err = delivery.OpenRegistry(ctx, delivery.RegistryConfig{Log: m.lg, Dir: filepath.Join(m.cfg.DataDir, "devices"), Logger: &m.log})
	if err != nil {
		return err
	}
	var channels []delivery.OfflineChannel
	if m.cfg.PushWebhook != "" {
		hook, err := delivery.NewWebhook(delivery.WebhookConfig{URL: m.cfg.PushWebhook, Secret: []byte(m.cfg.PushWebhookSecret)})
		if err != nil {
			return err
		}
		channels = append(channels, hook)
	}
	if m.analytics, err = analytics.Open(ctx, analytics.Config{Log: m.lg, Logger: &m.log}); err != nil {
		return err
	}
	if m.diagnostics, err = analytics.OpenDiagnostics(ctx, analytics.DiagnosticsConfig{Log: m.lg, Logger: &m.log}); err != nil {
		return err
	}
	if m.aggregates, err = analytics.OpenAggregates(analytics.AggregatesConfig{Log: m.lg, Dir: filepath.Join(m.cfg.DataDir, "analytics"), Logger: &m.log}); err != nil {
		return err
	}
	m.delivery, err = delivery.Open(ctx, delivery.Config{Log: m.lg, Signer: delivery.NewSigner(key), Fanout: m.fanout,
		Dir: filepath.Join(m.cfg.DataDir, "receipts"), Registry: m.devices, OfflineChannels: channels, OfflineAfter: m.cfg.OfflineAfter,
		MaxPackageSize: m.cfg.MaxPackage, ManifestTTL: m.cfg.ManifestTTL, Logger: &m.log})
	if err != nil {
		return err
	}
	m.breakers, err = analytics.OpenBreakers(ctx, analytics.BreakersConfig{Log: m.lg, Aggregates: m.aggregates,
		Actions: m.delivery, Logger: &m.log})
	return err
}
