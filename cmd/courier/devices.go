package main

import (
	"context"
	"fmt"

	"github.com/courier-im/courier/client"
)

func runDevices(ctx context.Context, args []string) error {
	return cmdDevices(ctx, stdStreams(), args)
}

func cmdDevices(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "devices", "[USER]", "Lists a user's devices (this profile's user by default).")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return badUsage(st, fs, "at most one USER")
	}
	p, err := loadProfile(*home)
	if err != nil {
		return err
	}
	user := p.creds.User
	if fs.NArg() == 1 {
		user = fs.Arg(0)
	}
	c, err := client.New(p.clientConfig(st, nil))
	if err != nil {
		return err
	}
	defer c.Close()
	devs, err := c.ListDevices(ctx, user)
	if err != nil {
		return err
	}
	for _, d := range devs {
		line := client.Device{User: user, ID: d.ID}.String()
		if d.Name != "" {
			line += "  " + d.Name
		}
		if !d.Created.IsZero() {
			line += "  added " + d.Created.Local().Format("2006-01-02 15:04")
		}
		if user == p.creds.User && d.ID == p.creds.Device {
			line += "  (this device)"
		}
		fmt.Fprintln(st.out, line)
	}
	return nil
}

func runWhoami(ctx context.Context, args []string) error {
	return cmdWhoami(ctx, stdStreams(), args)
}

func cmdWhoami(_ context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "whoami", "", "Prints this profile's user, device and server. Works offline.")
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
	fmt.Fprintf(st.out, "%s (device %d) at %s; profile in %s\n", p.creds.User, p.creds.Device, p.creds.Server, p.dir)
	return nil
}
