package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/localstore"
)

// sink is the Handler of the commands that connect (inbox, listen): it
// records messages and receipts in the local store, then prints what is
// new to this profile. The store is the memory across runs: a receipt the
// SDK has not seen in this process may be old news here.
type sink struct {
	store *localstore.Store
	pr    *printer
	errw  io.Writer
}

func (s *sink) handle(ev client.Event) {
	switch ev := ev.(type) {
	case *client.MessageEvent:
		if ev.Err != nil {
			// Shown, not stored: the sender was asked to send it again,
			// and the copy that decrypts is what the history keeps.
			s.pr.message(ev)
			return
		}
		isNew, err := s.store.RecordReceived(ev)
		if err != nil {
			fmt.Fprintf(s.errw, "courier: local store: %v\n", err)
		}
		if isNew || err != nil {
			s.pr.message(ev)
		}
	case *client.ReceiptEvent:
		m, news, err := applyReceipt(s.store, ev)
		if err != nil {
			fmt.Fprintf(s.errw, "courier: local store: %v\n", err)
		}
		if news {
			s.pr.receipt(ev, m)
		}
	case *client.SendFailedEvent:
		if err := s.store.DropUnsent(ev.Message.ClientMsgID); err != nil {
			fmt.Fprintf(s.errw, "courier: local store: %v\n", err)
		}
		s.pr.failed(ev)
	case *client.PresenceEvent:
		s.pr.presence(ev)
	case *client.TypingEvent:
		s.pr.typing(ev)
	}
}

// explainRun says why Run stopped for good in the words of the CLI.
func explainRun(err error) error {
	switch {
	case errors.Is(err, client.ErrSuperseded):
		return fmt.Errorf("another program connected as this device (a courier inbox, listen or chat with the same profile); stopping rather than fight over the connection: %w", err)
	case errors.Is(err, client.ErrUnauthorized):
		return fmt.Errorf("the server refused this profile's credential (was the device removed?): %w", err)
	}
	return err
}

// applyReceipt records a receipt (or an acceptance) in the store and
// returns the message it is about, if stored, and whether the receipt
// moved it forward. A receipt for a message not stored here is news.
func applyReceipt(store *localstore.Store, ev *client.ReceiptEvent) (*localstore.Message, bool, error) {
	var moved bool
	var err error
	if ev.Status == client.StatusSent {
		before, found, ferr := store.Find(ev.Message)
		moved = ferr == nil && (!found || before.Status < client.StatusSent)
		err = store.MarkSent(client.Sent{MessageRef: ev.Message, Time: ev.Time})
	} else {
		moved, err = store.UpdateStatus(ev.Message, ev.Status)
	}
	if err != nil {
		return nil, true, err
	}
	m, found, err := store.Find(ev.Message)
	if err != nil || !found {
		return nil, true, err
	}
	return &m, moved, nil
}
