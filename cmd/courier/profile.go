package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/client/localstore"
)

// The client commands keep a device's state in a profile directory:
// profile.json (the credentials, mode 0600) and local.db (the localstore:
// seen ids, outbox, history, and the end-to-end encryption state: keys,
// sessions, contacts).
const (
	profileFile = "profile.json"
	localDBFile = "local.db"
	// seenKeep is how long handled server ids are remembered: well past the
	// server's default retention of unacknowledged entries (30 days).
	seenKeep = 90 * 24 * time.Hour
)

// streams are where a command writes; tests pass buffers.
type streams struct {
	out, err io.Writer
}

func stdStreams() streams { return streams{out: os.Stdout, err: os.Stderr} }

// errUsage reports a command-line mistake that has already been explained
// on stderr; main exits with status 2 for it, as for -h.
var errUsage = fmt.Errorf("bad usage: %w", flag.ErrHelp)

// newFlags returns a flag set for a client command, with --home, that
// prints usage (synopsis, then what the command does, then flags) to
// st.err.
func newFlags(st streams, name, synopsis, about string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(st.err)
	fs.Usage = func() {
		fmt.Fprintf(st.err, "usage: courier %s %s\n\n%s\n\nflags:\n", name, synopsis, about)
		fs.PrintDefaults()
	}
	home := fs.String("home", "", "profile `directory` (default $COURIER_HOME, else the user config directory's courier/)")
	return fs, home
}

// parseFlags parses args; errors have been printed by the flag package.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return nil
}

// badUsage explains a mistake in the arguments, prints the usage and
// returns errUsage.
func badUsage(st streams, fs *flag.FlagSet, format string, args ...any) error {
	fmt.Fprintf(st.err, "courier %s: %s\n", fs.Name(), fmt.Sprintf(format, args...))
	fs.Usage()
	return errUsage
}

// homeDir resolves the profile directory: the flag, else $COURIER_HOME,
// else <user config dir>/courier.
func homeDir(flagValue string) (string, error) {
	dir := flagValue
	if dir == "" {
		dir = os.Getenv("COURIER_HOME")
	}
	if dir == "" {
		base, err := os.UserConfigDir()
		if err != nil {
			return "", fmt.Errorf("no profile directory: pass --home or set COURIER_HOME (%v)", err)
		}
		dir = filepath.Join(base, "courier")
	}
	return filepath.Abs(dir)
}

// profile is a loaded profile directory.
type profile struct {
	dir   string
	creds client.Credentials
	// notices, if set, is where the encryption layer's notices go rather
	// than the command's stderr (the chat's notice line).
	notices io.Writer
}

// loadProfile reads the profile in the directory chosen by the --home flag
// value.
func loadProfile(homeFlag string) (*profile, error) {
	dir, err := homeDir(homeFlag)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, profileFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no profile in %s: run 'courier register' first (or pass --home)", dir)
	}
	if err != nil {
		return nil, err
	}
	var creds client.Credentials
	if err := json.Unmarshal(b, &creds); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, profileFile), err)
	}
	if creds.Server == "" || creds.User == "" || creds.Device == 0 || creds.Secret == "" {
		return nil, fmt.Errorf("%s is incomplete: register again with --force", filepath.Join(dir, profileFile))
	}
	return &profile{dir: dir, creds: creds}, nil
}

// saveProfile writes creds to dir/profile.json, readable by the owner
// only, replacing an existing profile only if force is set. The file is
// written whole or not at all.
func saveProfile(dir string, creds client.Credentials, force bool) error {
	path := filepath.Join(dir, profileFile)
	if _, err := os.Stat(path); err == nil && !force {
		return fmt.Errorf("a profile exists in %s; pass --force to replace it (its credentials are lost), or choose another --home", dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(creds, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, ".profile-*.json")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// openStore opens the profile's local database.
func (p *profile) openStore() (*localstore.Store, error) {
	st, err := localstore.Open(filepath.Join(p.dir, localDBFile))
	if err != nil {
		return nil, err
	}
	st.PruneSeen(time.Now().Add(-seenKeep))
	return st, nil
}

// clientConfig is the SDK configuration the commands share: the profile's
// credentials, and with a store, its seen set and outbox.
func (p *profile) clientConfig(st streams, store *localstore.Store) client.Config {
	cfg := client.Config{Credentials: p.creds, Logger: cliLogger(st.err)}
	if store != nil {
		cfg.Seen = store
		cfg.Outbox = store.Outbox()
		cfg.Groups = store
	}
	return cfg
}

// cliLogger logs the SDK's warnings and errors to w; $COURIER_LOG sets
// another level (debug, info, warn, error).
func cliLogger(w io.Writer) *slog.Logger {
	level := slog.LevelWarn
	if v := os.Getenv("COURIER_LOG"); v != "" {
		level.UnmarshalText([]byte(strings.ToUpper(v)))
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// publishTimeout bounds the start-up key check (GET /v1/keys, and an
// upload if needed): a server out of reach must not stop the outbox.
const publishTimeout = 10 * time.Second

// openEngine opens the profile's end-to-end encryption on store and makes
// sure the server has its keys (identity, signed prekey, enough one-time
// prekeys). Notices (safety number changes, undecryptable messages) are
// printed to st.err. A server out of reach is only a warning: the outbox
// and the sessions already made still work.
func (p *profile) openEngine(ctx context.Context, st streams, store *localstore.Store) (*e2e.Engine, error) {
	eng, err := e2e.Open(e2e.Config{Store: store, Credentials: p.creds, Logger: cliLogger(st.err),
		Notify: func(n e2e.Notice) { printNotice(cmp.Or(p.notices, st.err), n) }})
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, publishTimeout)
	defer cancel()
	if err := eng.Publish(pctx); err != nil {
		if errors.Is(err, e2e.ErrIdentityMismatch) {
			eng.Close()
			return nil, fmt.Errorf("%w (courier register --force, or link a new device)", err)
		}
		fmt.Fprintf(st.err, "courier: could not check this device's encryption keys on the server: %v\n", err)
	}
	return eng, nil
}

// printNotice shows what the encryption layer says the user must see;
// a safety number change, loudly.
func printNotice(w io.Writer, n e2e.Notice) {
	switch n.Kind {
	case e2e.IdentityChanged:
		bar := strings.Repeat("!", 72)
		fmt.Fprintf(w, "%s\n!! SAFETY NUMBER CHANGED: %s\n%s\n", bar, n.Text, bar)
	case e2e.Resent:
		// (DecryptFailed is shown with the message it is about.)
		fmt.Fprintf(w, "courier: %s\n", n.Text)
	}
}

// newClient makes the SDK client of a command: end-to-end encrypted, with
// the profile's store (seen set, outbox, keys and sessions). Close the
// Client, then the Engine.
func (p *profile) newClient(ctx context.Context, st streams, store *localstore.Store, handler func(client.Event)) (*client.Client, *e2e.Engine, error) {
	eng, err := p.openEngine(ctx, st, store)
	if err != nil {
		return nil, nil, err
	}
	cfg := p.clientConfig(st, store)
	cfg.Handler = handler
	cfg.Cipher = eng
	c, err := client.New(cfg)
	if err != nil {
		eng.Close()
		return nil, nil, err
	}
	eng.Bind(c)
	return c, eng, nil
}
