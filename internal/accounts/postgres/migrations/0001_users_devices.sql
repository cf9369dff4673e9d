-- Users and their devices. Names are compared byte-wise (COLLATE "C"):
-- user names are ASCII, and the primary key index then needs no locale.

CREATE TABLE users (
	name           text COLLATE "C" NOT NULL PRIMARY KEY,
	created        timestamptz NOT NULL,
	-- NULL until the user first connects.
	last_seen      timestamptz,
	-- The id the next AddDevice hands out. Device ids are never reused, so
	-- this only grows; it is the source of truth even if removed device rows
	-- are ever purged. Taking an id updates this row, whose lock serialises
	-- concurrent AddDevice calls for one user (and only for that user). The
	-- upper bound keeps ids within uint32.
	next_device_id bigint NOT NULL DEFAULT 2
		CHECK (next_device_id BETWEEN 2 AND 4294967296)
);

CREATE TABLE devices (
	user_name text COLLATE "C" NOT NULL REFERENCES users (name),
	id        bigint NOT NULL CHECK (id BETWEEN 1 AND 4294967295),
	name      text NOT NULL,
	cred_hash bytea NOT NULL CHECK (octet_length(cred_hash) > 0),
	created   timestamptz NOT NULL,
	-- NULL while the device is active; when it was removed otherwise. Removed
	-- rows are kept so that the (user_name, id) pair stays taken.
	removed   timestamptz,
	PRIMARY KEY (user_name, id)
);
