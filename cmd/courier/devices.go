package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/courier-im/courier/client"
)

// linkDevice adds a device to p's account and makes its profile in dir:
// credentials, local store, and published keys.
func linkDevice(ctx context.Context, st streams, p *profile, name, dir string) error {
	dir, err := homeDir(dir)
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, profileFile)); err == nil {
		return fmt.Errorf("a profile exists in %s; choose another --new-home", dir)
	}
	api, err := client.NewKeyAPI(p.creds, nil)
	if err != nil {
		return err
	}
	creds, err := api.LinkDevice(ctx, name)
	if err != nil {
		return err
	}
	if err := saveProfile(dir, creds, false); err != nil {
		return fmt.Errorf("linked %s.%d, but could not keep its credentials: %w", creds.User, creds.Device, err)
	}
	np := &profile{dir: dir, creds: creds}
	store, err := np.openStore()
	if err != nil {
		return err
	}
	defer store.Close()
	eng, err := np.openEngine(ctx, st, store)
	if err != nil {
		return err
	}
	defer eng.Close()
	fmt.Fprintf(st.out, "linked %s (device %d); its profile is in %s\n", creds.User, creds.Device, dir)
	return nil
}

func runDevices(ctx context.Context, args []string) error {
	return cmdDevices(ctx, stdStreams(), args)
}

func cmdDevices(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "devices", "[USER] | --link NAME --new-home DIR | --remove ID",
		"Lists a user's devices (this profile's user by default; 'courier verify USER'\n"+
			"shows their identity keys). --link adds a device to this profile's account and writes\n"+
			"its profile (with its own encryption keys) in DIR; --remove removes a device\n"+
			"of this account (its keys go with it). Contacts see either change as a new\n"+
			"safety number.")
	linkName := fs.String("link", "", "link a new device called `NAME` to this account")
	newHome := fs.String("new-home", "", "with --link: the new device's profile `DIR`")
	remove := fs.Uint("remove", 0, "remove the device with this `ID` from this account")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 1 {
		return badUsage(st, fs, "at most one USER")
	}
	if (*linkName != "") != (*newHome != "") {
		return badUsage(st, fs, "--link and --new-home go together")
	}
	if *linkName != "" && *remove != 0 {
		return badUsage(st, fs, "--link or --remove, not both")
	}
	p, err := loadProfile(*home)
	if err != nil {
		return err
	}
	switch {
	case *linkName != "":
		return linkDevice(ctx, st, p, *linkName, *newHome)
	case *remove != 0:
		if *remove > 1<<32-1 {
			return badUsage(st, fs, "no device has id %d", *remove)
		}
		api, err := client.NewKeyAPI(p.creds, nil)
		if err != nil {
			return err
		}
		if err := api.RemoveDevice(ctx, uint32(*remove)); err != nil {
			return err
		}
		fmt.Fprintf(st.out, "removed %s.%d\n", p.creds.User, *remove)
		return nil
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
