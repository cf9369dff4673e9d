-- Users and their devices. Timestamps are unix milliseconds (UTC).

CREATE TABLE users (
	name           TEXT    NOT NULL PRIMARY KEY,
	created        INTEGER NOT NULL,
	-- NULL until the user first connects.
	last_seen      INTEGER,
	-- The id the next AddDevice hands out. Device ids are never reused, so
	-- this only grows; it is the source of truth even if removed device rows
	-- are ever purged. The upper bound keeps ids within uint32.
	next_device_id INTEGER NOT NULL DEFAULT 2
		CHECK (next_device_id BETWEEN 2 AND 4294967296)
) STRICT, WITHOUT ROWID;

CREATE TABLE devices (
	user      TEXT    NOT NULL REFERENCES users (name),
	id        INTEGER NOT NULL CHECK (id BETWEEN 1 AND 4294967295),
	name      TEXT    NOT NULL,
	cred_hash BLOB    NOT NULL,
	created   INTEGER NOT NULL,
	-- NULL while the device is active; when it was removed otherwise. Removed
	-- rows are kept so that the (user, id) pair stays taken.
	removed   INTEGER,
	PRIMARY KEY (user, id)
) STRICT, WITHOUT ROWID;
