package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/courier-im/courier/internal/servertest"
)

// The client commands end to end, against a real in-process server, each
// with its own profile directory.

type cliCommand func(ctx context.Context, st streams, args []string) error

// lockedBuffer is a bytes.Buffer safe to read while a command writes it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// run runs a command to completion and returns what it printed.
func run(t *testing.T, cmd cliCommand, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errw lockedBuffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = cmd(ctx, streams{out: &out, err: &errw}, args)
	return out.String(), errw.String(), err
}

// must runs a command that must succeed, and returns its stdout.
func must(t *testing.T, cmd cliCommand, args ...string) string {
	t.Helper()
	out, errOut, err := run(t, cmd, args...)
	if err != nil {
		t.Fatalf("courier %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func matchLines(t *testing.T, what, got string, patterns ...string) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	if got == "" {
		lines = nil
	}
	if len(lines) != len(patterns) {
		t.Fatalf("%s printed %d lines, want %d:\n%s", what, len(lines), len(patterns), got)
	}
	for i, p := range patterns {
		if !regexp.MustCompile("^" + p + "$").MatchString(lines[i]) {
			t.Fatalf("%s line %d:\n  %s\ndoes not match\n  %s", what, i+1, lines[i], p)
		}
	}
}

const (
	clockRE = `\d\d:\d\d:\d\d`
	idRE    = `[0-9A-Z]{26}`
)

func TestCLIEndToEnd(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := filepath.Join(t.TempDir(), "alice"), filepath.Join(t.TempDir(), "bob")

	out := must(t, cmdRegister, "--home", alice, "--server", srv.URL, "--name", "alice", "--device-name", "laptop")
	matchLines(t, "register", out, `registered alice \(device 1\) at `+regexp.QuoteMeta(srv.URL)+`; profile in `+regexp.QuoteMeta(alice))
	must(t, cmdRegister, "--home", bob, "--server", srv.URL, "--name", "bob")
	if fi, err := os.Stat(filepath.Join(alice, profileFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("profile file: %v, %v; want mode 0600", fi, err)
	}
	if _, _, err := run(t, cmdRegister, "--home", alice, "--server", srv.URL, "--name", "alice2"); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("register over a profile: %v, want a refusal naming --force", err)
	}
	matchLines(t, "whoami", must(t, cmdWhoami, "--home", alice),
		`alice \(device 1\) at `+regexp.QuoteMeta(srv.URL)+`; profile in `+regexp.QuoteMeta(alice))
	matchLines(t, "devices", must(t, cmdDevices, "--home", alice),
		`alice\.1  laptop  added \d{4}-\d\d-\d\d \d\d:\d\d  \(this device\)`)
	matchLines(t, "devices bob", must(t, cmdDevices, "--home", alice, "bob"), `bob\.1  .*added .*`)

	// alice writes while bob is away; bob picks it up; alice sees ✓✓.
	out = must(t, cmdSend, "--home", alice, "bob", "dinner", "at", "8?")
	matchLines(t, "send", out, `✓ accepted (`+idRE+`)  `+clockRE+`  to bob`)
	id := regexp.MustCompile(idRE).FindString(out)
	matchLines(t, "bob's inbox", must(t, cmdInbox, "--home", bob), clockRE+`  alice: dinner at 8\?`)
	matchLines(t, "bob's inbox again", must(t, cmdInbox, "--home", bob))
	matchLines(t, "read", must(t, cmdRead, "--home", bob), `marked 1 message read \(1 from alice\)`)
	matchLines(t, "read again", must(t, cmdRead, "--home", bob, "alice"), `no unread messages`)
	matchLines(t, "alice's inbox", must(t, cmdInbox, "--home", alice),
		clockRE+`  ✓✓ delivered to bob: "dinner at 8\?" \(`+id+`\)`,
		clockRE+`  ✓✓ read by bob: "dinner at 8\?" \(`+id+`\)`)

	// The same as JSON lines.
	out = must(t, cmdSend, "--home", bob, "--json", "alice", "see you")
	var sent map[string]any
	if err := json.Unmarshal([]byte(out), &sent); err != nil || sent["type"] != "sent" || sent["to"] != "alice" ||
		sent["text"] != "see you" || sent["duplicate"] != false || sent["from"] != "bob" {
		t.Fatalf("send --json: %s (%v)", out, err)
	}
	out = must(t, cmdInbox, "--home", alice, "--json")
	var msg map[string]any
	if err := json.Unmarshal([]byte(out), &msg); err != nil || msg["type"] != "message" || msg["server_id"] != sent["server_id"] ||
		msg["client_msg_id"] != sent["client_msg_id"] || msg["from"] != "bob" || msg["from_device"] != 1.0 || msg["to"] != "alice" ||
		msg["text"] != "see you" || msg["time"] != sent["time"] {
		t.Fatalf("inbox --json: %s (%v); sent %v", out, err, sent)
	}
	if _, err := time.Parse(time.RFC3339Nano, msg["time"].(string)); err != nil {
		t.Fatalf("time %v: %v", msg["time"], err)
	}
	out = must(t, cmdInbox, "--home", bob, "--json")
	var rcpt map[string]any
	if err := json.Unmarshal([]byte(out), &rcpt); err != nil || rcpt["type"] != "receipt" || rcpt["status"] != "delivered" ||
		rcpt["server_id"] != sent["server_id"] || rcpt["from"] != "alice" || rcpt["text"] != "see you" {
		t.Fatalf("bob's receipts as JSON: %s (%v)", out, err)
	}

	// Mistakes.
	if _, errOut, err := run(t, cmdSend, "--home", alice, "bob"); !errors.Is(err, flag.ErrHelp) || !strings.Contains(errOut, "usage: courier send") {
		t.Fatalf("send without text: %v\n%s", err, errOut)
	}
	if _, _, err := run(t, cmdSend, "--home", alice, "nobody", "hi"); err == nil || !strings.Contains(err.Error(), "unknown_recipient") {
		t.Fatalf("send to an unknown user: %v", err)
	}
	if _, _, err := run(t, cmdInbox, "--home", filepath.Join(t.TempDir(), "none")); err == nil || !strings.Contains(err.Error(), "courier register") {
		t.Fatalf("inbox without a profile: %v", err)
	}
}

// With the server down, inbox gives up after --timeout, and send leaves
// the message in the outbox, which the next connecting command sends.
func TestCLIServerDown(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := filepath.Join(t.TempDir(), "alice"), filepath.Join(t.TempDir(), "bob")
	must(t, cmdRegister, "--home", alice, "--server", srv.URL, "--name", "alice")
	must(t, cmdRegister, "--home", bob, "--server", srv.URL, "--name", "bob")
	must(t, cmdDevices, "--home", alice, "bob")
	srv.Stop(t)

	_, _, err := run(t, cmdInbox, "--home", alice, "--timeout", "300ms")
	if err == nil || !strings.Contains(err.Error(), "could not reach "+srv.URL+" within 300ms") {
		t.Fatalf("inbox with the server down: %v", err)
	}
	_, _, err = run(t, cmdSend, "--home", alice, "--timeout", "300ms", "bob", "while you were down")
	if err == nil || !strings.Contains(err.Error(), "outbox") {
		t.Fatalf("send with the server down: %v", err)
	}

	srv.Start(t)
	must(t, cmdInbox, "--home", alice) // connects: the outbox sends
	// The message goes out during alice's inbox, or at the latest with
	// her next send, which queues behind it.
	must(t, cmdSend, "--home", alice, "bob", "and now")
	matchLines(t, "bob's inbox", must(t, cmdInbox, "--home", bob),
		clockRE+`  alice: while you were down`,
		clockRE+`  alice: and now`)
}

func TestCLIListen(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := filepath.Join(t.TempDir(), "alice"), filepath.Join(t.TempDir(), "bob")
	must(t, cmdRegister, "--home", alice, "--server", srv.URL, "--name", "alice")
	must(t, cmdRegister, "--home", bob, "--server", srv.URL, "--name", "bob")

	var out, errOut lockedBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- cmdListen(ctx, streams{out: &out, err: &errOut}, []string{"--home", alice, "--presence", "bob"})
	}()
	waitOutput(t, &errOut, "caught up")
	waitOutput(t, &out, "bob is offline, never seen")

	must(t, cmdSend, "--home", bob, "alice", "are you listening?")
	waitOutput(t, &out, "bob: are you listening?")
	must(t, cmdInbox, "--home", bob) // bob connects: presence, and the delivered receipt
	waitOutput(t, &out, "bob is online")
	waitOutput(t, &out, "bob is offline, last seen")
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("listen: %v", err)
	}
	if !strings.Contains(errOut.String(), "connected") {
		t.Errorf("listen's stderr lacks connection changes:\n%s", errOut.String())
	}
	// What listen printed is recorded: read finds it.
	matchLines(t, "read", must(t, cmdRead, "--home", alice), `marked 1 message read \(1 from bob\)`)
}

func waitOutput(t *testing.T, b *lockedBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(b.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %q in:\n%s", want, b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}
