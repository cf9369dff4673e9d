package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/courier-im/courier/client"
)

func runListen(ctx context.Context, args []string) error {
	return cmdListen(ctx, stdStreams(), args)
}

func cmdListen(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "listen", "[--json] [--presence USER,USER...]",
		"Stays connected (reconnecting as needed) and prints messages, receipts,\npresence and typing as they come; connection changes go to stderr. Every\nmessage is recorded in the profile and acknowledged. Stops on Ctrl-C.")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	presence := fs.String("presence", "", "comma-separated `users` whose presence to follow")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return badUsage(st, fs, "unexpected arguments %q", fs.Args())
	}
	var watch []string
	for _, u := range strings.Split(*presence, ",") {
		if u = strings.TrimSpace(u); u != "" {
			watch = append(watch, u)
		}
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

	out := &sink{store: store, pr: newPrinter(st.out, *asJSON), errw: st.err}
	handler := func(ev client.Event) {
		switch ev := ev.(type) {
		case *client.ConnectionEvent:
			fmt.Fprintf(st.err, "courier: %s\n", connection(ev, p.creds.Server))
		case *client.SyncedEvent:
			fmt.Fprintf(st.err, "courier: caught up (%d waiting)\n", ev.Pending)
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
	// Remembered now, made on every connection.
	if err := c.Subscribe(ctx, watch...); err != nil {
		return err
	}
	return explainRun(c.Run(ctx))
}
