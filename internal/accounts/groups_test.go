package accounts

import (
	"errors"
	"slices"
	"testing"
)

// TestNewGroupIDReadsAsAnArgument: an id is valid and never begins with a
// character that a command line would take for a flag ('-') or that reads
// as one ('_'), however many are drawn.
func TestNewGroupIDReadsAsAnArgument(t *testing.T) {
	seen := map[string]bool{}
	for range 5000 {
		id := NewGroupID()
		if !ValidGroupID(id) {
			t.Fatalf("NewGroupID() = %q: not a valid group id", id)
		}
		if id[0] == '-' || id[0] == '_' {
			t.Fatalf("NewGroupID() = %q begins with %q", id, id[0])
		}
		if seen[id] {
			t.Fatalf("NewGroupID() repeated %q", id)
		}
		seen[id] = true
	}
}

func members(spec ...string) []GroupMember {
	var ms []GroupMember
	for _, s := range spec {
		admin := s[0] == '*'
		if admin {
			s = s[1:]
		}
		ms = append(ms, GroupMember{User: s, Admin: admin})
	}
	return ms
}

// TestGroupRules checks the membership rules the backends share, case by
// case; the accountstest suite checks them again through each backend.
func TestGroupRules(t *testing.T) {
	g := members("*ann", "bob", "cat")

	t.Run("add", func(t *testing.T) {
		add, err := PlanAdd(g, "ann", []string{"bob", "dan", "eve", "dan"}, 10)
		if err != nil || !slices.Equal(add, []string{"dan", "eve"}) {
			t.Errorf("PlanAdd = %v, %v; want [dan eve]", add, err)
		}
		if add, err := PlanAdd(g, "ann", []string{"bob"}, 3); err != nil || len(add) != 0 {
			t.Errorf("adding a member at the limit = %v, %v; want nothing, no error", add, err)
		}
		if _, err := PlanAdd(g, "ann", []string{"dan"}, 3); !errors.Is(err, ErrTooManyMembers) {
			t.Errorf("past the limit: %v", err)
		}
		if _, err := PlanAdd(g, "bob", []string{"dan"}, 10); !errors.Is(err, ErrForbidden) {
			t.Errorf("by a non-admin: %v", err)
		}
		if _, err := PlanAdd(g, "zed", []string{"dan"}, 10); !errors.Is(err, ErrNotFound) {
			t.Errorf("by an outsider: %v", err)
		}
	})

	t.Run("remove", func(t *testing.T) {
		rest, promoted, err := PlanRemove(g, "ann", "bob")
		if err != nil || promoted != "" || !slices.Equal(rest, members("*ann", "cat")) {
			t.Errorf("admin removes bob = %v, %q, %v", rest, promoted, err)
		}
		rest, promoted, err = PlanRemove(g, "ann", "ann")
		if err != nil || promoted != "bob" || !slices.Equal(rest, members("*bob", "cat")) {
			t.Errorf("last admin leaves = %v, %q, %v; want bob promoted", rest, promoted, err)
		}
		if g[1].Admin {
			t.Error("PlanRemove changed its argument")
		}
		rest, _, err = PlanRemove(members("*ann"), "ann", "ann")
		if err != nil || len(rest) != 0 {
			t.Errorf("last member leaves = %v, %v; want no one left", rest, err)
		}
		if _, _, err := PlanRemove(g, "bob", "bob"); err != nil {
			t.Errorf("a member leaves: %v", err)
		}
		if _, _, err := PlanRemove(g, "bob", "cat"); !errors.Is(err, ErrForbidden) {
			t.Errorf("non-admin removes another: %v", err)
		}
		if _, _, err := PlanRemove(g, "ann", "zed"); !errors.Is(err, ErrNotMember) {
			t.Errorf("removing an outsider: %v", err)
		}
		if _, _, err := PlanRemove(g, "zed", "bob"); !errors.Is(err, ErrNotFound) {
			t.Errorf("by an outsider: %v", err)
		}
	})

	t.Run("admin", func(t *testing.T) {
		up, changed, err := PlanSetAdmin(g, "ann", "bob", true)
		if err != nil || !changed || !slices.Equal(up, members("*ann", "*bob", "cat")) {
			t.Errorf("make bob admin = %v, %v, %v", up, changed, err)
		}
		if g[1].Admin {
			t.Error("PlanSetAdmin changed its argument")
		}
		if _, changed, err := PlanSetAdmin(g, "ann", "ann", true); err != nil || changed {
			t.Errorf("already admin: changed %v, %v", changed, err)
		}
		if _, _, err := PlanSetAdmin(g, "ann", "ann", false); !errors.Is(err, ErrLastAdmin) {
			t.Errorf("last admin steps down: %v", err)
		}
		if _, _, err := PlanSetAdmin(g, "bob", "cat", true); !errors.Is(err, ErrForbidden) {
			t.Errorf("by a non-admin: %v", err)
		}
		if _, _, err := PlanSetAdmin(g, "ann", "zed", true); !errors.Is(err, ErrNotMember) {
			t.Errorf("an outsider: %v", err)
		}
		if _, _, err := PlanSetAdmin(g, "zed", "bob", true); !errors.Is(err, ErrNotFound) {
			t.Errorf("by an outsider: %v", err)
		}
	})
}
