package jetstream

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestReplicated runs an R3 stream on a 3-node in-process cluster: appends
// and reads keep working while the stream leader's node is down, and the
// node catches up when it comes back.
func TestReplicated(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a 3-node cluster")
	}
	const n = 3
	c := startCluster(t, n)
	cfgs, srvs, nc, js := c.cfgs, c.srvs, c.nc, c.js

	stream, prefix := uniqueNames()
	var st *Store
	eventually(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var err error
		st, err = Open(ctx, nc, Options{Stream: stream, SubjectPrefix: prefix, Replicas: 3, Timeout: 3 * time.Second})
		return err
	})
	t.Cleanup(func() { st.Close() })
	ctx := context.Background()
	d := ident.Device{User: "rita", ID: 1}
	other := ident.Device{User: "sam", ID: 2}

	// appendRetry retries with the same key until the cluster takes it,
	// as a caller does when an append's outcome is unknown.
	var want []string
	var lastSeq uint64
	appendRetry := func(i int) {
		t.Helper()
		data := fmt.Sprint("m-", i)
		b := mailbox.Batch{Key: data, Receipt: []byte(data), Items: []mailbox.Item{
			{Device: d, Data: []byte(data)}, {Device: other, Data: []byte(data)},
		}}
		var res mailbox.Result
		eventually(t, 30*time.Second, func() error {
			var err error
			res, err = st.Append(ctx, b)
			return err
		})
		if !res.Duplicate {
			if res.Seqs[0] <= lastSeq || res.Seqs[1] <= res.Seqs[0] {
				t.Fatalf("append %d: seqs %v after %d", i, res.Seqs, lastSeq)
			}
			lastSeq = res.Seqs[1]
		} else if string(res.Receipt) != data {
			t.Fatalf("append %d: duplicate with receipt %q", i, res.Receipt)
		}
		want = append(want, data)
	}
	// readsAll waits until a read (any replica may answer it) holds want.
	readsAll := func(dev ident.Device) {
		t.Helper()
		eventually(t, 30*time.Second, func() error {
			es, err := st.Read(ctx, dev, 0, 1000)
			if err != nil {
				return err
			}
			got := make([]string, len(es))
			for i, e := range es {
				got[i] = string(e.Data)
			}
			if !slices.Equal(got, want) {
				return fmt.Errorf("%v holds %v, want %v", dev, got, want)
			}
			return nil
		})
	}

	for i := range 20 {
		appendRetry(i)
	}
	readsAll(d)

	// Shut down the node leading the stream.
	info, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	leader := info.CachedInfo().Cluster.Leader
	down := slices.IndexFunc(cfgs, func(c serverConfig) bool { return c.name == leader })
	if down < 0 {
		t.Fatalf("stream leader %q is not a node", leader)
	}
	srvs[down].Shutdown()
	srvs[down].WaitForShutdown()
	srvs[down] = nil
	t.Logf("shut down %s, the stream leader", leader)

	for i := 20; i < 40; i++ {
		appendRetry(i)
	}
	readsAll(d)
	readsAll(other)
	if got, err := st.Delete(ctx, d, []uint64{lastSeq - 1}); err != nil || len(got) != 1 {
		t.Fatalf("Delete on 2 of 3 nodes = %v, %v", got, err)
	}
	want = want[:len(want)-1]
	readsAll(d)
	want = append(want, "m-39") // other still holds it

	// Bring it back on the same store; it catches up.
	srvs[down] = startServer(t, cfgs[down])
	eventually(t, 30*time.Second, func() error {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		s, err := js.Stream(cctx, stream)
		if err != nil {
			return err
		}
		ci := s.CachedInfo().Cluster
		if ci == nil || ci.Leader == "" || len(ci.Replicas) != n-1 {
			return fmt.Errorf("cluster info %+v", ci)
		}
		for _, r := range ci.Replicas {
			if !r.Current || r.Offline {
				return fmt.Errorf("replica %s not current", r.Name)
			}
		}
		return nil
	})
	for i := 40; i < 50; i++ {
		appendRetry(i)
	}
	readsAll(other)
	// A Store reading through batched direct gets (any replica) sees the
	// same, once the replicas have applied it.
	stale, err := Open(ctx, nc, Options{Stream: stream, SubjectPrefix: prefix, Replicas: 3, StaleReads: true})
	if err != nil {
		t.Fatal(err)
	}
	defer stale.Close()
	st, stale = stale, st
	readsAll(other)
	st, stale = stale, st
	if dp := st.Depth(); dp != int64(2*50-1) {
		t.Errorf("Depth = %d, want %d", dp, 2*50-1)
	}
}

// cluster is an in-process JetStream cluster.
type cluster struct {
	cfgs []serverConfig
	srvs []*server.Server
	nc   *nats.Conn
	js   jetstream.JetStream
}

// startCluster starts n nodes routed to each other (sync_interval: always)
// and waits for the JetStream meta leader.
func startCluster(tb testing.TB, n int) *cluster {
	tb.Helper()
	c := &cluster{cfgs: make([]serverConfig, n), srvs: make([]*server.Server, n)}
	for i := range c.cfgs {
		c.cfgs[i] = serverConfig{
			name: "node" + strconv.Itoa(i), dir: tb.TempDir(), port: freePort(tb),
			syncAlwy: true, cluster: "courier-test", routePort: freePort(tb),
		}
	}
	for i := range c.cfgs {
		for j := range c.cfgs {
			if j != i {
				c.cfgs[i].routes = append(c.cfgs[i].routes, "nats://127.0.0.1:"+strconv.Itoa(c.cfgs[j].routePort))
			}
		}
	}
	var urls []string
	for i, cfg := range c.cfgs {
		c.srvs[i] = startServer(tb, cfg)
		urls = append(urls, "nats://127.0.0.1:"+strconv.Itoa(cfg.port))
	}
	tb.Cleanup(func() {
		for _, s := range c.srvs {
			if s != nil {
				s.Shutdown()
			}
		}
	})
	c.nc = connect(tb, urls...)
	tb.Cleanup(c.nc.Close)
	var err error
	if c.js, err = jetstream.New(c.nc); err != nil {
		tb.Fatal(err)
	}
	eventually(tb, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := c.js.AccountInfo(ctx)
		return err
	})
	return c
}

// TestOldServer checks that Open refuses a server without atomic batch
// publish: the system nats-server on 127.0.0.1:4222 (2.9 on the build
// machine), when one runs.
func TestOldServer(t *testing.T) {
	conn, err := net.DialTimeout("tcp", "127.0.0.1:4222", time.Second)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("no nats-server on 127.0.0.1:4222: %v", err)
		}
		t.Skip("no nats-server on 127.0.0.1:4222")
	}
	conn.Close()
	nc := connect(t, "nats://127.0.0.1:4222")
	defer nc.Close()
	if serverVersionAtLeast(nc.ConnectedServerVersion(), 2, 12) {
		t.Skipf("the server on 4222 is %s, new enough", nc.ConnectedServerVersion())
	}
	stream, prefix := uniqueNames()
	st, err := Open(context.Background(), nc, Options{Stream: stream, SubjectPrefix: prefix})
	if err == nil {
		st.Close()
		t.Fatal("Open succeeded on an old server")
	}
	if !errors.Is(err, ErrServerTooOld) {
		t.Fatalf("Open on %s: %v, want ErrServerTooOld", nc.ConnectedServerVersion(), err)
	}
	t.Logf("Open on nats-server %s: %v", nc.ConnectedServerVersion(), err)
}

func TestServerVersionAtLeast(t *testing.T) {
	for v, want := range map[string]bool{
		"2.9.10": false, "2.11.8": false, "2.12.0": true, "2.12.1-RC.1": true,
		"2.14.9": true, "3.0.0": true, "": false, "x.y": false,
	} {
		if got := serverVersionAtLeast(v, 2, 12); got != want {
			t.Errorf("serverVersionAtLeast(%q, 2, 12) = %v", v, got)
		}
	}
}

func eventually(t testing.TB, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", d, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
