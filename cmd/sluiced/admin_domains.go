package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"

	"github.com/sluicehq/sluice/buckets/bucketspb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// bucketRoutes serves the bucket map and its metrics.
func (m *Main) bucketRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/buckets", func(w http.ResponseWriter, r *http.Request) {
		of := map[string]string{}
		for _, b := range m.lg.Businesses() {
			of[b.Code] = m.buckets.BucketOf(b)
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"buckets":     m.buckets.Buckets(),
			"assignments": m.buckets.Assignments(),
			"businesses":  of,
			"metrics":     m.sched.Stats(),
			"applied":     m.buckets.Applied(),
		})
	})
	mux.HandleFunc("POST /v1/buckets", func(w http.ResponseWriter, r *http.Request) {
		b := new(bucketspb.Bucket)
		if err := readProtoJSON(w, r, b); err != nil {
			m.writeError(w, r, err)
			return
		}
		if err := m.buckets.Define(r.Context(), b); err != nil {
			m.writeError(w, r, err)
			return
		}
		got, _ := m.buckets.Bucket(b.Name)
		writeJSON(w, http.StatusOK, got)
	})
	mux.HandleFunc("DELETE /v1/buckets/{name}", func(w http.ResponseWriter, r *http.Request) {
		if err := m.buckets.Remove(r.Context(), r.PathValue("name")); err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"removed": r.PathValue("name")})
	})
	mux.HandleFunc("POST /v1/buckets/assign", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if err := m.buckets.Assign(r.Context(), q.Get("business"), q.Get("bucket")); err != nil {
			m.writeError(w, r, err)
			return
		}
		b, _ := m.lg.Business(q.Get("business"))
		writeJSON(w, http.StatusOK, map[string]string{"business": q.Get("business"), "bucket": m.buckets.BucketOf(b)})
	})
}

// fanoutRoutes serves fanout progress.
func (m *Main) fanoutRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/fanout", func(w http.ResponseWriter, r *http.Request) {
		limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
		list, err := m.fanout.List(r.Context(), limit)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"jobs": protoJSONs(list)})
	})
	mux.HandleFunc("GET /v1/fanout/{job}", func(w http.ResponseWriter, r *http.Request) {
		st, err := m.fanout.Status(r.Context(), r.PathValue("job"))
		m.writeProto(w, r, st, err)
	})
	mux.HandleFunc("POST /v1/fanout/{job}/cancel", func(w http.ResponseWriter, r *http.Request) {
		st, err := m.fanout.Cancel(r.Context(), r.PathValue("job"))
		m.writeProto(w, r, st, err)
	})
}

func protoJSON(msg proto.Message) json.RawMessage {
	data, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(msg)
	if err != nil {
		return json.RawMessage(`null`)
	}
	return data
}

// protoJSONs encodes each message with protoJSON; an empty list is [].
func protoJSONs[T proto.Message](msgs []T) []json.RawMessage {
	out := make([]json.RawMessage, 0, len(msgs))
	for _, msg := range msgs {
		out = append(out, protoJSON(msg))
	}
	return out
}

// writeProto answers msg in protojson, or err if it is not nil.
func (m *Main) writeProto(w http.ResponseWriter, r *http.Request, msg proto.Message, err error) {
	if err != nil {
		m.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, protoJSON(msg))
}

// readProtoJSON decodes a protojson request body of at most 64 KiB.
func readProtoJSON(w http.ResponseWriter, r *http.Request, msg proto.Message) error {
	return readProtoJSONMax(w, r, msg, 64<<10)
}

// readProtoJSONMax decodes a protojson request body of at most max bytes.
func readProtoJSONMax(w http.ResponseWriter, r *http.Request, msg proto.Message, max int64) error {
	var raw json.RawMessage
	if err := readJSON(w, r, &raw, max); err != nil {
		return err
	}
	if err := protojson.Unmarshal(raw, msg); err != nil {
		return errors.Join(oplog.ErrMalformed, err)
	}
	return nil
}

// readJSON decodes a JSON request body of at most max bytes into v, with
// the decoder set up by opts (e.g. (*json.Decoder).DisallowUnknownFields).
// Its errors are oplog.ErrMalformed, joined with the decoder's (io.EOF for
// an empty body).
func readJSON(w http.ResponseWriter, r *http.Request, v any, max int64, opts ...func(*json.Decoder)) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, max))
	for _, opt := range opts {
		opt(dec)
	}
	if err := dec.Decode(v); err != nil {
		return errors.Join(oplog.ErrMalformed, err)
	}
	return nil
}
