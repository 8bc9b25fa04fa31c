package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"strconv"
	"time"

	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"github.com/sluicehq/sluice/topics"
	"google.golang.org/protobuf/encoding/protojson"
)

// adminHandler serves the admin HTTP API. Every route but /healthz and
// /readyz (open, for health checks) needs "Authorization: Bearer <token>"
// with an admin's token (see admin_auth.go: --admin-tokens, --admin-token
// or SLUICE_ADMIN_TOKEN, else <data>/admin.token); the admin's name is the
// actor recorded in the control events a change writes. A request without
// a valid token gets 401, a WWW-Authenticate: Bearer challenge and
// {"error": "...", "code": "UNAUTHENTICATED"}. Listen on localhost or a
// private network all the same: the API speaks plain HTTP.
//
//	GET  /healthz                          the process is up (no token)
//	GET  /readyz                           NATS connected and components running (no token)
//	GET  /v1/info                          NATS URL, shards and their epochs
//	GET  /v1/backlog?user=&device=&limit=  a device's backlog after its recorded sync points
//	GET  /v1/syncpoints?device=            a device's recorded sync points
//	GET  /v1/projections                   applied stream sequence of each projection
//	GET  /v1/digest?projection=            SHA-256 of a projection's state
//	POST /v1/rebuild?projection=&from=     replay a projection; streams NDJSON progress, then the summary
//	GET  /v1/gateway                       gateway load: links, sessions, draining
//	GET  /v1/businesses                    registered businesses
//	POST /v1/businesses                    register a business (protojson Business)
//	GET  /v1/buckets                       buckets, each business's bucket, and the computation metrics
//	POST /v1/buckets                       define or change a bucket (protojson Bucket)
//	DELETE /v1/buckets/{name}              remove a bucket (its businesses go back to the default rule)
//	POST /v1/buckets/assign?business=&bucket=  move a business (bucket empty: back to the default rule)
//	GET  /v1/fanout?limit=                 recent fanout jobs with their progress
//	GET  /v1/fanout/{job}                  one job's progress: total, done, failed, rate
//	POST /v1/fanout/{job}/cancel           stop a job
//	GET  /v1/topics                        topics with their follower counts
//	...                                    switches, packages, producer keys, pushes, devices:
//	                                       see deliveryRoutes (admin_delivery.go)
//	...                                    diagnostics (requests for devices' logs): see diagnosticsRoutes
//	                                       (admin_diagnostics.go)
//
// Projections are named after their streams: the inbox's (SLUICE_OPLOG_n,
// SLUICE_ACKS), the topics' (SLUICE_TOPICS, SLUICE_FOLLOWS,
// SLUICE_TOPIC_ACKS), fanout's (SLUICE_SEGMENTS) and delivery's (the device
// registry SLUICE_DEVICES, the push receipts SLUICE_RECEIPTS). Delivery's
// routes (switches, packages, pushes, producer keys, dry runs) are listed
// in admin_delivery.go.
func (m *Main) adminHandler(auth *adminAuth) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		ready := m.ready
		m.mu.Unlock()
		if !ready || m.nc == nil || !m.nc.IsConnected() {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready"})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"status": "ready", "applied": m.applied()})
	})
	mux.HandleFunc("GET /v1/info", func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		ep := m.endpoints
		m.mu.Unlock()
		epochs := make([]uint64, m.lg.Shards())
		for i := range epochs {
			epochs[i] = m.lg.Epoch(uint32(i))
		}
		writeJSON(w, http.StatusOK, map[string]any{"nats": ep.NATS, "websocket": ep.WebSocket, "tcp": ep.TCP,
			"shards": m.lg.Shards(), "epochs": epochs, "fsync": m.cfg.Fsync})
	})
	mux.HandleFunc("GET /v1/gateway", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, m.gateway.Stats())
	})
	mux.HandleFunc("GET /v1/backlog", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		limit, _ := strconv.Atoi(q.Get("limit"))
		b, err := m.inbox.Backlog(r.Context(), oplog.BacklogRequest{User: q.Get("user"), Device: q.Get("device"), Limit: limit})
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		entries := make([]json.RawMessage, 0, len(b.Entries))
		for _, e := range b.Entries {
			data, err := protojson.Marshal(e)
			if err != nil {
				m.writeError(w, r, err)
				return
			}
			entries = append(entries, data)
		}
		writeJSON(w, http.StatusOK, map[string]any{"entries": entries, "more": b.More, "reset": b.Reset})
	})
	mux.HandleFunc("GET /v1/syncpoints", func(w http.ResponseWriter, r *http.Request) {
		sp, err := m.inbox.SyncPoints(r.Context(), r.URL.Query().Get("device"))
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"device": r.URL.Query().Get("device"), "sync_points": sp})
	})
	mux.HandleFunc("GET /v1/projections", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"applied": m.applied()})
	})
	mux.HandleFunc("GET /v1/digest", func(w http.ResponseWriter, r *http.Request) {
		name := r.URL.Query().Get("projection")
		set, err := m.projectionSet(name)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		if err := set.CatchUp(r.Context()); err != nil {
			m.writeError(w, r, err)
			return
		}
		d, err := set.Digest(r.Context(), name)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"projection": name, "digest": d, "applied": set.Applied()[name]})
	})
	mux.HandleFunc("POST /v1/rebuild", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		from, err := strconv.ParseUint(q.Get("from"), 10, 64)
		if q.Get("from") == "" {
			from, err = 0, nil
		}
		if err != nil {
			m.writeError(w, r, errors.Join(oplog.ErrInvalid, err))
			return
		}
		set, err := m.projectionSet(q.Get("projection"))
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		enc := json.NewEncoder(w)
		flusher, _ := w.(http.Flusher)
		sum, err := set.Rebuild(r.Context(), q.Get("projection"), from, 250*time.Millisecond, func(p oplog.Progress) {
			_ = enc.Encode(map[string]any{"progress": p})
			if flusher != nil {
				flusher.Flush()
			}
		})
		if err != nil {
			_ = enc.Encode(map[string]any{"error": err.Error(), "code": oplog.CodeOf(err).String()})
			return
		}
		_ = enc.Encode(map[string]any{"summary": sum})
	})
	mux.HandleFunc("GET /v1/businesses", func(w http.ResponseWriter, r *http.Request) {
		var out []json.RawMessage
		for _, b := range m.lg.Businesses() {
			data, _ := protojson.Marshal(b)
			out = append(out, data)
		}
		writeJSON(w, http.StatusOK, map[string]any{"businesses": out})
	})
	mux.HandleFunc("POST /v1/businesses", func(w http.ResponseWriter, r *http.Request) {
		b := new(oplogpb.Business)
		if err := readProtoJSON(w, r, b); err != nil {
			m.writeError(w, r, err)
			return
		}
		if err := m.lg.RegisterBusiness(r.Context(), b); err != nil {
			m.writeError(w, r, err)
			return
		}
		data, _ := protojson.Marshal(b)
		writeJSON(w, http.StatusOK, json.RawMessage(data))
	})
	m.bucketRoutes(mux)
	m.fanoutRoutes(mux)
	m.deliveryRoutes(mux)
	m.analyticsRoutes(mux)
	m.diagnosticsRoutes(mux)
	mux.HandleFunc("GET /v1/topics", func(w http.ResponseWriter, r *http.Request) {
		list, err := m.topics.Topics(r.Context())
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		out := make([]map[string]any, 0, len(list))
		for _, t := range list {
			if t.Name == topics.Everyone {
				data, _ := protojson.Marshal(t)
				out = append(out, map[string]any{"topic": json.RawMessage(data), "followers": "every device"})
				continue
			}
			n, err := m.topics.Followers(r.Context(), t.Name)
			if err != nil {
				m.writeError(w, r, err)
				return
			}
			data, _ := protojson.Marshal(t)
			out = append(out, map[string]any{"topic": json.RawMessage(data), "followers": n})
		}
		writeJSON(w, http.StatusOK, map[string]any{"topics": out})
	})
	return auth.wrap(mux)
}

// projections is what the inbox, topics and fanout have in common for
// replay: named projections that can be rebuilt and digested.
type projections interface {
	Projections() []string
	Applied() map[string]uint64
	CatchUp(ctx context.Context) error
	Digest(ctx context.Context, name string) (string, error)
	Rebuild(ctx context.Context, name string, from uint64, interval time.Duration, progress func(oplog.Progress)) (*oplog.RebuildSummary, error)
}

func (m *Main) projectionSets() []projections {
	return []projections{m.inbox, m.topics, m.fanout, oplog.ProjectionSet{m.devices.Projection(), m.delivery.ReceiptsProjection(), m.aggregates.Projection()}}
}

// projectionSet finds the owner of a projection.
func (m *Main) projectionSet(name string) (projections, error) {
	var all []string
	for _, set := range m.projectionSets() {
		for _, n := range set.Projections() {
			if n == name {
				return set, nil
			}
			all = append(all, n)
		}
	}
	return nil, fmt.Errorf("projection %q: want one of %v: %w", name, all, oplog.ErrInvalid)
}

// applied merges the applied sequence of every projection.
func (m *Main) applied() map[string]uint64 {
	out := map[string]uint64{}
	for _, set := range m.projectionSets() {
		maps.Copy(out, set.Applied())
	}
	return out
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError answers a typed error: 4xx for the caller's mistakes, 503 when
// the log is unavailable, 500 (with no detail) otherwise; and logs it once.
func (m *Main) writeError(w http.ResponseWriter, r *http.Request, err error) {
	code := oplog.CodeOf(err)
	status := http.StatusBadRequest
	msg := err.Error()
	switch code {
	case oplogpb.ErrorCode_ERROR_CODE_NOT_FOUND:
		status = http.StatusNotFound
	case oplogpb.ErrorCode_ERROR_CODE_CONFLICT:
		status = http.StatusConflict
	case oplogpb.ErrorCode_ERROR_CODE_SIGNATURE:
		status = http.StatusForbidden
	case oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE:
		status = http.StatusServiceUnavailable
	case oplogpb.ErrorCode_ERROR_CODE_INTERNAL:
		status, msg = http.StatusInternalServerError, "internal error"
	}
	ev := m.log.Info()
	if status >= 500 {
		ev = m.log.Error()
	}
	ev.Str("component", "admin").Str("path", r.URL.Path).Str("code", code.String()).Err(err).Msg("admin request refused")
	writeJSON(w, status, map[string]string{"error": msg, "code": code.String()})
}
