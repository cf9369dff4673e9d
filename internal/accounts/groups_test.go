package accounts

import "testing"

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
