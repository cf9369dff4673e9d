package server

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	goredis "github.com/redis/go-redis/v9"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/postgres"
	"github.com/courier-im/courier/internal/cluster"
	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/directory/memory"
	dirredis "github.com/courier-im/courier/internal/directory/redis"
	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/mailbox/jetstream"
)

// Roles says which of courier's three roles a process plays. The zero
// value means all three.
type Roles struct {
	Gateway bool // device connections (WebSocket /v1/ws)
	API     bool // the HTTP API
	Worker  bool // the delivery consumer (needs NATS)
}

// AllRoles is a single node's roles.
var AllRoles = Roles{Gateway: true, API: true, Worker: true}

// ParseRoles parses a comma-separated list of gateway, api and worker
// ("all" is the three).
func ParseRoles(s string) (Roles, error) {
	var r Roles
	if strings.TrimSpace(s) == "" {
		return r, errors.New("roles: empty; want a comma-separated list of gateway, api, worker")
	}
	for _, name := range strings.Split(s, ",") {
		switch strings.TrimSpace(strings.ToLower(name)) {
		case "gateway":
			r.Gateway = true
		case "api":
			r.API = true
		case "worker":
			r.Worker = true
		case "all":
			r = AllRoles
		default:
			return Roles{}, fmt.Errorf("roles: unknown role %q; want gateway, api, worker (comma-separated)", strings.TrimSpace(name))
		}
	}
	return r, nil
}

func (r Roles) String() string {
	var names []string
	if r.Gateway {
		names = append(names, "gateway")
	}
	if r.API {
		names = append(names, "api")
	}
	if r.Worker {
		names = append(names, "worker")
	}
	return strings.Join(names, ",")
}

func (r Roles) none() bool { return !r.Gateway && !r.API && !r.Worker }

// ClusterConfig is the part of Config that makes a node part of a cluster
// (issue 6). With NATS, Redis and Postgres all empty the node runs on its
// embedded backends, as a single node.
type ClusterConfig struct {
	// Roles this process plays; zero means all.
	Roles Roles
	// NATS is a comma-separated list of NATS server URLs: the mailbox is
	// then a JetStream stream, and nodes talk over NATS subjects.
	NATS string
	// Redis is the session directory's redis:// URL.
	Redis string
	// Postgres is the account store's PostgreSQL URL.
	Postgres string
	// Node names this process in the cluster (cluster.ValidNode). Default:
	// the host name and pid.
	Node string
	// Replicas of the JetStream stream (1 to 5; default 1, 3 in
	// production).
	Replicas int

	// Names, for running several clusters (or tests) on one set of
	// backends. Empty means the defaults: stream COURIER_MAILBOX with
	// subjects courier.mailbox.*, node subjects courier.node.<id>, Redis
	// keys courier:dir:*, and the URL's schema.
	Stream         string
	MailboxSubject string
	NodeSubject    string
	RedisPrefix    string
	PostgresSchema string
	// DevicesSubject carries the nodes' device-list changes to each
	// other's caches (default cluster.DefaultDevicesSubject).
	DevicesSubject string

	// SessionTTL: a gateway's registrations expire this long after its
	// last heartbeat. Default cluster.DefaultSessionTTL.
	SessionTTL time.Duration
	// AckWait: a worker that took an entry and died leaves it to another
	// after this long. Default cluster.DefaultAckWait.
	AckWait time.Duration
	// PushWebhook, if set, is the URL the workers POST wake-ups to; empty
	// means the log provider.
	PushWebhook string
}

// clustered reports whether any external backend is configured.
func (c *ClusterConfig) clustered() bool { return c.NATS != "" || c.Redis != "" || c.Postgres != "" }

func (c *ClusterConfig) setDefaults() {
	if c.Roles.none() {
		c.Roles = AllRoles
	}
	if c.Node == "" {
		host, _ := os.Hostname()
		c.Node = cluster.NodeID(host + "-" + strconv.Itoa(os.Getpid()))
	}
	if c.Replicas == 0 {
		c.Replicas = 1
	}
}

// verify reports what is wrong with the cluster settings, in particular a
// role split that lacks the backends its roles share.
func (c *ClusterConfig) verify() []error {
	var errs []error
	if !cluster.ValidNode(c.Node) {
		errs = append(errs, fmt.Errorf("node %q: want 1 to 64 of A-Z a-z 0-9 _ -", c.Node))
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		errs = append(errs, fmt.Errorf("replicas %d: want 1 to 5", c.Replicas))
	}
	if c.NATS == "" {
		if c.Roles != AllRoles {
			errs = append(errs, fmt.Errorf("roles %q: a process with only some roles shares the mailbox and talks to the others over NATS: give --nats", c.Roles))
		}
		if c.Redis != "" {
			errs = append(errs, errors.New("--redis without --nats: the shared session directory is only useful to nodes that reach each other over NATS"))
		}
		if c.Replicas != 1 {
			errs = append(errs, errors.New("--replicas is the JetStream stream's replication: give --nats"))
		}
	} else {
		for _, u := range strings.Split(c.NATS, ",") {
			u = strings.TrimSpace(u)
			if !strings.HasPrefix(u, "nats://") && !strings.HasPrefix(u, "tls://") {
				errs = append(errs, fmt.Errorf("nats URL %q: want nats://host:port or tls://host:port", u))
			}
		}
		if c.Roles != AllRoles && c.Redis == "" && (c.Roles.Gateway || c.Roles.Worker) {
			errs = append(errs, fmt.Errorf("roles %q: gateways and workers of several processes find each other's devices in the session directory: give --redis", c.Roles))
		}
		if c.Roles != AllRoles && c.Postgres == "" && (c.Roles.Gateway || c.Roles.API) {
			errs = append(errs, fmt.Errorf("roles %q: several processes share one account store: give --postgres", c.Roles))
		}
	}
	if c.Redis != "" {
		if _, err := goredis.ParseURL(c.Redis); err != nil {
			errs = append(errs, fmt.Errorf("redis URL: %v", err))
		}
	}
	if c.Postgres != "" && !strings.HasPrefix(c.Postgres, "postgres://") && !strings.HasPrefix(c.Postgres, "postgresql://") {
		errs = append(errs, fmt.Errorf("postgres URL %q: want postgres://user@host:port/db", c.Postgres))
	}
	if c.PushWebhook != "" {
		if _, err := cluster.NewWebhook(c.PushWebhook, nil); err != nil {
			errs = append(errs, err)
		}
	}
	if c.SessionTTL < 0 || c.AckWait < 0 {
		errs = append(errs, errors.New("session ttl and ack wait must not be negative"))
	}
	return errs
}

// clusterState is what a clustered server holds besides the single-node
// parts.
type clusterState struct {
	nc     *nats.Conn
	rdb    *goredis.Client
	dir    directory.Directory
	js     *jetstream.Store // the mailbox, when it is on JetStream
	node   *cluster.Node
	worker *cluster.Worker

	stopping atomic.Bool
}

// openCluster connects to the configured external backends and opens the
// mailbox (JetStream), the account store (PostgreSQL) and the session
// directory (Redis, or in memory for a single process on NATS), unless the
// caller gave its own mailbox or account store.
func (s *Server) openCluster() error {
	cfg := &s.cfg.Cluster
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if cfg.NATS != "" {
		nc, err := nats.Connect(cfg.NATS, nats.Name("courier "+cfg.Node), nats.MaxReconnects(-1),
			nats.ReconnectWait(250*time.Millisecond), nats.RetryOnFailedConnect(false),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
				if err != nil {
					s.log.Warn("nats: disconnected; reconnecting", "err", err)
				}
			}),
			nats.ReconnectHandler(func(nc *nats.Conn) { s.log.Info("nats: reconnected", "server", nc.ConnectedUrlRedacted()) }))
		if err != nil {
			return fmt.Errorf("connect to nats %s: %w", cfg.NATS, err)
		}
		s.cl.nc = nc
		s.owned = append(s.owned, func() error { nc.Close(); return nil })
		if s.mailbox == nil {
			st, err := s.openStream(ctx, nc)
			if err != nil {
				return fmt.Errorf("open the jetstream mailbox: %w", err)
			}
			s.mailbox, s.cl.js = st, st
			s.owned = append(s.owned, st.Close)
		}
		if cfg.Redis != "" {
			opts, err := goredis.ParseURL(cfg.Redis)
			if err != nil {
				return fmt.Errorf("redis URL: %w", err)
			}
			rdb := goredis.NewClient(opts)
			s.owned = append(s.owned, rdb.Close)
			if err := rdb.Ping(ctx).Err(); err != nil {
				return fmt.Errorf("connect to redis %s: %w", opts.Addr, err)
			}
			s.cl.rdb = rdb
			s.cl.dir = dirredis.New(rdb, dirredis.Options{Prefix: cfg.RedisPrefix})
		} else {
			s.cl.dir = memory.New(memory.Options{})
		}
		s.owned = append(s.owned, s.cl.dir.Close)
	}
	if cfg.Postgres != "" && s.accounts == nil && (cfg.Roles.Gateway || cfg.Roles.API) {
		st, err := postgres.Open(ctx, cfg.Postgres, postgres.Options{Logger: s.log, Schema: cfg.PostgresSchema, MaxGroupMembers: s.cfg.MaxGroupMembers})
		if err != nil {
			return fmt.Errorf("open the postgres account store: %w", err)
		}
		s.accounts = st
		s.owned = append(s.owned, st.Close)
	}
	if cfg.NATS != "" {
		node, err := cluster.NewNode(cluster.NodeConfig{
			Conn: s.cl.nc, Directory: s.cl.dir, ID: cfg.Node, SubjectPrefix: cfg.NodeSubject,
			SessionTTL: cfg.SessionTTL, Logger: s.log,
		})
		if err != nil {
			return err
		}
		s.cl.node = node
	}
	return nil
}

// openStream opens the JetStream mailbox, waiting (up to ctx) for a
// JetStream cluster that is still electing its leaders, as it is when the
// NATS servers and courier start together.
func (s *Server) openStream(ctx context.Context, nc *nats.Conn) (*jetstream.Store, error) {
	cfg := &s.cfg.Cluster
	for {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := jetstream.Open(actx, nc, jetstream.Options{
			Stream: cfg.Stream, SubjectPrefix: cfg.MailboxSubject, Replicas: cfg.Replicas,
			MaxAge: s.cfg.Retention, Logger: s.log,
		})
		cancel()
		if err == nil || errors.Is(err, jetstream.ErrServerTooOld) || ctx.Err() != nil {
			return st, err
		}
		s.log.Warn("jetstream not ready; retrying", "err", err)
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(time.Second):
		}
	}
}

// gatewayCluster is the gateway's link to the cluster: nil for a single
// node (an interface holding a nil *Node would not be).
func (s *Server) gatewayCluster() gateway.Cluster {
	if s.cl.node == nil || !s.cfg.Cluster.Roles.Gateway {
		return nil
	}
	return s.cl.node
}

// startCluster attaches the node to the gateway and starts the worker,
// for the roles this process plays.
func (s *Server) startCluster() error {
	cfg := &s.cfg.Cluster
	if s.cl.node != nil && cfg.Roles.Gateway {
		if err := s.cl.node.Start(s.gateway); err != nil {
			return err
		}
		s.owned = append(s.owned, s.cl.node.Close)
	}
	if cfg.Roles.Worker && s.cl.nc != nil {
		if s.cl.js == nil {
			return errors.New("the worker role consumes the JetStream mailbox: it cannot run with another mailbox")
		}
		var push cluster.Pusher = cluster.LogPusher{Logger: s.log}
		if cfg.PushWebhook != "" {
			wh, err := cluster.NewWebhook(cfg.PushWebhook, nil)
			if err != nil {
				return err
			}
			push = wh
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		w, err := cluster.StartWorker(ctx, cluster.WorkerConfig{
			Conn: s.cl.nc, Stream: s.cl.js.StreamName(), Filter: s.cl.js.DeviceSubjects(), DeviceOf: s.cl.js.DeviceOf,
			Directory: s.cl.dir, Push: push, SubjectPrefix: cfg.NodeSubject, AckWait: cfg.AckWait, Logger: s.log,
			Registry: s.registry,
		})
		if err != nil {
			return err
		}
		s.cl.worker = w
		s.owned = append(s.owned, w.Close)
	}
	return nil
}

// draining reports whether the server is shutting down.
func (s *Server) draining() bool { return s.cl.stopping.Load() || s.gateway.Draining() }

// ready checks that every backend this server uses answers.
func (s *Server) ready(ctx context.Context) error {
	var errs []error
	if nc := s.cl.nc; nc != nil {
		if !nc.IsConnected() {
			errs = append(errs, fmt.Errorf("nats: %v", nc.Status()))
		} else if err := nc.FlushWithContext(ctx); err != nil {
			errs = append(errs, fmt.Errorf("nats: %w", err))
		}
	}
	if s.cl.rdb != nil {
		if err := s.cl.rdb.Ping(ctx).Err(); err != nil {
			errs = append(errs, fmt.Errorf("redis: %w", err))
		}
	}
	if s.accounts != nil {
		// A lookup is a round trip to the store; a missing user is an answer.
		if _, err := s.accounts.User(ctx, "courier-ready-probe"); err != nil && !errors.Is(err, accounts.ErrNotFound) {
			errs = append(errs, fmt.Errorf("accounts: %w", err))
		}
	}
	return errors.Join(errs...)
}
