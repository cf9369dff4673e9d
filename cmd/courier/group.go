package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/client/localstore"
)

func runGroup(ctx context.Context, args []string) error {
	return cmdGroup(ctx, stdStreams(), args)
}

// groupUsage lists the group subcommands.
const groupUsage = `usage: courier group SUBCOMMAND [flags] [args]

subcommands:
  create NAME USER...    make a group of you and USERs (you are its admin)
  list                   list your groups
  show NAME|ID           members, admins and version of a group
  add NAME|ID USER...    add members (admins only)
  remove NAME|ID USER    remove a member (admins only); your sender key is replaced
  leave NAME|ID          leave a group

A group's name is end-to-end encrypted: the server knows its id and members
only. Send to a group with 'courier send --group NAME|ID TEXT'.
`

func cmdGroup(ctx context.Context, st streams, args []string) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(st.err, groupUsage)
		if len(args) == 0 {
			return errUsage
		}
		return flag.ErrHelp
	}
	sub, args := args[0], args[1:]
	switch sub {
	case "create":
		return groupCreate(ctx, st, args)
	case "list":
		return groupList(ctx, st, args)
	case "show":
		return groupShow(ctx, st, args)
	case "add":
		return groupAdd(ctx, st, args)
	case "remove":
		return groupRemove(ctx, st, args)
	case "leave":
		return groupLeave(ctx, st, args)
	}
	fmt.Fprintf(st.err, "courier group: unknown subcommand %q\n\n%s", sub, groupUsage)
	return errUsage
}

// groupSession is what a group subcommand works with: the profile, its
// store, and an encrypted client (groups are end-to-end encrypted only).
type groupSession struct {
	p     *profile
	store *localstore.Store
	c     *client.Client
	eng   *e2e.Engine
}

func openGroupSession(ctx context.Context, st streams, home string) (*groupSession, error) {
	p, err := loadProfile(home)
	if err != nil {
		return nil, err
	}
	store, err := p.openStore()
	if err != nil {
		return nil, err
	}
	quiet := &sink{store: store, pr: newPrinter(io.Discard, false), errw: st.err}
	c, eng, err := p.newClient(ctx, st, store, quiet.handle)
	if err != nil {
		store.Close()
		return nil, err
	}
	return &groupSession{p: p, store: store, c: c, eng: eng}, nil
}

// close waits (up to timeout) for what the command queued (a group's
// name for new members) to leave the outbox, then closes everything.
func (g *groupSession) close(ctx context.Context, st streams, timeout time.Duration) {
	fctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := g.c.Flush(fctx); err != nil {
		fmt.Fprintf(st.err, "courier: %v; it goes with the next command that connects\n", err)
	}
	g.c.Close()
	g.eng.Close()
	g.store.Close()
}

// find resolves NAME|ID to a group: from the store, else after fetching
// this user's groups from the server.
func (g *groupSession) find(ctx context.Context, ref string) (client.Group, error) {
	return findGroup(ctx, g.store, g.c, ref)
}

func findGroup(ctx context.Context, store *localstore.Store, c *client.Client, ref string) (client.Group, error) {
	ref = strings.TrimPrefix(ref, "#")
	grp, ok, err := store.FindGroup(ref)
	if err != nil || ok {
		return grp, err
	}
	if c != nil {
		if _, err := c.SyncGroups(ctx); err != nil {
			return client.Group{}, err
		}
		if grp, ok, err = store.FindGroup(ref); err != nil || ok {
			return grp, err
		}
	}
	return client.Group{}, fmt.Errorf("no group %q: 'courier group list' shows yours", ref)
}

func groupCreate(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "group create", "NAME USER...",
		"Makes a group of you and the USERs on the server (you are its admin) and sends\nits NAME, end-to-end encrypted, to every member. Prints the group's id.")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the server")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() < 2 {
		return badUsage(st, fs, "need a NAME and at least one USER")
	}
	gs, err := openGroupSession(ctx, st, *home)
	if err != nil {
		return err
	}
	defer gs.close(ctx, st, *timeout)
	cctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	grp, err := gs.c.CreateGroup(cctx, fs.Arg(0), fs.Args()[1:]...)
	if err != nil {
		return err
	}
	fmt.Fprintf(st.out, "created %s (id %s) with %s\n", grp.Label(), grp.ID, strings.Join(grp.Users(), ", "))
	return nil
}

func groupList(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "group list", "[--offline]",
		"Lists your groups: name, id, members, membership version. Fetches the list from\nthe server first (groups you were added to meanwhile), unless --offline.")
	offline := fs.Bool("offline", false, "list what the profile knows, without asking the server")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return badUsage(st, fs, "unexpected arguments %q", fs.Args())
	}
	var groups []client.Group
	if *offline {
		p, err := loadProfile(*home)
		if err != nil {
			return err
		}
		store, err := p.openStore()
		if err != nil {
			return err
		}
		defer store.Close()
		if groups, err = store.ListGroups(); err != nil {
			return err
		}
	} else {
		gs, err := openGroupSession(ctx, st, *home)
		if err != nil {
			return err
		}
		defer gs.close(ctx, st, 10*time.Second)
		if _, err := gs.c.SyncGroups(ctx); err != nil {
			fmt.Fprintf(st.err, "courier: could not fetch your groups from the server: %v\n", err)
		}
		if groups, err = gs.store.ListGroups(); err != nil {
			return err
		}
	}
	if len(groups) == 0 {
		fmt.Fprintln(st.out, "no groups")
		return nil
	}
	for _, g := range groups {
		state := ""
		if g.Left {
			state = "  (you left or were removed)"
		}
		fmt.Fprintf(st.out, "%-20s %s  %d %s  v%d%s\n", g.Label(), g.ID, len(g.Members), plural(len(g.Members), "member"), g.Version, state)
	}
	return nil
}

// groupCommand runs a subcommand that acts on one group the profile knows:
// it parses the flags, checks the number of arguments (want reports what
// is wrong with n, "" if nothing), opens a session, finds the group named
// by the first argument and runs act on it; closing the session then waits
// up to closeWait for what act queued to leave the outbox.
func groupCommand(ctx context.Context, st streams, args []string, name, synopsis, about string,
	want func(n int) string, closeWait time.Duration,
	act func(gs *groupSession, grp client.Group, fs *flag.FlagSet) error) error {
	fs, home := newFlags(st, name, synopsis, about)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if msg := want(fs.NArg()); msg != "" {
		return badUsage(st, fs, "%s", msg)
	}
	gs, err := openGroupSession(ctx, st, *home)
	if err != nil {
		return err
	}
	defer gs.close(ctx, st, closeWait)
	grp, err := gs.find(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	return act(gs, grp, fs)
}

// oneGroup wants exactly one argument, the group.
func oneGroup(n int) string {
	if n != 1 {
		return "need one NAME or ID"
	}
	return ""
}

func groupShow(ctx context.Context, st streams, args []string) error {
	return groupCommand(ctx, st, args, "group show", "NAME|ID", "Shows a group's members, admins and membership version, as the server has them.",
		oneGroup, 10*time.Second, func(gs *groupSession, grp client.Group, _ *flag.FlagSet) error {
			if fresh, err := gs.c.RefreshGroup(ctx, grp.ID); err == nil || errors.Is(err, client.ErrNotMember) {
				grp = fresh
			} else {
				fmt.Fprintf(st.err, "courier: could not refresh the group from the server (showing what the profile knows): %v\n", err)
			}
			printGroup(st.out, grp, gs.p.creds.User)
			return nil
		})
}

// printGroup prints a group:
//
//	#friends  (id 01K…, version 2)
//	  alice  admin (you)
//	  bob
func printGroup(w io.Writer, g client.Group, self string) {
	fmt.Fprintf(w, "%s  (id %s, version %d)\n", g.Label(), g.ID, g.Version)
	if g.Left {
		fmt.Fprintln(w, "  you are no longer a member")
	}
	for _, m := range g.Members {
		var tags []string
		if m.Admin {
			tags = append(tags, "admin")
		}
		if m.User == self {
			tags = append(tags, "(you)")
		}
		fmt.Fprintf(w, "  %s  %s\n", m.User, strings.Join(tags, " "))
	}
}

func groupAdd(ctx context.Context, st streams, args []string) error {
	return groupCommand(ctx, st, args, "group add", "NAME|ID USER...",
		"Adds USERs to a group (you must be an admin) and sends them its name. Your next\nmessage to the group hands your sender key to their devices first.",
		func(n int) string {
			if n < 2 {
				return "need a group and at least one USER"
			}
			return ""
		}, 30*time.Second, func(gs *groupSession, grp client.Group, fs *flag.FlagSet) error {
			users := fs.Args()[1:]
			grp, err := gs.c.AddMembers(ctx, grp.ID, users...)
			if err != nil {
				return err
			}
			fmt.Fprintf(st.out, "added %s to %s (version %d)\n", strings.Join(users, ", "), grp.Label(), grp.Version)
			return nil
		})
}

func groupRemove(ctx context.Context, st streams, args []string) error {
	return groupCommand(ctx, st, args, "group remove", "NAME|ID USER",
		"Removes USER from a group (you must be an admin). Every member replaces its\nsender key, so USER cannot read what is sent from now on.",
		func(n int) string {
			if n != 2 {
				return "need a group and one USER"
			}
			return ""
		}, 10*time.Second, func(gs *groupSession, grp client.Group, fs *flag.FlagSet) error {
			grp, err := gs.c.RemoveMember(ctx, grp.ID, fs.Arg(1))
			if err != nil {
				return err
			}
			fmt.Fprintf(st.out, "removed %s from %s (version %d); your sender key for it was replaced\n", fs.Arg(1), grp.Label(), grp.Version)
			return nil
		})
}

func groupLeave(ctx context.Context, st streams, args []string) error {
	return groupCommand(ctx, st, args, "group leave", "NAME|ID", "Leaves a group. Its history stays in the profile.",
		oneGroup, 10*time.Second, func(gs *groupSession, grp client.Group, _ *flag.FlagSet) error {
			grp, err := gs.c.Leave(ctx, grp.ID)
			if err != nil && !errors.Is(err, client.ErrNotMember) {
				return err
			}
			fmt.Fprintf(st.out, "left %s\n", grp.Label())
			return nil
		})
}
