package pebble

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/courier-im/courier/internal/ident"
)

// Stored format, version 1. Every key starts with a one-byte tag:
//
//	'm' "format"                     -> "courier-mailbox-v1"
//	'e' <dev> <seq:8>                -> <unix nanos:8> <data>   an entry
//	'h' <dev>                        -> <seq:8>                 a device's high-water mark
//	'k' <idempotency key>            -> <unix nanos:8> <receipt>
//
// where <dev> is <len(user):1> <user> <device id:4>, and all integers are
// big-endian so that keys sort by device, then by seq. The length prefix
// keeps one device's keys from being a prefix of another's ("bo" vs "bob").
// Changing any of this needs a new format version and a migration; the
// testdata/format-v1 fixture guards against doing it by accident.
//
// A high-water mark is a bound: every seq the device ever took is at or
// below it. Early stores wrote the last seq taken, later ones write it up
// to seqReserve ahead (store.go); both read the same way, seqs going on
// from mark+1.
//
// An entry key is written exactly once: seqs are never reused (the
// high-water mark outlives every entry). So entries are deleted with
// Pebble's single delete, which cancels out with the one set it meets in a
// flush or compaction: an entry written and acked within one memtable
// leaves nothing on disk, where a plain delete would leave a tombstone to
// be carried down the levels (≈ 15 % of the store's CPU per message,
// docs/performance.md). Anything that ever rewrote an entry key would
// break that assumption; Pebble reports such a misuse and the store logs
// it (guard.go). Idempotency keys and high-water marks are overwritten or
// may be written again after expiring, and keep plain deletes.
const (
	tagMeta  = 'm'
	tagEntry = 'e'
	tagHigh  = 'h'
	tagKey   = 'k'
)

var formatKey = []byte{tagMeta, 'f', 'o', 'r', 'm', 'a', 't'}

const formatV1 = "courier-mailbox-v1"

// maxUserBytes is the longest user name the key encoding can hold.
const maxUserBytes = 255

var errBadDevice = errors.New("mailbox/pebble: device user must be 1 to 255 bytes")

// deviceID encodes dev as <len(user)> <user> <id>, the part of entry and
// high-water keys that names the device.
func deviceID(dev ident.Device) ([]byte, error) {
	if len(dev.User) == 0 || len(dev.User) > maxUserBytes {
		return nil, fmt.Errorf("%w: %q", errBadDevice, dev.User)
	}
	b := make([]byte, 0, 1+len(dev.User)+4)
	b = append(b, byte(len(dev.User)))
	b = append(b, dev.User...)
	return binary.BigEndian.AppendUint32(b, dev.ID), nil
}

// entryKey returns the key of dev's entry seq, given dev's deviceID.
func entryKey(devID []byte, seq uint64) []byte {
	k := make([]byte, 0, 1+len(devID)+8)
	k = append(k, tagEntry)
	k = append(k, devID...)
	return binary.BigEndian.AppendUint64(k, seq)
}

// entryPrefixEnd returns the first key after all of dev's entries.
func entryPrefixEnd(devID []byte) []byte {
	// Entry keys are exactly prefix+8 bytes, so prefix+9 bytes of 0xff sorts
	// after every one of them and before the next device's prefix.
	k := make([]byte, 0, 1+len(devID)+9)
	k = append(k, tagEntry)
	k = append(k, devID...)
	return append(k, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff)
}

// splitEntryKey returns the deviceID and seq of an entry key.
func splitEntryKey(k []byte) (devID []byte, seq uint64, ok bool) {
	if len(k) < 1+1+4+8 || k[0] != tagEntry || int(k[1])+1+4+8 != len(k)-1 {
		return nil, 0, false
	}
	return k[1 : len(k)-8], binary.BigEndian.Uint64(k[len(k)-8:]), true
}

func highKey(devID []byte) []byte {
	k := make([]byte, 0, 1+len(devID))
	k = append(k, tagHigh)
	return append(k, devID...)
}

func idemKey(key string) []byte {
	k := make([]byte, 0, 1+len(key))
	k = append(k, tagKey)
	return append(k, key...)
}

// timedValue encodes t followed by payload: the value of entries and of
// idempotency keys.
func timedValue(t time.Time, payload []byte) []byte {
	v := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint64(v, uint64(t.UnixNano()))
	return append(v, payload...)
}

var errCorrupt = errors.New("mailbox/pebble: corrupt value")

// splitTimedValue decodes a timedValue. The payload aliases v.
func splitTimedValue(v []byte) (time.Time, []byte, error) {
	if len(v) < 8 {
		return time.Time{}, nil, errCorrupt
	}
	return time.Unix(0, int64(binary.BigEndian.Uint64(v))), v[8:], nil
}

// tagEnd returns the first key after every key with the given tag.
func tagEnd(tag byte) []byte { return []byte{tag + 1} }
