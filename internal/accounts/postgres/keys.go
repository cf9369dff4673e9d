package postgres

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

var _ accounts.KeyStore = (*Store)(nil)

// The key methods that write are transactions (READ COMMITTED) that first
// lock the device_keys row of each device they touch: PutKeys (after
// share-locking the device row, so that a concurrent RemoveDevice waits or
// is waited for) and TakeBundles (all of a user's rows in device order, so
// that two fetches never deadlock). With the row held, every later
// statement of the transaction sees the one-time prekeys as the last
// writer left them, so the counts returned are exact: of several concurrent
// fetches exactly one sees a device's count go from 10 to 9. The prekey a
// fetch takes is chosen and deleted in one statement
// (DELETE ... WHERE key = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING),
// so it is handed out at most once even without the row lock.

// PutKeys implements accounts.KeyStore.
func (s *Store) PutKeys(ctx context.Context, dev ident.Device, up accounts.KeyUpload) (int, error) {
	var count int
	err := accounts.ErrNotFound
	if ident.ValidUser(dev.User) {
		err = pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, func(tx pgx.Tx) error {
			var err error
			count, err = putKeys(ctx, tx, dev, up)
			return err
		})
	}
	if err != nil {
		return 0, fmt.Errorf("accounts/postgres: put keys of %s: %w", dev, err)
	}
	return count, nil
}

func putKeys(ctx context.Context, tx pgx.Tx, dev ident.Device, up accounts.KeyUpload) (int, error) {
	user, id := dev.User, int64(dev.ID)
	var one int
	err := tx.QueryRow(ctx, `SELECT 1 FROM devices WHERE user_name = $1 AND id = $2 AND removed IS NULL FOR SHARE`,
		user, id).Scan(&one)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, accounts.ErrNotFound
	}
	if err != nil {
		return 0, err
	}
	complete := up.RegistrationID != nil && up.SignedPreKey != nil
	if complete {
		// A first upload inserts the row; a concurrent first upload waits
		// for this one and then inserts nothing, and so finds (and
		// compares) this one's identity below.
		spk := up.SignedPreKey
		if _, err := tx.Exec(ctx, `
			INSERT INTO device_keys (user_name, device, identity_key, registration_id, signed_prekey_id, signed_prekey, signed_prekey_sig)
			VALUES ($1, $2, $3, $4, $5, $6, $7)
			ON CONFLICT (user_name, device) DO NOTHING`,
			user, id, up.IdentityKey, int64(*up.RegistrationID), int64(spk.ID), spk.PublicKey, spk.Signature); err != nil {
			return 0, err
		}
	}
	var have []byte
	err = tx.QueryRow(ctx, `SELECT identity_key FROM device_keys WHERE user_name = $1 AND device = $2 FOR UPDATE`,
		user, id).Scan(&have)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return 0, accounts.ErrIncompleteKeys
	case err != nil:
		return 0, err
	case !bytes.Equal(have, up.IdentityKey):
		return 0, accounts.ErrIdentityMismatch
	}
	if up.RegistrationID != nil {
		if _, err := tx.Exec(ctx, `UPDATE device_keys SET registration_id = $3 WHERE user_name = $1 AND device = $2`,
			user, id, int64(*up.RegistrationID)); err != nil {
			return 0, err
		}
	}
	if spk := up.SignedPreKey; spk != nil {
		if _, err := tx.Exec(ctx, `
			UPDATE device_keys SET signed_prekey_id = $3, signed_prekey = $4, signed_prekey_sig = $5
			WHERE user_name = $1 AND device = $2`,
			user, id, int64(spk.ID), spk.PublicKey, spk.Signature); err != nil {
			return 0, err
		}
	}
	var count int
	if err := tx.QueryRow(ctx, `SELECT count(*) FROM one_time_prekeys WHERE user_name = $1 AND device = $2`,
		user, id).Scan(&count); err != nil {
		return 0, err
	}
	n := len(up.OneTimePreKeys)
	if count+n > accounts.MaxOneTimePreKeys {
		return 0, accounts.ErrTooManyPreKeys
	}
	if n == 0 {
		return count, nil
	}
	ids := make([]int64, n)
	keys := make([][]byte, n)
	for i, pk := range up.OneTimePreKeys {
		ids[i], keys[i] = int64(pk.ID), pk.PublicKey
	}
	// A held id, or one listed twice, inserts nothing for that entry.
	tag, err := tx.Exec(ctx, `
		INSERT INTO one_time_prekeys (user_name, device, id, public_key)
		SELECT $1, $2, t.id, t.key FROM unnest($3::bigint[], $4::bytea[]) AS t(id, key)
		ON CONFLICT DO NOTHING`, user, id, ids, keys)
	if err != nil {
		return 0, err
	}
	if tag.RowsAffected() != int64(n) {
		return 0, accounts.ErrPreKeyExists
	}
	return count + n, nil
}

// KeyStatus implements accounts.KeyStore.
func (s *Store) KeyStatus(ctx context.Context, dev ident.Device) (accounts.KeyStatus, error) {
	var (
		st           accounts.KeyStatus
		regID, spkID *int64
		identity     []byte
	)
	err := accounts.ErrNotFound
	if ident.ValidUser(dev.User) {
		err = s.pool.QueryRow(ctx, `
			SELECT k.identity_key, k.registration_id, k.signed_prekey_id,
				(SELECT count(*) FROM one_time_prekeys p WHERE p.user_name = d.user_name AND p.device = d.id)
			FROM devices d LEFT JOIN device_keys k ON k.user_name = d.user_name AND k.device = d.id
			WHERE d.user_name = $1 AND d.id = $2 AND d.removed IS NULL`,
			dev.User, int64(dev.ID)).Scan(&identity, &regID, &spkID, &st.OneTimePreKeys)
		if errors.Is(err, pgx.ErrNoRows) {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		return accounts.KeyStatus{}, fmt.Errorf("accounts/postgres: key status of %s: %w", dev, err)
	}
	if identity != nil {
		st.IdentityKey = identity
		st.RegistrationID = uint32(*regID)
		st.SignedPreKeyID = uint32(*spkID)
	}
	return st, nil
}

// TakeBundles implements accounts.KeyStore.
func (s *Store) TakeBundles(ctx context.Context, user string, device uint32) ([]accounts.Bundle, error) {
	var bundles []accounts.Bundle
	err := accounts.ErrNotFound
	if ident.ValidUser(user) {
		err = pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.ReadCommitted}, func(tx pgx.Tx) error {
			var err error
			bundles, err = takeBundles(ctx, tx, user, device)
			return err
		})
	}
	if err != nil {
		return nil, fmt.Errorf("accounts/postgres: take bundles of %q: %w", user, err)
	}
	return bundles, nil
}

func takeBundles(ctx context.Context, tx pgx.Tx, user string, device uint32) ([]accounts.Bundle, error) {
	// The devices, and whether the user exists (a row of NULLs if it has
	// no matching device).
	rows, err := tx.Query(ctx, `
		SELECT d.id
		FROM users u LEFT JOIN devices d ON d.user_name = u.name AND d.removed IS NULL AND ($2::bigint = 0 OR d.id = $2::bigint)
		WHERE u.name = $1
		ORDER BY d.id`, user, int64(device))
	if err != nil {
		return nil, err
	}
	userFound := false
	bundles := []accounts.Bundle{}
	at := map[uint32]int{}
	for rows.Next() {
		userFound = true
		var id *int64
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, err
		}
		if id != nil {
			at[uint32(*id)] = len(bundles)
			bundles = append(bundles, accounts.Bundle{Device: uint32(*id)})
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if !userFound {
		return nil, accounts.ErrNotFound
	}
	if len(bundles) == 0 {
		return bundles, nil
	}

	// Lock the devices' key rows, in device order, and read them under
	// the lock (a rotation that committed meanwhile is seen).
	rows, err = tx.Query(ctx, `
		SELECT device, identity_key, registration_id, signed_prekey_id, signed_prekey, signed_prekey_sig
		FROM device_keys
		WHERE user_name = $1 AND ($2::bigint = 0 OR device = $2::bigint)
		ORDER BY device
		FOR UPDATE`, user, int64(device))
	if err != nil {
		return nil, err
	}
	var keyed []uint32
	for rows.Next() {
		var (
			dev, regID, spkID     int64
			identity, spk, spkSig []byte
		)
		if err := rows.Scan(&dev, &identity, &regID, &spkID, &spk, &spkSig); err != nil {
			rows.Close()
			return nil, err
		}
		i, ok := at[uint32(dev)]
		if !ok { // added after the list was read: left for the next fetch
			continue
		}
		b := &bundles[i]
		b.IdentityKey = identity
		b.RegistrationID = uint32(regID)
		b.SignedPreKey = &accounts.SignedPreKey{ID: uint32(spkID), PublicKey: spk, Signature: spkSig}
		keyed = append(keyed, b.Device)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(keyed) == 0 {
		return bundles, nil
	}

	// Take one prekey of each keyed device and count what is left, in one
	// round trip.
	batch := &pgx.Batch{}
	for _, dev := range keyed {
		batch.Queue(`
			DELETE FROM one_time_prekeys
			WHERE (user_name, device, id) = (
				SELECT user_name, device, id FROM one_time_prekeys
				WHERE user_name = $1 AND device = $2
				ORDER BY id LIMIT 1
				FOR UPDATE SKIP LOCKED)
			RETURNING id, public_key`, user, int64(dev))
		batch.Queue(`SELECT count(*) FROM one_time_prekeys WHERE user_name = $1 AND device = $2`, user, int64(dev))
	}
	br := tx.SendBatch(ctx, batch)
	for _, dev := range keyed {
		b := &bundles[at[dev]]
		var (
			id int64
			pk []byte
		)
		err := br.QueryRow().Scan(&id, &pk)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			br.Close()
			return nil, err
		default:
			b.OneTimePreKey = &accounts.PreKey{ID: uint32(id), PublicKey: pk}
		}
		if err := br.QueryRow().Scan(&b.Remaining); err != nil {
			br.Close()
			return nil, err
		}
	}
	if err := br.Close(); err != nil {
		return nil, err
	}
	return bundles, nil
}

// IdentityKeys implements accounts.KeyStore.
func (s *Store) IdentityKeys(ctx context.Context, user string) (map[uint32][]byte, error) {
	keys, err := s.identityKeys(ctx, user)
	if err != nil {
		return nil, fmt.Errorf("accounts/postgres: identity keys of %q: %w", user, err)
	}
	return keys, nil
}

func (s *Store) identityKeys(ctx context.Context, user string) (map[uint32][]byte, error) {
	if !ident.ValidUser(user) {
		return nil, accounts.ErrNotFound
	}
	rows, err := s.pool.Query(ctx, `
		SELECT d.id, k.identity_key
		FROM users u
		LEFT JOIN devices d ON d.user_name = u.name AND d.removed IS NULL
		LEFT JOIN device_keys k ON k.user_name = d.user_name AND k.device = d.id
		WHERE u.name = $1`, user)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	userFound := false
	keys := map[uint32][]byte{}
	for rows.Next() {
		userFound = true
		var (
			id       *int64
			identity []byte
		)
		if err := rows.Scan(&id, &identity); err != nil {
			return nil, err
		}
		if id != nil && identity != nil {
			keys[uint32(*id)] = identity
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
