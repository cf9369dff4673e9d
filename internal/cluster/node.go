package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/gateway"
	"github.com/courier-im/courier/internal/ident"
)

// Local is what a Node drives in its own process: the gateway
// (*gateway.Gateway).
type Local interface {
	Notify(dev ident.Device)
	Typing(from ident.Device, to string, typing bool)
	PresenceChanged(user string, online bool, lastSeen time.Time)
	Supersede(dev ident.Device, session string)
	Reconnect(dev ident.Device, session string, retryAfter time.Duration)
	Sessions() []directory.DeviceSession
}

var _ Local = (*gateway.Gateway)(nil)

// DefaultSessionTTL is how long a registration lives without a heartbeat;
// a node refreshes its sessions every third of it.
const DefaultSessionTTL = 30 * time.Second

// NodeConfig configures a Node.
type NodeConfig struct {
	// Conn is the NATS connection (the caller's; Close leaves it open).
	Conn *nats.Conn
	// Directory is the shared session directory.
	Directory directory.Directory
	// ID names this node (ValidNode); it must be unique in the cluster.
	ID string
	// SubjectPrefix: this node listens on <SubjectPrefix>.<ID>. Default
	// DefaultSubjectPrefix.
	SubjectPrefix string
	// SessionTTL: default DefaultSessionTTL.
	SessionTTL time.Duration
	Logger     *slog.Logger
}

// Node is the gateway side of a cluster node: it registers the gateway's
// connections in the directory and keeps them alive, listens on the
// node's subject for notifications, typing and supersessions from the
// other nodes, and feeds the gateway's presence subscribers from the
// directory. It implements gateway.Cluster.
type Node struct {
	cfg NodeConfig
	log *slog.Logger

	typingSlots chan struct{} // bounds the typing fan-outs under way

	mu      sync.Mutex
	local   Local
	sub     *nats.Subscription
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	started bool
	closed  bool
}

var _ gateway.Cluster = (*Node)(nil)

// NewNode checks the configuration and returns a Node; Start attaches the
// gateway.
func NewNode(cfg NodeConfig) (*Node, error) {
	if cfg.Conn == nil || cfg.Directory == nil {
		return nil, errors.New("cluster: a node needs a NATS connection and a directory")
	}
	if !ValidNode(cfg.ID) {
		return nil, fmt.Errorf("cluster: node id %q: want 1 to 64 of A-Z a-z 0-9 _ -", cfg.ID)
	}
	if cfg.SubjectPrefix == "" {
		cfg.SubjectPrefix = DefaultSubjectPrefix
	}
	if cfg.SessionTTL == 0 {
		cfg.SessionTTL = DefaultSessionTTL
	}
	if cfg.SessionTTL < 100*time.Millisecond {
		return nil, fmt.Errorf("cluster: session ttl %v: want at least 100ms", cfg.SessionTTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Node{cfg: cfg, log: cfg.Logger.With("node", cfg.ID), typingSlots: make(chan struct{}, 64)}, nil
}

// ID is the node's id.
func (n *Node) ID() string { return n.cfg.ID }

// Subject is the NATS subject this node listens on.
func (n *Node) Subject() string { return NodeSubject(n.cfg.SubjectPrefix, n.cfg.ID) }

// NodeSubject is the subject of node id under prefix.
func NodeSubject(prefix, id string) string { return prefix + "." + id }

// Start subscribes to the node's subject and the directory's presence
// events, and starts the heartbeat. It returns once the subscription is
// in place on the server.
func (n *Node) Start(local Local) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.started || n.closed {
		return errors.New("cluster: node started twice or closed")
	}
	n.local = local
	sub, err := n.cfg.Conn.Subscribe(n.Subject(), n.handle)
	if err != nil {
		return fmt.Errorf("cluster: subscribe %s: %w", n.Subject(), err)
	}
	// The node has no use for a backlog: a gateway that misses a
	// notification delivers on the next one.
	sub.SetPendingLimits(1<<16, 64<<20)
	if err := n.cfg.Conn.Flush(); err != nil {
		sub.Unsubscribe()
		return fmt.Errorf("cluster: subscribe %s: %w", n.Subject(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	events, err := n.cfg.Directory.Watch(ctx)
	if err != nil {
		cancel()
		sub.Unsubscribe()
		return fmt.Errorf("cluster: watch presence: %w", err)
	}
	n.sub, n.cancel, n.started = sub, cancel, true
	n.wg.Add(2)
	go n.watch(ctx, events)
	go n.heartbeat(ctx)
	return nil
}

// Close stops listening and the heartbeat. The node's registrations stay
// until the gateway unregisters them or they expire.
func (n *Node) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	sub, cancel := n.sub, n.cancel
	n.mu.Unlock()
	var err error
	if sub != nil {
		err = sub.Unsubscribe()
		if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
			err = nil
		}
	}
	if cancel != nil {
		cancel()
	}
	n.wg.Wait()
	return err
}

func (n *Node) handle(msg *nats.Msg) {
	m, err := decode(msg.Data)
	if err != nil {
		n.log.Warn("ignored a malformed node message", "err", err)
		return
	}
	switch m.kind {
	case 'n':
		n.local.Notify(m.dev)
	case 't':
		n.local.Typing(m.dev, m.to, m.typing)
	case 's':
		n.local.Supersede(m.dev, m.session)
	}
}

// watch feeds presence transitions to the gateway, subscribing again if
// the directory's subscription ends.
func (n *Node) watch(ctx context.Context, events <-chan directory.PresenceEvent) {
	defer n.wg.Done()
	for {
		for ev := range events {
			n.local.PresenceChanged(ev.User, ev.Online, ev.LastSeen)
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			var err error
			if events, err = n.cfg.Directory.Watch(ctx); err == nil {
				break
			}
			n.log.Warn("watch presence again", "err", err)
		}
	}
}

// heartbeat refreshes the node's sessions every third of the TTL.
func (n *Node) heartbeat(ctx context.Context) {
	defer n.wg.Done()
	t := time.NewTicker(n.cfg.SessionTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n.refresh(ctx)
	}
}

// refresh is one heartbeat. A session the directory no longer holds for
// this node was either taken by a newer connection of the device (which
// closes this one) or expired (the directory was out of reach for longer
// than the TTL: it is registered again).
func (n *Node) refresh(ctx context.Context) {
	sessions := n.local.Sessions()
	if len(sessions) == 0 {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, n.cfg.SessionTTL/3)
	defer cancel()
	lost, err := n.cfg.Directory.Refresh(rctx, n.cfg.ID, sessions, n.cfg.SessionTTL)
	if err != nil {
		n.log.Warn("heartbeat: refresh sessions", "sessions", len(sessions), "err", err)
		return
	}
	for _, ds := range lost {
		cur, ok, err := n.cfg.Directory.Lookup(rctx, ds.Device)
		switch {
		case err != nil:
			n.log.Warn("heartbeat: look up a lost session", "device", ds.Device, "err", err)
		case ok && (cur.Node != n.cfg.ID || cur.ID != ds.Session):
			n.local.Supersede(ds.Device, ds.Session)
		default:
			if err := n.Register(rctx, ds.Device, ds.Session); err != nil {
				n.log.Warn("heartbeat: register an expired session again; closing it", "device", ds.Device, "err", err)
				n.local.Reconnect(ds.Device, ds.Session, time.Second)
			} else {
				n.log.Info("heartbeat: registered an expired session again", "device", ds.Device)
			}
		}
	}
}

// Register implements gateway.Cluster: it records the session in the
// directory and, if it replaced a connection of the device held by
// another node, tells that node to close it.
func (n *Node) Register(ctx context.Context, dev ident.Device, session string) error {
	prev, replaced, err := n.cfg.Directory.Register(ctx, directory.Session{Device: dev, Node: n.cfg.ID, ID: session}, n.cfg.SessionTTL)
	if err != nil {
		return err
	}
	// A connection on this node is superseded by the gateway itself.
	if replaced && prev.Node != n.cfg.ID && prev.ID != session && ValidNode(prev.Node) {
		if err := n.cfg.Conn.Publish(NodeSubject(n.cfg.SubjectPrefix, prev.Node), encodeSupersede(dev, prev.ID)); err != nil {
			n.log.Warn("tell a node its connection was superseded", "to", prev.Node, "device", dev, "err", err)
		}
	}
	return nil
}

// Unregister implements gateway.Cluster.
func (n *Node) Unregister(ctx context.Context, dev ident.Device, session string) (bool, error) {
	return n.cfg.Directory.Unregister(ctx, dev, session)
}

// Presence implements gateway.Cluster.
func (n *Node) Presence(ctx context.Context, user string) (bool, time.Time, error) {
	p, err := n.cfg.Directory.Presence(ctx, user)
	return p.Online, p.LastSeen, err
}

// Typing implements gateway.Cluster: it finds the nodes holding the
// devices of to and sends the indicator to each but this one, in the
// background. Typing is ephemeral: when too many fan-outs are under way
// the indicator is dropped.
func (n *Node) Typing(from ident.Device, to string, typing bool) {
	select {
	case n.typingSlots <- struct{}{}:
	default:
		return
	}
	go func() {
		defer func() { <-n.typingSlots }()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		sessions, err := n.cfg.Directory.LookupUser(ctx, to)
		if err != nil {
			n.log.Debug("typing: look up the addressee", "to", to, "err", err)
			return
		}
		sent := map[string]bool{n.cfg.ID: true}
		for _, s := range sessions {
			if sent[s.Node] || !ValidNode(s.Node) {
				continue
			}
			sent[s.Node] = true
			n.cfg.Conn.Publish(NodeSubject(n.cfg.SubjectPrefix, s.Node), encodeTyping(from, to, typing))
		}
	}()
}
