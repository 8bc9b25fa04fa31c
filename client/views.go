package client

import (
	"context"
	"crypto/ed25519"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/sluicehq/sluice/delivery/deliverypb"
	"google.golang.org/protobuf/proto"
)

// View is what the server tells the device of switches and releases
// (PROTOCOL.md §4.11), after the client checked it. Each view replaces the
// previous one whole. A View and what it holds are shared: do not modify
// them.
type View struct {
	// Digest identifies the view; the client presents it in its Hello and
	// its update checks, and is sent a view only when the device's differs.
	Digest string
	// Switches are the device's switch values, by key.
	Switches map[string]*deliverypb.SwitchValue
	// Releases are the manifests, one per package, whose server signature
	// verified with Config.ManifestKeys, in the server's order (by
	// package). CheckInstall says whether to install one.
	Releases []*deliverypb.Manifest
	// Rejected is how many of the view's manifests were dropped: signed by
	// no trusted key, a bad signature, or unreadable.
	Rejected int
}

// ViewHandler is told of each new view: on Run's goroutine for a View
// frame, on the caller's for CheckUpdates (see HandleView).
type ViewHandler func(ctx context.Context, v *View)

// viewFile is the name of the view file in Config.StateDir: the last
// View as received (protobuf), signatures included.
const viewFile = "view.pb"

// maxViewBytes bounds a view read over HTTP.
const maxViewBytes = 16 << 20

// contentProto is the media type of protobuf bodies.
const contentProto = "application/x-protobuf"

// HandleView sets the function told of each view the client applies,
// replacing any: after it is verified and persisted, so that Switch,
// SwitchBool and the like, and Releases, already answer from it. Calls
// never overlap and the last one has the newest view: a view applied
// while the function runs (a View frame on Run's goroutine, CheckUpdates
// on another) makes the running call's goroutine call it again once it
// returns, and the other returns at once. The function may call any
// method of the Client; it should be quick, as a View frame's call holds
// up the items behind it.
func (c *Client) HandleView(h ViewHandler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.onView = h
}

// View returns the view the client holds: the last one applied, or the
// one persisted in StateDir; nil if none.
func (c *Client) View() *View {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.view
}

// Switch returns the value of switch key in the view the client holds
// (a copy), or ok false when it has no such switch.
func (c *Client) Switch(key string) (sv *deliverypb.SwitchValue, ok bool) {
	c.mu.Lock()
	v := c.view
	c.mu.Unlock()
	if v == nil {
		return nil, false
	}
	if sv, ok = v.Switches[key]; !ok {
		return nil, false
	}
	return proto.Clone(sv).(*deliverypb.SwitchValue), true
}

// value returns the value of switch key, nil if none.
func (c *Client) value(key string) *deliverypb.Value {
	c.mu.Lock()
	v := c.view
	c.mu.Unlock()
	if v == nil {
		return nil
	}
	return v.Switches[key].GetValue()
}

// SwitchBool returns the value of bool switch key, or def when the view
// has no such switch or its value is of another type.
func (c *Client) SwitchBool(key string, def bool) bool {
	if k, ok := c.value(key).GetKind().(*deliverypb.Value_BoolValue); ok {
		return k.BoolValue
	}
	return def
}

// SwitchString returns the value of string switch key, or def when the
// view has no such switch or its value is of another type (JSON values
// included: see Switch).
func (c *Client) SwitchString(key string, def string) string {
	if k, ok := c.value(key).GetKind().(*deliverypb.Value_StringValue); ok {
		return k.StringValue
	}
	return def
}

// SwitchInt returns the value of int switch key, or def when the view
// has no such switch or its value is of another type.
func (c *Client) SwitchInt(key string, def int64) int64 {
	if k, ok := c.value(key).GetKind().(*deliverypb.Value_IntValue); ok {
		return k.IntValue
	}
	return def
}

// SwitchNumber returns the value of number switch key, or def when the
// view has no such switch or its value is of another type (an int
// switch's included).
func (c *Client) SwitchNumber(key string, def float64) float64 {
	if k, ok := c.value(key).GetKind().(*deliverypb.Value_NumberValue); ok {
		return k.NumberValue
	}
	return def
}

// Releases returns the verified manifests of the view the client holds
// (copies), one per package.
func (c *Client) Releases() []*deliverypb.Manifest {
	c.mu.Lock()
	v := c.view
	c.mu.Unlock()
	if v == nil {
		return nil
	}
	out := make([]*deliverypb.Manifest, len(v.Releases))
	for i, m := range v.Releases {
		out[i] = proto.Clone(m).(*deliverypb.Manifest)
	}
	return out
}

// viewDigest returns the digest of the view the client holds, "" if none.
func (c *Client) viewDigest() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.view == nil {
		return ""
	}
	return c.view.Digest
}

// applyView checks a view the server sent, persists it, makes it the
// client's and tells the view handler. Releases that do not verify are
// dropped; the rest of the view applies.
func (c *Client) applyView(ctx context.Context, raw *deliverypb.View) *View {
	c.viewMu.Lock()
	v := c.checkView(raw, true)
	if b, err := proto.Marshal(raw); err != nil {
		c.log.Error().Err(err).Msg("view not persisted")
	} else if err := writeFileAtomic(c.cfg.StateDir, viewFile, b); err != nil {
		// The view still applies; after a restart the older one persisted
		// is presented, and the server sends this one again.
		c.log.Error().Err(err).Msg("view not persisted")
	}
	c.mu.Lock()
	c.view = v
	c.stats.Views++
	c.stats.ManifestsRejected += int64(v.Rejected)
	c.mu.Unlock()
	c.viewMu.Unlock()
	c.log.Debug().Str("digest", v.Digest).Int("switches", len(v.Switches)).Int("releases", len(v.Releases)).Msg("view applied")
	c.notifyView(ctx)
	return v
}

// notifyView calls the view handler with the client's view, unless a call
// is under way: that call's goroutine then calls it again when it returns.
func (c *Client) notifyView(ctx context.Context) {
	c.mu.Lock()
	if c.viewBusy {
		c.viewPending = true
		c.mu.Unlock()
		return
	}
	c.viewBusy = true
	for {
		c.viewPending = false
		h, v := c.onView, c.view
		c.mu.Unlock()
		if h != nil {
			c.callView(ctx, h, v)
		}
		c.mu.Lock()
		if !c.viewPending {
			c.viewBusy = false
			c.mu.Unlock()
			return
		}
	}
}

// callView calls h; if h panics, it clears viewBusy on the way out, so
// that a later view is still told.
func (c *Client) callView(ctx context.Context, h ViewHandler, v *View) {
	returned := false
	defer func() {
		if !returned {
			c.mu.Lock()
			c.viewBusy = false
			c.mu.Unlock()
		}
	}()
	h(ctx, v)
	returned = true
}

// checkView verifies raw's manifests with the trusted keys and returns the
// view; rejected manifests are logged when logRejects is set.
func (c *Client) checkView(raw *deliverypb.View, logRejects bool) *View {
	v := &View{Digest: raw.GetDigest(), Switches: make(map[string]*deliverypb.SwitchValue, len(raw.GetSwitches()))}
	for _, sv := range raw.GetSwitches() {
		if sv.GetKey() != "" {
			v.Switches[sv.Key] = sv
		}
	}
	for _, sm := range raw.GetReleases() {
		m, err := verifyManifest(sm, c.cfg.ManifestKeys)
		if err != nil {
			v.Rejected++
			if logRejects {
				c.log.Warn().Err(err).Str("key_id", sm.GetKeyId()).Msg("release manifest rejected")
			}
			continue
		}
		v.Releases = append(v.Releases, m)
	}
	return v
}

// verifyManifest checks a signed manifest against the trusted keys (the
// key named by key_id: hex of its first 8 bytes) and returns the
// manifest. It judges neither expiry nor serial: CheckInstall does.
func verifyManifest(sm *deliverypb.SignedManifest, keys []ed25519.PublicKey) (*deliverypb.Manifest, error) {
	if len(sm.GetSignature()) != ed25519.SignatureSize {
		return nil, fmt.Errorf("client: manifest without a signature: %w", ErrSignature)
	}
	named := false
	for _, k := range keys {
		if len(k) != ed25519.PublicKeySize || hex.EncodeToString(k[:8]) != sm.KeyId {
			continue
		}
		named = true
		if !ed25519.Verify(k, sm.Manifest, sm.Signature) {
			continue
		}
		m := &deliverypb.Manifest{}
		if err := proto.Unmarshal(sm.Manifest, m); err != nil {
			return nil, fmt.Errorf("client: signed manifest unreadable: %v", err)
		}
		if m.Package == "" || m.Version == "" {
			return nil, errors.New("client: signed manifest without package or version")
		}
		return m, nil
	}
	if !named {
		return nil, fmt.Errorf("client: manifest signed by key %q, not a trusted one: %w", sm.KeyId, ErrSignature)
	}
	return nil, fmt.Errorf("client: manifest signature of key %s: %w", sm.KeyId, ErrSignature)
}

// loadView loads the view persisted in StateDir, if any. A file that
// cannot be read is ignored (logged): the client then presents no digest
// and the server sends the view again.
func (c *Client) loadView() {
	removeTemps(c.cfg.StateDir, viewFile)
	b, err := os.ReadFile(filepath.Join(c.cfg.StateDir, viewFile))
	if errors.Is(err, fs.ErrNotExist) {
		return
	}
	raw := &deliverypb.View{}
	if err == nil {
		err = proto.Unmarshal(b, raw)
	}
	if err != nil {
		c.log.Warn().Err(err).Msg("persisted view ignored")
		return
	}
	// Keys may have changed since: verify again. Its rejects were counted
	// when it arrived.
	c.view = c.checkView(raw, false)
}

// CheckUpdates asks the server for the device's view over HTTP
// (GET /v1/updates with the client's attributes, the token of
// Config.Token and the digest of the view held as If-None-Match), for
// apps that do not keep a link up. An unchanged view (304) returns the
// view held; a new one is handled as a View frame (verified, persisted,
// HandleView's function told) and returned. It needs an HTTP base
// (ErrNoHTTP) but not Run.
func (c *Client) CheckUpdates(ctx context.Context) (*View, error) {
	base := c.httpBase()
	if base == "" {
		return nil, ErrNoHTTP
	}
	token, err := c.cfg.Token(ctx)
	if err != nil {
		return nil, fmt.Errorf("client: token: %w", err)
	}
	a := c.attrs
	q := url.Values{}
	for _, f := range []struct{ name, v string }{
		{"app_version", a.AppVersion}, {"os", a.Os}, {"os_version", a.OsVersion}, {"model", a.Model},
		{"region", a.Region}, {"network", a.Network}, {"channel", a.Channel}, {"cpu", a.Cpu},
	} {
		if f.v != "" {
			q.Set(f.name, f.v)
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v1/updates?"+q.Encode(), nil)
	if err != nil {
		return nil, fmt.Errorf("client: updates: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Accept", contentProto)
	held := c.View()
	if held != nil && held.Digest != "" {
		req.Header.Set("If-None-Match", `"`+held.Digest+`"`)
	}
	resp, err := c.httpc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("client: updates: %w", err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNotModified:
		if held == nil {
			return nil, errors.New("client: updates: 304 without a view held")
		}
		return held, nil
	case http.StatusOK:
	default:
		return nil, fmt.Errorf("client: updates: %s: %s", resp.Status, snippet(resp.Body))
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxViewBytes+1))
	if err != nil {
		return nil, fmt.Errorf("client: updates: %w", err)
	}
	if len(b) > maxViewBytes {
		return nil, fmt.Errorf("client: updates: view over %d bytes", maxViewBytes)
	}
	raw := &deliverypb.View{}
	if err := proto.Unmarshal(b, raw); err != nil {
		return nil, fmt.Errorf("client: updates: %v", err)
	}
	return c.applyView(ctx, raw), nil
}

// httpBase returns the base URL of the gateway's HTTP endpoints, "" if
// none is known.
func (c *Client) httpBase() string {
	if c.cfg.HTTPBase != "" {
		return c.cfg.HTTPBase
	}
	c.mu.Lock()
	last := c.httpLast
	c.mu.Unlock()
	if last != "" {
		return last
	}
	for _, e := range c.endpoints {
		if e.http != "" {
			return e.http
		}
	}
	return ""
}

// snippet returns the start of an error body, for messages.
func snippet(r io.Reader) string {
	b, _ := io.ReadAll(io.LimitReader(r, 256))
	return strings.TrimSpace(string(b))
}
