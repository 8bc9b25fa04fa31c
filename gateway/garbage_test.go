package gateway_test

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/sluicehq/sluice/gateway"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"google.golang.org/protobuf/proto"
)

// TestGarbageOnLiveSockets sends random bytes, and frames with random
// mutations, on live TCP and WebSocket links, before and after Hello. The
// server must answer with typed errors or close the link, never crash,
// and keep serving well-behaved clients.
func TestGarbageOnLiveSockets(t *testing.T) {
	e := newEnv(t, func(c *gateway.Config) { c.MaxFrame = 64 << 10 })
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	seed := []*gatewaypb.Frame{
		hello(e.token("gabe", "gdev", time.Hour)),
		{Body: &gatewaypb.Frame_Ack{Ack: &gatewaypb.Ack{Points: []*gatewaypb.SyncPoint{{Business: "chat", Id: 1, Epoch: 1}}}}},
		{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: "x"}}},
		{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{ClientTimeMs: 1}}},
	}
	mutate := func(b []byte) []byte {
		b = append([]byte(nil), b...)
		for range 1 + rng.IntN(4) {
			if len(b) == 0 {
				break
			}
			switch rng.IntN(3) {
			case 0:
				b[rng.IntN(len(b))] = byte(rng.UintN(256))
			case 1:
				b = b[:rng.IntN(len(b))]
			case 2:
				i := rng.IntN(len(b))
				b = append(b[:i], append([]byte{byte(rng.UintN(256))}, b[i:]...)...)
			}
		}
		return b
	}
	randomBytes := func() []byte {
		b := make([]byte, rng.IntN(300))
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		return b
	}
	const links = 60
	for i := range links {
		afterHello := i%2 == 0
		if i%3 == 0 {
			c := e.dialTCP()
			if afterHello {
				c.send(hello(e.token("", "g"+string(rune('a'+i%26)), time.Hour)))
			}
			for range 5 {
				var b []byte
				if rng.IntN(2) == 0 {
					b = randomBytes()
				} else {
					fb, _ := e.codec.AppendTLV(nil, seed[rng.IntN(len(seed))], false)
					b = mutate(fb)
				}
				if _, err := c.tcp.Write(b); err != nil {
					break // the server closed it: fine
				}
			}
			_ = c.tcp.Close()
			continue
		}
		sub := wire.SubprotocolProto
		if i%3 == 2 {
			sub = wire.SubprotocolJSON
		}
		c := e.dialWS(sub)
		if afterHello {
			c.send(hello(e.token("", "w"+string(rune('a'+i%26)), time.Hour)))
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		for range 5 {
			var b []byte
			typ := websocket.MessageBinary
			switch rng.IntN(3) {
			case 0:
				b = randomBytes()
			case 1:
				fb, _ := proto.Marshal(seed[rng.IntN(len(seed))])
				b = mutate(fb)
			default:
				fb, _ := e.codec.EncodeJSON(seed[rng.IntN(len(seed))])
				b, typ = mutate(fb), websocket.MessageText
			}
			if err := c.ws.Write(ctx, typ, b); err != nil {
				break
			}
		}
		cancel()
		c.ws.CloseNow()
	}
	// Every garbage link ends; a good client is served as before.
	waitFor(t, func() bool { return e.srv.Stats().Conns == 0 })
	id := e.append("chat", "gabe")
	c := e.dialTCP()
	c.send(hello(e.token("gabe", "gdev", time.Hour)))
	_, items, _ := c.syncAll()
	if len(items) != 1 || items[0].Id != id {
		t.Fatalf("after the garbage, backlog %v, want [%d]", ids(items), id)
	}
}
