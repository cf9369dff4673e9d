package client

import (
	"fmt"
	"sync"
	"testing"
)

func TestTrackerForwardOnly(t *testing.T) {
	var tr Tracker
	ref := MessageRef{ServerID: "S1", ClientMsgID: "c1"}
	tr.Track(MessageRef{ClientMsgID: "c1"}, "bob")
	if st := tr.Status("c1"); st != StatusPending {
		t.Fatalf("after Track: %v, want pending", st)
	}
	steps := []struct {
		st   Status
		want bool
	}{
		{StatusSent, true},
		{StatusSent, false},      // duplicate acceptance
		{StatusDelivered, true},  //
		{StatusDelivered, false}, // duplicate receipt (another device, a redelivery)
		{StatusRead, true},       //
		{StatusDelivered, false}, // late: delivered after read
		{StatusSent, false},      //
		{StatusPending, false},   //
		{StatusRead, false},      //
	}
	for i, s := range steps {
		if got := tr.Advance(ref, s.st); got != s.want {
			t.Fatalf("step %d: Advance(%v) = %v, want %v", i, s.st, got, s.want)
		}
	}
	for _, id := range []string{"S1", "c1"} {
		if st := tr.Status(id); st != StatusRead {
			t.Errorf("Status(%s) = %v, want read", id, st)
		}
		if p := tr.Peer(id); p != "bob" {
			t.Errorf("Peer(%s) = %q, want bob", id, p)
		}
	}
	if st := tr.Status("nope"); st != StatusUnknown {
		t.Errorf("Status of an unknown message = %v", st)
	}
}

// A receipt can come before the acceptance (a send over HTTP racing the
// connection): the entry known by server id alone and the one known by
// client id alone are one message.
func TestTrackerMergesIDs(t *testing.T) {
	var tr Tracker
	tr.Track(MessageRef{ClientMsgID: "c2"}, "bob")
	if !tr.Advance(MessageRef{ServerID: "S2"}, StatusDelivered) {
		t.Fatal("first receipt for an unknown server id must advance")
	}
	if tr.Advance(MessageRef{ServerID: "S2", ClientMsgID: "c2"}, StatusSent) {
		t.Fatal("acceptance after delivered must not advance")
	}
	if st := tr.Status("c2"); st != StatusDelivered {
		t.Fatalf("Status(c2) = %v, want delivered", st)
	}
	if p := tr.Peer("S2"); p != "bob" {
		t.Fatalf("Peer(S2) = %q, want the peer known by client id", p)
	}
	if !tr.Advance(MessageRef{ClientMsgID: "c2"}, StatusRead) || tr.Status("S2") != StatusRead {
		t.Fatal("read by client id must reach the merged entry")
	}
}

func TestTrackerLimitAndForget(t *testing.T) {
	tr := Tracker{Limit: 3}
	for i := range 10 {
		tr.Advance(MessageRef{ServerID: fmt.Sprint("S", i)}, StatusSent)
	}
	for i := range 10 {
		want := StatusSent
		if i < 7 {
			want = StatusUnknown
		}
		if st := tr.Status(fmt.Sprint("S", i)); st != want {
			t.Errorf("S%d: %v, want %v", i, st, want)
		}
	}
	tr.Forget("S9")
	if st := tr.Status("S9"); st != StatusUnknown {
		t.Errorf("after Forget: %v", st)
	}
	if len(tr.order)-tr.head > 2*tr.live+16 {
		t.Errorf("order holds %d entries for %d live ones", len(tr.order)-tr.head, tr.live)
	}
}

func TestTrackerConcurrent(t *testing.T) {
	tr := Tracker{Limit: 50}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 500 {
				ref := MessageRef{ServerID: fmt.Sprint("S", i%100), ClientMsgID: fmt.Sprint("c", i%100)}
				tr.Advance(ref, Status(1+(i+g)%3))
				tr.Status(ref.ServerID)
			}
		}()
	}
	wg.Wait()
	if tr.live > 50 {
		t.Fatalf("%d live entries over a limit of 50", tr.live)
	}
}

func TestMemorySeenIsBounded(t *testing.T) {
	s := NewMemorySeen(3)
	for i := range 5 {
		s.MarkSeen(fmt.Sprint(i))
		s.MarkSeen(fmt.Sprint(i)) // twice: still one slot
	}
	for i := range 5 {
		got, _ := s.Seen(fmt.Sprint(i))
		if want := i >= 2; got != want {
			t.Errorf("Seen(%d) = %v, want %v", i, got, want)
		}
	}
}
