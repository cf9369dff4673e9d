package server_test

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/courier-im/courier/internal/checker"
	"github.com/courier-im/courier/internal/mailbox/pebble"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// faultFS is the operating system's file system with a switch: while it
// holds an error, every write and sync to a write-ahead log file (*.log)
// fails with it, as on a file system remounted read-only (EROFS) or a full
// disk (ENOSPC). Running as root, chmod cannot make a directory read-only,
// so the fault is injected here. Only WAL files are hit: a failed MANIFEST
// write makes Pebble exit the process (see internal/mailbox/pebble's
// package documentation), which a test in this process cannot survive.
type faultFS struct {
	vfs.FS
	err atomic.Pointer[error]
}

func (fs *faultFS) set(err error) {
	if err == nil {
		fs.err.Store(nil)
		return
	}
	fs.err.Store(&err)
}

func (fs *faultFS) fault(name string) error {
	if p := fs.err.Load(); p != nil && strings.HasSuffix(name, ".log") {
		return *p
	}
	return nil
}

func (fs *faultFS) wrap(name string, f vfs.File, err error) (vfs.File, error) {
	if err != nil {
		return nil, err
	}
	return &faultFile{File: f, fs: fs, name: name}, nil
}

func (fs *faultFS) Create(name string, c vfs.DiskWriteCategory) (vfs.File, error) {
	if err := fs.fault(name); err != nil {
		return nil, err
	}
	f, err := fs.FS.Create(name, c)
	return fs.wrap(name, f, err)
}

func (fs *faultFS) OpenReadWrite(name string, c vfs.DiskWriteCategory, opts ...vfs.OpenOption) (vfs.File, error) {
	if err := fs.fault(name); err != nil {
		return nil, err
	}
	f, err := fs.FS.OpenReadWrite(name, c, opts...)
	return fs.wrap(name, f, err)
}

func (fs *faultFS) ReuseForWrite(oldname, newname string, c vfs.DiskWriteCategory) (vfs.File, error) {
	if err := fs.fault(newname); err != nil {
		return nil, err
	}
	f, err := fs.FS.ReuseForWrite(oldname, newname, c)
	return fs.wrap(newname, f, err)
}

type faultFile struct {
	vfs.File
	fs   *faultFS
	name string
}

func (f *faultFile) Write(p []byte) (int, error) {
	if err := f.fs.fault(f.name); err != nil {
		return 0, err
	}
	return f.File.Write(p)
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.fs.fault(f.name); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f *faultFile) Sync() error {
	if err := f.fs.fault(f.name); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f *faultFile) SyncData() error {
	if err := f.fs.fault(f.name); err != nil {
		return err
	}
	return f.File.SyncData()
}

func (f *faultFile) SyncTo(n int64) (bool, error) {
	if err := f.fs.fault(f.name); err != nil {
		return false, err
	}
	return f.File.SyncTo(n)
}

// TestFaultDiskUnderChecker runs a checker conversation through two storage
// faults: the disk filling up (the free-space guard refuses sends; space
// returns and they go through, no restart), then the data directory's file
// system failing writes with EROFS, as when remounted read-only (the store
// fails and refuses everything; the server is restarted on a healthy file
// system). During each fault a send is refused with storage_unavailable;
// the conversation's clients retry theirs, and at the end every accepted
// message must have been delivered exactly once, in order.
func TestFaultDiskUnderChecker(t *testing.T) {
	if testing.Short() {
		t.Skip("fault test skipped in -short mode")
	}
	t.Parallel()
	var free atomic.Uint64
	free.Store(1 << 40)
	fsys := &faultFS{FS: vfs.Default}
	var stores []*pebble.Store
	open := func(dir string) *pebble.Store {
		st, err := pebble.Open(filepath.Join(dir, "mailbox"), pebble.Options{
			FS: fsys, Logger: servertest.Logger(), MinFreeBytes: 1 << 20,
			FreeSpace: func() (uint64, error) { return free.Load(), nil }, FreeSpaceInterval: -1,
		})
		if err != nil {
			t.Fatal(err)
		}
		stores = append(stores, st)
		return st
	}
	dir := t.TempDir()
	t.Cleanup(func() {
		for _, st := range stores {
			st.Close()
		}
	})
	srv := servertest.Start(t, func(c *server.Config) { c.Mailbox = open(dir) })
	probe, target := register(t, srv.URL, "probe"), register(t, srv.URL, "target")

	// refused checks that a send now gets 503 storage_unavailable with a
	// retry delay, over HTTP.
	refused := func(what string) {
		t.Helper()
		var e apiError
		st := doJSON(t, srv.URL, "POST", "/v1/messages", probe, map[string]any{"client_msg_id": "probe-" + what, "to": target.User,
			"payloads": []map[string]any{{"user": target.User, "device": 1, "payload": []byte("x")}}}, &e)
		if st != http.StatusServiceUnavailable || e.Error.Code != "storage_unavailable" || e.Error.RetryAfterMs <= 0 {
			t.Errorf("send with %s: %d %+v; want 503 storage_unavailable with retry_after_ms", what, st, e)
		}
		t.Logf("send with %s: %d %s: %s", what, st, e.Error.Code, e.Error.Message)
	}
	var faults []string
	cfg := checker.Config{
		Server:         srv.URL,
		Users:          5,
		DevicesPerUser: 2,
		Messages:       300,
		Seed:           5,
		ReconnectRate:  0.05,
		ReadRate:       0.3,
		Duration:       90 * time.Second,
		Faults:         2,
		AddDevice: func(_ context.Context, user string) (uint32, string, error) {
			id, cred := srv.AddDevice(t, user)
			return id, cred, nil
		},
		Fault: func(ctx context.Context, n int) error {
			switch n {
			case 0: // the disk fills up, then space is freed
				free.Store(1 << 10)
				refused("a full disk")
				time.Sleep(200 * time.Millisecond) // the conversation's sends are refused meanwhile
				free.Store(1 << 40)
				faults = append(faults, "full disk")
			case 1: // the file system turns read-only; restart on a healthy one
				fsys.set(syscall.EROFS)
				refused("a read-only file system")
				time.Sleep(200 * time.Millisecond)
				srv.Stop(t)
				if err := stores[len(stores)-1].Close(); err != nil {
					t.Logf("closing the failed store: %v", err)
				}
				fsys.set(nil)
				srv.SetConfig(func(c *server.Config) { c.Mailbox = open(dir) })
				srv.Start(t)
				faults = append(faults, "read-only")
			default:
				return errors.New("unexpected fault")
			}
			return nil
		},
		Logf: t.Logf,
	}
	d, err := checker.NewDriver(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := d.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Violations) > 0 {
		var buf bytes.Buffer
		checker.Report(&buf, res.Violations)
		t.Fatalf("seed %d:\n%s", cfg.Seed, buf.String())
	}
	if !res.Quiesced {
		t.Fatal("not every accepted message was delivered in time")
	}
	if st := res.Stats; st.Accepted != cfg.Messages || st.Duplicates != 0 {
		t.Errorf("stats %+v: want %d accepted and no duplicates", st, cfg.Messages)
	}
	if len(faults) != 2 {
		t.Errorf("faults injected: %v", faults)
	}
	t.Logf("stats %+v, %d reconnects, faults %v, %v", res.Stats, res.Reconnects, faults, res.Elapsed.Round(time.Millisecond))
}
