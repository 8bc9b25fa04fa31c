package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"google.golang.org/protobuf/proto"
)

// The gateway-link side of the ingest scenario: tracking events sent as
// ClientEvent.analytics frames over TLV links to a gateway.Server whose
// Config.Analytics is the same Ingestor the HTTP side posts to, each batch
// answered by an AnalyticsAck (PROTOCOL.md §4.13).

// linkAckTimeout bounds the wait for one batch's AnalyticsAck.
const linkAckTimeout = 30 * time.Second

// linkConn is one device's link: frames are written by the workers (one
// at a time) and read by the link's own goroutine, which hands each
// AnalyticsAck to the worker waiting for that batch number.
type linkConn struct {
	bc      *benchConn
	mu      sync.Mutex
	waiting map[uint64]chan *gatewaypb.AnalyticsAck
	err     error // why the reader stopped
}

func (l *linkConn) expect(batch uint64) chan *gatewaypb.AnalyticsAck {
	ch := make(chan *gatewaypb.AnalyticsAck, 1)
	l.mu.Lock()
	l.waiting[batch] = ch
	l.mu.Unlock()
	return ch
}

func (l *linkConn) forget(batch uint64) {
	l.mu.Lock()
	delete(l.waiting, batch)
	l.mu.Unlock()
}

// readLoop reads until the link ends: acks go to their waiters, probes
// are echoed, rounds and views are dropped.
func (l *linkConn) readLoop(ctx context.Context) {
	for {
		f, err := l.bc.read(ctx, 0)
		if err != nil {
			l.mu.Lock()
			l.err = err
			for b, ch := range l.waiting {
				close(ch)
				delete(l.waiting, b)
			}
			l.mu.Unlock()
			return
		}
		switch body := f.Body.(type) {
		case *gatewaypb.Frame_AnalyticsAck:
			l.mu.Lock()
			ch := l.waiting[body.AnalyticsAck.Batch]
			delete(l.waiting, body.AnalyticsAck.Batch)
			l.mu.Unlock()
			if ch != nil {
				ch <- body.AnalyticsAck
			}
		case *gatewaypb.Frame_Probe:
			_ = l.bc.echo(ctx, body.Probe)
		}
	}
}

// linkFrames turns the pool's HTTP bodies into the TLV frames a client
// sends over its link (compressed by the codec as the Go SDK's are), on
// every core, before timing. Frame i carries batch number i+1.
func linkFrames(codec *wire.Codec, pool *ingestPool) ([][]byte, error) {
	frames := make([][]byte, len(pool.batches))
	workers := runtime.GOMAXPROCS(0)
	errs := make([]error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := w; i < len(frames); i += workers {
				zr, err := gzip.NewReader(bytes.NewReader(pool.batches[i].body))
				if err != nil {
					errs[w] = err
					return
				}
				plain, err := io.ReadAll(zr)
				if err != nil {
					errs[w] = err
					return
				}
				b := &analyticspb.Batch{}
				if err := proto.Unmarshal(plain, b); err != nil {
					errs[w] = err
					return
				}
				f := &gatewaypb.Frame{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{
					Analytics: b, AnalyticsBatch: uint64(i + 1)}}}
				if frames[i], err = codec.AppendTLV(nil, f, true); err != nil {
					errs[w] = fmt.Errorf("batch %d: %w", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	return frames, firstError(errs)
}

// ingestLink opens a TLV link per device of the pool (Hello asking for
// AnalyticsAck frames, then the first round), then has cfg.conc workers
// send the pool's batches in turn, each after the previous one's ack,
// until -time has passed or every batch is sent; every ack must accept
// every event of its batch.
func (b *analyticsBench) ingestLink(ctx context.Context, addr string, pool *ingestPool) (ph ingestPhase, err error) {
	codec, err := wire.NewCodec(wire.Options{})
	if err != nil {
		return ph, err
	}
	frames, err := linkFrames(codec, pool)
	if err != nil {
		return ph, err
	}
	used := min(len(pool.devices), len(pool.batches))
	links := make([]*linkConn, used)
	rctx, cancel := context.WithCancel(ctx)
	var readers sync.WaitGroup
	defer func() {
		cancel()
		for _, l := range links {
			if l != nil {
				l.bc.close()
			}
		}
		readers.Wait()
	}()
	var next atomic.Int64
	const par = 32
	dialErrs := make([]error, par)
	var dwg sync.WaitGroup
	for w := range par {
		dwg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= used || ctx.Err() != nil {
					return
				}
				hctx, hcancel := context.WithTimeout(ctx, handshakeTimeout)
				c, err := (&net.Dialer{Timeout: 10 * time.Second}).DialContext(hctx, "tcp", addr)
				if err != nil {
					hcancel()
					dialErrs[w] = fmt.Errorf("device %d: %w", i, err)
					return
				}
				bc := &benchConn{idx: i, codec: codec, tcp: c, br: bufio.NewReaderSize(c, 4096)}
				links[i] = &linkConn{bc: bc, waiting: map[uint64]chan *gatewaypb.AnalyticsAck{}}
				hello := &gatewaypb.Frame{Body: &gatewaypb.Frame_Hello{Hello: &gatewaypb.Hello{
					Version: wire.Version, Token: pool.devices[i].token, Analytics: true}}}
				_, err = bc.handshake(hctx, hello, true)
				hcancel()
				if err != nil {
					dialErrs[w] = fmt.Errorf("device %d: %w", i, err)
					return
				}
				readers.Go(func() { links[i].readLoop(rctx) })
			}
		})
	}
	dwg.Wait()
	if err := firstError(dialErrs); err != nil {
		return ph, err
	}
	b.log.Info().Int("links", used).Msg("links open")

	return b.drive(ctx, pool, b.cfg.conc, func(_, i int) (time.Duration, error) {
		bt := &pool.batches[i]
		l := links[bt.device]
		ch := l.expect(uint64(i + 1))
		t0 := time.Now()
		err := l.send(ctx, frames[i], ch, len(bt.msgs))
		if err != nil {
			l.forget(uint64(i + 1))
			return 0, err
		}
		return time.Since(t0), nil
	})
}

// send writes one analytics frame and waits for its ack on ch, which must
// accept every one of want events.
func (l *linkConn) send(ctx context.Context, frame []byte, ch <-chan *gatewaypb.AnalyticsAck, want int) error {
	l.bc.wmu.Lock()
	_ = l.bc.tcp.SetWriteDeadline(time.Now().Add(10 * time.Second))
	_, err := l.bc.tcp.Write(frame)
	l.bc.wmu.Unlock()
	if err != nil {
		return err
	}
	select {
	case ack, ok := <-ch:
		switch {
		case !ok:
			l.mu.Lock()
			defer l.mu.Unlock()
			return fmt.Errorf("link closed: %v", l.err)
		case ack.Error != nil:
			return fmt.Errorf("refused: %s: %s", ack.Error.Code, ack.Error.Message)
		case int(ack.Reply.GetAccepted()) != want || ack.Reply.GetDuplicates() != 0 || len(ack.Reply.GetRejected()) != 0:
			return fmt.Errorf("%d events accepted, %d duplicates, %d rejected (%v); want %d accepted",
				ack.Reply.GetAccepted(), ack.Reply.GetDuplicates(), len(ack.Reply.GetRejected()), ack.Reply.GetRejected(), want)
		}
		return nil
	case <-time.After(linkAckTimeout):
		return fmt.Errorf("no ack after %s", linkAckTimeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}
