// Package auth authenticates devices: every request and connection carries
// the device's credential as HTTP Basic authentication, with the device
// ("alice.1") as the user name.
package auth

import (
	"context"
	"errors"
	"net/http"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// ErrUnauthorized reports a missing, malformed or wrong credential, or a
// device that does not exist (the three are not told apart, on purpose).
var ErrUnauthorized = errors.New("unauthorized")

// Authenticator checks device credentials against the account store.
type Authenticator struct {
	Accounts accounts.Store
}

// Authenticate returns the device that r is authenticated as. Errors other
// than ErrUnauthorized come from the account store.
func (a *Authenticator) Authenticate(ctx context.Context, r *http.Request) (ident.Device, error) {
	user, cred, ok := r.BasicAuth()
	if !ok {
		return ident.Device{}, ErrUnauthorized
	}
	dev, err := ident.ParseDevice(user)
	if err != nil || len(cred) == 0 || len(cred) > 256 {
		return ident.Device{}, ErrUnauthorized
	}
	hash, err := a.Accounts.CredentialHash(ctx, dev)
	if errors.Is(err, accounts.ErrNotFound) {
		return ident.Device{}, ErrUnauthorized
	}
	if err != nil {
		return ident.Device{}, err
	}
	if !accounts.CheckCredential(cred, hash) {
		return ident.Device{}, ErrUnauthorized
	}
	return dev, nil
}
