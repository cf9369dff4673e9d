-- Groups (accounts.GroupStore): an id, a version and the members. The
-- server knows nothing else of a group. Every change of a group first
-- locks its row (SELECT ... FOR UPDATE), so the changes of one group are
-- serialised across nodes, and each that changes something sets version
-- to one more.

CREATE TABLE groups (
	id       text COLLATE "C" NOT NULL PRIMARY KEY,
	-- Counts the group's changes: 1 when created, one more per change.
	version  bigint NOT NULL CHECK (version >= 1),
	created  timestamptz NOT NULL,
	-- The join order the next member gets.
	next_ord bigint NOT NULL
);

CREATE TABLE group_members (
	group_id  text COLLATE "C" NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
	user_name text COLLATE "C" NOT NULL REFERENCES users (name),
	admin     boolean NOT NULL,
	-- Join order within the group: the smallest is the longest-standing
	-- member (who becomes admin when the last admin leaves).
	ord       bigint NOT NULL,
	PRIMARY KEY (group_id, user_name)
);

-- A user's groups (GroupStore.Groups).
CREATE INDEX group_members_by_user ON group_members (user_name, group_id);
