package cluster

import (
	"testing"

	"github.com/courier-im/courier/internal/ident"
)

func TestMessages(t *testing.T) {
	a := ident.Device{User: "alice", ID: 3}
	for _, tc := range []struct {
		b    []byte
		want message
	}{
		{encodeNotify(a), message{kind: 'n', dev: a}},
		{encodeTyping(a, "bob", true), message{kind: 't', dev: a, to: "bob", typing: true}},
		{encodeTyping(a, "bob", false), message{kind: 't', dev: a, to: "bob"}},
		{encodeSupersede(a, "s1"), message{kind: 's', dev: a, session: "s1"}},
	} {
		got, err := decode(tc.b)
		if err != nil || got != tc.want {
			t.Errorf("decode(%q) = %+v, %v; want %+v", tc.b, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "n", "n alice", "n alice.0", "x alice.1", "nn alice.1", "n alice.1 extra",
		"t alice.1 bob", "t alice.1 Bob 1", "t alice.1 bob 2", "s alice.1", "s alice.1 a b"} {
		if m, err := decode([]byte(bad)); err == nil {
			t.Errorf("decode(%q) = %+v, want an error", bad, m)
		}
	}
}
