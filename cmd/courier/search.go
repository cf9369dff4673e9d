package main

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/courier-im/courier/client/localstore"
)

func runSearch(ctx context.Context, args []string) error {
	return cmdSearch(ctx, stdStreams(), args)
}

func cmdSearch(_ context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "search", "[--limit N] [--json] WORD...",
		"Searches the messages kept in this profile (full-text, on this device only: the\n"+
			"server holds nothing it could search). Every WORD must occur; WORD* matches\n"+
			"words that begin so. Prints the matches, newest first, with their conversation\n"+
			"and time. Works offline.")
	limit := fs.Int("limit", 50, "at most `N` matches")
	asJSON := fs.Bool("json", false, "print one JSON object per line")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() == 0 {
		return badUsage(st, fs, "need a WORD to search for")
	}
	if *limit <= 0 {
		return badUsage(st, fs, "--limit must be at least 1")
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
	found, err := store.Search(strings.Join(fs.Args(), " "), *limit)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(st.out)
		for _, m := range found {
			enc.Encode(jsonMatch{Conversation: m.Peer, Group: m.Group, From: fmt.Sprintf("%s.%d", m.From, m.FromDevice),
				Direction: string(m.Direction), Time: m.Time.UTC().Format(time.RFC3339Nano), ServerID: m.ServerID,
				ClientMsgID: m.ClientMsgID, Text: string(m.Body)})
		}
		return nil
	}
	if len(found) == 0 {
		fmt.Fprintln(st.out, "no messages match")
		return nil
	}
	// One line a match: when, the conversation, who wrote it ("you" for
	// this user's own messages, from any of its devices), and the text.
	label := storeLabels(store)
	for _, m := range found {
		who := m.From
		if m.Direction == localstore.Out {
			who = "you"
		}
		conv := "with " + m.Peer
		if m.Group != "" {
			conv = "in " + label(m.Group)
		}
		fmt.Fprintf(st.out, "%s  %-17s %s: %s\n", m.Time.Local().Format("2006-01-02 15:04"), conv, who,
			strings.ReplaceAll(string(m.Body), "\n", " "))
	}
	return nil
}

type jsonMatch struct {
	Conversation string `json:"conversation"`
	Group        string `json:"group,omitempty"`
	From         string `json:"from"`
	Direction    string `json:"direction"`
	Time         string `json:"time"`
	ServerID     string `json:"server_id,omitempty"`
	ClientMsgID  string `json:"client_msg_id"`
	Text         string `json:"text"`
}
