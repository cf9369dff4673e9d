package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/courier-im/courier/client"
)

func runSend(ctx context.Context, args []string) error {
	return cmdSend(ctx, stdStreams(), args)
}

func cmdSend(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "send", "[--json] [--timeout D] USER TEXT... | --group NAME|ID TEXT...",
		"Sends TEXT to USER (or, with --group, to a group) and waits until the server has\naccepted it (✓). The message waits in the profile's outbox until then: if the\nserver cannot be reached within --timeout, the next courier command that\nconnects sends it.")
	asJSON := fs.Bool("json", false, "print the acceptance as a JSON line")
	groupRef := fs.String("group", "", "send to the group with this `NAME or ID` (see 'courier group list')")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the server to accept")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *groupRef != "" && fs.NArg() < 1 {
		return badUsage(st, fs, "need a TEXT")
	}
	if *groupRef == "" && fs.NArg() < 2 {
		return badUsage(st, fs, "need a USER and a TEXT")
	}
	to, body := fs.Arg(0), []byte(strings.Join(fs.Args()[1:], " "))
	if *groupRef != "" {
		to, body = "", []byte(strings.Join(fs.Args(), " "))
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
	// Messages left in the outbox by earlier runs go first; their outcomes
	// are recorded quietly.
	quiet := &sink{store: store, pr: newPrinter(io.Discard, false), errw: st.err}
	c, eng, err := p.newClient(ctx, st, store, quiet.handle)
	if err != nil {
		return err
	}
	defer eng.Close()
	defer c.Close()

	sendCtx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var sent client.Sent
	if *groupRef != "" {
		// Found in the profile, else in the groups the server lists.
		grp, ferr := findGroup(sendCtx, store, c, *groupRef)
		if ferr != nil {
			return ferr
		}
		to = grp.Label()
		sent, err = c.SendGroup(sendCtx, grp.ID, body)
	} else {
		sent, err = c.Send(sendCtx, to, body)
	}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s did not accept the message within %v; it stays in the outbox and goes with the next 'courier inbox', 'listen', 'chat' or 'send'", p.creds.Server, *timeout)
		}
		if errors.Is(err, context.Canceled) {
			return errors.New("interrupted; the message stays in the outbox and goes with the next 'courier inbox', 'listen', 'chat' or 'send'")
		}
		var re *client.RefusedError
		var se *client.SealError
		if errors.As(err, &re) || errors.As(err, &se) {
			store.DropUnsent(sent.ClientMsgID)
		}
		return err
	}
	if err := store.MarkSent(sent); err != nil {
		fmt.Fprintf(st.err, "courier: local store: %v\n", err)
	}
	newPrinter(st.out, *asJSON).sent(sent, c.Self(), to, body)
	return nil
}
