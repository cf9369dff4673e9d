package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// chatHistory is how many stored messages the chat shows on opening.
const chatHistory = 50

func runChat(ctx context.Context, args []string) error {
	return cmdChat(ctx, stdStreams(), args)
}

func cmdChat(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "chat", "USER",
		"An interactive chat with USER: recent history, live messages (marked read as\nthey are shown), ✓ sent / ✓✓ delivered / ✓✓ read on what you send, typing\nand presence. Enter sends; Esc or Ctrl-C quits.")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return badUsage(st, fs, "need exactly one USER")
	}
	peer := fs.Arg(0)
	p, err := loadProfile(*home)
	if err != nil {
		return err
	}
	if peer == p.creds.User {
		return fmt.Errorf("chat with yourself: use 'courier send %s' from another device", peer)
	}
	store, err := p.openStore()
	if err != nil {
		return err
	}
	defer store.Close()
	history, err := store.Recent(peer, chatHistory)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	live := &liveChat{ctx: ctx, store: store, peer: peer}
	model := newChatModel(p.creds.User, peer, live, history)
	prog := tea.NewProgram(model, tea.WithAltScreen(), tea.WithContext(ctx), tea.WithOutput(st.out))

	// The SDK's events are recorded first, then shown: what is on screen
	// is in the store, and only then acknowledged.
	out := &chatSink{store: store, send: prog.Send}
	// Log lines would tear the screen: only if $COURIER_LOG asks for them.
	var logw io.Writer = io.Discard
	if os.Getenv("COURIER_LOG") != "" {
		logw = st.err
	}
	// Notices of the encryption layer go to the notice line.
	nw := noticeWriter(prog.Send)
	p.notices = &nw
	c, eng, err := p.newClient(ctx, streams{out: st.out, err: logw}, store, out.handle)
	if err != nil {
		return err
	}
	defer eng.Close()
	defer c.Close()
	live.c = c
	if err := c.Subscribe(ctx, peer); err != nil {
		return err
	}
	runErr := make(chan error, 1)
	go func() {
		err := c.Run(ctx)
		if err != nil {
			prog.Send(eventMsg{&client.ConnectionEvent{State: client.Disconnected, Err: err}})
		}
		runErr <- err
	}()
	if refs := unreadRefs(history); len(refs) > 0 {
		go prog.Send(markedMsg{err: live.MarkRead(refs)})
	}

	_, progErr := prog.Run()
	typingCtx, done := context.WithTimeout(context.Background(), time.Second)
	c.SetTyping(typingCtx, peer, false)
	done()
	cancel()
	err = <-runErr
	if progErr != nil && !errors.Is(progErr, tea.ErrProgramKilled) {
		return progErr
	}
	return explainRun(err)
}

// liveChat is chatActions against the SDK and the store.
type liveChat struct {
	ctx   context.Context
	c     *client.Client
	store *localstore.Store
	peer  string
}

func (l *liveChat) Send(text string) (client.MessageRef, error) {
	// The store's outbox records the message in history as it is queued.
	return l.c.SendAsync(l.peer, []byte(text))
}

func (l *liveChat) MarkRead(refs []client.MessageRef) error {
	if err := l.c.MarkRead(l.ctx, l.peer, refs...); err != nil {
		return err
	}
	ids := make([]string, len(refs))
	for i, r := range refs {
		ids[i] = r.ServerID
	}
	return l.store.MarkRead(ids, time.Now())
}

func (l *liveChat) SetTyping(typing bool) error {
	ctx, cancel := context.WithTimeout(l.ctx, 5*time.Second)
	defer cancel()
	return l.c.SetTyping(ctx, l.peer, typing)
}

// chatSink records the SDK's events and passes on to the screen those
// that are news, and the store's failures.
type chatSink struct {
	store *localstore.Store
	send  func(tea.Msg)
}

func (s *chatSink) handle(ev client.Event) {
	var err error
	news := true
	switch ev := ev.(type) {
	case *client.MessageEvent:
		if ev.Err == nil { // an undecryptable message is shown, and kept when it is resent
			news, err = s.store.RecordReceived(ev)
		}
	case *client.ReceiptEvent:
		_, news, err = applyReceipt(s.store, ev)
	case *client.SendFailedEvent:
		err = s.store.DropUnsent(ev.Message.ClientMsgID)
	}
	if err != nil {
		s.send(storeErrMsg{err})
	}
	if news || err != nil {
		s.send(eventMsg{ev})
	}
}

// noticeMsg is a line for the chat's notice line.
type noticeMsg struct{ text string }

// noticeWriter shows what is written to it on the chat's notice line.
type noticeWriter func(tea.Msg)

func (w *noticeWriter) Write(b []byte) (int, error) {
	text := strings.TrimSpace(strings.ReplaceAll(strings.Trim(string(b), "!\n"), "\n", " "))
	if text != "" {
		(*w)(noticeMsg{text: text})
	}
	return len(b), nil
}
