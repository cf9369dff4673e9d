package localstore

import (
	"database/sql"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
)

func TestGroupsSaveLoadFind(t *testing.T) {
	s, path := open(t)
	if _, ok, err := s.LoadGroup("g1"); ok || err != nil {
		t.Fatalf("an unknown group: %v, %v", ok, err)
	}
	g := client.Group{ID: "g1", Name: "Friends", Version: 1, Members: []client.GroupMember{
		{User: "alice", Admin: true}, {User: "bob"}, {User: "carol"}}}
	if err := s.SaveGroup(g); err != nil {
		t.Fatal(err)
	}
	// Saving again replaces the membership whole.
	g.Version, g.Members = 2, []client.GroupMember{{User: "alice", Admin: true}, {User: "bob", Admin: true}}
	if err := s.SaveGroup(g); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveGroup(client.Group{ID: "g2", Name: "friends", Version: 1, Left: true}); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveGroup(client.Group{}); err == nil {
		t.Error("a group without an id was saved")
	}
	s.Close()
	s, err := Open(path) // survives a restart
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got, ok, err := s.LoadGroup("g1")
	if err != nil || !ok || got.Name != "Friends" || got.Version != 2 || got.Left ||
		!slices.Equal(got.Users(), []string{"alice", "bob"}) || !got.Admin("bob") || got.Member("carol") {
		t.Fatalf("load: %+v, %v, %v", got, ok, err)
	}
	all, err := s.ListGroups()
	if err != nil || len(all) != 2 || all[0].ID != "g1" || !all[1].Left {
		t.Fatalf("list: %+v, %v", all, err)
	}
	// By id; by name, which two groups share without case: an error that
	// names their ids.
	if f, ok, err := s.FindGroup("g2"); err != nil || !ok || f.ID != "g2" {
		t.Fatalf("find by id: %+v, %v, %v", f, ok, err)
	}
	if _, _, err := s.FindGroup("FRIENDS"); err == nil || !strings.Contains(err.Error(), "g1") {
		t.Fatalf("an ambiguous name: %v", err)
	}
	if _, ok, err := s.FindGroup("nobody"); ok || err != nil {
		t.Fatalf("an unknown name: %v, %v", ok, err)
	}
	if err := s.SaveGroup(client.Group{ID: "g2", Name: "others", Version: 1}); err != nil {
		t.Fatal(err)
	}
	if f, ok, err := s.FindGroup("friends"); err != nil || !ok || f.ID != "g1" {
		t.Fatalf("find by name: %+v, %v, %v", f, ok, err)
	}
}

func TestGroupMessagesInHistoryAndOutbox(t *testing.T) {
	s, _ := open(t)
	alice := client.Device{User: "alice", ID: 1}
	m := client.OutboxMessage{ClientMsgID: "c1", From: alice, Group: "g1", Body: []byte("picnic on sunday"), Created: time.Now()}
	if err := s.Outbox().Add(m); err != nil {
		t.Fatal(err)
	}
	pending, err := s.Outbox().Pending()
	if err != nil || len(pending) != 1 || !pending[0].ToGroup() || pending[0].Group != "g1" || pending[0].To != "" {
		t.Fatalf("pending: %+v, %v", pending, err)
	}
	if err := s.MarkSent(client.Sent{MessageRef: client.MessageRef{ServerID: "s1", ClientMsgID: "c1"}, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	// A group message from bob, and a copy of one alice sent from another
	// device.
	for _, ev := range []*client.MessageEvent{
		{ServerID: "s2", ClientMsgID: "b1", From: "bob", FromDevice: 1, Group: "g1", Body: []byte("sunday works"), Time: time.Now()},
		{ServerID: "s3", ClientMsgID: "a2", From: "alice", FromDevice: 2, Group: "g1", Sync: true, Body: []byte("bring a sunday hat"), Time: time.Now()},
	} {
		if isNew, err := s.RecordReceived(ev); err != nil || !isNew {
			t.Fatalf("record %s: %v, %v", ev.ServerID, isNew, err)
		}
	}
	recent, err := s.Recent(client.GroupPeer("g1"), 10)
	if err != nil || len(recent) != 3 {
		t.Fatalf("recent: %+v, %v", recent, err)
	}
	for _, r := range recent {
		if r.Group != "g1" || r.Peer != "#g1" {
			t.Errorf("message %s: group %q, peer %q", r.ClientMsgID, r.Group, r.Peer)
		}
	}
	if recent[2].Direction != Out {
		t.Errorf("a sync copy is stored as %s", recent[2].Direction)
	}
	if found, err := s.Search("sunday", 10); err != nil || len(found) != 3 {
		t.Fatalf("search: %+v, %v", found, err)
	}
	if unread, err := s.Unread(""); err != nil || len(unread) != 1 || unread[0].From != "bob" || unread[0].Group != "g1" {
		t.Fatalf("unread: %+v, %v", unread, err)
	}
	// Nothing of the group in the 1:1 conversation with bob.
	if r, err := s.Recent("bob", 10); err != nil || len(r) != 0 {
		t.Fatalf("1:1 with bob: %+v, %v", r, err)
	}
}

func TestGroupReceiptsPerMember(t *testing.T) {
	s, _ := open(t)
	alice := client.Device{User: "alice", ID: 1}
	if err := s.Outbox().Add(client.OutboxMessage{ClientMsgID: "c1", From: alice, Group: "g1", Body: []byte("hi"), Created: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if err := s.MarkSent(client.Sent{MessageRef: client.MessageRef{ServerID: "s1", ClientMsgID: "c1"}, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		user  string
		st    client.Status
		moved bool
	}{
		{"bob", client.StatusDelivered, true},
		{"bob", client.StatusDelivered, false}, // a duplicate
		{"carol", client.StatusDelivered, true},
		{"bob", client.StatusRead, true},
		{"bob", client.StatusDelivered, false}, // late
		{"carol", client.StatusRead, true},
	}
	for i, step := range steps {
		moved, err := s.UpdateGroupReceipt("s1", step.user, step.st)
		if err != nil || moved != step.moved {
			t.Fatalf("step %d (%s %v): moved %v, %v", i, step.user, step.st, moved, err)
		}
	}
	got, err := s.GroupReceipts("s1")
	if err != nil || len(got) != 2 || got["bob"] != client.StatusRead || got["carol"] != client.StatusRead {
		t.Fatalf("receipts: %v, %v", got, err)
	}
	if m, _, _ := s.Find(client.MessageRef{ServerID: "s1"}); m.Status != client.StatusRead {
		t.Errorf("the message's status is %v", m.Status)
	}
	if _, err := s.UpdateGroupReceipt("", "bob", client.StatusRead); err == nil {
		t.Error("a receipt without a server id was taken")
	}
}

// A version 2 file keeps its history and outbox through the groups
// migration.
func TestUpgradeFromVersion2(t *testing.T) {
	path := filepath.Join(t.TempDir(), "local.db")
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{migrations[0], migrations[1], "PRAGMA user_version = 2",
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
	if got, err := s.Search("dinner", 10); err != nil || len(got) != 1 || got[0].Group != "" || got[0].Peer != "bob" {
		t.Fatalf("search after the upgrade: %+v, %v", got, err)
	}
	if got, err := s.Outbox().Pending(); err != nil || len(got) != 1 || got[0].To != "bob" || got[0].Group != "" {
		t.Fatalf("outbox after the upgrade: %+v, %v", got, err)
	}
}
