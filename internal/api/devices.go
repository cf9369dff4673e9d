package api

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/apierr"
	"github.com/courier-im/courier/internal/ident"
)

// Linking and removing devices (issue 3). A device acts only on its own
// account: the account is always the caller's, never named in the request.

type addDeviceRequest struct {
	Name string `json:"name,omitempty"`
}

// maxDevices is the most devices an account may have: a 1:1 send
// addresses every device of both users, and must fit in one send's
// payloads.
func (a *API) maxDevices() int { return max(1, a.cfg.Delivery.MaxPayloads()/2) }

func (a *API) addDevice(w http.ResponseWriter, r *http.Request, by ident.Device) {
	var req addDeviceRequest
	if !a.decode(w, r, 4<<10, &req) {
		return
	}
	if len(req.Name) > 64 {
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: "name is at most 64 bytes"})
		return
	}
	devs, err := a.cfg.Accounts.Devices(r.Context(), by.User)
	if err != nil {
		a.accountsError(w, r, "link a device", err)
		return
	}
	if len(devs) >= a.maxDevices() {
		apierr.Write(w, http.StatusConflict, apierr.Detail{Code: "too_many_devices",
			Message: fmt.Sprintf("an account has at most %d devices; remove one first", a.maxDevices())})
		return
	}
	cred, hash := accounts.NewCredential()
	d, err := a.cfg.Accounts.AddDevice(r.Context(), by.User, req.Name, hash)
	if err != nil {
		a.accountsError(w, r, "link a device", err)
		return
	}
	a.cfg.Logger.Info("device linked", "user", by.User, "device", d.ID, "by", by)
	writeJSON(w, http.StatusCreated, createAccountResponse{User: by.User, Device: d.ID, Credential: cred})
}

func (a *API) removeDevice(w http.ResponseWriter, r *http.Request, by ident.Device) {
	id, ok := parseDeviceID(r.PathValue("id"))
	if !ok {
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: "the path must end in a device id (1 to 4294967295)"})
		return
	}
	dev := ident.Device{User: by.User, ID: id}
	err := a.cfg.Accounts.RemoveDevice(r.Context(), dev)
	if errors.Is(err, accounts.ErrNotFound) {
		apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "unknown_device", Message: fmt.Sprintf("%s has no device %d", by.User, id)})
		return
	}
	if err != nil {
		a.accountsError(w, r, "remove a device", err)
		return
	}
	a.cfg.Logger.Info("device removed", "device", dev, "by", by)
	w.WriteHeader(http.StatusNoContent)
}

// accountsError answers a failure of the account store.
func (a *API) accountsError(w http.ResponseWriter, r *http.Request, what string, err error) {
	if errors.Is(err, accounts.ErrNotFound) {
		// The caller's own account or device vanished after it
		// authenticated: it was removed meanwhile.
		apierr.Write(w, http.StatusUnauthorized, apierr.Detail{Code: "unauthorized", Message: "the device was removed"})
		return
	}
	if r.Context().Err() != nil {
		return
	}
	a.cfg.Logger.Error(what, "err", err)
	apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot " + what + " right now", RetryAfterMs: 1000})
}
