// Package e2e is the SDK's end-to-end encryption: the Signal protocol (X3DH
// key agreement and the Double Ratchet, from go.mau.fi/libsignal) between
// devices, with every key, session and contact kept in the profile's local
// SQLite file (client/localstore). An Engine is a client.Cipher: set it as
// client.Config.Cipher and Bind it to the Client, and every message the
// Client sends is encrypted once per addressed device, and every message it
// receives is decrypted before the Handler sees it. The server moves
// ciphertext only.
//
// The Engine publishes this device's identity key, a signed prekey and
// one-time prekeys (Publish), refills them when the server says they run
// low, rotates the signed prekey, establishes sessions from the prekey
// bundles of the devices it writes to, asks a sender to resend what it
// could not decrypt (and resends what it is asked for), and keeps each
// contact's device identity keys so that a change of a contact's keys or
// devices changes their safety number (SafetyNumber, MarkVerified,
// Accept): a verified contact whose number changed cannot be written to
// until the change is accepted. The payload format is in docs/e2e.md.
package e2e
