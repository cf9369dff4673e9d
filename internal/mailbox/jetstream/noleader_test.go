package jetstream

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
)

// TestAppendRidesOutNoLeader: an append that meets "no responders" (the
// stream has no leader for a moment: just created, or its leader failed)
// is sent again until the stream answers, rather than refused; once the
// stream stays gone, the append fails as unavailable.
func TestAppendRidesOutNoLeader(t *testing.T) {
	srv := startServer(t, serverConfig{name: "noleader", dir: t.TempDir(), port: -1})
	t.Cleanup(srv.Shutdown)
	nc := connect(t, srv.ClientURL())
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream, prefix := uniqueNames()
	st := mustOpen(t, nc, Options{Stream: stream, SubjectPrefix: prefix})
	t.Cleanup(func() { st.Close() })
	ctx := withTestTimeout(t)
	info, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	cfg := info.CachedInfo().Config
	d := ident.Device{User: "olga", ID: 1}
	one := mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("x")}}}
	two := mailbox.Batch{Items: []mailbox.Item{{Device: d, Data: []byte("y")}, {Device: ident.Device{User: "olga", ID: 2}, Data: []byte("y")}}}

	// The stream goes away and comes back 300 ms later: appends made in
	// between, a plain publish and an atomic batch, land once it is back.
	if err := js.DeleteStream(ctx, stream); err != nil {
		t.Fatal(err)
	}
	back := make(chan error, 1)
	go func() {
		time.Sleep(300 * time.Millisecond)
		_, err := js.CreateStream(context.Background(), cfg)
		back <- err
	}()
	for _, b := range []mailbox.Batch{one, two} {
		if _, err := st.Append(ctx, b); err != nil {
			t.Fatalf("Append while the stream had no leader: %v", err)
		}
	}
	if err := <-back; err != nil {
		t.Fatal(err)
	}
	got, err := st.Read(ctx, d, 0, 10)
	if err != nil || len(got) != 2 {
		t.Fatalf("Read = %d entries, %v; want both appends", len(got), err)
	}

	// Gone for good: the append gives up when its context ends.
	if err := js.DeleteStream(ctx, stream); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := st.Append(short, one); !errors.Is(err, mailbox.ErrUnavailable) {
		t.Fatalf("Append with no stream: %v, want ErrUnavailable", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("Append with no stream took %v, past its context", took)
	}
}
