package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/apierr"
	"github.com/courier-im/courier/internal/ident"
)

// Groups (docs/protocol.md, "Groups"). The server knows a group's id, its
// version and its members; everything else about a group travels end to
// end encrypted between the members. A group is shown only to its members:
// to anyone else every group answers 404, whether it exists or not.
//
// Every change (creation included) is made in the store first, and then
// told to every device of every member before and after it, in a
// GROUP_UPDATE envelope (delivery.Service.GroupChanged). If that cannot be
// stored, the answer is 503 storage_unavailable, and the change stands: the
// client sees it with GET /v1/groups/{id} (or GET /v1/groups after a
// creation), and the members learn it from the next update or by fetching
// the group.

// maxGroupBody bounds the bodies of the group endpoints: room for a few
// thousand names, far more than a group's member limit.
const maxGroupBody = 64 << 10

// noticeTimeout bounds the writing of a change's GROUP_UPDATE envelopes,
// which goes on when the client has gone: the change is made by then.
const noticeTimeout = 30 * time.Second

type groupMemberJSON struct {
	User  string `json:"user"`
	Admin bool   `json:"admin"`
}

type groupJSON struct {
	ID      string            `json:"id"`
	Version uint64            `json:"version"`
	Members []groupMemberJSON `json:"members"`
}

type groupRefJSON struct {
	ID      string `json:"id"`
	Version uint64 `json:"version"`
}

type groupsResponse struct {
	Groups []groupRefJSON `json:"groups"`
}

type createGroupRequest struct {
	Members []string `json:"members"`
}

type addMembersRequest struct {
	Users []string `json:"users"`
}

func toGroupJSON(g accounts.Group) groupJSON {
	out := groupJSON{ID: g.ID, Version: g.Version, Members: make([]groupMemberJSON, len(g.Members))}
	for i, m := range g.Members {
		out.Members[i] = groupMemberJSON{User: m.User, Admin: m.Admin}
	}
	return out
}

// checkNames answers 400 invalid_name for the first name in users that is
// not a user name.
func checkNames(w http.ResponseWriter, field string, users []string) bool {
	for _, u := range users {
		if !ident.ValidUser(u) {
			apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid_name", Message: fmt.Sprintf("%s: %q: %v", field, u, ident.ErrBadUser)})
			return false
		}
	}
	return true
}

func (a *API) createGroup(w http.ResponseWriter, r *http.Request, by ident.Device) {
	var req createGroupRequest
	if !a.decode(w, r, maxGroupBody, &req) {
		return
	}
	if !checkNames(w, "members", req.Members) {
		return
	}
	ch, err := a.cfg.Groups.CreateGroup(r.Context(), by.User, req.Members)
	if err != nil {
		a.groupError(w, r, "", "create a group", err)
		return
	}
	a.cfg.Logger.Info("group created", "group", ch.Group.ID, "by", by, "members", len(ch.Group.Members))
	if !a.groupChanged(w, r, by, ch, "the group was created, but not every member could be told; GET /v1/groups lists it") {
		return
	}
	writeJSON(w, http.StatusCreated, toGroupJSON(ch.Group))
}

func (a *API) listGroups(w http.ResponseWriter, r *http.Request, by ident.Device) {
	refs, err := a.cfg.Groups.Groups(r.Context(), by.User)
	if err != nil {
		a.groupError(w, r, "", "list groups", err)
		return
	}
	resp := groupsResponse{Groups: make([]groupRefJSON, len(refs))}
	for i, g := range refs {
		resp.Groups[i] = groupRefJSON{ID: g.ID, Version: g.Version}
	}
	writeJSON(w, http.StatusOK, resp)
}

func (a *API) getGroup(w http.ResponseWriter, r *http.Request, by ident.Device) {
	id := r.PathValue("id")
	g, err := a.cfg.Groups.Group(r.Context(), id)
	if err == nil {
		if member, _ := g.IsMember(by.User); !member {
			err = accounts.ErrNotFound
		}
	}
	if err != nil {
		a.groupError(w, r, id, "read a group", err)
		return
	}
	writeJSON(w, http.StatusOK, toGroupJSON(g))
}

func (a *API) addMembers(w http.ResponseWriter, r *http.Request, by ident.Device) {
	id := r.PathValue("id")
	var req addMembersRequest
	if !a.decode(w, r, maxGroupBody, &req) {
		return
	}
	if len(req.Users) == 0 {
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: "users: name at least one user to add"})
		return
	}
	if !checkNames(w, "users", req.Users) {
		return
	}
	ch, err := a.cfg.Groups.AddMembers(r.Context(), id, by.User, req.Users)
	if err != nil {
		a.groupError(w, r, id, "add group members", err)
		return
	}
	if ch.Changed {
		a.cfg.Logger.Info("group members added", "group", id, "by", by, "added", len(ch.Added), "version", ch.Group.Version)
	}
	if !a.groupChanged(w, r, by, ch, "") {
		return
	}
	writeJSON(w, http.StatusOK, toGroupJSON(ch.Group))
}

func (a *API) removeMember(w http.ResponseWriter, r *http.Request, by ident.Device) {
	id, user := r.PathValue("id"), r.PathValue("user")
	ch, err := a.cfg.Groups.RemoveMember(r.Context(), id, by.User, user)
	if err != nil {
		a.groupError(w, r, id, "remove a group member", err)
		return
	}
	a.cfg.Logger.Info("group member removed", "group", id, "by", by, "user", user, "version", ch.Group.Version, "deleted", ch.Deleted)
	if !a.groupChanged(w, r, by, ch, "") {
		return
	}
	writeJSON(w, http.StatusOK, toGroupJSON(ch.Group))
}

func (a *API) setAdmin(admin bool) handler {
	return func(w http.ResponseWriter, r *http.Request, by ident.Device) {
		id, user := r.PathValue("id"), r.PathValue("user")
		ch, err := a.cfg.Groups.SetAdmin(r.Context(), id, by.User, user, admin)
		if err != nil {
			a.groupError(w, r, id, "change a group admin", err)
			return
		}
		if ch.Changed {
			a.cfg.Logger.Info("group admin changed", "group", id, "by", by, "user", user, "admin", admin, "version", ch.Group.Version)
		}
		if !a.groupChanged(w, r, by, ch, "") {
			return
		}
		writeJSON(w, http.StatusOK, toGroupJSON(ch.Group))
	}
}

// groupChanged tells the members' devices about a change that was made,
// and answers 503 if that failed. The envelopes are written even if the
// client goes away meanwhile: the change is made.
func (a *API) groupChanged(w http.ResponseWriter, r *http.Request, by ident.Device, ch accounts.GroupChange, failMsg string) bool {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), noticeTimeout)
	defer cancel()
	err := a.cfg.Delivery.GroupChanged(ctx, by, ch)
	if err == nil {
		return true
	}
	a.cfg.Logger.Error("group update not stored", "group", ch.Group.ID, "version", ch.Group.Version, "err", err)
	if failMsg == "" {
		failMsg = fmt.Sprintf("the change was made (the group is at version %d), but not every member could be told; GET /v1/groups/%s shows the group",
			ch.Group.Version, ch.Group.ID)
	}
	apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: failMsg})
	return false
}

// groupError answers a failed group operation.
func (a *API) groupError(w http.ResponseWriter, r *http.Request, id, what string, err error) {
	var (
		unknown *accounts.UnknownUserError
		tooMany *accounts.TooManyMembersError
	)
	switch {
	case errors.As(err, &unknown):
		apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "unknown_user", Message: fmt.Sprintf("no user %q", unknown.User)})
	case errors.Is(err, accounts.ErrNotMember):
		apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "not_member", Message: fmt.Sprintf("%q is not a member of the group", r.PathValue("user"))})
	case errors.Is(err, accounts.ErrNotFound):
		// Also when the caller is not a member: the group's existence is
		// its members' business.
		apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "unknown_group", Message: fmt.Sprintf("no group %q", id)})
	case errors.Is(err, accounts.ErrForbidden):
		apierr.Write(w, http.StatusForbidden, apierr.Detail{Code: "forbidden", Message: "only a group admin may " + what})
	case errors.As(err, &tooMany):
		apierr.Write(w, http.StatusConflict, apierr.Detail{Code: "too_many_members",
			Message: fmt.Sprintf("the group would have %d members; a group has at most %d", tooMany.Members, tooMany.Limit)})
	case errors.Is(err, accounts.ErrLastAdmin):
		apierr.Write(w, http.StatusConflict, apierr.Detail{Code: "last_admin", Message: "a group needs an admin: make another member admin first (or leave, which hands the role on)"})
	case r.Context().Err() != nil:
		// The client has gone.
	default:
		a.cfg.Logger.Error(what, "group", id, "err", err)
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot " + what + " right now", RetryAfterMs: 1000})
	}
}
