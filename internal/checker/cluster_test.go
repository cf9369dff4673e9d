package checker_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	natsserver "github.com/nats-io/nats-server/v2/server"
	goredis "github.com/redis/go-redis/v9"

	"github.com/courier-im/courier/internal/checker"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/testenv"
)

// TestCheckerClusterNodeSIGKILL is TestCheckerSIGKILL for a node in cluster
// mode: the child runs all three roles with the mailbox on NATS JetStream
// (in this test process, so it outlives the kills), the session directory
// on Redis and the accounts on PostgreSQL, and is killed with SIGKILL at
// random moments and started again under the same node id.
func TestCheckerClusterNodeSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("SIGKILL test skipped in -short mode")
	}
	t.Parallel()
	redisAddr := testenv.RedisAddr(t)
	pgURL := testenv.PostgresURL(t)
	ns, err := natsserver.NewServer(&natsserver.Options{
		ServerName: "checker", Host: "127.0.0.1", Port: -1,
		JetStream: true, StoreDir: t.TempDir(), SyncAlways: true, NoLog: true, NoSigs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(20 * time.Second) {
		ns.Shutdown()
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })

	b := make([]byte, 6)
	rand.Read(b)
	tag := hex.EncodeToString(b)
	schema, prefix := "courier_checker_"+tag, "courier-checker:"+tag+":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if conn, err := pgx.Connect(ctx, pgURL); err != nil {
			t.Errorf("drop schema: %v", err)
		} else {
			if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
				t.Errorf("drop schema: %v", err)
			}
			conn.Close(ctx)
		}
		rdb := goredis.NewClient(&goredis.Options{Addr: redisAddr})
		defer rdb.Close()
		iter := rdb.Scan(ctx, 0, prefix+"*", 100).Iterator()
		for iter.Next(ctx) {
			rdb.Del(ctx, iter.Val())
		}
	})
	cc, err := json.Marshal(server.ClusterConfig{
		NATS: "nats://" + ns.Addr().String(), Redis: "redis://" + redisAddr + "/0", Postgres: pgURL,
		Node: "checker-" + tag, RedisPrefix: prefix, PostgresSchema: schema,
		SessionTTL: 3 * time.Second, AckWait: 2 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	p := startChild(t, childClusterEnv+"="+string(cc))
	const kills = 3
	runAgainst(t, p, checker.Config{
		Users:          6,
		DevicesPerUser: 1,
		Messages:       300,
		Seed:           10,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       2 * time.Minute,
		QuiesceTimeout: time.Minute,
		Faults:         kills,
		Fault:          p.KillFault(10, 50*time.Millisecond),
	}, nil)
	if p.Kills() != kills {
		t.Errorf("%d kills, want %d", p.Kills(), kills)
	}
}
