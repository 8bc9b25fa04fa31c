package gateway_test

import (
	"bytes"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicehq/sluice/buckets"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// TestHelloRacingFollows: Hellos of a user while the user follows and
// unfollows a topic without pause. A follow event that reached the session
// before its follow state existed crashed the process once.
func TestHelloRacingFollows(t *testing.T) {
	e := newEnvWith(t, envOptions{topics: true}, nil)
	e.createTopic("t1", 0)
	var stop atomic.Bool
	done := make(chan struct{})
	go func() {
		defer close(done)
		for !stop.Load() {
			if _, err := e.tp.Follow(tctx(t), "carol", "t1"); err != nil {
				t.Error(err)
				return
			}
			if _, err := e.tp.Unfollow(tctx(t), "carol", "t1"); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := range 100 {
		c := e.dialTCP()
		c.send(hello(e.token("carol", fmt.Sprintf("d%d", i), time.Hour)))
		c.syncAll()
		c.tcp.Close()
	}
	stop.Store(true)
	<-done
}

// collect reads frames in the background and records the ids of topic
// feed.
func collect(c *client) (func() map[uint64]int, chan struct{}) {
	var mu sync.Mutex
	got := map[uint64]int{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			f, err := c.read(2 * time.Second)
			if err != nil {
				return
			}
			mu.Lock()
			for _, it := range append(f.GetLive().GetItems(), f.GetSync().GetItems()...) {
				if it.Topic == "feed" {
					got[it.Id]++
				}
			}
			mu.Unlock()
		}
	}()
	return func() map[uint64]int {
		mu.Lock()
		defer mu.Unlock()
		out := map[uint64]int{}
		for k, v := range got {
			out[k] = v
		}
		return out
	}, done
}

// TestFollowWhileOnlineMissesNothing: a follow made online, with messages
// published continuously: every message after From arrives once (the
// topic's watch is registered before the round that reads its backlog).
func TestFollowWhileOnlineMissesNothing(t *testing.T) {
	e := newEnvWith(t, envOptions{topics: true}, nil)
	e.createTopic("feed", 0)
	c := e.dialTCP()
	c.send(hello(e.token("dave", "phone", time.Hour)))
	c.syncAll()
	snap, done := collect(c)
	var pub []uint64
	var pmu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			id := e.publishTopic("feed", "x")
			pmu.Lock()
			pub = append(pub, id)
			pmu.Unlock()
		}
	})
	time.Sleep(50 * time.Millisecond)
	f, err := e.tp.Follow(tctx(t), "dave", "feed")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond)
	close(stop)
	wg.Wait()
	time.Sleep(500 * time.Millisecond)
	got := snap()
	missing, dup := 0, 0
	for _, id := range pub {
		if id > f.From && got[id] == 0 {
			missing++
		}
		if got[id] > 1 {
			dup++
		}
	}
	t.Logf("published %d, from %d, missing %d, dup %d", len(pub), f.From, missing, dup)
	if missing > 0 || dup > 0 {
		t.Fail()
	}
	c.tcp.Close()
	<-done
}

// TestSlowClientIsNotLoad: a client that does not read its large backlog
// waits for queue room, which is not load on the node: with OverloadAt 1,
// another client connecting meanwhile is not deferred.
func TestSlowClientIsNotLoad(t *testing.T) {
	bizs := manyBusinesses(4)
	e := newEnvWith(t, envOptions{buckets: true, businesses: bizs, scheduler: buckets.SchedulerConfig{OverloadAt: 1}},
		func(c *gateway.Config) { c.SendBytes = 256 << 10 })
	big := bytes.Repeat([]byte("x"), 32<<10)
	for range 800 {
		e.append("b00", "slowuser", func(ev *oplogpb.Event) { ev.Payload = big })
	}
	e.append("b01", "fast", nil...)
	slow := e.dialTCP()
	slow.send(hello(e.token("slowuser", "slowdev", time.Hour)))
	time.Sleep(time.Second)
	if n := e.sched.InFlight(); n != 0 {
		t.Errorf("%d computations in flight while the only client waits for queue room", n)
	}
	fast := e.dialTCP()
	fast.send(hello(e.token("fast", "fastdev", time.Hour)))
	fast.must(5 * time.Second) // welcome
	for {
		f := fast.must(5 * time.Second)
		if s := f.GetSync(); s != nil && s.Done {
			t.Logf("fast client's round: deferred %v retry %dms", s.Deferred, s.RetryAfterMs)
			if len(s.Deferred) > 0 {
				t.Errorf("an idle node deferred a client because another client reads slowly")
			}
			return
		}
	}
}
