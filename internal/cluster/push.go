package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"time"

	"github.com/courier-im/courier/internal/ident"
)

// Pusher wakes up a device that is not connected: a notification without
// content (the device connects and reads its mailbox). Push returns an
// error if the wake-up was not handed over; the worker then retries it.
type Pusher interface {
	Push(ctx context.Context, dev ident.Device) error
}

// LogPusher is the default provider: it logs the wake-up it would send.
type LogPusher struct{ Logger *slog.Logger }

// Push implements Pusher.
func (p LogPusher) Push(ctx context.Context, dev ident.Device) error {
	if p.Logger != nil {
		p.Logger.Info("push: wake-up", "user", dev.User, "device", dev.ID)
	}
	return nil
}

// WebhookPusher posts each wake-up to a URL as JSON {"user":…,"device":…};
// any 2xx answer is success.
type WebhookPusher struct {
	url    string
	client *http.Client
}

// NewWebhook returns a WebhookPusher posting to rawURL (http or https).
// client nil means one with a 10 s timeout.
func NewWebhook(rawURL string, client *http.Client) (*WebhookPusher, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("push webhook %q: want an http:// or https:// URL", rawURL)
	}
	if client == nil {
		client = &http.Client{Timeout: 10 * time.Second}
	}
	return &WebhookPusher{url: u.String(), client: client}, nil
}

type webhookBody struct {
	User   string `json:"user"`
	Device uint32 `json:"device"`
}

// Push implements Pusher.
func (p *WebhookPusher) Push(ctx context.Context, dev ident.Device) error {
	body, err := json.Marshal(webhookBody{User: dev.User, Device: dev.ID})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		return fmt.Errorf("push webhook: %w", err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("push webhook: %s answered %s", p.url, resp.Status)
	}
	return nil
}
