package client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// errDisconnected fails a request whose connection ended before the reply
// came; callers retry over HTTP or on the next connection.
var errDisconnected = errors.New("courier: connection lost")

// WebSocket close codes the server uses besides the standard ones.
const (
	closeSuperseded   websocket.StatusCode = 4001
	closeUnauthorized websocket.StatusCode = 4003
)

// session is one WebSocket connection, from Hello to close.
type session struct {
	c     *Client
	ws    *websocket.Conn
	hello *courierv1.Hello

	nextID   atomic.Uint64
	lastRecv atomic.Int64 // unix nanos of the last frame received
	synced   atomic.Bool  // the server has sent Synced

	mu      sync.Mutex
	waiters map[uint64]chan *courierv1.ServerFrame
	ended   bool
	reason  error // why the connection ends, if known before it does

	done chan struct{} // closed when the session has ended
}

// dial opens a connection and reads the server's Hello.
func (c *Client) dial(ctx context.Context) (*session, error) {
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, c.wsURL, &websocket.DialOptions{
		HTTPClient:      c.cfg.HTTPClient,
		HTTPHeader:      http.Header{"Authorization": []string{c.api.auth}},
		CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			return nil, fmt.Errorf("courier: connect: %w", responseError(resp))
		}
		return nil, fmt.Errorf("courier: connect: %w", err)
	}
	ws.SetReadLimit(1 << 20)
	typ, data, err := ws.Read(ctx)
	if err != nil {
		ws.CloseNow()
		return nil, fmt.Errorf("courier: connect: waiting for hello: %w", err)
	}
	var f courierv1.ServerFrame
	if typ != websocket.MessageBinary || proto.Unmarshal(data, &f) != nil {
		ws.Close(websocket.StatusProtocolError, "expected a binary ServerFrame")
		return nil, errors.New("courier: connect: the server's first frame is not a ServerFrame")
	}
	if e := f.GetError(); e != nil {
		ws.CloseNow()
		return nil, fmt.Errorf("courier: connect: %w", errorFromFrame(e))
	}
	hello := f.GetHello()
	if hello == nil {
		ws.Close(websocket.StatusProtocolError, "expected hello")
		return nil, errors.New("courier: connect: the server did not say hello")
	}
	// Server frames carry one payload each, well under the client frame
	// limit the server announces; keep that as the bound, with room for
	// the envelope.
	limit := int64(8 << 20)
	if hello.MaxFrameBytes > 0 {
		limit = int64(hello.MaxFrameBytes) + 64<<10
	}
	ws.SetReadLimit(limit)
	s := &session{
		c:       c,
		ws:      ws,
		hello:   hello,
		waiters: map[uint64]chan *courierv1.ServerFrame{},
		done:    make(chan struct{}),
	}
	s.lastRecv.Store(time.Now().UnixNano())
	return s, nil
}

// readLoop reads frames until the connection fails or closes.
func (s *session) readLoop() error {
	for {
		typ, data, err := s.ws.Read(context.Background())
		if err != nil {
			return err
		}
		s.lastRecv.Store(time.Now().UnixNano())
		if typ != websocket.MessageBinary {
			s.c.log.Warn("ignoring a text frame from the server")
			continue
		}
		f := new(courierv1.ServerFrame)
		if err := proto.Unmarshal(data, f); err != nil {
			s.c.log.Warn("ignoring an undecodable frame from the server", "err", err)
			continue
		}
		s.handle(f)
	}
}

func (s *session) handle(f *courierv1.ServerFrame) {
	if f.Id != 0 {
		s.mu.Lock()
		ch := s.waiters[f.Id]
		delete(s.waiters, f.Id)
		s.mu.Unlock()
		if ch != nil {
			ch <- f
		} else if e := f.GetError(); e != nil {
			s.c.log.Warn("server error for a frame", "id", f.Id, "err", errorFromFrame(e))
		}
		return
	}
	switch b := f.Body.(type) {
	case *courierv1.ServerFrame_Deliver:
		s.c.events.push(dispatchItem{sess: s, seq: b.Deliver.GetSeq(), env: b.Deliver.GetEnvelope()})
	case *courierv1.ServerFrame_Synced:
		s.synced.Store(true)
		s.c.events.push(dispatchItem{sess: s, synced: b.Synced})
	case *courierv1.ServerFrame_Presence:
		p := b.Presence
		s.c.emit(&PresenceEvent{User: p.GetUser(), Online: p.GetOnline(), LastSeen: timeMs(p.GetLastSeenMs())})
	case *courierv1.ServerFrame_Typing:
		t := b.Typing
		s.c.emit(&TypingEvent{From: t.GetFrom(), FromDevice: t.GetFromDevice(), Typing: t.GetTyping()})
	case *courierv1.ServerFrame_Error:
		err := errorFromFrame(b.Error)
		switch err.Code {
		case CodeInvalid, CodeRateLimited, CodeUnknownUser:
			// About a frame of ours; the connection stays open.
			s.c.log.Warn("the server rejected a frame", "err", err)
		default:
			// Why the server is closing the connection.
			s.setReason(err)
		}
	default:
		s.c.log.Debug("ignoring an unexpected frame", "frame", f)
	}
}

// setReason records why the connection is ending, keeping the first.
func (s *session) setReason(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.reason == nil {
		s.reason = err
	}
}

// end marks the session over and fails every request waiting for a reply,
// and returns why it ended: the reason the server gave, if any, else
// readErr.
func (s *session) end(readErr error) error {
	s.mu.Lock()
	s.ended = true
	for id, ch := range s.waiters {
		close(ch)
		delete(s.waiters, id)
	}
	reason := s.reason
	s.mu.Unlock()
	close(s.done)
	s.ws.CloseNow()
	if reason != nil {
		return reason
	}
	switch websocket.CloseStatus(readErr) {
	case closeSuperseded:
		return &RefusedError{Code: CodeSuperseded, Message: "this device connected again elsewhere"}
	case closeUnauthorized:
		return &RefusedError{Code: CodeUnauthorized, Message: "the connection was closed as unauthorized"}
	case websocket.StatusGoingAway:
		return &RefusedError{Code: CodeShuttingDown, Message: "the server is going away"}
	}
	return fmt.Errorf("courier: connection lost: %w", readErr)
}

// write sends one frame. Writes are bounded by writeTimeout, never by the
// caller's context: a write cut short would close the connection.
func (s *session) write(f *courierv1.ClientFrame) error {
	b, err := proto.Marshal(f)
	if err != nil {
		return fmt.Errorf("courier: encode frame: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), writeTimeout)
	defer cancel()
	if err := s.ws.Write(ctx, websocket.MessageBinary, b); err != nil {
		return fmt.Errorf("%w: %w", errDisconnected, err)
	}
	return nil
}

// call sends f with a fresh id and waits for the reply. It fails with
// errDisconnected if the connection ends first.
func (s *session) call(ctx context.Context, f *courierv1.ClientFrame) (*courierv1.ServerFrame, error) {
	id := s.nextID.Add(1)
	f.Id = id
	ch := make(chan *courierv1.ServerFrame, 1)
	s.mu.Lock()
	if s.ended {
		s.mu.Unlock()
		return nil, errDisconnected
	}
	s.waiters[id] = ch
	s.mu.Unlock()
	forget := func() {
		s.mu.Lock()
		delete(s.waiters, id)
		s.mu.Unlock()
	}
	if err := s.write(f); err != nil {
		forget()
		return nil, err
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return nil, errDisconnected
		}
		return r, nil
	case <-ctx.Done():
		forget()
		return nil, ctx.Err()
	}
}

// request sends f and waits for Ok; an Error reply is a *RefusedError.
func (s *session) request(ctx context.Context, f *courierv1.ClientFrame) error {
	r, err := s.call(ctx, f)
	if err != nil {
		return err
	}
	switch b := r.Body.(type) {
	case *courierv1.ServerFrame_Ok:
		return nil
	case *courierv1.ServerFrame_Error:
		return errorFromFrame(b.Error)
	}
	return fmt.Errorf("courier: unexpected reply %T", r.Body)
}

// send offers one message and returns the server's acceptance, or the
// refusal as a *RefusedError. first is the message's firstTry.
func (s *session) send(ctx context.Context, clientMsgID, to string, payloads []devicePayload, first *firstTry) (Sent, error) {
	msg := &courierv1.Send{ClientMsgId: clientMsgID, To: to, Payloads: make([]*courierv1.DevicePayload, len(payloads))}
	for i, p := range payloads {
		if max := s.hello.GetMaxPayloadBytes(); max > 0 && len(p.data) > int(max) {
			return Sent{}, &RefusedError{Code: CodePayloadTooLarge,
				Message: fmt.Sprintf("payload for %s is %d bytes; the server's limit is %d", p.to, len(p.data), max)}
		}
		msg.Payloads[i] = &courierv1.DevicePayload{
			Device:  &courierv1.DeviceAddress{User: p.to.User, Device: p.to.ID},
			Payload: p.data,
		}
	}
	f := &courierv1.ClientFrame{Body: &courierv1.ClientFrame_Send{Send: msg}}
	return s.offer(ctx, clientMsgID, f, first)
}

// offer sends a Send frame and returns the server's acceptance, or the
// refusal as a *RefusedError. It sets the frame's first_attempt from
// first (see firstTry) once nothing but the write is left.
func (s *session) offer(ctx context.Context, clientMsgID string, f *courierv1.ClientFrame, first *firstTry) (Sent, error) {
	if max := s.hello.GetMaxFrameBytes(); max > 0 && proto.Size(f) > int(max) {
		// The server would close the connection over it.
		return Sent{}, &RefusedError{Code: CodePayloadTooLarge,
			Message: fmt.Sprintf("the message is larger than the server's %d-byte frame limit", max)}
	}
	f.GetSend().FirstAttempt = first.take()
	r, err := s.call(ctx, f)
	if err != nil {
		return Sent{}, err
	}
	switch b := r.Body.(type) {
	case *courierv1.ServerFrame_Accepted:
		a := b.Accepted
		return Sent{
			MessageRef: MessageRef{ServerID: a.GetServerId(), ClientMsgID: clientMsgID},
			Time:       timeMs(a.GetServerTimeMs()),
			Duplicate:  a.GetDuplicate(),
		}, nil
	case *courierv1.ServerFrame_Refused:
		return Sent{}, refusedFromFrame(b.Refused)
	case *courierv1.ServerFrame_Error:
		return Sent{}, errorFromFrame(b.Error)
	}
	return Sent{}, fmt.Errorf("courier: unexpected reply to send: %T", r.Body)
}

// ack acknowledges entries and waits for the server's Ok.
func (s *session) ack(seqs []uint64) error {
	ctx, cancel := context.WithTimeout(context.Background(), ackTimeout)
	defer cancel()
	return s.request(ctx, &courierv1.ClientFrame{Body: &courierv1.ClientFrame_Ack{Ack: &courierv1.Ack{Seqs: seqs}}})
}

func (s *session) subscribe(ctx context.Context, users []string) error {
	return s.request(ctx, &courierv1.ClientFrame{Body: &courierv1.ClientFrame_Subscribe{
		Subscribe: &courierv1.Subscribe{Users: users}}})
}

// pinger pings every interval, and closes the connection when nothing at
// all has arrived for two intervals (a pong would have).
func (s *session) pinger(interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-s.done:
			return
		}
		if silent := time.Since(time.Unix(0, s.lastRecv.Load())); silent >= 2*interval {
			s.setReason(fmt.Errorf("courier: connection dead: nothing received for %v", silent.Round(time.Millisecond)))
			s.ws.CloseNow()
			return
		}
		// The Pong is matched by no one: any frame proves the connection.
		f := &courierv1.ClientFrame{Id: s.nextID.Add(1), Body: &courierv1.ClientFrame_Ping{
			Ping: &courierv1.Ping{ClientTimeMs: time.Now().UnixMilli()}}}
		if err := s.write(f); err != nil {
			return
		}
	}
}
