package analytics

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Body limits of an upload.
const (
	// MaxBodyBytes bounds an upload as sent (compressed or not): a bigger
	// Content-Length is refused before the body is read.
	MaxBodyBytes = 1 << 20
	// MaxDecodedBytes bounds an upload once decompressed.
	MaxDecodedBytes = 8 << 20
)

// Authenticator checks an app's request (its device token) and says who
// it is.
type Authenticator func(r *http.Request) (Identity, error)

// Handler serves uploads of tracking events:
//
//	POST /v1/analytics
//	Authorization: Bearer <device token>
//	Content-Type: application/x-protobuf (a Batch) or application/json (protojson)
//	Content-Encoding: gzip or zstd (optional)
//
// It answers an IngestReply in the request's encoding: 200 when the batch
// was read (each event accepted, a duplicate or rejected with its reason),
// 400 for a body that does not decode, 401, 413 for a body over
// MaxBodyBytes (refused before it is read) or over MaxDecodedBytes
// decoded, 503 when the stream cannot be written (retry the same batch).
func (in *Ingestor) Handler(auth Authenticator) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", "POST")
			httpError(w, http.StatusMethodNotAllowed, 0, "use POST")
			return
		}
		who, err := auth(r)
		if err != nil {
			httpError(w, http.StatusUnauthorized, 0, err.Error())
			return
		}
		if r.ContentLength > MaxBodyBytes {
			httpError(w, http.StatusRequestEntityTooLarge, oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE, fmt.Sprintf("body of %d bytes, at most %d", r.ContentLength, MaxBodyBytes))
			return
		}
		asJSON := strings.HasPrefix(r.Header.Get("Content-Type"), oplog.ContentTypeJSON)
		b, err := ReadBatch(http.MaxBytesReader(w, r.Body, MaxBodyBytes), r.Header.Get("Content-Encoding"), asJSON)
		if err != nil {
			status, code := http.StatusBadRequest, oplog.CodeOf(err)
			var tooBig *http.MaxBytesError
			if errors.As(err, &tooBig) || errors.Is(err, oplog.ErrPayloadTooLarge) {
				status, code = http.StatusRequestEntityTooLarge, oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE
			}
			in.lg.Info().Err(err).Str("device", who.Device).Str("remote", r.RemoteAddr).Msg("analytics upload refused")
			httpError(w, status, code, err.Error())
			return
		}
		reply, err := in.Ingest(r.Context(), who, b)
		if err != nil {
			status := http.StatusServiceUnavailable
			if !errors.Is(err, oplog.ErrUnavailable) {
				status = http.StatusBadRequest
			}
			in.lg.Info().Err(err).Str("device", who.Device).Msg("analytics batch refused")
			httpError(w, status, oplog.CodeOf(err), err.Error())
			return
		}
		ct := "application/x-protobuf"
		if asJSON {
			ct = oplog.ContentTypeJSON
		}
		out, err := oplog.Encode(ct, reply)
		w.Header().Set("Content-Type", ct)
		if err != nil {
			httpError(w, http.StatusInternalServerError, oplogpb.ErrorCode_ERROR_CODE_INTERNAL, "internal error")
			return
		}
		_, _ = w.Write(out)
	})
}

// ReadBatch reads a batch from r: decompressed per encoding ("", gzip,
// zstd) with at most MaxDecodedBytes out, then decoded as protobuf or
// protojson. Errors wrap oplog.ErrMalformed or, over the limit,
// oplog.ErrPayloadTooLarge; a read error of r is returned as is.
func ReadBatch(r io.Reader, encoding string, asJSON bool) (*analyticspb.Batch, error) {
	var dec io.Reader
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "identity":
		dec = r
	case "gzip":
		zr, err := gzip.NewReader(r)
		if err != nil {
			return nil, fmt.Errorf("analytics: gzip: %v: %w", err, oplog.ErrMalformed)
		}
		defer zr.Close()
		dec = zr
	case "zstd":
		zr, err := zstd.NewReader(r, zstd.WithDecoderMaxMemory(MaxDecodedBytes), zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("analytics: zstd: %v: %w", err, oplog.ErrMalformed)
		}
		defer zr.Close()
		dec = zr
	default:
		return nil, fmt.Errorf("analytics: content encoding %q: want gzip or zstd: %w", clip(encoding), oplog.ErrMalformed)
	}
	var buf bytes.Buffer
	n, err := io.Copy(&buf, io.LimitReader(dec, MaxDecodedBytes+1))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return nil, err
		}
		return nil, fmt.Errorf("analytics: reading the body: %v: %w", err, oplog.ErrMalformed)
	}
	if n > MaxDecodedBytes {
		return nil, fmt.Errorf("analytics: body over %d bytes decoded: %w", MaxDecodedBytes, oplog.ErrPayloadTooLarge)
	}
	b := &analyticspb.Batch{}
	if asJSON {
		err = protojson.Unmarshal(buf.Bytes(), b)
	} else {
		err = proto.Unmarshal(buf.Bytes(), b)
	}
	if err != nil {
		return nil, fmt.Errorf("analytics: batch: %v: %w", err, oplog.ErrMalformed)
	}
	return b, nil
}

// httpError answers as the admin API does: {"error": msg, "code":
// "ERROR_CODE_…"}; no code for ERROR_CODE_UNSPECIFIED (0).
func httpError(w http.ResponseWriter, status int, code oplogpb.ErrorCode, msg string) {
	body := map[string]string{"error": msg}
	if code != oplogpb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		body["code"] = code.String()
	}
	out, _ := json.Marshal(body)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(out, '\n'))
}
