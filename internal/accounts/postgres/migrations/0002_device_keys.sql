-- The public Signal-protocol keys of devices (accounts.KeyStore).

-- One row per device that has uploaded keys. The identity key is set by the
-- first upload and never changed; the signed prekey is replaced on rotation.
-- Every write of a device's keys, and every bundle fetch, first locks this
-- row (or the device's row, for the first upload), so that counts of
-- one-time prekeys read in the same transaction are exact.
CREATE TABLE device_keys (
	user_name         text COLLATE "C" NOT NULL,
	device            bigint NOT NULL,
	identity_key      bytea NOT NULL,
	registration_id   bigint NOT NULL CHECK (registration_id BETWEEN 0 AND 4294967295),
	signed_prekey_id  bigint NOT NULL CHECK (signed_prekey_id BETWEEN 0 AND 4294967295),
	signed_prekey     bytea NOT NULL,
	signed_prekey_sig bytea NOT NULL,
	PRIMARY KEY (user_name, device),
	FOREIGN KEY (user_name, device) REFERENCES devices (user_name, id)
);

-- The one-time prekeys a device holds; a bundle fetch deletes the one it
-- hands out. Dropped with the device's keys.
CREATE TABLE one_time_prekeys (
	user_name  text COLLATE "C" NOT NULL,
	device     bigint NOT NULL,
	id         bigint NOT NULL CHECK (id BETWEEN 0 AND 4294967295),
	public_key bytea NOT NULL,
	PRIMARY KEY (user_name, device, id),
	FOREIGN KEY (user_name, device) REFERENCES device_keys (user_name, device) ON DELETE CASCADE
);
