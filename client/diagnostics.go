package client

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/sluicehq/sluice/analytics/analyticspb"
	"google.golang.org/protobuf/encoding/protojson"
)

// Diagnostic commands: the server's analytics package sends them (kind 5,
// command) on these businesses, to one device or to every device of a
// user.
const (
	BusinessDiagnostics     = "diag"
	BusinessDiagnosticsUser = "diag-user"
	// ContentTypeDiagnosticCommand is the content type of a diagnostic
	// command's payload (a DiagnosticCommand of
	// analytics/analyticspb/diagnostics.proto, as protojson).
	ContentTypeDiagnosticCommand = "application/vnd.sluice.diagnostic+json"
)

// Upload retries of a diagnostic command: diagnosticAttempts tries, the
// n-th retry after diagnosticRetryWait·2ⁿ⁻¹ (tests shorten it).
var (
	diagnosticAttempts  = 4
	diagnosticRetryWait = time.Second
)

// maxFailureText bounds the failure text reported to the server (its
// limit).
const maxFailureText = 1024

// LogCollector returns a device's logs for a diagnostic request, as the
// bytes to upload (any format: the server stores them as they are).
type LogCollector func(ctx context.Context, requestID string) ([]byte, error)

// HandleDiagnostics sets the handler of diagnostic commands (the
// businesses BusinessDiagnostics and BusinessDiagnosticsUser): for each,
// collect is called with the request id, and what it returns is uploaded
// (POST to the command's upload path on the HTTP base, with the token of
// Config.Token). Logs over the command's max_bytes are cut to their last
// max_bytes bytes (the newest lines, for logs appended to). When collect
// fails, its error text is reported to the server instead (the request
// shows FAILED).
//
// An upload that fails (network, 5xx, 401 or 429) is retried a few times
// with growing waits, within the command's validity. The item is
// processed (acked) once the upload is stored, when the command expired,
// or when the server refuses it for good (403, 404, 410, 413: logged); if
// the retries run out first, the handler fails, so the link reconnects
// and the command comes again. Like every handler it runs on Run's
// goroutine: items of other businesses wait meanwhile. Without an HTTP
// base (tcp:// URLs and no Config.HTTPBase) nothing can be uploaded: the
// command is logged and dropped.
func (c *Client) HandleDiagnostics(collect LogCollector) {
	h := func(ctx context.Context, it *Item) error { return c.diagnose(ctx, it, collect) }
	c.Handle(BusinessDiagnostics, h)
	c.Handle(BusinessDiagnosticsUser, h)
}

// diagnose answers one diagnostic command.
func (c *Client) diagnose(ctx context.Context, it *Item, collect LogCollector) error {
	cmd := &analyticspb.DiagnosticCommand{}
	err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(it.Payload, cmd)
	if err != nil || cmd.RequestId == "" || cmd.UploadUrl == "" {
		// It cannot get better by coming again.
		c.log.Warn().Err(err).Str("business", it.Business).Uint64("id", it.Id).Msg("diagnostic command unreadable: dropped")
		return nil
	}
	maxBytes, expires := cmd.MaxBytes, cmd.ExpiresMs
	log := c.log.With().Str("request", cmd.RequestId).Logger()
	base := c.httpBase()
	if base == "" {
		log.Error().Err(ErrNoHTTP).Msg("diagnostic command dropped")
		return nil
	}
	u, sameHost, err := uploadURL(base, cmd.UploadUrl)
	if err != nil {
		log.Warn().Err(err).Msg("diagnostic command dropped")
		return nil
	}
	body, contentType := []byte(nil), "application/octet-stream"
	logs, err := collect(ctx, cmd.RequestId)
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case err != nil:
		failure, ok := strings.CutSuffix(u, "/logs")
		if !ok {
			log.Warn().Err(err).Msg("logs not collected, and nowhere to report it")
			return nil
		}
		u, body, contentType = failure+"/failure", []byte(err.Error()), "text/plain; charset=utf-8"
		if len(body) > maxFailureText {
			body = body[:maxFailureText]
		}
	default:
		body = logs
		if maxBytes > 0 && int64(len(body)) > maxBytes {
			log.Info().Int("size", len(body)).Int64("max", maxBytes).Msg("logs cut to their end")
			body = body[int64(len(body))-maxBytes:]
		}
	}
	var last error
	for attempt := range diagnosticAttempts {
		if attempt > 0 {
			wait := diagnosticRetryWait << (attempt - 1)
			if expires > 0 && time.Now().Add(c.serverOffset()+wait).UnixMilli() >= expires {
				log.Info().Err(last).Msg("diagnostic command expires before its next try: dropped")
				return nil
			}
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
		}
		retry, err := c.postDiagnostic(ctx, u, sameHost, contentType, body)
		if err == nil {
			log.Debug().Int("size", len(body)).Msg("diagnostic answered")
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !retry {
			log.Warn().Err(err).Msg("diagnostic refused by the server: dropped")
			return nil
		}
		last = err
	}
	return fmt.Errorf("diagnostic %s: %w", cmd.RequestId, last)
}

// postDiagnostic sends one upload. It reports whether a failure may
// succeed if retried.
func (c *Client) postDiagnostic(ctx context.Context, u string, withToken bool, contentType string, body []byte) (retry bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	req.Header.Set("Content-Type", contentType)
	if withToken {
		token, err := c.cfg.Token(ctx)
		if err != nil {
			return true, fmt.Errorf("token: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.httpc.Do(req)
	if err != nil {
		return true, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		return false, nil
	}
	err = fmt.Errorf("%s: %s", resp.Status, snippet(resp.Body))
	switch resp.StatusCode {
	case http.StatusUnauthorized, http.StatusRequestTimeout, http.StatusTooManyRequests:
		return true, err
	}
	return resp.StatusCode >= 500, err
}

// serverOffset is the server's clock minus ours, from the last Welcome.
func (c *Client) serverOffset() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.offset
}

// uploadURL resolves a command's upload path against the HTTP base; an
// absolute URL is taken as is, and gets the token only on the base's
// scheme and host.
func uploadURL(base, ref string) (u string, withToken bool, err error) {
	if strings.HasPrefix(ref, "/") && !strings.HasPrefix(ref, "//") {
		return base + ref, true, nil
	}
	abs, err := url.Parse(ref)
	if err != nil || (abs.Scheme != "http" && abs.Scheme != "https") || abs.Host == "" {
		return "", false, fmt.Errorf("upload url %q: want a path or an http(s) URL", ref)
	}
	b, err := url.Parse(base)
	return ref, err == nil && b.Scheme == abs.Scheme && b.Host == abs.Host, nil
}
