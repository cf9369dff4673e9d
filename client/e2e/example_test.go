package e2e_test

import (
	"context"
	"fmt"
	"log"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/client/localstore"
)

// A device with end-to-end encryption: its local store holds its keys and
// sessions; the Engine seals what the Client sends and opens what it
// receives.
func Example() {
	ctx := context.Background()
	creds, err := client.Register(ctx, "http://127.0.0.1:8080", "alice", "laptop")
	if err != nil {
		log.Fatal(err)
	}
	store, err := localstore.Open("alice.db")
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	eng, err := e2e.Open(e2e.Config{Store: store, Credentials: creds,
		Notify: func(n e2e.Notice) { fmt.Println("!", n.Text) }})
	if err != nil {
		log.Fatal(err)
	}
	defer eng.Close()
	if err := eng.Publish(ctx); err != nil { // identity, signed prekey, one-time prekeys
		log.Fatal(err)
	}
	c, err := client.New(client.Config{Credentials: creds, Cipher: eng, Seen: store, Outbox: store.Outbox(),
		Handler: func(ev client.Event) {
			if m, ok := ev.(*client.MessageEvent); ok && m.Err == nil {
				fmt.Printf("%s: %s\n", m.From, m.Body)
			}
		}})
	if err != nil {
		log.Fatal(err)
	}
	eng.Bind(c)
	defer c.Close()
	go c.Run(ctx)
	if _, err := c.Send(ctx, "bob", []byte("dinner at 8?")); err != nil {
		log.Fatal(err)
	}
}
