//go:build linux

package gateway

import (
	"testing"
	"time"
)

// TestPollerCloseWakesLoop: closing the epoll file wakes the loop parked
// on the runtime's poller (no other wake-up exists), every time.
func TestPollerCloseWakesLoop(t *testing.T) {
	for range 50 {
		p, err := newPoller()
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // let the loop park in rc.Read
		closed := make(chan struct{})
		go func() { p.close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(5 * time.Second):
			t.Fatal("poller close did not wake its loop")
		}
	}
}
