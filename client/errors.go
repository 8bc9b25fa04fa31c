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
	// ErrBadState: the sync point file in Config.StateDir cannot be decoded.
	// Removing it makes the client start over from the sync points the
	// server recorded for the device.
	ErrBadState = errors.New("client: bad state file")
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
