package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/courier-im/courier/internal/ident"
)

// DefaultDevicesSubject is the subject on which nodes announce device-list
// changes.
const DefaultDevicesSubject = "courier.accounts.devices"

// DeviceCache is what a DeviceBus keeps coherent: the node's cache of
// device lists (*cache.Store of package accounts/cache).
type DeviceCache interface {
	// Invalidate drops a user's device list.
	Invalidate(user string)
	// Flush drops every device list.
	Flush()
}

// DeviceBusConfig configures a DeviceBus.
type DeviceBusConfig struct {
	// Conn is the NATS connection (the caller's; Close leaves it open).
	Conn *nats.Conn
	// Subject: default DefaultDevicesSubject. Every node of a cluster must
	// use the same.
	Subject string
	// Node is this node's id (ValidNode): its own announcements are not
	// applied twice.
	Node   string
	Logger *slog.Logger
}

// DeviceBus keeps the device-list caches of a cluster's nodes coherent. A
// device is linked or removed on whichever node serves the API call, while
// every node sends, and each checks a send's payloads against its cached
// lists: the node that made a change announces the user on the devices
// subject (Changed), and every node drops its copy of that user's list
// when it hears it. NATS core is at most once, so a node flushes its whole
// cache whenever its connection comes back (it may have missed
// announcements while away), and the cache's TTL bounds what is left.
//
// A message on the subject is one line: "d <node> <user>".
type DeviceBus struct {
	cfg DeviceBusConfig
	log *slog.Logger

	mu      sync.Mutex
	cache   DeviceCache
	sub     *nats.Subscription
	status  chan nats.Status
	done    chan struct{}
	started bool
	closed  bool

	dropped int // announcements the subscription had dropped, as last seen (handle's)
}

// NewDeviceBus checks the configuration and returns a bus; Start attaches
// the cache. Changed may be called before Start.
func NewDeviceBus(cfg DeviceBusConfig) (*DeviceBus, error) {
	if cfg.Conn == nil {
		return nil, errors.New("cluster: a device bus needs a NATS connection")
	}
	if !ValidNode(cfg.Node) {
		return nil, fmt.Errorf("cluster: node id %q: want 1 to 64 of A-Z a-z 0-9 _ -", cfg.Node)
	}
	if cfg.Subject == "" {
		cfg.Subject = DefaultDevicesSubject
	}
	if strings.ContainsAny(cfg.Subject, " \t\r\n*>") || strings.HasPrefix(cfg.Subject, ".") || strings.HasSuffix(cfg.Subject, ".") {
		return nil, fmt.Errorf("cluster: devices subject %q: want dot-separated tokens without spaces or wildcards", cfg.Subject)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &DeviceBus{cfg: cfg, log: cfg.Logger.With("node", cfg.Node)}, nil
}

// Subject is the subject the bus announces on and listens to.
func (b *DeviceBus) Subject() string { return b.cfg.Subject }

// Start subscribes to the devices subject and to the connection's
// reconnections, for cache. It returns once the subscription is in place
// on the server: a change announced after Start returns reaches cache.
func (b *DeviceBus) Start(cache DeviceCache) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.started || b.closed {
		return errors.New("cluster: device bus started twice or closed")
	}
	if cache == nil {
		return errors.New("cluster: a device bus needs a cache")
	}
	b.cache = cache
	sub, err := b.cfg.Conn.Subscribe(b.cfg.Subject, b.handle)
	if err != nil {
		return fmt.Errorf("cluster: subscribe %s: %w", b.cfg.Subject, err)
	}
	// An announcement dropped for a slow consumer would leave a stale
	// list until the TTL: the subscription has room, and handle flushes
	// the cache when it finds it dropped some.
	sub.SetPendingLimits(1<<20, 64<<20)
	if err := b.cfg.Conn.Flush(); err != nil {
		sub.Unsubscribe()
		return fmt.Errorf("cluster: subscribe %s: %w", b.cfg.Subject, err)
	}
	b.sub = sub
	b.status = b.cfg.Conn.StatusChanged(nats.CONNECTED, nats.RECONNECTING)
	b.done = make(chan struct{})
	b.started = true
	go b.watch(b.status, b.done)
	// What the cache read before the subscription was in place may
	// predate a change announced meanwhile.
	cache.Flush()
	return nil
}

// Changed announces that user's device list changed. It is the cache's
// OnChange hook; a failure is logged (the other nodes' TTL bounds it).
func (b *DeviceBus) Changed(user string) {
	if err := b.cfg.Conn.Publish(b.cfg.Subject, encodeDevicesChanged(b.cfg.Node, user)); err != nil {
		b.log.Warn("announce a device-list change; other nodes may serve the old list until its TTL", "user", user, "err", err)
	}
}

func (b *DeviceBus) handle(msg *nats.Msg) {
	if msg.Sub != nil {
		if n, err := msg.Sub.Dropped(); err == nil && n != b.dropped {
			b.dropped = n
			b.log.Warn("device-list announcements were dropped (slow consumer): flushing the cache", "dropped", n)
			b.cache.Flush()
		}
	}
	node, user, err := decodeDevicesChanged(msg.Data)
	if err != nil {
		b.log.Warn("ignored a malformed device-list announcement", "err", err)
		return
	}
	if node == b.cfg.Node {
		return // the change was made here, and invalidated here
	}
	b.cache.Invalidate(user)
}

// watch flushes the cache when the connection goes and when it comes back
// (announcements made while it was away are lost). On its return, the
// flush waits for a round trip to the server: the client sends the
// subscription again before that, so every announcement from then on
// reaches the cache, and what the cache read before is dropped.
func (b *DeviceBus) watch(status chan nats.Status, done chan struct{}) {
	defer close(done)
	for st := range status {
		if st == nats.CONNECTED {
			if err := b.cfg.Conn.FlushTimeout(5 * time.Second); err != nil {
				b.log.Warn("nats round trip after reconnecting", "err", err)
			}
		}
		b.log.Info("nats connection changed: flushing the device-list cache", "status", st.String())
		b.cache.Flush()
	}
}

// Close stops listening. The cache keeps what it holds (its TTL still
// applies).
func (b *DeviceBus) Close() error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	b.closed = true
	sub, status, done := b.sub, b.status, b.done
	b.mu.Unlock()
	if status != nil {
		b.cfg.Conn.RemoveStatusListener(status)
		<-done
	}
	var err error
	if sub != nil {
		err = sub.Unsubscribe()
		if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
			err = nil
		}
	}
	return err
}

func encodeDevicesChanged(node, user string) []byte {
	return []byte("d " + node + " " + user)
}

func decodeDevicesChanged(b []byte) (node, user string, err error) {
	f := strings.Fields(string(b))
	if len(f) != 3 || f[0] != "d" || !ValidNode(f[1]) || !ident.ValidUser(f[2]) {
		return "", "", fmt.Errorf("%w: %q", errBadMessage, b)
	}
	return f[1], f[2], nil
}
