// Package client is the Go SDK for courier: a device's connection to a
// courier server, with an outbox that keeps sending until the server has
// accepted each message, at-least-once delivery to the application with
// duplicates suppressed, and the sent → delivered → read receipt state of
// every message sent.
//
// A program registers once, keeps the Credentials, and then makes a Client
// from them. Run keeps a WebSocket connection open (reconnecting with
// backoff) and hands every message, receipt, presence and typing event to
// Config.Handler, in order, from one goroutine; entries are acknowledged to
// the server only after the handler has returned, so an application that
// stores what it is handed never loses a message. Send works with or
// without Run: over the connection when there is one, otherwise over HTTP.
//
//	creds, err := client.Register(ctx, "http://127.0.0.1:8080", "alice", "laptop")
//	if err != nil { … }
//	c, err := client.New(client.Config{
//		Credentials: creds,
//		Handler: func(ev client.Event) {
//			switch ev := ev.(type) {
//			case *client.MessageEvent:
//				fmt.Printf("%s: %s\n", ev.From, ev.Body)
//			case *client.ReceiptEvent:
//				fmt.Printf("%s is %v\n", ev.Message.ServerID, ev.Status)
//			}
//		},
//	})
//	if err != nil { … }
//	defer c.Close()
//	go c.Run(ctx)
//	sent, err := c.Send(ctx, "bob", []byte("dinner at 8?"))
//
// Groups (CreateGroup, SendGroup, AddMembers, RemoveMember, Leave) are
// end-to-end encrypted only: the server keeps a group's id and members,
// and a Cipher implementing GroupCipher seals each group message once
// with the sending device's sender key, handed to the members' devices
// over the pairwise sessions first.
//
// Without Config.Cipher, payloads travel as plaintext (the mode load tools
// use). Package client/e2e is the end-to-end encryption layer (the Signal
// protocol) to set there; package client/localstore is the SQLite store for
// the seen set, the outbox, the message history (searchable) and the e2e
// state. The protocol is described in docs/protocol.md; the SDK's
// guarantees and knobs in docs/client.md; encryption in docs/e2e.md.
package client
