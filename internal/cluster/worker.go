package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/courier-im/courier/internal/directory"
	"github.com/courier-im/courier/internal/ident"
)

// Defaults for WorkerConfig.
const (
	DefaultConsumer   = "courier-delivery"
	DefaultAckWait    = 10 * time.Second
	DefaultMaxDeliver = 20
	DefaultPushEvery  = 10 * time.Second
	DefaultParallel   = 16
)

// WorkerConfig configures a Worker.
type WorkerConfig struct {
	// Conn is the NATS connection (the caller's; Close leaves it open).
	Conn *nats.Conn
	// Stream is the mailbox stream; Filter the subjects of its device
	// mailboxes; DeviceOf names the device of one such subject (see
	// mailbox/jetstream's Store.StreamName, DeviceSubjects, DeviceOf).
	Stream   string
	Filter   string
	DeviceOf func(subject string) (ident.Device, bool)
	// Directory is the shared session directory.
	Directory directory.Directory
	// Push wakes up devices that are not connected. Default LogPusher.
	Push Pusher
	// SubjectPrefix of the node subjects. Default DefaultSubjectPrefix.
	SubjectPrefix string
	// Consumer is the durable consumer's name, shared by every worker.
	// Default DefaultConsumer.
	Consumer string
	// AckWait is how long an entry handed to a worker may stay
	// unacknowledged before the server gives it to another (the worker
	// died); MaxDeliver how many times an entry is tried. Defaults
	// DefaultAckWait, DefaultMaxDeliver.
	AckWait    time.Duration
	MaxDeliver int
	// PushEvery: a worker pushes at most one wake-up per device per this
	// long (the device reads its whole mailbox when it connects). Default
	// DefaultPushEvery; negative means every entry.
	PushEvery time.Duration
	// Parallel is how many entries one worker handles at once. Default
	// DefaultParallel.
	Parallel int
	Logger   *slog.Logger
	// Registry, if set, gets the worker's metric:
	// courier_worker_entries_total{result}, result one of notified (the
	// holding node was told), pushed, coalesced (a push skipped: one was
	// sent within PushEvery), retried, given_up, dropped (not a device
	// subject).
	Registry prometheus.Registerer
}

// Worker is the delivery role: it reads the new entries of every mailbox
// from a durable JetStream consumer shared by all workers (each entry goes
// to one worker; explicit acks; an entry not acknowledged within AckWait,
// because its worker died, goes to another), looks the device up in the
// session directory, and tells the node holding it that its mailbox has
// new entries, or wakes the device up with a push.
type Worker struct {
	cfg  WorkerConfig
	log  *slog.Logger
	cc   jetstream.ConsumeContext
	work chan jetstream.Msg
	wg   sync.WaitGroup
	once sync.Once

	pushMu sync.Mutex
	pushed map[ident.Device]time.Time

	entries *prometheus.CounterVec
}

// StartWorker creates (or updates) the shared consumer and starts
// consuming.
func StartWorker(ctx context.Context, cfg WorkerConfig) (*Worker, error) {
	if cfg.Conn == nil || cfg.Directory == nil || cfg.DeviceOf == nil || cfg.Stream == "" || cfg.Filter == "" {
		return nil, errors.New("cluster: a worker needs a NATS connection, the mailbox stream, its device filter and a directory")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Push == nil {
		cfg.Push = LogPusher{Logger: cfg.Logger}
	}
	if cfg.SubjectPrefix == "" {
		cfg.SubjectPrefix = DefaultSubjectPrefix
	}
	if cfg.Consumer == "" {
		cfg.Consumer = DefaultConsumer
	}
	if cfg.AckWait == 0 {
		cfg.AckWait = DefaultAckWait
	}
	if cfg.MaxDeliver == 0 {
		cfg.MaxDeliver = DefaultMaxDeliver
	}
	if cfg.PushEvery == 0 {
		cfg.PushEvery = DefaultPushEvery
	}
	if cfg.Parallel <= 0 {
		cfg.Parallel = DefaultParallel
	}
	if cfg.AckWait < time.Second || cfg.MaxDeliver < 1 {
		return nil, fmt.Errorf("cluster: worker ack wait %v / max deliver %d: want at least 1s / 1", cfg.AckWait, cfg.MaxDeliver)
	}
	js, err := jetstream.New(cfg.Conn)
	if err != nil {
		return nil, err
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, cfg.Stream, jetstream.ConsumerConfig{
		Durable:       cfg.Consumer,
		Description:   "courier delivery workers: new mailbox entries",
		DeliverPolicy: jetstream.DeliverNewPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       cfg.AckWait,
		MaxDeliver:    cfg.MaxDeliver,
		FilterSubject: cfg.Filter,
		MaxAckPending: 10000,
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: delivery consumer %s on %s: %w", cfg.Consumer, cfg.Stream, err)
	}
	w := &Worker{
		cfg:    cfg,
		log:    cfg.Logger.With("consumer", cfg.Consumer),
		work:   make(chan jetstream.Msg, cfg.Parallel),
		pushed: map[ident.Device]time.Time{},
		entries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "courier_worker_entries_total",
			Help: "New mailbox entries handled by this delivery worker, by result.",
		}, []string{"result"}),
	}
	if cfg.Registry != nil {
		if err := cfg.Registry.Register(w.entries); err != nil {
			return nil, fmt.Errorf("cluster: worker metrics: %w", err)
		}
	}
	for range cfg.Parallel {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			for m := range w.work {
				w.handle(m)
			}
		}()
	}
	w.cc, err = cons.Consume(func(m jetstream.Msg) { w.work <- m },
		jetstream.PullMaxMessages(4*cfg.Parallel),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			w.log.Debug("delivery consumer", "err", err)
		}))
	if err != nil {
		close(w.work)
		w.wg.Wait()
		return nil, fmt.Errorf("cluster: consume %s: %w", cfg.Consumer, err)
	}
	return w, nil
}

// Close stops consuming and waits for the entries being handled; those
// fetched but not handled are given to another worker after AckWait.
func (w *Worker) Close() error {
	w.once.Do(func() {
		w.cc.Stop()
		<-w.cc.Closed()
		close(w.work)
		w.wg.Wait()
	})
	return nil
}

// handle routes one new mailbox entry.
func (w *Worker) handle(m jetstream.Msg) {
	dev, ok := w.cfg.DeviceOf(m.Subject())
	if !ok {
		w.log.Warn("entry on an unexpected subject; dropped", "subject", m.Subject())
		w.entries.WithLabelValues("dropped").Inc()
		m.Term()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), w.cfg.AckWait/2)
	defer cancel()
	s, online, err := w.cfg.Directory.Lookup(ctx, dev)
	if err != nil {
		w.retry(m, dev, fmt.Errorf("look up: %w", err))
		return
	}
	if online && ValidNode(s.Node) {
		// The publish goes out on the connection before the ack, so an ack
		// the server has seen means the notification left too.
		if err := w.cfg.Conn.Publish(NodeSubject(w.cfg.SubjectPrefix, s.Node), encodeNotify(dev)); err != nil {
			w.retry(m, dev, fmt.Errorf("notify %s: %w", s.Node, err))
			return
		}
		w.entries.WithLabelValues("notified").Inc()
		m.Ack()
		return
	}
	if !w.shouldPush(dev) {
		w.entries.WithLabelValues("coalesced").Inc()
		m.Ack()
		return
	}
	if err := w.cfg.Push.Push(ctx, dev); err != nil {
		w.forgetPush(dev)
		w.retry(m, dev, fmt.Errorf("push: %w", err))
		return
	}
	w.entries.WithLabelValues("pushed").Inc()
	m.Ack()
}

// retry gives the entry back with a growing delay, or gives up after
// MaxDeliver attempts (the entry stays in the mailbox; the device gets it
// when it connects).
func (w *Worker) retry(m jetstream.Msg, dev ident.Device, err error) {
	n := uint64(1)
	if md, merr := m.Metadata(); merr == nil {
		n = md.NumDelivered
	}
	if n >= uint64(w.cfg.MaxDeliver) {
		w.log.Warn("delivery notice given up; the device gets the entry when it connects", "device", dev, "attempts", n, "err", err)
		w.entries.WithLabelValues("given_up").Inc()
		m.Term()
		return
	}
	delay := min(time.Duration(n)*time.Second, w.cfg.AckWait)
	w.log.Info("delivery notice failed; retrying", "device", dev, "attempt", n, "in", delay, "err", err)
	w.entries.WithLabelValues("retried").Inc()
	m.NakWithDelay(delay)
}

// shouldPush reports whether dev is due a wake-up, and records it.
func (w *Worker) shouldPush(dev ident.Device) bool {
	if w.cfg.PushEvery < 0 {
		return true
	}
	now := time.Now()
	w.pushMu.Lock()
	defer w.pushMu.Unlock()
	if t, ok := w.pushed[dev]; ok && now.Sub(t) < w.cfg.PushEvery {
		return false
	}
	if len(w.pushed) >= 100_000 {
		for d, t := range w.pushed {
			if now.Sub(t) >= w.cfg.PushEvery {
				delete(w.pushed, d)
			}
		}
	}
	w.pushed[dev] = now
	return true
}

func (w *Worker) forgetPush(dev ident.Device) {
	w.pushMu.Lock()
	delete(w.pushed, dev)
	w.pushMu.Unlock()
}
