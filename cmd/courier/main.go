// Command courier is the one courier binary: the server (serve), the
// terminal client (register, send, inbox, listen, read, chat, group,
// devices, whoami, verify, search; end-to-end encrypted), the delivery checker
// (check) and the load bench (bench).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

type command struct {
	run   func(ctx context.Context, args []string) error
	usage string
}

var commands = map[string]command{
	"serve":    {runServe, "run a courier server (embedded defaults: no external service needed)"},
	"register": {runRegister, "create a user and its first device, and store its credentials in the profile"},
	"send":     {runSend, "send a message: courier send USER TEXT"},
	"inbox":    {runInbox, "print and acknowledge every pending message and receipt, then exit"},
	"listen":   {runListen, "stay connected and print messages, receipts and presence as they come"},
	"read":     {runRead, "mark received messages as read (tells their senders)"},
	"chat":     {runChat, "interactive terminal chat: courier chat USER"},
	"group":    {runGroup, "groups: courier group create|list|show|add|remove|leave"},
	"devices":  {runDevices, "list a user's devices"},
	"whoami":   {runWhoami, "print this profile's user, device and server"},
	"verify":   {runVerify, "show the safety number with a user; --mark verified, --accept a change"},
	"search":   {runSearch, "full-text search of this profile's messages: courier search WORDS"},
	"check":    {runCheck, "soak-test delivery: real clients against a server; every message must arrive exactly once, in order"},
	"bench":    {runBench, "load scenarios (conns, pairs, fanout, drain, storm): throughput, latency, memory per connection, 0 lost"},
}

var order = []string{"serve", "register", "send", "inbox", "listen", "read", "chat", "group", "devices", "whoami", "verify", "search", "check", "bench"}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: courier COMMAND [flags] [args]\n\ncommands:\n")
	for _, name := range order {
		fmt.Fprintf(os.Stderr, "  %-9s %s\n", name, commands[name].usage)
	}
	fmt.Fprintf(os.Stderr, "\nRun 'courier COMMAND -h' for a command's flags.\n")
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	name := os.Args[1]
	if name == "-h" || name == "--help" || name == "help" {
		usage()
		return
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "courier: unknown command %q\n\n", name)
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := cmd.run(ctx, os.Args[2:])
	stop()
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "courier %s: %v\n", name, err)
		os.Exit(1)
	}
}
