// Package memory is the single-node session directory: everything in
// process, with the clock injectable for tests. See package directory for
// the contract.
package memory

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/ident"
)

// Options configure a Directory. The zero value is usable.
type Options struct {
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// SweepEvery is how often expired registrations are removed (and
	// their users' offline transitions published) without waiting for a
	// call that touches the user. Zero means one second; negative means
	// never (call Sweep yourself, e.g. with a fake clock).
	SweepEvery time.Duration
	// EventBuffer is each Watch channel's capacity; zero means 256.
	// Events for a full channel are dropped.
	EventBuffer int
}

type entry struct {
	node, session string
	expires, seen time.Time
}

// Directory is the in-memory directory.Directory.
type Directory struct {
	now    func() time.Time
	buffer int

	mu       sync.Mutex
	users    map[string]map[uint32]entry // user -> device id -> registration
	lastSeen map[string]time.Time
	watchers map[chan directory.PresenceEvent]struct{}

	sweeper *directory.Sweeper
}

var _ directory.Directory = (*Directory)(nil)

// New returns an empty directory; Close stops its sweep.
func New(opts Options) *Directory {
	d := &Directory{
		now:      opts.Now,
		buffer:   opts.EventBuffer,
		users:    map[string]map[uint32]entry{},
		lastSeen: map[string]time.Time{},
		watchers: map[chan directory.PresenceEvent]struct{}{},
	}
	if d.now == nil {
		d.now = time.Now
	}
	if d.buffer <= 0 {
		d.buffer = 256
	}
	d.sweeper = directory.StartSweeper(opts.SweepEvery, d.Sweep)
	return d
}

// Close stops the sweep.
func (d *Directory) Close() error {
	d.sweeper.Close()
	return nil
}

// Sweep removes every expired registration now, publishing the offline
// transitions that follow.
func (d *Directory) Sweep() {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	for user := range d.users {
		d.prune(user, now)
	}
}

// prune removes user's expired registrations and reports whether that took
// the user offline. d.mu is held.
func (d *Directory) prune(user string, now time.Time) bool {
	devs := d.users[user]
	if len(devs) == 0 {
		delete(d.users, user)
		return false
	}
	var seen time.Time
	for id, e := range devs {
		if !e.expires.After(now) {
			delete(devs, id)
			if e.seen.After(seen) {
				seen = e.seen
			}
		}
	}
	if len(devs) > 0 {
		return false
	}
	delete(d.users, user)
	d.wentOffline(user, seen)
	return true
}

// wentOffline records last seen (never moving it back) and publishes.
// d.mu is held.
func (d *Directory) wentOffline(user string, seen time.Time) {
	if seen.After(d.lastSeen[user]) {
		d.lastSeen[user] = seen
	}
	d.publish(directory.PresenceEvent{User: user, LastSeen: d.lastSeen[user]})
}

// publish hands ev to every watcher that has room. d.mu is held, so events
// leave in the order of the transitions.
func (d *Directory) publish(ev directory.PresenceEvent) {
	for ch := range d.watchers {
		select {
		case ch <- ev:
		default:
		}
	}
}

// Register implements directory.Directory.
func (d *Directory) Register(_ context.Context, s directory.Session, ttl time.Duration) (directory.Session, bool, error) {
	if err := directory.CheckSession(s, ttl); err != nil {
		return directory.Session{}, false, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	user := s.Device.User
	d.prune(user, now)
	devs := d.users[user]
	if devs == nil {
		devs = map[uint32]entry{}
		d.users[user] = devs
		d.publish(directory.PresenceEvent{User: user, Online: true})
	}
	old, replaced := devs[s.Device.ID]
	devs[s.Device.ID] = entry{node: s.Node, session: s.ID, expires: now.Add(ttl), seen: now}
	if !replaced {
		return directory.Session{}, false, nil
	}
	return directory.Session{Device: s.Device, Node: old.node, ID: old.session}, true, nil
}

// Refresh implements directory.Directory.
func (d *Directory) Refresh(_ context.Context, node string, sessions []directory.DeviceSession, ttl time.Duration) ([]directory.DeviceSession, error) {
	if err := directory.CheckTTL(ttl); err != nil {
		return nil, err
	}
	for _, ds := range sessions {
		if err := directory.CheckDevice(ds.Device); err != nil {
			return nil, err
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	var lost []directory.DeviceSession
	for _, ds := range sessions {
		d.prune(ds.Device.User, now)
		e, ok := d.users[ds.Device.User][ds.Device.ID]
		if !ok || e.node != node || e.session != ds.Session {
			lost = append(lost, ds)
			continue
		}
		e.expires, e.seen = now.Add(ttl), now
		d.users[ds.Device.User][ds.Device.ID] = e
	}
	return lost, nil
}

// Unregister implements directory.Directory.
func (d *Directory) Unregister(_ context.Context, dev ident.Device, session string) (bool, error) {
	if err := directory.CheckDevice(dev); err != nil {
		return false, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.now()
	if d.prune(dev.User, now) {
		return true, nil
	}
	devs := d.users[dev.User]
	e, ok := devs[dev.ID]
	if !ok || e.session != session {
		return false, nil
	}
	delete(devs, dev.ID)
	if len(devs) > 0 {
		return false, nil
	}
	delete(d.users, dev.User)
	d.wentOffline(dev.User, now)
	return true, nil
}

// Lookup implements directory.Directory.
func (d *Directory) Lookup(_ context.Context, dev ident.Device) (directory.Session, bool, error) {
	if err := directory.CheckDevice(dev); err != nil {
		return directory.Session{}, false, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.prune(dev.User, d.now())
	e, ok := d.users[dev.User][dev.ID]
	if !ok {
		return directory.Session{}, false, nil
	}
	return directory.Session{Device: dev, Node: e.node, ID: e.session}, true, nil
}

// LookupUser implements directory.Directory.
func (d *Directory) LookupUser(_ context.Context, user string) ([]directory.Session, error) {
	if err := directory.CheckUser(user); err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.prune(user, d.now())
	var out []directory.Session
	for id, e := range d.users[user] {
		out = append(out, directory.Session{Device: ident.Device{User: user, ID: id}, Node: e.node, ID: e.session})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device.ID < out[j].Device.ID })
	return out, nil
}

// Presence implements directory.Directory.
func (d *Directory) Presence(_ context.Context, user string) (directory.Presence, error) {
	if err := directory.CheckUser(user); err != nil {
		return directory.Presence{}, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.prune(user, d.now())
	return directory.Presence{Online: len(d.users[user]) > 0, LastSeen: d.lastSeen[user]}, nil
}

// Watch implements directory.Directory.
func (d *Directory) Watch(ctx context.Context) (<-chan directory.PresenceEvent, error) {
	ch := make(chan directory.PresenceEvent, d.buffer)
	d.mu.Lock()
	d.watchers[ch] = struct{}{}
	d.mu.Unlock()
	go func() {
		<-ctx.Done()
		d.mu.Lock()
		delete(d.watchers, ch)
		d.mu.Unlock()
		close(ch)
	}()
	return ch, nil
}
