package accountstest

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// The KeyStore half of the suite. Keys are opaque bytes to a store, so the
// tests use random ones of the real sizes.

var keyTests = []struct {
	name string
	fn   func(t *testing.T, s accounts.Store)
}{
	{"KeysFirstUpload", testKeysFirstUpload},
	{"KeysIncompleteFirstUpload", testKeysIncompleteFirstUpload},
	{"KeysIdentityImmutable", testKeysIdentityImmutable},
	{"KeysRotation", testKeysRotation},
	{"KeysPreKeyExists", testKeysPreKeyExists},
	{"KeysLimit", testKeysLimit},
	{"KeysTakeOrderAndExhaustion", testKeysTakeOrderAndExhaustion},
	{"KeysBundlesOfAllDevices", testKeysBundlesOfAllDevices},
	{"KeysUnknownDevice", testKeysUnknownDevice},
	{"KeysRemoveDeviceDropsKeys", testKeysRemoveDeviceDropsKeys},
	{"KeysNotAliased", testKeysNotAliased},
	{"KeysConcurrentTake", testKeysConcurrentTake},
	{"KeysConcurrentTakeManyDevices", testKeysConcurrentTakeManyDevices},
	{"KeysConcurrentPut", testKeysConcurrentPut},
	{"KeysConcurrentPutOverLimit", testKeysConcurrentPutOverLimit},
	{"KeysConcurrentFirstUpload", testKeysConcurrentFirstUpload},
}

func keyStore(t *testing.T, s accounts.Store) accounts.KeyStore {
	t.Helper()
	ks, ok := s.(accounts.KeyStore)
	if !ok {
		t.Fatalf("%T does not implement accounts.KeyStore; every backend must", s)
	}
	return ks
}

func randKey(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func pubKey() []byte { return append([]byte{0x05}, randKey(32)...) }

func u32(v uint32) *uint32 { return &v }

// fullUpload is a first upload: identity, registration id, signed prekey
// and one-time prekeys with ids from..from+n-1.
func fullUpload(identity []byte, spkID uint32, from, n int) accounts.KeyUpload {
	return accounts.KeyUpload{
		IdentityKey:    identity,
		RegistrationID: u32(4242),
		SignedPreKey:   &accounts.SignedPreKey{ID: spkID, PublicKey: pubKey(), Signature: randKey(64)},
		OneTimePreKeys: preKeys(from, n),
	}
}

func preKeys(from, n int) []accounts.PreKey {
	pks := make([]accounts.PreKey, n)
	for i := range pks {
		pks[i] = accounts.PreKey{ID: uint32(from + i), PublicKey: pubKey()}
	}
	return pks
}

func put(t *testing.T, ks accounts.KeyStore, dev ident.Device, up accounts.KeyUpload) int {
	t.Helper()
	n, err := ks.PutKeys(t.Context(), dev, up)
	if err != nil {
		t.Fatalf("PutKeys(%s): %v", dev, err)
	}
	return n
}

func status(t *testing.T, ks accounts.KeyStore, dev ident.Device) accounts.KeyStatus {
	t.Helper()
	st, err := ks.KeyStatus(t.Context(), dev)
	if err != nil {
		t.Fatalf("KeyStatus(%s): %v", dev, err)
	}
	return st
}

func take(t *testing.T, ks accounts.KeyStore, user string, device uint32) []accounts.Bundle {
	t.Helper()
	bs, err := ks.TakeBundles(t.Context(), user, device)
	if err != nil {
		t.Fatalf("TakeBundles(%q, %d): %v", user, device, err)
	}
	return bs
}

func testKeysFirstUpload(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	if st := status(t, ks, a1); st.IdentityKey != nil || st.OneTimePreKeys != 0 {
		t.Errorf("KeyStatus before any upload = %+v, want zero", st)
	}
	identity := pubKey()
	up := fullUpload(identity, 7, 1, 5)
	if n := put(t, ks, a1, up); n != 5 {
		t.Errorf("PutKeys = %d, want 5", n)
	}
	st := status(t, ks, a1)
	if !bytes.Equal(st.IdentityKey, identity) || st.RegistrationID != 4242 || st.SignedPreKeyID != 7 || st.OneTimePreKeys != 5 {
		t.Errorf("KeyStatus = %+v, want identity set, registration 4242, signed prekey 7, 5 one-time prekeys", st)
	}
	bs := take(t, ks, "alice", 0)
	if len(bs) != 1 {
		t.Fatalf("TakeBundles = %d bundles, want 1", len(bs))
	}
	b := bs[0]
	if b.Device != 1 || !bytes.Equal(b.IdentityKey, identity) || b.RegistrationID != 4242 {
		t.Errorf("bundle = device %d identity %x registration %d, want 1 %x 4242", b.Device, b.IdentityKey, b.RegistrationID, identity)
	}
	if b.SignedPreKey == nil || b.SignedPreKey.ID != 7 || !bytes.Equal(b.SignedPreKey.PublicKey, up.SignedPreKey.PublicKey) ||
		!bytes.Equal(b.SignedPreKey.Signature, up.SignedPreKey.Signature) {
		t.Errorf("bundle signed prekey = %+v, want %+v", b.SignedPreKey, up.SignedPreKey)
	}
	if b.OneTimePreKey == nil || b.OneTimePreKey.ID != 1 || !bytes.Equal(b.OneTimePreKey.PublicKey, up.OneTimePreKeys[0].PublicKey) {
		t.Errorf("bundle one-time prekey = %+v, want the lowest id, %+v", b.OneTimePreKey, up.OneTimePreKeys[0])
	}
	if b.Remaining != 4 {
		t.Errorf("bundle Remaining = %d, want 4", b.Remaining)
	}
	if st := status(t, ks, a1); st.OneTimePreKeys != 4 {
		t.Errorf("KeyStatus after a fetch: %d one-time prekeys, want 4", st.OneTimePreKeys)
	}
	// A later upload needs nothing but the identity key.
	if n := put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity}); n != 4 {
		t.Errorf("PutKeys(identity only) = %d, want 4", n)
	}
	if n := put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(100, 3)}); n != 7 {
		t.Errorf("PutKeys(3 more) = %d, want 7", n)
	}
}

func testKeysIncompleteFirstUpload(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	full := fullUpload(identity, 1, 1, 3)
	for name, up := range map[string]accounts.KeyUpload{
		"identity only":            {IdentityKey: identity},
		"no signed prekey":         {IdentityKey: identity, RegistrationID: u32(1), OneTimePreKeys: preKeys(1, 3)},
		"no registration id":       {IdentityKey: identity, SignedPreKey: full.SignedPreKey, OneTimePreKeys: preKeys(1, 3)},
		"prekeys without the rest": {IdentityKey: identity, OneTimePreKeys: preKeys(1, 3)},
	} {
		if _, err := ks.PutKeys(t.Context(), a1, up); !errors.Is(err, accounts.ErrIncompleteKeys) {
			t.Errorf("first PutKeys with %s: error %v, want ErrIncompleteKeys", name, err)
		}
	}
	if st := status(t, ks, a1); st.IdentityKey != nil || st.OneTimePreKeys != 0 {
		t.Errorf("KeyStatus after refused uploads = %+v, want zero", st)
	}
	if b := take(t, ks, "alice", 0); len(b) != 1 || b[0].IdentityKey != nil || b[0].SignedPreKey != nil || b[0].OneTimePreKey != nil {
		t.Errorf("TakeBundles after refused uploads = %+v, want one bundle without keys", b)
	}
	put(t, ks, a1, full)
}

func testKeysIdentityImmutable(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	up := fullUpload(identity, 1, 1, 2)
	put(t, ks, a1, up)

	other := pubKey()
	bad := fullUpload(other, 2, 10, 2)
	if _, err := ks.PutKeys(t.Context(), a1, bad); !errors.Is(err, accounts.ErrIdentityMismatch) {
		t.Fatalf("PutKeys with another identity: error %v, want ErrIdentityMismatch", err)
	}
	// Nothing of the refused upload was kept.
	st := status(t, ks, a1)
	if !bytes.Equal(st.IdentityKey, identity) || st.SignedPreKeyID != 1 || st.OneTimePreKeys != 2 {
		t.Errorf("KeyStatus after a refused identity change = %+v, want the first upload's", st)
	}
	if keys, err := ks.IdentityKeys(t.Context(), "alice"); err != nil || !bytes.Equal(keys[1], identity) {
		t.Errorf("IdentityKeys = %x, %v; want the first identity", keys[1], err)
	}
	// A prefix or an extension of the key is another key.
	for _, k := range [][]byte{identity[:32], append(bytes.Clone(identity), 0), nil} {
		if _, err := ks.PutKeys(t.Context(), a1, accounts.KeyUpload{IdentityKey: k}); !errors.Is(err, accounts.ErrIdentityMismatch) {
			t.Errorf("PutKeys with identity %x: error %v, want ErrIdentityMismatch", k, err)
		}
	}
	// Another device of the same user has its own identity.
	d2, _ := addDevice(t, s, "alice", "laptop")
	put(t, ks, ident.Device{User: "alice", ID: d2.ID}, fullUpload(other, 1, 1, 1))
	keys, err := ks.IdentityKeys(t.Context(), "alice")
	if err != nil || len(keys) != 2 || !bytes.Equal(keys[1], identity) || !bytes.Equal(keys[d2.ID], other) {
		t.Errorf("IdentityKeys = %x, %v; want each device's own", keys, err)
	}
}

func testKeysRotation(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	put(t, ks, a1, fullUpload(identity, 1, 1, 3))
	spk2 := &accounts.SignedPreKey{ID: 2, PublicKey: pubKey(), Signature: randKey(64)}
	if n := put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity, SignedPreKey: spk2, RegistrationID: u32(99)}); n != 3 {
		t.Errorf("PutKeys(rotation) = %d, want 3 (one-time prekeys untouched)", n)
	}
	st := status(t, ks, a1)
	if st.SignedPreKeyID != 2 || st.RegistrationID != 99 {
		t.Errorf("KeyStatus after rotation = %+v, want signed prekey 2, registration 99", st)
	}
	b := take(t, ks, "alice", 1)
	if len(b) != 1 || b[0].SignedPreKey == nil || b[0].SignedPreKey.ID != 2 ||
		!bytes.Equal(b[0].SignedPreKey.PublicKey, spk2.PublicKey) || !bytes.Equal(b[0].SignedPreKey.Signature, spk2.Signature) {
		t.Errorf("bundle after rotation = %+v, want signed prekey %+v", b, spk2)
	}
	// Rotating to a key with the same id replaces it too.
	spk3 := &accounts.SignedPreKey{ID: 2, PublicKey: pubKey(), Signature: randKey(64)}
	put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity, SignedPreKey: spk3})
	if b := take(t, ks, "alice", 1); !bytes.Equal(b[0].SignedPreKey.PublicKey, spk3.PublicKey) {
		t.Errorf("bundle after re-rotation has signed prekey %x, want %x", b[0].SignedPreKey.PublicKey, spk3.PublicKey)
	}
}

func testKeysPreKeyExists(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	put(t, ks, a1, fullUpload(identity, 1, 1, 3)) // ids 1, 2, 3
	for name, pks := range map[string][]accounts.PreKey{
		"a held id":             {{ID: 2, PublicKey: pubKey()}},
		"a new and a held id":   {{ID: 50, PublicKey: pubKey()}, {ID: 3, PublicKey: pubKey()}},
		"one new id twice":      {{ID: 60, PublicKey: pubKey()}, {ID: 60, PublicKey: pubKey()}},
		"new ids and a dup one": append(preKeys(70, 5), accounts.PreKey{ID: 72, PublicKey: pubKey()}),
	} {
		spk := &accounts.SignedPreKey{ID: 9, PublicKey: pubKey(), Signature: randKey(64)}
		_, err := ks.PutKeys(t.Context(), a1, accounts.KeyUpload{IdentityKey: identity, SignedPreKey: spk, OneTimePreKeys: pks})
		if !errors.Is(err, accounts.ErrPreKeyExists) {
			t.Errorf("PutKeys with %s: error %v, want ErrPreKeyExists", name, err)
		}
	}
	// All or nothing: neither the new ids nor the signed prekey were kept.
	if st := status(t, ks, a1); st.OneTimePreKeys != 3 || st.SignedPreKeyID != 1 {
		t.Errorf("KeyStatus after refused uploads = %+v, want 3 one-time prekeys and signed prekey 1", st)
	}
	// Once handed out, an id may be uploaded again (clients wrap ids).
	if b := take(t, ks, "alice", 0); b[0].OneTimePreKey == nil || b[0].OneTimePreKey.ID != 1 {
		t.Fatalf("TakeBundles gave %+v, want prekey 1", b[0].OneTimePreKey)
	}
	if n := put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(1, 1)}); n != 3 {
		t.Errorf("PutKeys(id 1 again after it was taken) = %d, want 3", n)
	}
	// Ids are per device: another device may hold the same ones.
	d2, _ := addDevice(t, s, "alice", "laptop")
	put(t, ks, ident.Device{User: "alice", ID: d2.ID}, fullUpload(pubKey(), 1, 1, 3))
}

func testKeysLimit(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	max := accounts.MaxOneTimePreKeys
	put(t, ks, a1, fullUpload(identity, 1, 0, max-10))
	if _, err := ks.PutKeys(t.Context(), a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(max, 11)}); !errors.Is(err, accounts.ErrTooManyPreKeys) {
		t.Errorf("PutKeys over the limit: error %v, want ErrTooManyPreKeys", err)
	}
	if st := status(t, ks, a1); st.OneTimePreKeys != max-10 {
		t.Errorf("after a refused upload the device holds %d, want %d", st.OneTimePreKeys, max-10)
	}
	if n := put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(max, 10)}); n != max {
		t.Errorf("PutKeys up to the limit = %d, want %d", n, max)
	}
	if _, err := ks.PutKeys(t.Context(), a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(5000, 1)}); !errors.Is(err, accounts.ErrTooManyPreKeys) {
		t.Errorf("PutKeys of one more: error %v, want ErrTooManyPreKeys", err)
	}
	// A fetch makes room for one.
	take(t, ks, "alice", 1)
	if n := put(t, ks, a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(5000, 1)}); n != max {
		t.Errorf("PutKeys after a fetch = %d, want %d", n, max)
	}
	// The first upload is limited too.
	d2, _ := addDevice(t, s, "alice", "laptop")
	if _, err := ks.PutKeys(t.Context(), ident.Device{User: "alice", ID: d2.ID}, fullUpload(pubKey(), 1, 0, max+1)); !errors.Is(err, accounts.ErrTooManyPreKeys) {
		t.Errorf("first PutKeys over the limit: error %v, want ErrTooManyPreKeys", err)
	}
	if st := status(t, ks, ident.Device{User: "alice", ID: d2.ID}); st.IdentityKey != nil {
		t.Errorf("a refused first upload set the identity: %+v", st)
	}
}

func testKeysTakeOrderAndExhaustion(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	up := fullUpload(identity, 1, 0, 0)
	up.OneTimePreKeys = []accounts.PreKey{{ID: 30, PublicKey: pubKey()}, {ID: 10, PublicKey: pubKey()}, {ID: 20, PublicKey: pubKey()}}
	put(t, ks, a1, up)
	for i, want := range []uint32{10, 20, 30} {
		b := take(t, ks, "alice", 0)
		if len(b) != 1 || b[0].OneTimePreKey == nil || b[0].OneTimePreKey.ID != want {
			t.Fatalf("fetch %d: %+v, want one-time prekey %d", i, b, want)
		}
		if b[0].Remaining != 2-i {
			t.Errorf("fetch %d: Remaining %d, want %d", i, b[0].Remaining, 2-i)
		}
	}
	// Exhausted: the signed prekey alone, as often as asked.
	for range 3 {
		b := take(t, ks, "alice", 0)
		if len(b) != 1 || b[0].OneTimePreKey != nil || b[0].Remaining != 0 {
			t.Errorf("fetch after exhaustion: %+v, want no one-time prekey and 0 remaining", b)
		}
		if b[0].SignedPreKey == nil || b[0].SignedPreKey.ID != 1 || !bytes.Equal(b[0].IdentityKey, identity) {
			t.Errorf("fetch after exhaustion: %+v, want the identity and signed prekey still", b)
		}
	}
	if st := status(t, ks, a1); st.OneTimePreKeys != 0 {
		t.Errorf("KeyStatus after exhaustion: %d one-time prekeys", st.OneTimePreKeys)
	}
}

func testKeysBundlesOfAllDevices(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	ctx := t.Context()
	create(t, s, "bob")
	d2, _ := addDevice(t, s, "bob", "tablet")
	d3, _ := addDevice(t, s, "bob", "laptop")
	d4, _ := addDevice(t, s, "bob", "old")
	id1, id3, id4 := pubKey(), pubKey(), pubKey()
	put(t, ks, ident.Device{User: "bob", ID: 1}, fullUpload(id1, 1, 1, 2))
	put(t, ks, ident.Device{User: "bob", ID: d3.ID}, fullUpload(id3, 1, 1, 2))
	put(t, ks, ident.Device{User: "bob", ID: d4.ID}, fullUpload(id4, 1, 1, 2))
	removeDevice(t, s, "bob", d4.ID)

	bs := take(t, ks, "bob", 0)
	if len(bs) != 3 || bs[0].Device != 1 || bs[1].Device != d2.ID || bs[2].Device != d3.ID {
		t.Fatalf("TakeBundles(bob) devices = %+v, want [1 %d %d] in order", bs, d2.ID, d3.ID)
	}
	if !bytes.Equal(bs[0].IdentityKey, id1) || bs[0].OneTimePreKey == nil || bs[0].Remaining != 1 {
		t.Errorf("bundle of bob.1 = %+v", bs[0])
	}
	if b := bs[1]; b.IdentityKey != nil || b.SignedPreKey != nil || b.OneTimePreKey != nil || b.RegistrationID != 0 || b.Remaining != 0 {
		t.Errorf("bundle of bob.%d, which uploaded nothing = %+v, want no keys", d2.ID, b)
	}
	if !bytes.Equal(bs[2].IdentityKey, id3) || bs[2].OneTimePreKey == nil || bs[2].Remaining != 1 {
		t.Errorf("bundle of bob.%d = %+v", d3.ID, bs[2])
	}

	// One device only: only its prekey is taken.
	one := take(t, ks, "bob", d3.ID)
	if len(one) != 1 || one[0].Device != d3.ID || one[0].Remaining != 0 {
		t.Errorf("TakeBundles(bob, %d) = %+v, want bob.%d with 0 remaining", d3.ID, one, d3.ID)
	}
	if st := status(t, ks, ident.Device{User: "bob", ID: 1}); st.OneTimePreKeys != 1 {
		t.Errorf("a fetch of bob.%d took a prekey of bob.1: %d left, want 1", d3.ID, st.OneTimePreKeys)
	}
	for _, dev := range []uint32{d4.ID, d4.ID + 100} {
		if bs := take(t, ks, "bob", dev); len(bs) != 0 {
			t.Errorf("TakeBundles(bob, %d), a removed or missing device = %+v, want none", dev, bs)
		}
	}
	if _, err := ks.TakeBundles(ctx, "nobody", 0); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("TakeBundles(unknown user): error %v, want ErrNotFound", err)
	}
	if _, err := ks.TakeBundles(ctx, "Not A Name", 0); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("TakeBundles(invalid name): error %v, want ErrNotFound", err)
	}
	if _, err := ks.IdentityKeys(ctx, "nobody"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("IdentityKeys(unknown user): error %v, want ErrNotFound", err)
	}
	keys, err := ks.IdentityKeys(ctx, "bob")
	if err != nil || len(keys) != 2 || !bytes.Equal(keys[1], id1) || !bytes.Equal(keys[d3.ID], id3) {
		t.Errorf("IdentityKeys(bob) = %x, %v; want bob.1 and bob.%d only", keys, err, d3.ID)
	}
	// A user without devices has no bundles, and is no error.
	for _, d := range devices(t, s, "bob") {
		removeDevice(t, s, "bob", d.ID)
	}
	if bs := take(t, ks, "bob", 0); len(bs) != 0 {
		t.Errorf("TakeBundles of a user without devices = %+v, want none", bs)
	}
	if keys, err := ks.IdentityKeys(ctx, "bob"); err != nil || len(keys) != 0 {
		t.Errorf("IdentityKeys of a user without devices = %x, %v; want none", keys, err)
	}
}

func testKeysUnknownDevice(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	ctx := t.Context()
	create(t, s, "alice")
	up := fullUpload(pubKey(), 1, 1, 1)
	for _, dev := range []ident.Device{{User: "alice", ID: 2}, {User: "bob", ID: 1}, {User: "Bad Name", ID: 1}} {
		if _, err := ks.PutKeys(ctx, dev, up); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("PutKeys(%s): error %v, want ErrNotFound", dev, err)
		}
		if _, err := ks.KeyStatus(ctx, dev); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("KeyStatus(%s): error %v, want ErrNotFound", dev, err)
		}
	}
}

func testKeysRemoveDeviceDropsKeys(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	ctx := t.Context()
	create(t, s, "alice")
	d2, _ := addDevice(t, s, "alice", "laptop")
	a2 := ident.Device{User: "alice", ID: d2.ID}
	identity := pubKey()
	put(t, ks, a2, fullUpload(identity, 1, 1, 10))
	put(t, ks, ident.Device{User: "alice", ID: 1}, fullUpload(pubKey(), 1, 1, 10))
	removeDevice(t, s, "alice", d2.ID)
	if _, err := ks.KeyStatus(ctx, a2); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("KeyStatus of a removed device: error %v, want ErrNotFound", err)
	}
	if _, err := ks.PutKeys(ctx, a2, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(100, 1)}); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("PutKeys of a removed device: error %v, want ErrNotFound", err)
	}
	keys, err := ks.IdentityKeys(ctx, "alice")
	if err != nil || len(keys) != 1 || keys[1] == nil {
		t.Errorf("IdentityKeys after removing alice.%d = %x, %v; want alice.1's only", d2.ID, keys, err)
	}
	bs := take(t, ks, "alice", 0)
	if len(bs) != 1 || bs[0].Device != 1 || bs[0].Remaining != 9 {
		t.Errorf("TakeBundles after removal = %+v, want alice.1 only, untouched by the removal", bs)
	}
	// The other device's keys are whole.
	if st := status(t, ks, ident.Device{User: "alice", ID: 1}); st.OneTimePreKeys != 9 || st.IdentityKey == nil {
		t.Errorf("KeyStatus(alice.1) = %+v", st)
	}
}

func testKeysNotAliased(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	up := fullUpload(bytes.Clone(identity), 1, 1, 2)
	wantSPK := bytes.Clone(up.SignedPreKey.PublicKey)
	wantPK := bytes.Clone(up.OneTimePreKeys[0].PublicKey)
	put(t, ks, a1, up)
	clear(up.IdentityKey)
	clear(up.SignedPreKey.PublicKey)
	clear(up.OneTimePreKeys[0].PublicKey)
	st := status(t, ks, a1)
	if !bytes.Equal(st.IdentityKey, identity) {
		t.Fatalf("identity changed with the caller's buffer: %x", st.IdentityKey)
	}
	clear(st.IdentityKey)
	b := take(t, ks, "alice", 0)[0]
	if !bytes.Equal(b.IdentityKey, identity) || !bytes.Equal(b.SignedPreKey.PublicKey, wantSPK) || !bytes.Equal(b.OneTimePreKey.PublicKey, wantPK) {
		t.Errorf("stored keys changed with the caller's buffers: %+v", b)
	}
}

// testKeysConcurrentTake has many goroutines fetch one device's bundle at
// once: no one-time prekey is handed out twice, every one is handed out,
// and the counts reported are exact (each count from N-1 down to 0 is seen
// by exactly one fetch), which the low-prekey notice relies on.
func testKeysConcurrentTake(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "bob")
	const n, workers, each = 120, 12, 12 // 144 fetches for 120 prekeys
	put(t, ks, ident.Device{User: "bob", ID: 1}, fullUpload(pubKey(), 1, 1, n))
	var (
		mu        sync.Mutex
		got       = map[uint32]int{}
		remaining = map[int]int{}
		empty     int
		errs      []error
		wg        sync.WaitGroup
		start     = make(chan struct{})
	)
	for w := range workers {
		wg.Go(func() {
			<-start
			for range each {
				bs, err := ks.TakeBundles(t.Context(), "bob", 0)
				mu.Lock()
				switch {
				case err != nil:
					errs = append(errs, fmt.Errorf("worker %d: %w", w, err))
				case len(bs) != 1:
					errs = append(errs, fmt.Errorf("worker %d: %d bundles", w, len(bs)))
				case bs[0].OneTimePreKey == nil:
					empty++
					if bs[0].Remaining != 0 {
						errs = append(errs, fmt.Errorf("no prekey but %d remaining", bs[0].Remaining))
					}
				default:
					got[bs[0].OneTimePreKey.ID]++
					remaining[bs[0].Remaining]++
				}
				mu.Unlock()
			}
		})
	}
	close(start)
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	for id, c := range got {
		if c > 1 {
			t.Errorf("one-time prekey %d handed out %d times", id, c)
		}
	}
	if len(got) != n || empty != workers*each-n {
		t.Errorf("%d distinct prekeys handed out and %d empty fetches, want %d and %d", len(got), empty, n, workers*each-n)
	}
	for r := range n {
		if remaining[r] != 1 {
			t.Errorf("%d fetches reported %d remaining, want exactly 1", remaining[r], r)
		}
	}
}

// testKeysConcurrentTakeManyDevices fetches all of a user's devices from
// many goroutines while the devices upload more: nothing deadlocks, and no
// prekey of any device is handed out twice.
func testKeysConcurrentTakeManyDevices(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "bob")
	devs := []uint32{1}
	for range 3 {
		d, _ := addDevice(t, s, "bob", "dev")
		devs = append(devs, d.ID)
	}
	identities := map[uint32][]byte{}
	for _, d := range devs {
		identities[d] = pubKey()
		put(t, ks, ident.Device{User: "bob", ID: d}, fullUpload(identities[d], 1, 1, 30))
	}
	var (
		mu   sync.Mutex
		got  = map[[2]uint32]int{}
		errs []error
		wg   sync.WaitGroup
	)
	for w := range 8 {
		wg.Go(func() {
			for range 10 {
				bs, err := ks.TakeBundles(t.Context(), "bob", 0)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				}
				for _, b := range bs {
					if b.OneTimePreKey != nil {
						got[[2]uint32{b.Device, b.OneTimePreKey.ID}]++
					}
				}
				mu.Unlock()
			}
		})
		// Each device uploads more in the meantime, from other goroutines.
		d := devs[w%len(devs)]
		wg.Go(func() {
			up := accounts.KeyUpload{IdentityKey: identities[d], OneTimePreKeys: preKeys(1000+w*10, 10)}
			if _, err := ks.PutKeys(t.Context(), ident.Device{User: "bob", ID: d}, up); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	for k, c := range got {
		if c > 1 {
			t.Errorf("prekey %d of bob.%d handed out %d times", k[1], k[0], c)
		}
	}
	total := 0
	for _, d := range devs {
		total += status(t, ks, ident.Device{User: "bob", ID: d}).OneTimePreKeys
	}
	if want := len(devs)*30 + 8*10 - len(got); total != want {
		t.Errorf("devices hold %d one-time prekeys after %d were taken, want %d", total, len(got), want)
	}
}

func testKeysConcurrentPut(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	put(t, ks, a1, fullUpload(identity, 1, 0, 0))
	const workers, each = 8, 50
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			if _, err := ks.PutKeys(t.Context(), a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(w*each, each)}); err != nil {
				t.Errorf("worker %d: %v", w, err)
			}
		})
	}
	wg.Wait()
	if st := status(t, ks, a1); st.OneTimePreKeys != workers*each {
		t.Errorf("after concurrent uploads the device holds %d, want %d", st.OneTimePreKeys, workers*each)
	}
}

// testKeysConcurrentPutOverLimit: concurrent uploads that together exceed
// the limit; the limit holds exactly.
func testKeysConcurrentPutOverLimit(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	identity := pubKey()
	put(t, ks, a1, fullUpload(identity, 1, 0, 0))
	const each = 100
	workers := accounts.MaxOneTimePreKeys/each + 3
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		ok, over int
	)
	for w := range workers {
		wg.Go(func() {
			_, err := ks.PutKeys(t.Context(), a1, accounts.KeyUpload{IdentityKey: identity, OneTimePreKeys: preKeys(w*each, each)})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
			case errors.Is(err, accounts.ErrTooManyPreKeys):
				over++
			default:
				t.Errorf("worker %d: %v", w, err)
			}
		})
	}
	wg.Wait()
	if ok != accounts.MaxOneTimePreKeys/each || over != 3 {
		t.Errorf("%d uploads accepted and %d refused as too many, want %d and 3", ok, over, accounts.MaxOneTimePreKeys/each)
	}
	if st := status(t, ks, a1); st.OneTimePreKeys != accounts.MaxOneTimePreKeys {
		t.Errorf("the device holds %d one-time prekeys, want %d", st.OneTimePreKeys, accounts.MaxOneTimePreKeys)
	}
}

// testKeysConcurrentFirstUpload: racing first uploads with different
// identities; exactly one identity wins and the others are mismatches.
func testKeysConcurrentFirstUpload(t *testing.T, s accounts.Store) {
	ks := keyStore(t, s)
	create(t, s, "alice")
	a1 := ident.Device{User: "alice", ID: 1}
	const n = 8
	var (
		ids   [n][]byte
		errs  [n]error
		wg    sync.WaitGroup
		start = make(chan struct{})
	)
	for i := range n {
		ids[i] = pubKey()
		up := fullUpload(ids[i], uint32(i), i*10, 5)
		wg.Go(func() {
			<-start
			_, errs[i] = ks.PutKeys(t.Context(), a1, up)
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Errorf("first uploads %d and %d both succeeded with different identities", winner, i)
			}
			winner = i
		case !errors.Is(err, accounts.ErrIdentityMismatch):
			t.Errorf("upload %d: %v, want nil or ErrIdentityMismatch", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no first upload succeeded")
	}
	st := status(t, ks, a1)
	if !bytes.Equal(st.IdentityKey, ids[winner]) || st.SignedPreKeyID != uint32(winner) || st.OneTimePreKeys != 5 {
		t.Errorf("KeyStatus = %+v, want the winner's (%d) keys only", st, winner)
	}
}
