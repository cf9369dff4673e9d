// Package accountstest is the conformance suite every accounts.Store backend
// must pass, accounts.KeyStore included. It tests only the contract written in package accounts (and the
// naming rules of package ident), never a backend's internals, so that a
// SQLite and a PostgreSQL store are held to exactly the same behaviour.
package accountstest

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// Run runs the conformance suite. open must return a new, empty store each
// time it is called; the suite closes every store it opens (open should
// not arrange to close it too). Subtests run in parallel, each with its own
// store.
func Run(t *testing.T, open func(t *testing.T) accounts.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s accounts.Store)
	}{
		{"CreateAndGetUser", testCreateAndGetUser},
		{"UnknownUser", testUnknownUser},
		{"DuplicateName", testDuplicateName},
		{"ConcurrentCreateSameName", testConcurrentCreateSameName},
		{"BadNames", testBadNames},
		{"DevicesInIDOrder", testDevicesInIDOrder},
		{"AddDeviceUnknownUser", testAddDeviceUnknownUser},
		{"DeviceIDsNeverReused", testDeviceIDsNeverReused},
		{"DeviceIDsPerUser", testDeviceIDsPerUser},
		{"RemoveDevice", testRemoveDevice},
		{"CredentialHash", testCredentialHash},
		{"CredentialRoundtrip", testCredentialRoundtrip},
		{"HashNotAliased", testHashNotAliased},
		{"SetLastSeen", testSetLastSeen},
		{"TimestampsUTC", testTimestampsUTC},
		{"ConcurrentAddDevice", testConcurrentAddDevice},
	}
	for _, tc := range append(tests, keyTests...) {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			tc.fn(t, s)
		})
	}
}

// create makes a user with a fresh credential and returns the credential.
func create(t *testing.T, s accounts.Store, name string) (accounts.User, accounts.Device, string) {
	t.Helper()
	cred, hash := accounts.NewCredential()
	u, d, err := s.CreateUser(t.Context(), name, name+"-phone", hash)
	if err != nil {
		t.Fatalf("CreateUser(%q): %v", name, err)
	}
	return u, d, cred
}

func addDevice(t *testing.T, s accounts.Store, user, devName string) (accounts.Device, string) {
	t.Helper()
	cred, hash := accounts.NewCredential()
	d, err := s.AddDevice(t.Context(), user, devName, hash)
	if err != nil {
		t.Fatalf("AddDevice(%q, %q): %v", user, devName, err)
	}
	return d, cred
}

func removeDevice(t *testing.T, s accounts.Store, user string, id uint32) {
	t.Helper()
	if err := s.RemoveDevice(t.Context(), ident.Device{User: user, ID: id}); err != nil {
		t.Fatalf("RemoveDevice(%s.%d): %v", user, id, err)
	}
}

func devices(t *testing.T, s accounts.Store, user string) []accounts.Device {
	t.Helper()
	devs, err := s.Devices(t.Context(), user)
	if err != nil {
		t.Fatalf("Devices(%q): %v", user, err)
	}
	return devs
}

func ids(devs []accounts.Device) []uint32 {
	out := make([]uint32, len(devs))
	for i, d := range devs {
		out[i] = d.ID
	}
	return out
}

// checkNow checks that a timestamp a store just assigned is about now. The
// slack allows for a backend that uses its database server's clock.
func checkNow(t *testing.T, what string, got, before, after time.Time) {
	t.Helper()
	const slack = time.Minute
	if got.Before(before.Add(-slack)) || got.After(after.Add(slack)) {
		t.Errorf("%s = %v, want about %v", what, got, before)
	}
}

func testCreateAndGetUser(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	_, hash := accounts.NewCredential()
	before := time.Now()
	u, d, err := s.CreateUser(ctx, "alice", "laptop", hash)
	after := time.Now()
	if err != nil {
		t.Fatalf("CreateUser: %v", err)
	}
	if u.Name != "alice" {
		t.Errorf("CreateUser user name = %q, want alice", u.Name)
	}
	if !u.LastSeen.IsZero() {
		t.Errorf("new user LastSeen = %v, want zero", u.LastSeen)
	}
	checkNow(t, "User.Created", u.Created, before, after)
	if d.ID != 1 || d.Name != "laptop" {
		t.Errorf("primary device = {ID:%d Name:%q}, want {ID:1 Name:laptop}", d.ID, d.Name)
	}
	checkNow(t, "Device.Created", d.Created, before, after)

	got, err := s.User(ctx, "alice")
	if err != nil {
		t.Fatalf("User: %v", err)
	}
	if got.Name != u.Name || !got.Created.Equal(u.Created) || !got.LastSeen.IsZero() {
		t.Errorf("User = %+v, want %+v (as returned by CreateUser)", got, u)
	}
	devs := devices(t, s, "alice")
	if len(devs) != 1 || devs[0].ID != 1 || devs[0].Name != "laptop" || !devs[0].Created.Equal(d.Created) {
		t.Errorf("Devices = %+v, want [%+v]", devs, d)
	}
}

func testUnknownUser(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	create(t, s, "alice")
	if _, err := s.User(ctx, "bob"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("User(unknown) error = %v, want ErrNotFound", err)
	}
	if _, err := s.Devices(ctx, "bob"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("Devices(unknown) error = %v, want ErrNotFound", err)
	}
}

func testDuplicateName(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	_, _, cred := create(t, s, "alice")
	_, hash := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "other", hash); !errors.Is(err, accounts.ErrExists) {
		t.Fatalf("second CreateUser(alice) error = %v, want ErrExists", err)
	}
	// The failed attempt must not have touched the existing account.
	devs := devices(t, s, "alice")
	if len(devs) != 1 || devs[0].Name != "alice-phone" {
		t.Errorf("Devices after duplicate = %+v, want only the original device", devs)
	}
	h, err := s.CredentialHash(ctx, ident.Device{User: "alice", ID: 1})
	if err != nil || !accounts.CheckCredential(cred, h) {
		t.Errorf("original credential no longer checks out after duplicate (err %v)", err)
	}
}

func testConcurrentCreateSameName(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	const n = 16
	var (
		creds [n]string
		errs  [n]error
		start = make(chan struct{})
		wg    sync.WaitGroup
	)
	for i := range n {
		cred, hash := accounts.NewCredential()
		creds[i] = cred
		wg.Go(func() {
			<-start
			_, _, errs[i] = s.CreateUser(ctx, "carol", fmt.Sprintf("dev%d", i), hash)
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Errorf("creators %d and %d both succeeded", winner, i)
			}
			winner = i
		case !errors.Is(err, accounts.ErrExists):
			t.Errorf("creator %d: error %v, want nil or ErrExists", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no creator succeeded")
	}
	devs := devices(t, s, "carol")
	if want := fmt.Sprintf("dev%d", winner); len(devs) != 1 || devs[0].ID != 1 || devs[0].Name != want {
		t.Errorf("Devices = %+v, want only device 1 %q of the winner", devs, want)
	}
	h, err := s.CredentialHash(ctx, ident.Device{User: "carol", ID: 1})
	if err != nil || !accounts.CheckCredential(creds[winner], h) {
		t.Errorf("stored credential is not the winner's (err %v)", err)
	}
}

func testBadNames(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	bad := []string{
		"", "Alice", "ALICE", "-alice", "_alice", "al ice", "al.ice", "al@ice",
		"alice\x00", "élise", strings.Repeat("a", ident.MaxUserLen+1),
	}
	for _, name := range bad {
		_, hash := accounts.NewCredential()
		if _, _, err := s.CreateUser(ctx, name, "dev", hash); !errors.Is(err, ident.ErrBadUser) {
			t.Errorf("CreateUser(%q) error = %v, want ident.ErrBadUser", name, err)
		}
	}
	// The boundaries of the rules are accepted.
	good := []string{"a", "0", "a-_", "9lives", strings.Repeat("z", ident.MaxUserLen)}
	for _, name := range good {
		_, hash := accounts.NewCredential()
		if _, _, err := s.CreateUser(ctx, name, "dev", hash); err != nil {
			t.Errorf("CreateUser(%q): %v", name, err)
		}
	}
}

func testDevicesInIDOrder(t *testing.T, s accounts.Store) {
	create(t, s, "alice")
	want := []accounts.Device{devices(t, s, "alice")[0]}
	for i := range 9 {
		d, _ := addDevice(t, s, "alice", fmt.Sprintf("dev%d", i))
		want = append(want, d)
	}
	got := devices(t, s, "alice")
	if !slices.IsSortedFunc(got, func(a, b accounts.Device) int { return int(a.ID) - int(b.ID) }) {
		t.Errorf("Devices ids %v are not in increasing order", ids(got))
	}
	if len(got) != len(want) {
		t.Fatalf("Devices returned %d devices, want %d", len(got), len(want))
	}
	slices.SortFunc(want, func(a, b accounts.Device) int { return int(a.ID) - int(b.ID) })
	for i := range want {
		if got[i].ID != want[i].ID || got[i].Name != want[i].Name || !got[i].Created.Equal(want[i].Created) {
			t.Errorf("Devices[%d] = %+v, want %+v", i, got[i], want[i])
		}
	}
}

func testAddDeviceUnknownUser(t *testing.T, s accounts.Store) {
	create(t, s, "alice")
	_, hash := accounts.NewCredential()
	if _, err := s.AddDevice(t.Context(), "bob", "dev", hash); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("AddDevice(unknown user) error = %v, want ErrNotFound", err)
	}
	if _, err := s.User(t.Context(), "bob"); !errors.Is(err, accounts.ErrNotFound) {
		t.Errorf("AddDevice(unknown user) created the user: User error = %v", err)
	}
}

func testDeviceIDsNeverReused(t *testing.T, s accounts.Store) {
	create(t, s, "alice")
	seen := map[uint32]bool{1: true}
	add := func() uint32 {
		t.Helper()
		d, _ := addDevice(t, s, "alice", "dev")
		if seen[d.ID] {
			t.Fatalf("AddDevice reused id %d (ids so far %v)", d.ID, slices.Sorted(maps.Keys(seen)))
		}
		if d.ID == 0 {
			t.Fatal("AddDevice returned id 0")
		}
		seen[d.ID] = true
		return d.ID
	}
	a := add()
	b := add()
	// Removing the newest device must not free its id...
	removeDevice(t, s, "alice", b)
	add()
	// ...nor removing an older one...
	removeDevice(t, s, "alice", a)
	add()
	// ...nor removing every device, the primary included.
	for _, d := range devices(t, s, "alice") {
		removeDevice(t, s, "alice", d.ID)
	}
	if devs := devices(t, s, "alice"); len(devs) != 0 {
		t.Errorf("Devices after removing all = %+v, want none", devs)
	}
	last := add()
	if devs := devices(t, s, "alice"); len(devs) != 1 || devs[0].ID != last {
		t.Errorf("Devices = %v, want [%d]", ids(devs), last)
	}
}

func testDeviceIDsPerUser(t *testing.T, s accounts.Store) {
	create(t, s, "alice")
	for range 3 {
		addDevice(t, s, "alice", "dev")
	}
	_, d, _ := create(t, s, "bob")
	if d.ID != 1 {
		t.Errorf("bob's primary device id = %d, want 1", d.ID)
	}
	// A user's devices are not affected by another user's.
	before := ids(devices(t, s, "alice"))
	addDevice(t, s, "bob", "dev")
	removeDevice(t, s, "bob", 1)
	if after := ids(devices(t, s, "alice")); !slices.Equal(before, after) {
		t.Errorf("alice's devices changed from %v to %v by bob's", before, after)
	}
}

func testRemoveDevice(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	create(t, s, "alice")
	d2, _ := addDevice(t, s, "alice", "tablet")
	removeDevice(t, s, "alice", 1)
	if devs := devices(t, s, "alice"); len(devs) != 1 || devs[0].ID != d2.ID {
		t.Errorf("Devices after removing 1 = %v, want [%d]", ids(devs), d2.ID)
	}
	for _, dev := range []ident.Device{
		{User: "alice", ID: 1},            // already removed
		{User: "alice", ID: d2.ID + 1000}, // never existed
		{User: "bob", ID: 1},              // no such user
	} {
		if err := s.RemoveDevice(ctx, dev); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("RemoveDevice(%s) error = %v, want ErrNotFound", dev, err)
		}
	}
	// The user outlives its devices.
	if _, err := s.User(ctx, "alice"); err != nil {
		t.Errorf("User after RemoveDevice: %v", err)
	}
}

func testCredentialHash(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	_, hash1 := accounts.NewCredential()
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash1); err != nil {
		t.Fatal(err)
	}
	_, hash2 := accounts.NewCredential()
	d2, err := s.AddDevice(ctx, "alice", "laptop", hash2)
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[uint32][]byte{1: hash1, d2.ID: hash2} {
		got, err := s.CredentialHash(ctx, ident.Device{User: "alice", ID: id})
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("CredentialHash(alice.%d) = %x, %v; want %x", id, got, err, want)
		}
	}
	removeDevice(t, s, "alice", d2.ID)
	for _, dev := range []ident.Device{
		{User: "alice", ID: d2.ID},     // removed
		{User: "alice", ID: d2.ID + 1}, // never existed
		{User: "bob", ID: 1},           // no such user
	} {
		if h, err := s.CredentialHash(ctx, dev); !errors.Is(err, accounts.ErrNotFound) {
			t.Errorf("CredentialHash(%s) = %x, %v; want ErrNotFound", dev, h, err)
		}
	}
	// Removing one device leaves the other's credential alone.
	if got, err := s.CredentialHash(ctx, ident.Device{User: "alice", ID: 1}); err != nil || !bytes.Equal(got, hash1) {
		t.Errorf("CredentialHash(alice.1) after removing alice.%d = %x, %v; want %x", d2.ID, got, err, hash1)
	}
}

func testCredentialRoundtrip(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	_, _, cred1 := create(t, s, "alice")
	d2, cred2 := addDevice(t, s, "alice", "laptop")
	_, _, credBob := create(t, s, "bob")
	check := func(dev ident.Device, cred string, want bool) {
		t.Helper()
		h, err := s.CredentialHash(ctx, dev)
		if err != nil {
			t.Fatalf("CredentialHash(%s): %v", dev, err)
		}
		if got := accounts.CheckCredential(cred, h); got != want {
			t.Errorf("CheckCredential(credential, hash of %s) = %v, want %v", dev, got, want)
		}
	}
	a1 := ident.Device{User: "alice", ID: 1}
	a2 := ident.Device{User: "alice", ID: d2.ID}
	b1 := ident.Device{User: "bob", ID: 1}
	check(a1, cred1, true)
	check(a2, cred2, true)
	check(b1, credBob, true)
	check(a1, cred2, false)
	check(a2, cred1, false)
	check(b1, cred1, false)
	check(a1, "", false)
	check(a1, cred1+"x", false)
}

func testHashNotAliased(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	_, hash := accounts.NewCredential()
	want := bytes.Clone(hash)
	if _, _, err := s.CreateUser(ctx, "alice", "phone", hash); err != nil {
		t.Fatal(err)
	}
	clear(hash) // the caller may reuse its buffer
	got, err := s.CredentialHash(ctx, ident.Device{User: "alice", ID: 1})
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("CredentialHash = %x, %v; want %x", got, err, want)
	}
	clear(got) // and may scribble on what it was given
	got, err = s.CredentialHash(ctx, ident.Device{User: "alice", ID: 1})
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("CredentialHash after modifying an earlier result = %x, %v; want %x", got, err, want)
	}
}

func testSetLastSeen(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	create(t, s, "alice")
	create(t, s, "bob")
	lastSeen := func(name string) time.Time {
		t.Helper()
		u, err := s.User(ctx, name)
		if err != nil {
			t.Fatalf("User(%q): %v", name, err)
		}
		return u.LastSeen
	}

	// A millisecond-aligned time round-trips exactly, whatever its zone.
	loc := time.FixedZone("UTC+5:30", 5*3600+1800)
	t1 := time.Date(2031, 3, 4, 5, 6, 7, 890_000_000, loc)
	if err := s.SetLastSeen(ctx, "alice", t1); err != nil {
		t.Fatalf("SetLastSeen: %v", err)
	}
	if got := lastSeen("alice"); !got.Equal(t1) {
		t.Errorf("LastSeen = %v, want %v", got, t1)
	}
	if got := lastSeen("bob"); !got.IsZero() {
		t.Errorf("bob's LastSeen = %v after setting alice's, want zero", got)
	}

	// Finer times are kept to at least millisecond precision.
	t2 := time.Now() // with a monotonic reading, which must not matter
	if err := s.SetLastSeen(ctx, "alice", t2); err != nil {
		t.Fatalf("SetLastSeen: %v", err)
	}
	got := lastSeen("alice")
	if d := got.Sub(t2.Round(0)).Abs(); d >= time.Millisecond {
		t.Errorf("LastSeen = %v, want %v to the millisecond (off by %v)", got, t2, d)
	}

	// Later calls overwrite, also with an earlier time.
	if err := s.SetLastSeen(ctx, "alice", t1); err != nil {
		t.Fatalf("SetLastSeen: %v", err)
	}
	if got := lastSeen("alice"); !got.Equal(t1) {
		t.Errorf("LastSeen after resetting = %v, want %v", got, t1)
	}
}

func testTimestampsUTC(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	u, d, _ := create(t, s, "alice")
	d2, _ := addDevice(t, s, "alice", "laptop")
	if err := s.SetLastSeen(ctx, "alice", time.Now().In(time.FixedZone("X", -7*3600))); err != nil {
		t.Fatal(err)
	}
	u2, err := s.User(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	check := func(what string, ts time.Time) {
		t.Helper()
		if ts.Location() != time.UTC {
			t.Errorf("%s = %v is in %v, want UTC", what, ts, ts.Location())
		}
	}
	check("CreateUser User.Created", u.Created)
	check("CreateUser Device.Created", d.Created)
	check("AddDevice Device.Created", d2.Created)
	check("User.Created", u2.Created)
	check("User.LastSeen", u2.LastSeen)
	for _, dev := range devices(t, s, "alice") {
		check(fmt.Sprintf("Devices[id %d].Created", dev.ID), dev.Created)
	}
}

func testConcurrentAddDevice(t *testing.T, s accounts.Store) {
	ctx := t.Context()
	create(t, s, "alice")
	const workers, perWorker = 16, 4
	var (
		mu   sync.Mutex
		got  = map[uint32]string{1: "primary"}
		errs []error
		wg   sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				name := fmt.Sprintf("w%d-%d", w, i)
				_, hash := accounts.NewCredential()
				d, err := s.AddDevice(ctx, "alice", name, hash)
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("AddDevice(%s): %w", name, err))
				} else if prev, dup := got[d.ID]; dup {
					errs = append(errs, fmt.Errorf("id %d given to both %s and %s", d.ID, prev, name))
				} else {
					got[d.ID] = name
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	devs := devices(t, s, "alice")
	if len(devs) != 1+workers*perWorker {
		t.Errorf("Devices returned %d devices, want %d", len(devs), 1+workers*perWorker)
	}
	for i, d := range devs {
		if i > 0 && d.ID <= devs[i-1].ID {
			t.Errorf("Devices ids not strictly increasing: %v", ids(devs))
			break
		}
		if want, ok := got[d.ID]; ok && d.ID != 1 && d.Name != want {
			t.Errorf("device %d is named %q, want %q", d.ID, d.Name, want)
		}
	}
}
