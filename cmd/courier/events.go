package main

import (
	"cmp"
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
	if s.pr.label == nil {
		s.pr.label = storeLabels(s.store)
	}
	switch ev := ev.(type) {
	case *client.GroupEvent:
		s.pr.group(ev)
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
// returns the message it is about and whether the receipt moved it
// forward (for a group message: moved that member's state). A receipt
// for a message not in the history is not news: it is about a message
// of the SDK's own (a group's name, a sender key, a resend request).
// A group message's receipt is marked as such (ev.Group) from the
// history, which knows it across restarts.
func applyReceipt(store *localstore.Store, ev *client.ReceiptEvent) (*localstore.Message, bool, error) {
	before, found, err := store.Find(ev.Message)
	if err != nil {
		return nil, true, err
	}
	if !found {
		return nil, false, nil
	}
	if before.Group != "" {
		ev.Group, ev.To = before.Group, before.Peer
	}
	var moved bool
	switch {
	case ev.Group != "" && ev.Status > client.StatusSent:
		// Per member; the message's status is the furthest any reached.
		serverID := cmp.Or(ev.Message.ServerID, before.ServerID)
		moved, err = store.UpdateGroupReceipt(serverID, ev.By, ev.Status)
	case ev.Status == client.StatusSent:
		moved = before.Status < client.StatusSent
		err = store.MarkSent(client.Sent{MessageRef: ev.Message, Time: ev.Time})
	default:
		moved, err = store.UpdateStatus(ev.Message, ev.Status)
	}
	if err != nil {
		return nil, true, err
	}
	m, found, err := store.Find(ev.Message)
	if err != nil || !found {
		return nil, moved, err
	}
	return &m, moved, nil
}
