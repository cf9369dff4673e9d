package server_test

import (
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// A device that keeps sending frames but never reads their replies is
// cut off as a slow consumer, on either transport, rather than make the
// server hold its replies without bound.
func TestSlowConsumerCutOff(t *testing.T) {
	t.Parallel()
	for _, tr := range []string{gateway.TransportGoroutine, gateway.TransportEpoll} {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			s := servertest.Start(t, func(c *server.Config) {
				c.Transport = tr
				c.MaxPayload = 1024
				c.MaxPayloads = 2
				c.WriteTimeout = 200 * time.Millisecond
			})
			alice := register(t, s.URL, "alice")
			c := rawDial(t, s.URL, alice)
			c.Conn.(*net.TCPConn).SetReadBuffer(4096)
			// Each frame asks for an Error reply about as long as itself
			// (it names a bad user, which the reply repeats).
			f, err := proto.Marshal(&pb.ClientFrame{Id: 1, Body: &pb.ClientFrame_Subscribe{Subscribe: &pb.Subscribe{
				Users: []string{"!" + strings.Repeat("x", 4000)}}}})
			if err != nil {
				t.Fatal(err)
			}
			frame := append([]byte{0x82, 0x80 | 126, 0, 0, 0, 0, 0, 0}, f...) // masked with key 0
			binary.BigEndian.PutUint16(frame[2:], uint16(len(f)))
			// Far more than the server may hold for a connection
			// (a window of entries and replies: about 1.3 MB here) and
			// the sockets' buffers together.
			const most = 64 << 20
			sent := 0
			for sent < most {
				c.SetWriteDeadline(time.Now().Add(20 * time.Second))
				n, err := c.Write(frame)
				sent += n
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						t.Fatalf("after %d bytes sent the server neither reads nor closes: %v", sent, err)
					}
					t.Logf("cut off after %d bytes sent: %v", sent, err)
					return
				}
			}
			t.Fatalf("sent %d bytes without reading a reply and still connected", sent)
		})
	}
}
