package client

import (
	"slices"
	"sync"
	"testing"

	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// A receipt the server combined from several group members' acks names,
// per message, the member it is from: each gets its own event, with the
// envelope's sender for the references that name nobody.
func TestCombinedGroupReceipt(t *testing.T) {
	var mu sync.Mutex
	var got []*ReceiptEvent
	c, err := New(Config{
		Credentials: Credentials{Server: "http://127.0.0.1:1", User: "alice", Device: 1, Secret: "s"},
		Handler: func(ev Event) {
			if r, ok := ev.(*ReceiptEvent); ok {
				mu.Lock()
				got = append(got, r)
				mu.Unlock()
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.tracker.Track(MessageRef{ClientMsgID: "c1"}, GroupPeer("g1"))
	c.tracker.Track(MessageRef{ClientMsgID: "c2"}, "dave")
	env := &courierv1.Envelope{Kind: courierv1.EnvelopeKind_ENVELOPE_KIND_RECEIPT, ServerId: "R1",
		Sender: "bob", SenderDevice: 3, To: "alice", ServerTimeMs: 1000,
		Receipt: &courierv1.Receipt{Type: courierv1.ReceiptType_RECEIPT_TYPE_DELIVERED, Messages: []*courierv1.MessageRef{
			{ServerId: "M1", ClientMsgId: "c1"},
			{ServerId: "M1", ClientMsgId: "c1", By: "carol", ByDevice: 2},
			{ServerId: "M1", ClientMsgId: "c1", By: "dave", ByDevice: 1},
			{ServerId: "M1", ClientMsgId: "c1", By: "carol", ByDevice: 5}, // carol's second device: not news
			{ServerId: "M2", ClientMsgId: "c2", By: "dave", ByDevice: 1},  // a 1:1 message
		}}}
	if !c.deliver(env) {
		t.Fatal("deliver asked not to ack the receipt")
	}
	c.Close()
	mu.Lock()
	defer mu.Unlock()
	var by []string
	for _, r := range got {
		by = append(by, r.By+"/"+string(rune('0'+r.ByDevice))+"/"+r.Group+"/"+r.Message.ClientMsgID)
		if r.Status != StatusDelivered {
			t.Errorf("event %+v: status %v", r, r.Status)
		}
	}
	want := []string{"bob/3/g1/c1", "carol/2/g1/c1", "dave/1/g1/c1", "dave/1//c2"}
	if !slices.Equal(by, want) {
		t.Fatalf("events %v, want %v", by, want)
	}
}
