package e2e

import (
	"bytes"
	"errors"
	"testing"
)

func TestInnerRoundTripAndPadding(t *testing.T) {
	for _, m := range []inner{
		{kind: kindMessage, id: "0123456789abcdef", body: []byte("dinner at 8?")},
		{kind: kindMessage, id: "x", body: nil},
		{kind: kindControl, id: "c", body: resendRequest{device: 7, ids: []string{"a", "bb"}}.encode()},
		{kind: kindMessage, id: string(bytes.Repeat([]byte("i"), 64)), body: bytes.Repeat([]byte("b"), 1000)},
	} {
		enc := m.encode()
		if len(enc)%padBlock != 0 {
			t.Fatalf("%d bytes: not padded to %d", len(enc), padBlock)
		}
		got, err := decodeInner(enc)
		if err != nil || got.kind != m.kind || got.id != m.id || !bytes.Equal(got.body, m.body) {
			t.Fatalf("round trip of %+v: %+v, %v", m, got, err)
		}
	}
	req, err := decodeControl(resendRequest{device: 7, ids: []string{"a", "bb"}}.encode())
	if err != nil || req.device != 7 || len(req.ids) != 2 || req.ids[1] != "bb" {
		t.Fatalf("control: %+v, %v", req, err)
	}
}

func TestInnerRejectsGarbage(t *testing.T) {
	long := inner{kind: kindMessage, id: string(bytes.Repeat([]byte("i"), 65)), body: []byte("b")}.encode()
	for name, b := range map[string][]byte{
		"empty":         nil,
		"unknown kind":  {9, 1, 'a', 0},
		"id overruns":   {kindMessage, 50, 'a'},
		"body overruns": {kindMessage, 1, 'a', 200, 1},
		"bad varint":    {kindMessage, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
		"id over 64":    long,
	} {
		if _, err := decodeInner(b); !errors.Is(err, errMalformed) {
			t.Errorf("%s: %v, want errMalformed", name, err)
		}
	}
	for name, b := range map[string][]byte{
		"empty":       nil,
		"unknown op":  {9},
		"device 0":    {opResend, 0, 0},
		"count huge":  {opResend, 1, 0xff, 0x7f},
		"id overruns": {opResend, 1, 1, 5, 'a'},
	} {
		if _, err := decodeControl(b); !errors.Is(err, errMalformed) {
			t.Errorf("control %s: %v, want errMalformed", name, err)
		}
	}
}

func FuzzDecodeInner(f *testing.F) {
	f.Add(inner{kind: kindMessage, id: "id", body: []byte("body")}.encode())
	f.Add(inner{kind: kindControl, id: "c", body: resendRequest{device: 2, ids: []string{"x"}}.encode()}.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeInner(b)
		if err != nil {
			return
		}
		if m.kind == kindControl {
			decodeControl(m.body)
		}
		again, err := decodeInner(m.encode())
		if err != nil || again.id != m.id || !bytes.Equal(again.body, m.body) {
			t.Fatalf("re-encoding %+v: %+v, %v", m, again, err)
		}
	})
}

func FuzzDecodeControlOp(f *testing.F) {
	f.Add(resendRequest{device: 2, ids: []string{"a"}}.encode())
	f.Add(groupControl{op: opSenderKey, group: "g1", data: []byte{1, 2, 3}}.encode())
	f.Add(groupControl{op: opGroupInfo, group: "g1", data: []byte("friends")}.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := decodeControlOp(b)
		if err != nil {
			return
		}
		switch c.op {
		case opSenderKey, opGroupInfo:
			if c.group.group == "" || len(c.group.group) > maxGroupIDLen || len(c.group.data) == 0 {
				t.Fatalf("accepted %+v", c)
			}
			again, err := decodeControlOp(c.group.encode())
			if err != nil || again.group.group != c.group.group || !bytes.Equal(again.group.data, c.group.data) {
				t.Fatalf("round trip of %+v: %+v, %v", c, again, err)
			}
		}
	})
}
