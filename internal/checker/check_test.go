package checker

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/courier-im/courier/client"
)

var (
	alice1 = client.Device{User: "alice", ID: 1}
	alice2 = client.Device{User: "alice", ID: 2}
	bob1   = client.Device{User: "bob", ID: 1}
	carol1 = client.Device{User: "carol", ID: 1}
)

// synth builds a synthetic history: alice has devices 1 and 2, bob and
// carol one each.
type synth struct {
	h *History
	n int
}

func newSynth() *synth {
	s := &synth{h: NewHistory()}
	s.h.SetDevices("alice", []uint32{1, 2})
	s.h.SetDevices("bob", []uint32{1})
	s.h.SetDevices("carol", []uint32{1})
	return s
}

// msg is one message of a synthetic history.
type msg struct {
	from client.Device
	to   string
	cmid string
	sid  string
	body []byte
}

// send records a send and its acceptance and returns the message.
func (s *synth) send(from client.Device, to string) msg {
	s.n++
	m := msg{from: from, to: to, cmid: fmt.Sprintf("c%03d", s.n), sid: fmt.Sprintf("S%03d", s.n),
		body: fmt.Appendf(nil, "hello %d", s.n)}
	s.h.Send(m.from, m.to, m.cmid, m.body)
	s.h.Accepted(m.from, m.cmid, m.sid)
	return m
}

func (s *synth) deliver(m msg, at client.Device) {
	s.h.Delivered(at, m.from, m.sid, m.cmid, m.body, at.User == m.from.User)
}

// deliverAll delivers m to every device it is owed to.
func (s *synth) deliverAll(m msg) {
	for _, d := range []client.Device{alice1, alice2, bob1, carol1} {
		if d != m.from && (d.User == m.to || d.User == m.from.User) {
			s.deliver(m, d)
		}
	}
}

// clean returns a history with no violations: alice.1 and bob.1 talk,
// alice.2 sees alice's messages, and receipts advance.
func clean() (*synth, []msg) {
	s := newSynth()
	var ms []msg
	for range 3 {
		m := s.send(alice1, "bob")
		s.deliverAll(m)
		ms = append(ms, m)
	}
	r := s.send(bob1, "alice")
	s.deliverAll(r)
	ms = append(ms, r)
	s.h.Receipt(alice1, ms[0].sid, client.StatusSent)
	s.h.Receipt(alice1, ms[0].sid, client.StatusDelivered)
	s.h.Receipt(alice1, ms[0].sid, client.StatusRead)
	return s, ms
}

func kinds(v []Violation) []string {
	var k []string
	for _, x := range v {
		k = append(k, x.Kind)
	}
	return k
}

// expect checks that v holds exactly one violation, of kind, and that its
// report shows every one of the given strings.
func expect(t *testing.T, v []Violation, kind string, shows ...string) {
	t.Helper()
	if len(v) != 1 || v[0].Kind != kind {
		t.Fatalf("violations %v, want one %s", kinds(v), kind)
	}
	var buf bytes.Buffer
	Report(&buf, v)
	out := buf.String()
	t.Logf("report:\n%s", out)
	for _, want := range shows {
		if !strings.Contains(out, want) {
			t.Errorf("report does not show %q", want)
		}
	}
}

func TestCleanHistory(t *testing.T) {
	s, ms := clean()
	if v := s.h.Check(); len(v) != 0 {
		var buf bytes.Buffer
		Report(&buf, v)
		t.Fatalf("clean history has violations:\n%s", buf.String())
	}
	if n := s.h.Outstanding(); n != 0 {
		t.Errorf("Outstanding = %d, want 0", n)
	}
	st := s.h.Stats()
	if st.Sends != len(ms) || st.Accepted != len(ms) || st.Deliveries != 3*2+2 || st.Duplicates != 0 {
		t.Errorf("stats %+v", st)
	}
	var buf bytes.Buffer
	Report(&buf, nil)
	if !strings.Contains(buf.String(), "no violations") {
		t.Errorf("Report(nil) = %q", buf.String())
	}
}

func TestCheckerFindsLost(t *testing.T) {
	s, _ := clean()
	m := s.send(alice1, "bob")
	s.deliver(m, alice2) // never reaches bob.1
	if n := s.h.Outstanding(); n != 1 {
		t.Errorf("Outstanding = %d, want 1", n)
	}
	expect(t, s.h.Check(), Lost, "never reached bob.1", "send      alice.1 → bob cmid="+m.cmid,
		"accepted  alice.1 cmid="+m.cmid+" sid="+m.sid, "delivered at alice.2 from alice.1 sid="+m.sid)
}

func TestCheckerFindsDuplicate(t *testing.T) {
	s, ms := clean()
	s.deliver(ms[1], bob1)
	v := s.h.Check()
	expect(t, v, Duplicate, "shown more than once on bob.1", "sid="+ms[1].sid)
	// Only the events of the offending message are shown.
	for _, e := range v[0].Events {
		if e.ServerID != ms[1].sid && e.ClientMsgID != ms[1].cmid {
			t.Errorf("report shows an unrelated event: %v", e)
		}
	}
	if st := s.h.Stats(); st.Duplicates != 1 {
		t.Errorf("Duplicates = %d, want 1", st.Duplicates)
	}
}

func TestCheckerFindsOutOfOrder(t *testing.T) {
	s := newSynth()
	a := s.send(alice1, "bob")
	b := s.send(alice1, "bob")
	s.deliverAll(b)
	s.deliverAll(a)
	v := s.h.Check()
	if len(v) != 2 || v[0].Kind != OutOfOrder || v[1].Kind != OutOfOrder {
		t.Fatalf("violations %v, want two %s (alice.2 and bob.1)", kinds(v), OutOfOrder)
	}
	var buf bytes.Buffer
	Report(&buf, v)
	for _, want := range []string{"on alice.2", "on bob.1", "sid=" + a.sid, "sid=" + b.sid} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("report does not show %q:\n%s", want, buf.String())
		}
	}
}

func TestCheckerFindsOutOfOrderOnOneDevice(t *testing.T) {
	s := newSynth()
	a := s.send(alice1, "bob")
	b := s.send(alice1, "bob")
	s.deliver(a, alice2)
	s.deliver(b, alice2)
	s.deliver(b, bob1)
	s.deliver(a, bob1)
	expect(t, s.h.Check(), OutOfOrder, "on bob.1", "#1 (sid "+b.sid+")")
}

func TestCheckerFindsUnaddressed(t *testing.T) {
	s, _ := clean()
	m := s.send(alice1, "bob")
	s.deliverAll(m)
	s.h.Delivered(carol1, m.from, m.sid, m.cmid, m.body, false)
	expect(t, s.h.Check(), Unaddressed, "reached carol.1", "delivered at carol.1 from alice.1 sid="+m.sid)
}

func TestCheckerFindsOwnEcho(t *testing.T) {
	s, _ := clean()
	m := s.send(alice1, "bob")
	s.deliverAll(m)
	s.deliver(m, alice1) // the sending device is not addressed
	expect(t, s.h.Check(), Unaddressed, "reached alice.1")
}

func TestCheckerFindsUnknown(t *testing.T) {
	s, _ := clean()
	s.h.Delivered(bob1, alice1, "SXXX", "cXXX", []byte("ghost"), false)
	expect(t, s.h.Check(), Unknown, "never sent", `body="ghost"`)
}

func TestCheckerFindsMismatch(t *testing.T) {
	s, _ := clean()
	m := s.send(alice1, "bob")
	s.deliver(m, alice2)
	s.h.Delivered(bob1, m.from, m.sid, m.cmid, []byte("tampered"), false)
	expect(t, s.h.Check(), Mismatch, `"tampered"`, "body=\""+string(m.body)+"\"")
}

func TestCheckerFindsBackwardReceipt(t *testing.T) {
	s, ms := clean()
	s.h.Receipt(alice1, ms[1].sid, client.StatusRead)
	s.h.Receipt(alice1, ms[1].sid, client.StatusDelivered)
	expect(t, s.h.Check(), BackwardReceipt, "went from read back to delivered",
		"receipt   at alice.1 sid="+ms[1].sid+" status=read", "send      alice.1 → bob cmid="+ms[1].cmid)
}

func TestCheckerFindsConflictingIDs(t *testing.T) {
	s, ms := clean()
	s.h.Accepted(ms[0].from, ms[0].cmid, "SOTHER")
	expect(t, s.h.Check(), Conflict, "accepted as "+ms[0].sid+" and as SOTHER")
}

func TestCheckerUnacceptedSends(t *testing.T) {
	s, _ := clean()
	// Never accepted, never delivered: fine.
	s.h.Send(alice1, "bob", "lost-in-outbox", []byte("maybe"))
	// Never seen accepted, delivered once: fine.
	s.h.Send(alice1, "bob", "late", []byte("late one"))
	s.h.Delivered(bob1, alice1, "SLATE", "late", []byte("late one"), false)
	if v := s.h.Check(); len(v) != 0 {
		t.Fatalf("violations %v, want none", kinds(v))
	}
	if n := s.h.Unaccepted(); n != 2 {
		t.Errorf("Unaccepted = %d, want 2", n)
	}
	// Delivered twice to one device: reported.
	s.h.Delivered(bob1, alice1, "SLATE", "late", []byte("late one"), false)
	expect(t, s.h.Check(), UnacceptedDup, "shown more than once on bob.1", `body="late one"`)
}

func TestCheckerNeedsDeviceSets(t *testing.T) {
	h := NewHistory()
	h.Send(alice1, "dave", "c1", []byte("x"))
	h.Accepted(alice1, "c1", "S1")
	v := h.Check()
	if len(v) == 0 || v[0].Kind != NoDevices {
		t.Fatalf("violations %v, want %s first", kinds(v), NoDevices)
	}
}
