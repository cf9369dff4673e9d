package gateway

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// wsFrame encodes a masked client frame header for a payload of n bytes
// (the payload itself is zeros).
func wsFrame(op byte, fin bool, n int) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	var h []byte
	switch {
	case n < 126:
		h = []byte{b0, 0x80 | byte(n)}
	case n < 1<<16:
		h = []byte{b0, 0x80 | 126, 0, 0}
		binary.BigEndian.PutUint16(h[2:], uint16(n))
	default:
		h = []byte{b0, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 0}
		binary.BigEndian.PutUint64(h[2:], uint64(n))
	}
	h = append(h, 1, 2, 3, 4) // mask key
	return append(h, make([]byte, n)...)
}

// scanAll feeds stream to a frameScan in chunks of size and returns the
// offset in the stream of the refused frame, or -1.
func scanAll(stream []byte, size int, limit int64) int {
	var s frameScan
	for off := 0; off < len(stream); off += size {
		end := min(off+size, len(stream))
		if cut := s.scan(stream[off:end], limit); cut >= 0 {
			return off + cut
		}
	}
	return -1
}

func TestFrameScan(t *testing.T) {
	const limit = 1000
	ok := bytes.Join([][]byte{
		wsFrame(2, true, 10),
		wsFrame(9, true, 4), // ping: control frames do not count
		wsFrame(2, true, 1000),
		wsFrame(1, true, 300),
		wsFrame(2, false, 500), wsFrame(0, true, 500), // fragmented, exactly the limit
		wsFrame(2, true, 0),
	}, nil)
	cases := []struct {
		name   string
		stream []byte
		want   int // offset of the refused frame, -1 for none
	}{
		{"within the limit", ok, -1},
		{"one byte over", append(append([]byte{}, ok...), wsFrame(2, true, 1001)...), len(ok)},
		{"64-bit length", append(append([]byte{}, ok...), wsFrame(2, true, 70000)...), len(ok)},
		{"fragments over", append(append(append([]byte{}, ok...), wsFrame(2, false, 600)...), wsFrame(0, true, 401)...), len(ok) + len(wsFrame(2, false, 600))},
		{"new message after fragments", append(append(append([]byte{}, wsFrame(2, false, 600)...), wsFrame(0, true, 400)...), wsFrame(2, true, 900)...), -1},
	}
	for _, tc := range cases {
		for _, size := range []int{1, 3, 7, 64, 4096, len(tc.stream)} {
			got := scanAll(tc.stream, size, limit)
			if tc.want < 0 && got >= 0 {
				t.Errorf("%s, chunks of %d: refused at %d, want nothing refused", tc.name, size, got)
				continue
			}
			// A header split across chunks is reported at the start of
			// the chunk where it ends.
			if tc.want >= 0 && (got < tc.want || got > tc.want+14) {
				t.Errorf("%s, chunks of %d: refused at %d, want %d", tc.name, size, got, tc.want)
			}
		}
	}
}
