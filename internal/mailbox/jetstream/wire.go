package jetstream

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
)

// Headers this package writes on every stored message, and the JetStream
// headers it reads or writes.
const (
	hdrTime = "Courier-Time" // append time, Unix nanoseconds, decimal

	hdrStatus      = "Status"
	hdrDescription = "Description"
	hdrSubject     = "Nats-Subject"
	hdrSequence    = "Nats-Sequence"
	hdrTimeStamp   = "Nats-Time-Stamp"
	hdrNumPending  = "Nats-Num-Pending"
	hdrBatchID     = "Nats-Batch-Id"
	hdrBatchSeq    = "Nats-Batch-Sequence"
	hdrBatchCommit = "Nats-Batch-Commit"
	hdrExpLastSubj = "Nats-Expected-Last-Subject-Sequence"
)

// JetStream API error codes this package acts on (nats-server's
// jetstream_errors_generated.go).
const (
	errCodeWrongLastSeq         = 10071 // expected last subject sequence did not match
	errCodeWrongLastSeqConstant = 10164 // the same, on a replicated stream or with the subject in flight
	errCodeSeqNotFound          = 10043 // message delete: sequence not found
	errCodeMsgDeleteFailed      = 10057 // message delete failed (also "no message found")
	errCodeMsgNotFound          = 10037 // message get: no message found
	errCodeClusterNotAvail      = 10008
	errCodeInsufficientRes      = 10023
	errCodeStreamNotFound       = 10059
	errCodeAtomicTooManyInfl    = 10210
	errCodeAtomicIncomplete     = 10176
	errCodeNotLeader            = 10009
)

// apiError is an error answered by the JetStream API.
type apiError struct {
	Code        int    `json:"code"`
	ErrCode     int    `json:"err_code"`
	Description string `json:"description"`
}

func (e *apiError) Error() string {
	return fmt.Sprintf("jetstream: %s (code %d, err_code %d)", e.Description, e.Code, e.ErrCode)
}

// transient reports whether the error means the stream cannot take writes
// right now (no leader, no quorum, resources exhausted), so that nothing was
// stored and the caller may retry later.
func (e *apiError) transient() bool {
	switch e.ErrCode {
	case errCodeClusterNotAvail, errCodeInsufficientRes, errCodeAtomicTooManyInfl, errCodeNotLeader, errCodeAtomicIncomplete:
		return true
	}
	return e.Code == 503
}

func isAPIErr(err error, codes ...int) bool {
	var ae *apiError
	if !errors.As(err, &ae) {
		return false
	}
	for _, c := range codes {
		if ae.ErrCode == c {
			return true
		}
	}
	return false
}

// errNoResponders: nothing listens on the subject (the stream has no leader
// or does not exist). Nothing was received.
var errNoResponders = fmt.Errorf("%w: jetstream: no responders (stream unavailable)", mailbox.ErrUnavailable)

// subjects names the stream's subjects under one prefix.
type subjects struct{ prefix string }

// device is the subject holding dev's mailbox: <prefix>.d.<user>.<id>.
func (s subjects) device(dev ident.Device) string {
	return s.prefix + ".d." + dev.User + "." + strconv.FormatUint(uint64(dev.ID), 10)
}

// key is the subject holding an idempotency key's receipt:
// <prefix>.k.<hex SHA-256 of the key>.
func (s subjects) key(key string) string {
	h := sha256.Sum256([]byte(key))
	return s.prefix + ".k." + hex.EncodeToString(h[:])
}

func (s subjects) devices() string { return s.prefix + ".d.*.*" }
func (s subjects) keys() string    { return s.prefix + ".k.*" }
func (s subjects) all() string     { return s.prefix + ".>" }
func (s subjects) isDevice(subj string) bool {
	return strings.HasPrefix(subj, s.prefix+".d.")
}

func validDevice(d ident.Device) error {
	if !ident.ValidUser(d.User) {
		return fmt.Errorf("jetstream mailbox: device %q: invalid user name", d.String())
	}
	return nil
}

func encodeTime(t time.Time) string { return strconv.FormatInt(t.UnixNano(), 10) }

// msgTime is the append time recorded in a stored message: the Courier-Time
// header, or the stream's own timestamp for a message without one.
func msgTime(h nats.Header) time.Time {
	if v := h.Get(hdrTime); v != "" {
		if n, err := strconv.ParseInt(v, 10, 64); err == nil {
			return time.Unix(0, n).UTC()
		}
	}
	if v := h.Get(hdrTimeStamp); v != "" {
		if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
			return t.UTC()
		}
	}
	return time.Time{}
}

// storedMsg is one message read back from the stream.
type storedMsg struct {
	subject string
	seq     uint64
	header  nats.Header
	data    []byte
}

// replyMux routes replies to requests made on one connection through one
// wildcard subscription, so that a request costs no SUB/UNSUB and the
// reply subject's interest is in place on every server before any request
// is sent.
type replyMux struct {
	nc     *nats.Conn
	prefix string
	sub    *nats.Subscription

	mu      sync.Mutex
	waiting map[string]chan *nats.Msg
}

func newReplyMux(nc *nats.Conn) (*replyMux, error) {
	m := &replyMux{nc: nc, prefix: nats.NewInbox() + ".", waiting: map[string]chan *nats.Msg{}}
	sub, err := nc.Subscribe(m.prefix+"*", m.deliver)
	if err != nil {
		return nil, err
	}
	// Batched direct gets answer with up to maxDirectBatch+1 messages at
	// once; never drop any for a slow handler.
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	m.sub = sub
	return m, nil
}

func (m *replyMux) deliver(msg *nats.Msg) {
	token := msg.Subject[len(m.prefix):]
	m.mu.Lock()
	ch := m.waiting[token]
	m.mu.Unlock()
	if ch == nil {
		return // a late reply to a request that gave up
	}
	select {
	case ch <- msg:
	default: // more replies than asked for; the request fails on its own
	}
}

// open registers a reply subject able to buffer n replies.
func (m *replyMux) open(n int) (string, chan *nats.Msg, func()) {
	token := nuid.Next()
	ch := make(chan *nats.Msg, n)
	m.mu.Lock()
	m.waiting[token] = ch
	m.mu.Unlock()
	return m.prefix + token, ch, func() {
		m.mu.Lock()
		delete(m.waiting, token)
		m.mu.Unlock()
	}
}

func (m *replyMux) close() error { return m.sub.Unsubscribe() }

// wait returns the next reply, or an error when ctx ends first.
func wait(ctx context.Context, ch chan *nats.Msg) (*nats.Msg, error) {
	select {
	case msg := <-ch:
		if len(msg.Data) == 0 && msg.Header.Get(hdrStatus) == "503" {
			return nil, errNoResponders
		}
		return msg, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// request sends one JetStream API request and decodes its JSON answer.
func (m *replyMux) request(ctx context.Context, subj string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	reply, ch, done := m.open(1)
	defer done()
	if err := m.nc.PublishMsg(&nats.Msg{Subject: subj, Reply: reply, Data: body}); err != nil {
		return err
	}
	msg, err := wait(ctx, ch)
	if err != nil {
		return err
	}
	return json.Unmarshal(msg.Data, resp)
}

// pubAck is JetStream's answer to a publish (or to an atomic batch's commit).
type pubAck struct {
	Stream string    `json:"stream"`
	Seq    uint64    `json:"seq"`
	Batch  string    `json:"batch,omitempty"`
	Count  int       `json:"count,omitempty"`
	Error  *apiError `json:"error,omitempty"`
}

func parsePubAck(msg *nats.Msg) (pubAck, error) {
	var ack pubAck
	if err := json.Unmarshal(msg.Data, &ack); err != nil {
		return ack, fmt.Errorf("jetstream mailbox: bad publish ack %q: %w", msg.Data, err)
	}
	if ack.Error != nil {
		return ack, ack.Error
	}
	if ack.Seq == 0 {
		return ack, fmt.Errorf("jetstream mailbox: publish ack without a sequence: %q", msg.Data)
	}
	return ack, nil
}

// directGetRequest is the body of $JS.API.DIRECT.GET.<stream> (and, without
// Batch and MaxBytes, of $JS.API.STREAM.MSG.GET.<stream>).
type directGetRequest struct {
	Seq      uint64 `json:"seq,omitempty"`
	LastFor  string `json:"last_by_subj,omitempty"`
	NextFor  string `json:"next_by_subj,omitempty"`
	Batch    int    `json:"batch,omitempty"`
	MaxBytes int    `json:"max_bytes,omitempty"`
}

const (
	maxDirectBatch = 1024    // messages asked for per batched direct get
	maxDirectBytes = 4 << 20 // bytes asked for per batched direct get
)

// directGet performs one batched direct get (answered by any current
// replica). It returns the messages and whether the server reported more
// matching messages after them.
func (m *replyMux) directGet(ctx context.Context, stream string, req directGetRequest) ([]storedMsg, bool, error) {
	req.Batch = max(req.Batch, 1)
	req.MaxBytes = maxDirectBytes
	body, err := json.Marshal(req)
	if err != nil {
		return nil, false, err
	}
	reply, ch, done := m.open(req.Batch + 2)
	defer done()
	if err := m.nc.PublishMsg(&nats.Msg{Subject: "$JS.API.DIRECT.GET." + stream, Reply: reply, Data: body}); err != nil {
		return nil, false, err
	}
	var out []storedMsg
	for {
		msg, err := wait(ctx, ch)
		if err != nil {
			return nil, false, err
		}
		switch status := msg.Header.Get(hdrStatus); status {
		case "":
		case "204": // end of batch
			np, _ := strconv.ParseUint(msg.Header.Get(hdrNumPending), 10, 64)
			return out, np > 0, nil
		case "404":
			return out, false, nil
		default:
			return nil, false, fmt.Errorf("jetstream mailbox: direct get: %s %s", status, msg.Header.Get(hdrDescription))
		}
		seq, err := strconv.ParseUint(msg.Header.Get(hdrSequence), 10, 64)
		if err != nil {
			return nil, false, fmt.Errorf("jetstream mailbox: direct get: bad %s %q", hdrSequence, msg.Header.Get(hdrSequence))
		}
		out = append(out, storedMsg{subject: msg.Header.Get(hdrSubject), seq: seq, header: msg.Header, data: msg.Data})
	}
}

// leaderGet reads one message through the stream leader
// ($JS.API.STREAM.MSG.GET), which sees every acknowledged write; direct
// gets may be answered by a follower that is a few writes behind.
func (m *replyMux) leaderGet(ctx context.Context, stream string, req directGetRequest) (storedMsg, bool, error) {
	var resp struct {
		Message *struct {
			Subject string `json:"subject"`
			Seq     uint64 `json:"seq"`
			Header  []byte `json:"hdrs,omitempty"`
			Data    []byte `json:"data,omitempty"`
		} `json:"message,omitempty"`
		Error *apiError `json:"error,omitempty"`
	}
	if err := m.request(ctx, "$JS.API.STREAM.MSG.GET."+stream, req, &resp); err != nil {
		return storedMsg{}, false, err
	}
	if resp.Error != nil {
		if resp.Error.ErrCode == errCodeMsgNotFound {
			return storedMsg{}, false, nil
		}
		return storedMsg{}, false, resp.Error
	}
	if resp.Message == nil {
		return storedMsg{}, false, fmt.Errorf("jetstream mailbox: message get: empty answer")
	}
	h := nats.Header{}
	if len(resp.Message.Header) > 0 {
		var err error
		if h, err = nats.DecodeHeadersMsg(resp.Message.Header); err != nil {
			return storedMsg{}, false, fmt.Errorf("jetstream mailbox: message get: %w", err)
		}
	}
	return storedMsg{subject: resp.Message.Subject, seq: resp.Message.Seq, header: h, data: resp.Message.Data}, true, nil
}

// deleteMsg removes one message (without overwriting its bytes). It reports
// false when the message was not there (already deleted, or never stored).
func (m *replyMux) deleteMsg(ctx context.Context, stream string, seq uint64) (bool, error) {
	req := struct {
		Seq     uint64 `json:"seq"`
		NoErase bool   `json:"no_erase"`
	}{seq, true}
	var resp struct {
		Success bool      `json:"success"`
		Error   *apiError `json:"error,omitempty"`
	}
	if err := m.request(ctx, "$JS.API.STREAM.MSG.DELETE."+stream, req, &resp); err != nil {
		return false, err
	}
	if resp.Error != nil {
		switch {
		case resp.Error.ErrCode == errCodeSeqNotFound:
			return false, nil
		case resp.Error.ErrCode == errCodeMsgDeleteFailed &&
			(strings.Contains(resp.Error.Description, "found") || strings.Contains(resp.Error.Description, "EOF")):
			return false, nil
		}
		return false, resp.Error
	}
	return resp.Success, nil
}

// serverVersionAtLeast reports whether a "major.minor.patch[-suffix]"
// version is at least major.minor.
func serverVersionAtLeast(v string, major, minor int) bool {
	v, _, _ = strings.Cut(v, "-")
	parts := strings.Split(v, ".")
	if len(parts) < 2 {
		return false
	}
	ma, err1 := strconv.Atoi(parts[0])
	mi, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}
