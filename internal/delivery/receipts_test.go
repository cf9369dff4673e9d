package delivery

import (
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// plainStore hides the optional capabilities of a mailbox.Store, as a
// backend without them would be.
type plainStore struct{ mailbox.Store }

// ackFixture: alice has devices 1 and 2, bob device 1; alice.1 has sent
// bob three messages.
type ackFixture struct {
	svc  *Service
	mb   mailbox.Store
	sent []string // server ids
}

var (
	alice2 = ident.Device{User: "alice", ID: 2}
	bob1   = ident.Device{User: "bob", ID: 1}
)

func newAckFixture(t *testing.T, plain bool) *ackFixture {
	t.Helper()
	devs := authtest.New()
	for _, u := range []string{"alice", "alice", "bob"} {
		if _, _, err := devs.Register(u); err != nil {
			t.Fatal(err)
		}
	}
	pst, err := pebble.Open("mailbox", pebble.Options{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pst.Close() })
	var mb mailbox.Store = pst
	if plain {
		mb = plainStore{pst}
	}
	fx := &ackFixture{mb: mb}
	fx.svc = New(Config{Mailbox: mb, Accounts: devs, Notifier: &countNotifier{n: map[ident.Device]int{}},
		Metrics: metrics.New(prometheus.NewRegistry()), MaxPayload: 1024, MaxPayloads: 8,
		Now: func() time.Time { return time.UnixMilli(1_700_000_000_000) }})
	for _, id := range []string{"m1", "m2", "m3"} {
		acc, err := fx.svc.Send(t.Context(), SendRequest{From: alice1, To: "bob", ClientMsgID: id,
			Payloads: []Payload{{Device: bob1, Data: []byte("x")}, {Device: alice2, Data: []byte("y")}}})
		if err != nil {
			t.Fatal(err)
		}
		fx.sent = append(fx.sent, acc.ServerID)
	}
	return fx
}

// delivered reads dev's mailbox as a connection would deliver it.
func (fx *ackFixture) delivered(t *testing.T, dev ident.Device) []Delivered {
	t.Helper()
	es, err := fx.mb.Read(t.Context(), dev, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]Delivered, len(es))
	for i, e := range es {
		env := new(pb.Envelope)
		if err := proto.Unmarshal(e.Data, env); err != nil {
			t.Fatal(err)
		}
		out[i] = Delivered{Seq: e.Seq, Envelope: env}
	}
	return out
}

// receipts returns the DELIVERED receipts dev holds, as the server ids of
// the messages each names.
func (fx *ackFixture) receipts(t *testing.T, dev ident.Device) [][]string {
	t.Helper()
	var out [][]string
	for _, d := range fx.delivered(t, dev) {
		env := d.Envelope
		if env.Kind != pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT {
			continue
		}
		if env.Receipt.GetType() != pb.ReceiptType_RECEIPT_TYPE_DELIVERED || env.Sender != "bob" || env.SenderDevice != 1 || env.To != "alice" {
			t.Fatalf("%s holds receipt %v", dev, env)
		}
		var ids []string
		for _, m := range env.Receipt.Messages {
			ids = append(ids, m.ServerId)
		}
		out = append(out, ids)
	}
	return out
}

func TestAckEmitsOneReceiptPerSender(t *testing.T) {
	for _, plain := range []bool{false, true} {
		name := map[bool]string{false: "delete-append", true: "two-operations"}[plain]
		t.Run(name, func(t *testing.T) {
			fx := newAckFixture(t, plain)
			acked := fx.delivered(t, bob1)
			if len(acked) != 3 {
				t.Fatalf("bob.1 holds %d entries, want 3", len(acked))
			}
			// One of them acked without its envelope (not delivered on
			// this connection): its receipt comes from the stored entry.
			acked[1].Envelope = nil
			if err := fx.svc.Ack(t.Context(), bob1, acked); err != nil {
				t.Fatal(err)
			}
			if left := fx.delivered(t, bob1); len(left) != 0 {
				t.Fatalf("bob.1 still holds %d entries", len(left))
			}
			for _, d := range []ident.Device{alice1, alice2} {
				var got []string
				rs := fx.receipts(t, d)
				for _, r := range rs {
					got = append(got, r...)
				}
				slices.Sort(got)
				if want := slices.Sorted(slices.Values(fx.sent)); !slices.Equal(got, want) {
					t.Errorf("%s: receipts name %v, want %v", d, got, want)
				}
				if !plain && len(rs) != 1 {
					t.Errorf("%s: %d receipt envelopes, want one for the whole ack", d, len(rs))
				}
			}
			// Acking again, or acking seqs never delivered, is harmless;
			// with one operation it emits nothing more.
			again := slices.Clone(acked)
			again = append(again, Delivered{Seq: 9999})
			if err := fx.svc.Ack(t.Context(), bob1, again); err != nil {
				t.Fatal(err)
			}
			if rs := fx.receipts(t, alice1); !plain && len(rs) != 1 {
				t.Errorf("after a repeated ack alice.1 holds %d receipts, want 1", len(rs))
			}
			// The sender's own device acking its sync copies and the
			// receipts emits nothing.
			before := len(fx.receipts(t, alice1))
			if err := fx.svc.Ack(t.Context(), alice2, fx.delivered(t, alice2)); err != nil {
				t.Fatal(err)
			}
			if left := fx.delivered(t, alice2); len(left) != 0 {
				t.Errorf("alice.2 still holds %d entries", len(left))
			}
			if n := len(fx.receipts(t, alice1)); n != before {
				t.Errorf("alice.2's ack of its own copies added %d receipts", n-before)
			}
			if dp, ok := fx.mb.(mailbox.Depther); ok {
				if want := int64(len(fx.delivered(t, alice1))); dp.Depth() != want {
					t.Errorf("Depth = %d, want %d", dp.Depth(), want)
				}
			}
		})
	}
}
