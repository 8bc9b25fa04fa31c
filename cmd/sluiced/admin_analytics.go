package main

import (
	"fmt"
	"net/http"
	"strconv"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
)

// analyticsRoutes serves the aggregates:
//
//	GET /v1/analytics/{app}/periods/{period}        every counter of a day (20261121), ISO week (2026W47) or month (202611)
//	GET /v1/analytics/{app}/retention/{cohort}?days=N  users of a cohort day active 0..N days later (default 30)
//	GET /v1/analytics/{app}/crashes/{day}           crash figures per slice: all (""), per version (v:…), per release (r:pkg=ver)
//	GET    /v1/breakers                             circuit-breaker rules and their last trips (with the evidence)
//	PUT    /v1/breakers/{id}                        define a rule (body: BreakerRule, protojson); a new version re-arms it
//	DELETE /v1/breakers/{id}                        remove a rule
func (m *Main) analyticsRoutes(mux *http.ServeMux) {
	ag := m.aggregates
	mux.HandleFunc("GET /v1/breakers", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"rules": protoJSONs(m.breakers.Rules()), "trips": protoJSONs(m.breakers.Trips())})
	})
	mux.HandleFunc("PUT /v1/breakers/{id}", func(w http.ResponseWriter, r *http.Request) {
		rule := new(analyticspb.BreakerRule)
		if err := readProtoJSON(w, r, rule); err != nil {
			m.writeError(w, r, err)
			return
		}
		if rule.Id == "" {
			rule.Id = r.PathValue("id")
		}
		if rule.Id != r.PathValue("id") {
			m.writeError(w, r, fmt.Errorf("breaker id %q in the body, %q in the path: %w", rule.Id, r.PathValue("id"), oplog.ErrInvalid))
			return
		}
		got, err := m.breakers.SetRule(r.Context(), rule, actor(r))
		m.writeProto(w, r, got, err)
	})
	mux.HandleFunc("DELETE /v1/breakers/{id}", func(w http.ResponseWriter, r *http.Request) {
		if err := m.breakers.RemoveRule(r.Context(), r.PathValue("id"), actor(r)); err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"removed": r.PathValue("id")})
	})
	mux.HandleFunc("GET /v1/analytics/{app}/periods/{period}", func(w http.ResponseWriter, r *http.Request) {
		c, err := ag.Counters(r.Context(), r.PathValue("app"), r.PathValue("period"))
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"app": r.PathValue("app"), "period": r.PathValue("period"), "counters": c})
	})
	mux.HandleFunc("GET /v1/analytics/{app}/retention/{cohort}", func(w http.ResponseWriter, r *http.Request) {
		days := 30
		if s := r.URL.Query().Get("days"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 0 || n > 366 {
				m.writeError(w, r, fmt.Errorf("days=%q: want 0-366: %w", s, oplog.ErrInvalid))
				return
			}
			days = n
		}
		ret, err := ag.Retention(r.Context(), r.PathValue("app"), r.PathValue("cohort"), days)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"app": r.PathValue("app"), "cohort": r.PathValue("cohort"), "active": ret})
	})
	mux.HandleFunc("GET /v1/analytics/{app}/crashes/{day}", func(w http.ResponseWriter, r *http.Request) {
		rates, err := ag.CrashRates(r.Context(), r.PathValue("app"), r.PathValue("day"))
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"app": r.PathValue("app"), "day": r.PathValue("day"), "slices": rates})
	})
}
