package auth

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/auth/authtest"
	"github.com/courier-im/courier/internal/ident"
)

// Fixed credentials, so that the seeds can hold the right ones and the
// fuzzer can work from a success.
const (
	fuzzCredAlice1 = "Vb1oPp9X2v3Ttd4u5gSxw0KkqLz8HhJjNnMmRrYyCc0"
	fuzzCredAlice2 = "aLICE2aLICE2aLICE2aLICE2aLICE2aLICE2aLICE2a"
	fuzzCredBob1   = "b0b1b0b1b0b1b0b1b0b1b0b1b0b1b0b1b0b1b0b1b0b"
)

var (
	fuzzOnce  sync.Once
	fuzzAuthn *Authenticator
	fuzzCreds = map[ident.Device]string{
		{User: "alice", ID: 1}: fuzzCredAlice1,
		{User: "alice", ID: 2}: fuzzCredAlice2,
		{User: "bob", ID: 1}:   fuzzCredBob1,
	}
)

// fuzzAuthenticator is shared by the fuzz runs of one process. Its limiter
// has a burst no run exhausts, so that every input reaches the credential
// check while the limiter's code still runs on it.
func fuzzAuthenticator(t testing.TB) *Authenticator {
	fuzzOnce.Do(func() {
		st := authtest.New()
		ctx := context.Background()
		if _, _, err := st.CreateUser(ctx, "alice", "a", accounts.HashCredential(fuzzCredAlice1)); err != nil {
			panic(err)
		}
		if _, err := st.AddDevice(ctx, "alice", "b", accounts.HashCredential(fuzzCredAlice2)); err != nil {
			panic(err)
		}
		if _, _, err := st.CreateUser(ctx, "bob", "c", accounts.HashCredential(fuzzCredBob1)); err != nil {
			panic(err)
		}
		fuzzAuthn = &Authenticator{Accounts: st, Limiter: NewLimiter(LimitConfig{Burst: 1 << 30, MaxKeys: 256})}
	})
	return fuzzAuthn
}

// checkAuth authenticates a request carrying header (if set) from remote,
// and checks the invariants: no panic, only the documented errors, and a
// success only for the exact device name and credential registered.
func checkAuth(t *testing.T, header, remote string) {
	a := fuzzAuthenticator(t)
	r := httptest.NewRequest("GET", "/v1/ws", nil)
	r.RemoteAddr = remote
	if header != "" {
		r.Header["Authorization"] = []string{header}
	}
	dev, err := a.Authenticate(context.Background(), r)
	if err != nil {
		if !errors.Is(err, ErrUnauthorized) && !errors.Is(err, ErrRateLimited) {
			t.Fatalf("Authorization %q: unexpected error %v", header, err)
		}
		if dev != (ident.Device{}) {
			t.Fatalf("Authorization %q: failed (%v) but returned %v", header, err, dev)
		}
		return
	}
	user, pass, ok := r.BasicAuth()
	if !ok {
		t.Fatalf("Authorization %q: authenticated as %v without Basic credentials", header, dev)
	}
	if user != dev.String() {
		t.Fatalf("Authorization %q: authenticated as %v, but the user name is %q", header, dev, user)
	}
	if want, known := fuzzCreds[dev]; !known || pass != want {
		t.Fatalf("Authorization %q: authenticated as %v with credential %q", header, dev, pass)
	}
}

func basic(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// authorizationHeaderSeeds are header values and source addresses.
func authorizationHeaderSeeds() [][2]string {
	var seeds [][2]string
	for _, s := range []string{
		basic("alice.1", fuzzCredAlice1),
		basic("alice.2", fuzzCredAlice2),
		basic("bob.1", fuzzCredBob1),
		basic("alice.1", fuzzCredBob1),
		basic("alice.01", fuzzCredAlice1),
		basic("alice.1", ""),
		basic("", fuzzCredAlice1),
		"basic " + base64.StdEncoding.EncodeToString([]byte("bob.1:"+fuzzCredBob1)),
		"Bearer " + fuzzCredAlice1,
		"Basic",
		"Basic !!!!",
		"",
	} {
		seeds = append(seeds, [2]string{s, "192.0.2.1:4000"})
	}
	return append(seeds, [2]string{basic("alice.1", fuzzCredAlice1), "[2001:db8::1]:443"})
}

// basicCredentialSeeds are device names and credentials.
func basicCredentialSeeds() [][2]string {
	seeds := [][2]string{
		{"alice.1", fuzzCredAlice1}, {"alice.2", fuzzCredAlice2}, {"bob.1", fuzzCredBob1},
		{"alice.1", fuzzCredBob1}, {"bob.1", fuzzCredAlice1}, {"alice.01", fuzzCredAlice1},
		{"alice.2", fuzzCredAlice1}, {"alice.3", fuzzCredAlice1}, {"alice.1", fuzzCredAlice1 + "="},
		{"alice.1", fuzzCredAlice1[:42]}, {"alice.1:x", fuzzCredAlice1}, {"Alice.1", fuzzCredAlice1},
	}
	return seeds
}

// FuzzAuthorizationHeader feeds raw Authorization header values.
func FuzzAuthorizationHeader(f *testing.F) {
	for _, s := range authorizationHeaderSeeds() {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, header, remote string) {
		checkAuth(t, header, remote)
	})
}

// FuzzBasicCredentials feeds device names and credentials (the fuzzer
// mutates them better than their base64 form).
func FuzzBasicCredentials(f *testing.F) {
	for _, s := range basicCredentialSeeds() {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, user, pass string) {
		checkAuth(t, basic(user, pass), "192.0.2.1:4000")
	})
}
