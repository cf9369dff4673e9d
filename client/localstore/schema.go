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
}
