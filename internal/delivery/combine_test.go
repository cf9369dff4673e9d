package delivery

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// The acks of a group message by its members' devices that queue behind
// a combined write go as combined writes of at most maxCombined devices
// each (a device twice waits for the next): every acked entry is deleted,
// the sender's devices get one receipt per write, naming every member
// device once, and each receipt is handed over once.
func TestGroupAcksCombine(t *testing.T) {
	fx := newGroupFixture(t)
	rec := newEntryRecorder()
	fx.svc.cfg.Notifier = rec
	acc, err := fx.svc.Send(t.Context(), SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("sealed")})
	if err != nil {
		t.Fatal(err)
	}
	targets := fx.targets() // alice.2 (own: not combined) and bob's devices
	acked := make(map[ident.Device][]Delivered, len(targets))
	for _, d := range targets {
		es, err := fx.mb.Read(t.Context(), d, 0, 10)
		if err != nil || len(es) != 1 {
			t.Fatalf("%s: %v, %v", d, es, err)
		}
		env := fx.entries(t, d)[0]
		env.Payload = nil
		acked[d] = []Delivered{{Seq: es[0].Seq, Envelope: env}}
	}
	rec.reset()

	// A write is under way: every ack queues behind it.
	c := &fx.svc.acks
	c.mu.Lock()
	c.busy = true
	c.mu.Unlock()
	jobs := append(slices.Clone(targets), ident.Device{User: "bob", ID: 1}) // bob.1 acks twice
	var wg sync.WaitGroup
	errs := make([]error, len(jobs))
	for i, d := range jobs {
		wg.Go(func() {
			p, err := fx.svc.StartAck(t.Context(), d, acked[d])
			if err == nil {
				err = p.Wait(t.Context())
			}
			errs[i] = err
		})
	}
	combinedJobs := len(jobs) - 1 // all but alice.2's
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.queue)
		c.mu.Unlock()
		if n == combinedJobs {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acks queued, want %d", n, combinedJobs)
		}
		time.Sleep(time.Millisecond)
	}
	// The write under way ends and hands the lead to the first queued.
	c.mu.Lock()
	next := c.queue[0]
	next.lead = true
	c.mu.Unlock()
	close(next.done)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("ack of %s: %v", jobs[i], err)
		}
	}
	if c.busy || len(c.queue) != 0 {
		t.Fatalf("combiner left busy %v with %d queued", c.busy, len(c.queue))
	}
	for _, d := range targets {
		for _, e := range fx.entries(t, d) {
			if e.Kind == pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE {
				t.Fatalf("%s still holds the message", d)
			}
		}
	}
	// bob's 600 devices and bob.1 again: 256 + 256 + 88, then bob.1's
	// second ack alone, which removes nothing.
	wantWrites := (bobDevices + maxCombined - 1) / maxCombined
	for _, a := range []ident.Device{alice1, {User: "alice", ID: 2}} {
		rs := fx.entries(t, a)
		if len(rs) != wantWrites {
			t.Fatalf("%s holds %d receipts, want %d", a, len(rs), wantWrites)
		}
		seen := map[ident.Device]int{}
		for _, r := range rs {
			if r.Kind != pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT || r.Receipt.GetType() != pb.ReceiptType_RECEIPT_TYPE_DELIVERED || r.To != "alice" {
				t.Fatalf("%s holds %v", a, r)
			}
			for _, m := range r.Receipt.Messages {
				if m.ServerId != acc.ServerID || m.ClientMsgId != "c1" {
					t.Fatalf("receipt names %v", m)
				}
				by := ident.Device{User: r.Sender, ID: r.SenderDevice}
				if m.By != "" {
					if m.By == r.Sender && m.ByDevice == r.SenderDevice {
						t.Fatalf("a reference names the receipt's own sender: %v", m)
					}
					by = ident.Device{User: m.By, ID: m.ByDevice}
				}
				seen[by]++
			}
		}
		for i := range bobDevices {
			d := ident.Device{User: "bob", ID: uint32(i + 1)}
			if seen[d] != 1 {
				t.Fatalf("%s: %s named %d times, want 1", a, d, seen[d])
			}
		}
		if len(seen) != bobDevices {
			t.Fatalf("%s: receipts name %d devices, want %d", a, len(seen), bobDevices)
		}
		if n := len(rec.entries[a]); n != wantWrites {
			t.Errorf("%s was handed %d receipts, want %d", a, n, wantWrites)
		}
	}
}

// Acks that cannot be combined, or that arrive with nothing under way,
// keep the receipt of a single ack: no reference names another device.
func TestLoneAckReceiptUnchanged(t *testing.T) {
	fx := newGroupFixture(t)
	if _, err := fx.svc.Send(t.Context(), SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		d := ident.Device{User: "bob", ID: uint32(i + 1)}
		es := fx.entries(t, d)
		if err := fx.svc.Ack(t.Context(), d, []Delivered{{Seq: 1, Envelope: es[0]}}); err != nil {
			t.Fatal(err)
		}
	}
	rs := fx.entries(t, alice1)
	if len(rs) != 3 {
		t.Fatalf("alice.1 holds %d receipts, want 3", len(rs))
	}
	for i, r := range rs {
		if got := fmt.Sprint(r.Sender, ".", r.SenderDevice); got != fmt.Sprint("bob.", i+1) || len(r.Receipt.Messages) != 1 || r.Receipt.Messages[0].By != "" {
			t.Fatalf("receipt %d: from %s, %v", i, got, r.Receipt.Messages)
		}
	}
}

// panicky is an account store whose device look-ups of one user panic
// while armed.
type panicky struct {
	accounts.Store
	user  string
	armed atomic.Bool
}

func (p *panicky) Devices(ctx context.Context, user string) ([]accounts.Device, error) {
	if user == p.user && p.armed.Load() {
		panic("device look-up panicked")
	}
	return p.Store.Devices(ctx, user)
}

// A combined write that panics fails its acks (their entries stay, to
// come again) instead of leaving them waiting, and the next acks are
// written: the combiner is not left busy.
func TestCombinedWritePanics(t *testing.T) {
	fx := newGroupFixture(t)
	pa := &panicky{Store: fx.svc.cfg.Accounts, user: "alice"}
	fx.svc.cfg.Accounts = pa
	if _, err := fx.svc.Send(t.Context(), SendRequest{From: alice1, ClientMsgID: "c1", Group: fx.group.ID, GroupVersion: 1, Payload: []byte("x")}); err != nil {
		t.Fatal(err)
	}
	const n = 5
	acked := map[ident.Device][]Delivered{}
	for i := range n {
		d := ident.Device{User: "bob", ID: uint32(i + 1)}
		acked[d] = []Delivered{{Seq: 1, Envelope: fx.entries(t, d)[0]}}
	}
	c := &fx.svc.acks
	c.mu.Lock()
	c.busy = true
	c.mu.Unlock()
	pa.armed.Store(true)
	errs := make(chan error, n)
	panics := make(chan any, n)
	for d, a := range acked {
		go func() {
			defer func() {
				if p := recover(); p != nil {
					panics <- p
					errs <- nil
				}
			}()
			_, err := fx.svc.StartAck(t.Context(), d, a)
			errs <- err
		}()
	}
	for {
		c.mu.Lock()
		q := len(c.queue)
		c.mu.Unlock()
		if q == n {
			break
		}
		time.Sleep(time.Millisecond)
	}
	c.mu.Lock()
	c.queue[0].lead = true
	next := c.queue[0]
	c.mu.Unlock()
	close(next.done)
	failed := 0
	for range n {
		if err := <-errs; err != nil {
			failed++
		}
	}
	if len(panics) != 1 || failed != n-1 {
		t.Fatalf("%d panics, %d acks failed; want the leader's panic and %d failures", len(panics), failed, n-1)
	}
	for d := range acked {
		if es := fx.entries(t, d); len(es) != 1 {
			t.Fatalf("%s holds %d entries after the failed write, want its message", d, len(es))
		}
	}
	// Disarmed, the same acks go through.
	pa.armed.Store(false)
	for d, a := range acked {
		if err := fx.svc.Ack(t.Context(), d, a); err != nil {
			t.Fatalf("ack of %s after the panic: %v", d, err)
		}
		if es := fx.entries(t, d); len(es) != 0 {
			t.Fatalf("%s still holds %d entries", d, len(es))
		}
	}
}
