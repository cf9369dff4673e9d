package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

var t0 = time.Date(2025, 3, 14, 15, 4, 5, 123_000_000, time.UTC)

func TestTextFormats(t *testing.T) {
	var buf bytes.Buffer
	p := newPrinter(&buf, false)
	p.now = func() time.Time { return t0 }
	p.loc = time.UTC
	stored := &localstore.Message{Body: []byte("dinner at 8?")}
	ref := client.MessageRef{ServerID: "01JABCDEFGHJKMNPQRSTVWXYZ0", ClientMsgID: "c1"}

	p.message(&client.MessageEvent{ServerID: "S1", From: "alice", FromDevice: 1, To: "bob", Time: t0, Body: []byte("dinner at 8?")})
	p.message(&client.MessageEvent{ServerID: "S2", From: "alice", FromDevice: 2, To: "bob", Sync: true, Time: t0, Body: []byte("two\nlines")})
	p.message(&client.MessageEvent{ServerID: "S3", From: "carol", Time: t0, Err: errors.New("no session")})
	p.receipt(&client.ReceiptEvent{Message: ref, To: "bob", Status: client.StatusDelivered, By: "bob", ByDevice: 1, Time: t0.Add(time.Second)}, stored)
	p.receipt(&client.ReceiptEvent{Message: ref, To: "bob", Status: client.StatusRead, By: "bob", ByDevice: 1, Time: t0.Add(2 * time.Second)}, stored)
	p.receipt(&client.ReceiptEvent{Message: ref, To: "bob", Status: client.StatusDelivered, By: "bob", Time: t0}, nil)
	p.receipt(&client.ReceiptEvent{Message: ref, To: "bob", Status: client.StatusSent, Time: t0}, &localstore.Message{Body: []byte(strings.Repeat("long ", 20))})
	p.sent(client.Sent{MessageRef: ref, Time: t0}, client.Device{User: "alice", ID: 1}, "bob", []byte("x"))
	p.sent(client.Sent{MessageRef: ref, Time: t0, Duplicate: true}, client.Device{User: "alice", ID: 1}, "bob", []byte("x"))
	p.presence(&client.PresenceEvent{User: "bob", Online: true})
	p.presence(&client.PresenceEvent{User: "bob", LastSeen: t0.Add(-time.Hour)})
	p.presence(&client.PresenceEvent{User: "bob", LastSeen: t0.AddDate(0, 0, -3)})
	p.presence(&client.PresenceEvent{User: "dave"})
	p.typing(&client.TypingEvent{From: "bob", Typing: true})
	p.typing(&client.TypingEvent{From: "bob"})
	p.failed(&client.SendFailedEvent{Message: client.MessageRef{ClientMsgID: "c9"}, To: "nobody", Err: errors.New("refused")})

	want := `15:04:05  alice: dinner at 8?
15:04:05  alice → bob: two
                       lines
15:04:05  carol: [cannot open this message: no session]
15:04:06  ✓✓ delivered to bob: "dinner at 8?" (01JABCDEFGHJKMNPQRSTVWXYZ0)
15:04:07  ✓✓ read by bob: "dinner at 8?" (01JABCDEFGHJKMNPQRSTVWXYZ0)
15:04:05  ✓✓ delivered to bob (01JABCDEFGHJKMNPQRSTVWXYZ0)
15:04:05  ✓ accepted, to bob: "long long long long long long long long…" (01JABCDEFGHJKMNPQRSTVWXYZ0)
✓ accepted 01JABCDEFGHJKMNPQRSTVWXYZ0  15:04:05  to bob
✓ accepted 01JABCDEFGHJKMNPQRSTVWXYZ0  15:04:05  to bob (duplicate: the server had it already)
15:04:05  bob is online
15:04:05  bob is offline, last seen 14:04:05
15:04:05  bob is offline, last seen Mar 11 15:04
15:04:05  dave is offline, never seen
15:04:05  bob is typing…
15:04:05  bob stopped typing
15:04:05  ✗ not sent to nobody: refused (c9)
`
	if got := buf.String(); got != want {
		t.Errorf("text output:\n%s\nwant:\n%s", got, want)
	}
}

func TestJSONFormats(t *testing.T) {
	var buf bytes.Buffer
	p := newPrinter(&buf, true)
	ref := client.MessageRef{ServerID: "S1", ClientMsgID: "c1"}
	p.message(&client.MessageEvent{ServerID: "S1", ClientMsgID: "c1", From: "alice", FromDevice: 1, To: "bob", Time: t0, Body: []byte("dinner at 8?")})
	p.receipt(&client.ReceiptEvent{Message: ref, To: "bob", Status: client.StatusRead, By: "bob", ByDevice: 2, Time: t0}, &localstore.Message{Body: []byte("dinner at 8?")})
	p.sent(client.Sent{MessageRef: ref, Time: t0}, client.Device{User: "alice", ID: 1}, "bob", []byte("dinner at 8?"))
	p.presence(&client.PresenceEvent{User: "bob", LastSeen: t0})
	p.typing(&client.TypingEvent{From: "bob", FromDevice: 1, Typing: true})

	want := []map[string]any{
		{"type": "message", "server_id": "S1", "client_msg_id": "c1", "from": "alice", "from_device": 1.0, "to": "bob",
			"time": "2025-03-14T15:04:05.123Z", "text": "dinner at 8?"},
		{"type": "receipt", "server_id": "S1", "client_msg_id": "c1", "from": "bob", "from_device": 2.0, "to": "bob",
			"time": "2025-03-14T15:04:05.123Z", "status": "read", "text": "dinner at 8?"},
		{"type": "sent", "server_id": "S1", "client_msg_id": "c1", "from": "alice", "from_device": 1.0, "to": "bob",
			"time": "2025-03-14T15:04:05.123Z", "text": "dinner at 8?", "duplicate": false},
		{"type": "presence", "user": "bob", "online": false, "last_seen": "2025-03-14T15:04:05.123Z"},
		{"type": "typing", "from": "bob", "from_device": 1.0, "typing": true},
	}
	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, line := range lines {
		var got map[string]any
		if err := json.Unmarshal([]byte(line), &got); err != nil {
			t.Fatalf("line %d is not JSON: %v: %s", i, err, line)
		}
		if len(got) != len(want[i]) {
			t.Errorf("line %d: %v, want %v", i, got, want[i])
			continue
		}
		for k, v := range want[i] {
			if got[k] != v {
				t.Errorf("line %d: %s = %#v, want %#v", i, k, got[k], v)
			}
		}
	}
}

func TestGroupTextFormats(t *testing.T) {
	var buf bytes.Buffer
	p := newPrinter(&buf, false)
	p.now = func() time.Time { return t0 }
	p.loc = time.UTC
	p.label = func(id string) string {
		if id == "g1" {
			return "#friends"
		}
		return client.GroupPeer(id)
	}
	ref := client.MessageRef{ServerID: "01JABCDEFGHJKMNPQRSTVWXYZ0", ClientMsgID: "c1"}
	stored := &localstore.Message{Body: []byte("picnic?"), Group: "g1"}
	friends := client.Group{ID: "g1", Name: "friends", Version: 1}

	p.message(&client.MessageEvent{ServerID: "S1", From: "alice", FromDevice: 1, Group: "g1", Time: t0, Body: []byte("picnic?")})
	p.message(&client.MessageEvent{ServerID: "S2", From: "bob", FromDevice: 2, Group: "g2", Time: t0, Err: errors.New("no sender key")})
	p.receipt(&client.ReceiptEvent{Message: ref, To: "#g1", Group: "g1", Status: client.StatusSent, Time: t0}, stored)
	p.receipt(&client.ReceiptEvent{Message: ref, To: "#g1", Group: "g1", Status: client.StatusDelivered, By: "carol", Time: t0}, stored)
	p.receipt(&client.ReceiptEvent{Message: ref, To: "#g1", Group: "g1", Status: client.StatusRead, By: "bob", Time: t0}, stored)
	p.group(&client.GroupEvent{Group: friends, By: "alice", Added: []string{"alice", "bob", "carol"}, Time: t0})
	friends.Version = 2
	p.group(&client.GroupEvent{Group: friends, By: "alice", Added: []string{"dave"}, Time: t0})
	p.group(&client.GroupEvent{Group: friends, By: "alice", Removed: []string{"carol"}, Time: t0})
	p.group(&client.GroupEvent{Group: friends, By: "dave", Removed: []string{"dave"}, Time: t0})
	p.group(&client.GroupEvent{Group: friends, By: "alice", Renamed: true})

	want := `15:04:05  #friends  alice: picnic?
15:04:05  #g2  bob: [cannot open this message: no sender key]
15:04:05  ✓ accepted, to #friends: "picnic?" (01JABCDEFGHJKMNPQRSTVWXYZ0)
15:04:05  ✓✓ delivered to carol in #friends: "picnic?" (01JABCDEFGHJKMNPQRSTVWXYZ0)
15:04:05  ✓✓ read by bob in #friends: "picnic?" (01JABCDEFGHJKMNPQRSTVWXYZ0)
15:04:05  #friends  alice created the group with bob, carol
15:04:05  #friends  alice added dave
15:04:05  #friends  carol was removed by alice
15:04:05  #friends  dave left
15:04:05  #friends  alice named the group
`
	if got := buf.String(); got != want {
		t.Fatalf("got:\n%s\nwant:\n%s", got, want)
	}

	buf.Reset()
	p.json = true
	p.message(&client.MessageEvent{ServerID: "S1", From: "alice", FromDevice: 1, Group: "g1", Time: t0, Body: []byte("picnic?")})
	p.group(&client.GroupEvent{Group: friends, By: "alice", Removed: []string{"carol"}, Time: t0})
	var m, g map[string]any
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 || json.Unmarshal([]byte(lines[0]), &m) != nil || json.Unmarshal([]byte(lines[1]), &g) != nil {
		t.Fatalf("json lines: %q", buf.String())
	}
	if m["group"] != "g1" || m["group_name"] != "friends" || m["text"] != "picnic?" {
		t.Errorf("message: %v", m)
	}
	if g["type"] != "group" || g["group"] != "g1" || g["version"] != float64(2) || g["removed"].([]any)[0] != "carol" {
		t.Errorf("group: %v", g)
	}
}
