package main

import (
	"errors"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/courier-im/courier/internal/servertest"
)

// hasLine fails unless some line of got matches pattern whole.
func hasLine(t *testing.T, what, got, pattern string) {
	t.Helper()
	re := regexp.MustCompile("^" + pattern + "$")
	for _, l := range strings.Split(got, "\n") {
		if re.MatchString(l) {
			return
		}
	}
	t.Fatalf("%s: no line matches\n  %s\nin:\n%s", what, pattern, got)
}

func TestCLIGroups(t *testing.T) {
	srv := servertest.Start(t)
	dir := t.TempDir()
	alice, bob, carol := filepath.Join(dir, "alice"), filepath.Join(dir, "bob"), filepath.Join(dir, "carol")
	for _, u := range []struct{ home, name string }{{alice, "alice"}, {bob, "bob"}, {carol, "carol"}} {
		must(t, cmdRegister, "--home", u.home, "--server", srv.URL, "--name", u.name)
	}

	out := must(t, cmdGroup, "create", "--home", alice, "friends", "bob", "carol")
	matchLines(t, "group create", out, `created #friends \(id (\S+)\) with alice, bob, carol`)
	gid := regexp.MustCompile(`\(id (\S+)\)`).FindStringSubmatch(out)[1]
	matchLines(t, "group list", must(t, cmdGroup, "list", "--home", alice), `#friends\s+`+regexp.QuoteMeta(gid)+`  3 members  v1`)
	matchLines(t, "group show", must(t, cmdGroup, "show", "--home", alice, "friends"),
		`#friends  \(id `+regexp.QuoteMeta(gid)+`, version 1\)`, `  alice  admin \(you\)`, `  bob  `, `  carol  `)

	out = must(t, cmdSend, "--home", alice, "--group", "friends", "picnic", "on", "sunday?")
	matchLines(t, "send --group", out, `✓ accepted (`+idRE+`)  `+clockRE+`  to #friends`)
	id := regexp.MustCompile(idRE).FindString(out)

	// bob learns the group, its name and the message.
	out = must(t, cmdInbox, "--home", bob)
	hasLine(t, "bob's inbox", out, clockRE+`  #friends  alice named the group`)
	hasLine(t, "bob's inbox", out, clockRE+`  #friends  alice: picnic on sunday\?`)
	matchLines(t, "bob's groups", must(t, cmdGroup, "list", "--home", bob, "--offline"), `#friends\s+\S+  3 members  v1`)
	matchLines(t, "bob reads", must(t, cmdRead, "--home", bob), `marked 1 message read \(1 from alice\)`)
	matchLines(t, "bob searches", must(t, cmdSearch, "--home", bob, "picnic"),
		`\d{4}-\d\d-\d\d \d\d:\d\d  in #friends\s+alice: picnic on sunday\?`)

	// alice sees bob's receipts, per member, in the group.
	out = must(t, cmdInbox, "--home", alice)
	hasLine(t, "alice's inbox", out, clockRE+`  ✓✓ delivered to bob in #friends: "picnic on sunday\?" \(`+id+`\)`)
	hasLine(t, "alice's inbox", out, clockRE+`  ✓✓ read by bob in #friends: "picnic on sunday\?" \(`+id+`\)`)

	// bob answers by id.
	matchLines(t, "bob's answer", must(t, cmdSend, "--home", bob, "--group", gid, "yes!"), `✓ accepted `+idRE+`  `+clockRE+`  to #friends`)

	// carol is removed; she is told, and gets nothing sent after.
	matchLines(t, "group remove", must(t, cmdGroup, "remove", "--home", alice, "friends", "carol"),
		`removed carol from #friends \(version 2\); your sender key for it was replaced`)
	must(t, cmdSend, "--home", alice, "--group", "friends", "secret", "plans")
	out = must(t, cmdInbox, "--home", carol)
	hasLine(t, "carol's inbox", out, clockRE+`  #friends  alice: picnic on sunday\?`)
	hasLine(t, "carol's inbox", out, clockRE+`  #friends  bob: yes!`)
	hasLine(t, "carol's inbox", out, clockRE+`  #friends  carol was removed by alice`)
	if strings.Contains(out, "secret") {
		t.Fatalf("carol got a message sent after her removal:\n%s", out)
	}
	if _, _, err := run(t, cmdSend, "--home", carol, "--group", "friends", "hello?"); err == nil {
		t.Fatal("carol sent to a group she was removed from")
	}
	out = must(t, cmdInbox, "--home", bob)
	hasLine(t, "bob's inbox", out, clockRE+`  #friends  carol was removed by alice`)
	hasLine(t, "bob's inbox", out, clockRE+`  #friends  alice: secret plans`)

	matchLines(t, "group leave", must(t, cmdGroup, "leave", "--home", bob, "friends"), `left #friends`)
	matchLines(t, "alice's group after", must(t, cmdGroup, "show", "--home", alice, gid),
		`#friends  \(id `+regexp.QuoteMeta(gid)+`, version 3\)`, `  alice  admin \(you\)`)

	// Mistakes.
	for _, args := range [][]string{{}, {"bogus"}, {"create", "--home", alice, "lonely"}, {"remove", "--home", alice, "friends"}} {
		if _, _, err := run(t, cmdGroup, args...); !errors.Is(err, errUsage) {
			t.Errorf("group %q: %v, want a usage error", args, err)
		}
	}
	if _, _, err := run(t, cmdSend, "--home", alice, "--group", "nosuch", "hi"); err == nil || !strings.Contains(err.Error(), `no group "nosuch"`) {
		t.Errorf("send to an unknown group: %v", err)
	}
}
