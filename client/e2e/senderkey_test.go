package e2e

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// Sender keys without a server: engines that hand each other their keys
// directly (the ShareFunc), as the pairwise channel would.

type device struct {
	t     *testing.T
	path  string
	creds client.Credentials
	store *localstore.Store
	eng   *Engine
}

func newDevice(t *testing.T, user string, id uint32) *device {
	d := &device{t: t, path: filepath.Join(t.TempDir(), "local.db"),
		creds: client.Credentials{Server: "http://127.0.0.1:1", User: user, Device: id, Secret: "x"}}
	d.open()
	t.Cleanup(d.close)
	return d
}

func (d *device) open() {
	st, err := localstore.Open(d.path)
	if err != nil {
		d.t.Fatal(err)
	}
	eng, err := Open(Config{Store: st, Credentials: d.creds})
	if err != nil {
		d.t.Fatal(err)
	}
	d.store, d.eng = st, eng
}

func (d *device) close() {
	if d.store != nil {
		d.eng.Close()
		d.store.Close()
		d.store = nil
	}
}

func (d *device) self() client.Device { return client.Device{User: d.creds.User, ID: d.creds.Device} }

// take hands d a control body sent by from, as Open does with one that
// arrives over the pairwise session.
func (d *device) take(from client.Device, body []byte) {
	d.t.Helper()
	op, err := decodeControlOp(body)
	if err != nil || op.op != opSenderKey {
		d.t.Fatalf("not a sender key: %v", err)
	}
	if err := d.eng.inTx(context.Background(), func() error { return d.eng.takeSenderKey(context.Background(), from, op.group) }); err != nil {
		d.t.Fatal(err)
	}
}

// sharing records what SealGroup hands out, and delivers it to the
// devices of to.
type sharing struct {
	to    []*device
	calls []string
}

func (s *sharing) share(from client.Device) client.ShareFunc {
	return func(_ context.Context, user string, body []byte) ([]client.Device, error) {
		s.calls = append(s.calls, user)
		var devs []client.Device
		for _, d := range s.to {
			if d.creds.User == user {
				d.take(from, body)
				devs = append(devs, d.self())
			}
		}
		return devs, nil
	}
}

var msgSeq int

func (d *device) sealGroup(group string, version uint64, to []*device, sh *sharing, text string) (string, []byte) {
	d.t.Helper()
	msgSeq++
	m := client.OutboxMessage{ClientMsgID: "m" + string(rune('a'+msgSeq%26)) + time.Now().Format("150405.000000000"),
		From: d.self(), Group: group, Body: []byte(text), Created: time.Now()}
	target := client.GroupTarget{ID: group, Version: version}
	for _, x := range to {
		target.Devices = append(target.Devices, x.self())
	}
	p, err := d.eng.SealGroup(context.Background(), m, target, sh.share(d.self()))
	if err != nil {
		d.t.Fatalf("seal: %v", err)
	}
	return m.ClientMsgID, p
}

func (d *device) open1(from *device, group, serverID, clientID string, payload []byte) (client.Opened, error) {
	return d.eng.Open(context.Background(), client.Inbound{ServerID: serverID, ClientMsgID: clientID, From: from.self(),
		Group: group, Time: time.Now(), Payload: payload})
}

func TestSenderKeyDistributionAndRotation(t *testing.T) {
	alice, bob, carol := newDevice(t, "alice", 1), newDevice(t, "bob", 1), newDevice(t, "carol", 1)
	bob2 := newDevice(t, "bob", 2)
	members := []*device{bob, bob2, carol}
	sh := &sharing{to: members}

	id, p := alice.sealGroup("g1", 1, members, sh, "hello group")
	if len(sh.calls) != 2 { // bob (both devices), carol
		t.Fatalf("shared with %v", sh.calls)
	}
	if p[0] != payloadVersion || p[1] != typeSenderKey || bytes.Contains(p, []byte("hello group")) {
		t.Fatalf("payload %x", p[:2])
	}
	for i, d := range members {
		o, err := d.open1(alice, "g1", "s1", id, p)
		if err != nil || string(o.Body) != "hello group" || o.ClientMsgID != id {
			t.Fatalf("member %d: %q, %v", i, o.Body, err)
		}
	}
	// The next message needs no handing out.
	sh.calls = nil
	id2, p2 := alice.sealGroup("g1", 1, members, sh, "second")
	if len(sh.calls) != 0 {
		t.Fatalf("shared again with %v", sh.calls)
	}

	// Both ends keep their state across a restart.
	alice.close()
	alice.open()
	bob.close()
	bob.open()
	if o, err := bob.open1(alice, "g1", "s2", id2, p2); err != nil || string(o.Body) != "second" {
		t.Fatalf("after restarts: %q, %v", o.Body, err)
	}
	id3, p3 := alice.sealGroup("g1", 1, members, sh, "third")
	if len(sh.calls) != 0 {
		t.Fatalf("shared after a restart with %v", sh.calls)
	}
	if o, err := bob.open1(alice, "g1", "s3", id3, p3); err != nil || string(o.Body) != "third" {
		t.Fatalf("after restarts: %q, %v", o.Body, err)
	}

	// A key handed out again (a member asked) does not forget the
	// message keys of messages in flight: bob2 has not opened these yet.
	alice.eng.reshare(context.Background(), nil, bob2.self(), "g1")
	sh.calls = nil
	id4, p4 := alice.sealGroup("g1", 1, members, sh, "fourth")
	if len(sh.calls) != 1 || sh.calls[0] != "bob" {
		t.Fatalf("reshared with %v", sh.calls)
	}
	for _, m := range []struct {
		sid, id string
		p       []byte
		want    string
	}{{"s4", id4, p4, "fourth"}, {"s2", id2, p2, "second"}, {"s3", id3, p3, "third"}} {
		if o, err := bob2.open1(alice, "g1", m.sid, m.id, m.p); err != nil || string(o.Body) != m.want {
			t.Fatalf("bob2 %s: %q, %v", m.sid, o.Body, err)
		}
	}

	// carol is removed: alice's key is replaced and handed to bob's
	// devices only; carol cannot read what follows.
	if err := alice.eng.RotateGroupKey(context.Background(), "g1"); err != nil {
		t.Fatal(err)
	}
	sh.calls = nil
	sh.to = []*device{bob, bob2}
	id5, p5 := alice.sealGroup("g1", 2, []*device{bob, bob2}, sh, "without carol")
	if len(sh.calls) != 1 || sh.calls[0] != "bob" {
		t.Fatalf("after the rotation, shared with %v", sh.calls)
	}
	if o, err := bob.open1(alice, "g1", "s5", id5, p5); err != nil || string(o.Body) != "without carol" {
		t.Fatalf("bob after the rotation: %q, %v", o.Body, err)
	}
	_, err := carol.open1(alice, "g1", "s5", id5, p5)
	var de *DecryptError
	if !errors.As(err, &de) || de.Group != "g1" || de.From != alice.self() {
		t.Fatalf("carol opened a message sealed after her removal: %v", err)
	}
}

func TestGroupPayloadsRejected(t *testing.T) {
	alice, bob := newDevice(t, "alice", 1), newDevice(t, "bob", 1)
	sh := &sharing{to: []*device{bob}}
	id, p := alice.sealGroup("g1", 1, []*device{bob}, sh, "hi")
	tampered := bytes.Clone(p)
	tampered[len(tampered)-70] ^= 1
	cases := []struct {
		name  string
		group string
		p     []byte
	}{
		{"tampered", "g1", tampered},
		{"another group", "g2", p},
		{"outside a group", "", p},
		{"truncated", "g1", p[:10]},
		{"garbage", "g1", append([]byte{payloadVersion, typeSenderKey}, bytes.Repeat([]byte{0xff}, 100)...)},
		{"pairwise type in a group", "g1", append([]byte{payloadVersion, typeWhisper}, p[2:]...)},
	}
	for i, c := range cases {
		_, err := bob.open1(alice, c.group, "bad"+string(rune('a'+i)), id, c.p)
		var de *DecryptError
		if !errors.As(err, &de) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	if o, err := bob.open1(alice, "g1", "good", id, p); err != nil || string(o.Body) != "hi" {
		t.Fatalf("the real one after the bad ones: %q, %v", o.Body, err)
	}
	// Delivered again (a lost ack): answered from the inbox.
	if o, err := bob.open1(alice, "g1", "good", id, p); err != nil || string(o.Body) != "hi" {
		t.Fatalf("redelivery: %q, %v", o.Body, err)
	}
}

func TestGroupControlCodec(t *testing.T) {
	for _, g := range []groupControl{
		{op: opSenderKey, group: "01KAR7Q1X6N2Z8M3VJ4T0E5W9C", data: []byte{1, 2, 3}},
		{op: opGroupInfo, group: "g", data: []byte("Friends ✓")},
	} {
		got, err := decodeControlOp(g.encode())
		if err != nil || got.op != g.op || got.group.group != g.group || !bytes.Equal(got.group.data, g.data) {
			t.Fatalf("%+v: %+v, %v", g, got, err)
		}
	}
	for _, b := range [][]byte{
		nil,
		{opSenderKey},
		{opSenderKey, 0, 1, 'x'},      // no group id
		{opGroupInfo, 1, 'g', 0},      // no data
		{opGroupInfo, 1, 'g', 5, 'x'}, // data cut short
		append([]byte{opSenderKey, 65}, make([]byte, 70)...), // group id too long
		{9, 1, 2}, // unknown op
	} {
		if _, err := decodeControlOp(b); err == nil {
			t.Errorf("%x: no error", b)
		}
	}
}
