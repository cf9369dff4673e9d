package client

import (
	"errors"
	"fmt"
	"time"
)

var (
	// ErrUnauthorized reports that the server refused the device's
	// credential (wrong, or the device was removed). Run stops for good
	// with an error wrapping it; nothing a retry can fix.
	ErrUnauthorized = errors.New("courier: unauthorized: the server refused this device's credential")

	// ErrSuperseded reports that another connection of this same device
	// took over. Run returns an error wrapping it rather than fight the
	// other connection for the device.
	ErrSuperseded = errors.New("courier: superseded: this device connected again elsewhere")

	// ErrNotConnected is returned by operations that only make sense on a
	// live connection (SetTyping) while Run is not connected.
	ErrNotConnected = errors.New("courier: not connected")

	// ErrClosed is returned by operations on a Client after Close.
	ErrClosed = errors.New("courier: client closed")
)

// Error codes the server uses, in HTTP error bodies and (mapped from the
// protocol's enums) in WebSocket replies. RefusedError.Code is one of them.
// The table is in docs/protocol.md.
const (
	CodeInvalid            = "invalid"
	CodeInvalidName        = "invalid_name"
	CodeUnauthorized       = "unauthorized"
	CodeUnknownUser        = "unknown_user"
	CodeUnknownRecipient   = "unknown_recipient"
	CodeNameTaken          = "name_taken"
	CodeStaleDevices       = "stale_devices"
	CodeStaleGroup         = "stale_group"
	CodeNotMember          = "not_member"
	CodePayloadTooLarge    = "payload_too_large"
	CodeRateLimited        = "rate_limited"
	CodeStorageUnavailable = "storage_unavailable"
	CodeShuttingDown       = "shutting_down"
	CodeOverloaded         = "overloaded"
	CodeInternal           = "internal"

	// Codes for why the server closed a connection (WebSocket only).
	CodeSuperseded   = "superseded"
	CodeSlowConsumer = "slow_consumer"
	CodeIdleTimeout  = "idle_timeout"
)

// RefusedError is the server's "no", with the stable code it gave. Find it
// with errors.As:
//
//	var re *client.RefusedError
//	if errors.As(err, &re) && re.Code == client.CodeUnknownRecipient { … }
type RefusedError struct {
	Code    string
	Message string
	// Status is the HTTP status when the answer came over HTTP, else 0.
	Status int
	// RetryAfter is the server's hint for transient refusals.
	RetryAfter time.Duration
	// Devices holds, for stale_devices, the current device ids per user.
	Devices map[string][]uint32
	// GroupVersion is, for stale_group, the group's current membership
	// version.
	GroupVersion uint64
}

// Error returns the code and the server's message.
func (e *RefusedError) Error() string {
	if e.Message == "" {
		return "courier: refused: " + e.Code
	}
	return fmt.Sprintf("courier: refused (%s): %s", e.Code, e.Message)
}

// Is makes errors.Is(err, ErrUnauthorized) and errors.Is(err,
// ErrSuperseded) true for the refusals with those codes.
func (e *RefusedError) Is(target error) bool {
	switch target {
	case ErrUnauthorized:
		return e.Code == CodeUnauthorized
	case ErrSuperseded:
		return e.Code == CodeSuperseded
	}
	return false
}

// Temporary reports whether the same request may succeed later: the
// server was busy, stopping or failing, not saying the request is wrong.
func (e *RefusedError) Temporary() bool {
	switch e.Code {
	case CodeRateLimited, CodeStorageUnavailable, CodeShuttingDown, CodeInternal,
		CodeSlowConsumer, CodeIdleTimeout:
		return true
	}
	return false
}
