package main

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// fakeChat records the chat's actions.
type fakeChat struct {
	sent    []string
	read    [][]client.MessageRef
	typing  []bool
	nextID  int
	sendErr error
}

func (f *fakeChat) Send(text string) (client.MessageRef, error) {
	if f.sendErr != nil {
		return client.MessageRef{}, f.sendErr
	}
	f.sent = append(f.sent, text)
	f.nextID++
	return client.MessageRef{ClientMsgID: "c" + string(rune('0'+f.nextID))}, nil
}

func (f *fakeChat) MarkRead(refs []client.MessageRef) error {
	f.read = append(f.read, refs)
	return nil
}

func (f *fakeChat) SetTyping(typing bool) error {
	f.typing = append(f.typing, typing)
	return nil
}

// chatHarness plays bubbletea's runtime for the model: it runs the
// commands Update returns and feeds their messages back, except timers,
// which it keeps for the test to deliver.
type chatHarness struct {
	t      *testing.T
	m      chatModel
	act    *fakeChat
	timers []tea.Msg
	quit   bool
}

func newChatHarness(t *testing.T, history []localstore.Message) *chatHarness {
	h := &chatHarness{t: t, act: &fakeChat{}}
	h.m = newChatModel("alice", "bob", h.act, history)
	h.m.now = func() time.Time { return t0 }
	h.m.loc = time.UTC
	h.m.after = func(_ time.Duration, msg tea.Msg) tea.Cmd {
		return func() tea.Msg {
			h.timers = append(h.timers, msg)
			return nil
		}
	}
	h.do(tea.WindowSizeMsg{Width: 100, Height: 20})
	return h
}

func (h *chatHarness) do(msg tea.Msg) {
	model, cmd := h.m.Update(msg)
	h.m = model.(chatModel)
	h.run(cmd)
}

func (h *chatHarness) run(cmd tea.Cmd) {
	if cmd == nil {
		return
	}
	switch msg := cmd().(type) {
	case nil:
	case tea.QuitMsg:
		h.quit = true
	case tea.BatchMsg:
		for _, c := range msg {
			h.run(c)
		}
	default:
		// tea.Sequence's message is unexported: a slice of commands.
		if v := reflect.ValueOf(msg); v.Kind() == reflect.Slice && v.Type().Elem() == reflect.TypeOf(tea.Cmd(nil)) {
			for i := range v.Len() {
				h.run(v.Index(i).Interface().(tea.Cmd))
			}
			return
		}
		h.do(msg)
	}
}

func (h *chatHarness) typeText(s string) {
	for _, r := range s {
		h.do(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{r}})
	}
}

func (h *chatHarness) view() string { return h.m.View() }

func (h *chatHarness) mustShow(what string) {
	h.t.Helper()
	if !strings.Contains(h.view(), what) {
		h.t.Fatalf("screen lacks %q:\n%s", what, h.view())
	}
}

func (h *chatHarness) mustNotShow(what string) {
	h.t.Helper()
	if strings.Contains(h.view(), what) {
		h.t.Fatalf("screen shows %q:\n%s", what, h.view())
	}
}

func receipt(ref client.MessageRef, st client.Status) eventMsg {
	return eventMsg{&client.ReceiptEvent{Message: ref, To: "bob", Status: st, By: "bob", Time: t0}}
}

func TestChatSendShowsReceiptsLive(t *testing.T) {
	h := newChatHarness(t, nil)
	h.typeText("hi bob")
	if len(h.act.typing) != 1 || !h.act.typing[0] {
		t.Fatalf("typing sent %v after keystrokes, want one true", h.act.typing)
	}
	h.do(tea.KeyMsg{Type: tea.KeyEnter})
	if len(h.act.sent) != 1 || h.act.sent[0] != "hi bob" {
		t.Fatalf("sent %q", h.act.sent)
	}
	if len(h.act.typing) != 2 || h.act.typing[1] {
		t.Fatalf("typing %v after sending, want true then false", h.act.typing)
	}
	if h.m.input.Value() != "" {
		t.Fatalf("input not cleared: %q", h.m.input.Value())
	}
	h.mustShow("you: hi bob  …")

	ref := client.MessageRef{ServerID: "S1", ClientMsgID: "c1"}
	h.do(receipt(ref, client.StatusSent))
	h.mustShow("hi bob  ✓")
	h.mustNotShow("✓✓")
	h.do(receipt(client.MessageRef{ServerID: "S1"}, client.StatusDelivered))
	h.mustShow("hi bob  ✓✓")
	h.mustNotShow("read")
	h.do(receipt(ref, client.StatusRead))
	h.mustShow("hi bob  ✓✓ read")
	h.do(receipt(ref, client.StatusDelivered)) // late
	h.mustShow("hi bob  ✓✓ read")

	// An empty line sends nothing.
	h.do(tea.KeyMsg{Type: tea.KeyEnter})
	if len(h.act.sent) != 1 {
		t.Fatalf("an empty line was sent: %q", h.act.sent)
	}
}

// The acceptance can reach the screen before the outbox's answer does.
func TestChatEarlyAcceptance(t *testing.T) {
	h := newChatHarness(t, nil)
	h.do(receipt(client.MessageRef{ServerID: "S1", ClientMsgID: "c7"}, client.StatusDelivered))
	h.do(sentMsg{ref: client.MessageRef{ClientMsgID: "c7"}, text: "fast", at: t0})
	h.mustShow("fast  ✓✓")
	if len(h.m.early) != 0 {
		t.Fatalf("early states kept: %v", h.m.early)
	}
}

func TestChatIncomingIsMarkedRead(t *testing.T) {
	h := newChatHarness(t, nil)
	h.do(eventMsg{&client.TypingEvent{From: "bob", Typing: true}})
	h.mustShow("bob · typing…")
	h.do(eventMsg{&client.MessageEvent{ServerID: "S5", ClientMsgID: "b5", From: "bob", To: "alice", Time: t0, Body: []byte("dinner at 8?")}})
	h.mustShow("15:04  bob: dinner at 8?")
	h.mustNotShow("typing…")
	if len(h.act.read) != 1 || h.act.read[0][0] != (client.MessageRef{ServerID: "S5", ClientMsgID: "b5"}) {
		t.Fatalf("marked read %v", h.act.read)
	}
	// Someone else's message is not shown in this chat, nor marked read.
	h.do(eventMsg{&client.MessageEvent{ServerID: "S6", From: "carol", To: "alice", Time: t0, Body: []byte("psst")}})
	h.mustNotShow("psst")
	h.mustShow("new message from carol")
	if len(h.act.read) != 1 {
		t.Fatalf("carol's message was marked read")
	}
	// A copy of what alice sent bob from another device shows as hers.
	h.do(eventMsg{&client.MessageEvent{ServerID: "S7", From: "alice", FromDevice: 2, To: "bob", Sync: true, Time: t0, Body: []byte("from my phone")}})
	h.mustShow("you: from my phone  ✓")
}

func TestChatTypingIdle(t *testing.T) {
	h := newChatHarness(t, nil)
	h.typeText("ab")
	if len(h.timers) != 2 {
		t.Fatalf("timers %v, want one per keystroke", h.timers)
	}
	h.do(h.timers[0]) // stale: a later keystroke came
	if len(h.act.typing) != 1 {
		t.Fatalf("typing %v after a stale idle timer", h.act.typing)
	}
	h.do(h.timers[1])
	if len(h.act.typing) != 2 || h.act.typing[1] {
		t.Fatalf("typing %v after the idle timer, want true then false", h.act.typing)
	}
	h.typeText("c")
	if len(h.act.typing) != 3 || !h.act.typing[2] {
		t.Fatalf("typing %v after typing again", h.act.typing)
	}
	// Quitting withdraws it too.
	h.do(tea.KeyMsg{Type: tea.KeyEsc})
	if !h.quit || len(h.act.typing) != 4 || h.act.typing[3] {
		t.Fatalf("quit=%v typing=%v", h.quit, h.act.typing)
	}
}

func TestChatPeerTypingExpires(t *testing.T) {
	h := newChatHarness(t, nil)
	h.do(eventMsg{&client.TypingEvent{From: "bob", Typing: true}})
	h.do(eventMsg{&client.TypingEvent{From: "bob", Typing: true}})
	h.mustShow("typing…")
	h.do(h.timers[0]) // superseded by the second notice
	h.mustShow("typing…")
	h.do(h.timers[1])
	h.mustNotShow("typing…")
}

func TestChatPresenceAndConnection(t *testing.T) {
	h := newChatHarness(t, nil)
	h.mustShow("(connecting…)")
	h.do(eventMsg{&client.ConnectionEvent{State: client.Connected}})
	h.mustNotShow("connecting")
	h.do(eventMsg{&client.PresenceEvent{User: "bob", Online: true}})
	h.mustShow("bob · online")
	h.do(eventMsg{&client.PresenceEvent{User: "bob", LastSeen: t0.Add(-time.Minute)}})
	h.mustShow("bob · last seen 15:03:05")
	h.do(eventMsg{&client.PresenceEvent{User: "carol", Online: true}})
	h.mustShow("bob · last seen")
	h.do(eventMsg{&client.ConnectionEvent{State: client.Disconnected, Err: errors.New("connection refused"), RetryIn: 2 * time.Second}})
	h.mustShow("(offline, retrying in 2s)")
	h.mustShow("connection refused")
}

func TestChatFailuresAndHistory(t *testing.T) {
	history := []localstore.Message{
		{ServerID: "S1", ClientMsgID: "b1", Direction: localstore.In, From: "bob", Peer: "bob", Body: []byte("earlier"), Time: t0, Status: client.StatusDelivered},
		{ServerID: "S2", ClientMsgID: "a1", Direction: localstore.Out, From: "alice", Peer: "bob", Body: []byte("my answer"), Time: t0, Status: client.StatusRead},
	}
	h := newChatHarness(t, history)
	h.mustShow("bob: earlier")
	h.mustShow("you: my answer  ✓✓ read")
	if refs := unreadRefs(history); len(refs) != 1 || refs[0].ServerID != "S1" {
		t.Fatalf("unread in history: %v", refs)
	}

	h.typeText("to nobody")
	h.do(tea.KeyMsg{Type: tea.KeyEnter})
	h.do(eventMsg{&client.SendFailedEvent{Message: client.MessageRef{ClientMsgID: "c1"}, To: "bob", Err: errors.New("refused")}})
	h.mustShow("to nobody  ✗ not sent: refused")

	h.act.sendErr = errors.New("outbox full")
	h.typeText("x")
	h.do(tea.KeyMsg{Type: tea.KeyEnter})
	h.mustShow("not sent: outbox full")

	h.do(storeErrMsg{errors.New("disk full")})
	h.mustShow("local store: disk full")
}
