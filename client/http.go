package client

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// defaultHTTPTimeout bounds one HTTP request when Config.HTTPClient is not
// given.
const defaultHTTPTimeout = 30 * time.Second

// maxErrorBody bounds how much of an error response is read.
const maxErrorBody = 64 << 10

// httpAPI speaks courier's JSON API.
type httpAPI struct {
	base   string // e.g. http://127.0.0.1:8080, no trailing slash
	client *http.Client
	auth   string // Authorization header value; "" for registration
}

// normalizeServer checks a server base URL and drops a trailing slash.
func normalizeServer(server string) (string, error) {
	u, err := url.Parse(server)
	if err != nil {
		return "", fmt.Errorf("courier: server URL %q: %w", server, err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("courier: server URL %q: want http://host:port or https://host", server)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("courier: server URL %q: no query or fragment allowed", server)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

func basicAuth(c Credentials) string {
	dev := Device{User: c.User, ID: c.Device}
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(dev.String()+":"+c.Secret))
}

// do sends a JSON request and decodes a JSON answer into out (if not nil).
// A non-2xx answer becomes a *RefusedError.
func (h *httpAPI) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("courier: encode request: %w", err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, h.base+path, body)
	if err != nil {
		return fmt.Errorf("courier: %s %s: %w", method, path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Accept", "application/json")
	if h.auth != "" {
		req.Header.Set("Authorization", h.auth)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return fmt.Errorf("courier: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return responseError(resp)
	}
	if out == nil {
		io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("courier: %s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// errorBody is the shape of every courier HTTP error.
type errorBody struct {
	Error struct {
		Code         string `json:"code"`
		Message      string `json:"message"`
		RetryAfterMs int64  `json:"retry_after_ms"`
		GroupVersion uint64 `json:"group_version"`
		Devices      []struct {
			User    string   `json:"user"`
			Devices []uint32 `json:"devices"`
		} `json:"devices"`
	} `json:"error"`
}

// responseError turns a non-2xx HTTP answer into a *RefusedError, falling
// back on the status when the body is not a courier error (a proxy's page).
func responseError(resp *http.Response) *RefusedError {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var eb errorBody
	re := &RefusedError{Status: resp.StatusCode}
	if json.Unmarshal(b, &eb) == nil && eb.Error.Code != "" {
		re.Code = eb.Error.Code
		re.Message = eb.Error.Message
		re.RetryAfter = time.Duration(eb.Error.RetryAfterMs) * time.Millisecond
		re.GroupVersion = eb.Error.GroupVersion
		for _, ud := range eb.Error.Devices {
			if re.Devices == nil {
				re.Devices = map[string][]uint32{}
			}
			re.Devices[ud.User] = ud.Devices
		}
	} else {
		re.Code = codeForStatus(resp.StatusCode)
		re.Message = strings.TrimSpace(resp.Status)
	}
	if re.RetryAfter == 0 {
		if secs, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && secs > 0 {
			re.RetryAfter = time.Duration(secs) * time.Second
		}
	}
	return re
}

func codeForStatus(status int) string {
	switch {
	case status == http.StatusUnauthorized:
		return CodeUnauthorized
	case status == http.StatusTooManyRequests:
		return CodeRateLimited
	case status == http.StatusRequestEntityTooLarge:
		return CodePayloadTooLarge
	case status == http.StatusServiceUnavailable:
		return CodeStorageUnavailable
	case status >= 500:
		return CodeInternal
	}
	return CodeInvalid
}

// Register creates the user name on the courier server at server (a base
// URL such as http://127.0.0.1:8080) with its first device, called
// deviceName (may be empty), and returns that device's credentials. Keep
// them: they are issued once. A taken name is a *RefusedError with Code
// CodeNameTaken; a malformed one, CodeInvalidName.
func Register(ctx context.Context, server, name, deviceName string) (Credentials, error) {
	base, err := normalizeServer(server)
	if err != nil {
		return Credentials{}, err
	}
	h := &httpAPI{base: base, client: &http.Client{Timeout: defaultHTTPTimeout}}
	var out struct {
		User       string `json:"user"`
		Device     uint32 `json:"device"`
		Credential string `json:"credential"`
	}
	in := struct {
		Name       string `json:"name"`
		DeviceName string `json:"device_name,omitempty"`
	}{name, deviceName}
	if err := h.do(ctx, http.MethodPost, "/v1/accounts", in, &out); err != nil {
		return Credentials{}, err
	}
	if out.User == "" || out.Device == 0 || out.Credential == "" {
		return Credentials{}, errors.New("courier: register: the server's answer lacks the credentials")
	}
	return Credentials{Server: base, User: out.User, Device: out.Device, Secret: out.Credential}, nil
}

// DeviceInfo describes one device of a user, as the server lists it.
type DeviceInfo struct {
	ID      uint32
	Name    string
	Created time.Time
	// IdentityKey is the device's public identity key (end-to-end
	// encryption), nil if it has not published one.
	IdentityKey []byte
}

func (h *httpAPI) devices(ctx context.Context, user string) ([]DeviceInfo, error) {
	var out struct {
		Devices []struct {
			ID          uint32    `json:"id"`
			Name        string    `json:"name"`
			Created     time.Time `json:"created"`
			IdentityKey []byte    `json:"identity_key"`
		} `json:"devices"`
	}
	if err := h.do(ctx, http.MethodGet, "/v1/users/"+url.PathEscape(user)+"/devices", nil, &out); err != nil {
		return nil, err
	}
	devs := make([]DeviceInfo, len(out.Devices))
	for i, d := range out.Devices {
		devs[i] = DeviceInfo{ID: d.ID, Name: d.Name, Created: d.Created, IdentityKey: d.IdentityKey}
	}
	return devs, nil
}

// devicePayload is one sealed payload for one device.
type devicePayload struct {
	to   Device
	data []byte
}

func (h *httpAPI) send(ctx context.Context, clientMsgID, to string, payloads []devicePayload) (Sent, error) {
	type payloadJSON struct {
		User    string `json:"user"`
		Device  uint32 `json:"device"`
		Payload []byte `json:"payload"`
	}
	in := struct {
		ClientMsgID string        `json:"client_msg_id"`
		To          string        `json:"to"`
		Payloads    []payloadJSON `json:"payloads"`
	}{ClientMsgID: clientMsgID, To: to, Payloads: make([]payloadJSON, len(payloads))}
	for i, p := range payloads {
		in.Payloads[i] = payloadJSON{User: p.to.User, Device: p.to.ID, Payload: p.data}
	}
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

type messageRefJSON struct {
	ServerID    string `json:"server_id"`
	ClientMsgID string `json:"client_msg_id,omitempty"`
}

func (h *httpAPI) read(ctx context.Context, sender string, msgs []MessageRef) error {
	in := struct {
		Sender   string           `json:"sender"`
		Messages []messageRefJSON `json:"messages"`
	}{Sender: sender, Messages: make([]messageRefJSON, len(msgs))}
	for i, m := range msgs {
		in.Messages[i] = messageRefJSON{ServerID: m.ServerID, ClientMsgID: m.ClientMsgID}
	}
	return h.do(ctx, http.MethodPost, "/v1/receipts", in, nil)
}
