// Package directory is the session directory: which gateway node holds
// each connected device, and the presence (online, last seen) that follows
// from it.
//
// A single node uses the in-process backend (directory/memory); a cluster
// shares one Redis (directory/redis), so that a delivery worker on any node
// can find the node that holds a device and every node sees the same
// presence. Both backends pass the conformance suite in
// directory/directorytest.
//
// # Model
//
// A registration says that a device is connected to a node through one
// connection, named by a session id that is unique per connection (a new
// connection of the same device gets a new id). A device has at most one
// registration: a new one replaces the old, wherever it was, and Register
// returns the old one so that its node can be told to close it.
//
// Every registration carries an expiry. The node that holds it keeps it
// alive with Refresh (a heartbeat covering all its connections in one
// call). A node that dies stops refreshing, and its registrations expire
// after their TTL: from then on they are invisible to every read, and the
// directory removes them, moves users with nothing left to offline and
// records their last seen, either on the next operation that touches the
// user or in the backend's periodic sweep (so presence events for a dead
// node's users arrive within roughly TTL plus the sweep interval).
//
// A user is online while at least one of their devices has an unexpired
// registration, whichever nodes hold them: a user connected through two
// nodes goes offline only when both registrations are gone (unregistered
// or expired). When the last one goes, last seen is set: to the time of
// the Unregister call, or, for an expiry, to the last time the expired
// registration was registered or refreshed (the last time it was known to
// be alive).
//
// # Use by a gateway node
//
// On each authenticated connection: Register with a fresh session id; if
// it replaced a registration, close that connection (here, or through the
// routing bus on prev.Node). Every TTL/3 or so: Refresh all the node's
// connections, closing those reported lost. When a connection ends:
// Unregister it. Presence subscribers are fed from Watch, and a delivery
// worker finds a device's node with Lookup (typing fans out to LookupUser).
//
// Times are the directory's clock: Redis' server clock for the Redis
// backend (so the nodes' clocks need not agree), the injected clock for the
// memory backend.
package directory

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/courier-im/courier/internal/ident"
)

// Session is one registration: Device is connected to Node through the
// connection named ID.
type Session struct {
	Device ident.Device
	Node   string
	ID     string
}

// DeviceSession names one connection a node holds, for Refresh.
type DeviceSession struct {
	Device  ident.Device
	Session string
}

// Presence is what the directory knows of a user. LastSeen is the zero
// time if the user has never gone offline since the directory's data
// began (it is the directory's record only; durable last seen belongs to
// the account store).
type Presence struct {
	Online   bool
	LastSeen time.Time
}

// PresenceEvent is a transition of a user: online (LastSeen is zero) or
// offline (LastSeen is set as for Presence).
type PresenceEvent struct {
	User     string
	Online   bool
	LastSeen time.Time
}

// Directory maps devices to nodes and tracks presence. Methods are safe for
// concurrent use, from any number of processes sharing the same backend
// data. Methods refuse a device or user that ident does not accept (and
// the bad arguments of Register) with an error wrapping ErrInvalid.
// Every state change is atomic: no interleaving of calls can leave
// two registrations for one device, drop a transition, or report one
// transition twice.
type Directory interface {
	// Register records that s.Device is connected to s.Node through
	// connection s.ID, for ttl (until refreshed). It replaces any current
	// registration of the device (on any node) and returns it with
	// replaced true; an expired registration is not returned. If the
	// user had no registered device, the user comes online and an online
	// event is published. Registering the same session again just renews
	// it (and returns it as prev). s.Node must be non-empty without '|',
	// s.ID non-empty, ttl positive.
	Register(ctx context.Context, s Session, ttl time.Duration) (prev Session, replaced bool, err error)

	// Refresh is a node's heartbeat: it extends to ttl from now every
	// registration in sessions that is still current, that is, still held
	// by node under that session id and not expired. It is batched (the
	// Redis backend takes one round trip per thousand sessions), so a
	// node refreshes all its connections with one call per period, well
	// within the TTL.
	// It returns those that were not (superseded by a newer connection,
	// unregistered, or already expired), in the order given; the node
	// should close them, or Register them again if they are still wanted.
	// Refresh never creates a registration.
	Refresh(ctx context.Context, node string, sessions []DeviceSession, ttl time.Duration) (lost []DeviceSession, err error)

	// Unregister removes the registration of dev if it is still the one
	// made by session (compare-and-delete): a connection that closes
	// after its device reconnected elsewhere does not remove the newer
	// registration. wentOffline reports whether this call saw the user go
	// offline (its last registration removed here, or the remaining ones
	// found expired); if so, last seen has been recorded and an offline
	// event published.
	Unregister(ctx context.Context, dev ident.Device, session string) (wentOffline bool, err error)

	// Lookup returns the current unexpired registration of dev.
	Lookup(ctx context.Context, dev ident.Device) (Session, bool, error)

	// LookupUser returns the current unexpired registrations of all of
	// user's devices, ordered by device id.
	LookupUser(ctx context.Context, user string) ([]Session, error)

	// Presence returns whether user is online and their last seen.
	Presence(ctx context.Context, user string) (Presence, error)

	// Watch subscribes to the presence transitions made anywhere in the
	// cluster, from the moment Watch returns until ctx is done, when the
	// channel is closed. For each user, events arrive in the order the
	// transitions happened, alternating online and offline. Delivery is
	// best effort: a subscriber that does not keep up, or (Redis) a
	// subscription that is cut and restored, can miss events, so a
	// subscriber that must be exact re-reads Presence.
	Watch(ctx context.Context) (<-chan PresenceEvent, error)

	// Close stops the backend's background work (the sweep). It does not
	// touch the data: registrations made through it stay until they are
	// unregistered or expire.
	Close() error
}

// ErrInvalid reports an argument a Directory refuses.
var ErrInvalid = errors.New("directory: invalid argument")

// CheckSession validates the arguments of Register; backends call it.
func CheckSession(s Session, ttl time.Duration) error {
	if err := CheckDevice(s.Device); err != nil {
		return err
	}
	if s.Node == "" || strings.ContainsRune(s.Node, '|') {
		return fmt.Errorf("%w: node %q", ErrInvalid, s.Node)
	}
	if s.ID == "" {
		return fmt.Errorf("%w: empty session id", ErrInvalid)
	}
	return CheckTTL(ttl)
}

// CheckUser validates a user name.
func CheckUser(user string) error {
	if !ident.ValidUser(user) {
		return fmt.Errorf("%w: user %q", ErrInvalid, user)
	}
	return nil
}

// CheckDevice validates a device address.
func CheckDevice(d ident.Device) error {
	if !ident.ValidUser(d.User) || d.ID == 0 {
		return fmt.Errorf("%w: device %v", ErrInvalid, d)
	}
	return nil
}

// CheckTTL validates a registration lifetime; it must be at least a
// millisecond, the directory's resolution.
func CheckTTL(ttl time.Duration) error {
	if ttl < time.Millisecond {
		return fmt.Errorf("%w: ttl %v", ErrInvalid, ttl)
	}
	return nil
}
