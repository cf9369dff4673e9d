package jetstream

import (
	"testing"

	"github.com/courier-im/courier/internal/ident"
)

// DeviceOf reads back exactly the device subjects the store writes.
func TestDeviceOf(t *testing.T) {
	s := &Store{subj: subjects{"courier.mailbox"}}
	for _, d := range []ident.Device{{User: "alice", ID: 1}, {User: "a-b_c", ID: 4294967295}} {
		got, ok := s.DeviceOf(s.subj.device(d))
		if !ok || got != d {
			t.Errorf("DeviceOf(%q) = %v, %v", s.subj.device(d), got, ok)
		}
	}
	for _, subj := range []string{
		"courier.mailbox.k.abcd", "courier.mailbox.d.alice", "courier.mailbox.d.alice.0",
		"courier.mailbox.d.Alice.1", "courier.mailbox.d.alice.x", "other.d.alice.1",
		"courier.mailbox.d.alice.1.2", "courier.mailbox.d.alice.4294967296",
	} {
		if d, ok := s.DeviceOf(subj); ok {
			t.Errorf("DeviceOf(%q) = %v, want not a device subject", subj, d)
		}
	}
	if s.DeviceSubjects() != "courier.mailbox.d.*.*" {
		t.Errorf("DeviceSubjects = %q", s.DeviceSubjects())
	}
}
