package analytics

// Diagnostics: an admin asks one device, or every device of a user, for its
// logs; the devices upload them; admins list the requests and download
// what came.
//
// A request (Request) is first stored in the KV bucket
// BucketDiagnosticRequests (key: the request id, value: an
// analyticspb.DiagnosticRequest), then sent as an oplog entry of kind
// KIND_COMMAND: on business "diag" (device dimension) to a device, on
// "diag-user" (user dimension, multi-device) to a user, so every device of
// the user gets it, including one that is offline now and connects (or
// binds the user) within the validity. The entry's payload is a
// DiagnosticCommand (protojson, proto field names) with the request id,
// the upload path, the largest upload accepted and the end of the
// validity, which is also the entry's expires_at: no device gets the
// command after it. OpenDiagnostics registers both businesses if absent.
//
// A device answers on the gateway's HTTP listener (UploadHandler), with
// its device token:
//
//	POST /v1/diagnostics/<id>/logs      the logs, as the body (at most MaxLogBytes)
//	POST /v1/diagnostics/<id>/failure   what went wrong instead (text, at most 1 KiB)
//
// The logs are streamed into the Object Store bucket BucketDiagnostics as
// "<id>/<device>/<nuid>", their SHA-256 computed on the way, and then
// recorded in the request with a compare-and-set on the KV revision (so
// concurrent uploads of a user's devices all land). A device that uploads
// again replaces its earlier upload (record first, then the old object is
// deleted): the record always names the object it describes, and a
// download's ETag is the SHA-256 of the bytes served. A failure report is
// recorded unless the device already uploaded logs.
//
// Status is derived from the uploads: UPLOADED once any device uploaded
// logs, FAILED when devices reported failures only, REQUESTED until the
// validity ends, then EXPIRED (computed when read: nothing runs in the
// background, and nothing is accepted after the validity).
//
// Requests and logs are kept Retention after their last write (the KV
// bucket's and the object store's max age), so storage does not grow
// without bound. A request's record lives at least as long as its logs;
// when a user's devices upload days apart, the first device's logs may
// age out before the record (Logs then answers oplog.ErrNotFound).
//
// Diagnostics has no goroutine and no Run: every method does its I/O on
// the caller's goroutine and is safe for concurrent use.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/rs/zerolog"
	"github.com/sluicehq/sluice/analytics/analyticspb"
	"github.com/sluicehq/sluice/oplog"
	"github.com/sluicehq/sluice/oplog/oplogpb"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Storage of diagnostics.
const (
	// BucketDiagnostics is the JetStream Object Store bucket of uploaded
	// logs, named "<request>/<device>/<nuid>".
	BucketDiagnostics = "sluice_diagnostics"
	// BucketDiagnosticRequests is the KV bucket of requests, by id.
	BucketDiagnosticRequests = "sluice_diagnostics_requests"
)

// The businesses that carry diagnostic commands: OpenDiagnostics registers
// them if absent.
var (
	// BusinessDiagnostics carries a request to one device.
	BusinessDiagnostics = &oplogpb.Business{Code: "diag", Dimension: oplogpb.Dimension_DIMENSION_DEVICE,
		Description: "diagnostic commands to a device (analytics)"}
	// BusinessDiagnosticsUser carries a request to every device of a user.
	BusinessDiagnosticsUser = &oplogpb.Business{Code: "diag-user", Dimension: oplogpb.Dimension_DIMENSION_USER,
		DeviceMode: oplogpb.DeviceMode_DEVICE_MODE_MULTI, Description: "diagnostic commands to every device of a user (analytics)"}
)

// Diagnostics settings.
const (
	// ContentTypeDiagnosticCommand is the content type of a command
	// entry's payload: a DiagnosticCommand in protojson.
	ContentTypeDiagnosticCommand = "application/vnd.sluice.diagnostic+json"
	DefaultMaxLogBytes           = 32 << 20
	DefaultDiagnosticValidity    = 7 * 24 * time.Hour
	DefaultDiagnosticRetention   = 30 * 24 * time.Hour
	// MaxNoteLen bounds an admin's note; MaxFailureLen a device's failure
	// report.
	MaxNoteLen    = 1024
	MaxFailureLen = 1024
	// MaxListRequests bounds List.
	MaxListRequests = 1000
	// diagPrefix starts the message id of a request's entry
	// ("diag-<id>").
	diagPrefix = "diag-"
)

// ErrNotTarget: a device uploaded for a request that names another device,
// or a user the device's token does not name (HTTP 403).
var ErrNotTarget = errors.New("analytics: the diagnostic request is not for this device")

// DiagnosticsConfig configures Diagnostics. A zero field takes the
// default in its comment.
type DiagnosticsConfig struct {
	// Log is the oplog: commands are appended to it, and its JetStream
	// context holds the buckets. Required.
	Log *oplog.Log
	// Logger. Default zerolog.Nop().
	Logger *zerolog.Logger
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// MaxLogBytes bounds one device's upload. Default DefaultMaxLogBytes
	// (32 MiB).
	MaxLogBytes int64
	// URLPrefix is where UploadHandler is mounted on the gateway's
	// listener; commands name URLPrefix + "<id>/logs". Default
	// "/v1/diagnostics/".
	URLPrefix string
	// Validity is a request's validity when it gives none. Default
	// DefaultDiagnosticValidity (7 days), or Retention if shorter.
	Validity time.Duration
	// Retention is how long requests and logs are kept after their last
	// write; it also bounds a request's validity. Default
	// DefaultDiagnosticRetention (30 days).
	Retention time.Duration
}

// LogRequest asks for logs: of one device (Device) or of every device of
// a user (User); exactly one of them.
type LogRequest struct {
	Device, User string
	// Note is the admin's, kept with the request (at most MaxNoteLen).
	Note string
	// Validity is how long devices may upload. Default
	// DiagnosticsConfig.Validity; at most DiagnosticsConfig.Retention.
	Validity time.Duration
}

// Diagnostics sends requests for logs to devices and keeps what they
// upload (see the comment at the top of diagnostics.go). Safe for
// concurrent use.
type Diagnostics struct {
	cfg DiagnosticsConfig
	lg  zerolog.Logger
	kv  jetstream.KeyValue
	obs jetstream.ObjectStore
}

// OpenDiagnostics creates (or updates) the two buckets and registers the
// diagnostic businesses if absent.
func OpenDiagnostics(ctx context.Context, cfg DiagnosticsConfig) (*Diagnostics, error) {
	if cfg.Log == nil {
		return nil, errors.New("analytics: DiagnosticsConfig.Log is required")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxLogBytes <= 0 {
		cfg.MaxLogBytes = DefaultMaxLogBytes
	}
	if cfg.URLPrefix == "" {
		cfg.URLPrefix = "/v1/diagnostics/"
	}
	if !strings.HasSuffix(cfg.URLPrefix, "/") {
		cfg.URLPrefix += "/"
	}
	if cfg.Retention <= 0 {
		cfg.Retention = DefaultDiagnosticRetention
	}
	if cfg.Validity <= 0 {
		cfg.Validity = min(DefaultDiagnosticValidity, cfg.Retention)
	}
	if cfg.Validity > cfg.Retention {
		return nil, fmt.Errorf("analytics: diagnostics validity %v over the retention %v", cfg.Validity, cfg.Retention)
	}
	d := &Diagnostics{cfg: cfg, lg: zerolog.Nop()}
	if cfg.Logger != nil {
		d.lg = cfg.Logger.With().Str("component", "diagnostics").Logger()
	}
	js := cfg.Log.JetStream()
	var err error
	d.kv, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketDiagnosticRequests,
		Description: "Sluice diagnostic requests (log uploads) and their state",
		TTL:         cfg.Retention,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Log.Replicas(),
	})
	if err != nil {
		return nil, fmt.Errorf("analytics: kv %s: %w", BucketDiagnosticRequests, err)
	}
	d.obs, err = js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
		Bucket:      BucketDiagnostics,
		Description: "Sluice diagnostic logs uploaded by devices",
		TTL:         cfg.Retention,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Log.Replicas(),
	})
	if err != nil {
		return nil, fmt.Errorf("analytics: object store %s: %w", BucketDiagnostics, err)
	}
	if err := cfg.Log.EnsureBusinesses(ctx, BusinessDiagnostics, BusinessDiagnosticsUser); err != nil {
		return nil, fmt.Errorf("analytics: %w", err)
	}
	return d, nil
}

// Request stores a request for logs and sends its command to the device,
// or to every device of the user. It returns the request (status
// REQUESTED).
//
// Errors: oplog.ErrInvalidID (device, user), oplog.ErrInvalid (neither or
// both targets, note, validity), oplog.ErrUnavailable, and the oplog's
// errors of the append.
func (d *Diagnostics) Request(ctx context.Context, lr LogRequest, actor string) (*analyticspb.DiagnosticRequest, error) {
	now := d.cfg.Now()
	if (lr.Device == "") == (lr.User == "") {
		return nil, fmt.Errorf("diagnostics: want a device or a user, not both or neither: %w", oplog.ErrInvalid)
	}
	if target := lr.Device + lr.User; !oplog.ValidID(target) {
		return nil, fmt.Errorf("diagnostics: target %q: want 1-%d of [A-Za-z0-9_-]: %w", clip(target), oplog.MaxIDLen, oplog.ErrInvalidID)
	}
	if len(lr.Note) > MaxNoteLen {
		return nil, fmt.Errorf("diagnostics: note over %d bytes: %w", MaxNoteLen, oplog.ErrInvalid)
	}
	validity := lr.Validity
	switch {
	case validity == 0:
		validity = d.cfg.Validity
	case validity < 0 || validity > d.cfg.Retention:
		return nil, fmt.Errorf("diagnostics: validity %v: want up to %v: %w", validity, d.cfg.Retention, oplog.ErrInvalid)
	}
	req := &analyticspb.DiagnosticRequest{Id: nuid.Next(), Device: lr.Device, User: lr.User, Note: lr.Note, Actor: actor,
		CreatedMs: now.UnixMilli(), ExpiresMs: now.Add(validity).UnixMilli(), Status: analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_REQUESTED}
	data, err := proto.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("diagnostics: %w", err)
	}
	if _, err := d.kv.Create(ctx, req.Id, data); err != nil {
		return nil, fmt.Errorf("diagnostics: storing request %s: %v: %w", req.Id, err, oplog.ErrUnavailable)
	}
	cmd, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(&analyticspb.DiagnosticCommand{
		RequestId: req.Id, UploadUrl: d.cfg.URLPrefix + req.Id + "/logs", MaxBytes: d.cfg.MaxLogBytes, ExpiresMs: req.ExpiresMs})
	if err != nil {
		return nil, fmt.Errorf("diagnostics: %w", err)
	}
	ev := &oplogpb.Event{Kind: oplogpb.Kind_KIND_COMMAND, Payload: cmd, ContentType: ContentTypeDiagnosticCommand,
		MessageId: diagPrefix + req.Id, CreatedAt: timestamppb.New(now), ExpiresAt: timestamppb.New(time.UnixMilli(req.ExpiresMs))}
	if lr.Device != "" {
		ev.Business, ev.Dimension, ev.Targets = BusinessDiagnostics.Code, oplogpb.Dimension_DIMENSION_DEVICE, []string{lr.Device}
	} else {
		ev.Business, ev.Dimension, ev.Targets = BusinessDiagnosticsUser.Code, oplogpb.Dimension_DIMENSION_USER, []string{lr.User}
	}
	if _, err := d.cfg.Log.Append(ctx, ev); err != nil {
		// No device got the command: the request never existed.
		if derr := d.kv.Purge(context.WithoutCancel(ctx), req.Id); derr != nil {
			d.lg.Warn().Err(derr).Str("request", req.Id).Msg("removing an unsent request failed")
		}
		return nil, fmt.Errorf("diagnostics: request %s: %w", req.Id, err)
	}
	d.lg.Info().Str("request", req.Id).Str("device", lr.Device).Str("user", lr.User).Str("actor", actor).Msg("logs requested")
	return req, nil
}

// Get returns a request with its uploads. Errors: oplog.ErrNotFound.
func (d *Diagnostics) Get(ctx context.Context, id string) (*analyticspb.DiagnosticRequest, error) {
	req, _, err := d.load(ctx, id)
	if err != nil {
		return nil, err
	}
	settle(req, d.cfg.Now())
	return req, nil
}

// List returns the newest requests first, at most limit (default 100,
// at most MaxListRequests).
func (d *Diagnostics) List(ctx context.Context, limit int) ([]*analyticspb.DiagnosticRequest, error) {
	if limit <= 0 {
		limit = 100
	}
	limit = min(limit, MaxListRequests)
	w, err := d.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("diagnostics: listing: %v: %w", err, oplog.ErrUnavailable)
	}
	defer func() { _ = w.Stop() }()
	now := d.cfg.Now()
	var out []*analyticspb.DiagnosticRequest
	for {
		var e jetstream.KeyValueEntry
		select {
		case e = <-w.Updates():
		case <-ctx.Done():
			return nil, fmt.Errorf("diagnostics: listing: %v: %w", ctx.Err(), oplog.ErrUnavailable)
		}
		if e == nil {
			break // the initial values are all in
		}
		req := &analyticspb.DiagnosticRequest{}
		if err := proto.Unmarshal(e.Value(), req); err != nil {
			d.lg.Warn().Err(err).Str("request", e.Key()).Msg("unreadable diagnostic request skipped")
			continue
		}
		settle(req, now)
		out = append(out, req)
	}
	slices.SortFunc(out, func(a, b *analyticspb.DiagnosticRequest) int {
		return cmp.Or(cmp.Compare(b.CreatedMs, a.CreatedMs), strings.Compare(a.Id, b.Id))
	})
	if len(out) > limit {
		out = out[:limit]
	}
	return out, nil
}

// Logs opens the logs a device uploaded for a request, with the upload's
// record (size, SHA-256). The caller closes the reader. Errors:
// oplog.ErrNotFound (no such request, nothing uploaded by that device,
// or the logs aged out), oplog.ErrUnavailable.
func (d *Diagnostics) Logs(ctx context.Context, id, device string) (io.ReadCloser, *analyticspb.DiagnosticUpload, error) {
	req, _, err := d.load(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	i := slices.IndexFunc(req.Uploads, func(u *analyticspb.DiagnosticUpload) bool { return u.Device == device && u.Object != "" })
	if i < 0 {
		return nil, nil, fmt.Errorf("diagnostics: request %s: no logs from device %q: %w", id, clip(device), oplog.ErrNotFound)
	}
	up := req.Uploads[i]
	r, err := d.obs.Get(ctx, up.Object)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, nil, fmt.Errorf("diagnostics: request %s: the logs of %s are gone: %w", id, device, oplog.ErrNotFound)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("diagnostics: reading logs %s: %v: %w", up.Object, err, oplog.ErrUnavailable)
	}
	return r, up, nil
}

// Upload stores the logs of a device for a request, read from r (at most
// MaxLogBytes), replacing the device's earlier upload, and returns the
// upload's record. The caller checked the device's token: who names the
// device and its user.
//
// Errors: oplog.ErrNotFound (no such request), ErrNotTarget,
// oplog.ErrExpired (the validity ended), oplog.ErrPayloadTooLarge (over
// MaxLogBytes, or an *http.MaxBytesError of r), oplog.ErrMalformed (any
// other read error of r), oplog.ErrUnavailable.
func (d *Diagnostics) Upload(ctx context.Context, id string, who Identity, r io.Reader) (*analyticspb.DiagnosticUpload, error) {
	if _, err := d.check(ctx, id, who); err != nil {
		return nil, err
	}
	return d.store(ctx, id, who, r)
}

// store is Upload once the request was checked: record checks it again
// when it adds the upload, as the request may have ended meanwhile.
func (d *Diagnostics) store(ctx context.Context, id string, who Identity, r io.Reader) (*analyticspb.DiagnosticUpload, error) {
	er := &errReader{r: io.LimitReader(r, d.cfg.MaxLogBytes+1)}
	object := id + "/" + who.Device + "/" + nuid.Next()
	info, err := d.obs.Put(ctx, jetstream.ObjectMeta{Name: object, Description: "logs of " + who.Device}, er)
	if er.err != nil {
		return nil, bodyError(er.err)
	}
	if err != nil {
		return nil, fmt.Errorf("diagnostics: storing logs %s: %v: %w", object, err, oplog.ErrUnavailable)
	}
	if int64(info.Size) > d.cfg.MaxLogBytes {
		d.deleteObject(ctx, object)
		return nil, fmt.Errorf("diagnostics: logs over %d bytes: %w", d.cfg.MaxLogBytes, oplog.ErrPayloadTooLarge)
	}
	// The object store computed the SHA-256 while storing.
	sum, err := jetstream.DecodeObjectDigest(info.Digest)
	if err != nil {
		d.deleteObject(ctx, object)
		return nil, fmt.Errorf("diagnostics: digest of %s: %v: %w", object, err, oplog.ErrUnavailable)
	}
	up := &analyticspb.DiagnosticUpload{Device: who.Device, Object: object, Size: int64(info.Size), Sha256: sum, AtMs: d.cfg.Now().UnixMilli()}
	old, err := d.record(ctx, id, who, up)
	if err != nil {
		d.deleteObject(ctx, object)
		return nil, err
	}
	if old != "" {
		d.deleteObject(ctx, old)
	}
	d.lg.Info().Str("request", id).Str("device", who.Device).Int64("size", up.Size).Bool("replaced", old != "").Msg("logs uploaded")
	return up, nil
}

// Fail records a device's report that it could not collect its logs
// (message: at most MaxFailureLen bytes, cut beyond). It is ignored when
// the device already uploaded logs. Errors: as Upload's.
func (d *Diagnostics) Fail(ctx context.Context, id string, who Identity, message string) error {
	if len(message) > MaxFailureLen {
		message = message[:MaxFailureLen]
	}
	message = strings.ToValidUTF8(message, "?")
	if message == "" {
		message = "no reason given"
	}
	up := &analyticspb.DiagnosticUpload{Device: who.Device, AtMs: d.cfg.Now().UnixMilli(), Error: message}
	if _, err := d.record(ctx, id, who, up); err != nil {
		return err
	}
	d.lg.Info().Str("request", id).Str("device", who.Device).Str("reason", clip(message)).Msg("logs not collected")
	return nil
}

// check finds a request a device may upload for now.
func (d *Diagnostics) check(ctx context.Context, id string, who Identity) (*analyticspb.DiagnosticRequest, error) {
	req, _, err := d.load(ctx, id)
	if err != nil {
		return nil, err
	}
	return req, mayUpload(req, who, d.cfg.Now())
}

// record adds up to a request with a compare-and-set on its revision,
// retrying when another upload landed meanwhile. It returns the object of
// the device's upload it replaced, if any.
func (d *Diagnostics) record(ctx context.Context, id string, who Identity, up *analyticspb.DiagnosticUpload) (string, error) {
	for {
		req, rev, err := d.load(ctx, id)
		if err != nil {
			return "", err
		}
		if err := mayUpload(req, who, d.cfg.Now()); err != nil {
			return "", err
		}
		old, changed := addUpload(req, up)
		if !changed {
			return "", nil
		}
		data, err := proto.Marshal(req)
		if err != nil {
			return "", fmt.Errorf("diagnostics: %w", err)
		}
		_, err = d.kv.Update(ctx, id, data, rev)
		if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("diagnostics: recording an upload of %s: %v: %w", id, err, oplog.ErrUnavailable)
		}
		return old, nil
	}
}

// load reads a request and its KV revision.
func (d *Diagnostics) load(ctx context.Context, id string) (*analyticspb.DiagnosticRequest, uint64, error) {
	if !oplog.ValidID(id) {
		return nil, 0, fmt.Errorf("diagnostics: request %q: %w", clip(id), oplog.ErrNotFound)
	}
	e, err := d.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, fmt.Errorf("diagnostics: request %s: %w", id, oplog.ErrNotFound)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("diagnostics: reading request %s: %v: %w", id, err, oplog.ErrUnavailable)
	}
	req := &analyticspb.DiagnosticRequest{}
	if err := proto.Unmarshal(e.Value(), req); err != nil {
		return nil, 0, fmt.Errorf("diagnostics: request %s: %w", id, err)
	}
	return req, e.Revision(), nil
}

func (d *Diagnostics) deleteObject(ctx context.Context, name string) {
	if err := d.obs.Delete(context.WithoutCancel(ctx), name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		d.lg.Warn().Err(err).Str("object", name).Msg("deleting unused logs failed")
	}
}

// mayUpload says whether the device who may upload for req at now.
func mayUpload(req *analyticspb.DiagnosticRequest, who Identity, now time.Time) error {
	switch {
	case req.Device != "" && who.Device != req.Device:
		return fmt.Errorf("diagnostics: request %s is for another device: %w", req.Id, ErrNotTarget)
	case req.User != "" && who.User != req.User:
		return fmt.Errorf("diagnostics: request %s is for the devices of another user: %w", req.Id, ErrNotTarget)
	case now.UnixMilli() >= req.ExpiresMs:
		return fmt.Errorf("diagnostics: request %s ended at %s: %w", req.Id, time.UnixMilli(req.ExpiresMs).UTC().Format(time.RFC3339), oplog.ErrExpired)
	}
	return nil
}

// addUpload puts up in req, in place of the same device's earlier upload,
// and updates the status. A failure report does not replace logs. It
// returns the object replaced, if any, and whether req changed.
func addUpload(req *analyticspb.DiagnosticRequest, up *analyticspb.DiagnosticUpload) (replaced string, changed bool) {
	i := slices.IndexFunc(req.Uploads, func(u *analyticspb.DiagnosticUpload) bool { return u.Device == up.Device })
	switch {
	case i < 0:
		req.Uploads = append(req.Uploads, up)
	case up.Error != "" && req.Uploads[i].Object != "":
		return "", false
	default:
		replaced = req.Uploads[i].Object
		req.Uploads[i] = up
	}
	req.Status = analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_FAILED
	for _, u := range req.Uploads {
		if u.Object != "" {
			req.Status = analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_UPLOADED
		}
	}
	return replaced, true
}

// settle sets the status a request has at now: a request still waiting
// past its validity is EXPIRED.
func settle(req *analyticspb.DiagnosticRequest, now time.Time) {
	if req.Status == analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_REQUESTED && now.UnixMilli() >= req.ExpiresMs {
		req.Status = analyticspb.DiagnosticStatus_DIAGNOSTIC_STATUS_EXPIRED
	}
}

// bodyError types an upload body's read error.
func bodyError(err error) error {
	if tooBig := (*http.MaxBytesError)(nil); errors.As(err, &tooBig) {
		return fmt.Errorf("diagnostics: body over %d bytes: %w", tooBig.Limit, oplog.ErrPayloadTooLarge)
	}
	return fmt.Errorf("diagnostics: reading the body: %v: %w", err, oplog.ErrMalformed)
}

// errReader keeps the underlying reader's error (other than EOF), to
// tell a bad body from a store that failed.
type errReader struct {
	r   io.Reader
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		e.err = err
	}
	return n, err
}

// UploadHandler serves devices' answers to diagnostic requests on the
// gateway's listener, mounted at URLPrefix:
//
//	POST /v1/diagnostics/<id>/logs      body: the logs (any bytes, at most MaxLogBytes)
//	POST /v1/diagnostics/<id>/failure   body: why there are none (text, at most MaxFailureLen)
//	Authorization: Bearer <device token>
//
// Stored logs are answered 200 with their record (DiagnosticUpload,
// protojson), a recorded failure 204. Refusals: 400 (a body cut short),
// 401 (token), 403 (the request is for another device or user), 404 (no
// such request), 405, 410 (the validity ended), 413 (a Content-Length
// over the limit is refused before the body is read; a longer body is cut
// and refused), 503 (storage unavailable: retry).
func (d *Diagnostics) UploadHandler(auth Authenticator) http.Handler {
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
		id, what, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, d.cfg.URLPrefix), "/")
		if !ok || (what != "logs" && what != "failure") || !oplog.ValidID(id) {
			httpError(w, http.StatusNotFound, oplogpb.ErrorCode_ERROR_CODE_NOT_FOUND, "want POST "+d.cfg.URLPrefix+"<request>/logs or .../failure")
			return
		}
		limit := d.cfg.MaxLogBytes
		if what == "failure" {
			limit = MaxFailureLen
		}
		// Refuse what cannot be stored before reading the body: a request
		// that is not this device's, or a body announced too big.
		if _, err := d.check(r.Context(), id, who); err != nil {
			d.refuse(w, r, who, id, err)
			return
		}
		if r.ContentLength > limit {
			d.refuse(w, r, who, id, fmt.Errorf("diagnostics: body of %d bytes, at most %d: %w", r.ContentLength, limit, oplog.ErrPayloadTooLarge))
			return
		}
		body := http.MaxBytesReader(w, r.Body, limit)
		if what == "failure" {
			msg, err := io.ReadAll(body)
			if err != nil {
				err = bodyError(err)
			} else {
				err = d.Fail(r.Context(), id, who, string(msg))
			}
			if err != nil {
				d.refuse(w, r, who, id, err)
				return
			}
			w.WriteHeader(http.StatusNoContent)
			return
		}
		up, err := d.store(r.Context(), id, who, body) // checked above
		if err != nil {
			d.refuse(w, r, who, id, err)
			return
		}
		writeProtoJSON(w, up)
	})
}

// refuse answers an upload's error with its HTTP status.
func (d *Diagnostics) refuse(w http.ResponseWriter, r *http.Request, who Identity, id string, err error) {
	status, msg := http.StatusServiceUnavailable, err.Error()
	switch {
	case errors.Is(err, oplog.ErrNotFound):
		status = http.StatusNotFound
	case errors.Is(err, ErrNotTarget):
		status = http.StatusForbidden
	case errors.Is(err, oplog.ErrExpired):
		status = http.StatusGone
	case errors.Is(err, oplog.ErrPayloadTooLarge):
		status = http.StatusRequestEntityTooLarge
	case errors.Is(err, oplog.ErrMalformed), r.Context().Err() != nil:
		status = http.StatusBadRequest // a body cut short, a device gone mid-upload
	case errors.Is(err, oplog.ErrUnavailable):
	default:
		status, msg = http.StatusInternalServerError, "internal error"
	}
	ev := d.lg.Info()
	if status >= 500 {
		ev = d.lg.Error()
	}
	ev.Err(err).Str("request", id).Str("device", who.Device).Str("remote", r.RemoteAddr).Int("status", status).Msg("diagnostic upload refused")
	code := oplog.CodeOf(err)
	if status == http.StatusForbidden {
		code = 0 // not one of the oplog's codes
	}
	httpError(w, status, code, msg)
}

func writeProtoJSON(w http.ResponseWriter, m proto.Message) {
	out, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		httpError(w, http.StatusInternalServerError, oplogpb.ErrorCode_ERROR_CODE_INTERNAL, "internal error")
		return
	}
	w.Header().Set("Content-Type", oplog.ContentTypeJSON)
	_, _ = w.Write(out)
}
