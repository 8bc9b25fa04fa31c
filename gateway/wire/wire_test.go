package wire_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"github.com/sluicehq/sluice/gateway/wire"
	"google.golang.org/protobuf/proto"
)

func codec(t testing.TB, o wire.Options) *wire.Codec {
	t.Helper()
	c, err := wire.NewCodec(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// frames has one frame of every type.
func frames() []*gatewaypb.Frame {
	item := &gatewaypb.Item{Id: 7, Epoch: 9, Business: "chat", Kind: 1, Payload: []byte("hello"), CreatedMs: 1}
	return []*gatewaypb.Frame{
		{Body: &gatewaypb.Frame_Hello{Hello: &gatewaypb.Hello{Version: 1, Token: "t", Attrs: &gatewaypb.Attrs{Os: "ios"},
			Points: []*gatewaypb.SyncPoint{{Business: "chat", Id: 3, Epoch: 9}}, Compression: []gatewaypb.Compression{gatewaypb.Compression_COMPRESSION_ZSTD}}}},
		{Body: &gatewaypb.Frame_Welcome{Welcome: &gatewaypb.Welcome{SessionId: "s", HeartbeatMs: 25000}}},
		{Body: &gatewaypb.Frame_Sync{Sync: &gatewaypb.Sync{Items: []*gatewaypb.Item{item}, Done: true, Resets: []string{"x"}}}},
		{Body: &gatewaypb.Frame_Live{Live: &gatewaypb.Live{Items: []*gatewaypb.Item{item}}}},
		{Body: &gatewaypb.Frame_Ack{Ack: &gatewaypb.Ack{Points: []*gatewaypb.SyncPoint{{Business: "chat", Id: 7, Epoch: 9}}}}},
		{Body: &gatewaypb.Frame_Event{Event: &gatewaypb.ClientEvent{Type: gatewaypb.ClientEvent_TYPE_LOGIN, Token: "t2"}}},
		{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{ClientTimeMs: 5}}},
		{Body: &gatewaypb.Frame_Pong{Pong: &gatewaypb.Pong{ClientTimeMs: 5, ServerTimeMs: 6}}},
		{Body: &gatewaypb.Frame_Probe{Probe: &gatewaypb.Probe{Seq: 42}}},
		{Body: &gatewaypb.Frame_ProbeEcho{ProbeEcho: &gatewaypb.ProbeEcho{Seq: 42}}},
		{Body: &gatewaypb.Frame_Goaway{Goaway: &gatewaypb.GoAway{Reason: gatewaypb.GoAway_REASON_SHUTDOWN, ReconnectAfterMs: 100}}},
		{Body: &gatewaypb.Frame_Error{Error: &gatewaypb.Error{Code: gatewaypb.Error_CODE_BAD_FRAME, Message: "m", Fatal: true}}},
		// An empty body message still has a type.
		{Body: &gatewaypb.Frame_Ping{Ping: &gatewaypb.Ping{}}},
	}
}

// big is a compressible frame over the compression threshold.
func big() *gatewaypb.Frame {
	return &gatewaypb.Frame{Body: &gatewaypb.Frame_Live{Live: &gatewaypb.Live{Items: []*gatewaypb.Item{
		{Id: 1, Business: "chat", Payload: bytes.Repeat([]byte("sluice "), 1000)}}}}}
}

func TestRoundTrips(t *testing.T) {
	c := codec(t, wire.Options{})
	all := append(frames(), big())
	for _, compress := range []bool{false, true} {
		// TLV: all frames back to back on one stream.
		var stream []byte
		for _, f := range all {
			var err error
			if stream, err = c.AppendTLV(stream, f, compress); err != nil {
				t.Fatal(err)
			}
		}
		r := bytes.NewReader(stream)
		hdr := make([]byte, wire.HeaderSize)
		for i, want := range all {
			got, n, err := c.ReadTLV(r, hdr)
			if err != nil {
				t.Fatalf("frame %d: %v", i, err)
			}
			if !proto.Equal(got, want) {
				t.Fatalf("TLV frame %d: got %v, want %v", i, got, want)
			}
			if n < wire.HeaderSize {
				t.Fatalf("frame %d: read %d bytes", i, n)
			}
		}
		if _, _, err := c.ReadTLV(r, hdr); err != io.EOF {
			t.Fatalf("after the last frame: %v, want io.EOF", err)
		}
		// WebSocket, binary and JSON.
		for i, want := range all {
			b, err := c.EncodeBinary(want, compress)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := c.DecodeBinary(b); err != nil || !proto.Equal(got, want) {
				t.Fatalf("binary frame %d: %v, %v", i, got, err)
			}
			j, err := c.EncodeJSON(want)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := c.DecodeJSON(j); err != nil || !proto.Equal(got, want) {
				t.Fatalf("JSON frame %d: %v, %v", i, got, err)
			}
		}
	}
}

func TestCompressionAboveThresholdOnly(t *testing.T) {
	c := codec(t, wire.Options{})
	small := frames()[0]
	for _, tc := range []struct {
		f        *gatewaypb.Frame
		compress bool
		zipped   bool
	}{{small, true, false}, {big(), false, false}, {big(), true, true}} {
		b, err := c.AppendTLV(nil, tc.f, tc.compress)
		if err != nil {
			t.Fatal(err)
		}
		if zipped := b[0]&wire.FlagZstd != 0; zipped != tc.zipped {
			t.Fatalf("type byte %#x: zipped %v, want %v", b[0], zipped, tc.zipped)
		}
		m, _ := c.EncodeBinary(tc.f, tc.compress)
		if zipped := bytes.HasPrefix(m, []byte{0x28, 0xb5, 0x2f, 0xfd}); zipped != tc.zipped {
			t.Fatalf("binary message zipped %v, want %v", zipped, tc.zipped)
		}
	}
	b, _ := c.AppendTLV(nil, big(), true)
	plain, _ := c.AppendTLV(nil, big(), false)
	if len(b)*5 > len(plain) {
		t.Fatalf("compressed %d bytes, plain %d: want at least 5x smaller", len(b), len(plain))
	}
}

func TestLimits(t *testing.T) {
	c := codec(t, wire.Options{MaxFrame: 4096})
	hdr := make([]byte, wire.HeaderSize)

	// A declared length over the limit is refused from the header alone:
	// the reader has nothing more to give.
	huge := []byte{7, 0xff, 0xff, 0xff, 0xff}
	if _, _, err := c.ReadTLV(bytes.NewReader(huge), hdr); !errors.Is(err, wire.ErrFrameTooLarge) {
		t.Fatalf("huge header: %v", err)
	}
	// Encoding over the limit is refused too.
	if _, err := c.AppendTLV(nil, big(), false); !errors.Is(err, wire.ErrFrameTooLarge) {
		t.Fatalf("encode big: %v", err)
	}
	// A zstd bomb: 8 KiB of value that inflates far past the limit.
	enc, _ := zstd.NewWriter(nil)
	inner, _ := proto.Marshal(&gatewaypb.Live{Items: []*gatewaypb.Item{{Payload: make([]byte, 1<<20)}}})
	bomb := enc.EncodeAll(inner, nil)
	if len(bomb) > 4096 {
		t.Fatalf("bomb of %d bytes does not fit the frame", len(bomb))
	}
	frame := append([]byte{4 | wire.FlagZstd}, binary.BigEndian.AppendUint32(nil, uint32(len(bomb)))...)
	frame = append(frame, bomb...)
	if _, _, err := c.ReadTLV(bytes.NewReader(frame), hdr); !errors.Is(err, wire.ErrFrameTooLarge) {
		t.Fatalf("zstd bomb over TLV: %v", err)
	}
	if _, err := c.DecodeBinary(bomb); !errors.Is(err, wire.ErrFrameTooLarge) {
		t.Fatalf("zstd bomb over WebSocket: %v", err)
	}
	if _, err := c.DecodeJSON([]byte(`{"ping":{}}` + strings.Repeat(" ", 5000))); !errors.Is(err, wire.ErrFrameTooLarge) {
		t.Fatalf("long JSON: %v", err)
	}
}

func TestBadFrames(t *testing.T) {
	c := codec(t, wire.Options{})
	hdr := make([]byte, wire.HeaderSize)
	for name, in := range map[string][]byte{
		"unknown type":     {99, 0, 0, 0, 0},
		"type zero":        {0, 0, 0, 0, 0},
		"bad protobuf":     {7, 0, 0, 0, 2, 0xff, 0xff},
		"bad zstd":         {7 | wire.FlagZstd, 0, 0, 0, 3, 1, 2, 3},
		"truncated value":  {7, 0, 0, 0, 9, 8},
		"truncated header": {7, 0},
	} {
		_, _, err := c.ReadTLV(bytes.NewReader(in), hdr)
		if err == nil || errors.Is(err, io.EOF) {
			t.Errorf("%s: got %v, want an error other than io.EOF", name, err)
		}
	}
	for name, in := range map[string][]byte{
		"empty":        {},
		"bad protobuf": {0xff, 0xff},
		"no body":      {0x78, 0x01}, // field 15 varint: unknown
		"bad zstd":     {0x28, 0xb5, 0x2f, 0xfd, 1, 2},
	} {
		if _, err := c.DecodeBinary(in); !errors.Is(err, wire.ErrBadFrame) {
			t.Errorf("binary %s: got %v, want ErrBadFrame", name, err)
		}
	}
	for _, in := range []string{``, `{}`, `{"nope":{}}`, `{"ping":`, `[1]`} {
		if _, err := c.DecodeJSON([]byte(in)); !errors.Is(err, wire.ErrBadFrame) {
			t.Errorf("JSON %q: got %v, want ErrBadFrame", in, err)
		}
	}
	if _, err := c.EncodeBinary(&gatewaypb.Frame{}, false); !errors.Is(err, wire.ErrBadFrame) {
		t.Errorf("encode empty frame: %v", err)
	}
}
