package e2e_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/internal/servertest"
)

func keyAPI(t *testing.T, creds client.Credentials) *client.KeyAPI {
	t.Helper()
	api, err := client.NewKeyAPI(creds, nil)
	if err != nil {
		t.Fatal(err)
	}
	return api
}

func TestPreKeyExhaustionAndRefill(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob")) // offline for now
	carol := keyAPI(t, register(t, srv, "carol"))

	st, err := keyAPI(t, bob.creds).Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.OneTimePreKeys != 100 {
		t.Fatalf("bob published %d one-time prekeys, want 100", st.OneTimePreKeys)
	}
	// carol drains them.
	for i := 0; i < st.OneTimePreKeys; i++ {
		if _, err := carol.Bundles(ctx, "bob", 0); err != nil {
			t.Fatalf("fetch %d: %v", i, err)
		}
	}
	bs, err := carol.Bundles(ctx, "bob", 0)
	if err == nil && (len(bs) != 1 || bs[0].OneTimePreKey != nil || bs[0].SignedPreKey == nil) {
		t.Fatalf("an exhausted device's bundle: %+v", bs)
	}

	// alice starts a session from the signed prekey alone.
	alice.start()
	alice.send("bob", "without a one-time prekey")
	bob.start()
	bob.waitMessage("alice", "without a one-time prekey")
	// bob was told of the low count, and refilled.
	bob.waitFor("KEYS_LOW", func() bool {
		return bob.count(func(ev client.Event) bool { _, ok := ev.(*client.KeysLowEvent); return ok }) > 0
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := keyAPI(t, bob.creds).Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.OneTimePreKeys == 100 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("bob has %d one-time prekeys after the refill, want 100", st.OneTimePreKeys)
		}
		time.Sleep(20 * time.Millisecond)
	}
	bob.send("alice", "refilled")
	alice.waitMessage("bob", "refilled")
}

func TestConcurrentBundleFetches(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	bob := newParty(t, register(t, srv, "bob"))
	apis := []*client.KeyAPI{keyAPI(t, register(t, srv, "carol")), keyAPI(t, register(t, srv, "dave"))}
	ids := make([]uint32, len(apis))
	var wg sync.WaitGroup
	for i, api := range apis {
		wg.Go(func() {
			bs, err := api.Bundles(ctx, "bob", 0)
			if err != nil || len(bs) != 1 || bs[0].OneTimePreKey == nil {
				t.Errorf("fetch: %+v, %v", bs, err)
				return
			}
			ids[i] = bs[0].OneTimePreKey.ID
		})
	}
	wg.Wait()
	if ids[0] == ids[1] {
		t.Fatalf("two fetchers got the same one-time prekey %d", ids[0])
	}

	// Two senders establish sessions with bob at the same moment.
	alice := newParty(t, register(t, srv, "alice"))
	erin := newParty(t, register(t, srv, "erin"))
	alice.start()
	erin.start()
	bob.start()
	for _, p := range []*party{alice, erin} {
		wg.Go(func() { p.send("bob", "hi from "+p.creds.User) })
	}
	wg.Wait()
	bob.waitMessage("alice", "hi from alice")
	bob.waitMessage("erin", "hi from erin")
	if n := len(bob.decryptErrors()); n != 0 {
		t.Fatalf("%d failures: %s", n, bob.describe())
	}
}

func TestOutboxExactlyOnceAcrossRestart(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	alice.start()
	bob.start()
	alice.send("bob", "before")
	bob.waitMessage("alice", "before")

	// Typed while the server is away, then alice quits.
	srv.Stop(t)
	for _, text := range []string{"typed offline 1", "typed offline 2"} {
		if _, err := alice.c.SendAsync("bob", []byte(text)); err != nil {
			t.Fatal(err)
		}
	}
	alice.stop()
	srv.Start(t)
	alice.start() // the outbox goes out
	bob.waitMessage("alice", "typed offline 1")
	bob.waitMessage("alice", "typed offline 2")
	// Another restart sends nothing again.
	alice.stop()
	alice.start()
	alice.send("bob", "after")
	bob.waitMessage("alice", "after")
	for _, text := range []string{"typed offline 1", "typed offline 2"} {
		if n := bob.countBody("alice", text); n != 1 {
			t.Fatalf("%q arrived %d times", text, n)
		}
	}
	if got := bob.messages("alice"); len(got) != 4 || got[1] != "typed offline 1" || got[2] != "typed offline 2" {
		t.Fatalf("bob got %q", got)
	}
}

func TestSignedPreKeyRotation(t *testing.T) {
	t.Parallel()
	srv := servertest.Start(t)
	ctx := context.Background()
	alice := newParty(t, register(t, srv, "alice"))
	bob := newParty(t, register(t, srv, "bob"))
	api := keyAPI(t, bob.creds)
	before, err := api.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	alice.start()
	bob.start()
	alice.send("bob", "before the rotation")
	bob.waitMessage("alice", "before the rotation")

	if err := bob.eng.RotateSignedPreKey(ctx); err != nil {
		t.Fatal(err)
	}
	after, err := api.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if before.SignedPreKeyID == nil || after.SignedPreKeyID == nil || *after.SignedPreKeyID == *before.SignedPreKeyID {
		t.Fatalf("signed prekey id %v, then %v: not rotated", before.SignedPreKeyID, after.SignedPreKeyID)
	}
	// The old session goes on; a new sender's session uses the new key.
	alice.send("bob", "after the rotation")
	bob.waitMessage("alice", "after the rotation")
	carol := newParty(t, register(t, srv, "carol"))
	carol.start()
	carol.send("bob", "new session")
	bob.waitMessage("carol", "new session")

	// A restart's Publish keeps a signed prekey younger than the maximum
	// age.
	bob.stop()
	bob.open()
	if err := bob.eng.Publish(ctx); err != nil {
		t.Fatal(err)
	}
	same, _ := api.Status(ctx)
	if *same.SignedPreKeyID != *after.SignedPreKeyID {
		t.Fatalf("Publish rotated a fresh signed prekey: %d, then %d", *after.SignedPreKeyID, *same.SignedPreKeyID)
	}
}
