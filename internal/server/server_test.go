package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

func TestOnlineDeliveryAndReceipts(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac, bc := dial(t, s.URL, alice), dial(t, s.URL, bob)
	ac.until(isSynced)
	bc.until(isSynced)

	r := ac.send("m1", "bob", dev("bob", 1))
	acc := r.GetAccepted()
	if acc == nil || acc.ServerId == "" || acc.Duplicate {
		t.Fatalf("send: %v", r)
	}
	d := bc.until(isDeliver).GetDeliver()
	env := d.Envelope
	if env.Kind != pb.EnvelopeKind_ENVELOPE_KIND_MESSAGE || env.ServerId != acc.ServerId || env.Sender != "alice" ||
		env.SenderDevice != 1 || env.ClientMsgId != "m1" || env.To != "bob" || string(env.Payload) != "to bob: m1" ||
		env.ServerTimeMs != acc.ServerTimeMs {
		t.Fatalf("delivered envelope %v does not match acceptance %v", env, acc)
	}
	bc.ack(d.Seq)

	rcpt, seq := ac.receipt(pb.ReceiptType_RECEIPT_TYPE_DELIVERED)
	if rcpt.Sender != "bob" || rcpt.SenderDevice != 1 || len(rcpt.Receipt.Messages) != 1 ||
		rcpt.Receipt.Messages[0].ServerId != acc.ServerId || rcpt.Receipt.Messages[0].ClientMsgId != "m1" {
		t.Fatalf("delivered receipt: %v", rcpt)
	}
	ac.ack(seq)

	rr := bc.request(&pb.ClientFrame{Body: &pb.ClientFrame_Read{Read: &pb.Read{Sender: "alice",
		Messages: []*pb.MessageRef{{ServerId: acc.ServerId, ClientMsgId: "m1"}}}}})
	if rr.GetOk() == nil {
		t.Fatalf("read: %v", rr)
	}
	rcpt, seq = ac.receipt(pb.ReceiptType_RECEIPT_TYPE_READ)
	if rcpt.Sender != "bob" || rcpt.Receipt.Messages[0].ServerId != acc.ServerId {
		t.Fatalf("read receipt: %v", rcpt)
	}
	ac.ack(seq)
	// Acking a receipt emits nothing further.
	ac.quiet(isDeliver)
	bc.quiet(isDeliver)
}

func TestOfflineDeliveryOverHTTPSend(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	var ids []string
	for i := range 5 {
		var resp struct {
			ServerID  string `json:"server_id"`
			Duplicate bool   `json:"duplicate"`
		}
		status := doJSON(t, s.URL, "POST", "/v1/messages", alice, map[string]any{
			"client_msg_id": fmt.Sprint("c", i), "to": "bob",
			"payloads": []map[string]any{{"user": "bob", "device": 1, "payload": []byte(fmt.Sprint("hello ", i))}},
		}, &resp)
		if status != http.StatusAccepted || resp.ServerID == "" {
			t.Fatalf("send %d: status %d %+v", i, status, resp)
		}
		ids = append(ids, resp.ServerID)
	}
	bc := dial(t, s.URL, bob)
	var seqs []uint64
	for i := range 5 {
		d := bc.next(5 * time.Second).GetDeliver()
		if d == nil || d.Envelope.ServerId != ids[i] || string(d.Envelope.Payload) != fmt.Sprint("hello ", i) {
			t.Fatalf("entry %d: got %v, want server id %s", i, d, ids[i])
		}
		if i > 0 && d.Seq <= seqs[i-1] {
			t.Fatalf("seqs not increasing: %v then %d", seqs, d.Seq)
		}
		seqs = append(seqs, d.Seq)
	}
	if sy := bc.next(5 * time.Second).GetSynced(); sy == nil || sy.Pending != 5 {
		t.Fatalf("want Synced{5} after the pending entries, got %v", sy)
	}
	bc.ack(seqs...)
}

func TestDeliveryAfterRestartExactlyOnce(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	acc := ac.send("before-restart", "bob", dev("bob", 1)).GetAccepted()
	if acc == nil {
		t.Fatal("not accepted")
	}
	s.Restart(t)

	bc := dial(t, s.URL, bob)
	d := bc.next(5 * time.Second).GetDeliver()
	if d == nil || d.Envelope.ServerId != acc.ServerId {
		t.Fatalf("after restart: got %v, want %s", d, acc.ServerId)
	}
	bc.until(isSynced)
	bc.ack(d.Seq)
	bc.ws.Close(websocket.StatusNormalClosure, "")

	s.Restart(t)
	bc = dial(t, s.URL, bob)
	if sy := bc.next(5 * time.Second).GetSynced(); sy == nil || sy.Pending != 0 {
		t.Fatalf("acked entry delivered again after restart: %v", sy)
	}
}

func TestDuplicateSendStoredOnce(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	first := ac.send("same-id", "bob", dev("bob", 1)).GetAccepted()
	again := ac.send("same-id", "bob", dev("bob", 1)).GetAccepted()
	if first == nil || again == nil || !again.Duplicate || first.Duplicate ||
		again.ServerId != first.ServerId || again.ServerTimeMs != first.ServerTimeMs {
		t.Fatalf("first %v, retry %v: want the same acceptance, marked duplicate", first, again)
	}
	// The same id over HTTP is the same message too.
	var resp struct {
		ServerID  string `json:"server_id"`
		Duplicate bool   `json:"duplicate"`
	}
	doJSON(t, s.URL, "POST", "/v1/messages", alice, map[string]any{"client_msg_id": "same-id", "to": "bob",
		"payloads": []map[string]any{{"user": "bob", "device": 1, "payload": []byte("x")}}}, &resp)
	if resp.ServerID != first.ServerId || !resp.Duplicate {
		t.Fatalf("HTTP retry: %+v", resp)
	}
	bc := dial(t, s.URL, bob)
	bc.until(isDeliver)
	if sy := bc.next(5 * time.Second).GetSynced(); sy == nil || sy.Pending != 1 {
		t.Fatalf("want exactly one stored entry, got %v", sy)
	}
}

// A send marked first_attempt is stored without looking for an earlier
// acceptance, but its key is stored with it: the resend of a client that
// lost the answer (on a new connection, without the flag) is answered
// with the first acceptance and stores nothing.
func TestFirstAttemptThenResendIsDuplicate(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	r := ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "first-id", To: "bob", FirstAttempt: true,
		Payloads: []*pb.DevicePayload{{Device: dev("bob", 1), Payload: []byte("once")}}}}})
	first := r.GetAccepted()
	if first == nil || first.Duplicate || first.ServerId == "" {
		t.Fatalf("first attempt: %v", r)
	}
	ac.ws.Close(websocket.StatusNormalClosure, "")

	ac = dial(t, s.URL, alice)
	again := ac.send("first-id", "bob", dev("bob", 1)).GetAccepted()
	if again == nil || !again.Duplicate || again.ServerId != first.ServerId || again.ServerTimeMs != first.ServerTimeMs {
		t.Fatalf("first attempt %v, resend %v: want the same acceptance, marked duplicate", first, again)
	}
	bc := dial(t, s.URL, bob)
	d := bc.until(isDeliver).GetDeliver()
	if d.Envelope.ServerId != first.ServerId || string(d.Envelope.Payload) != "once" {
		t.Fatalf("delivered %v; want the first attempt %s", d.Envelope, first.ServerId)
	}
	if sy := bc.next(5 * time.Second).GetSynced(); sy == nil || sy.Pending != 1 {
		t.Fatalf("want exactly one stored entry, got %v", sy)
	}

	// The flag does reach the mailbox: claimed for an id already accepted
	// (which a correct client never does), it stores the message again.
	r = ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Send{Send: &pb.Send{ClientMsgId: "first-id", To: "bob", FirstAttempt: true,
		Payloads: []*pb.DevicePayload{{Device: dev("bob", 1), Payload: []byte("twice")}}}}})
	if lie := r.GetAccepted(); lie == nil || lie.Duplicate || lie.ServerId == first.ServerId {
		t.Fatalf("first_attempt for an accepted id: %v; want a new acceptance", r)
	}
	if d := bc.until(isDeliver).GetDeliver(); string(d.Envelope.Payload) != "twice" {
		t.Fatalf("delivered %v; want the second copy", d.Envelope)
	}
}

func TestReceiptsOutOfOrder(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac, bc := dial(t, s.URL, alice), dial(t, s.URL, bob)
	acc := ac.send("m", "bob", dev("bob", 1)).GetAccepted()
	d := bc.until(isDeliver).GetDeliver()
	// bob reports "read" before acking (a client may do that); both events
	// reach alice, read first. Ordering them is the client's job: the state
	// only moves forward.
	if r := bc.request(&pb.ClientFrame{Body: &pb.ClientFrame_Read{Read: &pb.Read{Sender: "alice",
		Messages: []*pb.MessageRef{{ServerId: acc.ServerId}}}}}); r.GetOk() == nil {
		t.Fatalf("read: %v", r)
	}
	bc.ack(d.Seq)
	var types []pb.ReceiptType
	for len(types) < 2 {
		f := ac.until(isDeliver).GetDeliver()
		if f.Envelope.Kind == pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT {
			types = append(types, f.Envelope.Receipt.Type)
			if f.Envelope.Receipt.Messages[0].ServerId != acc.ServerId {
				t.Fatalf("receipt for the wrong message: %v", f.Envelope)
			}
		}
	}
	if types[0] != pb.ReceiptType_RECEIPT_TYPE_READ || types[1] != pb.ReceiptType_RECEIPT_TYPE_DELIVERED {
		t.Fatalf("receipt order %v", types)
	}
}

func TestStaleDeviceLists(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	bob2, _ := s.AddDevice(t, "bob")
	alice2, _ := s.AddDevice(t, "alice")
	ac := dial(t, s.URL, alice)

	cases := []struct {
		name    string
		devices []*pb.DeviceAddress
	}{
		{"missing recipient device", []*pb.DeviceAddress{dev("bob", 1), dev("alice", alice2)}},
		{"missing own other device", []*pb.DeviceAddress{dev("bob", 1), dev("bob", bob2)}},
		{"unknown extra device", []*pb.DeviceAddress{dev("bob", 1), dev("bob", bob2), dev("alice", alice2), dev("bob", 9)}},
		{"own sending device", []*pb.DeviceAddress{dev("bob", 1), dev("bob", bob2), dev("alice", 1)}},
		{"device twice", []*pb.DeviceAddress{dev("bob", 1), dev("bob", 1), dev("alice", alice2)}},
		{"third party", []*pb.DeviceAddress{dev("bob", 1), dev("bob", bob2), dev("alice", alice2), dev("carol", 1)}},
	}
	for i, tc := range cases {
		r := ac.send(fmt.Sprint("stale-", i), "bob", tc.devices...).GetRefused()
		if r == nil || r.Code != pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES {
			t.Fatalf("%s: want STALE_DEVICES, got %v", tc.name, r)
		}
		got := map[string][]uint32{}
		for _, ud := range r.Devices {
			got[ud.User] = ud.Devices
		}
		if fmt.Sprint(got["bob"]) != fmt.Sprint([]uint32{1, bob2}) || fmt.Sprint(got["alice"]) != fmt.Sprint([]uint32{1, alice2}) {
			t.Fatalf("%s: current lists %v", tc.name, got)
		}
	}
	// Nothing of the refused sends was stored anywhere.
	bc := dial(t, s.URL, bob)
	if sy := bc.next(5 * time.Second).GetSynced(); sy == nil || sy.Pending != 0 {
		t.Fatalf("refused send partly delivered: %v", sy)
	}
	// The retry with the right list and the same client id is accepted, and
	// every addressed device gets its payload.
	acc := ac.send("stale-0", "bob", dev("bob", 1), dev("bob", bob2), dev("alice", alice2)).GetAccepted()
	if acc == nil {
		t.Fatal("corrected send not accepted")
	}
	if d := bc.until(isDeliver).GetDeliver(); d.Envelope.ServerId != acc.ServerId {
		t.Fatalf("bob.1 got %v", d)
	}
	s.RemoveDevice(t, "bob", bob2)
	if r := ac.send("after-removal", "bob", dev("bob", 1), dev("bob", bob2), dev("alice", alice2)).GetRefused(); r.GetCode() != pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES {
		t.Fatalf("send to a removed device: %v", r)
	}
}

func TestSendRefusals(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxPayload = 1024 })
	alice := register(t, s.URL, "alice")
	register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	send := func(s *pb.Send) *pb.Refused {
		t.Helper()
		r := ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Send{Send: s}})
		if r.GetRefused() == nil {
			t.Fatalf("send %v: want a refusal, got %v", s, r)
		}
		return r.GetRefused()
	}
	bob1 := []*pb.DevicePayload{{Device: dev("bob", 1), Payload: []byte("x")}}
	for _, tc := range []struct {
		name string
		send *pb.Send
		want pb.RefusalCode
	}{
		{"unknown recipient", &pb.Send{ClientMsgId: "a", To: "nobody", Payloads: []*pb.DevicePayload{{Device: dev("nobody", 1)}}}, pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT},
		{"payload too large", &pb.Send{ClientMsgId: "b", To: "bob", Payloads: []*pb.DevicePayload{{Device: dev("bob", 1), Payload: make([]byte, 1025)}}}, pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE},
		{"no client id", &pb.Send{To: "bob", Payloads: bob1}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"client id too long", &pb.Send{ClientMsgId: strings.Repeat("x", 65), To: "bob", Payloads: bob1}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"bad recipient name", &pb.Send{ClientMsgId: "c", To: "Bob!", Payloads: bob1}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"no payloads", &pb.Send{ClientMsgId: "d", To: "bob"}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"payload without device", &pb.Send{ClientMsgId: "e", To: "bob", Payloads: []*pb.DevicePayload{{Payload: []byte("x")}}}, pb.RefusalCode_REFUSAL_CODE_INVALID},
		{"note to self without another device", &pb.Send{ClientMsgId: "f", To: "alice", Payloads: []*pb.DevicePayload{{Device: dev("alice", 1)}}}, pb.RefusalCode_REFUSAL_CODE_INVALID},
	} {
		if r := send(tc.send); r.Code != tc.want || r.Message == "" {
			t.Errorf("%s: got %v %q, want %v with a message", tc.name, r.Code, r.Message, tc.want)
		}
	}
	// The connection is still fine after every refusal.
	if r := ac.send("ok", "bob", dev("bob", 1)); r.GetAccepted() == nil {
		t.Fatalf("send after refusals: %v", r)
	}
}

func TestMalformedFramesKeepTheConnection(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice := register(t, s.URL, "alice")
	register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	ac.until(isSynced)

	ac.writeRaw(websocket.MessageBinary, []byte{0xff, 0xff, 0xff, 0xff, 0x0f}) // not protobuf
	if e := ac.next(5 * time.Second).GetError(); e.GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Fatalf("garbage: %v", e)
	}
	ac.writeRaw(websocket.MessageText, []byte(`{"send":{}}`))
	if e := ac.next(5 * time.Second).GetError(); e.GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Fatalf("text frame: %v", e)
	}
	if r := ac.request(&pb.ClientFrame{}); r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Fatalf("empty frame: %v", r)
	}
	if r := ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{}}}); r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_MALFORMED {
		t.Fatalf("empty ack: %v", r)
	}
	if r := ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"nobody"}}}}); r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_UNKNOWN_USER {
		t.Fatalf("subscribe to unknown user: %v", r)
	}
	if r := ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Read{Read: &pb.Read{Sender: "nobody", Messages: []*pb.MessageRef{{ServerId: "x"}}}}}); r.GetError().GetCode() != pb.ErrorCode_ERROR_CODE_UNKNOWN_USER {
		t.Fatalf("read for unknown sender: %v", r)
	}
	// Acking a seq never delivered deletes nothing and is harmless.
	ac.ack(12345)
	if r := ac.send("still-works", "bob", dev("bob", 1)); r.GetAccepted() == nil {
		t.Fatalf("send after bad frames: %v", r)
	}
}

func TestOversizedFrameClosesWithReason(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxPayload = 1024; c.MaxPayloads = 2 })
	alice := register(t, s.URL, "alice")
	ac := dial(t, s.URL, alice)
	ac.until(isSynced)
	ac.writeRaw(websocket.MessageBinary, make([]byte, 1024*2+16<<10+1))
	if e := ac.until(func(f *pb.ServerFrame) bool { return f.GetError() != nil }).GetError(); e.Code != pb.ErrorCode_ERROR_CODE_FRAME_TOO_LARGE {
		t.Fatalf("want FRAME_TOO_LARGE, got %v", e)
	}
	<-ac.done
	if websocket.CloseStatus(ac.err) != websocket.StatusMessageTooBig {
		t.Fatalf("close status %v, want 1009", ac.err)
	}
}

func TestWrongCredentials(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice := register(t, s.URL, "alice")
	// Change the first character (the last carries only 4 bits, so a fixed
	// replacement there could equal it).
	wrong := "A"
	if alice.Cred[0] == 'A' {
		wrong = "B"
	}
	for name, a := range map[string]account{
		"wrong credential": {User: "alice", Device: 1, Cred: wrong + alice.Cred[1:]},
		"unknown device":   {User: "alice", Device: 7, Cred: alice.Cred},
		"unknown user":     {User: "mallory", Device: 1, Cred: alice.Cred},
	} {
		if _, err := tryDial(t, s.URL, a); err == nil || !strings.Contains(err.Error(), "401") {
			t.Errorf("%s: websocket: want 401, got %v", name, err)
		}
		var e apiError
		if st := doJSON(t, s.URL, "GET", "/v1/users/alice/devices", a, nil, &e); st != http.StatusUnauthorized || e.Error.Code != "unauthorized" {
			t.Errorf("%s: API: status %d %+v", name, st, e)
		}
	}
	// No credential at all.
	resp, err := http.Get(s.URL + "/v1/ws")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no credential: %d", resp.StatusCode)
	}
}

func TestNewerConnectionSupersedesOlder(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice := register(t, s.URL, "alice")
	register(t, s.URL, "bob")
	old := dial(t, s.URL, alice)
	old.until(isSynced)
	fresh := dial(t, s.URL, alice)
	e := old.until(func(f *pb.ServerFrame) bool { return f.GetError() != nil }).GetError()
	if e.Code != pb.ErrorCode_ERROR_CODE_SUPERSEDED {
		t.Fatalf("older connection told %v", e)
	}
	<-old.done
	if st := websocket.CloseStatus(old.err); st != 4001 {
		t.Fatalf("older connection closed with %v, want 4001", old.err)
	}
	if r := fresh.send("x", "bob", dev("bob", 1)); r.GetAccepted() == nil {
		t.Fatalf("newer connection: %v", r)
	}
}

func TestFlowControlWindow(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	const n = 300
	for i := range n {
		if r := ac.send(fmt.Sprint(i), "bob", dev("bob", 1)); r.GetAccepted() == nil {
			t.Fatalf("send %d: %v", i, r)
		}
	}
	bc := dial(t, s.URL, bob)
	var seqs []uint64
	for range 256 {
		seqs = append(seqs, bc.next(5*time.Second).GetDeliver().GetSeq())
	}
	bc.quiet(func(f *pb.ServerFrame) bool { return isDeliver(f) || isSynced(f) }) // window full: nothing more
	bc.ack(seqs...)
	got := 256
	for {
		f := bc.next(5 * time.Second)
		if f.GetSynced() != nil {
			if f.GetSynced().Pending != n {
				t.Fatalf("Synced %v, want %d", f.GetSynced(), n)
			}
			break
		}
		if f.GetDeliver() != nil {
			got++
		}
	}
	if got != n {
		t.Fatalf("delivered %d of %d", got, n)
	}
}

// The window fills while the receiver is connected (entries handed live,
// the rest left to a mailbox read), then each ack of a single entry frees
// one place and brings exactly the next one: the pump, stopped for want
// of room, is woken by the ack that frees it, every time.
func TestFlowControlWindowLive(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	bc := dial(t, s.URL, bob)
	bc.until(isSynced)
	ac := dial(t, s.URL, alice)
	const n = 300
	for i := range n {
		if r := ac.send(fmt.Sprint(i), "bob", dev("bob", 1)); r.GetAccepted() == nil {
			t.Fatalf("send %d: %v", i, r)
		}
	}
	var inflight []uint64
	for range 256 {
		inflight = append(inflight, bc.until(isDeliver).GetDeliver().GetSeq())
	}
	bc.quiet(isDeliver) // window full: nothing more
	for got := 256; got < n; got++ {
		bc.ack(inflight[0])
		inflight = inflight[1:]
		inflight = append(inflight, bc.until(isDeliver).GetDeliver().GetSeq())
	}
	bc.ack(inflight...)
	bc.quiet(isDeliver)
}

func TestPresenceAndTyping(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	bc := dial(t, s.URL, bob)
	isPresence := func(f *pb.ServerFrame) bool { return f.GetPresence() != nil }
	if r := bc.request(&pb.ClientFrame{Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"alice"}}}}); r.GetOk() == nil {
		t.Fatalf("subscribe: %v", r)
	}
	if p := bc.until(isPresence).GetPresence(); p.User != "alice" || p.Online || p.LastSeenMs != 0 {
		t.Fatalf("initial presence %v", p)
	}
	ac := dial(t, s.URL, alice)
	if p := bc.until(isPresence).GetPresence(); !p.Online {
		t.Fatalf("alice connected: %v", p)
	}
	if r := ac.request(&pb.ClientFrame{Body: &pb.ClientFrame_Typing{Typing: &pb.Typing{To: "bob", Typing: true}}}); r.GetOk() == nil {
		t.Fatalf("typing: %v", r)
	}
	if ty := bc.until(func(f *pb.ServerFrame) bool { return f.GetTyping() != nil }).GetTyping(); ty.From != "alice" || ty.FromDevice != 1 || !ty.Typing {
		t.Fatalf("typing event %v", ty)
	}
	before := time.Now().UnixMilli()
	ac.ws.Close(websocket.StatusNormalClosure, "")
	p := bc.until(isPresence).GetPresence()
	if p.Online || p.LastSeenMs < before-1000 {
		t.Fatalf("alice left: %v", p)
	}
	// Typing is never stored: bob reconnecting gets nothing of it.
	bc.ws.Close(websocket.StatusNormalClosure, "")
	bc = dial(t, s.URL, bob)
	if sy := bc.next(5 * time.Second).GetSynced(); sy == nil || sy.Pending != 0 {
		t.Fatalf("after reconnect: %v", sy)
	}
	// Last seen survives a restart.
	s.Restart(t)
	bc = dial(t, s.URL, bob)
	bc.request(&pb.ClientFrame{Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{Users: []string{"alice"}}}})
	if p2 := bc.until(isPresence).GetPresence(); p2.Online || p2.LastSeenMs != p.LastSeenMs {
		t.Fatalf("last seen after restart: %v, want %d", p2, p.LastSeenMs)
	}
}

func TestGracefulShutdownTellsClients(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice := register(t, s.URL, "alice")
	ac := dial(t, s.URL, alice)
	ac.until(isSynced)
	go s.Server().Shutdown(context.Background())
	e := ac.until(func(f *pb.ServerFrame) bool { return f.GetError() != nil }).GetError()
	if e.Code != pb.ErrorCode_ERROR_CODE_SHUTTING_DOWN || e.RetryAfterMs <= 0 {
		t.Fatalf("shutdown: %v", e)
	}
	<-ac.done
	if st := websocket.CloseStatus(ac.err); st != websocket.StatusGoingAway {
		t.Fatalf("closed with %v, want 1001", ac.err)
	}
}

func TestFullDiskRefusesAndLosesNothing(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	ac := dial(t, s.URL, alice)
	before := ac.send("before", "bob", dev("bob", 1)).GetAccepted()
	ac.ws.CloseNow()

	// The disk "fills up": the server's free-space floor is now above
	// what the disk has.
	s.Stop(t)
	restore := s.SetConfig(func(c *server.Config) { c.MinFreeBytes = 1 << 62 })
	s.Start(t)
	ac = dial(t, s.URL, alice)
	r := ac.send("during", "bob", dev("bob", 1)).GetRefused()
	if r.GetCode() != pb.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE || r.RetryAfterMs <= 0 {
		t.Fatalf("send on a full disk: %v", r)
	}
	var e apiError
	st := doJSON(t, s.URL, "POST", "/v1/messages", alice, map[string]any{"client_msg_id": "during-http", "to": "bob",
		"payloads": []map[string]any{{"user": "bob", "device": 1, "payload": []byte("x")}}}, &e)
	if st != http.StatusServiceUnavailable || e.Error.Code != "storage_unavailable" {
		t.Fatalf("HTTP send on a full disk: %d %+v", st, e)
	}
	// What was accepted before is still delivered.
	bc := dial(t, s.URL, bob)
	if d := bc.next(5 * time.Second).GetDeliver(); d.GetEnvelope().GetServerId() != before.ServerId {
		t.Fatalf("accepted message after disk filled: %v", d)
	}
	bc.ws.CloseNow()
	ac.ws.CloseNow()

	s.Stop(t)
	restore()
	s.Start(t)
	ac = dial(t, s.URL, alice)
	if r := ac.send("during", "bob", dev("bob", 1)); r.GetAccepted() == nil {
		t.Fatalf("retry after space came back: %v", r)
	}
	bc = dial(t, s.URL, bob)
	ids := map[string]bool{}
	for {
		f := bc.next(5 * time.Second)
		if f.GetSynced() != nil {
			break
		}
		ids[f.GetDeliver().GetEnvelope().GetClientMsgId()] = true
	}
	if !ids["before"] || !ids["during"] || len(ids) != 2 {
		t.Fatalf("after recovery bob has %v", ids)
	}
}

func TestHTTPBadInput(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxPayload = 1024; c.MaxPayloads = 2 })
	alice := register(t, s.URL, "alice")
	var e apiError
	if st := doJSON(t, s.URL, "POST", "/v1/accounts", account{}, map[string]string{"name": "alice"}, &e); st != http.StatusConflict || e.Error.Code != "name_taken" {
		t.Errorf("taken name: %d %+v", st, e)
	}
	if st := doJSON(t, s.URL, "POST", "/v1/accounts", account{}, map[string]string{"name": "Alice Smith"}, &e); st != http.StatusBadRequest || e.Error.Code != "invalid_name" {
		t.Errorf("bad name: %d %+v", st, e)
	}
	if st := doJSON(t, s.URL, "GET", "/v1/users/nobody/devices", alice, nil, &e); st != http.StatusNotFound || e.Error.Code != "unknown_user" {
		t.Errorf("unknown user devices: %d %+v", st, e)
	}
	raw := func(path, body string) (int, apiError) {
		req, _ := http.NewRequest("POST", s.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", alice.basic())
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var e apiError
		data, _ := io.ReadAll(resp.Body)
		if err := json.Unmarshal(data, &e); err != nil {
			t.Fatalf("%s: body %q is not a JSON error", path, data)
		}
		return resp.StatusCode, e
	}
	for name, tc := range map[string]struct {
		body   string
		status int
		code   string
	}{
		"not JSON":         {"{not json", 400, "invalid"},
		"unknown field":    {`{"client_msg_id":"a","to":"bob","payloads":[],"admin":true}`, 400, "invalid"},
		"trailing data":    {`{"client_msg_id":"a","to":"bob","payloads":[]} {}`, 400, "invalid"},
		"too many payload": {`{"client_msg_id":"a","to":"bob","payloads":[{"user":"bob","device":1},{"user":"bob","device":2},{"user":"bob","device":3}]}`, 400, "invalid"},
		"huge body":        {`{"client_msg_id":"` + strings.Repeat("a", 1<<20) + `"}`, 413, "payload_too_large"},
		"deep nesting":     {strings.Repeat("[", 100000), 400, "invalid"},
	} {
		if st, e := raw("/v1/messages", tc.body); st != tc.status || e.Error.Code != tc.code {
			t.Errorf("%s: %d %+v, want %d %s", name, st, e, tc.status, tc.code)
		}
	}
}

func TestHealthAndMetrics(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	var h map[string]string
	if st := doJSON(t, s.URL, "GET", "/v1/health", account{}, nil, &h); st != 200 || h["status"] != "ok" {
		t.Fatalf("health: %d %v", st, h)
	}
	ac, bc := dial(t, s.URL, alice), dial(t, s.URL, bob)
	ac.send("m", "bob", dev("bob", 1))
	bc.ack(bc.until(isDeliver).GetDeliver().Seq)
	ac.receipt(pb.ReceiptType_RECEIPT_TYPE_DELIVERED)
	resp, err := http.Get(s.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		"courier_connections 2", "courier_messages_accepted_total 1", "courier_entries_acked_total 1",
		"courier_mailbox_depth 1", `courier_receipts_total{type="delivered"} 1`,
		"courier_accept_to_deliver_seconds_count 1", "go_goroutines", "process_resident_memory_bytes",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

var _ = proto.Marshal

func TestHTTPDevicesAndReadReport(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t)
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	second, _ := s.AddDevice(t, "bob")
	var devs struct {
		User    string `json:"user"`
		Devices []struct {
			ID uint32 `json:"id"`
		} `json:"devices"`
	}
	if st := doJSON(t, s.URL, "GET", "/v1/users/bob/devices", alice, nil, &devs); st != 200 || devs.User != "bob" ||
		len(devs.Devices) != 2 || devs.Devices[0].ID != 1 || devs.Devices[1].ID != second {
		t.Fatalf("devices: %d %+v", st, devs)
	}
	var e apiError
	if st := doJSON(t, s.URL, "POST", "/v1/receipts", bob, map[string]any{"sender": "nobody",
		"messages": []map[string]string{{"server_id": "x"}}}, &e); st != 404 || e.Error.Code != "unknown_user" {
		t.Fatalf("read report for an unknown sender: %d %+v", st, e)
	}
	if st := doJSON(t, s.URL, "POST", "/v1/receipts", bob, map[string]any{"sender": "alice", "messages": []any{}}, &e); st != 400 || e.Error.Code != "invalid" {
		t.Fatalf("empty read report: %d %+v", st, e)
	}
	if st := doJSON(t, s.URL, "POST", "/v1/receipts", bob, map[string]any{"sender": "alice",
		"messages": []map[string]string{{"server_id": "01ABC", "client_msg_id": "c1"}}}, nil); st != http.StatusAccepted {
		t.Fatalf("read report: %d", st)
	}
	ac := dial(t, s.URL, alice)
	rcpt, _ := ac.receipt(pb.ReceiptType_RECEIPT_TYPE_READ)
	if rcpt.Sender != "bob" || rcpt.Receipt.Messages[0].ServerId != "01ABC" || rcpt.Receipt.Messages[0].ClientMsgId != "c1" {
		t.Fatalf("read receipt %v", rcpt)
	}
}
