package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// account is a registered bench device.
type account struct {
	User   string `json:"user"`
	Device uint32 `json:"device"`
	Cred   string `json:"credential"`
}

func (a *account) basic() string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(a.User+"."+strconv.FormatUint(uint64(a.Device), 10)+":"+a.Cred))
}

// run is the state shared by one scenario's clients.
type run struct {
	eng      *wsEngine
	hostport string
	loopback bool
	ledger   ledger
	lat      *latencies

	up            atomic.Int64 // connections synced and open
	receipts      atomic.Int64 // message refs in DELIVERED receipts
	pongs         atomic.Int64
	confirmedAcks atomic.Int64
	lastDelivery  atomic.Int64 // Unix nanos
	groupUpdates  atomic.Int64 // GROUP_UPDATE envelopes delivered (and acked)

	confirmAcks bool
	onSynced    func(c *client)
	// onClose, if set, is called when a connection ends, on its loop;
	// set and cleared while connections are live, hence atomic.
	onClose atomic.Pointer[func(c *client, code int, err error)]

	mu       sync.Mutex
	counters map[string]int64
	firstErr string
}

func newRun(eng *wsEngine, t *target) *run {
	return &run{eng: eng, hostport: t.hostport, loopback: t.loopback, lat: newLatencies(), counters: map[string]int64{}}
}

func (r *run) count(name string, n int64) {
	r.mu.Lock()
	r.counters[name] += n
	r.mu.Unlock()
}

func (r *run) noteErr(err error) {
	r.mu.Lock()
	if r.firstErr == "" {
		r.firstErr = err.Error()
	}
	r.mu.Unlock()
}

func (r *run) snapshotCounters() map[string]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]int64, len(r.counters))
	for k, v := range r.counters {
		out[k] = v
	}
	return out
}

// sourceIP spreads connections over 127.0.0.2..127.0.0.251, perAddr per
// address in turn (one source address has only ~28k ephemeral ports, and
// the server caps connections per source address, 1000 by default). For a
// server that is not on loopback the kernel picks the source.
func (r *run) sourceIP(i int) net.IP {
	if !r.loopback {
		return nil
	}
	return sourceIP(i)
}

// perAddr is how many connections share one source address.
const perAddr = 300

func sourceIP(i int) net.IP {
	return net.IPv4(127, 0, 0, byte(2+(i/perAddr)%250))
}

// connect dials c (blocking for the handshake only).
func (r *run) connect(c *client) error {
	c.mu.Lock()
	c.epoch++
	c.mu.Unlock()
	return r.eng.dial(c, r.hostport, c.src, c.acct.basic(), 15*time.Second)
}

// connectAll connects clients with conc dialers at a time and waits until
// they are all synced or timeout passes. It returns how many failed to
// connect, and the first error.
func (r *run) connectAll(ctx context.Context, clients []*client, conc int, timeout time.Duration) (failed int, firstErr error) {
	before := r.up.Load()
	var mu sync.Mutex
	work := make(chan *client)
	var wg sync.WaitGroup
	for range min(conc, len(clients)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range work {
				var err error
				for attempt := 0; ; attempt++ {
					err = r.connect(c)
					if de, ok := err.(*dialError); ok && attempt < 5 && (de.kind == "http_429" || de.kind == "timeout" || de.kind == "http_503") {
						time.Sleep(max(de.retryAfter, 200*time.Millisecond))
						continue
					}
					break
				}
				if err != nil {
					mu.Lock()
					failed++
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	for _, c := range clients {
		select {
		case work <- c:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
	want := before + int64(len(clients)-failed)
	deadline := time.Now().Add(timeout)
	for r.up.Load() < want && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	return failed, firstErr
}

// heartbeat pings every client once per interval, spread evenly over it:
// one goroutine for all connections.
func (r *run) heartbeat(ctx context.Context, clients []*client, every time.Duration) {
	const slices = 100
	tick := time.NewTicker(every / slices)
	defer tick.Stop()
	for i := 0; ; i = (i + 1) % slices {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for j := i; j < len(clients); j += slices {
			clients[j].ping()
		}
	}
}

// waitFor polls cond until it holds, the timeout passes or ctx ends.
func waitFor(ctx context.Context, timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// closeAll closes every client's connection and waits (briefly) for the
// close callbacks.
func (r *run) closeAll(clients []*client) {
	r.onClose.Store(nil)
	for _, c := range clients {
		c.close()
	}
	waitFor(context.Background(), 5*time.Second, func() bool { return r.up.Load() == 0 })
}

// registrar creates bench accounts through the API.
type registrar struct {
	base   string
	prefix string // unique per bench run, so runs against one server never collide
	http   *http.Client
}

func newRegistrar(base string) *registrar {
	var b [5]byte
	rand.Read(b[:])
	return &registrar{
		base:   base,
		prefix: "b" + strings.ToLower(strings.TrimRight(base32(b[:]), "=")),
		http: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64, IdleConnTimeout: 10 * time.Second,
		}},
	}
}

func base32(b []byte) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyz234567"
	var out []byte
	var acc, bits uint
	for _, x := range b {
		acc = acc<<8 | uint(x)
		bits += 8
		for bits >= 5 {
			out = append(out, alphabet[(acc>>(bits-5))&31])
			bits -= 5
		}
	}
	if bits > 0 {
		out = append(out, alphabet[(acc<<(5-bits))&31])
	}
	return string(out)
}

// create registers n users (each with its first device), conc at a time.
// Names are PREFIX-ROLE-I.
func (g *registrar) create(ctx context.Context, role string, n, conc int) ([]*account, error) {
	out := make([]*account, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	for range min(conc, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				a, err := g.one(ctx, fmt.Sprintf("%s-%s%d", g.prefix, role, i))
				if err != nil {
					once.Do(func() { firstErr = err })
					return
				}
				out[i] = a
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return nil, fmt.Errorf("creating accounts: %w", firstErr)
	}
	return out, nil
}

func (g *registrar) one(ctx context.Context, name string) (*account, error) {
	body, _ := json.Marshal(map[string]string{"name": name, "device_name": "bench"})
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, "POST", g.base+"/v1/accounts", bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := g.http.Do(req)
		if err != nil {
			if attempt < 5 && ctx.Err() == nil {
				time.Sleep(time.Duration(attempt+1) * 200 * time.Millisecond)
				continue
			}
			return nil, err
		}
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusCreated:
			var a account
			if err := json.Unmarshal(data, &a); err != nil || a.Cred == "" {
				return nil, fmt.Errorf("POST /v1/accounts %s: undecodable answer %q", name, data)
			}
			return &a, nil
		case (resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500) && attempt < 10:
			time.Sleep(time.Duration(attempt+1) * 200 * time.Millisecond)
		default:
			return nil, fmt.Errorf("POST /v1/accounts %s: %s: %s", name, resp.Status, bytes.TrimSpace(data))
		}
	}
}

// raiseFileLimit lifts the soft open-files limit to the hard limit (the
// bench holds one descriptor per connection; a child server inherits it).
func raiseFileLimit() uint64 {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) != nil {
		return 0
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l)
	}
	return l.Cur
}

func sortedKeys(m map[string]int64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// groupChunk is how many members one group request names: the API bounds
// request bodies, and a bench group may be larger than one body holds.
const groupChunk = 500

// createGroup makes a group of owner (its admin) and members over the API:
// POST /v1/groups with the first members, then POST
// /v1/groups/{id}/members with the rest, groupChunk at a time. It returns
// the group's id and its version after the last change.
func (g *registrar) createGroup(ctx context.Context, owner *account, members []*account) (string, uint64, error) {
	names := make([]string, len(members))
	for i, m := range members {
		names[i] = m.User
	}
	first := names[:min(groupChunk, len(names))]
	var grp struct {
		ID      string `json:"id"`
		Version uint64 `json:"version"`
	}
	if err := g.post(ctx, owner, "/v1/groups", map[string][]string{"members": first}, http.StatusCreated, &grp); err != nil {
		return "", 0, err
	}
	if grp.ID == "" {
		return "", 0, errors.New("POST /v1/groups: the answer names no group id")
	}
	for rest := names[len(first):]; len(rest) > 0; {
		n := min(groupChunk, len(rest))
		if err := g.post(ctx, owner, "/v1/groups/"+url.PathEscape(grp.ID)+"/members", map[string][]string{"users": rest[:n]}, http.StatusOK, &grp); err != nil {
			return "", 0, err
		}
		rest = rest[n:]
	}
	return grp.ID, grp.Version, nil
}

// post sends body as JSON with owner's credential and decodes a want
// answer into out. A group too large for the server's member limit says
// how to raise it.
func (g *registrar) post(ctx context.Context, owner *account, path string, body any, want int, out any) error {
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, "POST", g.base+path, bytes.NewReader(data))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", owner.basic())
		resp, err := g.http.Do(req)
		if err != nil {
			return fmt.Errorf("POST %s: %w", path, err)
		}
		answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
		resp.Body.Close()
		switch {
		case resp.StatusCode == want:
			if err := json.Unmarshal(answer, out); err != nil {
				return fmt.Errorf("POST %s: undecodable answer: %w", path, err)
			}
			return nil
		case resp.StatusCode == http.StatusTooManyRequests && attempt < 10:
			time.Sleep(time.Duration(attempt+1) * 200 * time.Millisecond)
		case resp.StatusCode == http.StatusConflict && bytes.Contains(answer, []byte("too_many_members")):
			return fmt.Errorf("POST %s: %s: the server's group member limit is too low for this bench (start it with --max-group-members): %s",
				path, resp.Status, bytes.TrimSpace(answer))
		default:
			return fmt.Errorf("POST %s: %s: %s", path, resp.Status, bytes.TrimSpace(answer))
		}
	}
}
