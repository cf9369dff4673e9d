package client_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/client"
	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// These tests put the SDK in front of small scripted servers, for the
// behaviours a real server does not produce on demand.

func fakeCreds(url string) client.Credentials {
	return client.Credentials{Server: url, User: "alice", Device: 1, Secret: "secret"}
}

func writeFrame(t testing.TB, ws *websocket.Conn, f *courierv1.ServerFrame) {
	b, err := proto.Marshal(f)
	if err != nil {
		t.Error(err)
		return
	}
	ws.Write(context.Background(), websocket.MessageBinary, b)
}

func hello() *courierv1.ServerFrame {
	return &courierv1.ServerFrame{Body: &courierv1.ServerFrame_Hello{Hello: &courierv1.Hello{
		ProtocolVersion: 1, Device: &courierv1.DeviceAddress{User: "alice", Device: 1},
		MaxPayloadBytes: 64 << 10, MaxFrameBytes: 1 << 20,
	}}}
}

func readFrame(ws *websocket.Conn) (*courierv1.ClientFrame, error) {
	_, b, err := ws.Read(context.Background())
	if err != nil {
		return nil, err
	}
	f := new(courierv1.ClientFrame)
	return f, proto.Unmarshal(b, f)
}

func deliver(seq uint64, env *courierv1.Envelope) *courierv1.ServerFrame {
	return &courierv1.ServerFrame{Body: &courierv1.ServerFrame_Deliver{Deliver: &courierv1.Deliver{Seq: seq, Envelope: env}}}
}

// Entries are acknowledged after Handler returns, in one Ack for the
// burst; a duplicate in the burst is acknowledged without a second event.
func TestAckAfterHandler(t *testing.T) {
	var handled atomic.Int32 // entries Handler has returned for
	acks := make(chan []uint64, 4)
	ackedAfter := make(chan int32, 4)
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/ws", func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		writeFrame(t, ws, hello())
		msg := &courierv1.Envelope{Kind: courierv1.EnvelopeKind_ENVELOPE_KIND_MESSAGE, ServerId: "M1",
			Sender: "bob", SenderDevice: 1, ClientMsgId: "b1", To: "alice", ServerTimeMs: 1000, Payload: []byte("hi")}
		rcpt := &courierv1.Envelope{Kind: courierv1.EnvelopeKind_ENVELOPE_KIND_RECEIPT, ServerId: "R1",
			Sender: "bob", SenderDevice: 1, To: "alice", ServerTimeMs: 2000,
			Receipt: &courierv1.Receipt{Type: courierv1.ReceiptType_RECEIPT_TYPE_READ,
				Messages: []*courierv1.MessageRef{{ServerId: "A1", ClientMsgId: "a1"}}}}
		writeFrame(t, ws, deliver(1, msg))
		writeFrame(t, ws, deliver(2, msg)) // the same message again
		writeFrame(t, ws, deliver(3, rcpt))
		writeFrame(t, ws, &courierv1.ServerFrame{Body: &courierv1.ServerFrame_Synced{Synced: &courierv1.Synced{Pending: 3}}})
		for {
			f, err := readFrame(ws)
			if err != nil {
				return
			}
			if a := f.GetAck(); a != nil {
				ackedAfter <- handled.Load()
				acks <- a.Seqs
				writeFrame(t, ws, &courierv1.ServerFrame{Id: f.Id, Body: &courierv1.ServerFrame_Ok{Ok: &courierv1.Ok{}}})
			}
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	rec := newRecorder()
	c, err := client.New(client.Config{Credentials: fakeCreds(srv.URL), Handler: func(ev client.Event) {
		rec.handle(ev)
		switch ev.(type) {
		case *client.MessageEvent, *client.ReceiptEvent:
			handled.Add(1)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	runClient(t, c)
	waitEvent[*client.SyncedEvent](t, rec, "synced", nil)

	// Handler calls that must have returned before each seq is acked:
	// seq 2 repeats seq 1's message and has no event of its own.
	need := map[uint64]int32{1: 1, 2: 1, 3: 2}
	var seqs []uint64
	for len(seqs) < 3 {
		select {
		case n := <-ackedAfter:
			batch := <-acks
			for _, seq := range batch {
				if n < need[seq] {
					t.Fatalf("seq %d was acked when Handler had returned for %d entries", seq, n)
				}
			}
			seqs = append(seqs, batch...)
		case <-time.After(waitTimeout):
			t.Fatalf("acks so far: %v", seqs)
		}
	}
	if len(seqs) != 3 || seqs[0] != 1 || seqs[1] != 2 || seqs[2] != 3 {
		t.Fatalf("acked %v, want [1 2 3]", seqs)
	}
	if n := count[*client.MessageEvent](rec, nil); n != 1 {
		t.Fatalf("%d message events for one message delivered twice", n)
	}
	r := waitEvent[*client.ReceiptEvent](t, rec, "read receipt", nil)
	if r.Status != client.StatusRead || r.Message.ServerID != "A1" || r.By != "bob" || r.To != "bob" {
		t.Fatalf("receipt %+v", r)
	}
	// Events came in mailbox order, Synced last.
	evs := rec.snapshot()
	var kinds []string
	for _, ev := range evs {
		switch ev.(type) {
		case *client.MessageEvent:
			kinds = append(kinds, "message")
		case *client.ReceiptEvent:
			kinds = append(kinds, "receipt")
		case *client.SyncedEvent:
			kinds = append(kinds, "synced")
		}
	}
	if strings.Join(kinds, " ") != "message receipt synced" {
		t.Fatalf("events in order %v", kinds)
	}
}

// A connection on which nothing arrives (no pong) is taken for dead and
// replaced.
func TestSilentConnectionIsReplaced(t *testing.T) {
	var conns atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/ws", func(w http.ResponseWriter, r *http.Request) {
		conns.Add(1)
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		writeFrame(t, ws, hello())
		for { // read pings, answer nothing
			if _, err := readFrame(ws); err != nil {
				return
			}
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	c, rec := newClient(t, fakeCreds(srv.URL), fast, func(cfg *client.Config) { cfg.PingInterval = 20 * time.Millisecond })
	runClient(t, c)
	ev := waitEvent(t, rec, "a dead connection", func(e *client.ConnectionEvent) bool {
		return e.State == client.Disconnected && e.Err != nil
	})
	if !strings.Contains(ev.Err.Error(), "nothing received") {
		t.Fatalf("disconnected with %v, want a dead-connection error", ev.Err)
	}
	rec.wait(t, "a second connection", func(evs []client.Event) bool {
		n := 0
		for _, ev := range evs {
			if e, ok := ev.(*client.ConnectionEvent); ok && e.State == client.Connected {
				n++
			}
		}
		return n >= 2
	})
}

// Refusals with a retry-after (an HTTP 503 to the upgrade, a SHUTTING_DOWN
// close) put the next attempt no sooner than asked.
func TestReconnectHonoursRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		min     time.Duration
	}{
		{"http 503", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Retry-After", "7")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"code": "shutting_down", "message": "bye"}})
		}, 7 * time.Second},
		{"shutting down frame", func(w http.ResponseWriter, r *http.Request) {
			ws, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			writeFrame(t, ws, hello())
			writeFrame(t, ws, &courierv1.ServerFrame{Body: &courierv1.ServerFrame_Error{Error: &courierv1.Error{
				Code: courierv1.ErrorCode_ERROR_CODE_SHUTTING_DOWN, RetryAfterMs: 60_000}}})
			ws.Close(websocket.StatusGoingAway, "shutting down")
		}, 60 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mux := http.NewServeMux()
			mux.HandleFunc("/v1/ws", tc.handler)
			srv := httptest.NewServer(mux)
			defer srv.Close()
			c, rec := newClient(t, fakeCreds(srv.URL), fast)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- c.Run(ctx) }()
			ev := waitEvent(t, rec, "a refusal", func(e *client.ConnectionEvent) bool { return e.State == client.Disconnected })
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run after cancel: %v, want nil", err)
			}
			var re *client.RefusedError
			if !errors.As(ev.Err, &re) || re.Code != client.CodeShuttingDown {
				t.Errorf("disconnect error %v, want a shutting_down refusal", ev.Err)
			}
			if ev.RetryIn < tc.min || ev.RetryIn > tc.min*3/2 {
				t.Errorf("retry in %v, want within [%v, %v]", ev.RetryIn, tc.min, tc.min*3/2)
			}
		})
	}
}

// The outbox retries transient refusals and stale device lists with the
// same client id, re-addressing the payloads from the stale refusal.
func TestOutboxRetryKeepsClientID(t *testing.T) {
	type attempt struct {
		id      string
		targets []string
	}
	var mu sync.Mutex
	var attempts []attempt
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/users/{name}/devices", func(w http.ResponseWriter, r *http.Request) {
		devs := []map[string]any{{"id": 1}}
		if r.PathValue("name") == "alice" {
			devs = append(devs, map[string]any{"id": 2})
		}
		json.NewEncoder(w).Encode(map[string]any{"user": r.PathValue("name"), "devices": devs})
	})
	mux.HandleFunc("POST /v1/messages", func(w http.ResponseWriter, r *http.Request) {
		var in struct {
			ClientMsgID string `json:"client_msg_id"`
			Payloads    []struct {
				User    string `json:"user"`
				Device  uint32 `json:"device"`
				Payload []byte `json:"payload"`
			} `json:"payloads"`
		}
		json.NewDecoder(r.Body).Decode(&in)
		a := attempt{id: in.ClientMsgID}
		for _, p := range in.Payloads {
			a.targets = append(a.targets, client.Device{User: p.User, ID: p.Device}.String()+"="+string(p.Payload))
		}
		mu.Lock()
		attempts = append(attempts, a)
		n := len(attempts)
		mu.Unlock()
		fail := func(status int, body map[string]any) {
			w.WriteHeader(status)
			json.NewEncoder(w).Encode(map[string]any{"error": body})
		}
		switch n {
		case 1:
			fail(http.StatusServiceUnavailable, map[string]any{"code": "storage_unavailable", "retry_after_ms": 1})
		case 2:
			fail(http.StatusConflict, map[string]any{"code": "stale_devices", "devices": []map[string]any{
				{"user": "bob", "devices": []uint32{1, 3}}, {"user": "alice", "devices": []uint32{1, 2}}}})
		case 3:
			fail(http.StatusTooManyRequests, map[string]any{"code": "rate_limited", "retry_after_ms": 1})
		default:
			w.WriteHeader(http.StatusAccepted)
			json.NewEncoder(w).Encode(map[string]any{"server_id": "S1", "server_time": time.UnixMilli(5000), "duplicate": false})
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	c, _ := newClient(t, fakeCreds(srv.URL), fast, func(cfg *client.Config) {
		cfg.Seal = func(_ context.Context, to client.Device, body []byte) ([]byte, error) {
			return []byte(to.String() + ":" + string(body)), nil
		}
	})
	sent, err := c.Send(context.Background(), "bob", []byte("hi"))
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if sent.ServerID != "S1" || !sent.Time.Equal(time.UnixMilli(5000)) {
		t.Fatalf("sent %+v", sent)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(attempts) != 4 {
		t.Fatalf("%d attempts, want 4", len(attempts))
	}
	for i, a := range attempts {
		if a.id != sent.ClientMsgID {
			t.Fatalf("attempt %d used client id %q, want %q", i, a.id, sent.ClientMsgID)
		}
	}
	want1 := "bob.1=bob.1:hi alice.2=alice.2:hi"
	want3 := "bob.1=bob.1:hi bob.3=bob.3:hi alice.2=alice.2:hi"
	if got := strings.Join(attempts[0].targets, " "); got != want1 {
		t.Errorf("first attempt addressed %s, want %s", got, want1)
	}
	if got := strings.Join(attempts[2].targets, " "); got != want3 {
		t.Errorf("attempt after stale_devices addressed %s, want %s", got, want3)
	}
}

// restoredOutbox is an OutboxStore that an earlier process left holding
// one message.
type restoredOutbox struct{ msg client.OutboxMessage }

func (o restoredOutbox) Add(client.OutboxMessage) error { return nil }
func (o restoredOutbox) Remove(string) error            { return nil }
func (o restoredOutbox) Pending() ([]client.OutboxMessage, error) {
	return []client.OutboxMessage{o.msg}, nil
}

// A Send frame says first_attempt only on the first transmission of a
// message made by this process: not on its resend after a stale_devices
// refusal, nor after the connection was lost before the answer (the
// message then also tried HTTP, and came back on a new connection), and
// never for a message loaded from the outbox an earlier process left.
func TestFirstAttemptOnlyOnFirstTransmission(t *testing.T) {
	var (
		mu    sync.Mutex
		flags = map[string][]bool{} // payload: first_attempt of each Send frame
		posts = map[string]int{}    // payload: HTTP sends
	)
	pinged := make(chan struct{}) // closed once a connection is in use
	var pingOnce sync.Once
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/users/{name}/devices", func(w http.ResponseWriter, r *http.Request) {
		// The first send waits for a connection, so that its first
		// transmission is a Send frame rather than an HTTP request.
		select {
		case <-pinged:
		case <-time.After(waitTimeout):
			t.Error("no ping on a connection")
		}
		json.NewEncoder(w).Encode(map[string]any{"user": r.PathValue("name"), "devices": []map[string]any{{"id": 1}}})
	})
	mux.HandleFunc("POST /v1/messages", func(w http.ResponseWriter, r *http.Request) {
		var in struct {
			Payloads []struct {
				Payload []byte `json:"payload"`
			} `json:"payloads"`
		}
		json.NewDecoder(r.Body).Decode(&in)
		mu.Lock()
		for _, p := range in.Payloads {
			posts[string(p.Payload)]++
		}
		mu.Unlock()
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"code": "storage_unavailable", "retry_after_ms": 1}})
	})
	mux.HandleFunc("/v1/ws", func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		writeFrame(t, ws, hello())
		for {
			f, err := readFrame(ws)
			if err != nil {
				return
			}
			if f.GetPing() != nil {
				pingOnce.Do(func() { close(pinged) })
				writeFrame(t, ws, &courierv1.ServerFrame{Id: f.Id, Body: &courierv1.ServerFrame_Pong{Pong: &courierv1.Pong{}}})
				continue
			}
			s := f.GetSend()
			if s == nil || len(s.Payloads) != 1 {
				t.Errorf("unexpected frame %v", f)
				return
			}
			body := string(s.Payloads[0].Payload)
			mu.Lock()
			flags[body] = append(flags[body], s.FirstAttempt)
			n := len(flags[body])
			mu.Unlock()
			switch {
			case body == "stale" && n == 1:
				writeFrame(t, ws, &courierv1.ServerFrame{Id: f.Id, Body: &courierv1.ServerFrame_Refused{Refused: &courierv1.Refused{
					Code: courierv1.RefusalCode_REFUSAL_CODE_STALE_DEVICES, Devices: []*courierv1.UserDevices{
						{User: "bob", Devices: []uint32{1}}, {User: "alice", Devices: []uint32{1}}}}}})
			case body == "lost" && n == 1:
				return // the connection ends without an answer
			default:
				writeFrame(t, ws, &courierv1.ServerFrame{Id: f.Id, Body: &courierv1.ServerFrame_Accepted{Accepted: &courierv1.Accepted{
					ServerId: "S-" + body, ServerTimeMs: 5000}}})
			}
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	restored := client.OutboxMessage{ClientMsgID: "restored-1", From: client.Device{User: "alice", ID: 1}, To: "bob",
		Body: []byte("restored"), Created: time.Now()}
	c, _ := newClient(t, fakeCreds(srv.URL), fast, func(cfg *client.Config) {
		cfg.PingInterval = 20 * time.Millisecond
		cfg.Outbox = restoredOutbox{restored}
		cfg.Seal = func(_ context.Context, _ client.Device, body []byte) ([]byte, error) { return body, nil }
	})
	runClient(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for _, body := range []string{"stale", "lost"} {
		if sent, err := c.Send(ctx, "bob", []byte(body)); err != nil || sent.ServerID != "S-"+body {
			t.Fatalf("send %s: %+v, %v", body, sent, err)
		}
	}
	// The restored message was ahead of them in the outbox.
	mu.Lock()
	defer mu.Unlock()
	want := map[string][]bool{"restored": {false}, "stale": {true, false}, "lost": {true, false}}
	for body, w := range want {
		if got := flags[body]; !slices.Equal(got, w) {
			t.Errorf("%s: first_attempt of its Send frames %v; want %v", body, got, w)
		}
	}
	if posts["lost"] == 0 {
		t.Errorf("the send cut off by the lost connection did not try HTTP (posts %v)", posts)
	}
}
