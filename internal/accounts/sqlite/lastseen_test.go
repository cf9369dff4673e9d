package sqlite

import (
	"context"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
)

// TestSetLastSeenBatch checks that a batch records every existing user's
// time (and clears one given the zero time), skips unknown users, and
// that accounts.SetLastSeenBatch uses it.
func TestSetLastSeenBatch(t *testing.T) {
	s, _ := openTemp(t)
	ctx := context.Background()
	for _, name := range []string{"alice", "bob", "carol"} {
		if _, _, err := s.CreateUser(ctx, name, "phone", []byte("h")); err != nil {
			t.Fatal(err)
		}
	}
	t1 := time.UnixMilli(1_700_000_000_123).UTC()
	if err := s.SetLastSeen(ctx, "carol", t1); err != nil {
		t.Fatal(err)
	}
	var _ accounts.LastSeenBatcher = s
	seen := map[string]time.Time{"alice": t1, "bob": t1.Add(time.Second), "carol": {}, "nobody": t1}
	if err := accounts.SetLastSeenBatch(ctx, s, seen); err != nil {
		t.Fatalf("SetLastSeenBatch: %v", err)
	}
	for name, want := range map[string]time.Time{"alice": t1, "bob": t1.Add(time.Second), "carol": {}} {
		u, err := s.User(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if !u.LastSeen.Equal(want) {
			t.Errorf("%s: last seen %v, want %v", name, u.LastSeen, want)
		}
	}
	if err := s.SetLastSeenBatch(ctx, nil); err != nil {
		t.Errorf("empty batch: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.SetLastSeenBatch(cctx, map[string]time.Time{"alice": t1}); err == nil {
		t.Error("batch with a cancelled context: no error")
	}
}
