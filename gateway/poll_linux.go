//go:build linux

package gateway

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
)

// poller watches idle plain-TCP links with epoll, so that an idle link has
// no goroutine at all: its reader's stack (2-4 KiB) was most of an idle TLV
// link's memory. A link readable again gets a short-lived goroutine that
// reads what the socket holds, handles the frames and re-arms the link
// (EPOLLONESHOT: one reader at a time). Writes still go through net.Conn
// (the runtime's poller parks a flusher while a socket is full). TLS and
// WebSocket links keep a reader goroutine: their libraries read for
// themselves.
//
// Events carry a token, never reused, rather than the descriptor: a
// descriptor number can be reused by a new connection as soon as the old
// one closes. Registration and re-arming run inside RawConn.Control, which
// holds the descriptor open for the call.
//
// The loop never blocks a thread in epoll_wait: the epoll descriptor is
// itself registered with the runtime's poller (an os.File in non-blocking
// mode), and the loop reads events with a zero timeout, parking while
// there are none. A blocking epoll_wait held one of the process's Ps in a
// system call until sysmon took it back: with GOMAXPROCS 2 the gateway
// used about 1.6 cores under load instead of 2. Closing ep stops the loop:
// the runtime wakes a goroutine parked on a file being closed.
type poller struct {
	epfd int
	ep   *os.File        // epfd, for the runtime's poller
	rc   syscall.RawConn // of ep

	mu    sync.Mutex
	next  uint64
	links map[uint64]*session
	done  chan struct{}
}

func newPoller() (*poller, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("gateway: epoll: %w", err)
	}
	p := &poller{epfd: epfd, links: map[uint64]*session{}, done: make(chan struct{})}
	if err := syscall.SetNonblock(epfd, true); err != nil {
		_ = syscall.Close(epfd)
		return nil, fmt.Errorf("gateway: epoll: %w", err)
	}
	p.ep = os.NewFile(uintptr(epfd), "epoll") // non-blocking: the runtime polls it
	if p.rc, err = p.ep.SyscallConn(); err != nil {
		_ = p.ep.Close()
		return nil, fmt.Errorf("gateway: epoll: %w", err)
	}
	go p.loop()
	return p, nil
}

const pollEvents = syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT

func pollEvent(token uint64) *syscall.EpollEvent {
	return &syscall.EpollEvent{Events: pollEvents, Fd: int32(uint32(token)), Pad: int32(uint32(token >> 32))}
}

// add hands ss's link to the poller; on success the poller (through
// ss.readable) owns the link's reads.
func (p *poller) add(ss *session, l *tcpLink) error {
	p.mu.Lock()
	p.next++
	token := p.next
	p.links[token] = ss
	p.mu.Unlock()
	ss.pollToken = token
	var cerr error
	err := l.raw.Control(func(fd uintptr) {
		cerr = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_ADD, int(fd), pollEvent(token))
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		p.remove(token)
		return err
	}
	return nil
}

// rearm waits for the link's next readable event.
func (p *poller) rearm(ss *session, l *tcpLink) error {
	var cerr error
	err := l.raw.Control(func(fd uintptr) {
		cerr = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_MOD, int(fd), pollEvent(ss.pollToken))
	})
	if err != nil {
		return err
	}
	return cerr
}

// remove forgets a link (closing its descriptor removes it from epoll).
func (p *poller) remove(token uint64) {
	p.mu.Lock()
	delete(p.links, token)
	p.mu.Unlock()
}

func (p *poller) loop() {
	defer close(p.done)
	events := make([]syscall.EpollEvent, 256)
	for {
		var n int
		var werr error
		err := p.rc.Read(func(fd uintptr) bool {
			n, werr = syscall.EpollWait(int(fd), events, 0)
			if errors.Is(werr, syscall.EINTR) {
				n, werr = 0, nil
			}
			return n > 0 || werr != nil // none: park until epfd is readable
		})
		if err == nil {
			err = werr
		}
		if err != nil { // os.ErrClosed once close closed ep
			_ = p.ep.Close()
			return
		}
		for i := range n {
			token := uint64(uint32(events[i].Fd)) | uint64(uint32(events[i].Pad))<<32
			p.mu.Lock()
			ss := p.links[token]
			p.mu.Unlock()
			if ss != nil {
				go ss.readable()
			}
		}
	}
}

// close stops the poller's loop and waits for it; call once no link uses
// the poller. Closing ep wakes the loop parked in rc.Read (the runtime
// evicts its waiters with os.ErrClosed) and makes its next rc.Read fail;
// the descriptor itself is closed once the loop has let go of it.
func (p *poller) close() {
	_ = p.ep.Close()
	<-p.done
}

// readSome reads what the socket holds now, without waiting, and appends
// it to l.pending. It reports whether the peer closed the connection.
func (l *tcpLink) readSome() (eof bool, err error) {
	bp := readBufs.Get().(*[]byte)
	defer readBufs.Put(bp)
	buf := *bp
	for {
		var n int
		var rerr error
		err := l.raw.Read(func(fd uintptr) bool {
			n, rerr = syscall.Read(int(fd), buf)
			return true // never wait: the poller says when to come back
		})
		if err != nil {
			return false, err
		}
		switch {
		case errors.Is(rerr, syscall.EAGAIN):
			return false, nil
		case errors.Is(rerr, syscall.EINTR):
			continue
		case rerr != nil:
			return false, rerr
		case n == 0:
			return true, nil
		}
		l.pending = append(l.pending, buf[:n]...)
		if len(l.pending) > l.codec.MaxFrame()+2*wire.HeaderSize {
			return false, nil // enough to find a frame (or a too-large one)
		}
	}
}

// readBufs pools the buffers a readable link is read into.
var readBufs = sync.Pool{New: func() any { b := make([]byte, 16<<10); return &b }}

// pollable reports whether a link can be handed to the poller: a plain TCP
// link whose frames so far were read without a buffer (none is left half
// read).
func pollable(l link) (*tcpLink, bool) {
	tl, ok := l.(*tcpLink)
	return tl, ok && tl.raw != nil
}

// readable runs when the poller saw the link readable: it reads what the
// socket holds, handles every complete frame in order, and re-arms the
// link, or ends the session.
func (ss *session) readable() {
	l := ss.link.(*tcpLink)
	eof, err := l.readSome()
	if err != nil {
		ss.readFailed(err)
		ss.finish()
		return
	}
	for {
		f, err := l.nextFrame()
		if err != nil {
			ss.readFailed(err)
			ss.finish()
			return
		}
		if f == nil {
			break
		}
		ss.touch()
		if !ss.allow() {
			ss.fail(gatewaypb.Error_CODE_RATE_LIMITED, gatewaypb.GoAway_REASON_PROTOCOL, "more than the allowed frames per second")
			ss.finish()
			return
		}
		if !ss.handle(f) {
			ss.finish()
			return
		}
	}
	if eof {
		if len(l.pending) > 0 {
			ss.readFailed(fmt.Errorf("wire: value: %w", io.ErrUnexpectedEOF))
		} else {
			ss.readFailed(io.EOF)
		}
		ss.finish()
		return
	}
	if err := ss.srv.poller.rearm(ss, l); err != nil {
		ss.logAt(zerolog.DebugLevel).Err(err).Msg("link closed")
		ss.shut()
		ss.finish()
	}
}

// poll hands a session past Hello to the poller if its link allows it; the
// reader goroutine then ends.
func (ss *session) poll() bool {
	p := ss.srv.poller
	if p == nil {
		return false
	}
	l, ok := pollable(ss.link)
	if !ok {
		return false
	}
	if err := l.c.SetReadDeadline(time.Time{}); err != nil {
		return false
	}
	ss.polled.Store(true)
	if err := p.add(ss, l); err != nil {
		ss.polled.Store(false)
		ss.logAt(zerolog.WarnLevel).Err(err).Msg("poller refused the link; it keeps a reader")
		return false
	}
	// A frame may have arrived between the last read and the
	// registration: level-triggered epoll reports it at once.
	return true
}
