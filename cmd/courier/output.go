package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// printer writes events as text lines for people, or with --json as one
// JSON object per line for programs.
type printer struct {
	w    io.Writer
	json bool
	now  func() time.Time // for presence and typing lines, which carry no time
	loc  *time.Location   // of the times in text lines
	// label names a group for display ("#name"); nil: "#" and its id.
	label func(id string) string
}

// groupLabel shows group id as "#name" when its name is known.
func (p *printer) groupLabel(id string) string {
	if p.label != nil {
		return p.label(id)
	}
	return client.GroupPeer(id)
}

// storeLabels labels groups with their names from the store.
func storeLabels(store *localstore.Store) func(string) string {
	return func(id string) string {
		if g, ok, err := store.LoadGroup(id); err == nil && ok {
			return g.Label()
		}
		return client.GroupPeer(id)
	}
}

func newPrinter(w io.Writer, asJSON bool) *printer {
	return &printer{w: w, json: asJSON, now: time.Now, loc: time.Local}
}

// The JSON lines. Times are RFC 3339 with nanoseconds, in UTC.
type (
	jsonMessage struct {
		Type        string `json:"type"` // "message"
		ServerID    string `json:"server_id"`
		ClientMsgID string `json:"client_msg_id"`
		From        string `json:"from"`
		FromDevice  uint32 `json:"from_device"`
		To          string `json:"to"`
		Group       string `json:"group,omitempty"`      // a group message: the group's id
		GroupName   string `json:"group_name,omitempty"` // and its name, if known
		Time        string `json:"time"`
		Text        string `json:"text"`
		Sync        bool   `json:"sync,omitempty"` // sent by another device of this user
		Error       string `json:"error,omitempty"`
	}
	jsonReceipt struct {
		Type        string `json:"type"` // "receipt"
		ServerID    string `json:"server_id"`
		ClientMsgID string `json:"client_msg_id,omitempty"`
		From        string `json:"from,omitempty"` // the user whose device produced it
		FromDevice  uint32 `json:"from_device,omitempty"`
		To          string `json:"to,omitempty"` // the user the message was sent to
		Group       string `json:"group,omitempty"`
		Time        string `json:"time"`
		Status      string `json:"status"`         // sent, delivered or read
		Text        string `json:"text,omitempty"` // the message's text, if stored here
	}
	jsonSent struct {
		Type        string `json:"type"` // "sent"
		ServerID    string `json:"server_id"`
		ClientMsgID string `json:"client_msg_id"`
		From        string `json:"from"`
		FromDevice  uint32 `json:"from_device"`
		To          string `json:"to"`
		Time        string `json:"time"`
		Text        string `json:"text"`
		Duplicate   bool   `json:"duplicate"`
	}
	jsonFailed struct {
		Type        string `json:"type"` // "failed"
		ClientMsgID string `json:"client_msg_id"`
		To          string `json:"to"`
		Error       string `json:"error"`
	}
	jsonGroup struct {
		Type    string   `json:"type"` // "group"
		Group   string   `json:"group"`
		Name    string   `json:"name,omitempty"`
		Version uint64   `json:"version"`
		By      string   `json:"by,omitempty"`
		Added   []string `json:"added,omitempty"`
		Removed []string `json:"removed,omitempty"`
		Renamed bool     `json:"renamed,omitempty"`
		Time    string   `json:"time,omitempty"`
	}
	jsonPresence struct {
		Type     string `json:"type"` // "presence"
		User     string `json:"user"`
		Online   bool   `json:"online"`
		LastSeen string `json:"last_seen,omitempty"`
	}
	jsonTyping struct {
		Type       string `json:"type"` // "typing"
		From       string `json:"from"`
		FromDevice uint32 `json:"from_device"`
		Typing     bool   `json:"typing"`
	}
)

func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func (p *printer) clock(t time.Time) string { return t.In(p.loc).Format("15:04:05") }

func (p *printer) emitJSON(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fmt.Fprintf(p.w, `{"type":"error","error":%q}`+"\n", err.Error())
		return
	}
	p.w.Write(append(b, '\n'))
}

// text returns a message body for display: the text, or why there is none.
func text(body []byte, err error) string {
	if err != nil {
		return "[cannot open this message: " + err.Error() + "]"
	}
	return string(body)
}

// indent aligns the continuation lines of a multi-line body under its
// first line.
func indent(s string, width int) string {
	return strings.ReplaceAll(s, "\n", "\n"+strings.Repeat(" ", width))
}

// quote shortens a body for a receipt line.
func quote(body []byte) string {
	s := strings.Join(strings.Fields(string(body)), " ")
	if utf8.RuneCountInString(s) > 40 {
		s = string([]rune(s)[:39]) + "…"
	}
	return fmt.Sprintf("%q", s)
}

// message prints a received message:
//
//	15:04:05  alice: dinner at 8?
//	15:04:05  alice → bob: sure (a copy of what this user sent from another device)
//	15:04:05  #friends  alice: who's in? (a group message)
func (p *printer) message(ev *client.MessageEvent) {
	if p.json {
		j := jsonMessage{Type: "message", ServerID: ev.ServerID, ClientMsgID: ev.ClientMsgID, From: ev.From,
			FromDevice: ev.FromDevice, To: ev.To, Group: ev.Group, Time: rfc3339(ev.Time), Text: string(ev.Body), Sync: ev.Sync}
		if ev.Group != "" {
			if l := p.groupLabel(ev.Group); l != client.GroupPeer(ev.Group) {
				j.GroupName = l[1:]
			}
		}
		if ev.Err != nil {
			j.Error = ev.Err.Error()
		}
		p.emitJSON(j)
		return
	}
	who := ev.From
	switch {
	case ev.Group != "":
		who = p.groupLabel(ev.Group) + "  " + ev.From
	case ev.Sync:
		who = ev.From + " → " + ev.To
	}
	prefix := p.clock(ev.Time) + "  " + who + ": "
	fmt.Fprintf(p.w, "%s%s\n", prefix, indent(text(ev.Body, ev.Err), utf8.RuneCountInString(prefix)))
}

// receipt prints a receipt for a sent message; m is the message if it is
// stored here:
//
//	15:04:06  ✓✓ delivered to bob: "dinner at 8?" (01J…)
//	15:04:09  ✓✓ read by bob: "dinner at 8?" (01J…)
//	15:04:02  ✓ accepted, to bob: "dinner at 8?" (01J…)
func (p *printer) receipt(ev *client.ReceiptEvent, m *localstore.Message) {
	if p.json {
		j := jsonReceipt{Type: "receipt", ServerID: ev.Message.ServerID, ClientMsgID: ev.Message.ClientMsgID,
			From: ev.By, FromDevice: ev.ByDevice, To: ev.To, Group: ev.Group, Time: rfc3339(ev.Time), Status: ev.Status.String()}
		if m != nil {
			j.Text = string(m.Body)
		}
		p.emitJSON(j)
		return
	}
	var what string
	switch {
	case ev.Group != "" && ev.Status == client.StatusSent:
		what = "✓ accepted, to " + p.groupLabel(ev.Group)
	case ev.Group != "" && ev.Status == client.StatusDelivered:
		what = "✓✓ delivered to " + ev.By + " in " + p.groupLabel(ev.Group)
	case ev.Group != "" && ev.Status == client.StatusRead:
		what = "✓✓ read by " + ev.By + " in " + p.groupLabel(ev.Group)
	case ev.Status == client.StatusSent:
		what = "✓ accepted, to " + ev.To
	case ev.Status == client.StatusDelivered:
		what = "✓✓ delivered to " + ev.To
	case ev.Status == client.StatusRead:
		what = "✓✓ read by " + ev.By
	default:
		what = ev.Status.String()
	}
	if m != nil {
		what += ": " + quote(m.Body)
	}
	fmt.Fprintf(p.w, "%s  %s (%s)\n", p.clock(ev.Time), what, ev.Message.ServerID)
}

// sent prints the acceptance of a message sent by this command:
//
//	✓ accepted 01J…  15:04:05  to bob
//	✓ accepted 01J…  15:04:05  to bob (duplicate: the server had it already)
func (p *printer) sent(s client.Sent, from client.Device, to string, body []byte) {
	if p.json {
		p.emitJSON(jsonSent{Type: "sent", ServerID: s.ServerID, ClientMsgID: s.ClientMsgID, From: from.User,
			FromDevice: from.ID, To: to, Time: rfc3339(s.Time), Text: string(body), Duplicate: s.Duplicate})
		return
	}
	dup := ""
	if s.Duplicate {
		dup = " (duplicate: the server had it already)"
	}
	fmt.Fprintf(p.w, "✓ accepted %s  %s  to %s%s\n", s.ServerID, p.clock(s.Time), to, dup)
}

// failed prints a message the server refused for good.
func (p *printer) failed(ev *client.SendFailedEvent) {
	if p.json {
		p.emitJSON(jsonFailed{Type: "failed", ClientMsgID: ev.Message.ClientMsgID, To: ev.To, Error: ev.Err.Error()})
		return
	}
	fmt.Fprintf(p.w, "%s  ✗ not sent to %s: %v (%s)\n", p.clock(p.now()), ev.To, ev.Err, ev.Message.ClientMsgID)
}

// group prints a change of a group:
//
//	15:04:05  #friends  alice created the group with bob, carol
//	15:04:05  #friends  alice added dave
//	15:04:05  #friends  carol was removed by alice
//	15:04:05  #friends  carol left
//	15:04:05  #friends  alice named the group
func (p *printer) group(ev *client.GroupEvent) {
	if p.json {
		p.emitJSON(jsonGroup{Type: "group", Group: ev.Group.ID, Name: ev.Group.Name, Version: ev.Group.Version, By: ev.By,
			Added: ev.Added, Removed: ev.Removed, Renamed: ev.Renamed, Time: rfc3339(ev.Time)})
		return
	}
	at := ev.Time
	if at.IsZero() {
		at = p.now()
	}
	var lines []string
	if ev.Renamed {
		lines = append(lines, ev.By+" named the group")
	}
	var added []string
	for _, u := range ev.Added {
		if u != ev.By {
			added = append(added, u)
		}
	}
	switch {
	case len(ev.Added) > 0 && ev.Group.Version == 1:
		lines = append(lines, ev.By+" created the group with "+strings.Join(added, ", "))
	case len(added) > 0:
		lines = append(lines, ev.By+" added "+strings.Join(added, ", "))
	}
	for _, u := range ev.Removed {
		if u == ev.By {
			lines = append(lines, u+" left")
		} else {
			lines = append(lines, u+" was removed by "+ev.By)
		}
	}
	for _, l := range lines {
		fmt.Fprintf(p.w, "%s  %s  %s\n", p.clock(at), ev.Group.Label(), l)
	}
}

// lastSeen says when, briefly: a time today, else a date too.
func lastSeen(t, now time.Time, loc *time.Location) string {
	t, now = t.In(loc), now.In(loc)
	if y, m, d := t.Date(); y == now.Year() && m == now.Month() && d == now.Day() {
		return t.Format("15:04:05")
	}
	return t.Format("Jan 2 15:04")
}

// presence prints a presence change:
//
//	15:04:07  bob is online
//	15:04:07  bob is offline, last seen 14:58:10
func (p *printer) presence(ev *client.PresenceEvent) {
	if p.json {
		p.emitJSON(jsonPresence{Type: "presence", User: ev.User, Online: ev.Online, LastSeen: rfc3339(ev.LastSeen)})
		return
	}
	now := p.now()
	switch {
	case ev.Online:
		fmt.Fprintf(p.w, "%s  %s is online\n", p.clock(now), ev.User)
	case ev.LastSeen.IsZero():
		fmt.Fprintf(p.w, "%s  %s is offline, never seen\n", p.clock(now), ev.User)
	default:
		fmt.Fprintf(p.w, "%s  %s is offline, last seen %s\n", p.clock(now), ev.User, lastSeen(ev.LastSeen, now, p.loc))
	}
}

// typing prints a typing change:
//
//	15:04:08  bob is typing…
//	15:04:11  bob stopped typing
func (p *printer) typing(ev *client.TypingEvent) {
	if p.json {
		p.emitJSON(jsonTyping{Type: "typing", From: ev.From, FromDevice: ev.FromDevice, Typing: ev.Typing})
		return
	}
	if ev.Typing {
		fmt.Fprintf(p.w, "%s  %s is typing…\n", p.clock(p.now()), ev.From)
	} else {
		fmt.Fprintf(p.w, "%s  %s stopped typing\n", p.clock(p.now()), ev.From)
	}
}

// connection describes a connection change for stderr.
func connection(ev *client.ConnectionEvent, server string) string {
	switch {
	case ev.State == client.Connecting:
		return "connecting to " + server + "…"
	case ev.State == client.Connected:
		return "connected"
	case ev.Err != nil && ev.RetryIn > 0:
		return fmt.Sprintf("disconnected: %v; retrying in %v", ev.Err, ev.RetryIn.Round(10*time.Millisecond))
	case ev.Err != nil:
		return fmt.Sprintf("disconnected: %v", ev.Err)
	}
	return "disconnected"
}
