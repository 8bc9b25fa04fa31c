package gateway

import (
	"errors"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// Views is what the gateway needs of the delivery state
// (delivery.Delivery): a device's view of switches and releases, and a
// signal when views may have changed.
type Views interface {
	View(d *delivery.Device) *deliverypb.View
	Changed() <-chan struct{}
}

// Devices is a device registry (delivery.Registry): told of every device
// that connects, and again when its attributes or user change, for dry
// runs. Seen must not block.
type Devices interface {
	Seen(app string, d *delivery.Device, push *deliverypb.PushAddress)
}

// Receipts records push receipts (delivery.Delivery): Sent for every push
// entry a session sends, Received for the receipts clients report. Both
// must not block.
type Receipts interface {
	Sent(device string, e *oplogpb.Entry)
	Received(device string, r *deliverypb.Receipt)
}

// maxReceipts bounds the receipts in one client event.
const maxReceipts = 256

// reportDevice tells the registry, if any, what the device is now, with
// its vendor push address if the client just gave one (nil: unchanged).
func (ss *session) reportDevice(push *deliverypb.PushAddress) {
	reg := ss.srv.cfg.Devices
	if reg == nil {
		return
	}
	ss.mu.Lock()
	d := &delivery.Device{ID: ss.device, User: ss.user, Attrs: ss.attrs.Value()}
	ss.mu.Unlock()
	reg.Seen(ss.app, d, push)
}

// sentPush reports a push entry handed to the link.
func (ss *session) sentPush(e *oplogpb.Entry) {
	if rc := ss.srv.cfg.Receipts; rc != nil && e.Kind == oplogpb.Kind_KIND_PUSH {
		rc.Sent(ss.device, e)
	}
}

// viewFrameSlack is room under the frame limit for the TLV or WebSocket
// framing of a View.
const viewFrameSlack = 1024

// viewState is what a session that wants views knows of them.
type viewState struct {
	digest string // of the view the client holds
}

// deviceChanged reports the device and sends its view: its attributes,
// user or push address changed, or it connected.
func (ss *session) deviceChanged(push *deliverypb.PushAddress) {
	ss.reportDevice(push)
	ss.sendView()
}

// sendView computes the device's view and queues it if it differs from
// the one the client holds. It runs under ss.mu, so two computations for
// one session cannot queue their views out of order.
func (ss *session) sendView() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.view == nil || ss.closing {
		return
	}
	v := ss.srv.cfg.Views.View(&delivery.Device{ID: ss.device, User: ss.user, Attrs: ss.attrs.Value()})
	if v.Digest == ss.view.digest {
		return
	}
	f := &gatewaypb.Frame{Body: &gatewaypb.Frame_View{View: v}}
	if n := proto.Size(f); n > ss.srv.codec.MaxFrame()-viewFrameSlack {
		// Sent, it would break the link, and the device would loop
		// reconnecting. Delivery bounds what views carry; this is the
		// last guard.
		ss.logAt(zerolog.ErrorLevel).Int("bytes", n).Msg("view over the frame limit: not sent")
		return
	}
	ss.view.digest = v.Digest
	ss.enqueueLocked(f, false)
}

// followViews re-evaluates every session that wants views whenever the
// delivery state may have changed, until the server shuts down.
func (s *Server) followViews() {
	defer s.wg.Done()
	changed := s.cfg.Views.Changed()
	var sessions []*session // reused: this goroutine's only
	for {
		select {
		case <-s.done:
			return
		case <-changed:
		}
		// Taken before evaluating: a change during the evaluation wakes
		// this loop again.
		changed = s.cfg.Views.Changed()
		sessions = s.sessionList(sessions)
		// Every core computes views: a change must reach a node's devices
		// within a second, and a view costs microseconds.
		start := time.Now()
		var next, n atomic.Int64
		var wg sync.WaitGroup
		for range runtime.GOMAXPROCS(0) {
			wg.Go(func() {
				for i := next.Add(1) - 1; i < int64(len(sessions)); i = next.Add(1) - 1 {
					ss := sessions[i]
					ss.mu.Lock()
					wants := ss.view != nil
					ss.mu.Unlock()
					if wants {
						ss.sendView()
						n.Add(1)
					}
				}
			})
		}
		wg.Wait()
		clear(sessions) // keep no finished session alive until the next change
		s.log.Debug().Int64("sessions", n.Load()).Dur("took", time.Since(start)).Msg("views re-evaluated")
	}
}

// suppressed reports whether an entry must not be sent (Config.Suppress).
func (s *Server) suppressed(e *oplogpb.Entry) bool {
	return s.cfg.Suppress != nil && s.cfg.Suppress(e)
}

// DeviceAuth authenticates a device's HTTP request (the update check,
// downloads) by the bearer token it also presents in its Hello.
func DeviceAuth(v *Verifier) delivery.Authenticator {
	return func(r *http.Request) (delivery.Identity, error) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			return delivery.Identity{}, errors.New("want Authorization: Bearer <device token>")
		}
		c, err := v.Verify(tok, time.Now())
		if err != nil {
			return delivery.Identity{}, err
		}
		return delivery.Identity{Device: c.Device, User: c.User}, nil
	}
}
