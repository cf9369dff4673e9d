// Package keys is the prekey service of the Signal protocol (issue 3): it
// checks the public keys devices upload (their form, and the signed
// prekey's XEdDSA signature against the identity key, with
// go.mau.fi/libsignal's ecc package), stores them in the account store
// (accounts.KeyStore), hands out prekey bundles (one one-time prekey per
// device per fetch, rate-limited per requesting device) and tells a device,
// through its own mailbox, when fetches run its one-time prekeys low.
//
// The server never sees a private key: everything here is public, and the
// service only moves it.
package keys

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"go.mau.fi/libsignal/ecc"
	"google.golang.org/protobuf/proto"

	"github.com/courier-im/courier/internal/accounts"
	"github.com/courier-im/courier/internal/delivery"
	"github.com/courier-im/courier/internal/ident"
	"github.com/courier-im/courier/internal/mailbox"
	pb "github.com/courier-im/courier/proto/courier/v1"
)

// Sizes of the keys, as libsignal serialises them.
const (
	// PublicKeyLen is a serialised public key: the type byte 0x05
	// (Curve25519) and 32 bytes of key.
	PublicKeyLen = 33
	// SignatureLen is an XEdDSA signature.
	SignatureLen = 64
)

// Limits.
const (
	// MaxPreKeysPerUpload is the most one-time prekeys one upload may carry.
	MaxPreKeysPerUpload = 100
	// MaxStoredPreKeys is the most one-time prekeys a device may hold.
	MaxStoredPreKeys = accounts.MaxOneTimePreKeys
	// LowPreKeys is the threshold of the low-prekey notice: a fetch that
	// takes a device's count below it (and one that takes it to zero)
	// appends a KEYS_LOW envelope to the device's mailbox.
	LowPreKeys = 10
	// MaxUploadBytes bounds the JSON body of an upload: 100 prekeys in
	// base64 take about 8 KiB.
	MaxUploadBytes = 64 << 10
)

// Error codes of the service (the HTTP API's error table).
const (
	CodeInvalid            = "invalid"
	CodeBadSignature       = "bad_signature"
	CodeIdentityMismatch   = "identity_mismatch"
	CodePreKeyExists       = "prekey_exists"
	CodeTooManyPreKeys     = "too_many_prekeys"
	CodeUnknownUser        = "unknown_user"
	CodeRateLimited        = "rate_limited"
	CodeUnauthorized       = "unauthorized"
	CodeStorageUnavailable = "storage_unavailable"
)

// Error is a refusal with a stable code; nothing was stored.
type Error struct {
	Code    string
	Message string
	// RetryAfter is set for rate_limited and storage_unavailable.
	RetryAfter time.Duration
}

func (e *Error) Error() string { return "keys: " + e.Code + ": " + e.Message }

func refuse(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// StorageRetryAfter is what a refusal for unavailable storage suggests.
const StorageRetryAfter = 5 * time.Second

// Config configures a Service.
type Config struct {
	// Store keeps the keys; required.
	Store accounts.KeyStore
	// Mailbox and Notifier carry the low-prekey notice; required.
	Mailbox  mailbox.Store
	Notifier delivery.Notifier
	// FetchLimit limits bundle fetches per requesting device.
	FetchLimit LimitConfig
	Logger     *slog.Logger
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
}

// Service is the prekey service. It is safe for concurrent use.
type Service struct {
	cfg     Config
	limiter *Limiter
	ids     ident.ServerIDs
}

// New returns a Service.
func New(cfg Config) *Service {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.FetchLimit.Now == nil {
		cfg.FetchLimit.Now = cfg.Now
	}
	return &Service{cfg: cfg, limiter: NewLimiter(cfg.FetchLimit)}
}

// SignedPreKey is the JSON form of a signed prekey (binary fields are
// standard base64, as encoding/json does for []byte).
type SignedPreKey struct {
	ID        uint32 `json:"id"`
	PublicKey []byte `json:"public_key"`
	Signature []byte `json:"signature"`
}

// PreKey is the JSON form of a one-time prekey.
type PreKey struct {
	ID        uint32 `json:"id"`
	PublicKey []byte `json:"public_key"`
}

// Upload is the JSON body of PUT /v1/keys.
type Upload struct {
	IdentityKey    []byte        `json:"identity_key"`
	RegistrationID *uint32       `json:"registration_id,omitempty"`
	SignedPreKey   *SignedPreKey `json:"signed_prekey,omitempty"`
	OneTimePreKeys []PreKey      `json:"one_time_prekeys,omitempty"`
}

// Validate checks an upload's form and the signed prekey's signature, and
// returns it as the store takes it. The error is an *Error (invalid or
// bad_signature).
func (u *Upload) Validate() (accounts.KeyUpload, error) {
	if err := checkPublicKey("identity_key", u.IdentityKey); err != nil {
		return accounts.KeyUpload{}, err
	}
	up := accounts.KeyUpload{IdentityKey: u.IdentityKey, RegistrationID: u.RegistrationID}
	if spk := u.SignedPreKey; spk != nil {
		if err := checkPublicKey("signed_prekey.public_key", spk.PublicKey); err != nil {
			return accounts.KeyUpload{}, err
		}
		if len(spk.Signature) != SignatureLen {
			return accounts.KeyUpload{}, refuse(CodeInvalid, "signed_prekey.signature must be %d bytes, not %d", SignatureLen, len(spk.Signature))
		}
		if !VerifySignedPreKey(u.IdentityKey, spk.PublicKey, spk.Signature) {
			return accounts.KeyUpload{}, refuse(CodeBadSignature, "signed_prekey.signature does not verify with identity_key")
		}
		up.SignedPreKey = &accounts.SignedPreKey{ID: spk.ID, PublicKey: spk.PublicKey, Signature: spk.Signature}
	}
	if n := len(u.OneTimePreKeys); n > MaxPreKeysPerUpload {
		return accounts.KeyUpload{}, refuse(CodeInvalid, "%d one_time_prekeys; at most %d per upload", n, MaxPreKeysPerUpload)
	}
	seen := make(map[uint32]bool, len(u.OneTimePreKeys))
	for i, pk := range u.OneTimePreKeys {
		if err := checkPublicKey(fmt.Sprintf("one_time_prekeys[%d].public_key", i), pk.PublicKey); err != nil {
			return accounts.KeyUpload{}, err
		}
		if seen[pk.ID] {
			return accounts.KeyUpload{}, refuse(CodeInvalid, "one_time_prekeys lists id %d twice", pk.ID)
		}
		seen[pk.ID] = true
		up.OneTimePreKeys = append(up.OneTimePreKeys, accounts.PreKey{ID: pk.ID, PublicKey: pk.PublicKey})
	}
	return up, nil
}

// checkPublicKey checks that b is a serialised Curve25519 public key.
func checkPublicKey(field string, b []byte) error {
	if len(b) != PublicKeyLen {
		return refuse(CodeInvalid, "%s must be %d bytes (base64), not %d", field, PublicKeyLen, len(b))
	}
	if b[0] != ecc.DjbType {
		return refuse(CodeInvalid, "%s has key type %#x; only Curve25519 (0x05) is supported", field, b[0])
	}
	return nil
}

// VerifySignedPreKey reports whether sig is identity's XEdDSA signature of
// the serialised signed prekey, as libsignal makes and checks it. Both keys
// must be well-formed (PublicKeyLen bytes, type 0x05).
func VerifySignedPreKey(identity, signedPreKey, sig []byte) bool {
	if len(identity) != PublicKeyLen || len(signedPreKey) != PublicKeyLen || len(sig) != SignatureLen {
		return false
	}
	key, err := ecc.DecodePoint(identity, 0)
	if err != nil {
		return false
	}
	return ecc.VerifySignature(key, signedPreKey, [SignatureLen]byte(sig))
}

// Put stores an upload of dev's keys and returns how many one-time prekeys
// dev then holds. A refusal is an *Error; other errors are the store's.
func (s *Service) Put(ctx context.Context, dev ident.Device, u *Upload) (int, error) {
	up, err := u.Validate()
	if err != nil {
		return 0, err
	}
	n, err := s.cfg.Store.PutKeys(ctx, dev, up)
	switch {
	case err == nil:
		return n, nil
	case errors.Is(err, accounts.ErrIdentityMismatch):
		return 0, refuse(CodeIdentityMismatch, "%s has another identity key; a new identity needs a new device", dev)
	case errors.Is(err, accounts.ErrIncompleteKeys):
		return 0, refuse(CodeInvalid, "the first upload of a device needs registration_id and signed_prekey")
	case errors.Is(err, accounts.ErrPreKeyExists):
		return 0, refuse(CodePreKeyExists, "a one-time prekey with one of those ids is held already")
	case errors.Is(err, accounts.ErrTooManyPreKeys):
		return 0, refuse(CodeTooManyPreKeys, "a device holds at most %d one-time prekeys", MaxStoredPreKeys)
	case errors.Is(err, accounts.ErrNotFound):
		return 0, refuse(CodeUnauthorized, "%s was removed", dev)
	}
	return 0, err
}

// Status returns what dev has uploaded.
func (s *Service) Status(ctx context.Context, dev ident.Device) (accounts.KeyStatus, error) {
	st, err := s.cfg.Store.KeyStatus(ctx, dev)
	if errors.Is(err, accounts.ErrNotFound) {
		return st, refuse(CodeUnauthorized, "%s was removed", dev)
	}
	return st, err
}

// IdentityKeys returns the identity keys of user's devices that have one.
func (s *Service) IdentityKeys(ctx context.Context, user string) (map[uint32][]byte, error) {
	keys, err := s.cfg.Store.IdentityKeys(ctx, user)
	if errors.Is(err, accounts.ErrNotFound) {
		return nil, refuse(CodeUnknownUser, "no user %q", user)
	}
	return keys, err
}

// Fetch returns the bundles of user's devices (device's only, if not 0)
// for the device by, taking one one-time prekey of each. It counts against
// by's fetch limit. A device whose count a fetch takes below LowPreKeys, or
// to zero, is told so in its mailbox; a failure to tell it is logged, and
// does not fail the fetch (the device also checks its count when it starts).
func (s *Service) Fetch(ctx context.Context, by ident.Device, user string, device uint32) ([]accounts.Bundle, error) {
	if wait := s.limiter.Take(by.String()); wait > 0 {
		return nil, &Error{Code: CodeRateLimited, Message: "too many prekey fetches; retry later", RetryAfter: wait}
	}
	if !ident.ValidUser(user) {
		return nil, refuse(CodeUnknownUser, "no user %q", user)
	}
	bundles, err := s.cfg.Store.TakeBundles(ctx, user, device)
	if errors.Is(err, accounts.ErrNotFound) {
		return nil, refuse(CodeUnknownUser, "no user %q", user)
	}
	if err != nil {
		return nil, err
	}
	for _, b := range bundles {
		if b.OneTimePreKey != nil && (b.Remaining == LowPreKeys-1 || b.Remaining == 0) {
			s.notifyLow(context.WithoutCancel(ctx), ident.Device{User: user, ID: b.Device}, b.Remaining)
		}
	}
	return bundles, nil
}

// notifyLow appends a KEYS_LOW envelope to dev's mailbox and notifies it.
func (s *Service) notifyLow(ctx context.Context, dev ident.Device, remaining int) {
	now := s.cfg.Now()
	id := s.ids.New(now)
	data, err := proto.Marshal(&pb.Envelope{
		Kind:         pb.EnvelopeKind_ENVELOPE_KIND_KEYS_LOW,
		ServerId:     id,
		Sender:       dev.User,
		ServerTimeMs: now.UnixMilli(),
		To:           dev.User,
		KeysLow:      &pb.KeysLow{Remaining: uint32(remaining)},
	})
	if err == nil {
		_, err = s.cfg.Mailbox.Append(ctx, mailbox.Batch{
			Key:   "keys-low/" + dev.String() + "/" + id,
			Items: []mailbox.Item{{Device: dev, Data: data}},
			Time:  now,
		})
	}
	if err != nil {
		s.cfg.Logger.Error("low-prekey notice not stored", "device", dev, "remaining", remaining, "err", err)
		return
	}
	s.cfg.Logger.Info("low-prekey notice", "device", dev, "remaining", remaining)
	s.cfg.Notifier.Notify(dev)
}
