package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/courier-im/courier/client"
)

func runInbox(ctx context.Context, args []string) error {
	return cmdInbox(ctx, stdStreams(), args)
}

func cmdInbox(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "inbox", "[--json] [--timeout D]",
		"Connects, prints every message and receipt waiting for this device, records\nthem in the profile and acknowledges them, then exits. Messages left in the\noutbox by an interrupted send go out meanwhile.")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	timeout := fs.Duration("timeout", 10*time.Second, "how long to try to reach the server")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return badUsage(st, fs, "unexpected arguments %q", fs.Args())
	}
	p, err := loadProfile(*home)
	if err != nil {
		return err
	}
	store, err := p.openStore()
	if err != nil {
		return err
	}
	defer store.Close()

	// The timeout is for reaching the server: it stops the command when it
	// expires while not connected, or at the next disconnect after that; a
	// long catch-up on a live connection is not cut short.
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	var mu sync.Mutex
	var synced, connected, late bool
	var lastErr error
	out := &sink{store: store, pr: newPrinter(st.out, *asJSON), errw: st.err}
	handler := func(ev client.Event) {
		switch ev := ev.(type) {
		case *client.SyncedEvent:
			mu.Lock()
			synced = true
			mu.Unlock()
			stop()
		case *client.ConnectionEvent:
			mu.Lock()
			connected = ev.State == client.Connected
			if ev.Err != nil {
				lastErr = ev.Err
			}
			if late && ev.State == client.Disconnected {
				stop()
			}
			mu.Unlock()
		default:
			out.handle(ev)
		}
	}
	c, eng, err := p.newClient(ctx, st, store, handler)
	if err != nil {
		return err
	}
	defer eng.Close()
	defer c.Close()
	timer := time.AfterFunc(*timeout, func() {
		mu.Lock()
		defer mu.Unlock()
		late = true
		if !connected {
			stop()
		}
	})
	defer timer.Stop()
	runErr := c.Run(runCtx)
	mu.Lock()
	defer mu.Unlock()
	switch {
	case synced:
		return nil
	case runErr != nil:
		return explainRun(runErr)
	case ctx.Err() != nil:
		return errors.New("interrupted")
	case lastErr != nil:
		return fmt.Errorf("could not reach %s within %v: %w", p.creds.Server, *timeout, lastErr)
	}
	return fmt.Errorf("could not reach %s within %v", p.creds.Server, *timeout)
}
