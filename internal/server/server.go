// Package server wires a courier node: the backends (embedded: a Pebble
// mailbox and a SQLite account store in the data directory; or, in a
// cluster, JetStream, PostgreSQL and Redis, see cluster.go), the delivery
// service, the WebSocket gateway, the HTTP API and the delivery worker, on
// one port, for the roles the process plays.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/cache"
	"github.com/courier-im/courier/internal/accounts/sqlite"
	"github.com/courier-im/courier/internal/api"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/keys"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/metrics"
)

// Config configures a Server. The zero value of every field but Logger
// means its default.
type Config struct {
	// Addr is the address of the one HTTP port (API, WebSocket, metrics).
	Addr string
	// DataDir holds the mailbox and the account database.
	DataDir string
	// MaxPayload is the largest payload for one device, in bytes.
	MaxPayload int
	// MaxPayloads is the most devices one send may address.
	MaxPayloads int
	// MaxGroupMembers caps a group's members, in the account store the
	// server opens (zero: accounts.DefaultMaxGroupMembers).
	MaxGroupMembers int
	// Retention is how long an entry never acknowledged is kept.
	Retention time.Duration
	// ExpireEvery is how often expired entries are removed.
	ExpireEvery time.Duration
	// IdleTimeout closes connections that send nothing for this long.
	IdleTimeout time.Duration
	// WriteTimeout closes connections that do not read for this long.
	WriteTimeout time.Duration
	// ShutdownTimeout bounds a graceful shutdown (Run).
	ShutdownTimeout time.Duration
	// MinFreeBytes: below this much free disk, sends are refused
	// (storage_unavailable) rather than risk a half-written store.
	MinFreeBytes int64
	// AuthFailures limits failed authentications per source address and
	// per device (zero fields mean auth's defaults: 10 failures, then one
	// a second; a negative Burst turns the limits off).
	AuthFailures auth.LimitConfig
	// KeyFetches limits prekey bundle fetches per requesting device (zero
	// fields mean keys' defaults; a negative Burst turns the limit off).
	KeyFetches keys.LimitConfig
	// MaxConnsPerAddr caps the WebSocket connections from one source
	// address (an IP; for IPv6 a /64). Zero means DefaultMaxConnsPerAddr;
	// negative means no cap.
	MaxConnsPerAddr int
	// MaxConns, MaxMemory, AdmitWatermark and AdmitCPU are the gateway's
	// admission control (gateway.Config has the details): from
	// AdmitWatermark (zero: gateway.DefaultAdmitWatermark) of MaxConns
	// connections or of MaxMemory bytes, or from AdmitCPU of the cores,
	// new connections are refused with 503 overloaded. Zero MaxConns means
	// no cap; zero MaxMemory, the Go memory limit if set; zero AdmitCPU,
	// no CPU watermark.
	MaxConns       int
	MaxMemory      int64
	AdmitWatermark float64
	AdmitCPU       float64
	// ReadHeaderTimeout bounds how long a client may take to send a
	// request's headers; BodyTimeout, its body. Zero means the default.
	ReadHeaderTimeout time.Duration
	BodyTimeout       time.Duration
	Logger            *slog.Logger
	// Transport serves the WebSocket connections once upgraded:
	// gateway.TransportEpoll (DefaultTransport: event loops, ≈ 3.5 KiB
	// per idle connection) or gateway.TransportGoroutine (a reader and a
	// writer goroutine each, ≈ 50 KiB). Empty means the default.
	Transport string

	// Mailbox and Accounts, when set, are used instead of the embedded
	// backends in DataDir (the Server then does not close them).
	Mailbox  mailbox.Store
	Accounts accounts.Store

	// DeviceCacheSize is how many users' device lists are kept in memory
	// (cache.DefaultSize if zero; negative turns the cache off), and
	// DeviceCacheTTL how long one is used (cache.DefaultTTL if zero): it
	// bounds how long a change announced by another node goes unseen if
	// the announcement is lost (see devicecache.go).
	DeviceCacheSize int
	DeviceCacheTTL  time.Duration

	// GroupCacheSize is how many groups are kept in memory, each checked
	// against the store's version of it on every look-up (package
	// accounts/cache, Groups); 0 means cache.DefaultGroups, negative none.
	GroupCacheSize int

	// Cluster makes the server one node of a cluster (see cluster.go);
	// the zero value is a single node on embedded backends.
	Cluster ClusterConfig
}

// Defaults.
const (
	DefaultAddr            = "127.0.0.1:8080"
	DefaultDataDir         = "courier-data"
	DefaultRetention       = 30 * 24 * time.Hour
	DefaultExpireEvery     = time.Hour
	DefaultShutdownTimeout = 20 * time.Second
	DefaultMinFreeBytes    = 64 << 20
	// DefaultMaxConnsPerAddr is generous: load tests open thousands of
	// connections from one machine (on loopback, from many 127.0.0.x).
	DefaultMaxConnsPerAddr   = 1000
	DefaultReadHeaderTimeout = 10 * time.Second
	// DefaultTransport serves connections from event loops: an idle
	// connection costs a fourteenth of the memory it does on goroutines
	// (docs/performance.md, "Gateway transport: goroutines vs epoll").
	DefaultTransport = gateway.TransportEpoll
)

func (c *Config) setDefaults() {
	if c.Addr == "" {
		c.Addr = DefaultAddr
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = delivery.DefaultMaxPayload
	}
	if c.MaxPayloads == 0 {
		c.MaxPayloads = delivery.DefaultMaxPayloads
	}
	if c.Retention == 0 {
		c.Retention = DefaultRetention
	}
	if c.ExpireEvery == 0 {
		c.ExpireEvery = DefaultExpireEvery
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = gateway.DefaultIdleTimeout
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = gateway.DefaultWriteTimeout
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = DefaultShutdownTimeout
	}
	if c.MinFreeBytes == 0 {
		c.MinFreeBytes = DefaultMinFreeBytes
	}
	if c.MaxConnsPerAddr == 0 {
		c.MaxConnsPerAddr = DefaultMaxConnsPerAddr
	}
	if c.ReadHeaderTimeout == 0 {
		c.ReadHeaderTimeout = DefaultReadHeaderTimeout
	}
	if c.Transport == "" {
		c.Transport = DefaultTransport
	}
	if c.BodyTimeout == 0 {
		c.BodyTimeout = api.DefaultBodyTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	c.Cluster.setDefaults()
}

// Verify reports every problem with the configuration at once.
func (c *Config) Verify() error {
	var errs []error
	if c.MaxPayload < 1 || c.MaxPayload > 16<<20 {
		errs = append(errs, fmt.Errorf("max payload %d: want 1 byte to 16 MiB", c.MaxPayload))
	}
	if c.MaxPayloads < 1 || c.MaxPayloads > 1024 {
		errs = append(errs, fmt.Errorf("max payloads per send %d: want 1 to 1024", c.MaxPayloads))
	}
	if c.Retention < time.Minute {
		errs = append(errs, fmt.Errorf("retention %v: want at least a minute", c.Retention))
	}
	if c.ExpireEvery < time.Second {
		errs = append(errs, fmt.Errorf("expire interval %v: want at least a second", c.ExpireEvery))
	}
	if c.IdleTimeout < time.Second || c.WriteTimeout < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("idle timeout %v / write timeout %v: too short", c.IdleTimeout, c.WriteTimeout))
	}
	if c.ReadHeaderTimeout < 0 || c.BodyTimeout < 0 || c.AuthFailures.Every < 0 {
		errs = append(errs, fmt.Errorf("read header timeout %v / body timeout %v / auth failure interval %v: want positive",
			c.ReadHeaderTimeout, c.BodyTimeout, c.AuthFailures.Every))
	}
	switch c.Transport {
	case "", gateway.TransportGoroutine, gateway.TransportEpoll:
	default:
		errs = append(errs, fmt.Errorf("transport %q: want %q or %q", c.Transport, gateway.TransportGoroutine, gateway.TransportEpoll))
	}
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		errs = append(errs, fmt.Errorf("addr %q: %v", c.Addr, err))
	}
	if c.AdmitWatermark < 0 || c.AdmitWatermark > 1 {
		errs = append(errs, fmt.Errorf("admission watermark %v: want more than 0, at most 1", c.AdmitWatermark))
	}
	if c.AdmitCPU < 0 || c.AdmitCPU > 1 {
		errs = append(errs, fmt.Errorf("CPU admission watermark %v: want 0 (off) to 1", c.AdmitCPU))
	}
	if c.DeviceCacheTTL < 0 {
		errs = append(errs, fmt.Errorf("device cache ttl %v: want a positive duration", c.DeviceCacheTTL))
	}
	errs = append(errs, c.Cluster.verify()...)
	return errors.Join(errs...)
}

// Server is a single courier node.
type Server struct {
	cfg      Config
	log      *slog.Logger
	mailbox  mailbox.Store
	accounts accounts.Store
	owned    []func() error // closers of the backends the server opened
	gateway  *gateway.Gateway
	handler  http.Handler
	registry *prometheus.Registry

	mu        sync.Mutex
	http      *http.Server
	stopOnce  sync.Once
	stopErr   error
	expirerWG sync.WaitGroup
	stop      chan struct{}

	cl clusterState
}

// New opens the backends and builds the server. It does not listen yet.
func New(cfg Config) (*Server, error) {
	cfg.setDefaults()
	if err := cfg.Verify(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, stop: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			s.closeBackends()
		}
	}()
	s.mailbox, s.accounts = cfg.Mailbox, cfg.Accounts
	if err := s.openCluster(); err != nil {
		return nil, err
	}
	// A worker-only process has no use for an account store.
	needAccounts := cfg.Cluster.Roles.Gateway || cfg.Cluster.Roles.API
	if s.mailbox == nil || (s.accounts == nil && needAccounts) {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("data directory: %w", err)
		}
	}
	if s.mailbox == nil {
		mb, err := pebble.Open(filepath.Join(cfg.DataDir, "mailbox"), pebble.Options{Logger: cfg.Logger, MinFreeBytes: cfg.MinFreeBytes})
		if err != nil {
			return nil, fmt.Errorf("open mailbox: %w", err)
		}
		s.mailbox = mb
		s.owned = append(s.owned, mb.Close)
	}
	if s.accounts == nil && needAccounts {
		ac, err := sqlite.Open(filepath.Join(cfg.DataDir, "accounts.db"), sqlite.Options{Logger: cfg.Logger, MaxGroupMembers: cfg.MaxGroupMembers})
		if err != nil {
			return nil, fmt.Errorf("open accounts: %w", err)
		}
		s.accounts = ac
		s.owned = append(s.owned, ac.Close)
	}

	keyStore, hasKeys := s.accounts.(accounts.KeyStore)
	if !hasKeys && needAccounts {
		return nil, fmt.Errorf("the account store %T keeps no prekeys (accounts.KeyStore)", s.accounts)
	}
	groups, hasGroups := s.accounts.(accounts.GroupStore)
	if !hasGroups && needAccounts {
		return nil, fmt.Errorf("the account store %T keeps no groups (accounts.GroupStore)", s.accounts)
	}

	s.registry = prometheus.NewRegistry()
	s.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := metrics.New(s.registry)
	if groups != nil {
		groups = cache.NewGroups(groups, cfg.GroupCacheSize, s.registry)
	}
	// From here on the account store is seen through the device-list
	// cache (the capabilities above are the store's own).
	cached, err := s.openDeviceCache()
	if err != nil {
		return nil, err
	}
	s.accounts = cached
	if d, ok := s.mailbox.(mailbox.Depther); ok {
		s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "courier_mailbox_depth", Help: "Entries held in all device mailboxes (accepted, not yet acknowledged).",
		}, func() float64 { return float64(d.Depth()) }))
	}
	if in, ok := s.mailbox.(mailbox.Instrumented); ok {
		s.registry.MustRegister(in.Collectors()...)
	}

	authn := &auth.Authenticator{Accounts: s.accounts, Limiter: auth.NewLimiter(cfg.AuthFailures)}
	// The gateway is the delivery service's notifier and needs the service:
	// a small forwarding notifier breaks the cycle without setters.
	var notify notifier
	svc := delivery.New(delivery.Config{
		Mailbox: s.mailbox, Accounts: s.accounts, Groups: groups, Notifier: &notify, Metrics: m, Logger: cfg.Logger,
		MaxPayload: cfg.MaxPayload, MaxPayloads: cfg.MaxPayloads,
	})
	gw, err := gateway.Open(gateway.Config{
		Accounts: s.accounts, Mailbox: s.mailbox, Delivery: svc, Auth: authn, Metrics: m, Logger: cfg.Logger,
		IdleTimeout: cfg.IdleTimeout, WriteTimeout: cfg.WriteTimeout, MaxConnsPerAddr: cfg.MaxConnsPerAddr,
		Cluster: s.gatewayCluster(), Transport: cfg.Transport,
		MaxConns: cfg.MaxConns, MaxMemory: cfg.MaxMemory, AdmitWatermark: cfg.AdmitWatermark, AdmitCPU: cfg.AdmitCPU,
	})
	if err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	s.gateway = gw
	for _, sig := range gw.LoadSignals() {
		s.registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "courier_gateway_load", Help: "The gateway's admission signals, each a fraction of its limit; from the watermark on, new connections are refused (503 overloaded).",
			ConstLabels: prometheus.Labels{"signal": sig},
		}, func() float64 { v, _ := gw.Load(sig); return v }))
	}
	notify.to = s.gateway

	keySvc := keys.New(keys.Config{Store: keyStore, Mailbox: s.mailbox, Notifier: &notify, FetchLimit: cfg.KeyFetches, Logger: cfg.Logger})

	mux := http.NewServeMux()
	apiSvc := api.New(api.Config{Accounts: s.accounts, Delivery: svc, Auth: authn, Keys: keySvc, Groups: groups, Logger: cfg.Logger, Draining: s.draining,
		Ready: s.ready, BodyTimeout: cfg.BodyTimeout})
	if cfg.Cluster.Roles.API {
		apiSvc.Register(mux)
	} else {
		apiSvc.RegisterHealth(mux)
	}
	if cfg.Cluster.Roles.Gateway {
		mux.Handle("GET /v1/ws", s.gateway)
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{Registry: s.registry}))
	s.handler = mux

	if err := s.startCluster(); err != nil {
		return nil, err
	}
	// A JetStream mailbox expires entries itself (the stream's MaxAge).
	if s.cl.js == nil {
		s.expirerWG.Add(1)
		go s.expirer()
	}
	ok = true
	return s, nil
}

// notifier forwards to the gateway once it exists.
type notifier struct{ to delivery.Notifier }

func (n *notifier) Notify(dev ident.Device) { n.to.Notify(dev) }

// NotifyEntry hands the entry on if the gateway takes entries.
func (n *notifier) NotifyEntry(dev ident.Device, e delivery.StoredEntry) {
	if en, ok := n.to.(delivery.EntryNotifier); ok {
		en.NotifyEntry(dev, e)
		return
	}
	n.to.Notify(dev)
}

// Handler is the server's HTTP handler (API, WebSocket and metrics).
func (s *Server) Handler() http.Handler { return s.handler }

// Accounts is the account store the server uses, behind its device-list
// cache: changes made through it are seen at once (tests use it to link
// and remove devices). It is nil in a worker-only process.
func (s *Server) Accounts() accounts.Store { return s.accounts }

// Registry is the server's metrics registry.
func (s *Server) Registry() *prometheus.Registry { return s.registry }

// Serve serves HTTP on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: s.cfg.ReadHeaderTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.mu.Lock()
	s.http = hs
	s.mu.Unlock()
	err := hs.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// Run listens on the configured address and serves until ctx is cancelled,
// then shuts down gracefully within the shutdown timeout. ready, if not nil,
// is called with the listening address.
func (s *Server) Run(ctx context.Context, ready func(net.Addr)) error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		s.Shutdown(context.Background())
		return err
	}
	if ready != nil {
		ready(ln.Addr())
	}
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(ln) }()
	select {
	case err := <-errc:
		s.Shutdown(context.Background())
		return err
	case <-ctx.Done():
	}
	s.log.Info("shutting down: refusing new connections, closing connections, flushing storage")
	sctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	err = s.Shutdown(sctx)
	<-errc
	return err
}

// Shutdown stops accepting, tells connected devices to reconnect (with a
// jittered delay), waits for in-flight requests, and closes the backends,
// whose appends are already durable. It is safe to call more than once.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopOnce.Do(func() {
		s.cl.stopping.Store(true)
		var errs []error
		gwErr := s.gateway.Shutdown(ctx)
		s.mu.Lock()
		hs := s.http
		s.mu.Unlock()
		if hs != nil {
			if err := hs.Shutdown(ctx); err != nil {
				errs = append(errs, fmt.Errorf("http: %w", err))
				hs.Close()
			}
		}
		if gwErr != nil {
			errs = append(errs, fmt.Errorf("connections: %w", gwErr))
		}
		close(s.stop)
		s.expirerWG.Wait()
		if err := s.closeBackends(); err != nil {
			errs = append(errs, err)
		}
		s.stopErr = errors.Join(errs...)
	})
	return s.stopErr
}

func (s *Server) closeBackends() error {
	var errs []error
	for i := len(s.owned) - 1; i >= 0; i-- {
		if err := s.owned[i](); err != nil {
			errs = append(errs, err)
		}
	}
	s.owned = nil
	return errors.Join(errs...)
}

// expirer removes entries older than the retention, at start and then
// every ExpireEvery.
func (s *Server) expirer() {
	defer s.expirerWG.Done()
	t := time.NewTicker(s.cfg.ExpireEvery)
	defer t.Stop()
	for {
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-s.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		n, err := s.mailbox.Expire(ctx, time.Now().Add(-s.cfg.Retention))
		cancel()
		if err != nil && !errors.Is(err, context.Canceled) {
			s.log.Error("expire old entries", "err", err)
		} else if n > 0 {
			s.log.Info("expired entries never acknowledged", "count", n, "retention", s.cfg.Retention)
		}
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
	}
}
