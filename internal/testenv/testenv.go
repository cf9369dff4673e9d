// Package testenv finds the external services that some tests need
// (PostgreSQL, Redis, NATS) and decides what a test does when one is
// missing.
//
// Each service is named by an environment variable with a default for a
// server running locally on its standard port:
//
//	COURIER_TEST_POSTGRES  postgres://postgres@127.0.0.1:5432/test?sslmode=disable
//	COURIER_TEST_REDIS     127.0.0.1:6379
//	COURIER_TEST_NATS      nats://127.0.0.1:4222
//
// Before returning the address a function checks, within a couple of
// seconds, that the service answers. If it does not, the rule is:
//
//   - outside CI the test is skipped, with a message saying what is missing
//     and how to start it, so that `go test ./...` works on a laptop without
//     the services;
//   - when the environment variable CI is true (as CI systems set it), the
//     test fails instead, so that a CI job that lost its services cannot
//     pass by skipping everything.
//
// The checks speak only as much of each protocol as shows that the right
// kind of server is there (PostgreSQL: a TCP connection; Redis: PING; NATS:
// the INFO greeting). Authentication and databases are left to the
// caller's real client, whose errors say more than a probe could. The
// package depends on the standard library only.
package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Environment variables and their defaults.
const (
	PostgresEnv     = "COURIER_TEST_POSTGRES"
	DefaultPostgres = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"
	RedisEnv        = "COURIER_TEST_REDIS"
	DefaultRedis    = "127.0.0.1:6379"
	NATSEnv         = "COURIER_TEST_NATS"
	DefaultNATS     = "nats://127.0.0.1:4222"
)

// probeTimeout bounds each reachability check (dial and greeting).
const probeTimeout = 2 * time.Second

// PostgresURL returns the connection URL of the test PostgreSQL server
// ($COURIER_TEST_POSTGRES, or DefaultPostgres) after checking that a TCP (or
// Unix socket) connection to it succeeds. See the package doc for what
// happens if it does not.
func PostgresURL(t testing.TB) string {
	t.Helper()
	u := setting(PostgresEnv, DefaultPostgres)
	network, addr, err := postgresAddr(u)
	if err == nil {
		err = probe(network, addr, nil)
	}
	if err != nil {
		unavailable(t, "PostgreSQL", PostgresEnv, u, err,
			"start one, e.g. `pg_ctlcluster <version> main start` for a Debian package, or "+
				"`docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust -e POSTGRES_DB=test postgres`, "+
				"or point "+PostgresEnv+" at a server (a role that may create schemas in its database)")
	}
	return u
}

// RedisAddr returns the host:port of the test Redis server
// ($COURIER_TEST_REDIS, or DefaultRedis) after checking that it answers PING
// with +PONG. See the package doc for what happens if it does not.
func RedisAddr(t testing.TB) string {
	t.Helper()
	addr := setting(RedisEnv, DefaultRedis)
	err := probe("tcp", addr, func(c net.Conn, r *bufio.Reader) error {
		if _, err := c.Write([]byte("PING\r\n")); err != nil {
			return err
		}
		line, err := readLine(r)
		if err != nil {
			return err
		}
		if line != "+PONG" {
			return fmt.Errorf("PING answered %q, want \"+PONG\"", line)
		}
		return nil
	})
	if err != nil {
		unavailable(t, "Redis", RedisEnv, addr, err,
			"start one, e.g. `redis-server --daemonize yes` or `docker run -d -p 6379:6379 redis`, "+
				"or point "+RedisEnv+" at a server (host:port, no password)")
	}
	return addr
}

// NATSURL returns the URL of the test NATS server ($COURIER_TEST_NATS, or
// DefaultNATS) after checking that it greets a new connection with its INFO
// line. See the package doc for what happens if it does not.
func NATSURL(t testing.TB) string {
	t.Helper()
	u := setting(NATSEnv, DefaultNATS)
	addr, err := natsAddr(u)
	if err == nil {
		err = probe("tcp", addr, func(_ net.Conn, r *bufio.Reader) error {
			line, err := readLine(r)
			if err != nil {
				return err
			}
			if !strings.HasPrefix(line, "INFO ") {
				return fmt.Errorf("greeting is %q, want an INFO line", truncate(line, 64))
			}
			return nil
		})
	}
	if err != nil {
		unavailable(t, "NATS", NATSEnv, u, err,
			"start one, e.g. `nats-server -js &` or `docker run -d -p 4222:4222 nats -js`, "+
				"or point "+NATSEnv+" at a server")
	}
	return u
}

// InCI reports whether the environment variable CI holds a true value
// (true, 1, ...), in which case a missing service fails the test.
func InCI() bool {
	ci, err := strconv.ParseBool(os.Getenv("CI"))
	return err == nil && ci
}

func setting(env, def string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	return def
}

// source says where a setting came from, for messages.
func source(env string) string {
	if os.Getenv(env) != "" {
		return "from $" + env
	}
	return "the default; set $" + env + " to use another"
}

// unavailable applies the package's rule to a service that did not answer.
// A password in addr is not shown.
func unavailable(t testing.TB, service, env, addr string, err error, howto string) {
	t.Helper()
	msg := fmt.Sprintf("%s not reachable at %s (%s): %v; %s",
		service, redact(addr), source(env), err, howto)
	if InCI() {
		t.Fatalf("%s [CI=%s: a missing service fails the test]", msg, os.Getenv("CI"))
	}
	t.Skipf("%s [skipped outside CI; with CI=true this fails]", msg)
}

// probe connects to addr and, if greet is not nil, lets it check the
// server's greeting, all within probeTimeout.
func probe(network, addr string, greet func(net.Conn, *bufio.Reader) error) error {
	deadline := time.Now().Add(probeTimeout)
	c, err := net.DialTimeout(network, addr, probeTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	if greet == nil {
		return nil
	}
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	return greet(c, bufio.NewReaderSize(c, 512))
}

// readLine reads one CRLF-terminated line, refusing to read far into a
// server that is not the one expected.
func readLine(r *bufio.Reader) (string, error) {
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		// NATS INFO lines can exceed the buffer; the prefix is enough.
		return string(line), nil
	}
	if err != nil {
		return "", fmt.Errorf("reading greeting: %w", err)
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// postgresAddr finds the network address of the first host in a libpq
// connection string: a postgres:// or postgresql:// URL, or key=value
// pairs. A host starting with '/' is a Unix socket directory.
func postgresAddr(conn string) (network, addr string, err error) {
	host, port := "", ""
	if strings.HasPrefix(conn, "postgres://") || strings.HasPrefix(conn, "postgresql://") {
		u, err := url.Parse(conn)
		if err != nil {
			return "", "", fmt.Errorf("bad URL: %w", errors.Unwrap(err))
		}
		hostport, _, _ := strings.Cut(u.Host, ",") // several hosts: try the first
		if hostport != "" {
			if host, port, err = net.SplitHostPort(hostport); err != nil {
				host, port = strings.Trim(hostport, "[]"), ""
			}
		}
		q := u.Query()
		if h := q.Get("host"); h != "" {
			host, _, _ = strings.Cut(h, ",")
		}
		if p := q.Get("port"); p != "" {
			port, _, _ = strings.Cut(p, ",")
		}
	} else {
		for _, kv := range strings.Fields(conn) {
			k, v, _ := strings.Cut(kv, "=")
			v = strings.Trim(v, "'")
			switch k {
			case "host":
				host, _, _ = strings.Cut(v, ",")
			case "port":
				port, _, _ = strings.Cut(v, ",")
			}
		}
	}
	if host == "" {
		host = "localhost"
	}
	if port == "" {
		port = "5432"
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return "", "", fmt.Errorf("bad port %q", port)
	}
	if strings.HasPrefix(host, "/") {
		return "unix", host + "/.s.PGSQL." + port, nil
	}
	return "tcp", net.JoinHostPort(host, port), nil
}

// natsAddr finds host:port in a NATS URL (nats://, tls://, or a bare
// host:port); several comma-separated servers: the first.
func natsAddr(s string) (string, error) {
	first, _, _ := strings.Cut(s, ",")
	hostport := first
	if strings.Contains(first, "://") {
		u, err := url.Parse(first)
		if err != nil {
			return "", fmt.Errorf("bad URL: %w", errors.Unwrap(err))
		}
		hostport = u.Host
	}
	if _, _, err := net.SplitHostPort(hostport); err != nil {
		hostport = net.JoinHostPort(strings.Trim(hostport, "[]"), "4222")
	}
	return hostport, nil
}

// redact hides the password in a URL or in a key=value connection string.
func redact(s string) string {
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil {
			return "(unparsable URL)"
		}
		return u.Redacted()
	}
	fields := strings.Fields(s)
	for i, kv := range fields {
		if strings.HasPrefix(kv, "password=") {
			fields[i] = "password=xxxxx"
		}
	}
	return strings.Join(fields, " ")
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
