package server_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Tests of hostile clients: guessing credentials, hoarding connections,
// holding connections with bytes trickled slowly, and oversized or deeply
// nested input. Every wait is bounded, and waits on a condition.

// fromAddr returns a dialer whose connections come from ip: on Linux every
// 127.x.y.z address is loopback, so one machine can be many sources.
func fromAddr(t *testing.T, ip string) *net.Dialer {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
	probe, err := d.Dial("tcp", "127.0.0.1:1")
	if probe != nil {
		probe.Close()
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" && strings.Contains(err.Error(), "assign requested address") {
		t.Skipf("cannot connect from %s on this system: %v", ip, err)
	}
	return d
}

// httpFrom is an HTTP client whose requests come from ip.
func httpFrom(t *testing.T, ip string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: fromAddr(t, ip).DialContext}}
}

// call makes a request with the given Authorization header (if any) and
// returns the status, the Retry-After header and the error code.
func call(t *testing.T, c *http.Client, method, url, authz string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var e apiError
	if resp.StatusCode >= 400 {
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
			t.Fatalf("%s %s: %d without a JSON error: %v", method, url, resp.StatusCode, err)
		}
	}
	return resp.StatusCode, resp.Header.Get("Retry-After"), e.Error.Code
}

// dialFrom opens a WebSocket as a from ip; on failure it returns the HTTP
// answer.
func dialFrom(t *testing.T, base string, a account, ip string) (*wsClient, *http.Response, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/v1/ws", &websocket.DialOptions{
		HTTPHeader: http.Header{"Authorization": {a.basic()}},
		HTTPClient: &http.Client{Transport: &http.Transport{DialContext: fromAddr(t, ip).DialContext}},
	})
	if err != nil {
		return nil, resp, err
	}
	c := &wsClient{t: t, a: a, ws: ws, frames: make(chan *pb.ServerFrame, 4096), done: make(chan struct{})}
	go c.readLoop()
	t.Cleanup(func() { ws.CloseNow() })
	if c.next(5*time.Second).GetHello() == nil {
		t.Fatal("first frame is not Hello")
	}
	return c, resp, nil
}

// eventually retries f until it succeeds or the deadline passes.
func eventually(t *testing.T, within time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %v", within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func wantRetryAfter(t *testing.T, what, h string) {
	t.Helper()
	if n, err := strconv.Atoi(h); err != nil || n < 1 {
		t.Errorf("%s: Retry-After %q, want a positive number of seconds", what, h)
	}
}

func TestAuthFailuresRateLimited(t *testing.T) {
	t.Parallel()
	// An hour per token: once spent, a budget stays spent for the test.
	s := servertest.Start(t, func(c *server.Config) { c.AuthFailures = auth.LimitConfig{Burst: 3, Every: time.Hour} })
	alice, bob := register(t, s.URL, "alice"), register(t, s.URL, "bob")
	devices := s.URL + "/v1/users/alice/devices"
	wrong := func(a account) string { a.Cred = "wrong-" + a.Cred[6:]; return a.basic() }

	// Per source address: three failures, then 429 for everything from
	// that address, the right credential included, on the API and on the
	// WebSocket upgrade alike.
	attacker := httpFrom(t, "127.0.0.2")
	for i := range 3 {
		if st, _, code := call(t, attacker, "GET", devices, wrong(alice)); st != 401 || code != "unauthorized" {
			t.Fatalf("failure %d: %d %s", i, st, code)
		}
	}
	st, retry, code := call(t, attacker, "GET", devices, wrong(alice))
	if st != http.StatusTooManyRequests || code != "rate_limited" {
		t.Fatalf("after the burst: %d %s, want 429 rate_limited", st, code)
	}
	wantRetryAfter(t, "API", retry)
	if st, _, code := call(t, attacker, "GET", devices, alice.basic()); st != 429 || code != "rate_limited" {
		t.Fatalf("right credential from the limited address: %d %s", st, code)
	}
	_, resp, err := dialFrom(t, s.URL, alice, "127.0.0.2")
	if err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
		t.Fatalf("WebSocket from the limited address: %v %v", resp, err)
	}
	wantRetryAfter(t, "WebSocket", resp.Header.Get("Retry-After"))

	// Nobody else is slowed: alice from another address.
	if st, _, _ := call(t, http.DefaultClient, "GET", devices, alice.basic()); st != 200 {
		t.Fatalf("alice from 127.0.0.1: %d", st)
	}
	dial(t, s.URL, alice).until(isSynced)

	// Per device: three addresses fail once each as bob.1, which spends
	// bob.1's budget: an address with a failure behind it is refused for
	// bob.1, but bob.1 itself, from a clean address, is not locked out.
	for i := 3; i <= 5; i++ {
		if st, _, _ := call(t, httpFrom(t, fmt.Sprint("127.0.0.", i)), "GET", devices, wrong(bob)); st != 401 {
			t.Fatalf("127.0.0.%d as bob.1: %d", i, st)
		}
	}
	if st, _, code := call(t, httpFrom(t, "127.0.0.3"), "GET", devices, wrong(bob)); st != 429 || code != "rate_limited" {
		t.Fatalf("guessing bob.1 again: %d %s", st, code)
	}
	if st, _, _ := call(t, httpFrom(t, "127.0.0.6"), "GET", devices, bob.basic()); st != 200 {
		t.Fatalf("bob.1 from a clean address during the attack: %d", st)
	}
	if _, resp, err := dialFrom(t, s.URL, bob, "127.0.0.6"); err != nil {
		t.Fatalf("bob.1's WebSocket during the attack: %v %v", resp, err)
	}

	// Successes take nothing from the budget; requests without any
	// credential are not attempts. (carol: alice.1's own budget is spent.)
	carol := register(t, s.URL, "carol")
	c7 := httpFrom(t, "127.0.0.7")
	for range 30 {
		if st, _, _ := call(t, c7, "GET", devices, carol.basic()); st != 200 {
			t.Fatalf("success: %d", st)
		}
		if st, _, _ := call(t, c7, "GET", devices, ""); st != 401 {
			t.Fatalf("no credential: %d", st)
		}
	}
	for i := range 3 {
		if st, _, _ := call(t, c7, "GET", devices, wrong(carol)); st != 401 {
			t.Fatalf("failure %d after successes: %d", i, st)
		}
	}
	if st, _, _ := call(t, c7, "GET", devices, wrong(carol)); st != 429 {
		t.Fatalf("fourth failure: %d", st)
	}
}

func TestConnectionsPerAddressCapped(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxConnsPerAddr = 3 })
	var users []account
	for _, n := range []string{"a", "b", "c", "d"} {
		users = append(users, register(t, s.URL, n))
	}
	var open []*wsClient
	for _, a := range users[:3] {
		c, resp, err := dialFrom(t, s.URL, a, "127.0.0.1")
		if err != nil {
			t.Fatalf("connection %s: %v %v", a.User, resp, err)
		}
		open = append(open, c)
	}
	// The fourth from the same address is refused before authentication
	// (a wrong credential gets the same answer), and told when to retry.
	for _, a := range []account{users[3], {User: "d", Device: 1, Cred: "wrong"}} {
		_, resp, err := dialFrom(t, s.URL, a, "127.0.0.1")
		if err == nil || resp == nil || resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("fourth connection: %v %v", resp, err)
		}
		if got, want := resp.Header.Get("Retry-After"), strconv.Itoa(int(gateway.AddrRetryAfter/time.Second)); got != want {
			t.Errorf("Retry-After %q, want %q", got, want)
		}
	}
	// Other addresses and the HTTP API are not affected.
	if _, resp, err := dialFrom(t, s.URL, users[3], "127.0.0.2"); err != nil {
		t.Fatalf("from another address: %v %v", resp, err)
	}
	register(t, s.URL, "e")

	// A closed connection frees its place.
	open[2].ws.Close(websocket.StatusNormalClosure, "")
	eventually(t, 10*time.Second, func() error {
		c, resp, err := dialFrom(t, s.URL, users[2], "127.0.0.1")
		if err != nil {
			return fmt.Errorf("%v %v", resp, err)
		}
		open[2] = c
		return nil
	})
	// Refused and failed upgrades do not leak places: close everything,
	// fail a few times, and three connections fit again.
	for _, c := range open {
		c.ws.Close(websocket.StatusNormalClosure, "")
		<-c.done
	}
	for range 4 {
		if _, resp, err := dialFrom(t, s.URL, account{User: "a", Device: 1, Cred: "wrong"}, "127.0.0.1"); err == nil || resp == nil ||
			(resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusTooManyRequests) {
			t.Fatalf("wrong credential: %v %v", resp, err)
		}
	}
	eventually(t, 10*time.Second, func() error {
		var got []*wsClient
		defer func() {
			for _, c := range got {
				c.ws.CloseNow()
			}
		}()
		for _, a := range users[:3] {
			c, resp, err := dialFrom(t, s.URL, a, "127.0.0.1")
			if err != nil {
				return fmt.Errorf("%s: %v %v", a.User, resp, err)
			}
			got = append(got, c)
		}
		return nil
	})
}

// rawConn speaks WebSocket by hand, so that a test can send part of a frame.
type rawConn struct {
	net.Conn
	br *bufio.Reader
}

func rawDial(t *testing.T, base string, a account) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	key := make([]byte, 16)
	rand.Read(key)
	fmt.Fprintf(c, "GET /v1/ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: %s\r\n\r\n",
		strings.TrimPrefix(base, "http://"), base64.StdEncoding.EncodeToString(key), a.basic())
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %s", resp.Status)
	}
	return &rawConn{Conn: c, br: br}
}

// readFrame reads one (unmasked, unfragmented) server frame.
func (c *rawConn) readFrame() (op byte, payload []byte, err error) {
	var h [2]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return 0, nil, err
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(c.br, l[:]); err != nil {
			return 0, nil, err
		}
		n = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(c.br, l[:]); err != nil {
			return 0, nil, err
		}
		n = binary.BigEndian.Uint64(l[:])
	}
	payload = make([]byte, n)
	_, err = io.ReadFull(c.br, payload)
	return h[0] & 0x0f, payload, err
}

// A client that starts a frame and then trickles its bytes is holding the
// connection, not using it: it is cut at the idle timeout, told why.
func TestSlowlorisFrameCutAtIdleTimeout(t *testing.T) {
	t.Parallel()
	const idle = time.Second
	s := servertest.Start(t, func(c *server.Config) { c.IdleTimeout = idle })
	alice := register(t, s.URL, "alice")
	c := rawDial(t, s.URL, alice)

	type result struct {
		errors    []*pb.Error
		closeCode int
		at        time.Time
	}
	done := make(chan result, 1)
	go func() {
		var r result
		for {
			op, payload, err := c.readFrame()
			if err != nil {
				r.at = time.Now()
				done <- r
				return
			}
			switch op {
			case 2:
				f := new(pb.ServerFrame)
				if proto.Unmarshal(payload, f) == nil && f.GetError() != nil {
					r.errors = append(r.errors, f.GetError())
				}
			case 8:
				if len(payload) >= 2 {
					r.closeCode = int(binary.BigEndian.Uint16(payload))
				}
			}
		}
	}()

	// A masked binary frame announcing 4096 bytes (mask 0: the payload
	// goes as is), then one byte every 50 ms.
	start := time.Now()
	if _, err := c.Write([]byte{0x82, 0x80 | 126, 0x10, 0x00, 0, 0, 0, 0}); err != nil {
		t.Fatal(err)
	}
	var trickled atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tk := time.NewTicker(50 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				if _, err := c.Write([]byte{'x'}); err != nil {
					return
				}
				trickled.Add(1)
			}
		}
	}()
	// Cut within the idle timeout, plus the sweep interval (idle/4) and
	// the close handshake's grace (1 s), plus slack for a loaded machine.
	limit := idle + idle/4 + time.Second + 3*time.Second
	var r result
	select {
	case r = <-done:
	case <-time.After(limit):
		t.Fatalf("still connected %v after the frame began (%d bytes trickled)", time.Since(start), trickled.Load())
	}
	took := r.at.Sub(start)
	if took < idle*9/10 {
		t.Fatalf("cut after %v, before the idle timeout %v: for another reason?", took, idle)
	}
	if n := trickled.Load(); n < int64(idle/(50*time.Millisecond))/2 {
		t.Fatalf("only %d bytes trickled: the test did not hold the connection the way it meant to", n)
	}
	if len(r.errors) != 1 || r.errors[0].Code != pb.ErrorCode_ERROR_CODE_IDLE_TIMEOUT || r.closeCode != int(gateway.CloseIdleTimeout) {
		t.Fatalf("told %v, close code %d; want IDLE_TIMEOUT and %d", r.errors, r.closeCode, gateway.CloseIdleTimeout)
	}
	t.Logf("cut %v after the frame began, %d bytes trickled", took.Round(time.Millisecond), trickled.Load())
}

// A client that never finishes its request headers is cut at the read
// header timeout, however slowly it keeps sending.
func TestSlowlorisHeadersCutAtReadHeaderTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 500 * time.Millisecond
	s := servertest.Start(t, func(c *server.Config) { c.ReadHeaderTimeout = timeout })
	c, err := net.DialTimeout("tcp", strings.TrimPrefix(s.URL, "http://"), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				if _, err := c.Write([]byte{'a'}); err != nil {
					return
				}
			}
		}
	}()
	c.SetReadDeadline(time.Now().Add(timeout + 5*time.Second))
	_, err = io.Copy(io.Discard, c) // until the server closes
	took := time.Since(start)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v", took)
	}
	if took < timeout*8/10 {
		t.Fatalf("closed after %v, before the header timeout %v", took, timeout)
	}
	// The server is fine.
	if st, _, _ := call(t, http.DefaultClient, "GET", s.URL+"/v1/health", ""); st != 200 {
		t.Fatalf("health after the slow client: %d", st)
	}
}

// A request body trickled in is cut at the body timeout, with a JSON error.
func TestSlowBodyCutAtBodyTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 500 * time.Millisecond
	s := servertest.Start(t, func(c *server.Config) { c.BodyTimeout = timeout })
	alice := register(t, s.URL, "alice")
	for _, path := range []string{"/v1/accounts", "/v1/messages", "/v1/receipts"} {
		c, err := net.DialTimeout("tcp", strings.TrimPrefix(s.URL, "http://"), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nAuthorization: %s\r\n\r\n{\"name\":\"", path, alice.basic())
		stop := make(chan struct{})
		go func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(50 * time.Millisecond):
					if _, err := c.Write([]byte{'a'}); err != nil {
						return
					}
				}
			}
		}()
		c.SetReadDeadline(time.Now().Add(timeout + 5*time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		took := time.Since(start)
		if err != nil {
			close(stop)
			c.Close()
			t.Fatalf("%s: no answer within %v: %v", path, took, err)
		}
		var e apiError
		json.NewDecoder(resp.Body).Decode(&e)
		close(stop)
		c.Close()
		if resp.StatusCode != http.StatusBadRequest || e.Error.Code != "invalid" {
			t.Fatalf("%s: %d %+v, want 400 invalid", path, resp.StatusCode, e)
		}
		if took < timeout*8/10 {
			t.Fatalf("%s: answered after %v, before the body timeout", path, took)
		}
	}
}

// Every JSON endpoint refuses oversized bodies (413) and deep nesting
// (400) with a JSON error, quickly, and stays up.
func TestOversizedAndNestedJSON(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxPayload = 1024; c.MaxPayloads = 2 })
	alice := register(t, s.URL, "alice")
	post := func(path, body string) (int, string) {
		req, _ := http.NewRequest("POST", s.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", alice.basic())
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		defer resp.Body.Close()
		var e apiError
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
			t.Fatalf("%s: %d without a JSON body: %v", path, resp.StatusCode, err)
		}
		return resp.StatusCode, e.Error.Code
	}
	deepArr := strings.Repeat("[", 100_000)
	deepObj := strings.Repeat(`{"a":`, 50_000)
	code := map[int]string{400: "invalid", 413: "payload_too_large"}
	// The limits: 4 KiB for /v1/accounts, about 68 KiB for /v1/messages
	// (with this configuration), 256 KiB for /v1/receipts; JSON nesting
	// deeper than 10000 is an error. Whichever is reached first answers.
	for _, tc := range []struct {
		name                         string
		body                         string
		accounts, messages, receipts int
	}{
		{"huge string", `{"name":"` + strings.Repeat("a", 4<<20) + `"}`, 413, 413, 413},
		{"huge whitespace", strings.Repeat(" ", 4<<20) + `{}`, 413, 413, 413},
		{"deep arrays", deepArr, 413, 400, 400},
		{"deep objects", deepObj, 413, 400, 400},
		{"deep inside a field, cut short", `{"name":` + deepArr[:5000], 413, 400, 400},
		{"many unknown fields", `{` + strings.Repeat(`"x":1,`, 1000) + `"x":1}`, 413, 400, 400},
	} {
		start := time.Now()
		for path, want := range map[string]int{"/v1/accounts": tc.accounts, "/v1/messages": tc.messages, "/v1/receipts": tc.receipts} {
			if st, c := post(path, tc.body); st != want || c != code[want] {
				t.Errorf("%s, %s: %d %s, want %d %s", path, tc.name, st, c, want, code[want])
			}
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("%s took %v", tc.name, d)
		}
	}
	if st := doJSON(t, s.URL, "GET", "/v1/health", account{}, nil, nil); st != 200 {
		t.Fatalf("health: %d", st)
	}
}
