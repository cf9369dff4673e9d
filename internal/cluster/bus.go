package cluster

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/courier-im/courier/internal/ident"
)

// DefaultSubjectPrefix starts the subject of every node: <prefix>.<node>.
const DefaultSubjectPrefix = "courier.node"

var nodeRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidNode reports whether id can name a node: 1 to 64 of A-Z a-z 0-9 _ -
// (a NATS subject token and a directory node name alike).
func ValidNode(id string) bool { return nodeRE.MatchString(id) }

// NodeID turns any string (a host name and pid) into a valid node id,
// replacing every other character with '-'.
func NodeID(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			b[i] = '-'
		}
	}
	if len(b) > 64 {
		b = b[len(b)-64:]
	}
	if len(b) == 0 {
		return "node"
	}
	return string(b)
}

// Messages on a node's subject are one line of space-separated fields:
//
//	n <user.device>                     the device's mailbox has new entries
//	t <user.device> <to user> <0|1>     typing from a device to a user
//	s <user.device> <session>           the session was superseded elsewhere
type message struct {
	kind    byte
	dev     ident.Device
	to      string
	typing  bool
	session string
}

func encodeNotify(dev ident.Device) []byte { return []byte("n " + dev.String()) }

func encodeTyping(from ident.Device, to string, typing bool) []byte {
	t := "0"
	if typing {
		t = "1"
	}
	return []byte("t " + from.String() + " " + to + " " + t)
}

func encodeSupersede(dev ident.Device, session string) []byte {
	return []byte("s " + dev.String() + " " + session)
}

var errBadMessage = errors.New("cluster: malformed node message")

func decode(b []byte) (message, error) {
	f := strings.Fields(string(b))
	if len(f) < 2 || len(f[0]) != 1 {
		return message{}, errBadMessage
	}
	dev, err := ident.ParseDevice(f[1])
	if err != nil {
		return message{}, fmt.Errorf("%w: %v", errBadMessage, err)
	}
	m := message{kind: f[0][0], dev: dev}
	switch m.kind {
	case 'n':
		if len(f) != 2 {
			return message{}, errBadMessage
		}
	case 't':
		if len(f) != 4 || !ident.ValidUser(f[2]) || (f[3] != "0" && f[3] != "1") {
			return message{}, errBadMessage
		}
		m.to, m.typing = f[2], f[3] == "1"
	case 's':
		if len(f) != 3 {
			return message{}, errBadMessage
		}
		m.session = f[2]
	default:
		return message{}, errBadMessage
	}
	return m, nil
}
