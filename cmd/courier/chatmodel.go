package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/charmbracelet/bubbles/cursor"
	"github.com/charmbracelet/bubbles/textinput"
	"github.com/charmbracelet/bubbles/viewport"
	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/lipgloss"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// The chat screen is a bubbletea model whose Update is pure: everything it
// does to the world (send, mark read, typing, timers) it asks for through
// chatActions and the after function, inside the commands it returns. The
// live program runs them against the SDK; tests run them against fakes
// and deliver the timer messages themselves.

const (
	// typingIdle is how long after the last keystroke "typing" is withdrawn.
	typingIdle = 3 * time.Second
	// peerTypingExpiry clears a peer's "typing…" that was never withdrawn
	// (the peer went away mid-sentence).
	peerTypingExpiry = 8 * time.Second
)

// chatActions are the chat's effects on the world.
type chatActions interface {
	// Send queues text for the peer and returns its client id at once.
	Send(text string) (client.MessageRef, error)
	// MarkRead tells the peer these messages were read, and records it.
	MarkRead(msgs []client.MessageRef) error
	// SetTyping tells the peer whether this user is typing (best effort).
	SetTyping(typing bool) error
}

// Messages the chat model receives, besides keys and window sizes.
type (
	// eventMsg carries an SDK event that is news for this profile (the
	// store has recorded it).
	eventMsg struct{ ev client.Event }
	// sentMsg reports that a message entered the outbox (or could not).
	sentMsg struct {
		ref  client.MessageRef
		text string
		at   time.Time
		err  error
	}
	// markedMsg reports the outcome of a MarkRead action.
	markedMsg struct{ err error }
	// storeErrMsg reports that the local store failed to record an event.
	storeErrMsg struct{ err error }
	// typingIdleMsg fires typingIdle after keystroke number gen.
	typingIdleMsg struct{ gen int }
	// peerTypingExpiredMsg fires peerTypingExpiry after the peer's typing
	// notice number gen.
	peerTypingExpiredMsg struct{ gen int }
)

// chatLine is one message on screen.
type chatLine struct {
	out    bool // sent by this user
	from   string
	ref    client.MessageRef
	text   string
	at     time.Time
	status client.Status // of a sent message
	failed string        // why a sent message was refused
}

// chatModel is the chat screen's state.
type chatModel struct {
	self, peer string
	act        chatActions
	// after returns a command that delivers msg after d (tea.Tick in the
	// program; a recorder in tests).
	after func(d time.Duration, msg tea.Msg) tea.Cmd
	now   func() time.Time
	loc   *time.Location // of the times shown

	lines []chatLine
	// early holds states of sent messages whose line is not there yet
	// (the acceptance can overtake the outbox's answer), by client id.
	early map[string]client.Status

	input    textinput.Model
	viewport viewport.Model
	width    int
	height   int

	presenceKnown bool
	online        bool
	lastSeen      time.Time
	peerTyping    bool
	peerTypingGen int

	typingSent bool // this user's "typing" is on at the peer
	typingGen  int

	conn    client.ConnState
	retryIn time.Duration
	notice  string
}

func newChatModel(self, peer string, act chatActions, history []localstore.Message) chatModel {
	in := textinput.New()
	in.Placeholder = "message " + peer
	in.Prompt = "> "
	in.CharLimit = 4096
	in.Cursor.SetMode(cursor.CursorStatic)
	in.Focus()
	m := chatModel{
		self: self, peer: peer, act: act,
		after: func(d time.Duration, msg tea.Msg) tea.Cmd {
			return tea.Tick(d, func(time.Time) tea.Msg { return msg })
		},
		now:      time.Now,
		loc:      time.Local,
		early:    map[string]client.Status{},
		input:    in,
		viewport: viewport.New(80, 20),
		conn:     client.Connecting,
	}
	for _, h := range history {
		m.lines = append(m.lines, chatLine{
			out: h.Direction == localstore.Out, from: h.From, ref: h.Ref(),
			text: string(h.Body), at: h.Time, status: h.Status,
		})
	}
	return m
}

// unreadRefs are the peer's messages in history not marked read yet.
func unreadRefs(history []localstore.Message) []client.MessageRef {
	var refs []client.MessageRef
	for _, h := range history {
		if h.Direction == localstore.In && h.ReadAt.IsZero() {
			refs = append(refs, h.Ref())
		}
	}
	return refs
}

func (m chatModel) Init() tea.Cmd { return nil }

func (m chatModel) markRead(refs []client.MessageRef) tea.Cmd {
	if len(refs) == 0 {
		return nil
	}
	act := m.act
	return func() tea.Msg { return markedMsg{err: act.MarkRead(refs)} }
}

func (m chatModel) setTyping(typing bool) tea.Cmd {
	act := m.act
	return func() tea.Msg {
		act.SetTyping(typing) // best effort: offline, the peer simply does not see it
		return nil
	}
}

func (m chatModel) send(text string) tea.Cmd {
	act, now := m.act, m.now
	return func() tea.Msg {
		ref, err := act.Send(text)
		return sentMsg{ref: ref, text: text, at: now(), err: err}
	}
}

// Update applies one message to the chat and returns the effects to run.
func (m chatModel) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	var cmds []tea.Cmd
	switch msg := msg.(type) {
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
		m.input.Width = max(msg.Width-len(m.input.Prompt)-1, 10)
		m.viewport.Width = msg.Width
		m.viewport.Height = max(msg.Height-3, 1) // header, notice, input
	case tea.KeyMsg:
		switch msg.Type {
		case tea.KeyEsc, tea.KeyCtrlC:
			if m.typingSent {
				m.typingSent = false
				return m, tea.Sequence(m.setTyping(false), tea.Quit)
			}
			return m, tea.Quit
		case tea.KeyEnter:
			text := strings.TrimSpace(m.input.Value())
			m.input.Reset()
			if text == "" {
				break
			}
			cmds = append(cmds, m.send(text))
			if m.typingSent {
				m.typingSent = false
				cmds = append(cmds, m.setTyping(false))
			}
		case tea.KeyPgUp, tea.KeyPgDown, tea.KeyUp, tea.KeyDown:
			var cmd tea.Cmd
			m.viewport, cmd = m.viewport.Update(msg)
			return m, cmd
		default:
			before := m.input.Value()
			var cmd tea.Cmd
			m.input, cmd = m.input.Update(msg)
			cmds = append(cmds, cmd)
			if m.input.Value() != before && m.input.Value() != "" {
				m.typingGen++
				if !m.typingSent {
					m.typingSent = true
					cmds = append(cmds, m.setTyping(true))
				}
				cmds = append(cmds, m.after(typingIdle, typingIdleMsg{gen: m.typingGen}))
			}
		}
	case typingIdleMsg:
		if msg.gen == m.typingGen && m.typingSent {
			m.typingSent = false
			cmds = append(cmds, m.setTyping(false))
		}
	case peerTypingExpiredMsg:
		if msg.gen == m.peerTypingGen {
			m.peerTyping = false
		}
	case sentMsg:
		if msg.err != nil {
			m.notice = "not sent: " + msg.err.Error()
			break
		}
		st := client.StatusPending
		if early, ok := m.early[msg.ref.ClientMsgID]; ok {
			st = early
			delete(m.early, msg.ref.ClientMsgID)
		}
		m.lines = append(m.lines, chatLine{out: true, from: m.self, ref: msg.ref, text: msg.text, at: msg.at, status: st})
	case markedMsg:
		if msg.err != nil {
			m.notice = "read receipts not sent (courier read will retry): " + msg.err.Error()
		}
	case storeErrMsg:
		m.notice = "local store: " + msg.err.Error()
	case noticeMsg:
		m.notice = msg.text
	case eventMsg:
		cmds = append(cmds, m.applyEvent(msg.ev))
	}
	m.refresh()
	return m, tea.Batch(cmds...)
}

// applyEvent folds an SDK event into the chat.
func (m *chatModel) applyEvent(ev client.Event) tea.Cmd {
	switch ev := ev.(type) {
	case *client.MessageEvent:
		switch {
		case ev.Group != "":
			if !ev.Sync {
				m.notice = "new group message from " + ev.From
			}
		case !ev.Sync && ev.From == m.peer:
			m.lines = append(m.lines, chatLine{from: ev.From, ref: client.MessageRef{ServerID: ev.ServerID, ClientMsgID: ev.ClientMsgID},
				text: text(ev.Body, ev.Err), at: ev.Time})
			m.peerTyping = false
			// On screen now: read.
			return m.markRead([]client.MessageRef{{ServerID: ev.ServerID, ClientMsgID: ev.ClientMsgID}})
		case ev.Sync && ev.To == m.peer:
			m.lines = append(m.lines, chatLine{out: true, from: ev.From, ref: client.MessageRef{ServerID: ev.ServerID, ClientMsgID: ev.ClientMsgID},
				text: text(ev.Body, ev.Err), at: ev.Time, status: client.StatusSent})
		case !ev.Sync:
			m.notice = "new message from " + ev.From
		}
	case *client.ReceiptEvent:
		if i := m.find(ev.Message); i >= 0 {
			l := &m.lines[i]
			l.status = max(l.status, ev.Status)
			if l.ref.ServerID == "" {
				l.ref.ServerID = ev.Message.ServerID
			}
		} else if ev.Message.ClientMsgID != "" {
			m.early[ev.Message.ClientMsgID] = max(m.early[ev.Message.ClientMsgID], ev.Status)
		}
	case *client.SendFailedEvent:
		if i := m.find(ev.Message); i >= 0 {
			m.lines[i].failed = ev.Err.Error()
		} else {
			m.notice = "not sent: " + ev.Err.Error()
		}
	case *client.PresenceEvent:
		if ev.User == m.peer {
			m.presenceKnown, m.online, m.lastSeen = true, ev.Online, ev.LastSeen
			if !ev.Online {
				m.peerTyping = false
			}
		}
	case *client.TypingEvent:
		if ev.From == m.peer {
			m.peerTyping = ev.Typing
			m.peerTypingGen++
			if ev.Typing {
				return m.after(peerTypingExpiry, peerTypingExpiredMsg{gen: m.peerTypingGen})
			}
		}
	case *client.ConnectionEvent:
		m.conn, m.retryIn = ev.State, ev.RetryIn
		if ev.Err != nil {
			m.notice = "connection: " + ev.Err.Error()
		} else if ev.State == client.Connected {
			m.notice = ""
		}
	}
	return nil
}

// find returns the index of the sent message with ref's ids, or -1.
func (m *chatModel) find(ref client.MessageRef) int {
	for i := len(m.lines) - 1; i >= 0; i-- {
		l := m.lines[i]
		if !l.out {
			continue
		}
		if (ref.ServerID != "" && l.ref.ServerID == ref.ServerID) || (ref.ClientMsgID != "" && l.ref.ClientMsgID == ref.ClientMsgID) {
			return i
		}
	}
	return -1
}

var (
	dimStyle    = lipgloss.NewStyle().Foreground(lipgloss.Color("8"))
	readStyle   = lipgloss.NewStyle().Foreground(lipgloss.Color("39")).Bold(true)
	failStyle   = lipgloss.NewStyle().Foreground(lipgloss.Color("9"))
	headerStyle = lipgloss.NewStyle().Bold(true)
	peerStyle   = lipgloss.NewStyle().Foreground(lipgloss.Color("5")).Bold(true)
	selfStyle   = lipgloss.NewStyle().Foreground(lipgloss.Color("2")).Bold(true)
)

// mark is a sent message's receipt state: … pending, ✓ sent, ✓✓
// delivered, ✓✓ read (coloured).
func mark(l chatLine) string {
	if l.failed != "" {
		return failStyle.Render("✗ not sent: " + l.failed)
	}
	switch l.status {
	case client.StatusPending:
		return dimStyle.Render("…")
	case client.StatusSent:
		return dimStyle.Render("✓")
	case client.StatusDelivered:
		return dimStyle.Render("✓✓")
	case client.StatusRead:
		return readStyle.Render("✓✓ read")
	}
	return ""
}

func (m *chatModel) refresh() {
	atBottom := m.viewport.AtBottom()
	var b strings.Builder
	width := max(m.viewport.Width, 20)
	for i, l := range m.lines {
		if i > 0 {
			b.WriteByte('\n')
		}
		who := peerStyle.Render(l.from)
		if l.out {
			who = selfStyle.Render("you")
		}
		line := dimStyle.Render(l.at.In(m.loc).Format("15:04")) + "  " + who + ": " + l.text
		if l.out {
			line += "  " + mark(l)
		}
		b.WriteString(lipgloss.NewStyle().Width(width).Render(line))
	}
	m.viewport.SetContent(b.String())
	if atBottom {
		m.viewport.GotoBottom()
	}
}

// header is the first line: the peer, their presence or typing, and the
// connection when it is not up.
func (m chatModel) header() string {
	h := headerStyle.Render(m.peer)
	switch {
	case m.peerTyping:
		h += " · typing…"
	case m.presenceKnown && m.online:
		h += " · online"
	case m.presenceKnown && !m.lastSeen.IsZero():
		h += " · last seen " + lastSeen(m.lastSeen, m.now(), m.loc)
	case m.presenceKnown:
		h += " · offline"
	}
	switch m.conn {
	case client.Connecting:
		h += dimStyle.Render("  (connecting…)")
	case client.Disconnected:
		s := "  (offline"
		if m.retryIn > 0 {
			s += fmt.Sprintf(", retrying in %v", m.retryIn.Round(time.Second))
		}
		h += dimStyle.Render(s + ")")
	}
	return h
}

func (m chatModel) View() string {
	return m.header() + "\n" + m.viewport.View() + "\n" + dimStyle.Render(m.notice) + "\n" + m.input.View()
}
