package sqlite

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

var _ accounts.KeyStore = (*Store)(nil)

// Every key write, bundle fetches included, is a transaction on the one
// writer connection, begun with BEGIN IMMEDIATE: writers are serialised
// (also across processes sharing the file), so a fetch reads and deletes a
// one-time prekey with nobody else in between, and counts are exact.

// PutKeys implements accounts.KeyStore.
func (s *Store) PutKeys(ctx context.Context, dev ident.Device, up accounts.KeyUpload) (int, error) {
	var count int
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, `SELECT 1 FROM devices WHERE user = ? AND id = ? AND removed IS NULL`,
			dev.User, int64(dev.ID)).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return accounts.ErrNotFound
		}
		if err != nil {
			return err
		}
		var have []byte
		err = tx.QueryRowContext(ctx, `SELECT identity_key FROM device_keys WHERE user = ? AND device = ?`,
			dev.User, int64(dev.ID)).Scan(&have)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			if up.RegistrationID == nil || up.SignedPreKey == nil {
				return accounts.ErrIncompleteKeys
			}
			spk := up.SignedPreKey
			if _, err := tx.ExecContext(ctx, `
				INSERT INTO device_keys (user, device, identity_key, registration_id, signed_prekey_id, signed_prekey, signed_prekey_sig)
				VALUES (?, ?, ?, ?, ?, ?, ?)`,
				dev.User, int64(dev.ID), up.IdentityKey, int64(*up.RegistrationID), int64(spk.ID), spk.PublicKey, spk.Signature); err != nil {
				return err
			}
		case err != nil:
			return err
		case !bytes.Equal(have, up.IdentityKey):
			return accounts.ErrIdentityMismatch
		default:
			if up.RegistrationID != nil {
				if _, err := tx.ExecContext(ctx, `UPDATE device_keys SET registration_id = ? WHERE user = ? AND device = ?`,
					int64(*up.RegistrationID), dev.User, int64(dev.ID)); err != nil {
					return err
				}
			}
			if spk := up.SignedPreKey; spk != nil {
				if _, err := tx.ExecContext(ctx, `
					UPDATE device_keys SET signed_prekey_id = ?, signed_prekey = ?, signed_prekey_sig = ?
					WHERE user = ? AND device = ?`,
					int64(spk.ID), spk.PublicKey, spk.Signature, dev.User, int64(dev.ID)); err != nil {
					return err
				}
			}
		}
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM one_time_prekeys WHERE user = ? AND device = ?`,
			dev.User, int64(dev.ID)).Scan(&count); err != nil {
			return err
		}
		if count+len(up.OneTimePreKeys) > accounts.MaxOneTimePreKeys {
			return accounts.ErrTooManyPreKeys
		}
		for _, pk := range up.OneTimePreKeys {
			res, err := tx.ExecContext(ctx, `
				INSERT INTO one_time_prekeys (user, device, id, public_key) VALUES (?, ?, ?, ?)
				ON CONFLICT DO NOTHING`,
				dev.User, int64(dev.ID), int64(pk.ID), pk.PublicKey)
			if err != nil {
				return err
			}
			if n, err := res.RowsAffected(); err != nil {
				return err
			} else if n == 0 {
				return fmt.Errorf("%w (id %d)", accounts.ErrPreKeyExists, pk.ID)
			}
		}
		count += len(up.OneTimePreKeys)
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("accounts/sqlite: put keys of %s: %w", dev, err)
	}
	return count, nil
}

// KeyStatus implements accounts.KeyStore.
func (s *Store) KeyStatus(ctx context.Context, dev ident.Device) (accounts.KeyStatus, error) {
	var (
		st           accounts.KeyStatus
		regID, spkID sql.NullInt64
		identity     []byte
	)
	err := s.r.QueryRowContext(ctx, `
		SELECT k.identity_key, k.registration_id, k.signed_prekey_id,
			(SELECT count(*) FROM one_time_prekeys p WHERE p.user = d.user AND p.device = d.id)
		FROM devices d LEFT JOIN device_keys k ON k.user = d.user AND k.device = d.id
		WHERE d.user = ? AND d.id = ? AND d.removed IS NULL`,
		dev.User, int64(dev.ID)).Scan(&identity, &regID, &spkID, &st.OneTimePreKeys)
	if errors.Is(err, sql.ErrNoRows) {
		err = accounts.ErrNotFound
	}
	if err != nil {
		return accounts.KeyStatus{}, fmt.Errorf("accounts/sqlite: key status of %s: %w", dev, err)
	}
	if identity != nil {
		st.IdentityKey = identity
		st.RegistrationID = uint32(regID.Int64)
		st.SignedPreKeyID = uint32(spkID.Int64)
	}
	return st, nil
}

// TakeBundles implements accounts.KeyStore.
func (s *Store) TakeBundles(ctx context.Context, user string, device uint32) ([]accounts.Bundle, error) {
	var bundles []accounts.Bundle
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		bundles = nil
		rows, err := tx.QueryContext(ctx, `
			SELECT d.id, k.identity_key, k.registration_id, k.signed_prekey_id, k.signed_prekey, k.signed_prekey_sig
			FROM users u
			LEFT JOIN devices d ON d.user = u.name AND d.removed IS NULL AND (?2 = 0 OR d.id = ?2)
			LEFT JOIN device_keys k ON k.user = d.user AND k.device = d.id
			WHERE u.name = ?1
			ORDER BY d.id`, user, int64(device))
		if err != nil {
			return err
		}
		userFound := false
		for rows.Next() {
			userFound = true
			var (
				id, regID, spkID      sql.NullInt64
				identity, spk, spkSig []byte
			)
			if err := rows.Scan(&id, &identity, &regID, &spkID, &spk, &spkSig); err != nil {
				rows.Close()
				return err
			}
			if !id.Valid { // the LEFT JOIN row of a user without (matching) devices
				continue
			}
			b := accounts.Bundle{Device: uint32(id.Int64)}
			if identity != nil {
				b.IdentityKey = identity
				b.RegistrationID = uint32(regID.Int64)
				b.SignedPreKey = &accounts.SignedPreKey{ID: uint32(spkID.Int64), PublicKey: spk, Signature: spkSig}
			}
			bundles = append(bundles, b)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		if !userFound {
			return accounts.ErrNotFound
		}
		for i := range bundles {
			b := &bundles[i]
			if b.IdentityKey == nil {
				continue
			}
			var (
				id int64
				pk []byte
			)
			err := tx.QueryRowContext(ctx, `
				DELETE FROM one_time_prekeys
				WHERE user = ?1 AND device = ?2
				  AND id = (SELECT min(id) FROM one_time_prekeys WHERE user = ?1 AND device = ?2)
				RETURNING id, public_key`, user, int64(b.Device)).Scan(&id, &pk)
			switch {
			case errors.Is(err, sql.ErrNoRows):
			case err != nil:
				return err
			default:
				b.OneTimePreKey = &accounts.PreKey{ID: uint32(id), PublicKey: pk}
			}
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM one_time_prekeys WHERE user = ? AND device = ?`,
				user, int64(b.Device)).Scan(&b.Remaining); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: take bundles of %q: %w", user, err)
	}
	if bundles == nil {
		bundles = []accounts.Bundle{}
	}
	return bundles, nil
}

// IdentityKeys implements accounts.KeyStore.
func (s *Store) IdentityKeys(ctx context.Context, user string) (map[uint32][]byte, error) {
	keys, err := s.identityKeys(ctx, user)
	if err != nil {
		return nil, fmt.Errorf("accounts/sqlite: identity keys of %q: %w", user, err)
	}
	return keys, nil
}

func (s *Store) identityKeys(ctx context.Context, user string) (map[uint32][]byte, error) {
	rows, err := s.r.QueryContext(ctx, `
		SELECT d.id, k.identity_key
		FROM users u
		LEFT JOIN devices d ON d.user = u.name AND d.removed IS NULL
		LEFT JOIN device_keys k ON k.user = d.user AND k.device = d.id
		WHERE u.name = ?`, user)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	userFound := false
	keys := map[uint32][]byte{}
	for rows.Next() {
		userFound = true
		var (
			id       sql.NullInt64
			identity []byte
		)
		if err := rows.Scan(&id, &identity); err != nil {
			return nil, err
		}
		if id.Valid && identity != nil {
			keys[uint32(id.Int64)] = identity
		}
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if !userFound {
		return nil, accounts.ErrNotFound
	}
	return keys, nil
}
