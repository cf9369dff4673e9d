package client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	courierv1 "github.com/courier-im/courier/proto/courier/v1"
)

// Groups. The server keeps a group's id, membership version and members
// (with admin flags) and copies a group message to every device of every
// member; everything else about a group (its name) travels end-to-end
// encrypted between members, and group messages are sealed once with the
// sending device's sender key (client/e2e). Groups need a Cipher that
// implements GroupCipher.

// GroupMember is one member of a group.
type GroupMember struct {
	User  string `json:"user"`
	Admin bool   `json:"admin"`
}

// Group is a group as this device knows it.
type Group struct {
	ID string
	// Name is what the creator called it, learned end-to-end encrypted
	// from a member; "" until then.
	Name string
	// Version counts membership changes (1 when created).
	Version uint64
	Members []GroupMember
	// Left is true once this user is no longer a member (removed, or
	// left): the group is kept for its history.
	Left bool
}

// Member reports whether user is a member of g.
func (g Group) Member(user string) bool {
	return slices.ContainsFunc(g.Members, func(m GroupMember) bool { return m.User == user })
}

// Admin reports whether user is an admin of g.
func (g Group) Admin(user string) bool {
	return slices.ContainsFunc(g.Members, func(m GroupMember) bool { return m.User == user && m.Admin })
}

// Users returns the members' names, in the order of Members.
func (g Group) Users() []string {
	out := make([]string, len(g.Members))
	for i, m := range g.Members {
		out[i] = m.User
	}
	return out
}

// Label is how a group is shown: "#name", or "#id" while the name is
// not known.
func (g Group) Label() string {
	if g.Name != "" {
		return "#" + g.Name
	}
	return "#" + g.ID
}

// GroupPeer is the conversation name of a group in the history and in the
// Tracker: "#" and the id ('#' is never part of a user name).
func GroupPeer(id string) string { return "#" + id }

// GroupStore persists what this device knows of its groups.
// Implementations must be safe for concurrent use; localstore.Store is
// one.
type GroupStore interface {
	// SaveGroup stores g whole (name, version, members, left), replacing
	// what was stored for g.ID.
	SaveGroup(g Group) error
	// LoadGroup returns the group with this id, if stored.
	LoadGroup(id string) (Group, bool, error)
	// ListGroups returns every stored group.
	ListGroups() ([]Group, error)
}

// memGroups is the default GroupStore: in memory only.
type memGroups struct {
	mu     sync.Mutex
	groups map[string]Group
}

func (m *memGroups) SaveGroup(g Group) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.groups == nil {
		m.groups = map[string]Group{}
	}
	g.Members = slices.Clone(g.Members)
	m.groups[g.ID] = g
	return nil
}

func (m *memGroups) LoadGroup(id string) (Group, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	g, ok := m.groups[id]
	g.Members = slices.Clone(g.Members)
	return g, ok, nil
}

func (m *memGroups) ListGroups() ([]Group, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Group, 0, len(m.groups))
	for _, g := range m.groups {
		g.Members = slices.Clone(g.Members)
		out = append(out, g)
	}
	slices.SortFunc(out, func(a, b Group) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// GroupCipher is a Cipher that also seals group messages (client/e2e:
// Signal sender keys). Groups need one.
type GroupCipher interface {
	Cipher

	// SealGroup encrypts m (m.Group set, m.To empty) once, for every
	// device of to. Before, it makes sure that each of to.Devices holds
	// this device's current sender key for the group, handing it to the
	// users whose devices lack it with share (a pairwise message, sent at
	// once). Errors are handled as Seal's.
	SealGroup(ctx context.Context, m OutboxMessage, to GroupTarget, share ShareFunc) ([]byte, error)

	// RotateGroupKey drops this device's sender key for a group that
	// lost members: the next SealGroup makes a new one and hands it to
	// the remaining members' devices, so that the removed members cannot
	// read what is sent from then on.
	RotateGroupKey(ctx context.Context, group string) error
}

// GroupTarget is where a group message goes: the group's id and the
// membership version it was addressed for, and the devices of its
// members (every one but the sending device).
type GroupTarget struct {
	ID      string
	Version uint64
	Devices []Device
}

// ShareFunc sends body, a Cipher's control message, to user at once (not
// through the outbox's queue): sealed pairwise for every device of user
// and every other device of this user. It returns the devices it went
// to.
type ShareFunc func(ctx context.Context, to string, body []byte) ([]Device, error)

// GroupEvent reports a change of a group: members added or removed (By
// is who made the change), or its name learned (Renamed).
type GroupEvent struct {
	Group   Group // after the change
	By      string
	Added   []string
	Removed []string
	Renamed bool
	Time    time.Time
}

func (*GroupEvent) isEvent() {}

// ErrNoGroupCipher is returned by the group operations of a Client whose
// Config.Cipher does not implement GroupCipher: group messages are only
// sent end-to-end encrypted.
var ErrNoGroupCipher = errors.New("courier: groups need an end-to-end encryption layer (a Cipher implementing client.GroupCipher)")

// ErrNotMember is returned when this user is not (or no longer) a member
// of a group.
var ErrNotMember = errors.New("courier: not a member of this group")

// maxGroupName bounds a group's name, in bytes.
const maxGroupName = 200

func (c *Client) groupCipher() (GroupCipher, error) {
	gc, ok := c.cfg.Cipher.(GroupCipher)
	if !ok {
		return nil, ErrNoGroupCipher
	}
	return gc, nil
}

// CreateGroup makes a group of this user and members on the server (this
// user is its admin), stores it, and sends its name, end-to-end
// encrypted, to every member (through the outbox). It returns the group.
func (c *Client) CreateGroup(ctx context.Context, name string, members ...string) (Group, error) {
	if _, err := c.groupCipher(); err != nil {
		return Group{}, err
	}
	name = strings.TrimSpace(name)
	if name == "" || len(name) > maxGroupName || strings.ContainsAny(name, "\n\r") {
		return Group{}, fmt.Errorf("courier: create group: the name must be 1-%d bytes on one line", maxGroupName)
	}
	var users []string
	for _, u := range members {
		if !validUser(u) {
			return Group{}, fmt.Errorf("courier: create group: bad user name %q", u)
		}
		if u != c.self.User && !slices.Contains(users, u) {
			users = append(users, u)
		}
	}
	gj, err := c.api.createGroup(ctx, users)
	if err != nil {
		return Group{}, fmt.Errorf("courier: create group: %w", err)
	}
	g := gj.group()
	g.Name = name
	c.groupMu.Lock()
	err = c.groups.SaveGroup(g)
	c.groupMu.Unlock()
	if err != nil {
		return g, fmt.Errorf("courier: create group: store it: %w", err)
	}
	c.shareName(g, g.Users())
	return g, nil
}

// shareName sends g's name to users (through the outbox, as control
// messages): to each member but this user, or to this user's other
// devices when it is alone in the group.
func (c *Client) shareName(g Group, users []string) {
	if g.Name == "" {
		return
	}
	var to []string
	for _, u := range users {
		if u != c.self.User {
			to = append(to, u)
		}
	}
	if len(to) == 0 {
		to = []string{c.self.User}
	}
	for _, u := range to {
		m := OutboxMessage{To: u, Group: g.ID, Body: []byte(g.Name), Control: true}
		if _, err := c.enqueueMessage(m, false); err != nil {
			c.log.Warn("groups: queue the group's name", "group", g.ID, "to", u, "err", err)
		}
	}
}

// AddMembers adds users to a group (this user must be an admin), and
// sends them the group's name. Before this device's next message to the
// group, its sender key goes to their devices.
func (c *Client) AddMembers(ctx context.Context, groupID string, users ...string) (Group, error) {
	if _, err := c.groupCipher(); err != nil {
		return Group{}, err
	}
	if len(users) == 0 {
		return Group{}, errors.New("courier: add members: no users given")
	}
	for _, u := range users {
		if !validUser(u) {
			return Group{}, fmt.Errorf("courier: add members: bad user name %q", u)
		}
	}
	if err := c.api.do(ctx, http.MethodPost, groupPath(groupID)+"/members", struct {
		Users []string `json:"users"`
	}{users}, nil); err != nil {
		return Group{}, fmt.Errorf("courier: add members: %w", err)
	}
	g, err := c.RefreshGroup(ctx, groupID)
	if err != nil {
		return g, err
	}
	c.shareName(g, users)
	return g, nil
}

// RemoveMember removes user from a group (this user must be an admin).
// This device's sender key for the group is replaced, so that user
// cannot read what is sent from now on.
func (c *Client) RemoveMember(ctx context.Context, groupID, user string) (Group, error) {
	if _, err := c.groupCipher(); err != nil {
		return Group{}, err
	}
	if !validUser(user) {
		return Group{}, fmt.Errorf("courier: remove member: bad user name %q", user)
	}
	if err := c.api.do(ctx, http.MethodDelete, groupPath(groupID)+"/members/"+url.PathEscape(user), nil, nil); err != nil {
		return Group{}, fmt.Errorf("courier: remove member: %w", err)
	}
	return c.RefreshGroup(ctx, groupID)
}

// Leave takes this user out of a group. The group stays in the store,
// marked Left, for its history.
func (c *Client) Leave(ctx context.Context, groupID string) (Group, error) {
	if _, err := c.groupCipher(); err != nil {
		return Group{}, err
	}
	if err := c.api.do(ctx, http.MethodDelete, groupPath(groupID)+"/members/"+url.PathEscape(c.self.User), nil, nil); err != nil {
		return Group{}, fmt.Errorf("courier: leave group: %w", err)
	}
	return c.RefreshGroup(ctx, groupID)
}

// SetAdmin makes user an admin of a group, or (admin false) no longer
// one. This user must be an admin.
func (c *Client) SetAdmin(ctx context.Context, groupID, user string, admin bool) (Group, error) {
	if !validUser(user) {
		return Group{}, fmt.Errorf("courier: set admin: bad user name %q", user)
	}
	method := http.MethodPut
	if !admin {
		method = http.MethodDelete
	}
	if err := c.api.do(ctx, method, groupPath(groupID)+"/admins/"+url.PathEscape(user), nil, nil); err != nil {
		return Group{}, fmt.Errorf("courier: set admin: %w", err)
	}
	return c.RefreshGroup(ctx, groupID)
}

// Groups returns the groups this device knows (from the store), members
// and former ones.
func (c *Client) Groups() ([]Group, error) { return c.groups.ListGroups() }

// Group returns a group this device knows, from the store.
func (c *Client) Group(id string) (Group, bool, error) { return c.groups.LoadGroup(id) }

// SyncGroups fetches the list of this user's groups from the server and
// refreshes every one whose version is not the stored one (groups joined
// while this device was away, say). It returns the groups stored then.
func (c *Client) SyncGroups(ctx context.Context) ([]Group, error) {
	var out struct {
		Groups []struct {
			ID      string `json:"id"`
			Version uint64 `json:"version"`
		} `json:"groups"`
	}
	if err := c.api.do(ctx, http.MethodGet, "/v1/groups", nil, &out); err != nil {
		return nil, fmt.Errorf("courier: list groups: %w", err)
	}
	for _, s := range out.Groups {
		g, ok, err := c.groups.LoadGroup(s.ID)
		if err != nil {
			return nil, err
		}
		if ok && g.Version == s.Version && !g.Left {
			continue
		}
		if _, err := c.RefreshGroup(ctx, s.ID); err != nil {
			return nil, err
		}
	}
	return c.groups.ListGroups()
}

// RefreshGroup fetches a group's membership from the server and stores
// it. Members removed since the stored version make this device replace
// its sender key (GroupCipher.RotateGroupKey). If this user is no longer
// a member, the stored group is marked Left and ErrNotMember returned.
func (c *Client) RefreshGroup(ctx context.Context, groupID string) (Group, error) {
	gj, err := c.api.group(ctx, groupID)
	var re *RefusedError
	if errors.As(err, &re) && re.Status == http.StatusNotFound {
		c.groupMu.Lock()
		g, ok, lerr := c.groups.LoadGroup(groupID)
		if lerr == nil && ok && !g.Left {
			g.Left = true
			lerr = c.groups.SaveGroup(g)
		}
		c.groupMu.Unlock()
		if lerr != nil {
			return g, lerr
		}
		return g, fmt.Errorf("courier: group %s: %w", groupID, ErrNotMember)
	}
	if err != nil {
		return Group{}, fmt.Errorf("courier: group %s: %w", groupID, err)
	}
	g, _, _, err := c.applyGroup(ctx, gj.group())
	return g, err
}

// applyGroup stores a group's membership as the server gives it (unless
// the stored version is newer) and reports who was added and removed
// since the stored version; removals make this device replace its sender
// key. A membership without this user marks the group Left.
func (c *Client) applyGroup(ctx context.Context, next Group) (Group, []string, []string, error) {
	c.groupMu.Lock()
	defer c.groupMu.Unlock()
	prev, known, err := c.groups.LoadGroup(next.ID)
	if err != nil {
		return next, nil, nil, err
	}
	if known && prev.Version > next.Version {
		return prev, nil, nil, nil // an older update, delivered late
	}
	next.Name = prev.Name
	next.Left = !next.Member(c.self.User)
	if known && prev.Version == next.Version && prev.Left == next.Left {
		return prev, nil, nil, nil
	}
	var added, removed []string
	for _, m := range next.Members {
		if !prev.Member(m.User) {
			added = append(added, m.User)
		}
	}
	for _, m := range prev.Members {
		if !next.Member(m.User) {
			removed = append(removed, m.User)
		}
	}
	if !known {
		added = nil // first sight of the group: nothing changed for us
	}
	// Not while a group message is being sealed: it is sealed either for
	// the old membership with the old key (and refused as stale), or for
	// the new one with a new key.
	c.sealMu.Lock()
	defer c.sealMu.Unlock()
	if err := c.groups.SaveGroup(next); err != nil {
		return next, nil, nil, err
	}
	// Rejoining after a removal starts with a new key too: members
	// removed meanwhile still hold the old one.
	if (len(removed) > 0 || (known && prev.Left)) && !next.Left {
		if gc, ok := c.cfg.Cipher.(GroupCipher); ok {
			if err := gc.RotateGroupKey(ctx, next.ID); err != nil {
				c.log.Error("groups: replace the sender key after a removal", "group", next.ID, "err", err)
			}
		}
	}
	return next, added, removed, nil
}

// SendGroup puts a message to a group in the outbox and waits until the
// server has accepted it, as Send does. The outbox seals it once with
// this device's sender key (handing the key first to member devices that
// lack it), and on a stale_group refusal (the membership changed)
// refreshes the group and retries with the same client id.
func (c *Client) SendGroup(ctx context.Context, groupID string, body []byte) (Sent, error) {
	it, err := c.enqueueGroup(groupID, body, true)
	if err != nil {
		return Sent{}, err
	}
	return c.wait(ctx, it)
}

// SendGroupAsync is SendGroup without waiting, as SendAsync.
func (c *Client) SendGroupAsync(groupID string, body []byte) (MessageRef, error) {
	it, err := c.enqueueGroup(groupID, body, false)
	if err != nil {
		return MessageRef{}, err
	}
	return MessageRef{ClientMsgID: it.msg.ClientMsgID}, nil
}

func (c *Client) enqueueGroup(groupID string, body []byte, wait bool) (*outItem, error) {
	if _, err := c.groupCipher(); err != nil {
		return nil, err
	}
	g, ok, err := c.groups.LoadGroup(groupID)
	if err != nil {
		return nil, fmt.Errorf("courier: send to group: %w", err)
	}
	if ok && g.Left {
		return nil, fmt.Errorf("courier: send to group %s: %w", g.Label(), ErrNotMember)
	}
	return c.enqueueMessage(OutboxMessage{Group: groupID, Body: body}, wait)
}

// ResendGroup puts in the outbox a resend to a group of the message sent
// earlier with client id contentID (body is what the Cipher kept of it):
// for a member device that could not decrypt it. Like SendControl, it is
// not tracked and no event reports it.
func (c *Client) ResendGroup(groupID string, body []byte, contentID string) (string, error) {
	if contentID == "" {
		return "", errors.New("courier: resend to group: no content id")
	}
	it, err := c.enqueueMessage(OutboxMessage{Group: groupID, Body: body, ContentID: contentID}, false)
	if err != nil {
		return "", err
	}
	return it.msg.ClientMsgID, nil
}

// maxStaleGroupRetries is how many stale_group refusals in a row a group
// message is retried at once after refreshing the group.
const maxStaleGroupRetries = 3

// attemptGroup makes one try at sending a group message: the group's
// devices, the sender key handed out where lacking, one sealed payload.
func (c *Client) attemptGroup(ctx context.Context, it *outItem) (Sent, error) {
	gc, err := c.groupCipher()
	if err != nil {
		return Sent{}, err
	}
	id := it.msg.Group
	g, ok, err := c.groups.LoadGroup(id)
	if err != nil {
		return Sent{}, err
	}
	if !ok || g.Version == 0 {
		if _, err = c.RefreshGroup(ctx, id); err != nil {
			return Sent{}, err
		}
	}
	payload, g, err := c.sealGroup(ctx, gc, it.msg)
	if err != nil {
		return Sent{}, err
	}
	if s := c.session(); s != nil {
		sent, err := s.sendGroup(ctx, it.msg.ClientMsgID, id, g.Version, payload, &it.first)
		if !errors.Is(err, errDisconnected) {
			return sent, err
		}
	}
	// The HTTP API has no first_attempt, but this is a transmission.
	it.first.take()
	return c.api.sendGroup(ctx, it.msg.ClientMsgID, id, g.Version, payload)
}

// sealGroup seals a group message for the stored membership, which no
// update changes meanwhile, and returns the payload and the group.
func (c *Client) sealGroup(ctx context.Context, gc GroupCipher, m OutboxMessage) ([]byte, Group, error) {
	c.sealMu.Lock()
	defer c.sealMu.Unlock()
	id := m.Group
	g, ok, err := c.groups.LoadGroup(id)
	if err != nil {
		return nil, g, err
	}
	if !ok {
		return nil, g, fmt.Errorf("courier: group %s is not known", id)
	}
	if g.Left {
		return nil, g, &RefusedError{Code: CodeNotMember, Message: fmt.Sprintf("%s is not a member of group %s", c.self.User, g.Label())}
	}
	target := GroupTarget{ID: g.ID, Version: g.Version}
	for _, u := range g.Users() {
		ids, err := c.devicesOf(ctx, u)
		if err != nil {
			var re *RefusedError
			if errors.As(err, &re) && re.Code == CodeUnknownUser {
				continue // an account that is gone
			}
			return nil, g, err
		}
		for _, d := range ids {
			if dev := (Device{User: u, ID: d}); dev != c.self {
				target.Devices = append(target.Devices, dev)
			}
		}
	}
	payload, err := gc.SealGroup(ctx, m, target, c.share)
	if err != nil {
		var se *SealError
		if errors.As(err, &se) {
			return nil, g, err
		}
		return nil, g, &SealError{Device: Device{User: GroupPeer(id)}, Err: err}
	}
	return payload, g, nil
}

// share is the ShareFunc the outbox hands a GroupCipher: a control
// message sent pairwise at once, retried on stale device lists.
func (c *Client) share(ctx context.Context, to string, body []byte) ([]Device, error) {
	m := OutboxMessage{ClientMsgID: newClientMsgID(), From: c.self, To: to, Body: body, Control: true, Created: time.Now()}
	first := fresh() // m is never stored: only this loop sends it
	for stale := 0; ; stale++ {
		targets, _, err := c.attemptPairwise(ctx, m, first)
		var re *RefusedError
		if errors.As(err, &re) && re.Code == CodeStaleDevices && stale < maxStaleRetries {
			c.learnDevices(re, to)
			continue
		}
		if err != nil {
			return nil, err
		}
		return targets, nil
	}
}

// groupJSON is a group as the server's API gives it.
type groupJSON struct {
	ID      string        `json:"id"`
	Version uint64        `json:"version"`
	Members []GroupMember `json:"members"`
}

func (g groupJSON) group() Group {
	return Group{ID: g.ID, Version: g.Version, Members: slices.Clone(g.Members)}
}

func groupPath(id string) string { return "/v1/groups/" + url.PathEscape(id) }

func (h *httpAPI) createGroup(ctx context.Context, members []string) (groupJSON, error) {
	var out groupJSON
	err := h.do(ctx, http.MethodPost, "/v1/groups", struct {
		Members []string `json:"members"`
	}{nonNilStrings(members)}, &out)
	if err == nil && out.ID == "" {
		err = errors.New("the server's answer lacks the group id")
	}
	return out, err
}

func (h *httpAPI) group(ctx context.Context, id string) (groupJSON, error) {
	var out groupJSON
	err := h.do(ctx, http.MethodGet, groupPath(id), nil, &out)
	if err == nil && out.ID == "" {
		out.ID = id
	}
	return out, err
}

func nonNilStrings(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (h *httpAPI) sendGroup(ctx context.Context, clientMsgID, group string, version uint64, payload []byte) (Sent, error) {
	in := struct {
		ClientMsgID  string `json:"client_msg_id"`
		Group        string `json:"group"`
		GroupVersion uint64 `json:"group_version"`
		Payload      []byte `json:"payload"`
	}{clientMsgID, group, version, payload}
	var out struct {
		ServerID   string    `json:"server_id"`
		ServerTime time.Time `json:"server_time"`
		Duplicate  bool      `json:"duplicate"`
	}
	if err := h.do(ctx, http.MethodPost, "/v1/messages", in, &out); err != nil {
		return Sent{}, err
	}
	return Sent{MessageRef: MessageRef{ServerID: out.ServerID, ClientMsgID: clientMsgID}, Time: out.ServerTime, Duplicate: out.Duplicate}, nil
}

// sendGroup offers one group message over the connection. first is the
// message's firstTry.
func (s *session) sendGroup(ctx context.Context, clientMsgID, group string, version uint64, payload []byte, first *firstTry) (Sent, error) {
	if max := s.hello.GetMaxPayloadBytes(); max > 0 && len(payload) > int(max) {
		return Sent{}, &RefusedError{Code: CodePayloadTooLarge,
			Message: fmt.Sprintf("the payload is %d bytes; the server's limit is %d", len(payload), max)}
	}
	f := &courierv1.ClientFrame{Body: &courierv1.ClientFrame_Send{Send: &courierv1.Send{
		ClientMsgId: clientMsgID, Group: group, GroupVersion: version, Payload: payload}}}
	return s.offer(ctx, clientMsgID, f, first)
}

// groupUpdate handles an ENVELOPE_KIND_GROUP_UPDATE entry: the stored
// membership is updated, the sender key replaced if members were
// removed, and a GroupEvent emitted.
func (c *Client) groupUpdate(env *courierv1.Envelope) {
	u := env.GetGroupUpdate()
	if u == nil || u.GetGroup() == "" {
		c.log.Warn("ignoring a group update without a group", "id", env.GetServerId())
		return
	}
	next := Group{ID: u.GetGroup(), Version: u.GetVersion()}
	for _, m := range u.GetMembers() {
		next.Members = append(next.Members, GroupMember{User: m.GetUser(), Admin: m.GetAdmin()})
	}
	g, _, removed, err := c.applyGroup(c.ctx, next)
	if err != nil {
		c.log.Error("groups: store an update", "group", next.ID, "err", err)
	}
	// What the server says changed, rather than what this device missed.
	added := u.GetAdded()
	if len(u.GetRemoved()) > 0 {
		removed = u.GetRemoved()
	}
	if g.Version > next.Version {
		return // older than what is stored: reported before
	}
	c.handle(&GroupEvent{Group: g, By: env.GetSender(), Added: added, Removed: removed,
		Time: timeMs(env.GetServerTimeMs())})
}

// groupInfo handles a group's details sent by a member (its name): stored
// if the sender is a member of the group.
func (c *Client) groupInfo(from Device, info *GroupInfo, at time.Time) {
	g, ok, err := c.groups.LoadGroup(info.Group)
	if err == nil && (!ok || !g.Member(from.User)) {
		ctx, cancel := context.WithTimeout(c.ctx, attemptTimeout)
		g, err = c.RefreshGroup(ctx, info.Group)
		cancel()
	}
	if err != nil && !errors.Is(err, ErrNotMember) {
		c.log.Warn("groups: cannot check the sender of a group's name", "group", info.Group, "from", from, "err", err)
		return
	}
	if !g.Member(from.User) {
		c.log.Warn("groups: ignoring a group's name from a non-member", "group", info.Group, "from", from)
		return
	}
	name := strings.TrimSpace(info.Name)
	if name == "" || len(name) > maxGroupName || name == g.Name {
		return
	}
	c.groupMu.Lock()
	g, _, err = c.groups.LoadGroup(info.Group)
	if err == nil {
		g.Name = name
		err = c.groups.SaveGroup(g)
	}
	c.groupMu.Unlock()
	if err != nil {
		c.log.Error("groups: store a group's name", "group", info.Group, "err", err)
		return
	}
	c.handle(&GroupEvent{Group: g, By: from.User, Renamed: true, Time: at})
}

// GroupInfo is a group's details as a member sent them (Opened.GroupInfo).
type GroupInfo struct {
	Group string
	Name  string
}
