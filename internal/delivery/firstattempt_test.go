package delivery

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/pebble"
)

// keyRecorder is a pebble mailbox that notes the key of every keyed
// append, and whether the caller vouched it new.
type keyRecorder struct {
	*pebble.Store
	mu   sync.Mutex
	keys []string // "key" or "key new"
}

func (r *keyRecorder) note(b mailbox.Batch) {
	if b.Key == "" {
		return
	}
	k := b.Key
	if b.KeyIsNew {
		k += " new"
	}
	r.mu.Lock()
	r.keys = append(r.keys, k)
	r.mu.Unlock()
}

// take returns the keys noted since the last call.
func (r *keyRecorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.keys
	r.keys = nil
	return out
}

func (r *keyRecorder) Append(ctx context.Context, b mailbox.Batch) (mailbox.Result, error) {
	r.note(b)
	return r.Store.Append(ctx, b)
}

func (r *keyRecorder) StartAppend(ctx context.Context, b mailbox.Batch) (mailbox.Pending, error) {
	r.note(b)
	return r.Store.StartAppend(ctx, b)
}

// TestFirstAttempt: a send that is the sender's first attempt has its
// appends skip the key lookup, every chunk of a group message included; a
// later attempt (not first) looks, and gets the first's acceptance.
func TestFirstAttempt(t *testing.T) {
	fx := newGroupFixture(t)
	rec := &keyRecorder{Store: fx.mb}
	cfg := fx.svc.cfg
	cfg.Mailbox = rec
	svc := New(cfg)
	carol1, alice2 := ident.Device{User: "carol", ID: 1}, ident.Device{User: "alice", ID: 2}

	cases := []struct {
		name    string
		req     SendRequest
		keys    []string // the appends' keys, without " new"
		devices []ident.Device
	}{
		{"direct", SendRequest{From: alice1, ClientMsgID: "d1", To: "carol",
			Payloads: []Payload{{Device: carol1, Data: []byte("x")}, {Device: alice2, Data: []byte("y")}}},
			[]string{"send/alice.1/d1"}, []ident.Device{carol1, alice2}},
		{"group", SendRequest{From: alice1, ClientMsgID: "g1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed")},
			[]string{"send/alice.1/g1/0", "send/alice.1/g1/1"}, []ident.Device{alice2, {User: "bob", ID: bobDevices}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			first := tc.req
			first.FirstAttempt = true
			acc, err := svc.Send(t.Context(), first)
			if err != nil || acc.Duplicate {
				t.Fatalf("first attempt: %+v, %v", acc, err)
			}
			var want []string
			for _, k := range tc.keys {
				want = append(want, k+" new")
			}
			if got := rec.take(); !slices.Equal(got, want) {
				t.Fatalf("first attempt appended keys %q; want %q", got, want)
			}

			again, err := svc.Send(t.Context(), tc.req)
			if err != nil || !again.Duplicate || again.ServerID != acc.ServerID || !again.Time.Equal(acc.Time) {
				t.Fatalf("resend: %+v, %v; want a duplicate of %+v", again, err, acc)
			}
			// Every chunk of a resend is looked up (the later ones may be
			// missing, if the first attempt failed part way).
			if got := rec.take(); !slices.Equal(got, tc.keys) {
				t.Fatalf("resend appended keys %q; want %q", got, tc.keys)
			}
			for _, d := range tc.devices {
				n := 0
				for _, e := range fx.entries(t, d) {
					if e.ClientMsgId == tc.req.ClientMsgID {
						n++
					}
				}
				if n != 1 {
					t.Errorf("%s holds %d copies of %s; want 1", d, n, tc.req.ClientMsgID)
				}
			}
		})
	}
}
