package accounts

import (
	"context"
	"errors"

	"github.com/courier-im/courier/internal/ident"
)

// KeyStore keeps the public keys of the Signal protocol per device: the
// device's identity key, its registration id, its current signed prekey and
// a pool of one-time prekeys that bundle fetches consume. Every backend of
// Store implements it too (accountstest checks both); it is a separate
// interface only so that code which needs no keys need not see them.
//
// Keys are opaque bytes to a store: checking their form and the signed
// prekey's signature is the caller's job (package keys). A store keeps what
// it is given, enforces the rules below atomically, and drops a device's
// keys when the device is removed (Store.RemoveDevice).
type KeyStore interface {
	// PutKeys stores a device's keys, all or nothing, and returns how many
	// one-time prekeys the device then holds.
	//
	// up.IdentityKey is required. The first upload of a device sets it, and
	// must also carry a registration id and a signed prekey
	// (ErrIncompleteKeys otherwise); a later upload whose identity key
	// differs fails with ErrIdentityMismatch and changes nothing (a new
	// identity is a new device). A signed prekey replaces the stored one; a
	// registration id replaces the stored one. One-time prekeys are added:
	// ErrPreKeyExists if one's id is held already (or listed twice), and
	// ErrTooManyPreKeys if the device would hold more than
	// MaxOneTimePreKeys. ErrNotFound if the device does not exist or was
	// removed.
	PutKeys(ctx context.Context, dev ident.Device, up KeyUpload) (int, error)
	// KeyStatus returns what a device has uploaded. A device that has
	// uploaded nothing has a zero KeyStatus. ErrNotFound if the device does
	// not exist or was removed.
	KeyStatus(ctx context.Context, dev ident.Device) (KeyStatus, error)
	// TakeBundles returns the prekey bundles of user's devices in id order
	// (only device's, when device is not 0; none if it does not exist),
	// taking one one-time prekey from each device that has one. A taken
	// prekey is removed in the same transaction that reads it, so that two
	// calls, on any node, never return the same one-time prekey. A device
	// that has uploaded no keys is listed with a nil IdentityKey.
	// ErrNotFound if the user does not exist.
	TakeBundles(ctx context.Context, user string, device uint32) ([]Bundle, error)
	// IdentityKeys returns the identity keys of user's devices that have
	// uploaded one, by device id. ErrNotFound if the user does not exist.
	IdentityKeys(ctx context.Context, user string) (map[uint32][]byte, error)
}

// MaxOneTimePreKeys is the most one-time prekeys a device may hold.
const MaxOneTimePreKeys = 1000

// Errors of KeyStore.PutKeys.
var (
	ErrIdentityMismatch = errors.New("accounts: the device has another identity key")
	ErrIncompleteKeys   = errors.New("accounts: a device's first key upload needs a registration id and a signed prekey")
	ErrPreKeyExists     = errors.New("accounts: a one-time prekey with that id is held already")
	ErrTooManyPreKeys   = errors.New("accounts: too many one-time prekeys")
)

// SignedPreKey is a device's medium-term prekey, signed with its identity
// key.
type SignedPreKey struct {
	ID        uint32
	PublicKey []byte
	Signature []byte
}

// PreKey is a one-time prekey.
type PreKey struct {
	ID        uint32
	PublicKey []byte
}

// KeyUpload is what one PutKeys call stores.
type KeyUpload struct {
	IdentityKey []byte
	// RegistrationID, when not nil, sets the device's registration id.
	RegistrationID *uint32
	// SignedPreKey, when not nil, replaces the device's signed prekey.
	SignedPreKey   *SignedPreKey
	OneTimePreKeys []PreKey
}

// KeyStatus is what a device has uploaded.
type KeyStatus struct {
	// IdentityKey is nil until the device's first upload.
	IdentityKey    []byte
	RegistrationID uint32
	// SignedPreKeyID is the id of the current signed prekey (meaningful
	// only when IdentityKey is set).
	SignedPreKeyID uint32
	OneTimePreKeys int
}

// Bundle is what a sender needs to start a session with one device.
type Bundle struct {
	Device uint32
	// IdentityKey is nil if the device has not uploaded keys; then the
	// other key fields are zero too.
	IdentityKey    []byte
	RegistrationID uint32
	SignedPreKey   *SignedPreKey
	// OneTimePreKey is the prekey taken for this fetch, nil if the device
	// had none left.
	OneTimePreKey *PreKey
	// Remaining is how many one-time prekeys the device holds after this
	// fetch.
	Remaining int
}
