package server_test

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// With MaxConns 10 and the watermark at 0.8, eight connections fit; the
// ninth is refused with 503 overloaded and a retry-after, the eight keep
// working, and a closed one makes room.
func TestAdmissionRefusesOverWatermark(t *testing.T) {
	t.Parallel()
	s := servertest.Start(t, func(c *server.Config) { c.MaxConns = 10; c.AdmitWatermark = 0.8 })
	var users []account
	for i := range 10 {
		users = append(users, register(t, s.URL, fmt.Sprintf("load%d", i)))
	}
	var open []*wsClient
	for _, a := range users[:8] {
		open = append(open, dial(t, s.URL, a))
	}
	// The ninth is refused before authentication: a wrong credential gets
	// the same answer.
	for _, a := range []account{users[8], {User: "load9", Device: 1, Cred: "wrong"}} {
		_, resp, err := dialFrom(t, s.URL, a, "127.0.0.1")
		if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("ninth connection: %v %v", resp, err)
		}
		var body apiError
		if err := jsonDecode(resp.Body, &body); err != nil {
			t.Fatalf("ninth connection: undecodable answer: %v", err)
		}
		if body.Error.Code != "overloaded" || body.Error.RetryAfterMs < 1000 || body.Error.RetryAfterMs >= 2000 {
			t.Fatalf("ninth connection: %+v, want overloaded with a retry in [1s, 2s)", body.Error)
		}
		if got, want := resp.Header.Get("Retry-After"), strconv.FormatInt((body.Error.RetryAfterMs+999)/1000, 10); got != want {
			t.Errorf("Retry-After %q, want %q", got, want)
		}
	}
	// The API is not affected, and neither are the connected devices.
	register(t, s.URL, "latecomer")
	if r := open[0].send("over-1", users[1].User, dev(users[1].User, users[1].Device)); r.GetAccepted() == nil {
		t.Fatalf("send between connected devices: %v", r)
	}
	if f := open[1].until(isDeliver); string(f.GetDeliver().GetEnvelope().GetPayload()) == "" {
		t.Fatalf("delivery to a connected device: %v", f)
	}

	// The gauge shows the connection signal.
	if v := loadGauge(t, s.URL, "connections"); v < 0.8 {
		t.Errorf("courier_gateway_load{signal=\"connections\"} %v with 8 of 10 open, want at least 0.8", v)
	}

	// Two connections end: two more fit, and not a third.
	for _, c := range open[:2] {
		c.ws.Close(websocket.StatusNormalClosure, "")
		<-c.done
	}
	for _, a := range users[8:10] {
		eventually(t, 10*time.Second, func() error {
			_, err := tryDial(t, s.URL, a)
			return err
		})
	}
	_, resp, err := dialFrom(t, s.URL, users[0], "127.0.0.1")
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("a third after two ended: %v %v", resp, err)
	}
}

// loadGauge reads courier_gateway_load for signal from /metrics.
func loadGauge(t *testing.T, base, signal string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	prefix := `courier_gateway_load{signal="` + signal + `"} `
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f
		}
	}
	t.Fatalf("no %s in /metrics", prefix)
	return 0
}
