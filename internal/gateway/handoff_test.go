package gateway

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// seqsOf returns the seqs of es.
func seqsOf(es []delivery.StoredEntry) []uint64 {
	out := make([]uint64, 0, len(es))
	for _, e := range es {
		out = append(out, e.Seq)
	}
	return out
}

// handoffAt returns a handoff whose first read began at t0 and found the
// end of the mailbox with lastSent sent.
func handoffAt(t0 time.Time, lastSent uint64) *handoff {
	h := &handoff{}
	h.since = monoOf(t0)
	h.readDone(true, lastSent)
	return h
}

// TestHandoffRule checks when a connection may send a handed entry
// without reading its mailbox: only the next seq after lastSent, in
// order, with room in the window, from an append begun after its first
// read, once caught up; everything else asks for a read.
func TestHandoffRule(t *testing.T) {
	t0 := time.Now()
	after := t0.Add(time.Millisecond)
	e := func(seq uint64) delivery.StoredEntry {
		return delivery.StoredEntry{Seq: seq, Data: []byte{byte(seq)}, Began: after}
	}
	type step struct {
		hand     []delivery.StoredEntry
		stale    bool // Notify without an entry
		lastSent uint64
		room     int
		want     []uint64
		read     bool
	}
	cases := []struct {
		name  string
		h     func() *handoff
		steps []step
	}{
		{"before the first read", func() *handoff { return &handoff{} },
			[]step{{hand: []delivery.StoredEntry{e(1)}, room: 8, want: []uint64{}, read: true}}},
		{"next in order", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(6), e(7)}, lastSent: 5, room: 8, want: []uint64{6, 7}}}},
		{"nothing handed", func() *handoff { return handoffAt(t0, 5) },
			[]step{{lastSent: 5, room: 8, want: []uint64{}}}},
		{"gap", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(7)}, lastSent: 5, room: 8, want: []uint64{}, read: true}}},
		{"out of order", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(8), e(6), e(7)}, lastSent: 5, room: 8, want: []uint64{6, 7, 8}}}},
		{"handed twice, and already sent", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(4), e(5), e(6), e(6), e(7)}, lastSent: 5, room: 8, want: []uint64{6, 7}}}},
		{"run then gap", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(6), e(8)}, lastSent: 5, room: 8, want: []uint64{6}, read: true}}},
		{"window full", func() *handoff { return handoffAt(t0, 5) },
			[]step{
				{hand: []delivery.StoredEntry{e(6), e(7)}, lastSent: 5, room: 1, want: []uint64{6}, read: true},
				// Still not caught up after the acks: the read sends 7.
				{hand: []delivery.StoredEntry{e(8)}, lastSent: 6, room: 8, want: []uint64{}, read: true},
			}},
		{"window closed", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(6)}, lastSent: 5, room: 0, want: []uint64{}, read: true}}},
		{"notify without entry", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{e(6)}, stale: true, lastSent: 5, room: 8, want: []uint64{}, read: true}}},
		{"appended before the connection's first read", func() *handoff { return handoffAt(t0, 5) },
			// A reconnect: entry 6 was durable before the new connection
			// read its mailbox, which did not find it (acked and deleted
			// on the older connection); the late hand must not bring it
			// back.
			[]step{{hand: []delivery.StoredEntry{{Seq: 6, Began: t0.Add(-time.Millisecond)}}, lastSent: 5, room: 8, want: []uint64{}, read: true}}},
		{"began exactly at the first read", func() *handoff { return handoffAt(t0, 5) },
			[]step{{hand: []delivery.StoredEntry{{Seq: 6, Began: t0}}, lastSent: 5, room: 8, want: []uint64{}, read: true}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.h()
			for i, st := range tc.steps {
				for _, x := range st.hand {
					h.hand(x)
				}
				if st.stale {
					h.markStale()
				}
				got, read := h.next(st.lastSent, st.room)
				if fmt.Sprint(seqsOf(got)) != fmt.Sprint(st.want) || read != st.read {
					t.Errorf("step %d: next = %v, read %v; want %v, read %v", i, seqsOf(got), read, st.want, st.read)
				}
				h.done()
			}
		})
	}
}

// TestHandoffOwed checks that a connection that dropped a handed entry
// does not count itself caught up before it has sent it, even when the
// read after the drop did not find it (the mailbox stops reads below an
// earlier entry that is not durable yet): the notification of that
// earlier entry then makes it read both.
func TestHandoffOwed(t *testing.T) {
	t0 := time.Now()
	h := handoffAt(t0, 5)
	h.hand(delivery.StoredEntry{Seq: 7, Began: t0.Add(time.Millisecond)})
	if got, read := h.next(5, 8); len(got) != 0 || !read {
		t.Fatalf("gap: next = %v, %v; want a read", seqsOf(got), read)
	}
	h.done()
	h.reading()
	h.readDone(true, 5) // the read found nothing past 5: 6 is not durable yet
	// Nothing more is owed a read until something is handed or notified:
	// the connection waits rather than read again and again.
	if got, read := h.next(5, 8); len(got) != 0 || read {
		t.Fatalf("after a read at the end: next = %v, %v; want to wait", seqsOf(got), read)
	}
	h.done()
	h.hand(delivery.StoredEntry{Seq: 6, Began: t0.Add(time.Millisecond)})
	if got, read := h.next(5, 8); len(got) != 0 || !read {
		t.Fatalf("6 handed while 7 is owed: next = %v, %v; want a read", seqsOf(got), read)
	}
	h.done()
	h.readDone(true, 7) // the read sent 6 and 7
	h.hand(delivery.StoredEntry{Seq: 8, Began: t0.Add(time.Millisecond)})
	if got, read := h.next(7, 8); fmt.Sprint(seqsOf(got)) != "[8]" || read {
		t.Fatalf("caught up again: next = %v, %v; want [8] without a read", seqsOf(got), read)
	}
	h.done()
}

// TestHandoffQueueBound checks that a connection whose queue is full
// drops what comes next and reads its mailbox instead, and that taken
// entries keep no reference to the shared bytes once done.
func TestHandoffQueueBound(t *testing.T) {
	t0 := time.Now()
	h := handoffAt(t0, 0)
	for i := range handQueue + 1 {
		h.hand(delivery.StoredEntry{Seq: uint64(i + 1), Data: []byte("x"), Began: t0.Add(time.Millisecond)})
	}
	got, read := h.next(0, 1000)
	if len(got) != 0 || !read {
		t.Fatalf("overflowed queue: next = %d entries, read %v; want none and a read", len(got), read)
	}
	q := h.taken
	h.done()
	if h.taken != nil || h.q != nil {
		t.Fatal("an idle connection still holds a queue")
	}
	for _, e := range (*q)[:cap(*q)] {
		if e.Data != nil {
			t.Fatal("done kept a reference to handed bytes")
		}
	}
	h.reading()
	// Only the first read sets since.
	if h.since != monoOf(t0) {
		t.Fatal("reading moved the first read's time")
	}
}

// counterValue returns the value of c.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// handTo forwards a delivery service's notifications, entries included,
// to a gateway made after it.
type handTo struct{ g *Gateway }

func (n *handTo) Notify(d ident.Device) { n.g.Notify(d) }
func (n *handTo) NotifyEntry(d ident.Device, e delivery.StoredEntry) {
	n.g.NotifyEntry(d, e)
}

// TestDeliverFromAppend drives a connected device on each transport:
// messages sent one at a time are all handed over, with no mailbox read
// after the one on connect; messages sent from several goroutines at once
// (appends complete, and are handed, out of order) arrive exactly once, in
// seq order. A second connection of the device then gets what the first
// left unacked, from its mailbox.
func TestDeliverFromAppend(t *testing.T) {
	for _, transport := range []string{TransportGoroutine, TransportEpoll} {
		t.Run(transport, func(t *testing.T) {
			fx := newSocketFixture(t, transport, 32, true)
			svc, alice, m := fx.svc, fx.alice, fx.m
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()

			dial := func() (*websocket.Conn, func() *pb.ServerFrame) {
				ws := fx.dial(ctx, t)
				return ws, func() *pb.ServerFrame { t.Helper(); return readFrame(ctx, t, ws) }
			}
			ws, read := dial()
			defer ws.CloseNow()
			ack := func(ws *websocket.Conn, seq uint64) {
				t.Helper()
				b, err := proto.Marshal(&pb.ClientFrame{Id: seq, Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: []uint64{seq}}}})
				if err != nil {
					t.Fatal(err)
				}
				if err := ws.Write(ctx, websocket.MessageBinary, b); err != nil {
					t.Fatal(err)
				}
			}
			if read().GetHello() == nil {
				t.Fatal("first frame is not Hello")
			}
			if read().GetSynced() == nil {
				t.Fatal("second frame is not Synced")
			}

			// One message at a time, each acked before the next is sent:
			// the connection is caught up at every send, so every entry is
			// handed over, and the mailbox is read only once, on connect.
			bob := ident.Device{User: "bob", ID: 1}
			const single = 20
			var last uint64
			for i := range single {
				if _, err := svc.Send(ctx, delivery.SendRequest{From: bob, ClientMsgID: fmt.Sprint("one/", i), To: "alice",
					Payloads: []delivery.Payload{{Device: alice, Data: []byte("one")}}}); err != nil {
					t.Fatal(err)
				}
				d := read().GetDeliver()
				if d == nil || d.Seq <= last || string(d.Envelope.GetPayload()) != "one" {
					t.Fatalf("message %d: got %v after seq %d", i, d, last)
				}
				last = d.Seq
				ack(ws, d.Seq)
				if f := read(); f.GetOk() == nil || f.Id != d.Seq {
					t.Fatalf("ack of %d answered %v", d.Seq, f)
				}
			}
			if h, r := counterValue(t, m.Handed), counterValue(t, m.MailboxReads); h != single || r != 1 {
				t.Fatalf("one at a time: %v of %d handed, %v mailbox reads; want all handed and the one read on connect", h, single, r)
			}

			// Several senders at once: appends to the mailbox complete,
			// and are handed, out of order; the connection falls back to
			// reads whenever it must.
			const senders, each = 4, 50
			const total = senders * each
			var wg sync.WaitGroup
			errs := make(chan error, senders)
			for s := range senders {
				wg.Go(func() {
					for i := range each {
						if _, err := svc.Send(ctx, delivery.SendRequest{From: bob, ClientMsgID: fmt.Sprint(s, "/", i), To: "alice",
							Payloads: []delivery.Payload{{Device: alice, Data: []byte(fmt.Sprint(s, "/", i))}}}); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			seen := map[string]bool{}
			const keep = 5 // left unacked for the second connection
			var unacked []uint64
			var lastAck uint64
			okd := map[uint64]bool{} // acks answered
			for len(seen) < total {
				f := read()
				d := f.GetDeliver()
				if d == nil {
					if f.GetOk() != nil {
						okd[f.Id] = true
					}
					continue
				}
				if d.Seq <= last {
					t.Fatalf("seq %d after %d", d.Seq, last)
				}
				last = d.Seq
				id := string(d.Envelope.GetPayload())
				if seen[id] {
					t.Fatalf("message %s delivered twice", id)
				}
				seen[id] = true
				if len(seen) > total-keep {
					unacked = append(unacked, d.Seq)
				} else {
					ack(ws, d.Seq)
					lastAck = d.Seq
				}
			}
			// Acks are answered in order, once their entries are deleted.
			for !okd[lastAck] {
				if f := read(); f.GetOk() != nil {
					okd[f.Id] = true
				}
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			t.Logf("%d sent at once: %.0f handed, %.0f mailbox reads", total,
				counterValue(t, m.Handed)-single, counterValue(t, m.MailboxReads)-1)

			// The second connection reads what was left from the mailbox.
			ws2, read2 := dial()
			defer ws2.CloseNow()
			var again []uint64
			for {
				f := read2()
				if f.GetSynced() != nil {
					break
				}
				if d := f.GetDeliver(); d != nil {
					again = append(again, d.Seq)
				}
			}
			if fmt.Sprint(again) != fmt.Sprint(unacked) {
				t.Fatalf("second connection got %v before Synced, want the unacked %v", again, unacked)
			}
		})
	}
}
