package localstore

// migrations[i] takes the schema from version i to i+1; the version a file
// is at is kept in PRAGMA user_version (0 for a new file). An applied
// migration is never edited: append a new one.
var migrations = []string{
	// 1: the seen set, message history and the outbox.
	`
CREATE TABLE seen (
	server_id TEXT PRIMARY KEY,
	seen_at   INTEGER NOT NULL -- unix ms
) WITHOUT ROWID;

CREATE TABLE messages (
	id            INTEGER PRIMARY KEY,
	server_id     TEXT UNIQUE,        -- NULL until the server accepts it
	client_msg_id TEXT NOT NULL,
	direction     TEXT NOT NULL CHECK (direction IN ('in', 'out')),
	peer          TEXT NOT NULL,      -- the other user of the conversation
	from_user     TEXT NOT NULL,
	from_device   INTEGER NOT NULL,
	body          BLOB NOT NULL,
	time          INTEGER NOT NULL,   -- unix ms: server time once accepted, else when queued
	status        INTEGER NOT NULL,   -- client.Status: how far the message got
	read_at       INTEGER,            -- unix ms, received messages: when this user read it
	UNIQUE (from_user, from_device, client_msg_id)
);
CREATE INDEX messages_peer_time ON messages (peer, time);
CREATE INDEX messages_unread ON messages (peer, time) WHERE direction = 'in' AND read_at IS NULL;

CREATE TABLE outbox (
	seq           INTEGER PRIMARY KEY,
	client_msg_id TEXT NOT NULL UNIQUE,
	from_user     TEXT NOT NULL,
	from_device   INTEGER NOT NULL,
	to_user       TEXT NOT NULL,
	body          BLOB NOT NULL,
	created       INTEGER NOT NULL    -- unix ms
);
`,
	// 2: end-to-end encryption (client/e2e): this device's Signal keys,
	// sessions, the contacts' identity keys and verification; messages the
	// e2e layer opened or sent (for resends); control messages and resends
	// in the outbox; full-text search over the history.
	`
ALTER TABLE outbox ADD COLUMN control INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN content_id TEXT NOT NULL DEFAULT '';

CREATE TABLE e2e_identity (
	id                 INTEGER PRIMARY KEY CHECK (id = 1),
	public_key         BLOB NOT NULL,    -- serialized (33 bytes)
	private_key        BLOB NOT NULL,    -- 32 bytes
	registration_id    INTEGER NOT NULL,
	next_prekey_id     INTEGER NOT NULL, -- the next one-time prekey id to use
	next_signed_id     INTEGER NOT NULL,
	uploaded           INTEGER NOT NULL DEFAULT 0 -- 1 once the server has the identity
);

CREATE TABLE e2e_prekeys (
	id     INTEGER PRIMARY KEY,
	record BLOB NOT NULL
);

CREATE TABLE e2e_signed_prekeys (
	id      INTEGER PRIMARY KEY,
	record  BLOB NOT NULL,
	created INTEGER NOT NULL -- unix ms
);

CREATE TABLE e2e_sessions (
	user   TEXT NOT NULL,
	device INTEGER NOT NULL,
	record BLOB NOT NULL,
	PRIMARY KEY (user, device)
) WITHOUT ROWID;

-- Every device of every user this one has talked with, and its identity key.
CREATE TABLE contacts (
	user         TEXT NOT NULL,
	device       INTEGER NOT NULL,
	identity_key BLOB NOT NULL,
	first_seen   INTEGER NOT NULL, -- unix ms
	PRIMARY KEY (user, device)
) WITHOUT ROWID;

-- Per user: the safety number last seen, and the one the user verified.
CREATE TABLE contact_trust (
	user            TEXT PRIMARY KEY,
	seen_number     TEXT NOT NULL DEFAULT '',
	verified_number TEXT,            -- NULL: not verified
	verified_at     INTEGER,
	changed_at      INTEGER          -- unix ms of the last change of the number
) WITHOUT ROWID;

-- Messages the e2e layer opened, by server id, so that a redelivery is
-- answered without decrypting again and a resend is recognised.
CREATE TABLE e2e_inbox (
	server_id   TEXT PRIMARY KEY,
	from_user   TEXT NOT NULL,
	from_device INTEGER NOT NULL,
	msg_id      TEXT NOT NULL,
	body        BLOB,
	dropped     INTEGER NOT NULL,    -- 1: nothing for the application
	at          INTEGER NOT NULL
);
CREATE UNIQUE INDEX e2e_inbox_msg ON e2e_inbox (from_user, from_device, msg_id) WHERE msg_id != '';

-- Messages this device sealed, kept to answer a resend request.
CREATE TABLE e2e_sent (
	client_msg_id TEXT PRIMARY KEY,
	to_user       TEXT NOT NULL,
	body          BLOB NOT NULL,
	created       INTEGER NOT NULL
) WITHOUT ROWID;

CREATE VIRTUAL TABLE messages_fts USING fts5 (body, tokenize = 'unicode61 remove_diacritics 2');
INSERT INTO messages_fts (rowid, body) SELECT id, CAST(body AS TEXT) FROM messages;
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
	INSERT INTO messages_fts (rowid, body) VALUES (new.id, CAST(new.body AS TEXT));
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
	DELETE FROM messages_fts WHERE rowid = old.id;
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF body ON messages BEGIN
	DELETE FROM messages_fts WHERE rowid = old.id;
	INSERT INTO messages_fts (rowid, body) VALUES (new.id, CAST(new.body AS TEXT));
END;
`,
	// 3: groups: their members and names, group messages in the history
	// and the outbox, receipts per member, and the Signal sender keys
	// (client/e2e).
	`
ALTER TABLE messages ADD COLUMN group_id TEXT NOT NULL DEFAULT '';
ALTER TABLE outbox ADD COLUMN group_id TEXT NOT NULL DEFAULT '';
ALTER TABLE e2e_sent ADD COLUMN group_id TEXT NOT NULL DEFAULT '';

CREATE TABLE groups (
	id      TEXT PRIMARY KEY,
	name    TEXT NOT NULL DEFAULT '', -- learned end-to-end encrypted from a member
	version INTEGER NOT NULL,         -- the server's membership version
	former  INTEGER NOT NULL DEFAULT 0 -- 1: this user is no longer a member
) WITHOUT ROWID;

CREATE TABLE group_members (
	group_id TEXT NOT NULL,
	user     TEXT NOT NULL,
	admin    INTEGER NOT NULL,
	PRIMARY KEY (group_id, user)
) WITHOUT ROWID;

-- The receipt state of a sent group message, per member.
CREATE TABLE group_receipts (
	server_id TEXT NOT NULL,
	user      TEXT NOT NULL,
	status    INTEGER NOT NULL, -- client.Status
	PRIMARY KEY (server_id, user)
) WITHOUT ROWID;

-- Sender keys (libsignal records) per group and sending device: this
-- device's own, and those other member devices handed it.
CREATE TABLE e2e_sender_keys (
	group_id TEXT NOT NULL,
	user     TEXT NOT NULL,
	device   INTEGER NOT NULL,
	record   BLOB NOT NULL,
	PRIMARY KEY (group_id, user, device)
) WITHOUT ROWID;

-- The member devices that hold this device's current sender key (key_id)
-- for a group.
CREATE TABLE e2e_sender_key_shared (
	group_id TEXT NOT NULL,
	user     TEXT NOT NULL,
	device   INTEGER NOT NULL,
	key_id   INTEGER NOT NULL,
	PRIMARY KEY (group_id, user, device)
) WITHOUT ROWID;
`,
}
