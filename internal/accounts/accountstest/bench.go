package accountstest

import (
	"bytes"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/ident"
)

// BenchTakeBundles measures prekey bundle fetches on an empty store s: a
// user with three devices, each fetch taking one one-time prekey of each
// (one transaction). "serial" fetches one user's bundles one after the
// other; "parallel" has GOMAXPROCS goroutines fetch the bundles of their
// own users. Devices are refilled, outside the timer, before they run out.
func BenchTakeBundles(b *testing.B, s accounts.Store) {
	ks, ok := s.(accounts.KeyStore)
	if !ok {
		b.Fatalf("%T does not implement accounts.KeyStore", s)
	}
	ctx := b.Context()
	key := func(seed uint32) []byte { return bytes.Repeat([]byte{byte(seed)}, 33) }
	var users atomic.Int64
	// newUser makes a user with three devices and returns its refill.
	newUser := func() (string, func()) {
		name := fmt.Sprintf("bench%d", users.Add(1))
		_, hash := accounts.NewCredential()
		if _, _, err := s.CreateUser(ctx, name, "phone", hash); err != nil {
			b.Fatal(err)
		}
		for range 2 {
			if _, err := s.AddDevice(ctx, name, "dev", hash); err != nil {
				b.Fatal(err)
			}
		}
		reg, next := uint32(1), uint32(0)
		return name, func() {
			for d := uint32(1); d <= 3; d++ {
				dev := ident.Device{User: name, ID: d}
				up := accounts.KeyUpload{IdentityKey: key(d), RegistrationID: &reg,
					SignedPreKey: &accounts.SignedPreKey{ID: 1, PublicKey: key(9), Signature: bytes.Repeat([]byte{7}, 64)}}
				st, err := ks.KeyStatus(ctx, dev)
				if err != nil {
					b.Fatal(err)
				}
				for i := st.OneTimePreKeys; i < accounts.MaxOneTimePreKeys; i++ {
					up.OneTimePreKeys = append(up.OneTimePreKeys, accounts.PreKey{ID: next, PublicKey: key(next)})
					next++
				}
				if _, err := ks.PutKeys(ctx, dev, up); err != nil {
					b.Fatal(err)
				}
			}
		}
	}
	fetch := func(b *testing.B, name string) {
		bs, err := ks.TakeBundles(ctx, name, 0)
		if err != nil || len(bs) != 3 || bs[0].OneTimePreKey == nil {
			b.Fatal(bs, err)
		}
	}
	b.Run("serial", func(b *testing.B) {
		name, fill := newUser()
		fill()
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if i++; i%(accounts.MaxOneTimePreKeys-1) == 0 {
				b.StopTimer()
				fill()
				b.StartTimer()
			}
			fetch(b, name)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		type user struct {
			name string
			fill func()
		}
		// RunParallel starts GOMAXPROCS goroutines: one user each, made
		// and filled before the timer starts.
		pool := make(chan user, runtime.GOMAXPROCS(0))
		for range cap(pool) {
			name, fill := newUser()
			fill()
			pool <- user{name, fill}
		}
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			u := <-pool
			defer func() { pool <- u }()
			name, fill := u.name, u.fill
			i := 0
			for pb.Next() {
				if i++; i%(accounts.MaxOneTimePreKeys-1) == 0 {
					fill() // rare; inside the timer (RunParallel cannot stop it)
				}
				fetch(b, name)
			}
		})
	})
}
