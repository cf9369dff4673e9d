package api

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/courier-im/courier/internal/apierr"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/keys"
)

// The prekey endpoints (issue 3): PUT and GET /v1/keys for the caller's own
// keys, GET /v1/keys/{user} for another user's bundles. Binary fields are
// standard base64 in JSON (encoding/json's form of []byte).

// keyStatus is the status codes of the keys service's refusals.
var keyStatus = map[string]int{
	keys.CodeInvalid:            http.StatusBadRequest,
	keys.CodeBadSignature:       http.StatusBadRequest,
	keys.CodeIdentityMismatch:   http.StatusConflict,
	keys.CodePreKeyExists:       http.StatusConflict,
	keys.CodeTooManyPreKeys:     http.StatusConflict,
	keys.CodeUnknownUser:        http.StatusNotFound,
	keys.CodeRateLimited:        http.StatusTooManyRequests,
	keys.CodeUnauthorized:       http.StatusUnauthorized,
	keys.CodeStorageUnavailable: http.StatusServiceUnavailable,
}

// keysError answers an error of the keys service: its refusal, or
// storage_unavailable for a failing store.
func (a *API) keysError(w http.ResponseWriter, r *http.Request, what string, err error) {
	var ke *keys.Error
	if errors.As(err, &ke) {
		status, ok := keyStatus[ke.Code]
		if !ok {
			status = http.StatusBadRequest
		}
		apierr.Write(w, status, apierr.Detail{Code: ke.Code, Message: ke.Message, RetryAfterMs: ke.RetryAfter.Milliseconds()})
		return
	}
	if r.Context().Err() != nil {
		return // the client has gone
	}
	a.cfg.Logger.Error(what, "err", err)
	apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot " + what + " right now",
		RetryAfterMs: keys.StorageRetryAfter.Milliseconds()})
}

type putKeysResponse struct {
	OneTimePreKeys int `json:"one_time_prekeys"`
}

func (a *API) putKeys(w http.ResponseWriter, r *http.Request, dev ident.Device) {
	var req keys.Upload
	if !a.decode(w, r, keys.MaxUploadBytes, &req) {
		return
	}
	n, err := a.cfg.Keys.Put(r.Context(), dev, &req)
	if err != nil {
		a.keysError(w, r, "store keys", err)
		return
	}
	writeJSON(w, http.StatusOK, putKeysResponse{OneTimePreKeys: n})
}

type keyStatusResponse struct {
	IdentityKey    []byte  `json:"identity_key"` // null until uploaded
	SignedPreKeyID *uint32 `json:"signed_prekey_id"`
	OneTimePreKeys int     `json:"one_time_prekeys"`
}

func (a *API) getKeys(w http.ResponseWriter, r *http.Request, dev ident.Device) {
	st, err := a.cfg.Keys.Status(r.Context(), dev)
	if err != nil {
		a.keysError(w, r, "read keys", err)
		return
	}
	resp := keyStatusResponse{IdentityKey: st.IdentityKey, OneTimePreKeys: st.OneTimePreKeys}
	if st.IdentityKey != nil {
		resp.SignedPreKeyID = &st.SignedPreKeyID
	}
	writeJSON(w, http.StatusOK, resp)
}

type bundleJSON struct {
	Device         uint32             `json:"device"`
	RegistrationID uint32             `json:"registration_id"`
	IdentityKey    []byte             `json:"identity_key"` // null: no keys uploaded
	SignedPreKey   *keys.SignedPreKey `json:"signed_prekey"`
	OneTimePreKey  *keys.PreKey       `json:"one_time_prekey"` // null: none left
}

type bundlesResponse struct {
	User    string       `json:"user"`
	Devices []bundleJSON `json:"devices"`
}

func (a *API) fetchKeys(w http.ResponseWriter, r *http.Request, by ident.Device) {
	user := r.PathValue("user")
	var device uint32
	if q := r.URL.Query(); q.Has("device") {
		id, ok := parseDeviceID(q.Get("device"))
		if !ok {
			apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: "device must be a device id (1 to 4294967295)"})
			return
		}
		device = id
	}
	bundles, err := a.cfg.Keys.Fetch(r.Context(), by, user, device)
	if err != nil {
		a.keysError(w, r, "fetch keys", err)
		return
	}
	resp := bundlesResponse{User: user, Devices: make([]bundleJSON, len(bundles))}
	for i, b := range bundles {
		resp.Devices[i] = bundleJSON{Device: b.Device, RegistrationID: b.RegistrationID, IdentityKey: b.IdentityKey}
		if spk := b.SignedPreKey; spk != nil {
			resp.Devices[i].SignedPreKey = &keys.SignedPreKey{ID: spk.ID, PublicKey: spk.PublicKey, Signature: spk.Signature}
		}
		if pk := b.OneTimePreKey; pk != nil {
			resp.Devices[i].OneTimePreKey = &keys.PreKey{ID: pk.ID, PublicKey: pk.PublicKey}
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// parseDeviceID parses a device id in canonical decimal form (no sign, no
// leading zeros), 1 to 2^32-1.
func parseDeviceID(s string) (uint32, bool) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != s {
		return 0, false
	}
	return uint32(n), true
}

// identityKeys returns the identity keys of user's devices for the device
// list, or nil (all null) when the API serves no keys.
func (a *API) identityKeys(r *http.Request, user string) (map[uint32][]byte, error) {
	if a.cfg.Keys == nil {
		return nil, nil
	}
	keys, err := a.cfg.Keys.IdentityKeys(r.Context(), user)
	if err != nil {
		return nil, fmt.Errorf("identity keys: %w", err)
	}
	return keys, nil
}
