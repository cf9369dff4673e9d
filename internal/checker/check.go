package checker

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strings"

	"github.com/courier-im/courier/client"
)

// Violation kinds.
const (
	Lost            = "lost"             // an accepted message never reached a device it was owed to
	Duplicate       = "duplicate"        // a message was shown more than once on a device
	Unaddressed     = "unaddressed"      // a message reached a device it was not addressed to
	Unknown         = "unknown"          // a delivery of a message never sent or accepted
	Mismatch        = "mismatch"         // a delivery whose body, sender or flags differ from the send
	OutOfOrder      = "out-of-order"     // two messages from one device reached a device in the wrong order
	BackwardReceipt = "backward-receipt" // a receipt status moved backward
	Conflict        = "conflicting-ids"  // one client message id accepted under two server ids (or vice versa)
	NoDevices       = "unknown-devices"  // the device set of a user was never recorded
	UnacceptedDup   = "unaccepted-dup"   // a send never seen accepted was shown twice on a device
	UnsentAccepted  = "accepted-unsent"  // an acceptance with no send attempt recorded
)

// Violation is one broken promise, with the events that show it.
type Violation struct {
	Kind   string
	Detail string
	// Events are the recorded events concerning the offending message(s),
	// in time order.
	Events []Event
}

func (v Violation) String() string { return v.Kind + ": " + v.Detail }

// message is what Check knows of one sent message.
type message struct {
	key      msgKey
	send     *Event // first send record
	serverID string
	accepted *Event // first acceptance record
	index    int    // acceptance order among the sender device's messages
}

// Check verifies the History and returns the violations found (none when
// courier kept its promise). It can be called at any time, but deliveries
// still in flight show as lost: call it once the system is quiet.
//
// A message is owed to the device sets recorded (SetDevices) before its
// first acceptance was recorded. The acceptance order of a sender device's
// messages is the order in which their first acceptances were recorded,
// which is the server's order when the device sends one message at a time
// (as the Driver does); server ids are not used for it, since two ids of
// the same millisecond do not sort by time.
func (h *History) Check() []Violation {
	events := h.Events()
	var out []Violation

	msgs := map[msgKey]*message{}
	bySID := map[string]*message{}
	get := func(k msgKey) *message {
		m := msgs[k]
		if m == nil {
			m = &message{key: k, index: -1}
			msgs[k] = m
		}
		return m
	}
	// Related events per message, for reports.
	related := map[msgKey][]Event{}
	relatedSID := map[string][]Event{}

	devices := map[string][]uint32{}
	devicesAt := map[string]map[string][]uint32{} // server id → device sets at acceptance
	nextIndex := map[client.Device]int{}
	type conflict struct {
		detail string
		ms     []*message
	}
	var conflicts []conflict

	for i := range events {
		e := &events[i]
		switch e.Kind {
		case KindDevices:
			devices[e.Device.User] = e.Devices
		case KindSend:
			m := get(msgKey{e.Device, e.ClientMsgID})
			if m.send == nil {
				m.send = e
			}
			related[m.key] = append(related[m.key], *e)
		case KindAccepted:
			k := msgKey{e.Device, e.ClientMsgID}
			m := get(k)
			related[k] = append(related[k], *e)
			if m.accepted == nil {
				if o := bySID[e.ServerID]; o != nil && o != m {
					conflicts = append(conflicts, conflict{fmt.Sprintf("server id %s accepted for %s/%s and %s/%s",
						e.ServerID, o.key.from, o.key.cmid, k.from, k.cmid), []*message{o, m}})
					continue
				}
				m.accepted, m.serverID = e, e.ServerID
				m.index = nextIndex[e.Device]
				nextIndex[e.Device]++
				bySID[e.ServerID] = m
				devicesAt[e.ServerID] = maps.Clone(devices)
			} else if m.serverID != e.ServerID {
				conflicts = append(conflicts, conflict{fmt.Sprintf("%s/%s accepted as %s and as %s",
					k.from, k.cmid, m.serverID, e.ServerID), []*message{m}})
			}
		case KindDelivered, KindReceipt:
			relatedSID[e.ServerID] = append(relatedSID[e.ServerID], *e)
		}
	}
	eventsOf := func(ms ...*message) []Event {
		var evs []Event
		seen := map[int]bool{}
		add := func(list []Event) {
			for _, e := range list {
				if !seen[e.Seq] {
					seen[e.Seq] = true
					evs = append(evs, e)
				}
			}
		}
		for _, m := range ms {
			add(related[m.key])
			if m.serverID != "" {
				add(relatedSID[m.serverID])
			}
		}
		sort.Slice(evs, func(i, j int) bool {
			if !evs[i].At.Equal(evs[j].At) {
				return evs[i].At.Before(evs[j].At)
			}
			return evs[i].Seq < evs[j].Seq
		})
		return evs
	}
	violate := func(kind, detail string, ms ...*message) {
		out = append(out, Violation{Kind: kind, Detail: detail, Events: eventsOf(ms...)})
	}
	for _, c := range conflicts {
		violate(Conflict, c.detail, c.ms...)
	}

	// Deliveries: per message and device, and per (sender device, device)
	// stream for ordering.
	type stream struct{ from, at client.Device }
	shown := map[*message]map[client.Device]int{}
	lastIndex := map[stream]*message{}
	for i := range events {
		e := &events[i]
		if e.Kind != KindDelivered {
			continue
		}
		m := bySID[e.ServerID]
		if m == nil {
			// Not (seen) accepted: it must match a send attempt.
			k := msgKey{e.From, e.ClientMsgID}
			m = msgs[k]
			if m == nil || m.send == nil {
				out = append(out, Violation{Kind: Unknown,
					Detail: fmt.Sprintf("%s got sid=%s cmid=%s from %s, which was never sent", e.Device, e.ServerID, e.ClientMsgID, e.From),
					Events: relatedSID[e.ServerID]})
				continue
			}
			if m.serverID == "" {
				// Give the unaccepted send the server id it arrived with, so
				// its later deliveries and reports line up.
				m.serverID = e.ServerID
				bySID[e.ServerID] = m
			} else {
				// The message was accepted (or first delivered) under
				// another server id: the server stored it twice.
				evs := append(eventsOf(m), relatedSID[e.ServerID]...)
				sort.SliceStable(evs, func(i, j int) bool { return evs[i].Seq < evs[j].Seq })
				out = append(out, Violation{Kind: Conflict,
					Detail: fmt.Sprintf("%s/%s (sid %s) reached %s as sid %s: stored twice", m.key.from, m.key.cmid, m.serverID, e.Device, e.ServerID),
					Events: evs})
			}
		}
		if shown[m] == nil {
			shown[m] = map[client.Device]int{}
		}
		shown[m][e.Device]++
		if n := shown[m][e.Device]; n == 2 {
			kind := Duplicate
			if m.accepted == nil {
				kind = UnacceptedDup
			}
			violate(kind, fmt.Sprintf("%s/%s (sid %s) shown more than once on %s", m.key.from, m.key.cmid, m.serverID, e.Device), m)
		}
		if n := shown[m][e.Device]; n > 1 {
			continue
		}
		if m.send != nil {
			wantSync := e.Device.User == m.key.from.User
			if e.From != m.key.from || e.ClientMsgID != m.key.cmid || string(e.Body) != string(m.send.Body) || e.Sync != wantSync {
				violate(Mismatch, fmt.Sprintf("%s got sid %s as from %s cmid=%s body=%q sync=%v; sent from %s cmid=%s body=%q to %s",
					e.Device, e.ServerID, e.From, e.ClientMsgID, e.Body, e.Sync, m.key.from, m.key.cmid, m.send.Body, m.send.To), m)
			}
		}
		if m.accepted != nil && m.send != nil {
			if owed := addressees(devicesAt[m.serverID], m.key.from, m.send.To); !owed[e.Device] {
				violate(Unaddressed, fmt.Sprintf("%s/%s (sid %s) to %s reached %s", m.key.from, m.key.cmid, m.serverID, m.send.To, e.Device), m)
				continue
			}
		}
		if m.index >= 0 {
			s := stream{m.key.from, e.Device}
			if prev := lastIndex[s]; prev != nil && prev.index > m.index {
				violate(OutOfOrder, fmt.Sprintf("on %s, %s's message #%d (sid %s) arrived after #%d (sid %s)",
					e.Device, m.key.from, m.index, m.serverID, prev.index, prev.serverID), m, prev)
			} else {
				lastIndex[s] = m
			}
		}
	}

	// Every accepted message on every device it was owed to.
	keys := slices.SortedFunc(maps.Keys(msgs), func(a, b msgKey) int {
		if c := strings.Compare(a.from.String(), b.from.String()); c != 0 {
			return c
		}
		return msgs[a].index - msgs[b].index
	})
	for _, k := range keys {
		m := msgs[k]
		if m.accepted == nil {
			continue
		}
		if m.send == nil {
			violate(UnsentAccepted, fmt.Sprintf("%s/%s accepted as %s with no send recorded", k.from, k.cmid, m.serverID), m)
			continue
		}
		sets := devicesAt[m.serverID]
		for _, u := range []string{m.send.To, k.from.User} {
			if _, ok := sets[u]; !ok {
				violate(NoDevices, fmt.Sprintf("no device set recorded for %s before %s was accepted", u, m.serverID), m)
			}
		}
		owed := addressees(sets, k.from, m.send.To)
		for _, d := range slices.SortedFunc(maps.Keys(owed), func(a, b client.Device) int { return strings.Compare(a.String(), b.String()) }) {
			if shown[m][d] == 0 {
				violate(Lost, fmt.Sprintf("%s/%s (sid %s) to %s never reached %s", k.from, k.cmid, m.serverID, m.send.To, d), m)
			}
		}
	}

	// Receipts only move forward, per (observer, message).
	type obs struct {
		at  client.Device
		sid string
	}
	furthest := map[obs]client.Status{}
	for i := range events {
		e := &events[i]
		if e.Kind != KindReceipt {
			continue
		}
		o := obs{e.Device, e.ServerID}
		prev, ok := furthest[o]
		if ok && e.Status < prev {
			evs := relatedSID[e.ServerID]
			if m := bySID[e.ServerID]; m != nil {
				evs = eventsOf(m)
			}
			out = append(out, Violation{Kind: BackwardReceipt,
				Detail: fmt.Sprintf("on %s, sid %s went from %s back to %s", e.Device, e.ServerID, prev, e.Status), Events: evs})
			continue
		}
		furthest[o] = max(prev, e.Status)
	}
	return out
}

// Report prints the violations, each followed by the events that concern
// the offending message(s), in time order, with times relative to the
// first of them.
func Report(w io.Writer, v []Violation) {
	if len(v) == 0 {
		fmt.Fprintln(w, "no violations")
		return
	}
	fmt.Fprintf(w, "%d violation(s)\n", len(v))
	for i, x := range v {
		fmt.Fprintf(w, "\n#%d %s: %s\n", i+1, x.Kind, x.Detail)
		if len(x.Events) == 0 {
			continue
		}
		t0 := x.Events[0].At
		for _, e := range x.Events {
			fmt.Fprintf(w, "  %+9.3fs  #%-6d %s\n", e.At.Sub(t0).Seconds(), e.Seq, e)
		}
	}
}
