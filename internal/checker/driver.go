package checker

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/courier-im/courier/client"
)

// Config configures a Driver.
type Config struct {
	// Server is the base URL of the server under test.
	Server string
	// Users is how many users converse (at least 2).
	Users int
	// DevicesPerUser is 1 or 2: with 2, every other user gets a second
	// device through AddDevice (which is then required).
	DevicesPerUser int
	// Messages is how many messages are sent in all.
	Messages int
	// Seed makes the conversation's choices (who sends to whom, who
	// reconnects, who reads) repeatable.
	Seed uint64
	// Duration caps the conversation (sending); 0 means 2 minutes.
	Duration time.Duration
	// QuiesceTimeout bounds the wait, after the conversation, for every
	// accepted message to be delivered; 0 means 30 s.
	QuiesceTimeout time.Duration
	// ReconnectRate is the chance, before each send, that the sending
	// device disconnects and comes back as a new Client; ReadRate, after
	// each send, that it marks what it got read. Negative means never;
	// 0 means the defaults (0.05 and 0.2).
	ReconnectRate, ReadRate float64

	// AddDevice adds a device to user and returns its id and credential.
	AddDevice func(ctx context.Context, user string) (id uint32, secret string, err error)
	// Faults is how many times Fault is called, at evenly spaced points of
	// the conversation (after 1/(Faults+1), 2/(Faults+1)… of the messages
	// were accepted), from the goroutine that called Run, while the other
	// devices go on sending. A test restarts the server there.
	Faults int
	Fault  func(ctx context.Context, n int) error

	// Stalled devices (the last ones made) send nothing and never ack:
	// their Handler blocks on the first message, so the server's window of
	// unacknowledged entries fills and the rest waits in their mailboxes.
	// After the conversation, StalledPeak (if set) is called while they
	// are still stalled (a test measures the server's memory there); then
	// each is released, disconnects, and comes back as a new Client that
	// gets and acks everything. At most Users-2 devices may stall.
	Stalled     int
	StalledPeak func(ctx context.Context) error
	// SlowReaders devices (the first ones made) take SlowDelay over each
	// message they are handed, so they read and ack slowly; they send as
	// usual. SlowDelay 0 means 5 ms.
	SlowReaders int
	SlowDelay   time.Duration
	// BodySize pads every message body to at least this many bytes.
	BodySize int

	// Logf, if set, gets progress lines.
	Logf func(format string, args ...any)
}

// Result is the outcome of a Driver run.
type Result struct {
	History    *History
	Stats      Stats
	Violations []Violation
	// Quiesced is false if the wait for delivery timed out (the lost
	// messages are then among the violations).
	Quiesced   bool
	Reconnects int
	Reads      int // MarkRead calls that succeeded
	// Supersedes counts connections closed as superseded although no other
	// incarnation of the device was running (Run was started again).
	Supersedes int
	Elapsed    time.Duration
}

// Driver runs a randomised conversation of real SDK clients against a
// server and checks the History it records.
type Driver struct {
	cfg  Config
	hist *History
}

// NewDriver returns a Driver for cfg.
func NewDriver(cfg Config) (*Driver, error) {
	if cfg.Server == "" {
		return nil, errors.New("checker: no server URL")
	}
	if cfg.Users < 2 {
		return nil, errors.New("checker: need at least 2 users")
	}
	if cfg.DevicesPerUser == 0 {
		cfg.DevicesPerUser = 1
	}
	if cfg.DevicesPerUser < 1 || cfg.DevicesPerUser > 2 {
		return nil, errors.New("checker: DevicesPerUser must be 1 or 2")
	}
	if cfg.DevicesPerUser == 2 && cfg.AddDevice == nil {
		return nil, errors.New("checker: DevicesPerUser 2 needs AddDevice")
	}
	if cfg.Faults > 0 && cfg.Fault == nil {
		return nil, errors.New("checker: Faults without Fault")
	}
	if cfg.Messages < 0 {
		return nil, errors.New("checker: negative Messages")
	}
	if cfg.Stalled < 0 || cfg.Stalled > cfg.Users-2 {
		return nil, errors.New("checker: Stalled must be between 0 and Users-2")
	}
	if cfg.SlowReaders < 0 || cfg.BodySize < 0 || cfg.SlowDelay < 0 {
		return nil, errors.New("checker: negative SlowReaders, SlowDelay or BodySize")
	}
	if cfg.SlowDelay == 0 {
		cfg.SlowDelay = 5 * time.Millisecond
	}
	if cfg.Duration <= 0 {
		cfg.Duration = 2 * time.Minute
	}
	if cfg.QuiesceTimeout <= 0 {
		cfg.QuiesceTimeout = 30 * time.Second
	}
	if cfg.ReconnectRate == 0 {
		cfg.ReconnectRate = 0.05
	}
	if cfg.ReadRate == 0 {
		cfg.ReadRate = 0.2
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	return &Driver{cfg: cfg, hist: NewHistory()}, nil
}

// History returns the History the driver records into.
func (d *Driver) History() *History { return d.hist }

// device is one simulated device, across its Client incarnations.
type device struct {
	d     *Driver
	creds client.Credentials
	self  client.Device
	rng   *mrand.Rand
	plan  []string // recipients of the messages it sends, in order

	// Kept across incarnations, as an application's local store would be.
	seen    client.SeenStore
	outbox  *recordingOutbox
	tracker *client.Tracker

	cl     *client.Client
	cancel context.CancelFunc
	runErr chan error

	mu     sync.Mutex
	unread map[string][]client.MessageRef // by sender user

	reconnects, reads int
	// stall, when not nil, blocks the handler until closed (a stalled
	// device; released records the close); slow is the time the handler
	// takes over each message.
	stall      chan struct{}
	released   bool
	slow       time.Duration
	supersedes atomic.Int64 // Runs ended by ErrSuperseded, restarted
	// connected is whether the current incarnation's connection is up;
	// abandoned, whether the previous incarnation was ended while it was
	// not (dialling, or waiting to redial).
	connected, abandoned atomic.Bool
}

// maxSupersedes bounds how often one device's Run is restarted after
// ErrSuperseded.
const maxSupersedes = 20

// recordingOutbox is an in-memory client.OutboxStore that outlives a
// Client (so messages not yet accepted are sent by the next incarnation)
// and records every message entering it as a send attempt.
type recordingOutbox struct {
	h  *History
	mu sync.Mutex
	ms []client.OutboxMessage
}

func (o *recordingOutbox) Add(m client.OutboxMessage) error {
	o.h.Send(m.From, m.To, m.ClientMsgID, m.Body)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.ms = append(o.ms, m)
	return nil
}

func (o *recordingOutbox) Remove(id string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.ms = slices.DeleteFunc(o.ms, func(m client.OutboxMessage) bool { return m.ClientMsgID == id })
	return nil
}

func (o *recordingOutbox) Pending() ([]client.OutboxMessage, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.ms), nil
}

func (dv *device) handle(ev client.Event) {
	h := dv.d.hist
	if _, ok := ev.(*client.MessageEvent); ok {
		if dv.stall != nil {
			<-dv.stall
		}
		if dv.slow > 0 {
			time.Sleep(dv.slow)
		}
	}
	switch ev := ev.(type) {
	case *client.MessageEvent:
		h.Delivered(dv.self, client.Device{User: ev.From, ID: ev.FromDevice}, ev.ServerID, ev.ClientMsgID, ev.Body, ev.Sync)
		if !ev.Sync {
			dv.mu.Lock()
			dv.unread[ev.From] = append(dv.unread[ev.From], client.MessageRef{ServerID: ev.ServerID, ClientMsgID: ev.ClientMsgID})
			dv.mu.Unlock()
		}
	case *client.ConnectionEvent:
		dv.connected.Store(ev.State == client.Connected)
	case *client.ReceiptEvent:
		if ev.Status == client.StatusSent {
			h.Accepted(dv.self, ev.Message.ClientMsgID, ev.Message.ServerID)
		}
		h.Receipt(dv.self, ev.Message.ServerID, ev.Status)
	}
}

// release unblocks a stalled device's handler; it reports whether the
// device was stalled until now.
func (dv *device) release() bool {
	if dv.stall == nil || dv.released {
		return false
	}
	close(dv.stall)
	dv.released = true
	return true
}

// connect makes a new Client incarnation and starts its Run.
func (dv *device) connect() error {
	cl, err := client.New(client.Config{
		Credentials: dv.creds,
		Handler:     dv.handle,
		Seen:        dv.seen,
		Outbox:      dv.outbox,
		Tracker:     dv.tracker,
		MinBackoff:  50 * time.Millisecond,
		MaxBackoff:  time.Second,
	})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	dv.cl, dv.cancel, dv.runErr = cl, cancel, make(chan error, 1)
	go func() {
		for {
			err := cl.Run(ctx)
			// A dial abandoned by an earlier incarnation (or by this one,
			// at a reconnect) can reach the server after the live
			// connection and supersede it. Only one incarnation of a device
			// runs at a time here, so that is no second copy of the device:
			// count it and connect again, a bounded number of times.
			if errors.Is(err, client.ErrSuperseded) && ctx.Err() == nil && dv.supersedes.Add(1) <= maxSupersedes {
				dv.d.cfg.Logf("checker: %s: connection superseded with no other incarnation running (previous one ended while not connected: %v); connecting again",
					dv.self, dv.abandoned.Load())
				continue
			}
			dv.runErr <- err
			return
		}
	}()
	return nil
}

// disconnect ends the current incarnation and reports how its Run ended
// (nil when it was still running).
func (dv *device) disconnect() error {
	if dv.cl == nil {
		return nil
	}
	dv.cancel()
	err := <-dv.runErr
	dv.cl.Close()
	dv.cl = nil
	dv.abandoned.Store(!dv.connected.Load())
	dv.connected.Store(false)
	if errors.Is(err, client.ErrClosed) {
		err = nil
	}
	return err
}

// markRead sends read receipts for what this device got and has not yet
// marked. A failure (the server restarting) puts them back for later.
func (dv *device) markRead(ctx context.Context) {
	dv.mu.Lock()
	unread := dv.unread
	dv.unread = map[string][]client.MessageRef{}
	dv.mu.Unlock()
	for sender, refs := range unread {
		if err := dv.cl.MarkRead(ctx, sender, refs...); err != nil {
			dv.mu.Lock()
			dv.unread[sender] = append(dv.unread[sender], refs...)
			dv.mu.Unlock()
			continue
		}
		dv.reads++
	}
}

// converse sends the device's planned messages one after another.
func (dv *device) converse(ctx context.Context, accepted *atomic.Int64, progress chan<- struct{}) error {
	for k, to := range dv.plan {
		if ctx.Err() != nil {
			return nil
		}
		if dv.rng.Float64() < dv.d.cfg.ReconnectRate {
			if err := dv.disconnect(); err != nil {
				return fmt.Errorf("%s: %w", dv.self, err)
			}
			if err := dv.connect(); err != nil {
				return fmt.Errorf("%s: %w", dv.self, err)
			}
			dv.reconnects++
		}
		body := []byte(fmt.Sprintf("%s #%d to %s", dv.self, k, to))
		if pad := dv.d.cfg.BodySize - len(body); pad > 0 {
			body = append(body, bytes.Repeat([]byte{'.'}, pad)...)
		}
		sent, err := dv.cl.Send(ctx, to, body)
		if err != nil {
			if ctx.Err() != nil {
				return nil // the conversation's time is up; the outbox goes on
			}
			return fmt.Errorf("%s: send #%d: %w", dv.self, k, err)
		}
		dv.d.hist.Accepted(dv.self, sent.ClientMsgID, sent.ServerID)
		accepted.Add(1)
		select {
		case progress <- struct{}{}:
		default:
		}
		if dv.rng.Float64() < dv.d.cfg.ReadRate {
			dv.markRead(ctx)
		}
	}
	return nil
}

// runTag returns a short random tag that keeps the user names of
// different runs apart on one server.
func runTag() string {
	var b [3]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Run registers the users, adds their second devices, runs the
// conversation (calling Fault at its points), waits for every accepted
// message to be delivered, closes the clients and checks the History. An
// error means the run itself could not be carried out (registration,
// a permanent refusal, a fault hook failing, a client stopping for good);
// broken promises are in Result.Violations.
func (d *Driver) Run(ctx context.Context) (*Result, error) {
	cfg := d.cfg
	start := time.Now()
	rng := mrand.New(mrand.NewPCG(cfg.Seed, 0x636f7572696572))
	tag := runTag()

	// Users and devices.
	users := make([]string, cfg.Users)
	var devs []*device
	byUser := map[string][]*device{}
	for i := range users {
		users[i] = fmt.Sprintf("ck%s-u%d", tag, i)
		creds, err := client.Register(ctx, cfg.Server, users[i], "checker")
		if err != nil {
			return nil, fmt.Errorf("checker: register %s: %w", users[i], err)
		}
		all := []client.Credentials{creds}
		if cfg.DevicesPerUser == 2 && i%2 == 0 {
			id, secret, err := cfg.AddDevice(ctx, users[i])
			if err != nil {
				return nil, fmt.Errorf("checker: add a device to %s: %w", users[i], err)
			}
			c2 := creds
			c2.Device, c2.Secret = id, secret
			all = append(all, c2)
		}
		var ids []uint32
		for _, c := range all {
			dv := &device{
				d: d, creds: c, self: client.Device{User: c.User, ID: c.Device},
				rng:     mrand.New(mrand.NewPCG(cfg.Seed, uint64(len(devs))+1)),
				seen:    client.NewMemorySeen(0),
				outbox:  &recordingOutbox{h: d.hist},
				tracker: new(client.Tracker),
				unread:  map[string][]client.MessageRef{},
			}
			devs = append(devs, dv)
			byUser[users[i]] = append(byUser[users[i]], dv)
			ids = append(ids, c.Device)
		}
		d.hist.SetDevices(users[i], ids)
	}

	// The first SlowReaders devices read slowly; the last Stalled ones
	// stall, and send nothing.
	for i, dv := range devs {
		if i < cfg.SlowReaders {
			dv.slow = cfg.SlowDelay
		}
		if i >= len(devs)-cfg.Stalled {
			dv.stall = make(chan struct{})
		}
	}
	senders := devs[:len(devs)-cfg.Stalled]

	// The plan: who sends to whom, in order.
	for range cfg.Messages {
		from := senders[rng.IntN(len(senders))]
		to := users[rng.IntN(len(users)-1)]
		if to == from.self.User {
			to = users[len(users)-1]
		}
		from.plan = append(from.plan, to)
	}

	for _, dv := range devs {
		if err := dv.connect(); err != nil {
			return nil, fmt.Errorf("checker: %w", err)
		}
	}
	defer func() {
		for _, dv := range devs {
			dv.release()
			dv.disconnect()
		}
	}()
	cfg.Logf("checker: %d users, %d devices, %d messages, seed %d", len(users), len(devs), cfg.Messages, cfg.Seed)

	// The conversation.
	convCtx, cancel := context.WithTimeout(ctx, cfg.Duration)
	defer cancel()
	var accepted atomic.Int64
	progress := make(chan struct{}, 1)
	errs := make(chan error, len(devs))
	for _, dv := range devs {
		go func() { errs <- dv.converse(convCtx, &accepted, progress) }()
	}
	var runErr error
	faults, running := 0, len(devs)
	for running > 0 {
		for faults < cfg.Faults && accepted.Load() >= int64((faults+1)*cfg.Messages/(cfg.Faults+1)) && convCtx.Err() == nil {
			cfg.Logf("checker: fault %d after %d accepted", faults, accepted.Load())
			if err := cfg.Fault(ctx, faults); err != nil {
				runErr = errors.Join(runErr, fmt.Errorf("checker: fault %d: %w", faults, err))
				cancel()
			}
			faults++
		}
		select {
		case err := <-errs:
			running--
			if err != nil {
				runErr = errors.Join(runErr, fmt.Errorf("checker: %w", err))
				cancel()
			}
		case <-progress:
		}
	}
	if runErr != nil {
		return nil, runErr
	}
	cfg.Logf("checker: conversation over: %d accepted in %v; waiting for delivery", accepted.Load(), time.Since(start).Round(time.Millisecond))

	// Stalled devices: measure, then release them and have them come back.
	if cfg.Stalled > 0 {
		if cfg.StalledPeak != nil {
			if err := cfg.StalledPeak(ctx); err != nil {
				return nil, fmt.Errorf("checker: at the stalled peak: %w", err)
			}
		}
		for _, dv := range devs {
			if !dv.release() {
				continue
			}
			if err := dv.disconnect(); err != nil {
				return nil, fmt.Errorf("checker: %s: %w", dv.self, err)
			}
			if err := dv.connect(); err != nil {
				return nil, fmt.Errorf("checker: %s: %w", dv.self, err)
			}
			dv.reconnects++
		}
		cfg.Logf("checker: %d stalled devices released and reconnected", cfg.Stalled)
	}

	// Quiesce: everyone is connected; wait until nothing is owed. Sends
	// whose Send gave up at the time cap may still be accepted meanwhile
	// (their acceptance then shows as a StatusSent receipt).
	res := &Result{History: d.hist, Quiesced: true}
	qctx, qcancel := context.WithTimeout(ctx, cfg.QuiesceTimeout)
	defer qcancel()
	for d.hist.Outstanding() > 0 || d.hist.Unaccepted() > 0 {
		select {
		case <-d.hist.Changed():
		case <-qctx.Done():
			res.Quiesced = false
		}
		if !res.Quiesced {
			cfg.Logf("checker: %d deliveries still owed, %d sends not accepted after %v",
				d.hist.Outstanding(), d.hist.Unaccepted(), cfg.QuiesceTimeout)
			break
		}
	}
	for _, dv := range devs {
		if err := dv.disconnect(); err != nil {
			runErr = errors.Join(runErr, fmt.Errorf("checker: %s: %w", dv.self, err))
		}
		res.Reconnects += dv.reconnects
		res.Reads += dv.reads
		res.Supersedes += int(dv.supersedes.Load())
	}
	res.Violations = d.hist.Check()
	res.Stats = d.hist.Stats()
	res.Elapsed = time.Since(start)
	cfg.Logf("checker: %+v, %d violations, %d reconnects, %d reads, %d spurious supersedes, in %v",
		res.Stats, len(res.Violations), res.Reconnects, res.Reads, res.Supersedes, res.Elapsed.Round(time.Millisecond))
	return res, runErr
}
