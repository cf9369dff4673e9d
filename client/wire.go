package client

import (
	"time"

	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// refusalCodes names the protocol's refusal codes as the HTTP API does.
var refusalCodes = map[courierv1.RefusalCode]string{
	courierv1.RefusalCode_REFUSAL_CODE_INVALID:             CodeInvalid,
	courierv1.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT:   CodeUnknownRecipient,
	courierv1.RefusalCode_REFUSAL_CODE_STALE_DEVICES:       CodeStaleDevices,
	courierv1.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE:   CodePayloadTooLarge,
	courierv1.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE: CodeStorageUnavailable,
	courierv1.RefusalCode_REFUSAL_CODE_SHUTTING_DOWN:       CodeShuttingDown,
	courierv1.RefusalCode_REFUSAL_CODE_RATE_LIMITED:        CodeRateLimited,
	courierv1.RefusalCode_REFUSAL_CODE_STALE_GROUP:         CodeStaleGroup,
}

// errorCodes names the protocol's error codes (the table in
// docs/protocol.md maps MALFORMED to invalid, FRAME_TOO_LARGE to
// payload_too_large).
var errorCodes = map[courierv1.ErrorCode]string{
	courierv1.ErrorCode_ERROR_CODE_MALFORMED:       CodeInvalid,
	courierv1.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE: CodePayloadTooLarge,
	courierv1.ErrorCode_ERROR_CODE_UNKNOWN_USER:    CodeUnknownUser,
	courierv1.ErrorCode_ERROR_CODE_SUPERSEDED:      CodeSuperseded,
	courierv1.ErrorCode_ERROR_CODE_SHUTTING_DOWN:   CodeShuttingDown,
	courierv1.ErrorCode_ERROR_CODE_SLOW_CONSUMER:   CodeSlowConsumer,
	courierv1.ErrorCode_ERROR_CODE_INTERNAL:        CodeInternal,
	courierv1.ErrorCode_ERROR_CODE_IDLE_TIMEOUT:    CodeIdleTimeout,
	courierv1.ErrorCode_ERROR_CODE_UNAUTHORIZED:    CodeUnauthorized,
	courierv1.ErrorCode_ERROR_CODE_RATE_LIMITED:    CodeRateLimited,
}

func refusedFromFrame(r *courierv1.Refused) *RefusedError {
	code, ok := refusalCodes[r.GetCode()]
	if !ok {
		code = CodeInvalid
	}
	re := &RefusedError{Code: code, Message: r.GetMessage(), RetryAfter: time.Duration(r.GetRetryAfterMs()) * time.Millisecond,
		GroupVersion: r.GetGroupVersion()}
	for _, ud := range r.GetDevices() {
		if re.Devices == nil {
			re.Devices = map[string][]uint32{}
		}
		re.Devices[ud.GetUser()] = ud.GetDevices()
	}
	return re
}

func errorFromFrame(e *courierv1.Error) *RefusedError {
	code, ok := errorCodes[e.GetCode()]
	if !ok {
		code = CodeInternal
	}
	return &RefusedError{Code: code, Message: e.GetMessage(), RetryAfter: time.Duration(e.GetRetryAfterMs()) * time.Millisecond}
}

func statusOf(t courierv1.ReceiptType) Status {
	switch t {
	case courierv1.ReceiptType_RECEIPT_TYPE_DELIVERED:
		return StatusDelivered
	case courierv1.ReceiptType_RECEIPT_TYPE_READ:
		return StatusRead
	}
	return StatusUnknown
}

func timeMs(ms int64) time.Time {
	if ms == 0 {
		return time.Time{}
	}
	return time.UnixMilli(ms)
}

// validUser mirrors the server's rule for user names, so that obviously
// wrong names fail before anything is queued or sent.
func validUser(name string) bool {
	if len(name) == 0 || len(name) > 32 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case (c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

// validGroupID accepts the ids the server gives groups: 1-64 bytes of
// letters, digits and -._~ (unreserved in a URL).
func validGroupID(id string) bool {
	if len(id) == 0 || len(id) > 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.', c == '~':
		default:
			return false
		}
	}
	return true
}
