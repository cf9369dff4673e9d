package delivery

import (
	"time"

	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// EntryNotifier is a Notifier that can be handed the entries themselves:
// the component holding a device's connection can then send an entry this
// process has just made durable without reading it back from the mailbox.
// The Service uses it, when its Notifier has it, wherever it knows the
// seqs an append took; the mailbox stays the source of truth, and a
// connection that cannot use a handed entry (it has not sent everything
// before it yet) reads the mailbox as after Notify.
type EntryNotifier interface {
	Notifier
	// NotifyEntry is Notify for one durable entry of dev's mailbox, handed
	// over. It must not block.
	NotifyEntry(dev ident.Device, e StoredEntry)
}

// StoredEntry is an entry an append has made durable, as handed to an
// EntryNotifier.
type StoredEntry struct {
	// Seq is the entry's seq in the device's mailbox.
	Seq uint64
	// Data is the encoded envelope. It is shared (by every device a group
	// message went to, and with the append): read it, never modify it.
	Data []byte
	// Began is a time (with its monotonic clock reading) taken before the
	// append began: no reader can have seen the entry before it.
	Began time.Time
	// Head, if not nil, is the envelope Data encodes, without its payload:
	// what a connection keeps of an entry in flight, so that it need not
	// decode Data for it. It is shared like Data: never modify it.
	Head *pb.Envelope
	// Few says that the append stored entries for few devices (at most
	// fewDevices: a 1:1 message, a receipt), so the notifier may deliver
	// this one on the calling goroutine rather than hand the delivery to
	// another: the caller's wait is short, and the hand-off would cost
	// more. A group message's entries leave Few unset: their deliveries
	// are better spread over goroutines.
	Few bool
}

// fewDevices is the most devices an append may store entries for and set
// StoredEntry.Few.
const fewDevices = 4

// notifyStored tells the devices of items that the append that began at
// began has made them durable, with seqs the seqs it took (Result.Seqs),
// handing each its entry when the Notifier takes entries. Only a durable
// append may be told. Without seqs (a duplicate) it tells the devices
// only. heads gives the envelopes of the items without their payloads, as
// StoredEntry.Head: one for every item (heads.one), or each its own
// (heads.each[i]); the zero headers means they are not known.
func (s *Service) notifyStored(items []mailbox.Item, seqs []uint64, began time.Time, heads headers) {
	en, ok := s.cfg.Notifier.(EntryNotifier)
	if !ok || len(seqs) != len(items) {
		for _, it := range items {
			s.cfg.Notifier.Notify(it.Device)
		}
		return
	}
	few := len(items) <= fewDevices
	for i, it := range items {
		en.NotifyEntry(it.Device, StoredEntry{Seq: seqs[i], Data: it.Data, Began: began, Head: heads.of(i), Few: few})
	}
}

// headers are the envelopes, without payloads, of the items of an append.
type headers struct {
	one  *pb.Envelope   // every item's, if set
	each []*pb.Envelope // else item i's, if set
}

// add records head as the envelope of the next n items; alone: they are
// all the append's items.
func (h *headers) add(head *pb.Envelope, n int, alone bool) {
	if alone {
		h.one = head
		return
	}
	for range n {
		h.each = append(h.each, head)
	}
}

func (h headers) of(i int) *pb.Envelope {
	if h.one != nil {
		return h.one
	}
	if i < len(h.each) {
		return h.each[i]
	}
	return nil
}
