// Package accounts defines the account store: users, their devices, the
// devices' credentials and their public Signal-protocol keys (KeyStore).
// Backends live in sub-packages (sqlite for a single node, postgres for a
// cluster) and must pass the accountstest conformance suite.
package accounts

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"time"

	"github.com/courier-im/courier/internal/ident"
)

// Device is one registered device of a user.
type Device struct {
	ID      uint32
	Name    string
	Created time.Time
}

// User is an account.
type User struct {
	Name     string
	Created  time.Time
	LastSeen time.Time // zero if never connected
}

// Store is an account backend. All methods are safe for concurrent use.
type Store interface {
	// CreateUser creates a user with its primary device (id 1) whose
	// credential hash is credHash. It fails with ErrExists if the name is taken.
	CreateUser(ctx context.Context, name, deviceName string, credHash []byte) (User, Device, error)
	// AddDevice adds a device to an existing user and returns it with a new,
	// never reused id. ErrNotFound if the user does not exist.
	AddDevice(ctx context.Context, user, deviceName string, credHash []byte) (Device, error)
	// RemoveDevice removes a device; its id is not reused. ErrNotFound if absent.
	RemoveDevice(ctx context.Context, dev ident.Device) error
	// User returns a user. ErrNotFound if absent.
	User(ctx context.Context, name string) (User, error)
	// Devices returns a user's devices in id order. ErrNotFound if the user
	// does not exist.
	Devices(ctx context.Context, user string) ([]Device, error)
	// CredentialHash returns the stored hash for a device. ErrNotFound if
	// the device does not exist.
	CredentialHash(ctx context.Context, dev ident.Device) ([]byte, error)
	// SetLastSeen records when a user was last connected.
	SetLastSeen(ctx context.Context, user string, t time.Time) error
	Close() error
}

// DeviceViewer is implemented by stores that can hand out a user's device
// list without copying it: the device cache, which holds every list it
// serves. A group send to 1,024 members reads 1,024 lists, and a 1:1
// message and its receipt three, so the copies were allocations on the
// delivery path for lists nobody modifies. See DevicesView.
type DeviceViewer interface {
	// DevicesView returns what Devices returns, but the slice may be
	// shared: the caller must not modify it.
	DevicesView(ctx context.Context, user string) ([]Device, error)
}

// DevicesView returns user's devices from s, without a copy if s is a
// DeviceViewer. The caller must not modify the slice.
func DevicesView(ctx context.Context, s Store, user string) ([]Device, error) {
	if v, ok := s.(DeviceViewer); ok {
		return v.DevicesView(ctx, user)
	}
	return s.Devices(ctx, user)
}

// LastSeenBatcher is implemented by stores that record the last-seen
// times of many users with one write (one transaction): a server going
// down, or a burst of disconnects, takes thousands of users offline at
// once. See SetLastSeenBatch.
type LastSeenBatcher interface {
	// SetLastSeenBatch records seen (user -> time, as SetLastSeen does)
	// at once; users that do not exist are skipped.
	SetLastSeenBatch(ctx context.Context, seen map[string]time.Time) error
}

// SetLastSeenBatch records seen in s: with one write if s is a
// LastSeenBatcher, otherwise with one SetLastSeen per user. Users that do
// not exist are skipped; the first other error is returned after every
// user has been tried.
func SetLastSeenBatch(ctx context.Context, s Store, seen map[string]time.Time) error {
	if len(seen) == 0 {
		return nil
	}
	if b, ok := s.(LastSeenBatcher); ok {
		return b.SetLastSeenBatch(ctx, seen)
	}
	var first error
	for user, t := range seen {
		if err := s.SetLastSeen(ctx, user, t); err != nil && !errors.Is(err, ErrNotFound) && first == nil {
			first = err
		}
	}
	return first
}

var (
	ErrNotFound = errors.New("accounts: not found")
	ErrExists   = errors.New("accounts: already exists")
)

// CredentialBytes is the size of a device credential: 256 random bits.
const CredentialBytes = 32

// NewCredential returns a new random device credential (as text, for the
// client) and the hash to store (the server never keeps the credential).
func NewCredential() (cred string, hash []byte) {
	var b [CredentialBytes]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("accounts: crypto/rand failed: " + err.Error())
	}
	cred = base64.RawURLEncoding.EncodeToString(b[:])
	return cred, HashCredential(cred)
}

// HashCredential hashes a credential for storage. A credential has 256 bits
// of entropy, so one round of SHA-256 is enough to make the stored hash
// useless to a thief; slow password hashes are for guessable secrets.
func HashCredential(cred string) []byte {
	h := sha256.Sum256([]byte(cred))
	return h[:]
}

// CheckCredential reports whether cred matches hash, in constant time.
func CheckCredential(cred string, hash []byte) bool {
	h := HashCredential(cred)
	return len(hash) == len(h) && subtle.ConstantTimeCompare(h, hash) == 1
}
