package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/courier-im/courier/client/e2e"
)

func runVerify(ctx context.Context, args []string) error {
	return cmdVerify(ctx, stdStreams(), args)
}

func cmdVerify(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "verify", "[--mark | --accept] USER",
		"Shows the safety number of this user with USER, to compare with the one USER's\n"+
			"device shows for you (in person, or on a call you trust), and the identity key\n"+
			"of each device behind it. If the two numbers match, no one sits between you:\n"+
			"mark USER verified with --mark. A later change of USER's devices or keys is\n"+
			"shown loudly and, for a verified USER, blocks sending until you compare again\n"+
			"and accept the change with --accept.")
	mark := fs.Bool("mark", false, "mark USER verified (after comparing the numbers)")
	accept := fs.Bool("accept", false, "accept a change of USER's devices or keys (USER is then no longer verified)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return badUsage(st, fs, "need exactly one USER")
	}
	if *mark && *accept {
		return badUsage(st, fs, "--mark and --accept do not go together")
	}
	user := fs.Arg(0)
	p, err := loadProfile(*home)
	if err != nil {
		return err
	}
	if user == p.creds.User {
		return fmt.Errorf("%s is you: verify your contacts, and they you", user)
	}
	store, err := p.openStore()
	if err != nil {
		return err
	}
	defer store.Close()
	eng, err := p.openEngine(ctx, st, store)
	if err != nil {
		return err
	}
	defer eng.Close()

	if *accept {
		if err := eng.Accept(ctx, user); err != nil {
			return err
		}
		fmt.Fprintf(st.out, "accepted %s's current devices and keys; %s is not verified now: compare the number below and run 'courier verify --mark %s' if it matches\n\n", user, user, user)
	}
	if err := eng.Refresh(ctx, user); err != nil {
		return fmt.Errorf("could not fetch the current devices of %s and you: %w", user, err)
	}
	s, err := eng.SafetyNumber(ctx, user)
	if err != nil {
		return err
	}
	if *mark {
		if s.Changed {
			return fmt.Errorf("%s's safety number changed since you verified it: accept the change first (courier verify --accept %s), then compare again", user, user)
		}
		if err := eng.MarkVerified(ctx, user); err != nil {
			return err
		}
		s.Verified = true
	}
	printSafety(st, p.creds.User, s)
	return nil
}

func printSafety(st streams, self string, s e2e.Safety) {
	fmt.Fprintf(st.out, "safety number of %s and %s:\n\n", self, s.User)
	groups := strings.Fields(s.Number)
	for i := 0; i < len(groups); i += 4 {
		fmt.Fprintf(st.out, "    %s\n", strings.Join(groups[i:min(i+4, len(groups))], " "))
	}
	fmt.Fprintln(st.out)
	for _, side := range [][]e2e.DeviceKey{s.Remote, s.Local} {
		for _, k := range side {
			fmt.Fprintf(st.out, "  %-20s %s\n", k.Device, k.Fingerprint())
		}
	}
	fmt.Fprintln(st.out)
	switch {
	case s.Changed:
		fmt.Fprintf(st.out, "!! %s's devices or keys CHANGED since you verified them (%s): sending to %s is blocked.\n!! Compare the number again, then 'courier verify --accept %s'.\n",
			s.User, s.ChangedAt.Local().Format("2006-01-02 15:04"), s.User, s.User)
	case s.Verified:
		fmt.Fprintf(st.out, "%s is verified.\n", s.User)
	default:
		fmt.Fprintf(st.out, "%s is not verified. If %s's device shows the same number for you, run 'courier verify --mark %s'.\n", s.User, s.User, s.User)
	}
}
