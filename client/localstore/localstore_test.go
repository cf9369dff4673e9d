package localstore

import (
	"database/sql"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
)

func open(t *testing.T) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "local.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func TestOpenMigratesOnceAndIsDurable(t *testing.T) {
	s, path := open(t)
	if v, err := s.Version(); err != nil || v != len(migrations) {
		t.Fatalf("version %d, %v; want %d", v, err, len(migrations))
	}
	var mode string
	var sync int
	if err := s.db.QueryRow("PRAGMA journal_mode").Scan(&mode); err != nil || mode != "wal" {
		t.Errorf("journal_mode %q (%v), want wal", mode, err)
	}
	if err := s.db.QueryRow("PRAGMA synchronous").Scan(&sync); err != nil || sync != 2 {
		t.Errorf("synchronous %d (%v), want 2 (FULL)", sync, err)
	}
	if err := s.MarkSeen("S1"); err != nil {
		t.Fatal(err)
	}
	s.Close()

	// Reopening keeps the data and applies nothing again.
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if ok, err := s2.Seen("S1"); err != nil || !ok {
		t.Fatalf("Seen after reopen: %v, %v", ok, err)
	}
	// A file from a newer program is refused, not misread.
	if _, err := s2.db.Exec("PRAGMA user_version = 99"); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if _, err := Open(path); err == nil {
		t.Fatal("Open of a newer schema succeeded")
	}
}

func TestSeen(t *testing.T) {
	s, _ := open(t)
	if ok, _ := s.Seen("A"); ok {
		t.Fatal("unseen id reported seen")
	}
	for range 2 { // idempotent
		if err := s.MarkSeen("A"); err != nil {
			t.Fatal(err)
		}
	}
	if ok, _ := s.Seen("A"); !ok {
		t.Fatal("seen id not reported")
	}
	if n, err := s.PruneSeen(time.Now().Add(time.Hour)); err != nil || n != 1 {
		t.Fatalf("prune: %d, %v", n, err)
	}
	if ok, _ := s.Seen("A"); ok {
		t.Fatal("pruned id still seen")
	}
}

var alice1 = client.Device{User: "alice", ID: 1}

func TestOutboxAndSentHistory(t *testing.T) {
	s, _ := open(t)
	ob := s.Outbox()
	now := time.UnixMilli(time.Now().UnixMilli())
	for i, id := range []string{"c1", "c2", "c3"} {
		m := client.OutboxMessage{ClientMsgID: id, From: alice1, To: "bob", Body: []byte("m" + id), Created: now.Add(time.Duration(i) * time.Second)}
		if err := ob.Add(m); err != nil {
			t.Fatal(err)
		}
	}
	if err := ob.Add(client.OutboxMessage{ClientMsgID: "c1", From: alice1, To: "bob"}); err == nil {
		t.Fatal("adding a client id twice succeeded")
	}
	pending, err := ob.Pending()
	if err != nil || len(pending) != 3 || pending[0].ClientMsgID != "c1" || pending[2].ClientMsgID != "c3" ||
		string(pending[1].Body) != "mc2" || pending[0].From != alice1 || !pending[0].Created.Equal(now) {
		t.Fatalf("pending %+v, %v", pending, err)
	}
	// Entering the outbox put the messages in the history, pending.
	m, ok, err := s.Find(client.MessageRef{ClientMsgID: "c1"})
	if err != nil || !ok || m.Status != client.StatusPending || m.Direction != Out || m.Peer != "bob" || m.ServerID != "" {
		t.Fatalf("c1 in history: %+v %v %v", m, ok, err)
	}

	accepted := time.UnixMilli(now.UnixMilli() + 500)
	if err := s.MarkSent(client.Sent{MessageRef: client.MessageRef{ServerID: "S1", ClientMsgID: "c1"}, Time: accepted}); err != nil {
		t.Fatal(err)
	}
	if err := ob.Remove("c1"); err != nil {
		t.Fatal(err)
	}
	if err := s.DropUnsent("c3"); err != nil { // refused for good
		t.Fatal(err)
	}
	ob.Remove("c3")
	pending, _ = ob.Pending()
	if len(pending) != 1 || pending[0].ClientMsgID != "c2" {
		t.Fatalf("pending after removals: %+v", pending)
	}
	if _, ok, _ := s.Find(client.MessageRef{ClientMsgID: "c3"}); ok {
		t.Fatal("a refused message stayed in the history")
	}
	m, _, _ = s.Find(client.MessageRef{ServerID: "S1"})
	if m.Status != client.StatusSent || !m.Time.Equal(accepted) || m.ClientMsgID != "c1" {
		t.Fatalf("after MarkSent: %+v", m)
	}

	// Receipts move it forward only.
	steps := []struct {
		ref  client.MessageRef
		st   client.Status
		want bool
	}{
		{client.MessageRef{ServerID: "S1"}, client.StatusDelivered, true},
		{client.MessageRef{ServerID: "S1", ClientMsgID: "c1"}, client.StatusDelivered, false},
		{client.MessageRef{ClientMsgID: "c1"}, client.StatusRead, true},
		{client.MessageRef{ServerID: "S1"}, client.StatusDelivered, false},
		{client.MessageRef{ServerID: "nope"}, client.StatusRead, false},
		{client.MessageRef{}, client.StatusRead, false},
	}
	for i, st := range steps {
		got, err := s.UpdateStatus(st.ref, st.st)
		if err != nil || got != st.want {
			t.Fatalf("step %d: UpdateStatus = %v, %v; want %v", i, got, err, st.want)
		}
	}
	// A late acceptance changes nothing either.
	s.MarkSent(client.Sent{MessageRef: client.MessageRef{ServerID: "S1", ClientMsgID: "c1"}, Time: accepted})
	if m, _, _ := s.Find(client.MessageRef{ClientMsgID: "c1"}); m.Status != client.StatusRead {
		t.Fatalf("status %v, want read", m.Status)
	}
	// A receipt for a message still pending here (accepted elsewhere)
	// teaches its server id.
	if ok, _ := s.UpdateStatus(client.MessageRef{ServerID: "S2", ClientMsgID: "c2"}, client.StatusDelivered); !ok {
		t.Fatal("receipt for a pending message did not apply")
	}
	if m, ok, _ := s.Find(client.MessageRef{ServerID: "S2"}); !ok || m.ClientMsgID != "c2" {
		t.Fatalf("S2: %+v %v", m, ok)
	}
}

func TestReceivedUnreadAndRecent(t *testing.T) {
	s, _ := open(t)
	base := time.UnixMilli(1_700_000_000_000)
	evs := []*client.MessageEvent{
		{ServerID: "S1", ClientMsgID: "b1", From: "bob", FromDevice: 1, To: "alice", Time: base, Body: []byte("hi")},
		{ServerID: "S2", ClientMsgID: "b2", From: "bob", FromDevice: 1, To: "alice", Time: base.Add(time.Second), Body: []byte("dinner at 8?")},
		{ServerID: "S3", ClientMsgID: "k1", From: "carol", FromDevice: 2, To: "alice", Time: base.Add(2 * time.Second), Body: []byte("hey")},
		// A copy of what alice sent to bob from her other device.
		{ServerID: "S4", ClientMsgID: "a9", From: "alice", FromDevice: 2, To: "bob", Sync: true, Time: base.Add(3 * time.Second), Body: []byte("sure")},
	}
	for _, ev := range evs {
		if ok, err := s.RecordReceived(ev); err != nil || !ok {
			t.Fatalf("record %s: %v %v", ev.ServerID, ok, err)
		}
	}
	if ok, err := s.RecordReceived(evs[0]); err != nil || ok {
		t.Fatalf("recording a duplicate: new=%v, %v", ok, err)
	}

	unread, err := s.Unread("")
	if err != nil || len(unread) != 3 || unread[0].ServerID != "S1" || unread[2].ServerID != "S3" {
		t.Fatalf("unread from all: %+v %v", unread, err)
	}
	fromBob, _ := s.Unread("bob")
	if len(fromBob) != 2 || fromBob[1].ClientMsgID != "b2" || string(fromBob[1].Body) != "dinner at 8?" ||
		fromBob[1].Direction != In || fromBob[1].From != "bob" || !fromBob[1].Time.Equal(base.Add(time.Second)) {
		t.Fatalf("unread from bob: %+v", fromBob)
	}
	readAt := base.Add(time.Minute)
	if err := s.MarkRead([]string{"S1", "S2"}, readAt); err != nil {
		t.Fatal(err)
	}
	if left, _ := s.Unread(""); len(left) != 1 || left[0].ServerID != "S3" {
		t.Fatalf("unread after marking bob's read: %+v", left)
	}

	recent, err := s.Recent("bob", 10)
	if err != nil || len(recent) != 3 {
		t.Fatalf("recent with bob: %+v %v", recent, err)
	}
	if recent[0].ServerID != "S1" || recent[2].ServerID != "S4" {
		t.Fatalf("recent not oldest first: %v %v %v", recent[0].ServerID, recent[1].ServerID, recent[2].ServerID)
	}
	if !recent[0].ReadAt.Equal(readAt) || recent[0].Status != client.StatusRead {
		t.Errorf("read message: %+v", recent[0])
	}
	if sync := recent[2]; sync.Direction != Out || sync.Peer != "bob" || sync.Status != client.StatusSent || sync.FromDevice != 2 {
		t.Errorf("sync copy: %+v", sync)
	}
	if last, _ := s.Recent("bob", 1); len(last) != 1 || last[0].ServerID != "S4" {
		t.Fatalf("recent 1: %+v", last)
	}
}

// Two handles on one file (two CLI processes) both write.
func TestTwoHandles(t *testing.T) {
	s1, path := open(t)
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	done := make(chan error, 1)
	go func() {
		for i := range 50 {
			if err := s2.MarkSeen(string(rune('a'+i%26)) + "2"); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for i := range 50 {
		if err := s1.MarkSeen(string(rune('a'+i%26)) + "1"); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if ok, _ := s1.Seen("b2"); !ok {
		t.Fatal("a write through the other handle is not visible")
	}
}

func TestSearch(t *testing.T) {
	s, _ := open(t)
	now := time.Now()
	for i, ev := range []*client.MessageEvent{
		{ServerID: "s1", ClientMsgID: "c1", From: "bob", FromDevice: 1, To: "alice", Time: now.Add(-3 * time.Minute), Body: []byte("Dinner at eight?")},
		{ServerID: "s2", ClientMsgID: "c2", From: "carol", FromDevice: 1, To: "alice", Time: now.Add(-2 * time.Minute), Body: []byte("no dinner tonight, sorry")},
		{ServerID: "s3", ClientMsgID: "c3", From: "bob", FromDevice: 1, To: "alice", Time: now.Add(-time.Minute), Body: []byte("lunch then? Crème brûlée")},
	} {
		if _, err := s.RecordReceived(ev); err != nil {
			t.Fatal(i, err)
		}
	}
	if err := s.Outbox().Add(client.OutboxMessage{ClientMsgID: "o1", From: client.Device{User: "alice", ID: 1}, To: "bob",
		Body: []byte("dinner sounds good"), Created: now}); err != nil {
		t.Fatal(err)
	}
	ids := func(ms []Message) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.ClientMsgID)
		}
		return out
	}
	for _, tc := range []struct {
		q    string
		want []string
	}{
		{"dinner", []string{"o1", "c2", "c1"}},
		{"DINNER eight", []string{"c1"}},
		{"creme brulee", []string{"c3"}},
		{"din*", []string{"o1", "c2", "c1"}},
		{"breakfast", nil},
		{`"OR" ( NEAR`, nil},
	} {
		got, err := s.Search(tc.q, 10)
		if err != nil || !slices.Equal(ids(got), tc.want) {
			t.Errorf("search %q: %v, %v; want %v", tc.q, ids(got), err, tc.want)
		}
	}
	if got, _ := s.Search("dinner", 1); len(got) != 1 || got[0].Peer != "bob" || got[0].Direction != Out {
		t.Errorf("limit 1: %+v", got)
	}
	if _, err := s.Search("  * ", 10); err == nil {
		t.Error("an empty search was not refused")
	}
	// A dropped unsent message leaves the index too.
	if err := s.DropUnsent("o1"); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Search("sounds", 10); len(got) != 0 {
		t.Errorf("a deleted message is still found: %+v", got)
	}
}

func TestOutboxKeepsControlMessages(t *testing.T) {
	s, _ := open(t)
	from := client.Device{User: "alice", ID: 1}
	for _, m := range []client.OutboxMessage{
		{ClientMsgID: "ctl", From: from, To: "bob", Body: []byte{1, 2}, Created: time.Now(), Control: true},
		{ClientMsgID: "re", From: from, To: "bob", Body: []byte("frame"), Created: time.Now(), ContentID: "orig"},
	} {
		if err := s.Outbox().Add(m); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Outbox().Pending()
	if err != nil || len(got) != 2 || !got[0].Control || got[1].ContentID != "orig" || got[1].Control {
		t.Fatalf("pending: %+v, %v", got, err)
	}
	// Not the user's messages: not history.
	if _, found, _ := s.Find(client.MessageRef{ClientMsgID: "ctl"}); found {
		t.Error("a control message is in the history")
	}
	if _, found, _ := s.Find(client.MessageRef{ClientMsgID: "re"}); found {
		t.Error("a resend is in the history")
	}
}

// A file made by the first schema keeps its history, and the search index
// covers it after the upgrade.
func TestUpgradeFromVersion1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "local.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{migrations[0], "PRAGMA user_version = 1",
		`INSERT INTO messages (server_id, client_msg_id, direction, peer, from_user, from_device, body, time, status)
			VALUES ('s1', 'c1', 'in', 'bob', 'bob', 1, CAST('dinner at eight' AS BLOB), 1, 2)`,
		`INSERT INTO outbox (client_msg_id, from_user, from_device, to_user, body, created) VALUES ('o1', 'alice', 1, 'bob', x'68', 1)`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got, err := s.Search("dinner", 10); err != nil || len(got) != 1 || got[0].ServerID != "s1" {
		t.Fatalf("search after the upgrade: %+v, %v", got, err)
	}
	if got, err := s.Outbox().Pending(); err != nil || len(got) != 1 || got[0].Control || got[0].ContentID != "" {
		t.Fatalf("outbox after the upgrade: %+v, %v", got, err)
	}
}
