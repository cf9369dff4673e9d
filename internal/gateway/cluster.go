package gateway

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"time"

	"github.com/coder/websocket"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/ident"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Cluster links a gateway to the other nodes of a cluster (package
// cluster implements it on NATS and a shared session directory). With
// Config.Cluster nil the gateway is alone: presence and typing stay in
// process, as on a single node.
//
// The gateway calls Register before it accepts a device's WebSocket (an
// error refuses the connection with 503 and a retry-after) and Unregister
// when the connection has ended. Presence of a user is asked of the
// cluster; presence changes come back through PresenceChanged, for every
// node's devices including this one's. Typing goes to the local devices of
// the addressee and to Typing, which must not block, for the other nodes.
type Cluster interface {
	Register(ctx context.Context, dev ident.Device, session string) error
	Unregister(ctx context.Context, dev ident.Device, session string) (wentOffline bool, err error)
	Presence(ctx context.Context, user string) (online bool, lastSeen time.Time, err error)
	Typing(from ident.Device, to string, typing bool)
}

// clusterTimeout bounds one call to the Cluster made for a connection.
const clusterTimeout = 5 * time.Second

// newSessionID names one connection in the session directory.
func newSessionID() string {
	var b [12]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Sessions returns the device connections this gateway holds, with their
// session ids: what a cluster node refreshes in the directory.
func (g *Gateway) Sessions() []directory.DeviceSession {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]directory.DeviceSession, 0, len(g.sessions))
	for c := range g.connsLocked() {
		if s := g.sessions[c]; s != "" {
			out = append(out, directory.DeviceSession{Device: c.dev, Session: s})
		}
	}
	return out
}

// Supersede closes the connection of dev named session, if this gateway
// holds it: the device connected again on another node.
func (g *Gateway) Supersede(dev ident.Device, session string) {
	if c := g.connOf(dev, session); c != nil {
		g.log.Info("device connected again on another node; closing this connection", "device", dev)
		c.closeWith(pb.ErrorCode_ERROR_CODE_SUPERSEDED, "this device connected again elsewhere", CloseSuperseded, 0)
	}
}

// Reconnect closes the connection of dev named session, if this gateway
// holds it, asking the device to come back after retryAfter: its
// registration was lost (the directory was unreachable for longer than
// its TTL) and cannot be trusted any more. Nothing is lost: the
// connection's mailbox is streamed again from where it was.
func (g *Gateway) Reconnect(dev ident.Device, session string, retryAfter time.Duration) {
	if c := g.connOf(dev, session); c != nil {
		c.closeWith(pb.ErrorCode_ERROR_CODE_SHUTTING_DOWN, "session lost; reconnect", websocket.StatusTryAgainLater, retryAfter)
	}
}

func (g *Gateway) connOf(dev ident.Device, session string) *conn {
	g.mu.Lock()
	defer g.mu.Unlock()
	c := g.connLocked(dev)
	if c == nil || g.sessions[c] != session {
		return nil
	}
	return c
}

// Typing hands a typing indicator from another node to the connected
// devices of to on this gateway.
func (g *Gateway) Typing(from ident.Device, to string, typing bool) {
	g.localTyping(from, to, typing)
}

// PresenceChanged tells this gateway's presence subscribers of user that
// the user went online or offline (with last seen), anywhere in the
// cluster.
func (g *Gateway) PresenceChanged(user string, online bool, lastSeen time.Time) {
	p := &pb.Presence{User: user, Online: online}
	if !online && !lastSeen.IsZero() {
		p.LastSeenMs = lastSeen.UnixMilli()
	}
	g.publishPresence(p)
}
