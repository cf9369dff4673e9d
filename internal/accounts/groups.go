package accounts

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"time"
)

// GroupStore keeps groups: an id, a version and the members, some of them
// admins. That is all the server knows of a group; its name and picture
// travel end-to-end encrypted between the members. Every backend of Store
// implements it too (accountstest.RunGroups checks it); it is a separate
// interface so that code which needs no groups need not see them.
//
// Every change (creation included) is one transaction that first locks the
// group, so that concurrent changes, from any node, are serialised: each
// sees the one before it, and each that changes something increments the
// version by exactly one. A change that changes nothing (adding members who
// are already in, making an admin an admin) keeps the version and reports
// Changed false.
//
// A group has at most the store's member limit (DefaultMaxGroupMembers
// unless the backend is configured otherwise), always at least one member
// and at least one admin; when its last member leaves it is deleted.
type GroupStore interface {
	// CreateGroup creates a group of creator (its admin) and members
	// (listed twice, or naming the creator, they collapse), with a new
	// random id and version 1. A member that does not exist fails it with a
	// *UnknownUserError (which is ErrNotFound); more than the limit with
	// ErrTooManyMembers.
	CreateGroup(ctx context.Context, creator string, members []string) (GroupChange, error)
	// Group returns a group. ErrNotFound if it does not exist.
	Group(ctx context.Context, id string) (Group, error)
	// Groups returns the groups user is a member of (id and version; no
	// members), in id order. None for an unknown user.
	Groups(ctx context.Context, user string) ([]GroupRef, error)
	// AddMembers adds users to a group. Only an admin may: ErrForbidden for
	// another member, ErrNotFound when by is not a member or the group does
	// not exist. Users already in are ignored. A user that does not exist
	// fails it with a *UnknownUserError, going over the limit with
	// ErrTooManyMembers; either way nothing is added.
	AddMembers(ctx context.Context, id, by string, users []string) (GroupChange, error)
	// RemoveMember removes user from a group: an admin may remove anyone,
	// and every member may remove themselves (by == user: leaving). When
	// the last admin leaves, the longest-standing remaining member becomes
	// admin; when the last member leaves, the group is deleted (Deleted).
	// ErrNotFound when by is not a member or the group does not exist,
	// ErrNotMember when user is not a member, ErrForbidden when by is not
	// an admin and removes someone else.
	RemoveMember(ctx context.Context, id, by, user string) (GroupChange, error)
	// SetAdmin makes user an admin of a group or not. Only an admin may
	// (ErrForbidden otherwise; ErrNotFound, ErrNotMember as RemoveMember).
	// Taking the last admin's role fails with ErrLastAdmin: a group always
	// has an admin (who may leave, handing the role on).
	SetAdmin(ctx context.Context, id, by, user string, admin bool) (GroupChange, error)
}

// GroupVersioner is an optional capability of a GroupStore: a group's
// version alone, one row where Group reads one per member. Every change
// of a group's members or admins moves its version, so a version names
// one membership: a cache of groups (package cache) checks what it holds
// with it. ErrNotFound if the group does not exist.
type GroupVersioner interface {
	GroupVersion(ctx context.Context, id string) (uint64, error)
}

// DefaultMaxGroupMembers is a group's member limit unless a backend is
// configured with another (WhatsApp's group limit).
const DefaultMaxGroupMembers = 1024

// Group is a group as the server knows it.
type Group struct {
	ID string
	// Version counts the changes of the group: 1 when created, one more
	// with every change.
	Version uint64
	// Members in the order they joined (the creator first).
	Members []GroupMember
	Created time.Time
}

// GroupMember is one member of a group.
type GroupMember struct {
	User  string
	Admin bool
}

// IsMember reports whether user is one of g's members, and an admin.
func (g Group) IsMember(user string) (member, admin bool) {
	for _, m := range g.Members {
		if m.User == user {
			return true, m.Admin
		}
	}
	return false, false
}

// GroupRef names a group and its version.
type GroupRef struct {
	ID      string
	Version uint64
}

// GroupChange is what a change of a group did.
type GroupChange struct {
	// Group is the group after the change: its members then and its
	// version. A deleted group has no members, and the version its last
	// change gave it.
	Group Group
	// Changed is false for a change that changed nothing (the version is
	// then the group's current one).
	Changed bool
	// Added and Removed are the users the change added and removed, in
	// order.
	Added, Removed []string
	// Deleted says the last member left and the group is gone.
	Deleted bool
}

// Errors of GroupStore.
var (
	ErrForbidden      = errors.New("accounts: only a group admin may do that")
	ErrNotMember      = errors.New("accounts: not a member of the group")
	ErrTooManyMembers = errors.New("accounts: too many group members")
	ErrLastAdmin      = errors.New("accounts: a group needs an admin")
)

// UnknownUserError says which user named in a group change does not exist.
// It is ErrNotFound (errors.Is).
type UnknownUserError struct{ User string }

func (e *UnknownUserError) Error() string { return fmt.Sprintf("accounts: no user %q", e.User) }

// Unwrap makes the error ErrNotFound.
func (e *UnknownUserError) Unwrap() error { return ErrNotFound }

// TooManyMembersError says by how much a change would go over a group's
// member limit. It is ErrTooManyMembers (errors.Is).
type TooManyMembersError struct {
	Members int // what the group would have
	Limit   int
}

func (e *TooManyMembersError) Error() string {
	return fmt.Sprintf("accounts: the group would have %d members; it may have at most %d", e.Members, e.Limit)
}

// Unwrap makes the error ErrTooManyMembers.
func (e *TooManyMembersError) Unwrap() error { return ErrTooManyMembers }

// TooManyMembers returns a *TooManyMembersError.
func TooManyMembers(n, limit int) error { return &TooManyMembersError{Members: n, Limit: limit} }

// GroupIDBytes is the size of a group id: 128 random bits.
const GroupIDBytes = 16

// groupIDLen is the length of a group id as text (unpadded base64url).
var groupIDLen = base64.RawURLEncoding.EncodedLen(GroupIDBytes)

// NewGroupID returns a new random group id: 128 bits, as 22 characters of
// unpadded URL-safe base64.
//
// An id never begins with '-' or '_': one that began with '-' would read
// as a flag on a command line (courier group show -c3Fb… fails), so
// those draws (1 in 32) are drawn again, leaving ~127.9 random bits.
func NewGroupID() string {
	var b [GroupIDBytes]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			panic("accounts: crypto/rand failed: " + err.Error())
		}
		id := base64.RawURLEncoding.EncodeToString(b[:])
		if id[0] != '-' && id[0] != '_' {
			return id
		}
	}
}

// ValidGroupID reports whether id has the form NewGroupID gives.
func ValidGroupID(id string) bool {
	if len(id) != groupIDLen {
		return false
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(id)
	return err == nil && len(b) == GroupIDBytes
}

// CollapseMembers returns creator followed by members, each user once, in
// first-seen order: the members of a new group.
func CollapseMembers(creator string, members []string) []string {
	out := make([]string, 0, len(members)+1)
	seen := make(map[string]bool, len(members)+1)
	for _, u := range append([]string{creator}, members...) {
		if !seen[u] {
			seen[u] = true
			out = append(out, u)
		}
	}
	return out
}

// The membership rules follow, shared by the GroupStore backends, which
// only read the group, call one of these in their transaction, and write
// what it returns. members is a group's members in join order; errors are
// the GroupStore's: ErrNotFound when by is not a member (a group is
// invisible to outsiders), ErrForbidden when by lacks the admin role the
// change needs, ErrNotMember when the user changed is not a member.

// role reports whether user is one of members, and an admin.
func role(members []GroupMember, user string) (member, admin bool) {
	return Group{Members: members}.IsMember(user)
}

// PlanAdd checks that by may add to the group, and returns the users that
// are not members yet, each once, in the order given; none means nothing
// changes. Past limit members it fails with a *TooManyMembersError.
func PlanAdd(members []GroupMember, by string, users []string, limit int) ([]string, error) {
	member, admin := role(members, by)
	switch {
	case !member:
		return nil, ErrNotFound
	case !admin:
		return nil, ErrForbidden
	}
	var add []string
	seen := map[string]bool{}
	for _, u := range users {
		if in, _ := role(members, u); !in && !seen[u] {
			seen[u] = true
			add = append(add, u)
		}
	}
	if n := len(members) + len(add); len(add) > 0 && n > limit {
		return nil, TooManyMembers(n, limit)
	}
	return add, nil
}

// PlanRemove checks that by may remove user (anyone may leave; only an
// admin removes someone else), and returns the members left. If none of
// them is an admin, the longest-standing takes the role on: promoted names
// them ("" when no one needed to be). No member left means the group ends.
func PlanRemove(members []GroupMember, by, user string) (rest []GroupMember, promoted string, err error) {
	byMember, byAdmin := role(members, by)
	if !byMember {
		return nil, "", ErrNotFound
	}
	if by != user && !byAdmin {
		return nil, "", ErrForbidden
	}
	if in, _ := role(members, user); !in {
		return nil, "", ErrNotMember
	}
	hasAdmin := false
	for _, m := range members {
		if m.User != user {
			rest = append(rest, m)
			hasAdmin = hasAdmin || m.Admin
		}
	}
	if len(rest) > 0 && !hasAdmin {
		rest[0].Admin = true
		promoted = rest[0].User
	}
	return rest, promoted, nil
}

// PlanSetAdmin checks that by (an admin) may give user the admin role or
// take it away, and returns the members with the change; changed is false
// when user already had that role. Taking the role from the last admin
// fails with ErrLastAdmin.
func PlanSetAdmin(members []GroupMember, by, user string, admin bool) (updated []GroupMember, changed bool, err error) {
	byMember, byAdmin := role(members, by)
	switch {
	case !byMember:
		return nil, false, ErrNotFound
	case !byAdmin:
		return nil, false, ErrForbidden
	}
	in, was := role(members, user)
	if !in {
		return nil, false, ErrNotMember
	}
	if was == admin {
		return members, false, nil
	}
	updated = slices.Clone(members)
	admins := 0
	for i := range updated {
		if updated[i].User == user {
			updated[i].Admin = admin
		}
		if updated[i].Admin {
			admins++
		}
	}
	if admins == 0 {
		return nil, false, ErrLastAdmin
	}
	return updated, true, nil
}
