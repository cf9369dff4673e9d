// Package auth authenticates devices: every request and connection carries
// the device's credential as HTTP Basic authentication, with the device
// ("alice.1") as the user name. It also limits failed authentications per
// source address and per device (Limiter), in bounded memory.
package auth

import (
	"context"
	"errors"
	"net/http"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/apierr"
	"github.com/courier-im/courier/internal/ident"
)

// ErrUnauthorized reports a missing, malformed or wrong credential, or a
// device that does not exist (the three are not told apart, on purpose).
var ErrUnauthorized = errors.New("unauthorized")

// MaxCredential is the longest credential looked at; a real one is 43
// characters.
const MaxCredential = 256

// Authenticator checks device credentials against the account store.
type Authenticator struct {
	Accounts accounts.Store
	// Limiter, if not nil, limits failed authentications.
	Limiter *Limiter
}

// Authenticate returns the device that r is authenticated as. It fails
// with ErrUnauthorized, with a *RateLimitError (errors.Is ErrRateLimited),
// or with an error from the account store.
//
// With a Limiter, every wrong credential counts as a failure of the source
// address, and of the device when the device exists (failures for devices
// that do not exist would only fill the limiter's memory). A request
// without credentials is not an attempt and counts for nothing; nor does a
// success. An address that has spent its failures is refused before its
// credential is looked at. So is a device that has, unless the request
// comes from an address with no recent failure: whoever sprays wrong
// credentials at alice.1 is held to their own addresses' budgets, and
// cannot lock the real alice.1 out.
func (a *Authenticator) Authenticate(ctx context.Context, r *http.Request) (ident.Device, error) {
	user, cred, ok := r.BasicAuth()
	if !ok {
		return ident.Device{}, ErrUnauthorized
	}
	lim := a.Limiter
	var addr string
	if lim != nil {
		addr = SourceAddr(r.RemoteAddr)
		if wait := lim.addrs.wait(addr); wait > 0 {
			return ident.Device{}, &RateLimitError{RetryAfter: wait}
		}
	}
	dev, err := ident.ParseDevice(user)
	if err != nil || len(cred) == 0 || len(cred) > MaxCredential {
		if lim != nil {
			lim.addrs.fail(addr)
		}
		return ident.Device{}, ErrUnauthorized
	}
	if lim != nil {
		if wait := lim.devices.wait(dev.String()); wait > 0 && !lim.addrs.clean(addr) {
			return ident.Device{}, &RateLimitError{RetryAfter: wait}
		}
	}
	hash, err := a.Accounts.CredentialHash(ctx, dev)
	if errors.Is(err, accounts.ErrNotFound) {
		if lim != nil {
			lim.addrs.fail(addr)
		}
		return ident.Device{}, ErrUnauthorized
	}
	if err != nil {
		return ident.Device{}, err
	}
	if !accounts.CheckCredential(cred, hash) {
		if lim != nil {
			lim.addrs.fail(addr)
			lim.devices.fail(dev.String())
		}
		return ident.Device{}, ErrUnauthorized
	}
	return dev, nil
}

// WriteError answers a request whose authentication failed with err: 401
// unauthorized, 429 rate_limited with Retry-After, or 503
// storage_unavailable for a failing account store (which the caller
// logs).
func WriteError(w http.ResponseWriter, err error) {
	var rl *RateLimitError
	switch {
	case errors.Is(err, ErrUnauthorized):
		w.Header().Set("WWW-Authenticate", `Basic realm="courier"`)
		apierr.Write(w, http.StatusUnauthorized, apierr.Detail{Code: "unauthorized", Message: "missing or wrong device credential"})
	case errors.As(err, &rl):
		ms := max(1, (rl.RetryAfter.Nanoseconds()+999_999)/1_000_000)
		apierr.Write(w, http.StatusTooManyRequests, apierr.Detail{Code: "rate_limited", Message: "too many failed authentications; retry later", RetryAfterMs: ms})
	default:
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot check credentials right now", RetryAfterMs: 1000})
	}
}
