//go:build !linux

package gateway

// poller is Linux only (epoll); elsewhere every link keeps a reader
// goroutine.
type poller struct{}

func newPoller() (*poller, error) { return nil, nil }
func (p *poller) close()          {}
func (p *poller) remove(uint64)   {}
func (ss *session) poll() bool    { return false }
