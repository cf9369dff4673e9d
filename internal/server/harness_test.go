package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	pb "github.com/courier-im/courier/proto/courier/v1"
)

// account is a registered device's credentials.
type account struct {
	User   string
	Device uint32
	Cred   string
}

func (a account) basic() string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(fmt.Sprintf("%s.%d:%s", a.User, a.Device, a.Cred)))
}

func register(t testing.TB, base, name string) account {
	t.Helper()
	var resp struct {
		User       string `json:"user"`
		Device     uint32 `json:"device"`
		Credential string `json:"credential"`
	}
	status := doJSON(t, base, "POST", "/v1/accounts", account{}, map[string]string{"name": name}, &resp)
	if status != http.StatusCreated {
		t.Fatalf("register %s: status %d", name, status)
	}
	return account{User: resp.User, Device: resp.Device, Cred: resp.Credential}
}

// doJSON makes an API request (authenticated when a.Cred is set) and
// decodes the JSON answer into out (if not nil). It returns the status.
func doJSON(t testing.TB, base, method, path string, a account, body, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if a.Cred != "" {
		req.Header.Set("Authorization", a.basic())
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			t.Fatalf("%s %s: status %d, undecodable body %q: %v", method, path, resp.StatusCode, data, err)
		}
	}
	return resp.StatusCode
}

type apiError struct {
	Error struct {
		Code         string `json:"code"`
		Message      string `json:"message"`
		RetryAfterMs int64  `json:"retry_after_ms"`
		Devices      []struct {
			User    string   `json:"user"`
			Devices []uint32 `json:"devices"`
		} `json:"devices"`
	} `json:"error"`
}

// wsClient speaks the raw protocol, so tests control every byte.
type wsClient struct {
	t      testing.TB
	a      account
	ws     *websocket.Conn
	frames chan *pb.ServerFrame
	// held holds, in order, frames that request read while waiting for
	// its reply: they come before anything still in frames. Only the
	// test's goroutine reads frames (next, request), so held needs no lock.
	held   []*pb.ServerFrame
	done   chan struct{}
	err    error // why reading stopped, after done
	nextID atomic.Uint64
}

func dial(t testing.TB, base string, a account) *wsClient {
	t.Helper()
	c, err := tryDial(t, base, a)
	if err != nil {
		t.Fatalf("dial %s.%d: %v", a.User, a.Device, err)
	}
	return c
}

func tryDial(t testing.TB, base string, a account) (*wsClient, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/v1/ws", &websocket.DialOptions{
		HTTPHeader: http.Header{"Authorization": {a.basic()}},
	})
	if err != nil {
		return nil, err
	}
	ws.SetReadLimit(64 << 20)
	c := &wsClient{t: t, a: a, ws: ws, frames: make(chan *pb.ServerFrame, 4096), done: make(chan struct{})}
	go c.readLoop()
	t.Cleanup(func() { ws.CloseNow() })
	hello := c.next(5 * time.Second)
	if hello.GetHello() == nil {
		return nil, fmt.Errorf("first frame is not Hello: %v", hello)
	}
	return c, nil
}

func (c *wsClient) readLoop() {
	defer close(c.done)
	for {
		typ, data, err := c.ws.Read(context.Background())
		if err != nil {
			c.err = err
			return
		}
		if typ != websocket.MessageBinary {
			c.err = fmt.Errorf("server sent a text frame")
			return
		}
		f := new(pb.ServerFrame)
		if err := proto.Unmarshal(data, f); err != nil {
			c.err = fmt.Errorf("undecodable server frame: %v", err)
			return
		}
		c.frames <- f
	}
}

// next returns the next frame, failing the test after timeout.
func (c *wsClient) next(timeout time.Duration) *pb.ServerFrame {
	c.t.Helper()
	if len(c.held) > 0 {
		f := c.held[0]
		c.held = c.held[1:]
		return f
	}
	select {
	case f := <-c.frames:
		return f
	case <-c.done:
		select {
		case f := <-c.frames:
			return f
		default:
		}
		c.t.Fatalf("%s.%d: connection ended waiting for a frame: %v", c.a.User, c.a.Device, c.err)
	case <-time.After(timeout):
		c.t.Fatalf("%s.%d: no frame within %v", c.a.User, c.a.Device, timeout)
	}
	return nil
}

// until returns the first frame matching pred, skipping others.
func (c *wsClient) until(pred func(*pb.ServerFrame) bool) *pb.ServerFrame {
	c.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			c.t.Fatalf("%s.%d: expected frame not seen", c.a.User, c.a.Device)
		}
		if f := c.next(left); pred(f) {
			return f
		}
	}
}

// quiet asserts that no frame matching pred arrives before a Pong to a
// ping sent now: the server handles a connection's frames in order, so
// anything already due is written before that Pong.
func (c *wsClient) quiet(pred func(*pb.ServerFrame) bool) {
	c.t.Helper()
	id := c.nextID.Add(1)
	c.write(&pb.ClientFrame{Id: id, Body: &pb.ClientFrame_Ping{Ping: &pb.Ping{}}})
	for {
		f := c.next(10 * time.Second)
		if f.GetPong() != nil && f.Id == id {
			return
		}
		if pred(f) {
			c.t.Fatalf("%s.%d: unexpected frame %v", c.a.User, c.a.Device, f)
		}
	}
}

func (c *wsClient) write(f *pb.ClientFrame) {
	c.t.Helper()
	b, err := proto.Marshal(f)
	if err != nil {
		c.t.Fatal(err)
	}
	c.writeRaw(websocket.MessageBinary, b)
}

func (c *wsClient) writeRaw(typ websocket.MessageType, b []byte) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.ws.Write(ctx, typ, b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// request sends a frame with a fresh id and returns the reply with that id
// (frames before it are kept aside for later next calls).
func (c *wsClient) request(f *pb.ClientFrame) *pb.ServerFrame {
	c.t.Helper()
	f.Id = c.nextID.Add(1)
	c.write(f)
	// Frames that come before the reply go back in front, in order. (They
	// used to be pushed back into frames, behind which the read loop could
	// slip a later frame: a Synced ahead of the deliveries before it.)
	held := c.held
	c.held = nil
	var other []*pb.ServerFrame
	defer func() { c.held = append(other, c.held...) }()
	for {
		var r *pb.ServerFrame
		if len(held) > 0 {
			r, held = held[0], held[1:]
		} else {
			r = c.next(10 * time.Second)
		}
		if r.Id == f.Id {
			other = append(other, held...)
			return r
		}
		other = append(other, r)
	}
}

// send sends text to `to`, addressing the given devices, and returns the
// reply (Accepted or Refused).
func (c *wsClient) send(clientID, to string, devices ...*pb.DeviceAddress) *pb.ServerFrame {
	c.t.Helper()
	s := &pb.Send{ClientMsgId: clientID, To: to}
	for _, d := range devices {
		s.Payloads = append(s.Payloads, &pb.DevicePayload{Device: d, Payload: []byte("to " + d.User + ": " + clientID)})
	}
	return c.request(&pb.ClientFrame{Body: &pb.ClientFrame_Send{Send: s}})
}

func (c *wsClient) ack(seqs ...uint64) {
	c.t.Helper()
	r := c.request(&pb.ClientFrame{Body: &pb.ClientFrame_Ack{Ack: &pb.Ack{Seqs: seqs}}})
	if r.GetOk() == nil {
		c.t.Fatalf("ack: %v", r)
	}
}

func dev(user string, id uint32) *pb.DeviceAddress { return &pb.DeviceAddress{User: user, Device: id} }

func isDeliver(f *pb.ServerFrame) bool { return f.GetDeliver() != nil }
func isSynced(f *pb.ServerFrame) bool  { return f.GetSynced() != nil }

// receipt waits for a receipt of type typ and returns its envelope.
func (c *wsClient) receipt(typ pb.ReceiptType) (*pb.Envelope, uint64) {
	c.t.Helper()
	f := c.until(func(f *pb.ServerFrame) bool {
		e := f.GetDeliver().GetEnvelope()
		return e.GetKind() == pb.EnvelopeKind_ENVELOPE_KIND_RECEIPT && e.GetReceipt().GetType() == typ
	})
	return f.GetDeliver().Envelope, f.GetDeliver().Seq
}

func jsonDecode(r io.Reader, v any) error { return json.NewDecoder(r).Decode(v) }
