package e2e

import (
	"context"
	"fmt"
	"slices"

	signalgroups "go.mau.fi/libsignal/groups"
	"go.mau.fi/libsignal/protocol"

	"github.com/courier-im/courier/client"
)

// Groups use Signal's sender keys: each device has, per group, a sender
// key (a chain key and a signing key) that it hands to every other member
// device over the pairwise sessions (an opSenderKey control message
// carrying a SenderKeyDistributionMessage), and seals each group message
// once with it (typeSenderKey). e2e_sender_key_shared remembers which
// member devices hold the current key; a membership change that removes
// someone drops the key (RotateGroupKey), and the next message makes and
// hands out a new one.

var _ client.GroupCipher = (*Engine)(nil)

func (e *Engine) senderKeyName(group string, from client.Device) *protocol.SenderKeyName {
	return protocol.NewSenderKeyName(group, protocol.NewSignalAddress(from.User, from.ID))
}

// SealGroup encrypts m once for the group to (client.GroupCipher): first
// this device's sender key goes, pairwise, to every device of to that
// does not hold it yet; then the message is sealed with it.
func (e *Engine) SealGroup(ctx context.Context, m client.OutboxMessage, to client.GroupTarget, share client.ShareFunc) ([]byte, error) {
	if to.ID == "" || len(to.ID) > maxGroupIDLen {
		return nil, fmt.Errorf("e2e: bad group id %q", to.ID)
	}
	frame := m.Body // a resend: the frame sent the first time
	if m.ContentID == "" {
		frame = inner{kind: kindMessage, id: m.ClientMsgID, body: m.Body}.encode()
	}
	name := e.senderKeyName(to.ID, e.self)
	var skdm *protocol.SenderKeyDistributionMessage
	err := e.inTx(ctx, func() error {
		var err error
		skdm, err = signalgroups.NewGroupSessionBuilder(e.ss, e.ser).Create(ctx, name)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("e2e: sender key for group %s: %w", to.ID, err)
	}
	lacking, err := e.lackingKey(ctx, to, skdm.ID())
	if err != nil {
		return nil, err
	}
	body := groupControl{op: opSenderKey, group: to.ID, data: skdm.Serialize()}.encode()
	for _, user := range lacking {
		if user != e.self.User {
			if blocked, err := e.blocked(ctx, user); err != nil {
				return nil, err
			} else if blocked {
				return nil, &BlockedError{User: user}
			}
		}
		devs, err := share(ctx, user, body)
		if err != nil {
			return nil, err
		}
		if err := e.markShared(ctx, to.ID, skdm.ID(), devs); err != nil {
			return nil, err
		}
	}
	var out []byte
	err = e.inTx(ctx, func() error {
		if m.ContentID == "" {
			if _, err := e.ss.q.ExecContext(ctx, `INSERT INTO e2e_sent (client_msg_id, to_user, body, created, group_id)
				VALUES (?, '', ?, ?, ?) ON CONFLICT DO NOTHING`, m.ClientMsgID, frame, ms(m.Created), to.ID); err != nil {
				return fmt.Errorf("e2e: keep the sent message: %w", err)
			}
		}
		msg, err := signalgroups.NewGroupCipher(signalgroups.NewGroupSessionBuilder(e.ss, e.ser), name, e.ss).Encrypt(ctx, frame)
		if err != nil {
			return &client.SealError{Device: client.Device{User: client.GroupPeer(to.ID)}, Err: err}
		}
		out = append([]byte{payloadVersion, typeSenderKey}, msg.SignedSerialize()...)
		return nil
	})
	return out, err
}

// lackingKey returns the users (sorted) with a device in to that does not
// hold this device's sender key keyID.
func (e *Engine) lackingKey(ctx context.Context, to client.GroupTarget, keyID uint32) ([]string, error) {
	rows, err := e.db.QueryContext(ctx, "SELECT user, device FROM e2e_sender_key_shared WHERE group_id = ? AND key_id = ?", to.ID, keyID)
	if err != nil {
		return nil, fmt.Errorf("e2e: sender key holders: %w", err)
	}
	have := map[client.Device]bool{}
	for rows.Next() {
		var d client.Device
		if err := rows.Scan(&d.User, &d.ID); err != nil {
			rows.Close()
			return nil, err
		}
		have[d] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	var users []string
	for _, d := range to.Devices {
		if !have[d] && !slices.Contains(users, d.User) {
			users = append(users, d.User)
		}
	}
	slices.Sort(users)
	return users, nil
}

// markShared records that devs hold this device's sender key keyID for
// group.
func (e *Engine) markShared(ctx context.Context, group string, keyID uint32, devs []client.Device) error {
	return e.inTx(ctx, func() error {
		for _, d := range devs {
			if _, err := e.ss.q.ExecContext(ctx, `INSERT INTO e2e_sender_key_shared (group_id, user, device, key_id) VALUES (?, ?, ?, ?)
				ON CONFLICT DO UPDATE SET key_id = excluded.key_id`, group, d.User, d.ID, keyID); err != nil {
				return fmt.Errorf("e2e: record the sender key's holders: %w", err)
			}
		}
		return nil
	})
}

// RotateGroupKey drops this device's sender key for group
// (client.GroupCipher): the next SealGroup makes a new one and hands it
// to the members' devices then, so members removed before cannot read
// what follows.
func (e *Engine) RotateGroupKey(ctx context.Context, group string) error {
	return e.inTx(ctx, func() error {
		if _, err := e.ss.q.ExecContext(ctx, "DELETE FROM e2e_sender_keys WHERE group_id = ? AND user = ? AND device = ?",
			group, e.self.User, e.self.ID); err != nil {
			return fmt.Errorf("e2e: drop the sender key: %w", err)
		}
		if _, err := e.ss.q.ExecContext(ctx, "DELETE FROM e2e_sender_key_shared WHERE group_id = ?", group); err != nil {
			return fmt.Errorf("e2e: drop the sender key: %w", err)
		}
		return nil
	})
}

// decryptGroup opens a group message with its sender's sender key. Under
// e.mu, in the Open transaction.
func (e *Engine) decryptGroup(ctx context.Context, in client.Inbound, p []byte) ([]byte, error) {
	if in.Group == "" {
		return nil, fmt.Errorf("%w: a group message outside a group", errMalformed)
	}
	msg, err := protocol.NewSenderKeyMessageFromBytes(p, e.ser.SenderKeyMessage)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errMalformed, err)
	}
	name := e.senderKeyName(in.Group, in.From)
	return signalgroups.NewGroupCipher(signalgroups.NewGroupSessionBuilder(e.ss, e.ser), name, e.ss).Decrypt(ctx, msg)
}

// takeSenderKey stores the sender key a member device handed this one
// (an opSenderKey control message that came over the pairwise session
// with it, so from it). A key already held is kept as it is: processing
// it again would forget the message keys of messages still in flight.
// Under e.mu, in the Open transaction.
func (e *Engine) takeSenderKey(ctx context.Context, from client.Device, g groupControl) error {
	skdm, err := protocol.NewSenderKeyDistributionMessageFromBytes(g.data, e.ser.SenderKeyDistributionMessage)
	if err != nil {
		return fmt.Errorf("%w: sender key: %v", errMalformed, err)
	}
	name := e.senderKeyName(g.group, from)
	rec, err := e.ss.LoadSenderKey(ctx, name)
	if err != nil {
		return err
	}
	if _, err := rec.GetSenderKeyStateByID(skdm.ID()); err == nil {
		return nil
	}
	return signalgroups.NewGroupSessionBuilder(e.ss, e.ser).Process(ctx, name, skdm)
}
