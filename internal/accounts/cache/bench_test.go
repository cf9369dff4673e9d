package cache

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/accounts/sqlite"
)

// BenchmarkDevices compares a device-list look-up on SQLite with the same
// look-up through the cache (all hits: 1,000 users of two devices each,
// looked up in turn), one goroutine and all of them.
//
//	go test -run '^$' -bench Devices -benchmem ./internal/accounts/cache/
func BenchmarkDevices(b *testing.B) {
	st, err := sqlite.Open(filepath.Join(b.TempDir(), "accounts.db"), sqlite.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	ctx := context.Background()
	users := make([]string, 1000)
	for i := range users {
		users[i] = fmt.Sprint("user", i)
		_, hash := accounts.NewCredential()
		if _, _, err := st.CreateUser(ctx, users[i], "phone", hash); err != nil {
			b.Fatal(err)
		}
		if _, err := st.AddDevice(ctx, users[i], "laptop", hash); err != nil {
			b.Fatal(err)
		}
	}
	c, err := New(st, Options{})
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range []struct {
		name  string
		store accounts.Store
	}{{"sqlite", st}, {"cached", c}} {
		b.Run(s.name, func(b *testing.B) {
			b.ReportAllocs()
			for i := range b.N {
				if _, err := s.store.Devices(ctx, users[i%len(users)]); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(s.name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				i := 0
				for pb.Next() {
					if _, err := s.store.Devices(ctx, users[i%len(users)]); err != nil {
						b.Error(err)
						return
					}
					i++
				}
			})
		})
	}
}

// BenchmarkEntryMemory reports the heap a held device list costs (two
// devices, short names), to size the cache.
func BenchmarkEntryMemory(b *testing.B) {
	const n = 100_000
	for range b.N {
		st := &fixed{}
		c, err := New(st, Options{Size: n})
		if err != nil {
			b.Fatal(err)
		}
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for i := range n {
			if _, err := c.Devices(context.Background(), fmt.Sprintf("user%07d", i)); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "B/entry")
		runtime.KeepAlive(c)
	}
}

// fixed answers every user with two devices, as a store would (fresh
// names and slices each time).
type fixed struct{ accounts.Store }

func (fixed) Devices(_ context.Context, user string) ([]accounts.Device, error) {
	return []accounts.Device{{ID: 1, Name: "phone " + user[:2]}, {ID: 2, Name: "laptop " + user[:2]}}, nil
}
