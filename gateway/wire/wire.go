// Package wire encodes and decodes the frames of the Sluice client
// protocol (gateway/PROTOCOL.md) for its two transports: TLV framing on TCP
// and one message per frame on WebSocket (protobuf, or protojson for the
// JSON sub-protocol). The gateway and the Go client share it.
//
// Every decoder here reads bytes from the network: it checks a frame's
// declared size before allocating for it, bounds decompression by the same
// limit, and reports bad input as ErrBadFrame or ErrFrameTooLarge, never
// by panicking.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/sluicehq/sluice/gateway/gatewaypb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

const (
	// Version is the protocol version this package speaks.
	Version = 1
	// HeaderSize is the TLV header: type (1 byte) and length (4 bytes, big
	// endian).
	HeaderSize = 5
	// FlagZstd in a TLV type byte marks a zstd-compressed value.
	FlagZstd = 0x80
	// DefaultMaxFrame is the largest frame (its value or WebSocket message,
	// compressed or not, and once decompressed) either side may send.
	DefaultMaxFrame = 1 << 20
	// DefaultCompressMin is the smallest frame worth compressing.
	DefaultCompressMin = 1024

	// SubprotocolProto is the WebSocket sub-protocol of binary frames.
	SubprotocolProto = "sluice.v1.proto"
	// SubprotocolJSON is the WebSocket sub-protocol of protojson frames in
	// text messages, for browsers and debugging.
	SubprotocolJSON = "sluice.v1.json"
)

// zstdMagic starts every zstd frame. No serialized Frame starts with it:
// every Frame field is a message (wire type 2), so a Frame's first byte is
// a tag with low bits 010, and 0x28 has 000.
var zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}

var (
	// ErrBadFrame is an undecodable frame: unknown type, bad protobuf or
	// JSON, bad compression.
	ErrBadFrame = errors.New("wire: bad frame")
	// ErrFrameTooLarge is a frame over the size limit.
	ErrFrameTooLarge = errors.New("wire: frame too large")
)

// Options configure a Codec. A zero field takes the default.
type Options struct {
	MaxFrame    int // DefaultMaxFrame
	CompressMin int // DefaultCompressMin
}

// Codec encodes and decodes frames. It holds the zstd encoder and decoder
// and is safe for concurrent use: one serves every link of a process.
type Codec struct {
	maxFrame    int
	compressMin int
	enc         *zstd.Encoder
	dec         *zstd.Decoder
}

// NewCodec returns a codec with o's limits.
func NewCodec(o Options) (*Codec, error) {
	if o.MaxFrame <= 0 {
		o.MaxFrame = DefaultMaxFrame
	}
	if o.CompressMin <= 0 {
		o.CompressMin = DefaultCompressMin
	}
	if o.MaxFrame > 64<<20 {
		return nil, fmt.Errorf("wire: max frame %d over 64 MiB", o.MaxFrame)
	}
	enc, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(1),
		zstd.WithLowerEncoderMem(true))
	if err != nil {
		return nil, fmt.Errorf("wire: zstd encoder: %w", err)
	}
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxMemory(uint64(o.MaxFrame)),
		zstd.WithDecoderMaxWindow(max(uint64(o.MaxFrame), zstd.MinWindowSize)))
	if err != nil {
		return nil, fmt.Errorf("wire: zstd decoder: %w", err)
	}
	return &Codec{maxFrame: o.MaxFrame, compressMin: o.CompressMin, enc: enc, dec: dec}, nil
}

// MaxFrame is the codec's frame size limit.
func (c *Codec) MaxFrame() int { return c.maxFrame }

// CompressMin is the smallest frame the codec compresses.
func (c *Codec) CompressMin() int { return c.compressMin }

// TypeOf returns the frame type of f: the field number of its body, as on
// a TLV header. 0 for an empty frame.
func TypeOf(f *gatewaypb.Frame) byte {
	if f == nil || f.Body == nil {
		return 0
	}
	fd := f.ProtoReflect().WhichOneof(f.ProtoReflect().Descriptor().Oneofs().ByName("body"))
	if fd == nil {
		return 0
	}
	return byte(fd.Number())
}

// inner returns f's body message.
func inner(f *gatewaypb.Frame) (proto.Message, error) {
	m := f.ProtoReflect()
	fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("body"))
	if fd == nil {
		return nil, fmt.Errorf("empty frame: %w", ErrBadFrame)
	}
	return m.Get(fd).Message().Interface(), nil
}

// compress returns body, or its zstd frame when worth it.
func (c *Codec) compress(body []byte, enabled bool) ([]byte, bool) {
	if !enabled || len(body) < c.compressMin {
		return body, false
	}
	z := c.enc.EncodeAll(body, make([]byte, 0, len(body)/2))
	if len(z) >= len(body) {
		return body, false
	}
	return z, true
}

// decompress decodes a zstd frame, bounded by the frame limit.
func (c *Codec) decompress(z []byte) ([]byte, error) {
	out, err := c.dec.DecodeAll(z, nil)
	switch {
	case errors.Is(err, zstd.ErrDecoderSizeExceeded), errors.Is(err, zstd.ErrWindowSizeExceeded):
		return nil, fmt.Errorf("decompressed over %d bytes: %w", c.maxFrame, ErrFrameTooLarge)
	case err != nil:
		return nil, fmt.Errorf("zstd: %v: %w", err, ErrBadFrame)
	case len(out) > c.maxFrame:
		return nil, fmt.Errorf("decompressed %d bytes over %d: %w", len(out), c.maxFrame, ErrFrameTooLarge)
	}
	return out, nil
}

// AppendTLV appends f as one TLV frame to dst: the type byte (with
// FlagZstd if the value is compressed), the value's length, the value
// (f's body message, serialized). compress allows compression (agreed in
// hello and welcome); small values are never compressed.
func (c *Codec) AppendTLV(dst []byte, f *gatewaypb.Frame, compress bool) ([]byte, error) {
	typ := TypeOf(f)
	body, err := inner(f)
	if err != nil {
		return dst, err
	}
	value, err := proto.Marshal(body)
	if err != nil {
		return dst, fmt.Errorf("wire: marshal %T: %w", body, err)
	}
	// The limit holds before compression too: the receiver decompresses
	// no further than it.
	if len(value) > c.maxFrame {
		return dst, fmt.Errorf("wire: %T of %d bytes: %w", body, len(value), ErrFrameTooLarge)
	}
	value, zipped := c.compress(value, compress)
	if zipped {
		typ |= FlagZstd
	}
	dst = append(dst, typ)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(value)))
	return append(dst, value...), nil
}

// ReadTLV reads one TLV frame from r. hdr is the caller's header buffer
// (HeaderSize bytes), so an idle reader holds no buffer of its own; the
// value is allocated only once its declared length is known to be within
// the limit. It returns the frame and the bytes read; io.EOF only when r
// ends before a frame begins.
func (c *Codec) ReadTLV(r io.Reader, hdr []byte) (*gatewaypb.Frame, int, error) {
	hdr = hdr[:HeaderSize]
	if _, err := io.ReadFull(r, hdr); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, 0, fmt.Errorf("wire: header: %w", err)
		}
		return nil, 0, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if int64(n) > int64(c.maxFrame) {
		return nil, HeaderSize, fmt.Errorf("wire: frame of %d bytes over %d: %w", n, c.maxFrame, ErrFrameTooLarge)
	}
	value := make([]byte, n)
	if _, err := io.ReadFull(r, value); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, HeaderSize, fmt.Errorf("wire: value: %w", err)
	}
	f, err := c.DecodeTLV(hdr[0], value)
	return f, HeaderSize + int(n), err
}

// DecodeTLV decodes the value of a TLV frame of type typ.
func (c *Codec) DecodeTLV(typ byte, value []byte) (*gatewaypb.Frame, error) {
	if len(value) > c.maxFrame {
		return nil, fmt.Errorf("wire: frame of %d bytes over %d: %w", len(value), c.maxFrame, ErrFrameTooLarge)
	}
	if typ&FlagZstd != 0 {
		v, err := c.decompress(value)
		if err != nil {
			return nil, err
		}
		value = v
	}
	f := new(gatewaypb.Frame)
	fd := f.ProtoReflect().Descriptor().Fields().ByNumber(protoNumber(typ &^ FlagZstd))
	if fd == nil || fd.ContainingOneof() == nil {
		return nil, fmt.Errorf("wire: unknown frame type %d: %w", typ&^FlagZstd, ErrBadFrame)
	}
	m := f.ProtoReflect().NewField(fd)
	if err := proto.Unmarshal(value, m.Message().Interface()); err != nil {
		return nil, fmt.Errorf("wire: type %d: %v: %w", typ&^FlagZstd, err, ErrBadFrame)
	}
	f.ProtoReflect().Set(fd, m)
	return f, nil
}

// EncodeBinary encodes f as one binary WebSocket message: the serialized
// Frame, or a zstd frame of it when compress allows and it is worth it.
func (c *Codec) EncodeBinary(f *gatewaypb.Frame, compress bool) ([]byte, error) {
	if TypeOf(f) == 0 {
		return nil, fmt.Errorf("empty frame: %w", ErrBadFrame)
	}
	b, err := proto.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("wire: marshal frame: %w", err)
	}
	if len(b) > c.maxFrame {
		return nil, fmt.Errorf("wire: frame of %d bytes: %w", len(b), ErrFrameTooLarge)
	}
	b, _ = c.compress(b, compress)
	return b, nil
}

// DecodeBinary decodes one binary WebSocket message.
func (c *Codec) DecodeBinary(b []byte) (*gatewaypb.Frame, error) {
	if len(b) > c.maxFrame {
		return nil, fmt.Errorf("wire: message of %d bytes over %d: %w", len(b), c.maxFrame, ErrFrameTooLarge)
	}
	if len(b) >= len(zstdMagic) && string(b[:len(zstdMagic)]) == string(zstdMagic) {
		v, err := c.decompress(b)
		if err != nil {
			return nil, err
		}
		b = v
	}
	f := new(gatewaypb.Frame)
	if err := proto.Unmarshal(b, f); err != nil {
		return nil, fmt.Errorf("wire: %v: %w", err, ErrBadFrame)
	}
	if TypeOf(f) == 0 {
		return nil, fmt.Errorf("wire: frame without a known body: %w", ErrBadFrame)
	}
	return f, nil
}

// EncodeJSON encodes f as one text WebSocket message (protojson).
func (c *Codec) EncodeJSON(f *gatewaypb.Frame) ([]byte, error) {
	if TypeOf(f) == 0 {
		return nil, fmt.Errorf("empty frame: %w", ErrBadFrame)
	}
	b, err := protojson.Marshal(f)
	if err != nil {
		return nil, fmt.Errorf("wire: marshal frame: %w", err)
	}
	if len(b) > c.maxFrame {
		return nil, fmt.Errorf("wire: frame of %d bytes: %w", len(b), ErrFrameTooLarge)
	}
	return b, nil
}

// DecodeJSON decodes one text WebSocket message. Unknown fields are
// ignored, as in protobuf.
func (c *Codec) DecodeJSON(b []byte) (*gatewaypb.Frame, error) {
	if len(b) > c.maxFrame {
		return nil, fmt.Errorf("wire: message of %d bytes over %d: %w", len(b), c.maxFrame, ErrFrameTooLarge)
	}
	f := new(gatewaypb.Frame)
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(b, f); err != nil {
		return nil, fmt.Errorf("wire: %v: %w", err, ErrBadFrame)
	}
	if TypeOf(f) == 0 {
		return nil, fmt.Errorf("wire: frame without a known body: %w", ErrBadFrame)
	}
	return f, nil
}

func protoNumber(b byte) protoreflect.FieldNumber { return protoreflect.FieldNumber(b) }
