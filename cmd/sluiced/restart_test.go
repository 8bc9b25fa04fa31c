//go:build linux

package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sluicehq/sluice/client"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/proto"
)

// The gateway restart test: 200 apps (half WebSocket, half TLV, each with
// its own user and device) stay connected through the Go client while
// 20,000 events flow to them and sluiced is restarted twice: once
// gracefully (SIGTERM: clients get GoAway and drain) and once by SIGKILL.
// Every app's handlers must receive exactly the acknowledged events of its
// user and device, in id order per business, with no duplicate.
const (
	rsClients   = 200
	rsEvents    = 20_000
	rsProducers = 16
	rsReqFor    = 2 * time.Second
	rsSettleFor = 60 * time.Second
	rsUserBiz   = "chat"
	rsDevBiz    = "alerts"
)

// rsApp is one app: its client and what its handlers saw.
type rsApp struct {
	user, device string
	c            *client.Client

	mu       sync.Mutex
	got      map[string][]uint64 // business -> ids in delivery order
	problems []string
	n        atomic.Int64
}

func (a *rsApp) handle(_ context.Context, it *client.Item) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	ids := a.got[it.Business]
	if len(ids) > 0 && it.Id <= ids[len(ids)-1] {
		a.problems = append(a.problems, fmt.Sprintf("%s: id %d after %d", it.Business, it.Id, ids[len(ids)-1]))
	}
	a.got[it.Business] = append(ids, it.Id)
	a.n.Add(1)
	return nil
}

// stop ends the child with SIGTERM (a graceful drain) and waits.
func (d *daemon) stop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return nil
	}
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(30 * time.Second):
		return fmt.Errorf("sluiced pid %d still running 30s after SIGTERM", d.cmd.Process.Pid)
	}
	d.note("SIGTERM (pid %d)", d.cmd.Process.Pid)
	d.cmd, d.exited = nil, nil
	return nil
}

func TestGatewayThroughRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("the restart test takes about half a minute")
	}
	d, addr := newTestDaemon(t, "--businesses", rsUserBiz+":user,"+rsDevBiz+":device", "--drain-timeout", "5s")
	data := d.data
	tmp := filepath.Dir(data)
	if _, err := d.start(); err != nil {
		t.Fatalf("first start: %v", err)
	}
	key, err := gateway.LoadOrCreateKey(filepath.Join(data, tokenKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	signer := gateway.NewSigner(key)

	// The apps.
	ctx, cancel := context.WithCancel(context.Background())
	var running sync.WaitGroup
	defer func() {
		cancel()
		running.Wait()
	}()
	apps := make([]*rsApp, rsClients)
	for i := range apps {
		a := &rsApp{user: fmt.Sprintf("u%03d", i), device: fmt.Sprintf("d%03d", i), got: map[string][]uint64{}}
		url := "tcp://" + addr(3)
		if i%2 == 1 {
			url = "ws://" + addr(2) + "/v1/ws"
		}
		a.c, err = client.New(client.Config{
			URL: url,
			Token: func(context.Context) (string, error) {
				return signer.Issue(gateway.Claims{User: a.user, Device: a.device, App: "restart", Expires: time.Now().Add(time.Hour)})
			},
			StateDir:   filepath.Join(tmp, "apps", a.device),
			MinBackoff: 50 * time.Millisecond,
			MaxBackoff: time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		a.c.Handle(rsUserBiz, a.handle)
		a.c.Handle(rsDevBiz, a.handle)
		apps[i] = a
		running.Go(func() {
			if err := a.c.Run(ctx); err != nil {
				t.Errorf("app %s: %v", a.device, err)
			}
		})
	}
	waitUntil(t, 30*time.Second, "every app connected", func() bool {
		for _, a := range apps {
			if !a.c.Stats().Connected {
				return false
			}
		}
		return true
	})

	// The producers: single appends with message ids, retried with the
	// same id until acknowledged, so every event ends acknowledged once.
	nc, err := nats.Connect(d.natsURL, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond), nats.Timeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	acked := make([]map[string][]uint64, rsClients) // app -> business -> ids
	for i := range acked {
		acked[i] = map[string][]uint64{}
	}
	var ackedMu sync.Mutex
	var done, retries atomic.Int64
	var next atomic.Int64
	var producers sync.WaitGroup
	for p := range rsProducers {
		producers.Go(func() {
			prng := rand.New(rand.NewPCG(uint64(p), 11))
			for {
				n := next.Add(1) - 1
				if n >= rsEvents || ctx.Err() != nil {
					return
				}
				app := prng.IntN(rsClients)
				ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_SYNC, Business: rsUserBiz, Targets: []string{apps[app].user},
					Payload: []byte(strconv.FormatInt(n, 10)), MessageId: "rs-" + strconv.FormatInt(n, 10)}
				if n%4 == 0 {
					ev.Business, ev.Targets = rsDevBiz, []string{apps[app].device}
				}
				body, _ := proto.Marshal(ev)
				for attempt := 0; ; attempt++ {
					if ctx.Err() != nil {
						return
					}
					if attempt > 0 {
						retries.Add(1)
						time.Sleep(time.Duration(20+prng.IntN(80)) * time.Millisecond)
					}
					msg, err := nc.Request(oplog.SubjectAppend, body, rsReqFor)
					if err != nil {
						continue
					}
					r := new(oplogpb.AppendReply)
					if proto.Unmarshal(msg.Data, r) != nil || r.Error != nil || len(r.Results) != 1 {
						continue
					}
					ackedMu.Lock()
					acked[app][ev.Business] = append(acked[app][ev.Business], r.Results[0].Id)
					ackedMu.Unlock()
					done.Add(1)
					break
				}
			}
		})
	}
	// Two restarts while the events flow: graceful, then SIGKILL.
	for i, graceful := range []bool{true, false} {
		waitUntil(t, 60*time.Second, "events acknowledged before a restart", func() bool {
			return done.Load() >= int64(rsEvents*(i+1)/3)
		})
		stopAt := done.Load()
		if graceful {
			err = d.stop()
		} else {
			err = d.kill()
		}
		if err != nil {
			t.Fatal(err)
		}
		took, err := d.start()
		if err != nil {
			t.Fatalf("restart %d: %v", i+1, err)
		}
		t.Logf("restart %d (graceful %v) at %d acked events, ready again in %v", i+1, graceful, stopAt, took.Round(time.Millisecond))
	}
	producers.Wait()
	if got := done.Load(); got != rsEvents {
		t.Fatalf("%d of %d events acknowledged", got, rsEvents)
	}

	// Every app gets exactly its acknowledged events, in order.
	want := func(i int) int {
		n := 0
		for _, ids := range acked[i] {
			n += len(ids)
		}
		return n
	}
	settled := waitFor(rsSettleFor, func() bool {
		for i, a := range apps {
			if int(a.n.Load()) < want(i) {
				return false
			}
		}
		return true
	})
	var connects, duplicates, reconnects int64
	bad := 0
	for i, a := range apps {
		st := a.c.Stats()
		connects += int64(st.Connects)
		reconnects += int64(st.Reconnects)
		duplicates += int64(st.Duplicates)
		a.mu.Lock()
		for _, biz := range []string{rsUserBiz, rsDevBiz} {
			w := slices.Clone(acked[i][biz])
			slices.Sort(w)
			if !slices.Equal(a.got[biz], w) {
				bad++
				if bad <= 5 {
					t.Errorf("app %s %s: handler got %d ids %v\nacknowledged %d ids %v", a.device, biz, len(a.got[biz]), clipIDs(a.got[biz]), len(w), clipIDs(w))
				}
			}
		}
		for _, p := range a.problems {
			t.Errorf("app %s: %s", a.device, p)
		}
		a.mu.Unlock()
	}
	if !settled && bad == 0 {
		t.Errorf("apps did not settle within %v", rsSettleFor)
	}
	t.Logf("%d events acknowledged (%d retried attempts); %d apps: %d connects, %d reconnects, %d duplicates dropped by the clients; %d app/business sets differ",
		rsEvents, retries.Load(), rsClients, connects, reconnects, duplicates, bad)
}

func clipIDs(ids []uint64) string {
	if len(ids) <= 12 {
		return fmt.Sprint(ids)
	}
	return fmt.Sprintf("%v … %v", ids[:6], ids[len(ids)-6:])
}

// waitFor polls cond until it holds or the time is up.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !waitFor(d, cond) {
		t.Fatalf("%s: not within %v", what, d)
	}
}
