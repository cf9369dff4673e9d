// Package authtest provides an in-memory accounts.Store (and KeyStore) for tests of
// authentication and of the handlers behind it (the fuzz targets of auth,
// api and gateway run millions of requests, which a store on disk would
// slow to a crawl). It passes the accountstest conformance suite, so it
// behaves like the real backends in everything the contract says.
package authtest

import (
	"bytes"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// Store is an accounts.Store held in memory. The zero value is not usable;
// call New.
type Store struct {
	mu    sync.Mutex
	users map[string]*user
}

type user struct {
	u       accounts.User
	devices map[uint32]*device
	nextID  uint32
}

type device struct {
	d    accounts.Device
	hash []byte
	keys *deviceKeys // nil until the device uploads keys
}

type deviceKeys struct {
	identity []byte
	regID    uint32
	spk      accounts.SignedPreKey
	prekeys  map[uint32][]byte
}

// New returns an empty store.
func New() *Store { return &Store{users: map[string]*user{}} }

var (
	_ accounts.Store    = (*Store)(nil)
	_ accounts.KeyStore = (*Store)(nil)
)

func now() time.Time { return time.Now().UTC().Round(0) }

// CreateUser implements accounts.Store.
func (s *Store) CreateUser(_ context.Context, name, deviceName string, credHash []byte) (accounts.User, accounts.Device, error) {
	if !ident.ValidUser(name) {
		return accounts.User{}, accounts.Device{}, ident.ErrBadUser
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.users[name]; ok {
		return accounts.User{}, accounts.Device{}, accounts.ErrExists
	}
	t := now()
	u := &user{u: accounts.User{Name: name, Created: t}, devices: map[uint32]*device{}, nextID: 2}
	d := &device{d: accounts.Device{ID: 1, Name: deviceName, Created: t}, hash: bytes.Clone(credHash)}
	u.devices[1] = d
	s.users[name] = u
	return u.u, d.d, nil
}

// AddDevice implements accounts.Store.
func (s *Store) AddDevice(_ context.Context, name, deviceName string, credHash []byte) (accounts.Device, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[name]
	if !ok {
		return accounts.Device{}, accounts.ErrNotFound
	}
	d := &device{d: accounts.Device{ID: u.nextID, Name: deviceName, Created: now()}, hash: bytes.Clone(credHash)}
	u.nextID++
	u.devices[d.d.ID] = d
	return d.d, nil
}

// RemoveDevice implements accounts.Store.
func (s *Store) RemoveDevice(_ context.Context, dev ident.Device) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[dev.User]
	if !ok || u.devices[dev.ID] == nil {
		return accounts.ErrNotFound
	}
	delete(u.devices, dev.ID)
	return nil
}

// User implements accounts.Store.
func (s *Store) User(_ context.Context, name string) (accounts.User, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[name]
	if !ok {
		return accounts.User{}, accounts.ErrNotFound
	}
	return u.u, nil
}

// Devices implements accounts.Store.
func (s *Store) Devices(_ context.Context, name string) ([]accounts.Device, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[name]
	if !ok {
		return nil, accounts.ErrNotFound
	}
	out := make([]accounts.Device, 0, len(u.devices))
	for _, d := range u.devices {
		out = append(out, d.d)
	}
	slices.SortFunc(out, func(a, b accounts.Device) int { return int(a.ID) - int(b.ID) })
	return out, nil
}

// CredentialHash implements accounts.Store.
func (s *Store) CredentialHash(_ context.Context, dev ident.Device) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[dev.User]
	if !ok || u.devices[dev.ID] == nil {
		return nil, accounts.ErrNotFound
	}
	return bytes.Clone(u.devices[dev.ID].hash), nil
}

// SetLastSeen implements accounts.Store.
func (s *Store) SetLastSeen(_ context.Context, name string, t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[name]
	if !ok {
		return accounts.ErrNotFound
	}
	u.u.LastSeen = t.UTC().Round(0)
	return nil
}

// Close implements accounts.Store; the store stays usable (it holds no
// resources).
func (s *Store) Close() error { return nil }

// Register creates a user (or adds a device to an existing one) with a
// fresh credential and returns the device and its credential.
func (s *Store) Register(name string) (ident.Device, string, error) {
	cred, hash := accounts.NewCredential()
	if _, err := s.User(context.Background(), name); err == nil {
		d, err := s.AddDevice(context.Background(), name, "test", hash)
		return ident.Device{User: name, ID: d.ID}, cred, err
	}
	_, d, err := s.CreateUser(context.Background(), name, "test", hash)
	return ident.Device{User: name, ID: d.ID}, cred, err
}
