package jetstream

import (
	"context"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/mailboxtest"
)

// TestConformanceR3 runs the suite on R3 streams of one 3-node cluster.
func TestConformanceR3(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	c := startCluster(t, 3)
	mailboxtest.Run(t, func(t *testing.T) mailboxtest.Backend {
		stream, prefix := uniqueNames()
		// The suite checks what is stored, not how fast: its concurrent
		// readers re-read whole mailboxes in a loop while 32 writers
		// append, which on a loaded 2-core machine can take longer than
		// the default 10 s per call on three in-process servers.
		opts := Options{Stream: stream, SubjectPrefix: prefix, Replicas: 3, Timeout: 2 * time.Minute}
		t.Cleanup(func() { _ = c.js.DeleteStream(context.Background(), stream) })
		return mailboxtest.Backend{Open: func(t *testing.T) mailbox.Store { return mustOpen(t, c.nc, opts) }}
	})
}
