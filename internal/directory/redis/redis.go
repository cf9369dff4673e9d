// Package redis is the cluster session directory, kept in one Redis
// server (or a primary with replicas) shared by all nodes. See package
// directory for the contract.
//
// # Layout
//
// Under the configured prefix P:
//
//	P s:<user>   hash: device id -> "expiresMs|seenMs|node|session"
//	P z          sorted set: user -> earliest expiry of the user's devices
//	P ls         hash: user -> last seen (ms)
//	P presence   pub/sub channel: "1|<user>|0" (online), "0|<user>|<lastSeenMs>" (offline)
//
// Every operation is one Lua script, so each is atomic and one round trip:
// it first prunes the expired registrations of the users it touches (and,
// if that leaves a user with none, records last seen and publishes the
// offline transition) and then does its work. Times come from Redis' TIME,
// so the nodes' clocks do not matter. The sorted set lets the periodic
// sweep, run by every Directory and harmless when run by several at once,
// find the users with something expired without scanning: this is what
// moves a dead node's users offline when nobody asks about them.
//
// The scripts build key names themselves, so the layout needs a single
// Redis, not Redis Cluster; and they call TIME before writing, which needs
// Redis 5 or later (effects replication).
package redis

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/ident"
)

// Options configure a Directory.
type Options struct {
	// Prefix starts every key and the channel name, e.g. "courier:dir:".
	// Empty means "courier:dir:".
	Prefix string
	// SweepEvery is how often this Directory looks for expired
	// registrations; zero means one second, negative never.
	SweepEvery time.Duration
	// SweepBatch bounds the users one sweep step handles; zero means 256.
	SweepBatch int
}

// Directory is the Redis directory.Directory.
type Directory struct {
	rdb    goredis.UniversalClient
	prefix string
	batch  int

	sweeper *directory.Sweeper
}

var _ directory.Directory = (*Directory)(nil)

// New returns a Directory on rdb and starts its sweep. Close stops the
// sweep; the caller keeps ownership of rdb.
func New(rdb goredis.UniversalClient, opts Options) *Directory {
	d := &Directory{
		rdb:    rdb,
		prefix: opts.Prefix,
		batch:  opts.SweepBatch,
	}
	if d.prefix == "" {
		d.prefix = "courier:dir:"
	}
	if d.batch <= 0 {
		d.batch = 256
	}
	d.sweeper = directory.StartSweeper(opts.SweepEvery, func() {
		// An error (Redis unreachable) is retried at the next tick;
		// nothing is lost by skipping a sweep.
		_, _ = d.Sweep(context.Background())
	})
	return d
}

// Close stops the sweep.
func (d *Directory) Close() error {
	d.sweeper.Close()
	return nil
}

// Channel is the pub/sub channel the presence events are published on.
func (d *Directory) Channel() string { return d.prefix + "presence" }

// common is the prelude of every script. ARGV[1] is the prefix.
const common = `
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function parse(v)
  local e, s, node, sess = string.match(v, '^(%d+)|(%d+)|([^|]*)|(.*)$')
  return tonumber(e), tonumber(s), node, sess
end

local function offline(user, seen)
  local old = tonumber(redis.call('HGET', P .. 'ls', user) or '0')
  if seen > old then
    redis.call('HSET', P .. 'ls', user, seen)
  else
    seen = old
  end
  redis.call('ZREM', P .. 'z', user)
  redis.call('PUBLISH', P .. 'presence', '0|' .. user .. '|' .. seen)
end

-- reindex sets the user's score in z to its earliest expiry.
local function reindex(user)
  local all = redis.call('HGETALL', P .. 's:' .. user)
  local min = nil
  for i = 2, #all, 2 do
    local e = parse(all[i])
    if min == nil or e < min then min = e end
  end
  if min == nil then
    redis.call('ZREM', P .. 'z', user)
  else
    redis.call('ZADD', P .. 'z', min, user)
  end
end

-- prune drops the user's expired registrations; true if that took the
-- user offline.
local function prune(user)
  local hk = P .. 's:' .. user
  local all = redis.call('HGETALL', hk)
  if #all == 0 then
    redis.call('ZREM', P .. 'z', user)
    return false
  end
  local left, seen, dropped = 0, 0, false
  for i = 1, #all, 2 do
    local e, s = parse(all[i + 1])
    if e <= now then
      redis.call('HDEL', hk, all[i])
      dropped = true
      if s > seen then seen = s end
    else
      left = left + 1
    end
  end
  if left == 0 then
    offline(user, seen)
    return true
  end
  if dropped then reindex(user) end
  return false
end
`

// register: ARGV prefix, user, device id, node, session, ttl ms.
// Returns the previous value or false.
var registerScript = goredis.NewScript(common + `
local user, id = ARGV[2], ARGV[3]
local hk = P .. 's:' .. user
prune(user)
local wasOnline = redis.call('EXISTS', hk) == 1
local prev = redis.call('HGET', hk, id)
local exp = now + tonumber(ARGV[6])
redis.call('HSET', hk, id, exp .. '|' .. now .. '|' .. ARGV[4] .. '|' .. ARGV[5])
reindex(user)
if not wasOnline then
  redis.call('PUBLISH', P .. 'presence', '1|' .. user .. '|0')
end
return prev
`)

// refresh: ARGV prefix, node, ttl ms, then user, device id, session per
// registration. Returns the 1-based positions of the lost ones.
var refreshScript = goredis.NewScript(common + `
local node, ttl = ARGV[2], tonumber(ARGV[3])
local lost, touched = {}, {}
for i = 4, #ARGV, 3 do
  local user, id, sess = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if touched[user] == nil then
    prune(user)
    touched[user] = true
  end
  local hk = P .. 's:' .. user
  local v = redis.call('HGET', hk, id)
  local ok = false
  if v then
    local _, _, n, s = parse(v)
    ok = n == node and s == sess
  end
  if ok then
    redis.call('HSET', hk, id, (now + ttl) .. '|' .. now .. '|' .. node .. '|' .. sess)
  else
    lost[#lost + 1] = (i - 1) / 3
  end
end
for user in pairs(touched) do reindex(user) end
return lost
`)

// unregister: ARGV prefix, user, device id, session. Returns 1 if the user
// went offline.
var unregisterScript = goredis.NewScript(common + `
local user, id, sess = ARGV[2], ARGV[3], ARGV[4]
if prune(user) then return 1 end
local hk = P .. 's:' .. user
local v = redis.call('HGET', hk, id)
if not v then return 0 end
local _, _, _, s = parse(v)
if s ~= sess then return 0 end
redis.call('HDEL', hk, id)
if redis.call('EXISTS', hk) == 0 then
  offline(user, now)
  return 1
end
reindex(user)
return 0
`)

// read: ARGV prefix, user. Returns {last seen, id, value, id, value...}.
var readScript = goredis.NewScript(common + `
local user = ARGV[2]
prune(user)
local out = {redis.call('HGET', P .. 'ls', user) or '0'}
local all = redis.call('HGETALL', P .. 's:' .. user)
for i = 1, #all do out[#out + 1] = all[i] end
return out
`)

// sweep: ARGV prefix, batch. Prunes up to batch users with something
// expired; returns how many it looked at.
var sweepScript = goredis.NewScript(common + `
local users = redis.call('ZRANGEBYSCORE', P .. 'z', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, user in ipairs(users) do prune(user) end
return #users
`)

// Sweep prunes every user that has an expired registration, publishing the
// offline transitions. New's background sweep calls it; it is exported for
// tests and tools.
func (d *Directory) Sweep(ctx context.Context) (int, error) {
	total := 0
	for {
		n, err := sweepScript.Run(ctx, d.rdb, nil, d.prefix, d.batch).Int()
		if err != nil {
			return total, fmt.Errorf("directory: sweep: %w", err)
		}
		total += n
		if n < d.batch {
			return total, nil
		}
	}
}

func devID(dev ident.Device) string { return strconv.FormatUint(uint64(dev.ID), 10) }

// parseValue splits a registration value.
func parseValue(v string) (node, session string, err error) {
	parts := strings.SplitN(v, "|", 4)
	if len(parts) != 4 {
		return "", "", fmt.Errorf("directory: malformed registration %q", v)
	}
	return parts[2], parts[3], nil
}

// Register implements directory.Directory.
func (d *Directory) Register(ctx context.Context, s directory.Session, ttl time.Duration) (directory.Session, bool, error) {
	if err := directory.CheckSession(s, ttl); err != nil {
		return directory.Session{}, false, err
	}
	v, err := registerScript.Run(ctx, d.rdb, nil, d.prefix, s.Device.User, devID(s.Device), s.Node, s.ID, ttl.Milliseconds()).Text()
	if errors.Is(err, goredis.Nil) {
		return directory.Session{}, false, nil
	}
	if err != nil {
		return directory.Session{}, false, fmt.Errorf("directory: register %v: %w", s.Device, err)
	}
	node, id, err := parseValue(v)
	if err != nil {
		return directory.Session{}, false, err
	}
	return directory.Session{Device: s.Device, Node: node, ID: id}, true, nil
}

// Refresh implements directory.Directory.
func (d *Directory) Refresh(ctx context.Context, node string, sessions []directory.DeviceSession, ttl time.Duration) ([]directory.DeviceSession, error) {
	if err := directory.CheckTTL(ttl); err != nil {
		return nil, err
	}
	for _, ds := range sessions {
		if err := directory.CheckDevice(ds.Device); err != nil {
			return nil, err
		}
	}
	var lost []directory.DeviceSession
	for len(sessions) > 0 {
		chunk := sessions[:min(len(sessions), refreshChunk)]
		sessions = sessions[len(chunk):]
		args := make([]any, 0, 3+3*len(chunk))
		args = append(args, d.prefix, node, ttl.Milliseconds())
		for _, ds := range chunk {
			args = append(args, ds.Device.User, devID(ds.Device), ds.Session)
		}
		idx, err := refreshScript.Run(ctx, d.rdb, nil, args...).Int64Slice()
		if err != nil {
			return nil, fmt.Errorf("directory: refresh %d sessions of %s: %w", len(chunk), node, err)
		}
		for _, i := range idx {
			if i < 1 || int(i) > len(chunk) {
				return nil, fmt.Errorf("directory: refresh: bad index %d", i)
			}
			lost = append(lost, chunk[i-1])
		}
	}
	return lost, nil
}

// refreshChunk bounds the registrations one refresh script handles, so that
// a node holding many connections does not stall Redis with one long
// script: Refresh takes one round trip per refreshChunk sessions.
const refreshChunk = 1000

// Unregister implements directory.Directory.
func (d *Directory) Unregister(ctx context.Context, dev ident.Device, session string) (bool, error) {
	if err := directory.CheckDevice(dev); err != nil {
		return false, err
	}
	n, err := unregisterScript.Run(ctx, d.rdb, nil, d.prefix, dev.User, devID(dev), session).Int()
	if err != nil {
		return false, fmt.Errorf("directory: unregister %v: %w", dev, err)
	}
	return n == 1, nil
}

// read returns user's unexpired registrations, by device id, and last seen.
func (d *Directory) read(ctx context.Context, user string) ([]directory.Session, time.Time, error) {
	if err := directory.CheckUser(user); err != nil {
		return nil, time.Time{}, err
	}
	vals, err := readScript.Run(ctx, d.rdb, nil, d.prefix, user).StringSlice()
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("directory: read %s: %w", user, err)
	}
	if len(vals) == 0 || len(vals)%2 != 1 {
		return nil, time.Time{}, fmt.Errorf("directory: read %s: malformed reply", user)
	}
	ms, err := strconv.ParseInt(vals[0], 10, 64)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("directory: read %s: last seen %q", user, vals[0])
	}
	var seen time.Time
	if ms > 0 {
		seen = time.UnixMilli(ms)
	}
	var out []directory.Session
	for i := 1; i < len(vals); i += 2 {
		id, err := strconv.ParseUint(vals[i], 10, 32)
		if err != nil {
			return nil, time.Time{}, fmt.Errorf("directory: read %s: device id %q", user, vals[i])
		}
		node, sess, err := parseValue(vals[i+1])
		if err != nil {
			return nil, time.Time{}, err
		}
		out = append(out, directory.Session{Device: ident.Device{User: user, ID: uint32(id)}, Node: node, ID: sess})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Device.ID < out[j].Device.ID })
	return out, seen, nil
}

// Lookup implements directory.Directory.
func (d *Directory) Lookup(ctx context.Context, dev ident.Device) (directory.Session, bool, error) {
	all, _, err := d.read(ctx, dev.User)
	if err != nil {
		return directory.Session{}, false, err
	}
	for _, s := range all {
		if s.Device == dev {
			return s, true, nil
		}
	}
	return directory.Session{}, false, nil
}

// LookupUser implements directory.Directory.
func (d *Directory) LookupUser(ctx context.Context, user string) ([]directory.Session, error) {
	all, _, err := d.read(ctx, user)
	return all, err
}

// Presence implements directory.Directory.
func (d *Directory) Presence(ctx context.Context, user string) (directory.Presence, error) {
	all, seen, err := d.read(ctx, user)
	if err != nil {
		return directory.Presence{}, err
	}
	return directory.Presence{Online: len(all) > 0, LastSeen: seen}, nil
}

// Watch implements directory.Directory with a Redis subscription to the
// presence channel; it returns once Redis has confirmed the subscription.
func (d *Directory) Watch(ctx context.Context) (<-chan directory.PresenceEvent, error) {
	ps := d.rdb.Subscribe(ctx, d.Channel())
	if _, err := ps.Receive(ctx); err != nil {
		_ = ps.Close()
		return nil, fmt.Errorf("directory: watch: %w", err)
	}
	msgs := ps.Channel()
	out := make(chan directory.PresenceEvent, 256)
	go func() {
		defer close(out)
		defer ps.Close()
		for {
			select {
			case <-ctx.Done():
				return
			case m, ok := <-msgs:
				if !ok {
					return
				}
				ev, ok := parseEvent(m.Payload)
				if !ok {
					continue
				}
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

// parseEvent decodes a presence channel payload.
func parseEvent(p string) (directory.PresenceEvent, bool) {
	parts := strings.Split(p, "|")
	if len(parts) != 3 || (parts[0] != "0" && parts[0] != "1") {
		return directory.PresenceEvent{}, false
	}
	ev := directory.PresenceEvent{User: parts[1], Online: parts[0] == "1"}
	ms, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return directory.PresenceEvent{}, false
	}
	if !ev.Online && ms > 0 {
		ev.LastSeen = time.UnixMilli(ms)
	}
	return ev, true
}
