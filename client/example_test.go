package client_test

import (
	"context"
	"fmt"
	"log"

	"github.com/courier-im/courier/client"
)

// A device that prints what it receives and sends one message. Register
// runs once; the credentials it returns are kept and reused.
func Example() {
	ctx := context.Background()
	creds, err := client.Register(ctx, "http://127.0.0.1:8080", "alice", "laptop")
	if err != nil {
		log.Fatal(err)
	}
	c, err := client.New(client.Config{
		Credentials: creds,
		Handler: func(ev client.Event) {
			switch ev := ev.(type) {
			case *client.MessageEvent:
				fmt.Printf("%s  %s: %s\n", ev.Time.Format("15:04:05"), ev.From, ev.Body)
			case *client.ReceiptEvent:
				fmt.Printf("%s is now %v\n", ev.Message.ServerID, ev.Status)
			}
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	go c.Run(ctx) // stay connected: messages and receipts arrive through Handler

	sent, err := c.Send(ctx, "bob", []byte("dinner at 8?"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("accepted as", sent.ServerID)
}
