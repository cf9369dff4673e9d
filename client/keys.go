package client

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
)

// KeyAPI is the client of the server's key directory (PUT and GET
// /v1/keys, GET /v1/keys/{user}): what an end-to-end encryption layer
// needs to publish this device's public keys and to fetch other devices'
// prekey bundles. Keys are opaque bytes here (base64 on the wire).
type KeyAPI struct {
	api  *httpAPI
	self Device
}

// NewKeyAPI returns a KeyAPI acting as the device of creds. httpClient may
// be nil (a client with a 30 s timeout is used).
func NewKeyAPI(creds Credentials, httpClient *http.Client) (*KeyAPI, error) {
	base, err := normalizeServer(creds.Server)
	if err != nil {
		return nil, err
	}
	if !validUser(creds.User) || creds.Device == 0 || creds.Secret == "" {
		return nil, fmt.Errorf("courier: incomplete credentials: need server, user, device and credential")
	}
	creds.Server = base
	if httpClient == nil {
		httpClient = &http.Client{Timeout: defaultHTTPTimeout}
	}
	return &KeyAPI{api: &httpAPI{base: base, client: httpClient, auth: basicAuth(creds)},
		self: Device{User: creds.User, ID: creds.Device}}, nil
}

// Self returns the device the KeyAPI acts as.
func (k *KeyAPI) Self() Device { return k.self }

// SignedPreKey is a public signed prekey with its signature by the
// device's identity key.
type SignedPreKey struct {
	ID        uint32 `json:"id"`
	PublicKey []byte `json:"public_key"`
	Signature []byte `json:"signature"`
}

// PreKey is a public one-time prekey.
type PreKey struct {
	ID        uint32 `json:"id"`
	PublicKey []byte `json:"public_key"`
}

// KeyUpload is the body of PUT /v1/keys. Only IdentityKey is required
// after the first upload.
type KeyUpload struct {
	IdentityKey    []byte        `json:"identity_key"`
	RegistrationID uint32        `json:"registration_id,omitempty"`
	SignedPreKey   *SignedPreKey `json:"signed_prekey,omitempty"`
	OneTimePreKeys []PreKey      `json:"one_time_prekeys,omitempty"`
}

// KeyStatus is the server's view of this device's keys (GET /v1/keys).
type KeyStatus struct {
	IdentityKey    []byte  `json:"identity_key"` // nil: never uploaded
	SignedPreKeyID *uint32 `json:"signed_prekey_id"`
	OneTimePreKeys int     `json:"one_time_prekeys"`
}

// Bundle is one device's prekey bundle. IdentityKey is nil for a device
// that has not uploaded keys yet; OneTimePreKey is nil when it has none
// left.
type Bundle struct {
	Device         uint32        `json:"device"`
	RegistrationID uint32        `json:"registration_id"`
	IdentityKey    []byte        `json:"identity_key"`
	SignedPreKey   *SignedPreKey `json:"signed_prekey"`
	OneTimePreKey  *PreKey       `json:"one_time_prekey"`
}

// MaxPreKeysPerUpload is how many one-time prekeys one PUT /v1/keys may
// carry.
const MaxPreKeysPerUpload = 100

// Upload publishes keys (PUT /v1/keys) and returns how many one-time
// prekeys the server now holds for this device.
func (k *KeyAPI) Upload(ctx context.Context, up KeyUpload) (int, error) {
	var out struct {
		OneTimePreKeys int `json:"one_time_prekeys"`
	}
	if err := k.api.do(ctx, http.MethodPut, "/v1/keys", up, &out); err != nil {
		return 0, err
	}
	return out.OneTimePreKeys, nil
}

// Status returns the server's view of this device's keys (GET /v1/keys).
func (k *KeyAPI) Status(ctx context.Context) (KeyStatus, error) {
	var out KeyStatus
	err := k.api.do(ctx, http.MethodGet, "/v1/keys", nil, &out)
	return out, err
}

// Bundles fetches the prekey bundles of user's devices (GET
// /v1/keys/{user}), or of one device if device is not 0. Each fetch uses
// up one one-time prekey of each device returned.
func (k *KeyAPI) Bundles(ctx context.Context, user string, device uint32) ([]Bundle, error) {
	if !validUser(user) {
		return nil, fmt.Errorf("courier: keys: bad user name %q", user)
	}
	path := "/v1/keys/" + url.PathEscape(user)
	if device != 0 {
		path += "?device=" + strconv.FormatUint(uint64(device), 10)
	}
	var out struct {
		User    string   `json:"user"`
		Devices []Bundle `json:"devices"`
	}
	if err := k.api.do(ctx, http.MethodGet, path, nil, &out); err != nil {
		return nil, err
	}
	return out.Devices, nil
}

// Devices lists user's devices with their identity keys (GET
// /v1/users/{user}/devices).
func (k *KeyAPI) Devices(ctx context.Context, user string) ([]DeviceInfo, error) {
	if !validUser(user) {
		return nil, fmt.Errorf("courier: devices: bad user name %q", user)
	}
	return k.api.devices(ctx, user)
}

// LinkDevice adds a new device to this device's account (POST
// /v1/devices) and returns the new device's credentials.
func (k *KeyAPI) LinkDevice(ctx context.Context, name string) (Credentials, error) {
	var out struct {
		User       string `json:"user"`
		Device     uint32 `json:"device"`
		Credential string `json:"credential"`
	}
	if err := k.api.do(ctx, http.MethodPost, "/v1/devices", map[string]string{"name": name}, &out); err != nil {
		return Credentials{}, err
	}
	return Credentials{Server: k.api.base, User: out.User, Device: out.Device, Secret: out.Credential}, nil
}

// RemoveDevice removes a device of this device's account, this one
// included (DELETE /v1/devices/{id}); its keys go with it.
func (k *KeyAPI) RemoveDevice(ctx context.Context, id uint32) error {
	return k.api.do(ctx, http.MethodDelete, "/v1/devices/"+strconv.FormatUint(uint64(id), 10), nil, nil)
}
