package accountstest

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
)

// RunGroups runs the accounts.GroupStore half of the suite. open must
// return a new, empty store whose group member limit is maxMembers (0: the
// default, accounts.DefaultMaxGroupMembers); the suite closes every store
// it opens. Subtests run in parallel, each with its own store.
func RunGroups(t *testing.T, open func(t *testing.T, maxMembers int) accounts.Store) {
	tests := []struct {
		name       string
		maxMembers int
		fn         func(t *testing.T, s accounts.Store, gs accounts.GroupStore)
	}{
		{"CreateAndGet", 0, testGroupCreateAndGet},
		{"CreateUnknownMember", 0, testGroupCreateUnknownMember},
		{"UnknownGroup", 0, testGroupUnknown},
		{"MemberLimit", 3, testGroupMemberLimit},
		{"DefaultMemberLimit", 0, testGroupDefaultMemberLimit},
		{"AddMembers", 0, testGroupAddMembers},
		{"AddMembersRights", 0, testGroupAddMembersRights},
		{"RemoveMember", 0, testGroupRemoveMember},
		{"LastAdminLeaves", 0, testGroupLastAdminLeaves},
		{"LastMemberLeaves", 0, testGroupLastMemberLeaves},
		{"SetAdmin", 0, testGroupSetAdmin},
		{"ConcurrentChanges", 0, testGroupConcurrentChanges},
		{"ConcurrentAddsOverLimit", 5, testGroupConcurrentAddsOverLimit},
		{"Version", 0, testGroupVersion},
	}
	for _, tc := range tests {
		t.Run("Groups"+tc.name, func(t *testing.T) {
			t.Parallel()
			s := open(t, tc.maxMembers)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			gs, ok := s.(accounts.GroupStore)
			if !ok {
				t.Fatalf("%T does not implement accounts.GroupStore; every backend must", s)
			}
			tc.fn(t, s, gs)
		})
	}
}

func users(t *testing.T, s accounts.Store, names ...string) {
	t.Helper()
	for _, n := range names {
		create(t, s, n)
	}
}

func members(ms ...string) []accounts.GroupMember {
	out := make([]accounts.GroupMember, len(ms))
	for i, m := range ms {
		admin := false
		if m[0] == '*' {
			m, admin = m[1:], true
		}
		out[i] = accounts.GroupMember{User: m, Admin: admin}
	}
	return out
}

func checkGroup(t *testing.T, what string, g accounts.Group, id string, version uint64, want []accounts.GroupMember) {
	t.Helper()
	if g.ID != id || g.Version != version || !slices.Equal(g.Members, want) {
		t.Errorf("%s: group %s v%d %v, want %s v%d %v", what, g.ID, g.Version, g.Members, id, version, want)
	}
}

func getGroup(t *testing.T, gs accounts.GroupStore, id string) accounts.Group {
	t.Helper()
	g, err := gs.Group(t.Context(), id)
	if err != nil {
		t.Fatalf("Group(%s): %v", id, err)
	}
	return g
}

func newGroup(t *testing.T, gs accounts.GroupStore, creator string, ms ...string) accounts.Group {
	t.Helper()
	ch, err := gs.CreateGroup(t.Context(), creator, ms)
	if err != nil {
		t.Fatalf("CreateGroup(%s, %v): %v", creator, ms, err)
	}
	return ch.Group
}

func testGroupCreateAndGet(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol")
	ch, err := gs.CreateGroup(ctx, "alice", []string{"bob", "alice", "carol", "bob"})
	if err != nil {
		t.Fatalf("CreateGroup: %v", err)
	}
	g := ch.Group
	if !accounts.ValidGroupID(g.ID) {
		t.Errorf("group id %q is not a valid group id", g.ID)
	}
	want := members("*alice", "bob", "carol")
	checkGroup(t, "CreateGroup", g, g.ID, 1, want)
	if !ch.Changed || ch.Deleted || !slices.Equal(ch.Added, []string{"alice", "bob", "carol"}) || len(ch.Removed) != 0 {
		t.Errorf("CreateGroup change = %+v", ch)
	}
	if g.Created.IsZero() || g.Created.Location() != time.UTC {
		t.Errorf("Created = %v, want a UTC time", g.Created)
	}
	got := getGroup(t, gs, g.ID)
	checkGroup(t, "Group", got, g.ID, 1, want)
	if !got.Created.Equal(g.Created) {
		t.Errorf("Group: Created %v, CreateGroup said %v", got.Created, g.Created)
	}

	// A group of one, and ids are unique.
	solo := newGroup(t, gs, "bob")
	checkGroup(t, "CreateGroup alone", solo, solo.ID, 1, members("*bob"))
	if solo.ID == g.ID {
		t.Errorf("two groups got the id %s", g.ID)
	}

	for user, want := range map[string][]string{
		"alice": {g.ID}, "carol": {g.ID}, "bob": slices.Sorted(slices.Values([]string{g.ID, solo.ID})), "dave": {},
	} {
		refs, err := gs.Groups(ctx, user)
		if err != nil {
			t.Fatalf("Groups(%s): %v", user, err)
		}
		var ids []string
		for _, r := range refs {
			ids = append(ids, r.ID)
			if r.Version != 1 {
				t.Errorf("Groups(%s): %s at version %d, want 1", user, r.ID, r.Version)
			}
		}
		if !slices.Equal(ids, want) && len(ids)+len(want) > 0 {
			t.Errorf("Groups(%s) = %v, want %v", user, ids, want)
		}
		if refs == nil {
			t.Errorf("Groups(%s) = nil, want an empty list", user)
		}
	}
}

func testGroupCreateUnknownMember(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob")
	for _, ms := range [][]string{{"bob", "zed"}, {"Not Valid"}, {""}} {
		_, err := gs.CreateGroup(ctx, "alice", ms)
		if !errors.Is(err, accounts.ErrNotFound) {
			t.Fatalf("CreateGroup with %v: %v, want ErrNotFound", ms, err)
		}
		var uu *accounts.UnknownUserError
		if !errors.As(err, &uu) || uu.User != ms[len(ms)-1] {
			t.Errorf("CreateGroup with %v: %v, want an UnknownUserError naming %q", ms, err, ms[len(ms)-1])
		}
	}
	if _, err := gs.CreateGroup(ctx, "ghost", []string{"alice"}); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("CreateGroup by a missing user: %v, want ErrNotFound", err)
	}
	for _, u := range []string{"alice", "bob"} {
		if refs, err := gs.Groups(ctx, u); err != nil || len(refs) != 0 {
			t.Errorf("Groups(%s) after failed creations = %v, %v; want none", u, refs, err)
		}
	}
}

func testGroupUnknown(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob")
	for _, id := range []string{accounts.NewGroupID(), "", "x", "not a group id at all!", "AAAAAAAAAAAAAAAAAAAAA=", "AAAAAAAAAAAAAAAAAAAAA\x00"} {
		if _, err := gs.Group(ctx, id); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("Group(%q): %v, want ErrNotFound", id, err)
		}
		if _, err := gs.AddMembers(ctx, id, "alice", []string{"bob"}); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("AddMembers(%q): %v, want ErrNotFound", id, err)
		}
		if _, err := gs.RemoveMember(ctx, id, "alice", "alice"); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("RemoveMember(%q): %v, want ErrNotFound", id, err)
		}
		if _, err := gs.SetAdmin(ctx, id, "alice", "alice", true); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("SetAdmin(%q): %v, want ErrNotFound", id, err)
		}
	}
}

func testGroupMemberLimit(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol", "dave", "erin")
	if _, err := gs.CreateGroup(ctx, "alice", []string{"bob", "carol", "dave"}); !errors.Is(err, accounts.ErrTooManyMembers) {
		t.Fatalf("CreateGroup of 4 with a limit of 3: %v, want ErrTooManyMembers", err)
	}
	// Duplicates collapse before counting.
	g := newGroup(t, gs, "alice", "bob", "bob", "alice")
	if _, err := gs.AddMembers(ctx, g.ID, "alice", []string{"carol", "dave"}); !errors.Is(err, accounts.ErrTooManyMembers) {
		t.Fatalf("AddMembers to 4 with a limit of 3: %v, want ErrTooManyMembers", err)
	}
	checkGroup(t, "after a refused add", getGroup(t, gs, g.ID), g.ID, 1, members("*alice", "bob"))
	if _, err := gs.AddMembers(ctx, g.ID, "alice", []string{"carol", "bob"}); err != nil {
		t.Fatalf("AddMembers to 3: %v", err)
	}
	// Already full: adding members who are in is still no change.
	if ch, err := gs.AddMembers(ctx, g.ID, "alice", []string{"carol"}); err != nil || ch.Changed {
		t.Fatalf("AddMembers of a member to a full group: %+v, %v", ch, err)
	}
	if _, err := gs.AddMembers(ctx, g.ID, "alice", []string{"erin"}); !errors.Is(err, accounts.ErrTooManyMembers) {
		t.Fatalf("AddMembers to a full group: %v, want ErrTooManyMembers", err)
	}
}

func testGroupDefaultMemberLimit(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	// Names that do not exist: the limit is checked before the names are
	// looked up, so this needs no thousand accounts.
	ms := make([]string, accounts.DefaultMaxGroupMembers)
	for i := range ms {
		ms[i] = fmt.Sprintf("u%d", i)
	}
	users(t, s, "alice")
	if _, err := gs.CreateGroup(ctx, "alice", ms); !errors.Is(err, accounts.ErrTooManyMembers) {
		t.Fatalf("CreateGroup of %d: %v, want ErrTooManyMembers", len(ms)+1, err)
	}
	if _, err := gs.CreateGroup(ctx, "alice", ms[:accounts.DefaultMaxGroupMembers-1]); !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("CreateGroup of %d unknown users: %v, want ErrNotFound (the limit is not reached)", len(ms), err)
	}
}

func testGroupAddMembers(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol", "dave")
	g := newGroup(t, gs, "alice", "bob")
	ch, err := gs.AddMembers(ctx, g.ID, "alice", []string{"dave", "bob", "carol", "dave"})
	if err != nil {
		t.Fatalf("AddMembers: %v", err)
	}
	want := members("*alice", "bob", "dave", "carol")
	checkGroup(t, "AddMembers", ch.Group, g.ID, 2, want)
	if !ch.Changed || !slices.Equal(ch.Added, []string{"dave", "carol"}) || len(ch.Removed) != 0 || ch.Deleted {
		t.Errorf("AddMembers change = %+v", ch)
	}
	checkGroup(t, "Group", getGroup(t, gs, g.ID), g.ID, 2, want)

	// Idempotent: nothing new, no new version.
	ch, err = gs.AddMembers(ctx, g.ID, "alice", []string{"carol", "bob"})
	if err != nil || ch.Changed || len(ch.Added) != 0 {
		t.Fatalf("AddMembers of members: %+v, %v; want no change", ch, err)
	}
	checkGroup(t, "AddMembers of members", ch.Group, g.ID, 2, want)

	// An unknown user adds nobody.
	users(t, s, "erin")
	_, err = gs.AddMembers(ctx, g.ID, "alice", []string{"erin", "zed"})
	var uu *accounts.UnknownUserError
	if !errors.As(err, &uu) || uu.User != "zed" || !errors.Is(err, accounts.ErrNotFound) {
		t.Fatalf("AddMembers with an unknown user: %v, want an UnknownUserError naming zed", err)
	}
	checkGroup(t, "after a refused add", getGroup(t, gs, g.ID), g.ID, 2, want)
	refs, err := gs.Groups(ctx, "dave")
	if err != nil || len(refs) != 1 || refs[0] != (accounts.GroupRef{ID: g.ID, Version: 2}) {
		t.Errorf("Groups(dave) = %v, %v", refs, err)
	}
}

func testGroupAddMembersRights(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol")
	g := newGroup(t, gs, "alice", "bob")
	if _, err := gs.AddMembers(ctx, g.ID, "bob", []string{"carol"}); !errors.Is(err, accounts.ErrForbidden) {
		t.Errorf("AddMembers by a member who is no admin: %v, want ErrForbidden", err)
	}
	if _, err := gs.AddMembers(ctx, g.ID, "carol", []string{"carol"}); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("AddMembers by a non-member: %v, want ErrNotFound", err)
	}
	checkGroup(t, "after refused adds", getGroup(t, gs, g.ID), g.ID, 1, members("*alice", "bob"))
}

func testGroupRemoveMember(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol", "dave")
	g := newGroup(t, gs, "alice", "bob", "carol", "dave")

	if _, err := gs.RemoveMember(ctx, g.ID, "bob", "carol"); !errors.Is(err, accounts.ErrForbidden) {
		t.Errorf("RemoveMember of another by a non-admin: %v, want ErrForbidden", err)
	}
	users(t, s, "erin")
	if _, err := gs.RemoveMember(ctx, g.ID, "alice", "erin"); !errors.Is(err, accounts.ErrNotMember) {
		t.Errorf("RemoveMember of a non-member: %v, want ErrNotMember", err)
	}
	if _, err := gs.RemoveMember(ctx, g.ID, "erin", "erin"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("RemoveMember by a non-member: %v, want ErrNotFound", err)
	}
	checkGroup(t, "after refused removals", getGroup(t, gs, g.ID), g.ID, 1, members("*alice", "bob", "carol", "dave"))

	// An admin removes anyone.
	ch, err := gs.RemoveMember(ctx, g.ID, "alice", "carol")
	if err != nil {
		t.Fatalf("RemoveMember by the admin: %v", err)
	}
	checkGroup(t, "RemoveMember", ch.Group, g.ID, 2, members("*alice", "bob", "dave"))
	if !ch.Changed || !slices.Equal(ch.Removed, []string{"carol"}) || len(ch.Added) != 0 || ch.Deleted {
		t.Errorf("RemoveMember change = %+v", ch)
	}
	// Anyone leaves.
	ch, err = gs.RemoveMember(ctx, g.ID, "bob", "bob")
	if err != nil {
		t.Fatalf("leave: %v", err)
	}
	checkGroup(t, "leave", ch.Group, g.ID, 3, members("*alice", "dave"))
	checkGroup(t, "Group", getGroup(t, gs, g.ID), g.ID, 3, members("*alice", "dave"))
	for _, u := range []string{"bob", "carol"} {
		if refs, err := gs.Groups(ctx, u); err != nil || len(refs) != 0 {
			t.Errorf("Groups(%s) after leaving = %v, %v", u, refs, err)
		}
	}
	// A removed member can do nothing more.
	if _, err := gs.RemoveMember(ctx, g.ID, "bob", "bob"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("leaving twice: %v, want ErrNotFound", err)
	}
	// A member removed may be added again, and joins last.
	if ch, err := gs.AddMembers(ctx, g.ID, "alice", []string{"carol"}); err != nil {
		t.Fatalf("AddMembers of a removed member: %v", err)
	} else {
		checkGroup(t, "AddMembers again", ch.Group, g.ID, 4, members("*alice", "dave", "carol"))
	}
}

func testGroupLastAdminLeaves(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol", "dave")
	g := newGroup(t, gs, "alice", "bob", "carol")
	if _, err := gs.AddMembers(ctx, g.ID, "alice", []string{"dave"}); err != nil {
		t.Fatal(err)
	}
	if _, err := gs.SetAdmin(ctx, g.ID, "alice", "dave", true); err != nil {
		t.Fatal(err)
	}
	// Another admin remains: nobody is promoted.
	ch, err := gs.RemoveMember(ctx, g.ID, "alice", "alice")
	if err != nil {
		t.Fatal(err)
	}
	checkGroup(t, "an admin leaves", ch.Group, g.ID, 4, members("bob", "carol", "*dave"))
	// The last admin leaves: the longest-standing member takes over.
	ch, err = gs.RemoveMember(ctx, g.ID, "dave", "dave")
	if err != nil {
		t.Fatal(err)
	}
	checkGroup(t, "the last admin leaves", ch.Group, g.ID, 5, members("*bob", "carol"))
	checkGroup(t, "Group", getGroup(t, gs, g.ID), g.ID, 5, members("*bob", "carol"))
	// The new admin may act as one.
	if _, err := gs.RemoveMember(ctx, g.ID, "bob", "carol"); err != nil {
		t.Errorf("RemoveMember by the promoted admin: %v", err)
	}
}

func testGroupLastMemberLeaves(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob")
	g := newGroup(t, gs, "alice", "bob")
	if _, err := gs.RemoveMember(ctx, g.ID, "alice", "bob"); err != nil {
		t.Fatal(err)
	}
	ch, err := gs.RemoveMember(ctx, g.ID, "alice", "alice")
	if err != nil {
		t.Fatalf("the last member leaves: %v", err)
	}
	if !ch.Deleted || !ch.Changed || len(ch.Group.Members) != 0 || ch.Group.Version != 3 || !slices.Equal(ch.Removed, []string{"alice"}) {
		t.Errorf("the last member leaves: change %+v, want the group deleted at version 3", ch)
	}
	if _, err := gs.Group(ctx, g.ID); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("Group of a deleted group: %v, want ErrNotFound", err)
	}
	if refs, err := gs.Groups(ctx, "alice"); err != nil || len(refs) != 0 {
		t.Errorf("Groups(alice) after the group is gone = %v, %v", refs, err)
	}
}

func testGroupSetAdmin(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	users(t, s, "alice", "bob", "carol", "dave")
	g := newGroup(t, gs, "alice", "bob", "carol")
	if _, err := gs.SetAdmin(ctx, g.ID, "bob", "carol", true); !errors.Is(err, accounts.ErrForbidden) {
		t.Errorf("SetAdmin by a non-admin: %v, want ErrForbidden", err)
	}
	if _, err := gs.SetAdmin(ctx, g.ID, "dave", "dave", true); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("SetAdmin by a non-member: %v, want ErrNotFound", err)
	}
	if _, err := gs.SetAdmin(ctx, g.ID, "alice", "dave", true); !errors.Is(err, accounts.ErrNotMember) {
		t.Errorf("SetAdmin of a non-member: %v, want ErrNotMember", err)
	}
	if _, err := gs.SetAdmin(ctx, g.ID, "alice", "alice", false); !errors.Is(err, accounts.ErrLastAdmin) {
		t.Errorf("SetAdmin taking the last admin's role: %v, want ErrLastAdmin", err)
	}
	ch, err := gs.SetAdmin(ctx, g.ID, "alice", "bob", true)
	if err != nil || !ch.Changed {
		t.Fatalf("SetAdmin: %+v, %v", ch, err)
	}
	checkGroup(t, "SetAdmin", ch.Group, g.ID, 2, members("*alice", "*bob", "carol"))
	ch, err = gs.SetAdmin(ctx, g.ID, "bob", "bob", true)
	if err != nil || ch.Changed {
		t.Fatalf("SetAdmin of an admin: %+v, %v; want no change", ch, err)
	}
	checkGroup(t, "SetAdmin of an admin", ch.Group, g.ID, 2, members("*alice", "*bob", "carol"))
	// The new admin demotes the creator, who can then do no more.
	ch, err = gs.SetAdmin(ctx, g.ID, "bob", "alice", false)
	if err != nil || !ch.Changed {
		t.Fatalf("SetAdmin false: %+v, %v", ch, err)
	}
	checkGroup(t, "SetAdmin false", getGroup(t, gs, g.ID), g.ID, 3, members("alice", "*bob", "carol"))
	if _, err := gs.AddMembers(ctx, g.ID, "alice", []string{"dave"}); !errors.Is(err, accounts.ErrForbidden) {
		t.Errorf("AddMembers by a demoted admin: %v, want ErrForbidden", err)
	}
}

// testGroupConcurrentChanges makes many changes of one group at once, as
// several nodes would: each must see the one before it, so every change
// gets its own version and none is lost.
func testGroupConcurrentChanges(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	const n = 16
	names := []string{"admin", "leaver"}
	for i := range n {
		names = append(names, fmt.Sprintf("m%02d", i))
	}
	users(t, s, names...)
	g := newGroup(t, gs, "admin", "leaver")
	if _, err := gs.SetAdmin(ctx, g.ID, "admin", "leaver", true); err != nil {
		t.Fatal(err)
	}
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		versions []uint64
	)
	record := func(ch accounts.GroupChange, err error) {
		if err != nil {
			t.Error(err)
			return
		}
		mu.Lock()
		versions = append(versions, ch.Group.Version)
		mu.Unlock()
	}
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Admins each add a member; half the new members promote
			// nobody, and one admin leaves midway.
			by := "admin"
			if i%2 == 1 {
				by = "leaver"
			}
			ch, err := gs.AddMembers(ctx, g.ID, by, []string{fmt.Sprintf("m%02d", i)})
			if errors.Is(err, accounts.ErrNotFound) && by == "leaver" {
				// leaver has left: it is no member any more.
				ch, err = gs.AddMembers(ctx, g.ID, "admin", []string{fmt.Sprintf("m%02d", i)})
			}
			record(ch, err)
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		record(gs.RemoveMember(ctx, g.ID, "leaver", "leaver"))
	}()
	wg.Wait()
	slices.Sort(versions)
	// Version 2 was the SetAdmin; the n adds and the leave are 3..n+3.
	for i, v := range versions {
		if v != uint64(i+3) {
			t.Fatalf("versions of the concurrent changes = %v, want 3..%d each once", versions, n+3)
		}
	}
	got := getGroup(t, gs, g.ID)
	if got.Version != n+3 || len(got.Members) != n+1 {
		t.Fatalf("after the concurrent changes: v%d with %d members %v, want v%d with %d", got.Version, len(got.Members), got.Members, n+3, n+1)
	}
	if m, admin := got.IsMember("admin"); !m || !admin {
		t.Errorf("admin lost its role: %v", got.Members)
	}
	if m, _ := got.IsMember("leaver"); m {
		t.Errorf("leaver is still a member: %v", got.Members)
	}
}

// testGroupConcurrentAddsOverLimit adds more members than fit, one per
// call, at once: exactly as many as fit get in.
func testGroupConcurrentAddsOverLimit(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	ctx := t.Context()
	const n = 10 // the limit is 5
	names := []string{"alice"}
	for i := range n {
		names = append(names, fmt.Sprintf("m%02d", i))
	}
	users(t, s, names...)
	g := newGroup(t, gs, "alice")
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		ok, full int
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := gs.AddMembers(ctx, g.ID, "alice", []string{fmt.Sprintf("m%02d", i)})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, accounts.ErrTooManyMembers):
				full++
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if ok != 4 || full != n-4 {
		t.Errorf("%d adds went through and %d were refused; want 4 and %d", ok, full, n-4)
	}
	if got := getGroup(t, gs, g.ID); len(got.Members) != 5 || got.Version != 5 {
		t.Errorf("group after the adds: v%d %v; want v5 with 5 members", got.Version, got.Members)
	}
}

// testGroupVersion checks the optional accounts.GroupVersioner: the
// version it reads is Group's after every kind of change, and a group
// that does not exist (never did, malformed id, deleted) is ErrNotFound.
func testGroupVersion(t *testing.T, s accounts.Store, gs accounts.GroupStore) {
	gv, ok := gs.(accounts.GroupVersioner)
	if !ok {
		t.Skip("backend does not implement accounts.GroupVersioner")
	}
	ctx := t.Context()
	check := func(what, id string) {
		t.Helper()
		v, err := gv.GroupVersion(ctx, id)
		if err != nil {
			t.Fatalf("%s: GroupVersion: %v", what, err)
		}
		if g := getGroup(t, gs, id); v != g.Version {
			t.Fatalf("%s: GroupVersion %d, Group's %d", what, v, g.Version)
		}
	}
	users(t, s, "alice", "bob", "carol")
	g := newGroup(t, gs, "alice", "bob")
	check("created", g.ID)
	if _, err := gs.AddMembers(ctx, g.ID, "alice", []string{"carol"}); err != nil {
		t.Fatal(err)
	}
	check("member added", g.ID)
	if _, err := gs.SetAdmin(ctx, g.ID, "alice", "bob", true); err != nil {
		t.Fatal(err)
	}
	check("admin set", g.ID)
	if _, err := gs.RemoveMember(ctx, g.ID, "alice", "carol"); err != nil {
		t.Fatal(err)
	}
	check("member removed", g.ID)
	if v, _ := gv.GroupVersion(ctx, g.ID); v != 4 {
		t.Errorf("version %d after three changes, want 4", v)
	}
	for _, id := range []string{"AAAAAAAAAAAAAAAAAAAAAA", "not a group id", ""} {
		if _, err := gv.GroupVersion(ctx, id); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("GroupVersion(%q) = %v, want ErrNotFound", id, err)
		}
	}
	for _, u := range []string{"bob", "alice"} {
		if _, err := gs.RemoveMember(ctx, g.ID, u, u); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := gv.GroupVersion(ctx, g.ID); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("GroupVersion of a deleted group = %v, want ErrNotFound", err)
	}
}
