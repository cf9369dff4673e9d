package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
)

func runRegister(ctx context.Context, args []string) error {
	return cmdRegister(ctx, stdStreams(), args)
}

func cmdRegister(ctx context.Context, st streams, args []string) error {
	fs, home := newFlags(st, "register", "--name NAME [--server URL] [--device-name NAME] [--force]",
		"Creates a user and its first device on the server, and keeps the device's\ncredentials in the profile directory. The other commands use that profile.")
	server := fs.String("server", "http://127.0.0.1:8080", "base `URL` of the courier server")
	name := fs.String("name", "", "user `name`: 1-32 of a-z 0-9 _ -, starting with a letter or digit")
	deviceName := fs.String("device-name", "", "a `name` for this device (default: the host name)")
	force := fs.Bool("force", false, "replace an existing profile (its credentials are lost)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *name == "" {
		return badUsage(st, fs, "--name is required")
	}
	if fs.NArg() > 0 {
		return badUsage(st, fs, "unexpected arguments %q", fs.Args())
	}
	dir, err := homeDir(*home)
	if err != nil {
		return err
	}
	if *deviceName == "" {
		*deviceName, _ = os.Hostname()
		if len(*deviceName) > 64 {
			*deviceName = (*deviceName)[:64]
		}
	}
	// Check before the account is created, not after: a user whose
	// credentials cannot be kept is lost.
	if _, err := os.Stat(filepath.Join(dir, profileFile)); err == nil && !*force {
		return fmt.Errorf("a profile exists in %s; pass --force to replace it (its credentials are lost), or choose another --home", dir)
	}
	creds, err := client.Register(ctx, *server, *name, *deviceName)
	if err != nil {
		return err
	}
	if err := saveProfile(dir, creds, *force); err != nil {
		return fmt.Errorf("registered %s (device %d), but could not keep the credentials: %w", creds.User, creds.Device, err)
	}
	fmt.Fprintf(st.out, "registered %s (device %d) at %s; profile in %s\n", creds.User, creds.Device, creds.Server, dir)
	// The device's encryption keys: made now, published now (or by the
	// next command that reaches the server).
	p := &profile{dir: dir, creds: creds}
	store, err := p.openStore()
	if err != nil {
		return fmt.Errorf("registered, but the local store cannot be opened: %w", err)
	}
	defer store.Close()
	if *force {
		// The store may hold the replaced device's identity and sessions.
		if err := e2e.Reset(store); err != nil {
			return err
		}
	}
	eng, err := p.openEngine(ctx, st, store)
	if err != nil {
		return err
	}
	defer eng.Close()
	fmt.Fprintf(st.err, "end-to-end encryption keys published; compare safety numbers with 'courier verify USER'\n")
	return nil
}
