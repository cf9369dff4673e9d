package main

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/courier-im/courier/client"
)

func runRead(ctx context.Context, args []string) error {
	return cmdRead(ctx, stdStreams(), args)
}

func cmdRead(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "read", "[USER]",
		"Marks the received messages stored in the profile that are not read yet\n(from USER, or from everyone) as read, and tells their senders (✓✓ read).\nRun 'courier inbox' first to fetch what is waiting.")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return badUsage(st, fs, "at most one USER")
	}
	peer := fs.Arg(0)
	p, err := loadProfile(*home)
	if err != nil {
		return err
	}
	store, err := p.openStore()
	if err != nil {
		return err
	}
	defer store.Close()
	unread, err := store.Unread(peer)
	if err != nil {
		return err
	}
	if len(unread) == 0 {
		fmt.Fprintln(st.out, "no unread messages")
		return nil
	}
	c, err := client.New(p.clientConfig(st, nil))
	if err != nil {
		return err
	}
	defer c.Close()

	bySender := map[string][]client.MessageRef{}
	for _, m := range unread {
		bySender[m.From] = append(bySender[m.From], m.Ref())
	}
	senders := slices.Sorted(maps.Keys(bySender))
	var parts []string
	total := 0
	for _, sender := range senders {
		refs := bySender[sender]
		if err := c.MarkRead(ctx, sender, refs...); err != nil {
			if total > 0 {
				fmt.Fprintf(st.out, "marked %s read\n", strings.Join(parts, ", "))
			}
			return fmt.Errorf("mark %s's messages read: %w", sender, err)
		}
		ids := make([]string, len(refs))
		for i, r := range refs {
			ids[i] = r.ServerID
		}
		if err := store.MarkRead(ids, time.Now()); err != nil {
			return err
		}
		total += len(refs)
		parts = append(parts, fmt.Sprintf("%d from %s", len(refs), sender))
	}
	fmt.Fprintf(st.out, "marked %d %s read (%s)\n", total, plural(total, "message"), strings.Join(parts, ", "))
	return nil
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}
