package bench

import (
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// loopPair connects a socket on eng, for a client of its own, to a peer
// the test holds.
func loopPair(t *testing.T, eng *wsEngine) (*client, *wsConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })
	peer.SetDeadline(time.Now().Add(20 * time.Second))
	c := &client{r: &run{counters: map[string]int64{}}}
	c.mu.Lock()
	w, err := eng.add(nc, c)
	if err != nil {
		t.Fatal(err)
	}
	c.nc = w
	c.mu.Unlock()
	return c, w, peer
}

// ended waits until c's connection has ended (onClosed ran).
func ended(t *testing.T, c *client) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		c.mu.Lock()
		nc := c.nc
		c.mu.Unlock()
		if nc == nil {
			return
		}
	}
	t.Fatal("the connection did not end")
}

// TestLoopWritesWithoutBlocking writes far more than a socket takes to a
// peer that is not reading yet: Write returns at once, and the loop hands
// the rest over as the peer reads, in order. When the peer goes away the
// loop ends the connection and tells the client, and writes then fail;
// stopping the engine ends the connections still open.
func TestLoopWritesWithoutBlocking(t *testing.T) {
	eng, err := newEngine(1)
	if err != nil {
		t.Fatal(err)
	}
	c, w, peer := loopPair(t, eng)
	big := make([]byte, 8<<20)
	for i := range big {
		big[i] = byte(i * 7)
	}
	done := make(chan error, 1)
	go func() {
		_, err := w.Write(big[:len(big)/2])
		if err == nil {
			_, err = w.Write(big[len(big)/2:])
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Write blocked on a peer that does not read")
	}
	got := make([]byte, len(big))
	if _, err := io.ReadFull(peer, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, big) {
		t.Fatal("the peer read other bytes than were written")
	}
	peer.Close()
	ended(t, c)
	if _, err := w.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after the end: %v, want net.ErrClosed", err)
	}

	// Closed from the bench's side, then at stop.
	c2, w2, _ := loopPair(t, eng)
	if err := w2.Close(); err != nil {
		t.Fatal(err)
	}
	ended(t, c2)
	c3, _, _ := loopPair(t, eng)
	eng.stop()
	ended(t, c3)
}
