package oplog

import (
	"errors"

	"github.com/sluicehq/sluice/oplog/oplogpb"
)

// Sentinel errors. Callers branch on them with errors.Is; each maps to one
// wire code of oplogpb.ErrorCode (see CodeOf).
var (
	// ErrMalformed: the body does not decode as protobuf or JSON.
	ErrMalformed = errors.New("oplog: malformed event")
	// ErrUnknownKind: the kind is missing or not one this API accepts.
	ErrUnknownKind = errors.New("oplog: unknown kind")
	// ErrUnknownBusiness: the business code is not registered.
	ErrUnknownBusiness = errors.New("oplog: unknown business")
	// ErrInvalidID: a target, business or message id is outside its alphabet.
	ErrInvalidID = errors.New("oplog: invalid id")
	// ErrPayloadTooLarge: the payload exceeds Config.MaxPayload.
	ErrPayloadTooLarge = errors.New("oplog: payload too large")
	// ErrExpired: the validity period ended before the event arrived.
	ErrExpired = errors.New("oplog: validity period already over")
	// ErrTooManyTargets: more targets than Config.MaxTargets.
	ErrTooManyTargets = errors.New("oplog: too many targets")
	// ErrNoTargets: an event without a target.
	ErrNoTargets = errors.New("oplog: no targets")
	// ErrInvalid: any other invalid field.
	ErrInvalid = errors.New("oplog: invalid event")
	// ErrUnavailable: the log could not be written now; the producer may retry
	// with the same message id.
	ErrUnavailable = errors.New("oplog: unavailable")
	// ErrEpochMismatch: a sync point or ack names an epoch the stream no
	// longer has: the client must resync from scratch.
	ErrEpochMismatch = errors.New("oplog: epoch mismatch")
	// ErrUnknownTopic: the topic was never created, or was deleted.
	ErrUnknownTopic = errors.New("oplog: unknown topic")
	// ErrNotFound: the named object (a job, a bucket, ...) does not exist.
	ErrNotFound = errors.New("oplog: not found")
	// ErrConflict: the object changed since the caller read it (an
	// expected version did not hold), or the operation is not allowed in
	// its current state (a release that is not gray cannot go full).
	ErrConflict = errors.New("oplog: conflict")
	// ErrSignature: a required signature is missing or does not verify.
	ErrSignature = errors.New("oplog: bad signature")
)

var codes = []struct {
	err  error
	code oplogpb.ErrorCode
}{
	{ErrMalformed, oplogpb.ErrorCode_ERROR_CODE_MALFORMED},
	{ErrUnknownKind, oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_KIND},
	{ErrUnknownBusiness, oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_BUSINESS},
	{ErrInvalidID, oplogpb.ErrorCode_ERROR_CODE_INVALID_ID},
	{ErrPayloadTooLarge, oplogpb.ErrorCode_ERROR_CODE_PAYLOAD_TOO_LARGE},
	{ErrExpired, oplogpb.ErrorCode_ERROR_CODE_EXPIRED},
	{ErrTooManyTargets, oplogpb.ErrorCode_ERROR_CODE_TOO_MANY_TARGETS},
	{ErrNoTargets, oplogpb.ErrorCode_ERROR_CODE_NO_TARGETS},
	{ErrInvalid, oplogpb.ErrorCode_ERROR_CODE_INVALID},
	{ErrUnavailable, oplogpb.ErrorCode_ERROR_CODE_UNAVAILABLE},
	{ErrUnknownTopic, oplogpb.ErrorCode_ERROR_CODE_UNKNOWN_TOPIC},
	{ErrNotFound, oplogpb.ErrorCode_ERROR_CODE_NOT_FOUND},
	{ErrConflict, oplogpb.ErrorCode_ERROR_CODE_CONFLICT},
	{ErrSignature, oplogpb.ErrorCode_ERROR_CODE_SIGNATURE},
}

// CodeOf returns the wire code for err: the code of the sentinel it wraps,
// or ERROR_CODE_INTERNAL.
func CodeOf(err error) oplogpb.ErrorCode {
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return oplogpb.ErrorCode_ERROR_CODE_INTERNAL
}

// ErrorPB converts err into its wire form. Internal errors carry no detail.
func ErrorPB(err error) *oplogpb.Error {
	code := CodeOf(err)
	msg := err.Error()
	if code == oplogpb.ErrorCode_ERROR_CODE_INTERNAL {
		msg = "internal error"
	}
	return &oplogpb.Error{Code: code, Message: msg}
}

// RemoteError is an error answered by the producer API. It unwraps to the
// sentinel of its code, so errors.Is works on both sides of the wire.
type RemoteError struct {
	Code    oplogpb.ErrorCode
	Message string
}

func (e *RemoteError) Error() string { return e.Message }

// Unwrap returns the sentinel of e.Code, or nil for internal errors.
func (e *RemoteError) Unwrap() error {
	for _, c := range codes {
		if c.code == e.Code {
			return c.err
		}
	}
	return nil
}

// ErrorFromPB turns a wire error into a *RemoteError, or nil.
func ErrorFromPB(e *oplogpb.Error) error {
	if e == nil || e.Code == oplogpb.ErrorCode_ERROR_CODE_UNSPECIFIED {
		return nil
	}
	return &RemoteError{Code: e.Code, Message: e.Message}
}
