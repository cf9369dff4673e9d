package testenv

import (
	"bufio"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
)

// recorder stands in for a test so that the skip/fail rule can be observed:
// Skipf and Fatalf record and end the goroutine, as the real ones do.
type recorder struct {
	testing.TB
	skipped, failed bool
	msg             string
}

func (r *recorder) Helper() {}

func (r *recorder) Skipf(format string, args ...any) {
	r.skipped, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func (r *recorder) Fatalf(format string, args ...any) {
	r.failed, r.msg = true, fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// call runs f with a recorder in its own goroutine (Goexit ends it).
func call(t *testing.T, f func(testing.TB) string) (*recorder, string) {
	r := &recorder{TB: t}
	var got string
	done := make(chan struct{})
	go func() {
		defer close(done)
		got = f(r)
	}()
	<-done
	return r, got
}

// serve accepts connections on a loopback port and hands each to handle.
func serve(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return l.Addr().String()
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

func fakeRedis(reply string) func(net.Conn) {
	return func(c net.Conn) {
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil && line == "PING\r\n" {
			c.Write([]byte(reply))
		}
	}
}

func fakeNATS(greeting string) func(net.Conn) {
	return func(c net.Conn) { c.Write([]byte(greeting)) }
}

func TestAvailable(t *testing.T) {
	t.Setenv("CI", "true") // any failure to find the fakes fails
	redis := serve(t, fakeRedis("+PONG\r\n"))
	nats := serve(t, fakeNATS("INFO {\"server_id\":\"x\",\"max_payload\":1048576,\"pad\":\""+strings.Repeat("x", 1000)+"\"}\r\n"))
	pg := serve(t, func(net.Conn) {})
	pgURL := "postgres://u:secret@" + pg + "/db?sslmode=disable"
	t.Setenv(RedisEnv, redis)
	t.Setenv(NATSEnv, "nats://"+nats)
	t.Setenv(PostgresEnv, pgURL)
	for _, tc := range []struct {
		name string
		f    func(testing.TB) string
		want string
	}{
		{"PostgresURL", PostgresURL, pgURL},
		{"RedisAddr", RedisAddr, redis},
		{"NATSURL", NATSURL, "nats://" + nats},
	} {
		r, got := call(t, tc.f)
		if r.skipped || r.failed {
			t.Errorf("%s: skipped %v, failed %v: %s", tc.name, r.skipped, r.failed, r.msg)
		} else if got != tc.want {
			t.Errorf("%s = %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestUnavailable(t *testing.T) {
	closed := closedPort(t)
	wrongRedis := serve(t, fakeRedis("-NOAUTH Authentication required.\r\n"))
	wrongNATS := serve(t, fakeNATS("+PONG\r\n"))
	cases := []struct {
		name, env, value string
		f                func(testing.TB) string
		want             []string // in the message
	}{
		{"PostgresClosed", PostgresEnv, "postgres://u:secret@" + closed + "/db", PostgresURL,
			[]string{"PostgreSQL not reachable", closed, "$" + PostgresEnv, "docker run", "refused"}},
		{"RedisClosed", RedisEnv, closed, RedisAddr,
			[]string{"Redis not reachable", closed, "$" + RedisEnv, "redis-server"}},
		{"RedisNotPong", RedisEnv, wrongRedis, RedisAddr,
			[]string{"Redis not reachable", "NOAUTH"}},
		{"NATSClosed", NATSEnv, "nats://" + closed, NATSURL,
			[]string{"NATS not reachable", closed, "$" + NATSEnv, "nats-server"}},
		{"NATSNoInfo", NATSEnv, "nats://" + wrongNATS, NATSURL,
			[]string{"NATS not reachable", "want an INFO line"}},
	}
	for _, ci := range []string{"", "false", "true", "1"} {
		inCI := ci == "true" || ci == "1"
		for _, tc := range cases {
			t.Run(fmt.Sprintf("%s/CI=%s", tc.name, ci), func(t *testing.T) {
				t.Setenv("CI", ci)
				t.Setenv(tc.env, tc.value)
				r, _ := call(t, tc.f)
				if r.failed != inCI || r.skipped == inCI {
					t.Fatalf("skipped %v, failed %v; want failed only in CI (message: %s)", r.skipped, r.failed, r.msg)
				}
				for _, w := range tc.want {
					if !strings.Contains(r.msg, w) {
						t.Errorf("message %q does not contain %q", r.msg, w)
					}
				}
				if strings.Contains(r.msg, "secret") {
					t.Errorf("message %q shows the password", r.msg)
				}
			})
		}
	}
}

func TestDefaultNamed(t *testing.T) {
	t.Setenv("CI", "")
	t.Setenv(RedisEnv, "")
	// Whether or not a Redis runs here, the message (if any) must say that
	// the default was used and how to change it.
	if r, _ := call(t, RedisAddr); r.skipped && !strings.Contains(r.msg, "the default; set $"+RedisEnv) {
		t.Errorf("message %q does not say the default was used", r.msg)
	}
}

func TestPostgresAddr(t *testing.T) {
	for _, tc := range []struct{ in, network, addr string }{
		{DefaultPostgres, "tcp", "127.0.0.1:5432"},
		{"postgresql://db.example:6543/x", "tcp", "db.example:6543"},
		{"postgres://u:p@h1:1111,h2:2222/x", "tcp", "h1:1111"},
		{"postgres://[::1]:5433/x", "tcp", "[::1]:5433"},
		{"postgres://[::1]/x", "tcp", "[::1]:5432"},
		{"postgres:///x", "tcp", "localhost:5432"},
		{"postgres:///x?host=/run/postgresql", "unix", "/run/postgresql/.s.PGSQL.5432"},
		{"postgres://h/x?port=7777", "tcp", "h:7777"},
		{"host=db port=6000 user=u dbname=x", "tcp", "db:6000"},
		{"host='/tmp' dbname=x", "unix", "/tmp/.s.PGSQL.5432"},
		{"dbname=x", "tcp", "localhost:5432"},
	} {
		network, addr, err := postgresAddr(tc.in)
		if err != nil || network != tc.network || addr != tc.addr {
			t.Errorf("postgresAddr(%q) = %q, %q, %v; want %q, %q", tc.in, network, addr, err, tc.network, tc.addr)
		}
	}
	for _, bad := range []string{"postgres://h:99999/x", "host=h port=x"} {
		if _, _, err := postgresAddr(bad); err == nil {
			t.Errorf("postgresAddr(%q) succeeded", bad)
		}
	}
}

func TestNATSAddr(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{DefaultNATS, "127.0.0.1:4222"},
		{"nats://a:1,nats://b:2", "a:1"},
		{"tls://user:pw@n.example:4443", "n.example:4443"},
		{"nats://n.example", "n.example:4222"},
		{"10.0.0.1:5555", "10.0.0.1:5555"},
	} {
		if got, err := natsAddr(tc.in); err != nil || got != tc.want {
			t.Errorf("natsAddr(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestRedact(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"postgres://u:secret@h/db", "postgres://u:xxxxx@h/db"},
		{"postgres://u@h/db", "postgres://u@h/db"},
		{"host=h password=secret dbname=x", "host=h password=xxxxx dbname=x"},
		{"127.0.0.1:6379", "127.0.0.1:6379"},
	} {
		if got := redact(tc.in); got != tc.want {
			t.Errorf("redact(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
