package e2e_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/internal/server"
	"github.com/courier-im/courier/internal/servertest"
)

// The server is a blind courier: nothing it writes holds a message's
// plaintext. These tests run a conversation carrying a marker through a
// real server whose logs go to a file at debug level, then scan its data
// directory (Pebble WAL and tables, SQLite files), the log and the metrics
// for the marker, raw and in base64.

const marker = "ZEBRA-PLAINTEXT-MARKER-7Q2X"

// needles are the marker and its base64 forms at each alignment (the part
// of each encoding that depends on the marker alone).
func needles() [][]byte {
	out := [][]byte{[]byte(marker)}
	for shift := 0; shift < 3; shift++ {
		enc := base64.StdEncoding.EncodeToString(append(make([]byte, shift), marker...))
		start := 0
		if shift > 0 {
			start = 4
		}
		out = append(out, []byte(enc[start:len(enc)-4]))
	}
	return out
}

// scanServer runs a conversation with the marker, alice to bob and back,
// and returns where the marker was found in what the server wrote.
func scanServer(t *testing.T, encrypted bool) []string {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), "server.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	srv := servertest.Start(t, func(cfg *server.Config) {
		cfg.Logger = slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	aliceCreds, bobCreds := register(t, srv, "alice"), register(t, srv, "bob")
	if encrypted {
		alice, bob := newParty(t, aliceCreds), newParty(t, bobCreds)
		alice.start()
		bob.start()
		for i := 0; i < 3; i++ {
			alice.send("bob", "dinner at eight? "+marker)
			bob.send("alice", marker+" yes")
		}
		bob.waitFor("three messages", func() bool { return bob.countBody("alice", "dinner at eight? "+marker) == 3 })
		alice.waitFor("three replies", func() bool { return alice.countBody("bob", marker+" yes") == 3 })
		// bob's device restarts and reads what waited for it: more
		// server work on the same entries.
		bob.stop()
		alice.send("bob", "later "+marker)
		bob.start()
		bob.waitMessage("alice", "later "+marker)
	} else {
		// The control run: the plaintext mode of the SDK (what load tools
		// use) sends the marker as is.
		c, err := client.New(client.Config{Credentials: aliceCreds})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if _, err := c.Send(ctx, "bob", []byte("dinner at eight? "+marker)); err != nil {
			t.Fatal(err)
		}
	}

	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || len(metrics) == 0 {
		t.Fatalf("metrics: %s", resp.Status)
	}
	srv.Stop(t) // flushes what the server holds in memory
	logFile.Sync()

	var found []string
	check := func(name string, data []byte) {
		for _, n := range needles() {
			if bytes.Contains(data, n) {
				found = append(found, name)
				return
			}
		}
	}
	check("metrics", metrics)
	files := 0
	err = filepath.WalkDir(srv.Dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		check(path, data)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	logData, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatal(err)
	}
	if len(logData) == 0 {
		t.Fatal("the server logged nothing: the log scan would prove nothing")
	}
	check("log", logData)
	if files < 3 {
		t.Fatalf("only %d files in the data directory: the scan would prove nothing", files)
	}
	return found
}

func TestServerNeverHoldsPlaintext(t *testing.T) {
	t.Parallel()
	if found := scanServer(t, true); len(found) > 0 {
		t.Fatalf("the marker is in what the server wrote: %q", found)
	}
}

// TestPlaintextScanFindsPlaintext proves the scan above can fail: without
// encryption, the marker is found (in the mailbox's write-ahead log).
func TestPlaintextScanFindsPlaintext(t *testing.T) {
	t.Parallel()
	if found := scanServer(t, false); len(found) == 0 {
		t.Fatal("the scan did not find the marker sent in plaintext")
	} else {
		t.Logf("found in %q", found)
	}
}
