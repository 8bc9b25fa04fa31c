package wire_test

import (
	"bytes"
	"errors"
	"io"
	"testing"

	"github.com/sluicehq/sluice/gateway/wire"
	"google.golang.org/protobuf/proto"
)

// The seed corpora are in testdata/fuzz/<name>: every frame type, plain
// and compressed, and broken ones (see TestBadFrames).

// FuzzReadTLV reads a TCP byte stream as the gateway does. Whatever the
// bytes, it returns frames or an error, never panics; every frame it
// accepts re-encodes and decodes to itself.
func FuzzReadTLV(f *testing.F) {
	c := codec(f, wire.Options{MaxFrame: 64 << 10})
	for _, fr := range frames() {
		b, _ := c.AppendTLV(nil, fr, false)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, stream []byte) {
		r := bytes.NewReader(stream)
		hdr := make([]byte, wire.HeaderSize)
		for range 64 {
			fr, _, err := c.ReadTLV(r, hdr)
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) &&
					!errors.Is(err, wire.ErrBadFrame) && !errors.Is(err, wire.ErrFrameTooLarge) {
					t.Fatalf("untyped error: %v", err)
				}
				return
			}
			b, err := c.AppendTLV(nil, fr, false)
			if err != nil {
				t.Fatalf("re-encode %v: %v", fr, err)
			}
			again, _, err := c.ReadTLV(bytes.NewReader(b), hdr)
			if err != nil || !proto.Equal(again, fr) {
				t.Fatalf("re-decode: %v, %v; want %v", again, err, fr)
			}
		}
	})
}

// FuzzDecodeBinary decodes binary WebSocket messages.
func FuzzDecodeBinary(f *testing.F) {
	c := codec(f, wire.Options{MaxFrame: 64 << 10})
	for _, fr := range frames() {
		b, _ := c.EncodeBinary(fr, false)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		fr, err := c.DecodeBinary(msg)
		if err != nil {
			if !errors.Is(err, wire.ErrBadFrame) && !errors.Is(err, wire.ErrFrameTooLarge) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		b, err := c.EncodeBinary(fr, true)
		if err != nil {
			t.Fatalf("re-encode %v: %v", fr, err)
		}
		if again, err := c.DecodeBinary(b); err != nil || !proto.Equal(again, fr) {
			t.Fatalf("re-decode: %v, %v; want %v", again, err, fr)
		}
	})
}

// FuzzDecodeJSON decodes text WebSocket messages (the JSON sub-protocol).
func FuzzDecodeJSON(f *testing.F) {
	c := codec(f, wire.Options{MaxFrame: 64 << 10})
	for _, fr := range frames() {
		b, _ := c.EncodeJSON(fr)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		fr, err := c.DecodeJSON(msg)
		if err != nil {
			if !errors.Is(err, wire.ErrBadFrame) && !errors.Is(err, wire.ErrFrameTooLarge) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		b, err := c.EncodeJSON(fr)
		if err != nil {
			t.Fatalf("re-encode %v: %v", fr, err)
		}
		if again, err := c.DecodeJSON(b); err != nil || !proto.Equal(again, fr) {
			t.Fatalf("re-decode: %v, %v; want %v", again, err, fr)
		}
	})
}
