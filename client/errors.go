package client

import (
	"errors"

	"github.com/sluicehq/sluice/gateway/gatewaypb"
)

// Sentinel errors. Callers branch on them with errors.Is.
var (
	// ErrUnauthenticated: the server refused the token as malformed, forged
	// or not for this device. Run returns it (as a *ServerError carrying the
	// server's message) instead of retrying a token that cannot work; an
	// expired token is not this error: Run asks Config.Token for a new one.
	ErrUnauthenticated = errors.New("client: unauthenticated")
	// ErrUnsupportedVersion: the server does not speak protocol version 1.
	// Run returns it (as a *ServerError).
	ErrUnsupportedVersion = errors.New("client: protocol version not supported by the server")
	// ErrReplaced: another link of the same device id reached the server, so
	// the server closed this one (GoAway REPLACED). Run returns it: whether
	// to reconnect, and take the link back, is the app's choice.
	ErrReplaced = errors.New("client: replaced by a newer link of the device")
	// ErrNotConnected: no link is up (Login, Logout, Foreground and
	// Background need one), or it closed while the frame was being sent.
	ErrNotConnected = errors.New("client: not connected")
	// ErrRunning: Run was called while another Run of the same Client runs.
	ErrRunning = errors.New("client: already running")
	// ErrBadState: a state file in Config.StateDir cannot be decoded. For
	// the sync point file (points.json), removing it makes the client start
	// over from the sync points the server recorded for the device; for the
	// serial file (serials.json), removing it forgets the manifest serials
	// accepted, so a replayed older manifest is no longer recognised.
	ErrBadState = errors.New("client: bad state file")

	// ErrManifestExpired: the manifest's expires_ms has passed (by the
	// server's clock as the last Welcome showed it, else the local one).
	// A fresh view brings a fresh manifest.
	ErrManifestExpired = errors.New("client: manifest expired")
	// ErrStaleManifest: the manifest's serial is below the highest serial
	// the client accepted (installed) for the package: a replayed or stale
	// manifest.
	ErrStaleManifest = errors.New("client: manifest older than the one last accepted")
	// ErrDowngrade: the manifest's version is not above the installed one,
	// and it is not a signed rollback from the installed version.
	ErrDowngrade = errors.New("client: manifest would downgrade the package")
	// ErrUpToDate: the installed version is the manifest's.
	ErrUpToDate = errors.New("client: package already at the manifest's version")
	// ErrSignature: a signature does not verify: a manifest's with the
	// trusted keys (Config.ManifestKeys), or a hot patch's producer
	// signature.
	ErrSignature = errors.New("client: signature does not verify")
	// ErrDownload: Install got no bytes matching the manifest's digest,
	// neither from Sluice (by diff or whole) nor from the fallback URL.
	ErrDownload = errors.New("client: package download failed")
	// ErrNoHTTP: the client has no HTTP base URL (Config.HTTPBase, or one
	// derived from a ws:// or wss:// URL) for CheckUpdates or a download.
	ErrNoHTTP = errors.New("client: no HTTP base URL")
)

// ServerError is an Error frame of the server. Run returns one for a
// refusal that retrying cannot cure; it unwraps to ErrUnauthenticated or
// ErrUnsupportedVersion according to its code.
type ServerError struct {
	Code    gatewaypb.Error_Code
	Message string
	Fatal   bool
}

func (e *ServerError) Error() string {
	return "client: server error " + e.Code.String() + ": " + e.Message
}

// Unwrap maps the code to this package's sentinel, if it has one.
func (e *ServerError) Unwrap() error {
	switch e.Code {
	case gatewaypb.Error_CODE_UNAUTHENTICATED:
		return ErrUnauthenticated
	case gatewaypb.Error_CODE_UNSUPPORTED_VERSION:
		return ErrUnsupportedVersion
	}
	return nil
}
