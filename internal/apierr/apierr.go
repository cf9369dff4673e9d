// Package apierr writes courier's JSON errors: one shape, with a stable,
// lower-case code that clients branch on (the table is in docs/protocol.md).
package apierr

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Body is the JSON error body: {"error": {...}}.
type Body struct {
	Error Detail `json:"error"`
}

// Detail describes one error.
type Detail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	// Devices lists current device lists (stale_devices).
	Devices []UserDevices `json:"devices,omitempty"`
	// RetryAfterMs suggests when to retry (also sent as Retry-After).
	RetryAfterMs int64 `json:"retry_after_ms,omitempty"`
	// GroupVersion is the group's current version (stale_group).
	GroupVersion uint64 `json:"group_version,omitempty"`
}

// UserDevices is one user's current device ids.
type UserDevices struct {
	User    string   `json:"user"`
	Devices []uint32 `json:"devices"`
}

// Write sends an error response.
func Write(w http.ResponseWriter, status int, d Detail) {
	if d.RetryAfterMs > 0 {
		secs := (time.Duration(d.RetryAfterMs)*time.Millisecond + time.Second - 1) / time.Second
		w.Header().Set("Retry-After", strconv.FormatInt(int64(secs), 10))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(Body{Error: d})
}
