package main

import (
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/sluicehq/sluice/delivery"
	"github.com/sluicehq/sluice/delivery/deliverypb"
	"github.com/sluicehq/sluice/oplog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// deliveryRoutes serves switches, packages and producer keys:
//
//	GET    /v1/switches                         every switch
//	GET    /v1/switches/{key}                   one switch
//	PUT    /v1/switches/{key}[?expect=V]        define it (body: Switch, protojson); with expect,
//	                                            only if its version is still V (else 409)
//	POST   /v1/switches/{key}/kill              kill switch on; .../unkill: off
//	DELETE /v1/switches/{key}                   remove it
//	GET    /v1/packages                         every package with its releases
//	GET    /v1/packages/{pkg}                   one package's releases
//	POST   /v1/packages/{pkg}/versions?version=V&kind=K[&fallback_url=U][&notes=N]
//	       [&producer_key=ID&producer_signature=HEX][&audience=RULE-JSON]
//	                                            upload (body: the package bytes)
//	POST   /v1/packages/{pkg}/{version}/gray    body: Rule (protojson)
//	POST   /v1/packages/{pkg}/{version}/{op}    op: full, pause, resume, stop
//	POST   /v1/packages/{pkg}/rollback          to the last stable version
//	GET    /v1/producer-keys                    registered hot-patch signing keys
//	PUT    /v1/producer-keys/{id}               body: {"public_key": base64 or hex}
//	DELETE /v1/producer-keys/{id}               revoke
//	GET    /v1/delivery/key                     the manifest signing public key (hex), to pin in apps
//	POST   /v1/delivery/view?device=D[&user=U]  body: Attrs-like JSON; the view that device gets
//	POST   /v1/dry-run[?salt=S]                 body: Rule; how many known devices it reaches now
//	POST   /v1/packages/{pkg}/{version}/dry-run body: Rule or nothing; how many known devices the
//	                                            release would be offered to (audience and gray rule)
//	GET    /v1/devices/{id}                     what the registry knows of a device
//	POST   /v1/pushes                           body: Push (protojson); sends it
//	POST   /v1/pushes/dry-run                   body: Push; how many known devices it would reach
//	POST   /v1/pushes/{id}/recall               withdraws what is not delivered yet
//	GET    /v1/pushes/recalled                  recalled push ids
//	GET    /v1/pushes/{id}/funnel               targeted, sent, delivered, opened, expired, offline
func (m *Main) deliveryRoutes(mux *http.ServeMux) {
	d := m.delivery
	mux.HandleFunc("GET /v1/pushes/{id}/funnel", func(w http.ResponseWriter, r *http.Request) {
		f, err := d.Funnel(r.Context(), r.PathValue("id"))
		m.writeProto(w, r, f, err)
	})
	mux.HandleFunc("POST /v1/pushes", func(w http.ResponseWriter, r *http.Request) {
		p := new(deliverypb.Push)
		if err := readProtoJSONMax(w, r, p, 8<<20); err != nil {
			m.writeError(w, r, err)
			return
		}
		res, err := d.Push(r.Context(), p, actor(r))
		m.writeProto(w, r, res, err)
	})
	mux.HandleFunc("POST /v1/pushes/dry-run", func(w http.ResponseWriter, r *http.Request) {
		p := new(deliverypb.Push)
		if err := readProtoJSONMax(w, r, p, 8<<20); err != nil {
			m.writeError(w, r, err)
			return
		}
		res, err := d.DryRunPush(r.Context(), m.devices, p)
		m.writeProto(w, r, res, err)
	})
	mux.HandleFunc("POST /v1/pushes/{id}/recall", func(w http.ResponseWriter, r *http.Request) {
		if err := d.Recall(r.Context(), r.PathValue("id"), actor(r)); err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"recalled": r.PathValue("id")})
	})
	mux.HandleFunc("GET /v1/pushes/recalled", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"recalled": d.Recalled()})
	})
	mux.HandleFunc("POST /v1/dry-run", func(w http.ResponseWriter, r *http.Request) {
		rule := new(deliverypb.Rule)
		if err := readProtoJSON(w, r, rule); err != nil {
			m.writeError(w, r, err)
			return
		}
		res, err := d.DryRunRule(r.Context(), m.devices, rule, r.URL.Query().Get("salt"))
		m.writeProto(w, r, res, err)
	})
	mux.HandleFunc("POST /v1/packages/{pkg}/{version}/dry-run", func(w http.ResponseWriter, r *http.Request) {
		var rule *deliverypb.Rule
		if r.ContentLength != 0 {
			rule = new(deliverypb.Rule)
			if err := readProtoJSON(w, r, rule); err != nil && !errors.Is(err, io.EOF) {
				m.writeError(w, r, err)
				return
			}
		}
		res, err := d.DryRunRelease(r.Context(), m.devices, r.PathValue("pkg"), r.PathValue("version"), rule)
		m.writeProto(w, r, res, err)
	})
	mux.HandleFunc("GET /v1/devices/{id}", func(w http.ResponseWriter, r *http.Request) {
		dev, ok, err := m.devices.Get(r.PathValue("id"))
		if err == nil && !ok {
			err = fmt.Errorf("device %q: %w", r.PathValue("id"), oplog.ErrNotFound)
		}
		m.writeProto(w, r, dev, err)
	})
	mux.HandleFunc("GET /v1/switches", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"switches": protoJSONs(d.Switches()), "applied": d.Applied()})
	})
	mux.HandleFunc("GET /v1/switches/{key}", func(w http.ResponseWriter, r *http.Request) {
		sw, ok := d.Switch(r.PathValue("key"))
		if !ok {
			m.writeError(w, r, fmt.Errorf("switch %q: %w", r.PathValue("key"), oplog.ErrNotFound))
			return
		}
		writeJSON(w, http.StatusOK, protoJSON(sw))
	})
	mux.HandleFunc("PUT /v1/switches/{key}", func(w http.ResponseWriter, r *http.Request) {
		sw := new(deliverypb.Switch)
		if err := readProtoJSON(w, r, sw); err != nil {
			m.writeError(w, r, err)
			return
		}
		if sw.Key == "" {
			sw.Key = r.PathValue("key")
		}
		if sw.Key != r.PathValue("key") {
			m.writeError(w, r, fmt.Errorf("switch key %q in the body, %q in the path: %w", sw.Key, r.PathValue("key"), oplog.ErrInvalid))
			return
		}
		var expect uint64
		if e := r.URL.Query().Get("expect"); e != "" {
			var err error
			if expect, err = strconv.ParseUint(e, 10, 64); err != nil {
				m.writeError(w, r, fmt.Errorf("expect=%q: %w", e, oplog.ErrInvalid))
				return
			}
		}
		got, err := d.SetSwitch(r.Context(), sw, actor(r), expect)
		m.writeProto(w, r, got, err)
	})
	for _, op := range []string{"kill", "unkill"} {
		mux.HandleFunc("POST /v1/switches/{key}/"+op, func(w http.ResponseWriter, r *http.Request) {
			got, err := d.Kill(r.Context(), r.PathValue("key"), op == "kill", actor(r))
			m.writeProto(w, r, got, err)
		})
	}
	mux.HandleFunc("DELETE /v1/switches/{key}", func(w http.ResponseWriter, r *http.Request) {
		if err := d.RemoveSwitch(r.Context(), r.PathValue("key"), actor(r)); err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"removed": r.PathValue("key")})
	})

	mux.HandleFunc("GET /v1/packages", func(w http.ResponseWriter, r *http.Request) {
		out := map[string][]json.RawMessage{}
		for _, name := range d.Packages() {
			rs, _ := d.Releases(name)
			out[name] = protoJSONs(rs)
		}
		writeJSON(w, http.StatusOK, map[string]any{"packages": out, "applied": d.Applied()})
	})
	mux.HandleFunc("GET /v1/packages/{pkg}", func(w http.ResponseWriter, r *http.Request) {
		rs, ok := d.Releases(r.PathValue("pkg"))
		if !ok {
			m.writeError(w, r, fmt.Errorf("package %q: %w", r.PathValue("pkg"), oplog.ErrNotFound))
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"package": r.PathValue("pkg"), "releases": protoJSONs(rs)})
	})
	mux.HandleFunc("POST /v1/packages/{pkg}/versions", func(w http.ResponseWriter, r *http.Request) {
		up, err := m.readUpload(w, r)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		rel, err := d.Upload(r.Context(), up, actor(r))
		m.writeProto(w, r, rel, err)
	})
	mux.HandleFunc("POST /v1/packages/{pkg}/{version}/{op}", func(w http.ResponseWriter, r *http.Request) {
		pkg, version := r.PathValue("pkg"), r.PathValue("version")
		var rel *deliverypb.Release
		var err error
		switch op := r.PathValue("op"); op {
		case "gray":
			rule := new(deliverypb.Rule)
			if err = readProtoJSON(w, r, rule); err == nil {
				rel, err = d.Gray(r.Context(), pkg, version, rule, actor(r))
			}
		case "full":
			rel, err = d.Full(r.Context(), pkg, version, actor(r))
		case "pause":
			rel, err = d.Pause(r.Context(), pkg, version, actor(r))
		case "resume":
			rel, err = d.Resume(r.Context(), pkg, version, actor(r))
		case "stop":
			rel, err = d.Stop(r.Context(), pkg, version, actor(r))
		default:
			err = fmt.Errorf("operation %q: want gray, full, pause, resume or stop: %w", op, oplog.ErrNotFound)
		}
		m.writeProto(w, r, rel, err)
	})
	mux.HandleFunc("POST /v1/packages/{pkg}/rollback", func(w http.ResponseWriter, r *http.Request) {
		rel, err := d.Rollback(r.Context(), r.PathValue("pkg"), actor(r))
		m.writeProto(w, r, rel, err)
	})

	mux.HandleFunc("GET /v1/producer-keys", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"keys": protoJSONs(d.ProducerKeys())})
	})
	mux.HandleFunc("PUT /v1/producer-keys/{id}", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			PublicKey string `json:"public_key"`
		}
		if err := readJSON(w, r, &body, 4<<10); err != nil {
			m.writeError(w, r, err)
			return
		}
		pub, err := decodeKey(body.PublicKey)
		if err != nil {
			m.writeError(w, r, err)
			return
		}
		if err := d.RegisterProducerKey(r.Context(), r.PathValue("id"), pub); err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"registered": r.PathValue("id")})
	})
	mux.HandleFunc("DELETE /v1/producer-keys/{id}", func(w http.ResponseWriter, r *http.Request) {
		if err := d.RevokeProducerKey(r.Context(), r.PathValue("id")); err != nil {
			m.writeError(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"revoked": r.PathValue("id")})
	})
	mux.HandleFunc("GET /v1/delivery/key", func(w http.ResponseWriter, r *http.Request) {
		pub := d.PublicKey()
		writeJSON(w, http.StatusOK, map[string]string{"public_key": hex.EncodeToString(pub), "key_id": delivery.KeyID(pub)})
	})
	mux.HandleFunc("POST /v1/delivery/view", func(w http.ResponseWriter, r *http.Request) {
		var a struct {
			AppVersion string `json:"app_version"`
			OS         string `json:"os"`
			OSVersion  string `json:"os_version"`
			Model      string `json:"model"`
			Region     string `json:"region"`
			Network    string `json:"network"`
			Channel    string `json:"channel"`
			CPU        string `json:"cpu"`
		}
		if err := readJSON(w, r, &a, 4<<10); err != nil && !errors.Is(err, io.EOF) {
			m.writeError(w, r, err)
			return
		}
		q := r.URL.Query()
		if !oplog.ValidID(q.Get("device")) {
			m.writeError(w, r, fmt.Errorf("device=%q: %w", q.Get("device"), oplog.ErrInvalidID))
			return
		}
		v := d.View(&delivery.Device{ID: q.Get("device"), User: q.Get("user"), Attrs: oplog.Attrs{AppVersion: a.AppVersion,
			OS: a.OS, OSVersion: a.OSVersion, Model: a.Model, Region: a.Region, Network: a.Network, Channel: a.Channel, CPU: a.CPU}})
		// d.View signed the manifests just now: decode them, no need to verify.
		manifests := make([]*deliverypb.Manifest, 0, len(v.Releases))
		for _, sm := range v.Releases {
			man := new(deliverypb.Manifest)
			if err := proto.Unmarshal(sm.Manifest, man); err != nil {
				m.writeError(w, r, fmt.Errorf("view of device %q: manifest: %w", q.Get("device"), err))
				return
			}
			manifests = append(manifests, man)
		}
		writeJSON(w, http.StatusOK, map[string]any{"digest": v.Digest, "switches": protoJSONs(v.Switches), "releases": protoJSONs(manifests)})
	})
}

// readUpload reads an upload request: the query names the version, the
// body is the package.
func (m *Main) readUpload(w http.ResponseWriter, r *http.Request) (delivery.Upload, error) {
	q := r.URL.Query()
	kind, ok := deliverypb.PackageKind_value["PACKAGE_KIND_"+strings.ToUpper(strings.ReplaceAll(q.Get("kind"), "-", "_"))]
	if !ok {
		return delivery.Upload{}, fmt.Errorf("kind=%q: want app, hot_patch, h5, mini_program, resource or config: %w", q.Get("kind"), oplog.ErrInvalid)
	}
	up := delivery.Upload{Package: r.PathValue("pkg"), Kind: deliverypb.PackageKind(kind), Version: q.Get("version"),
		FallbackURL: q.Get("fallback_url"), Notes: q.Get("notes"), ProducerKey: q.Get("producer_key")}
	if s := q.Get("producer_signature"); s != "" {
		sig, err := hex.DecodeString(s)
		if err != nil {
			return up, fmt.Errorf("producer_signature: not hex: %w", oplog.ErrInvalid)
		}
		up.ProducerSignature = sig
	}
	if a := q.Get("audience"); a != "" {
		up.Audience = new(deliverypb.Rule)
		if err := protojson.Unmarshal([]byte(a), up.Audience); err != nil {
			return up, errors.Join(fmt.Errorf("audience: %w", oplog.ErrMalformed), err)
		}
	}
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, m.cfg.MaxPackage+1))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) || int64(len(data)) > m.cfg.MaxPackage {
		return up, fmt.Errorf("package over %d bytes: %w", m.cfg.MaxPackage, oplog.ErrPayloadTooLarge)
	}
	if err != nil {
		return up, fmt.Errorf("reading the package: %v: %w", err, oplog.ErrMalformed)
	}
	up.Data = data
	return up, nil
}

// decodeKey decodes an ed25519 public key given in hex or base64.
func decodeKey(s string) ([]byte, error) {
	if b, err := hex.DecodeString(s); err == nil && len(b) == 32 {
		return b, nil
	}
	if b, err := base64.StdEncoding.DecodeString(s); err == nil && len(b) == 32 {
		return b, nil
	}
	return nil, fmt.Errorf("public key: want 32 bytes in hex or base64: %w", oplog.ErrInvalid)
}

// actor names who made an admin change, for the control events.
func actor(r *http.Request) string {
	if a, ok := r.Context().Value(actorKey{}).(string); ok {
		return a
	}
	return "admin"
}

type actorKey struct{}
