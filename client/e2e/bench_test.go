package e2e_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/internal/keys"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// Benchmarks of the encrypted path against a real in-process server
// (figures in docs/performance.md). Every Seal and Open writes the
// session to the local SQLite file (WAL, synchronous=FULL), as a client
// must to survive a crash.

func benchServer(b *testing.B) *servertest.Server {
	return servertest.Start(b, func(cfg *server.Config) { cfg.KeyFetches = keys.LimitConfig{Burst: -1} })
}

func benchParty(b *testing.B, srv *servertest.Server, name string) *party {
	return newParty(b, register(b, srv, name))
}

// BenchmarkSend: messages encrypted and sent (accepted by the server) per
// second by one client, one at a time; plaintext for comparison.
func BenchmarkSend(b *testing.B) {
	for _, mode := range []string{"encrypted", "plaintext"} {
		b.Run(mode, func(b *testing.B) {
			srv := benchServer(b)
			alice, bob := benchParty(b, srv, "alice"), benchParty(b, srv, "bob")
			if mode == "plaintext" {
				alice.plain, bob.plain = true, true
			}
			alice.start()
			alice.send("bob", "warm up") // the session, the device lists
			body := []byte("a message of a typical length, about sixty bytes of text.")
			ctx := context.Background()
			b.ResetTimer()
			for range b.N {
				if _, err := alice.c.Send(ctx, "bob", body); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

// BenchmarkReceive: messages received and decrypted per second by one
// client catching up on b.N messages waiting for it.
func BenchmarkReceive(b *testing.B) {
	for _, mode := range []string{"encrypted", "plaintext"} {
		b.Run(mode, func(b *testing.B) {
			srv := benchServer(b)
			alice, bob := benchParty(b, srv, "alice"), benchParty(b, srv, "bob")
			if mode == "plaintext" {
				alice.plain, bob.plain = true, true
			}
			alice.start()
			ctx := context.Background()
			body := []byte("a message of a typical length, about sixty bytes of text.")
			for i := range b.N {
				if _, err := alice.c.SendAsync("bob", fmt.Appendf(body[:len(body):len(body)], " %d", i)); err != nil {
					b.Fatal(err)
				}
			}
			if _, err := alice.c.Send(ctx, "bob", []byte("last")); err != nil { // in order: all before it are accepted
				b.Fatal(err)
			}
			b.ResetTimer()
			bob.start()
			bob.waitMessage("alice", "last")
			b.StopTimer()
			if n := len(bob.messages("alice")); n != b.N+1 {
				b.Fatalf("bob got %d messages, want %d", n, b.N+1)
			}
			b.ReportMetric(float64(b.N+1)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}

// BenchmarkSessionSetup: establishing a session with a device: fetching
// its bundle (GET /v1/keys/bob?device=1), X3DH, and the first message
// sealed, without the send.
func BenchmarkSessionSetup(b *testing.B) {
	srv := benchServer(b)
	alice, bob := benchParty(b, srv, "alice"), benchParty(b, srv, "bob")
	_ = bob
	ctx := context.Background()
	to := []client.Device{{User: "bob", ID: 1}}
	m := client.OutboxMessage{ClientMsgID: "x", From: client.Device{User: "alice", ID: 1}, To: "bob", Body: []byte("hello"), Created: time.Now()}
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		if _, err := alice.store.DB().Exec("DELETE FROM e2e_sessions"); err != nil {
			b.Fatal(err)
		}
		m.ClientMsgID = fmt.Sprint("setup-", i)
		b.StartTimer()
		if _, err := alice.eng.Seal(ctx, m, to); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/1000, "ms/session")
}

// BenchmarkSealOpen: one message sealed by alice and opened by bob in an
// established session, without the network: the Double Ratchet step and
// the session writes to each local store (fsync'd).
func BenchmarkSealOpen(b *testing.B) {
	srv := benchServer(b)
	alice, bob := benchParty(b, srv, "alice"), benchParty(b, srv, "bob")
	ctx := context.Background()
	from, to := client.Device{User: "alice", ID: 1}, []client.Device{{User: "bob", ID: 1}}
	body := []byte("a message of a typical length, about sixty bytes of text.")
	b.ResetTimer()
	for i := range b.N {
		m := client.OutboxMessage{ClientMsgID: fmt.Sprint("m", i), From: from, To: "bob", Body: body, Created: time.Now()}
		sealed, err := alice.eng.Seal(ctx, m, to)
		if err != nil {
			b.Fatal(err)
		}
		o, err := bob.eng.Open(ctx, client.Inbound{ServerID: fmt.Sprint("s", i), ClientMsgID: m.ClientMsgID, From: from,
			To: "bob", Time: time.Now(), Payload: sealed[0]})
		if err != nil || string(o.Body) != string(body) {
			b.Fatalf("open: %q, %v", o.Body, err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}
