package authtest

import (
	"bytes"
	"context"
	"maps"
	"slices"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// activeDevice returns a device that exists and was not removed, or nil.
// The caller holds s.mu.
func (s *Store) activeDevice(dev ident.Device) *device {
	u, ok := s.users[dev.User]
	if !ok {
		return nil
	}
	return u.devices[dev.ID]
}

// PutKeys implements accounts.KeyStore.
func (s *Store) PutKeys(_ context.Context, dev ident.Device, up accounts.KeyUpload) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.activeDevice(dev)
	if d == nil {
		return 0, accounts.ErrNotFound
	}
	k := d.keys
	if k == nil {
		if up.RegistrationID == nil || up.SignedPreKey == nil {
			return 0, accounts.ErrIncompleteKeys
		}
	} else if !bytes.Equal(k.identity, up.IdentityKey) {
		return 0, accounts.ErrIdentityMismatch
	}
	held := 0
	if k != nil {
		held = len(k.prekeys)
	}
	if held+len(up.OneTimePreKeys) > accounts.MaxOneTimePreKeys {
		return 0, accounts.ErrTooManyPreKeys
	}
	seen := make(map[uint32]bool, len(up.OneTimePreKeys))
	for _, pk := range up.OneTimePreKeys {
		if seen[pk.ID] {
			return 0, accounts.ErrPreKeyExists
		}
		seen[pk.ID] = true
		if k != nil {
			if _, ok := k.prekeys[pk.ID]; ok {
				return 0, accounts.ErrPreKeyExists
			}
		}
	}
	// Every check passed: apply it all.
	if k == nil {
		k = &deviceKeys{identity: bytes.Clone(up.IdentityKey), prekeys: map[uint32][]byte{}}
		d.keys = k
	}
	if up.RegistrationID != nil {
		k.regID = *up.RegistrationID
	}
	if spk := up.SignedPreKey; spk != nil {
		k.spk = accounts.SignedPreKey{ID: spk.ID, PublicKey: bytes.Clone(spk.PublicKey), Signature: bytes.Clone(spk.Signature)}
	}
	for _, pk := range up.OneTimePreKeys {
		k.prekeys[pk.ID] = bytes.Clone(pk.PublicKey)
	}
	return len(k.prekeys), nil
}

// KeyStatus implements accounts.KeyStore.
func (s *Store) KeyStatus(_ context.Context, dev ident.Device) (accounts.KeyStatus, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.activeDevice(dev)
	if d == nil {
		return accounts.KeyStatus{}, accounts.ErrNotFound
	}
	if d.keys == nil {
		return accounts.KeyStatus{}, nil
	}
	return accounts.KeyStatus{
		IdentityKey:    bytes.Clone(d.keys.identity),
		RegistrationID: d.keys.regID,
		SignedPreKeyID: d.keys.spk.ID,
		OneTimePreKeys: len(d.keys.prekeys),
	}, nil
}

// TakeBundles implements accounts.KeyStore. It takes the lowest-numbered
// one-time prekey, as the other backends do.
func (s *Store) TakeBundles(_ context.Context, name string, device uint32) ([]accounts.Bundle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[name]
	if !ok {
		return nil, accounts.ErrNotFound
	}
	bundles := []accounts.Bundle{}
	for _, id := range slices.Sorted(maps.Keys(u.devices)) {
		if device != 0 && id != device {
			continue
		}
		b := accounts.Bundle{Device: id}
		if k := u.devices[id].keys; k != nil {
			b.IdentityKey = bytes.Clone(k.identity)
			b.RegistrationID = k.regID
			b.SignedPreKey = &accounts.SignedPreKey{ID: k.spk.ID, PublicKey: bytes.Clone(k.spk.PublicKey), Signature: bytes.Clone(k.spk.Signature)}
			if len(k.prekeys) > 0 {
				low := slices.Min(slices.Collect(maps.Keys(k.prekeys)))
				b.OneTimePreKey = &accounts.PreKey{ID: low, PublicKey: k.prekeys[low]}
				delete(k.prekeys, low)
			}
			b.Remaining = len(k.prekeys)
		}
		bundles = append(bundles, b)
	}
	return bundles, nil
}

// IdentityKeys implements accounts.KeyStore.
func (s *Store) IdentityKeys(_ context.Context, name string) (map[uint32][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, ok := s.users[name]
	if !ok {
		return nil, accounts.ErrNotFound
	}
	keys := map[uint32][]byte{}
	for id, d := range u.devices {
		if d.keys != nil {
			keys[id] = bytes.Clone(d.keys.identity)
		}
	}
	return keys, nil
}
