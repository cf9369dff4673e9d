package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// Defaults for Config fields left zero.
const (
	DefaultMinBackoff   = 250 * time.Millisecond
	DefaultMaxBackoff   = 30 * time.Second
	DefaultPingInterval = 30 * time.Second
)

// Timeouts the client applies to its own work.
const (
	dialTimeout    = 30 * time.Second // WebSocket handshake and Hello
	writeTimeout   = 15 * time.Second // one frame onto the connection
	attemptTimeout = 60 * time.Second // one send attempt, device lookups included
	ackTimeout     = 30 * time.Second // waiting for the Ok to an Ack
	maxReadRefs    = 500              // messages per read report
	maxAckSeqs     = 256              // seqs per Ack frame
)

// Config configures a Client. Only Credentials is required.
type Config struct {
	// Credentials of the device this client acts as (from Register).
	Credentials Credentials

	// HTTPClient makes HTTP requests and the WebSocket handshake. If nil, a
	// client with a 30 s timeout is used.
	HTTPClient *http.Client

	// Logger receives the client's diagnostics. If nil, they are discarded.
	Logger *slog.Logger

	// Handler receives every event, in order, from a single goroutine.
	// Message and receipt entries are acknowledged to the server only after
	// Handler has returned for them, so an application that stores what it
	// is given loses nothing if it crashes: the entries come again, and
	// Seen drops those it had finished with. Handler must not call Close.
	// If nil, events are discarded (and entries still acknowledged).
	Handler func(Event)

	// Seen remembers which entries were handled. If nil, an in-memory store
	// bounded to DefaultSeenLimit ids is used.
	Seen SeenStore

	// Outbox persists messages waiting to be sent, so that a restart does
	// not lose them. If nil, the outbox lives in memory only.
	Outbox OutboxStore

	// Tracker holds the receipt state of sent messages. If nil, a new one
	// is used; pass one to share it or to seed it from a local store.
	Tracker *Tracker

	// Groups persists the groups this device knows (names, members). If
	// nil, they live in memory only.
	Groups GroupStore

	// Seal encrypts body for one device; Open decrypts a payload from one.
	// They are the hooks for end-to-end encryption; if nil, payloads are
	// the plaintext. A Seal error fails the send for good (SendFailedEvent);
	// an Open error is reported in MessageEvent.Err.
	Seal func(ctx context.Context, to Device, body []byte) ([]byte, error)
	Open func(ctx context.Context, from Device, payload []byte) ([]byte, error)

	// Cipher, if set, is the end-to-end encryption layer (client/e2e), and
	// replaces Seal and Open. Without it (and without Seal and Open),
	// payloads travel as plaintext: a mode for load tools and tests.
	Cipher Cipher

	// MinBackoff and MaxBackoff bound the delays between reconnects and
	// between send retries (exponential, with full jitter). Defaults:
	// DefaultMinBackoff and DefaultMaxBackoff.
	MinBackoff, MaxBackoff time.Duration

	// PingInterval is how often Run pings the server. A connection on which
	// nothing arrives for two intervals is taken for dead and replaced.
	// Default: DefaultPingInterval.
	PingInterval time.Duration
}

// Client is one device's connection to a courier server: an outbox that
// sends messages until the server accepts them, a connection (Run) that
// receives messages, receipts and presence, and the receipt state of what
// was sent. Its methods are safe for concurrent use.
type Client struct {
	cfg     Config
	self    Device
	api     *httpAPI
	wsURL   string
	log     *slog.Logger
	seen    SeenStore
	store   OutboxStore
	tracker *Tracker
	members *Tracker // group messages: the state per member
	groups  GroupStore
	groupMu sync.Mutex // load-modify-save of groups
	sealMu  sync.Mutex // a group message's seal vs. a membership change (after groupMu)
	backoff backoff

	// ctx ends when the client is closed; its work runs under it.
	ctx          context.Context
	close        context.CancelFunc
	outboxDone   sync.WaitGroup // the outbox goroutine
	dispatchDone sync.WaitGroup // the dispatcher goroutine
	runs         sync.WaitGroup // Run

	events *queue[dispatchItem]
	outbox outbox

	mu      sync.Mutex
	running bool
	sess    *session            // the live connection, if any
	subs    map[string]bool     // presence subscriptions
	devices map[string][]uint32 // device lists, from the server
}

// New returns a Client for cfg.Credentials and starts its outbox: messages
// left in cfg.Outbox by an earlier run are sent again, over HTTP until Run
// connects. Call Close when done with it.
func New(cfg Config) (*Client, error) {
	creds := cfg.Credentials
	base, err := normalizeServer(creds.Server)
	if err != nil {
		return nil, err
	}
	if !validUser(creds.User) || creds.Device == 0 || creds.Secret == "" {
		return nil, errors.New("courier: incomplete credentials: need server, user, device and credential")
	}
	creds.Server = base
	cfg.Credentials = creds
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: defaultHTTPTimeout}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Seen == nil {
		cfg.Seen = NewMemorySeen(0)
	}
	if cfg.Outbox == nil {
		cfg.Outbox = memOutbox{}
	}
	if cfg.Tracker == nil {
		cfg.Tracker = new(Tracker)
	}
	if cfg.Groups == nil {
		cfg.Groups = &memGroups{}
	}
	if cfg.Seal == nil {
		cfg.Seal = func(_ context.Context, _ Device, body []byte) ([]byte, error) { return body, nil }
	}
	if cfg.Open == nil {
		cfg.Open = func(_ context.Context, _ Device, payload []byte) ([]byte, error) { return payload, nil }
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = DefaultMaxBackoff
	}
	cfg.MaxBackoff = max(cfg.MaxBackoff, cfg.MinBackoff)
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = DefaultPingInterval
	}
	pending, err := cfg.Outbox.Pending()
	if err != nil {
		return nil, fmt.Errorf("courier: load the outbox: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Client{
		ctx:     ctx,
		close:   cancel,
		cfg:     cfg,
		self:    Device{User: creds.User, ID: creds.Device},
		api:     &httpAPI{base: base, client: cfg.HTTPClient, auth: basicAuth(creds)},
		wsURL:   base + "/v1/ws",
		log:     cfg.Logger,
		seen:    cfg.Seen,
		store:   cfg.Outbox,
		tracker: cfg.Tracker,
		members: new(Tracker),
		groups:  cfg.Groups,
		backoff: backoff{min: cfg.MinBackoff, max: cfg.MaxBackoff},
		events:  newQueue[dispatchItem](),
		outbox:  outbox{queue: newQueue[*outItem](), retry: make(chan struct{}, 1)},
		subs:    map[string]bool{},
		devices: map[string][]uint32{},
	}
	for _, m := range pending {
		if !m.hidden() {
			c.tracker.Track(MessageRef{ClientMsgID: m.ClientMsgID}, m.peer())
		}
		c.outbox.queue.push(&outItem{msg: m})
	}
	c.outboxDone.Add(1)
	c.dispatchDone.Add(1)
	go c.dispatchLoop()
	go c.outboxLoop()
	return c, nil
}

// Self returns the device this client acts as.
func (c *Client) Self() Device { return c.self }

// Close stops the client: Run returns ErrClosed and the outbox stops
// (what it holds stays in Config.Outbox). Before Close returns, Handler
// gets the outcomes the outbox reached (StatusSent receipts,
// SendFailedEvent), which would otherwise be lost; mailbox entries not yet
// handled are dropped, since the server delivers them again. Close waits
// for the client's goroutines, so it must not be called from Handler. It
// is idempotent.
func (c *Client) Close() error {
	c.close()
	c.runs.Wait()
	c.outboxDone.Wait()
	c.dispatchDone.Wait()
	return nil
}

func (c *Client) isClosed() bool { return c.ctx.Err() != nil }

// emit queues an event for Handler.
func (c *Client) emit(ev Event) { c.events.push(dispatchItem{event: ev}) }

// session returns the live connection, or nil.
func (c *Client) session() *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sess
}

// newClientMsgID returns 16 random bytes in hex.
func newClientMsgID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Send puts a message to user to in the outbox and waits until the server
// has accepted it (the ✓), or refused it for good, or ctx ends. The outbox
// sends over the connection if Run is connected, otherwise over HTTP, and
// retries transient failures (network, server busy or stopping) with
// backoff, always with the same client message id, so that the server
// stores the message once however many attempts reach it.
//
// A permanent refusal (unknown recipient, payload too large, invalid) is a
// *RefusedError and removes the message from the outbox. If ctx ends first,
// Send returns ctx's error, and the message stays in the outbox, which goes
// on sending it. On error, the returned Sent holds the client id only.
func (c *Client) Send(ctx context.Context, to string, body []byte) (Sent, error) {
	it, err := c.enqueue(to, body, true)
	if err != nil {
		return Sent{}, err
	}
	return c.wait(ctx, it)
}

// wait waits for the outcome of a message in the outbox.
func (c *Client) wait(ctx context.Context, it *outItem) (Sent, error) {
	select {
	case r := <-it.done:
		return r.sent, r.err
	case <-ctx.Done():
		return Sent{MessageRef: MessageRef{ClientMsgID: it.msg.ClientMsgID}},
			fmt.Errorf("courier: message %s not accepted yet (it stays in the outbox): %w", it.msg.ClientMsgID, ctx.Err())
	case <-c.ctx.Done():
		return Sent{MessageRef: MessageRef{ClientMsgID: it.msg.ClientMsgID}}, ErrClosed
	}
}

// SendAsync puts a message in the outbox and returns at once with its
// client message id. Acceptance is reported later as a ReceiptEvent with
// StatusSent (carrying the server id); a permanent failure as a
// SendFailedEvent.
func (c *Client) SendAsync(to string, body []byte) (MessageRef, error) {
	it, err := c.enqueue(to, body, false)
	if err != nil {
		return MessageRef{}, err
	}
	return MessageRef{ClientMsgID: it.msg.ClientMsgID}, nil
}

// Status returns where a message sent from this client stands, by server
// id or client message id: StatusPending while in the outbox, then sent,
// delivered, read. It is StatusUnknown for messages the client does not
// know (sent before a restart, unless Config.Tracker was seeded).
func (c *Client) Status(ref string) Status { return c.tracker.Status(ref) }

// MarkRead tells sender that this user has read msgs (a READ receipt to
// all the sender's devices): over the connection if Run is connected,
// otherwise over HTTP. It returns once the server has made the receipt
// durable.
func (c *Client) MarkRead(ctx context.Context, sender string, msgs ...MessageRef) error {
	if !validUser(sender) {
		return fmt.Errorf("courier: mark read: bad sender name %q", sender)
	}
	for chunk := range slices.Chunk(msgs, maxReadRefs) {
		if err := c.markRead(ctx, sender, chunk); err != nil {
			return err
		}
	}
	return nil
}

func (c *Client) markRead(ctx context.Context, sender string, msgs []MessageRef) error {
	if s := c.session(); s != nil {
		refs := make([]*courierv1.MessageRef, len(msgs))
		for i, m := range msgs {
			refs[i] = &courierv1.MessageRef{ServerId: m.ServerID, ClientMsgId: m.ClientMsgID}
		}
		err := s.request(ctx, &courierv1.ClientFrame{Body: &courierv1.ClientFrame_Read{
			Read: &courierv1.Read{Sender: sender, Messages: refs}}})
		if !errors.Is(err, errDisconnected) {
			return err
		}
	}
	return c.api.read(ctx, sender, msgs)
}

// Subscribe asks for the presence of users: a PresenceEvent for each now,
// and one on every change. Subscriptions are remembered and made again
// after every reconnect; while Run is not connected, Subscribe only
// remembers them. An unknown user is a *RefusedError (CodeUnknownUser), and
// the users of that call are then not remembered.
func (c *Client) Subscribe(ctx context.Context, users ...string) error {
	if len(users) == 0 {
		return nil
	}
	for _, u := range users {
		if !validUser(u) {
			return fmt.Errorf("courier: subscribe: bad user name %q", u)
		}
	}
	c.mu.Lock()
	for _, u := range users {
		c.subs[u] = true
	}
	s := c.sess
	c.mu.Unlock()
	if s == nil {
		return nil
	}
	err := s.subscribe(ctx, users)
	if errors.Is(err, errDisconnected) {
		return nil // made again on the next connection
	}
	var re *RefusedError
	if errors.As(err, &re) && re.Code == CodeUnknownUser {
		c.mu.Lock()
		for _, u := range users {
			delete(c.subs, u)
		}
		c.mu.Unlock()
	}
	return err
}

// SetTyping tells user to that this user is (or stopped) typing to them.
// It is best effort, never stored: without a live connection it returns
// ErrNotConnected.
func (c *Client) SetTyping(ctx context.Context, to string, typing bool) error {
	if !validUser(to) {
		return fmt.Errorf("courier: typing: bad user name %q", to)
	}
	s := c.session()
	if s == nil {
		return ErrNotConnected
	}
	err := s.request(ctx, &courierv1.ClientFrame{Body: &courierv1.ClientFrame_Typing{
		Typing: &courierv1.Typing{To: to, Typing: typing}}})
	if errors.Is(err, errDisconnected) {
		return ErrNotConnected
	}
	return err
}

// Devices returns the ids of user's devices, and refreshes the client's
// cached device list for user, used to address messages.
func (c *Client) Devices(ctx context.Context, user string) ([]uint32, error) {
	devs, err := c.ListDevices(ctx, user)
	if err != nil {
		return nil, err
	}
	ids := make([]uint32, len(devs))
	for i, d := range devs {
		ids[i] = d.ID
	}
	return ids, nil
}

// ListDevices is Devices with the devices' names and creation times.
func (c *Client) ListDevices(ctx context.Context, user string) ([]DeviceInfo, error) {
	if !validUser(user) {
		return nil, fmt.Errorf("courier: devices: bad user name %q", user)
	}
	devs, err := c.api.devices(ctx, user)
	if err != nil {
		return nil, err
	}
	ids := make([]uint32, len(devs))
	for i, d := range devs {
		ids[i] = d.ID
	}
	c.setDevices(user, ids)
	return devs, nil
}

func (c *Client) setDevices(user string, ids []uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.devices[user] = slices.Clone(ids)
}

func (c *Client) cachedDevices(user string) ([]uint32, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ids, ok := c.devices[user]
	return ids, ok
}
