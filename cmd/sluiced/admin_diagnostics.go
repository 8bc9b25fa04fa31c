package main

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/sluicehq/sluice/analytics"
	"github.com/sluicehq/sluice/oplog"
)

// diagnosticsRoutes serves diagnostics: requests for the logs of a device
// or of every device of a user (analytics.Diagnostics; devices upload on
// the gateway's listener, POST /v1/diagnostics/{id}/logs with their
// token):
//
//	POST /v1/diagnostics                      body: {"device": D} or {"user": U}, optional "note", "validity_ms";
//	                                          sends the command over sync, answers the DiagnosticRequest
//	GET  /v1/diagnostics?limit=N              requests, newest first (default 100, at most 1000), with status and uploads
//	GET  /v1/diagnostics/{id}                 one request: status REQUESTED, UPLOADED, FAILED or EXPIRED, and each
//	                                          device's upload (size, sha256, at_ms) or reported error
//	GET  /v1/diagnostics/{id}/logs/{device}   the logs a device uploaded (application/octet-stream; ETag: the
//	                                          SHA-256 in hex)
func (m *Main) diagnosticsRoutes(mux *http.ServeMux) {
	dg := m.diagnostics
	mux.HandleFunc("POST /v1/diagnostics", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Device     string `json:"device"`
			User       string `json:"user"`
			Note       string `json:"note"`
			ValidityMs int64  `json:"validity_ms"`
		}
		if err := readJSON(w, r, &body, 64<<10, (*json.Decoder).DisallowUnknownFields); err != nil {
			m.writeError(w, r, err)
			return
		}
		if body.ValidityMs < 0 || body.ValidityMs > int64(365*24*time.Hour/time.Millisecond) {
			m.writeError(w, r, fmt.Errorf("validity_ms %d: %w", body.ValidityMs, oplog.ErrInvalid))
			return
		}
		req, err := dg.Request(r.Context(), analytics.LogRequest{Device: body.Device, User: body.User, Note: body.Note,
			Validity: time.Duration(body.ValidityMs) * time.Millisecond}, actor(r))
		m.writeProto(w, r, req, err)
	})
	mux.HandleFunc("GET /v1/diagnostics", func(w http.ResponseWriter, r *http.Request) {
		limit := 0
		if s := r.URL.Query().Get("limit"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 || n > analytics.MaxListRequests {
				m.writeError(w, r, fmt.Errorf("limit=%q: want 1-%d: %w", s, analytics.MaxListRequests, oplog.ErrInvalid))
				return
			}
			limit = n
		}
		list, err := dg.List(r.Context(), limit)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"requests": protoJSONs(list)})
	})
	mux.HandleFunc("GET /v1/diagnostics/{id}", func(w http.ResponseWriter, r *http.Request) {
		req, err := dg.Get(r.Context(), r.PathValue("id"))
		m.writeProto(w, r, req, err)
	})
	mux.HandleFunc("GET /v1/diagnostics/{id}/logs/{device}", func(w http.ResponseWriter, r *http.Request) {
		id, device := r.PathValue("id"), r.PathValue("device")
		logs, up, err := dg.Logs(r.Context(), id, device)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		defer logs.Close()
		h := w.Header()
		h.Set("Content-Type", "application/octet-stream")
		h.Set("Content-Length", strconv.FormatInt(up.Size, 10))
		h.Set("ETag", `"`+hex.EncodeToString(up.Sha256)+`"`)
		h.Set("Content-Disposition", `attachment; filename="`+id+"-"+device+`.log"`)
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodHead {
			return
		}
		if _, err := io.Copy(w, logs); err != nil {
			m.log.Info().Str("component", "admin").Str("path", r.URL.Path).Err(err).Msg("logs download ended early")
		}
	})
}
