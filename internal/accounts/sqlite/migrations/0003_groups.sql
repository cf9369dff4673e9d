-- Groups (accounts.GroupStore): an id, a version and the members. The
-- server knows nothing else of a group.

CREATE TABLE groups (
	id       TEXT    NOT NULL PRIMARY KEY,
	-- Counts the group's changes: 1 when created, one more per change.
	version  INTEGER NOT NULL CHECK (version >= 1),
	created  INTEGER NOT NULL,
	-- The join order the next member gets.
	next_ord INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE group_members (
	group_id TEXT    NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
	user     TEXT    NOT NULL REFERENCES users (name),
	admin    INTEGER NOT NULL CHECK (admin IN (0, 1)),
	-- Join order within the group: the smallest is the longest-standing
	-- member (who becomes admin when the last admin leaves).
	ord      INTEGER NOT NULL,
	PRIMARY KEY (group_id, user)
) STRICT, WITHOUT ROWID;

-- A user's groups (GroupStore.Groups).
CREATE INDEX group_members_by_user ON group_members (user, group_id);
