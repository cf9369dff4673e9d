// Package api is courier's stateless HTTP API: registration, device lists
// and linking, prekeys (package keys), groups (groups.go), sending (202
// Accepted once durable), read reports and health. Errors are JSON with
// stable codes (package apierr; the table is in docs/protocol.md).
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/apierr"
	"github.com/courier-im/courier/internal/auth"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/keys"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Config configures the API.
type Config struct {
	Accounts accounts.Store
	Delivery *delivery.Service
	Auth     *auth.Authenticator
	// Keys serves the prekey endpoints (/v1/keys); nil leaves them out,
	// and device lists then show every identity_key as null.
	Keys *keys.Service
	// Groups serves the group endpoints (/v1/groups); nil leaves them out.
	Groups accounts.GroupStore
	Logger *slog.Logger
	// Draining reports whether the server is shutting down.
	Draining func() bool
	// Ready reports whether the backends can be reached (GET /v1/ready);
	// nil means they can.
	Ready func(context.Context) error
	// BodyTimeout bounds how long a client may take to send a request
	// body, so that a body trickled a byte at a time cannot hold a handler
	// (and its goroutine and buffers) for ever. Zero means
	// DefaultBodyTimeout.
	BodyTimeout time.Duration
}

// DefaultBodyTimeout is the default Config.BodyTimeout.
const DefaultBodyTimeout = 30 * time.Second

// API serves the HTTP endpoints.
type API struct {
	cfg     Config
	maxBody int64
}

// New returns the API.
func New(cfg Config) *API {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Draining == nil {
		cfg.Draining = func() bool { return false }
	}
	if cfg.BodyTimeout <= 0 {
		cfg.BodyTimeout = DefaultBodyTimeout
	}
	// Payloads travel as base64 in JSON (4/3 the size) plus addressing.
	maxBody := int64(cfg.Delivery.MaxPayload())*int64(cfg.Delivery.MaxPayloads())*4/3 + 64<<10
	return &API{cfg: cfg, maxBody: maxBody}
}

// Register adds the API's routes to mux.
func (a *API) Register(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/accounts", a.createAccount)
	mux.HandleFunc("GET /v1/users/{name}/devices", a.authed(a.devices))
	mux.HandleFunc("POST /v1/messages", a.authed(a.send))
	mux.HandleFunc("POST /v1/receipts", a.authed(a.read))
	mux.HandleFunc("POST /v1/devices", a.authed(a.addDevice))
	mux.HandleFunc("DELETE /v1/devices/{id}", a.authed(a.removeDevice))
	if a.cfg.Keys != nil {
		mux.HandleFunc("PUT /v1/keys", a.authed(a.putKeys))
		mux.HandleFunc("GET /v1/keys", a.authed(a.getKeys))
		mux.HandleFunc("GET /v1/keys/{user}", a.authed(a.fetchKeys))
	}
	if a.cfg.Groups != nil {
		mux.HandleFunc("POST /v1/groups", a.authed(a.createGroup))
		mux.HandleFunc("GET /v1/groups", a.authed(a.listGroups))
		mux.HandleFunc("GET /v1/groups/{id}", a.authed(a.getGroup))
		mux.HandleFunc("POST /v1/groups/{id}/members", a.authed(a.addMembers))
		mux.HandleFunc("DELETE /v1/groups/{id}/members/{user}", a.authed(a.removeMember))
		mux.HandleFunc("PUT /v1/groups/{id}/admins/{user}", a.authed(a.setAdmin(true)))
		mux.HandleFunc("DELETE /v1/groups/{id}/admins/{user}", a.authed(a.setAdmin(false)))
	}
	a.RegisterHealth(mux)
}

// RegisterHealth adds only GET /v1/health and GET /v1/ready to mux: what a
// node without the api role serves besides its own routes.
func (a *API) RegisterHealth(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/health", a.health)
	mux.HandleFunc("GET /v1/ready", a.ready)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// decode reads a JSON body of at most limit bytes, sent within the body
// timeout, into v, rejecting unknown fields and trailing data.
func (a *API) decode(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		apierr.Write(w, http.StatusUnsupportedMediaType, apierr.Detail{Code: "invalid", Message: "the body must be application/json"})
		return false
	}
	// Not supported by every ResponseWriter (httptest's recorder): then
	// there is no socket to time out either.
	rc := http.NewResponseController(w)
	rc.SetReadDeadline(time.Now().Add(a.cfg.BodyTimeout))
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, limit))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if err == nil && dec.Decode(new(json.RawMessage)) != io.EOF {
		err = errors.New("unexpected data after the JSON object")
	}
	if err == nil {
		// The body is read to its end: lift the deadline, so that it cannot
		// cut the connection's next read short while the handler works.
		rc.SetReadDeadline(time.Time{})
		return true
	}
	// On an error the deadline stays: after the answer, the server reads
	// what is left of the body (to reuse the connection), and a client
	// trickling it must not hold the connection that way either.
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		apierr.Write(w, http.StatusRequestEntityTooLarge, apierr.Detail{Code: "payload_too_large", Message: fmt.Sprintf("the body is larger than %d bytes", limit)})
		return false
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		w.Header().Set("Connection", "close")
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: fmt.Sprintf("the body did not arrive within %v", a.cfg.BodyTimeout)})
		return false
	}
	apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: "malformed JSON body: " + err.Error()})
	return false
}

type handler func(w http.ResponseWriter, r *http.Request, dev ident.Device)

func (a *API) authed(h handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		dev, err := a.cfg.Auth.Authenticate(r.Context(), r)
		if err != nil {
			if !errors.Is(err, auth.ErrUnauthorized) && !errors.Is(err, auth.ErrRateLimited) {
				a.cfg.Logger.Error("authenticate", "err", err)
			}
			auth.WriteError(w, err)
			return
		}
		h(w, r, dev)
	}
}

type createAccountRequest struct {
	Name       string `json:"name"`
	DeviceName string `json:"device_name,omitempty"`
}

type createAccountResponse struct {
	User       string `json:"user"`
	Device     uint32 `json:"device"`
	Credential string `json:"credential"`
}

func (a *API) createAccount(w http.ResponseWriter, r *http.Request) {
	var req createAccountRequest
	if !a.decode(w, r, 4<<10, &req) {
		return
	}
	if !ident.ValidUser(req.Name) {
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid_name", Message: ident.ErrBadUser.Error()})
		return
	}
	if len(req.DeviceName) > 64 {
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid", Message: "device_name is at most 64 bytes"})
		return
	}
	cred, hash := accounts.NewCredential()
	_, dev, err := a.cfg.Accounts.CreateUser(r.Context(), req.Name, req.DeviceName, hash)
	switch {
	case errors.Is(err, accounts.ErrExists):
		apierr.Write(w, http.StatusConflict, apierr.Detail{Code: "name_taken", Message: fmt.Sprintf("the name %q is taken", req.Name)})
		return
	case errors.Is(err, ident.ErrBadUser):
		apierr.Write(w, http.StatusBadRequest, apierr.Detail{Code: "invalid_name", Message: ident.ErrBadUser.Error()})
		return
	case err != nil:
		a.cfg.Logger.Error("create account", "err", err)
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot create accounts right now", RetryAfterMs: 5000})
		return
	}
	a.cfg.Logger.Info("account created", "user", req.Name)
	writeJSON(w, http.StatusCreated, createAccountResponse{User: req.Name, Device: dev.ID, Credential: cred})
}

type deviceJSON struct {
	ID          uint32    `json:"id"`
	Name        string    `json:"name,omitempty"`
	Created     time.Time `json:"created"`
	IdentityKey []byte    `json:"identity_key"` // base64; null until the device uploads keys
}

type devicesResponse struct {
	User    string       `json:"user"`
	Devices []deviceJSON `json:"devices"`
}

func (a *API) devices(w http.ResponseWriter, r *http.Request, _ ident.Device) {
	name := r.PathValue("name")
	if !ident.ValidUser(name) {
		apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "unknown_user", Message: fmt.Sprintf("no user %q", name)})
		return
	}
	devs, err := a.cfg.Accounts.Devices(r.Context(), name)
	if errors.Is(err, accounts.ErrNotFound) {
		apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "unknown_user", Message: fmt.Sprintf("no user %q", name)})
		return
	}
	if err != nil {
		a.cfg.Logger.Error("list devices", "err", err)
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot list devices right now", RetryAfterMs: 1000})
		return
	}
	idKeys, err := a.identityKeys(r, name)
	if err != nil {
		a.cfg.Logger.Error("list devices", "err", err)
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "storage_unavailable", Message: "cannot list devices right now", RetryAfterMs: 1000})
		return
	}
	resp := devicesResponse{User: name, Devices: make([]deviceJSON, len(devs))}
	for i, d := range devs {
		resp.Devices[i] = deviceJSON{ID: d.ID, Name: d.Name, Created: d.Created.UTC(), IdentityKey: idKeys[d.ID]}
	}
	writeJSON(w, http.StatusOK, resp)
}

type payloadJSON struct {
	User    string `json:"user"`
	Device  uint32 `json:"device"`
	Payload []byte `json:"payload"` // base64 in JSON
}

// sendRequest is a 1:1 message (to, payloads) or a group message (group,
// group_version and the one payload).
type sendRequest struct {
	ClientMsgID  string        `json:"client_msg_id"`
	To           string        `json:"to"`
	Payloads     []payloadJSON `json:"payloads"`
	Group        string        `json:"group"`
	GroupVersion uint64        `json:"group_version"`
	Payload      []byte        `json:"payload"` // base64 in JSON
}

type sendResponse struct {
	ServerID   string    `json:"server_id"`
	ServerTime time.Time `json:"server_time"`
	Duplicate  bool      `json:"duplicate"`
}

func (a *API) send(w http.ResponseWriter, r *http.Request, dev ident.Device) {
	if a.cfg.Draining() {
		apierr.Write(w, http.StatusServiceUnavailable, apierr.Detail{Code: "shutting_down", Message: "this server is shutting down; retry elsewhere", RetryAfterMs: 1000})
		return
	}
	var req sendRequest
	if !a.decode(w, r, a.maxBody, &req) {
		return
	}
	if len(req.Payloads) > a.cfg.Delivery.MaxPayloads() {
		a.refusal(w, &delivery.Refusal{Code: pb.RefusalCode_REFUSAL_CODE_INVALID, Message: fmt.Sprintf("at most %d payloads", a.cfg.Delivery.MaxPayloads())})
		return
	}
	sr := delivery.SendRequest{From: dev, ClientMsgID: req.ClientMsgID, To: req.To, Payloads: make([]delivery.Payload, len(req.Payloads)),
		Group: req.Group, GroupVersion: req.GroupVersion, Payload: req.Payload}
	if len(req.Payloads) == 0 {
		sr.Payloads = nil
	}
	for i, p := range req.Payloads {
		if !ident.ValidUser(p.User) || p.Device == 0 {
			a.refusal(w, &delivery.Refusal{Code: pb.RefusalCode_REFUSAL_CODE_INVALID, Message: "every payload needs a user and a device"})
			return
		}
		sr.Payloads[i] = delivery.Payload{Device: ident.Device{User: p.User, ID: p.Device}, Data: p.Payload}
	}
	acc, err := a.cfg.Delivery.Send(r.Context(), sr)
	if err != nil {
		var ref *delivery.Refusal
		if errors.As(err, &ref) {
			a.refusal(w, ref)
			return
		}
		if r.Context().Err() != nil {
			return // the client has gone
		}
		a.cfg.Logger.Error("send", "err", err)
		apierr.Write(w, http.StatusInternalServerError, apierr.Detail{Code: "internal", Message: "the message may not have been stored; retry with the same client_msg_id"})
		return
	}
	writeJSON(w, http.StatusAccepted, sendResponse{ServerID: acc.ServerID, ServerTime: acc.Time.UTC(), Duplicate: acc.Duplicate})
}

var refusalStatus = map[pb.RefusalCode]int{
	pb.RefusalCode_REFUSAL_CODE_INVALID:             http.StatusBadRequest,
	pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT:   http.StatusNotFound,
	pb.RefusalCode_REFUSAL_CODE_STALE_DEVICES:       http.StatusConflict,
	pb.RefusalCode_REFUSAL_CODE_PAYLOAD_TOO_LARGE:   http.StatusRequestEntityTooLarge,
	pb.RefusalCode_REFUSAL_CODE_STORAGE_UNAVAILABLE: http.StatusServiceUnavailable,
	pb.RefusalCode_REFUSAL_CODE_SHUTTING_DOWN:       http.StatusServiceUnavailable,
	pb.RefusalCode_REFUSAL_CODE_RATE_LIMITED:        http.StatusTooManyRequests,
	pb.RefusalCode_REFUSAL_CODE_STALE_GROUP:         http.StatusConflict,
}

func (a *API) refusal(w http.ResponseWriter, r *delivery.Refusal) {
	status, ok := refusalStatus[r.Code]
	if !ok {
		status = http.StatusBadRequest
	}
	d := apierr.Detail{Code: delivery.CodeName(r.Code), Message: r.Message, RetryAfterMs: r.RetryAfter.Milliseconds(), GroupVersion: r.GroupVersion}
	for _, ud := range r.Devices {
		d.Devices = append(d.Devices, apierr.UserDevices{User: ud.User, Devices: ud.Devices})
	}
	apierr.Write(w, status, d)
}

type messageRefJSON struct {
	ServerID    string `json:"server_id"`
	ClientMsgID string `json:"client_msg_id,omitempty"`
}

type readRequest struct {
	Sender   string           `json:"sender"`
	Messages []messageRefJSON `json:"messages"`
}

func (a *API) read(w http.ResponseWriter, r *http.Request, dev ident.Device) {
	var req readRequest
	if !a.decode(w, r, 256<<10, &req) {
		return
	}
	refs := make([]*pb.MessageRef, len(req.Messages))
	for i, m := range req.Messages {
		refs[i] = &pb.MessageRef{ServerId: m.ServerID, ClientMsgId: m.ClientMsgID}
	}
	err := a.cfg.Delivery.Read(r.Context(), dev, req.Sender, refs)
	if err != nil {
		var ref *delivery.Refusal
		if errors.As(err, &ref) {
			if ref.Code == pb.RefusalCode_REFUSAL_CODE_UNKNOWN_RECIPIENT {
				apierr.Write(w, http.StatusNotFound, apierr.Detail{Code: "unknown_user", Message: ref.Message})
				return
			}
			a.refusal(w, ref)
			return
		}
		a.cfg.Logger.Error("read report", "err", err)
		apierr.Write(w, http.StatusInternalServerError, apierr.Detail{Code: "internal", Message: "the read report may not have been recorded; retry"})
		return
	}
	writeJSON(w, http.StatusAccepted, struct{}{})
}

// readyTimeout bounds the backend checks of one readiness probe.
const readyTimeout = 2 * time.Second

// ready is the readiness probe: 200 while the backends answer and the
// server is not draining, 503 otherwise (a load balancer then sends new
// connections elsewhere). Liveness is health.
func (a *API) ready(w http.ResponseWriter, r *http.Request) {
	if a.cfg.Draining() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "shutting_down"})
		return
	}
	if a.cfg.Ready != nil {
		ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
		err := a.cfg.Ready(ctx)
		cancel()
		if err != nil {
			a.cfg.Logger.Warn("not ready", "err", err)
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "error": err.Error()})
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (a *API) health(w http.ResponseWriter, r *http.Request) {
	if a.cfg.Draining() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "shutting_down"})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}
