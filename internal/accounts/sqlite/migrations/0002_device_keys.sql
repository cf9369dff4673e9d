-- The public Signal-protocol keys of devices (accounts.KeyStore).

-- One row per device that has uploaded keys. The identity key is set by the
-- first upload and never changed; the signed prekey is replaced on rotation.
CREATE TABLE device_keys (
	user              TEXT    NOT NULL,
	device            INTEGER NOT NULL,
	identity_key      BLOB    NOT NULL,
	registration_id   INTEGER NOT NULL CHECK (registration_id BETWEEN 0 AND 4294967295),
	signed_prekey_id  INTEGER NOT NULL CHECK (signed_prekey_id BETWEEN 0 AND 4294967295),
	signed_prekey     BLOB    NOT NULL,
	signed_prekey_sig BLOB    NOT NULL,
	PRIMARY KEY (user, device),
	FOREIGN KEY (user, device) REFERENCES devices (user, id)
) STRICT, WITHOUT ROWID;

-- The one-time prekeys a device holds; a bundle fetch deletes the one it
-- hands out. Dropped with the device's keys.
CREATE TABLE one_time_prekeys (
	user       TEXT    NOT NULL,
	device     INTEGER NOT NULL,
	id         INTEGER NOT NULL CHECK (id BETWEEN 0 AND 4294967295),
	public_key BLOB    NOT NULL,
	PRIMARY KEY (user, device, id),
	FOREIGN KEY (user, device) REFERENCES device_keys (user, device) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
