package main

import (
	"context"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/courier-im/courier/client"
	"github.com/courier-im/courier/client/e2e"
	"github.com/courier-im/courier/client/localstore"
	"github.com/courier-im/courier/internal/servertest"
)

var numberRE = regexp.MustCompile(`(?m)^    (\d{5} \d{5} \d{5} \d{5})$`)

// safetyNumber runs verify and returns the number it printed.
func safetyNumber(t *testing.T, args ...string) (string, string) {
	t.Helper()
	out := must(t, cmdVerify, args...)
	var groups []string
	for _, m := range numberRE.FindAllStringSubmatch(out, -1) {
		groups = append(groups, m[1])
	}
	if len(groups) != 3 {
		t.Fatalf("verify printed no 60-digit number:\n%s", out)
	}
	return strings.Join(groups, " "), out
}

func TestCLIVerifyAndSearch(t *testing.T) {
	srv := servertest.Start(t)
	alice, bob := filepath.Join(t.TempDir(), "alice"), filepath.Join(t.TempDir(), "bob")
	must(t, cmdRegister, "--home", alice, "--server", srv.URL, "--name", "alice")
	must(t, cmdRegister, "--home", bob, "--server", srv.URL, "--name", "bob")
	must(t, cmdSend, "--home", alice, "bob", "dinner at eight?")
	must(t, cmdInbox, "--home", bob)
	must(t, cmdSend, "--home", bob, "alice", "Dinner sounds good")
	must(t, cmdInbox, "--home", alice)

	// Search, on each side, offline.
	srv.Stop(t)
	matchLines(t, "alice's search", must(t, cmdSearch, "--home", alice, "dinner"),
		`\d{4}-\d\d-\d\d \d\d:\d\d  with bob +bob: Dinner sounds good`,
		`\d{4}-\d\d-\d\d \d\d:\d\d  with bob +you: dinner at eight\?`)
	matchLines(t, "bob's search", must(t, cmdSearch, "--home", bob, "eight"),
		`\d{4}-\d\d-\d\d \d\d:\d\d  with alice +alice: dinner at eight\?`)
	matchLines(t, "a prefix", must(t, cmdSearch, "--home", bob, "soun*"),
		`\d{4}-\d\d-\d\d \d\d:\d\d  with alice +you: Dinner sounds good`)
	matchLines(t, "no match", must(t, cmdSearch, "--home", bob, "lunch"), `no messages match`)
	matchLines(t, "odd input", must(t, cmdSearch, "--home", bob, `"OR" (`), `no messages match`)
	srv.Start(t)

	// Both ends show the same number.
	aliceSees, out := safetyNumber(t, "--home", alice, "bob")
	if !strings.Contains(out, "bob is not verified") || !strings.Contains(out, "bob.1 ") || !strings.Contains(out, "alice.1 ") {
		t.Fatalf("verify bob:\n%s", out)
	}
	bobSees, _ := safetyNumber(t, "--home", bob, "alice")
	if aliceSees != bobSees {
		t.Fatalf("alice sees %s, bob sees %s", aliceSees, bobSees)
	}
	if _, out = safetyNumber(t, "--home", alice, "--mark", "bob"); !strings.Contains(out, "bob is verified") {
		t.Fatalf("verify --mark:\n%s", out)
	}

	// bob links a tablet: a new device, a new identity key.
	ctx := context.Background()
	p, err := loadProfile(bob)
	if err != nil {
		t.Fatal(err)
	}
	api, err := client.NewKeyAPI(p.creds, nil)
	if err != nil {
		t.Fatal(err)
	}
	tablet, err := api.LinkDevice(ctx, "tablet")
	if err != nil {
		t.Fatal(err)
	}
	st, err := localstore.Open(filepath.Join(t.TempDir(), "tablet.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	eng, err := e2e.Open(e2e.Config{Store: st, Credentials: tablet})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	if err := eng.Publish(ctx); err != nil {
		t.Fatal(err)
	}

	// Sending to the verified bob is blocked, loudly.
	_, errOut, err := run(t, cmdSend, "--home", alice, "bob", "still there?")
	if err == nil || !strings.Contains(err.Error(), "safety number changed") || !strings.Contains(errOut, "SAFETY NUMBER CHANGED") {
		t.Fatalf("send to a verified contact who changed: %v\n%s", err, errOut)
	}
	changed, out := safetyNumber(t, "--home", alice, "bob")
	if changed == aliceSees || !strings.Contains(out, "CHANGED since you verified") || !strings.Contains(out, "bob.2 ") {
		t.Fatalf("verify after the change:\n%s", out)
	}
	if _, _, err := run(t, cmdVerify, "--home", alice, "--mark", "bob"); err == nil || !strings.Contains(err.Error(), "--accept") {
		t.Fatalf("--mark over a change: %v", err)
	}
	if _, out = safetyNumber(t, "--home", alice, "--accept", "bob"); !strings.Contains(out, "bob is not verified") {
		t.Fatalf("verify --accept:\n%s", out)
	}
	must(t, cmdSend, "--home", alice, "bob", "still there?")
	matchLines(t, "bob's inbox", must(t, cmdInbox, "--home", bob),
		clockRE+`  ✓✓ delivered to alice: "Dinner sounds good" \(`+idRE+`\)`,
		clockRE+`  alice: still there\?`)
}

// Linking a device from the CLI: the new profile has its own keys, gets
// messages, and the contact's safety number changes; removing it changes
// it again.
func TestCLILinkAndRemoveDevice(t *testing.T) {
	srv := servertest.Start(t)
	dir := t.TempDir()
	alice, bob, tablet := filepath.Join(dir, "alice"), filepath.Join(dir, "bob"), filepath.Join(dir, "tablet")
	must(t, cmdRegister, "--home", alice, "--server", srv.URL, "--name", "alice")
	must(t, cmdRegister, "--home", bob, "--server", srv.URL, "--name", "bob")
	first, _ := safetyNumber(t, "--home", alice, "bob")

	matchLines(t, "link", must(t, cmdDevices, "--home", bob, "--link", "tablet", "--new-home", tablet),
		`linked bob \(device 2\); its profile is in `+regexp.QuoteMeta(tablet))
	if _, _, err := run(t, cmdDevices, "--home", bob, "--link", "again", "--new-home", tablet); err == nil {
		t.Fatal("linking over an existing profile was not refused")
	}
	out, errOut, err := run(t, cmdSend, "--home", alice, "bob", "to both")
	if err != nil || !strings.Contains(errOut, "SAFETY NUMBER CHANGED") {
		t.Fatalf("send after bob linked a device: %v\n%s\n%s", err, out, errOut)
	}
	matchLines(t, "the tablet's inbox", must(t, cmdInbox, "--home", tablet), clockRE+`  alice: to both`)
	matchLines(t, "the phone's inbox", must(t, cmdInbox, "--home", bob), clockRE+`  alice: to both`)
	second, out := safetyNumber(t, "--home", alice, "bob")
	if second == first || !strings.Contains(out, "bob.2 ") {
		t.Fatalf("after the link:\n%s", out)
	}

	matchLines(t, "remove", must(t, cmdDevices, "--home", bob, "--remove", "2"), `removed bob\.2`)
	third, out := safetyNumber(t, "--home", alice, "bob")
	if third != first || strings.Contains(out, "bob.2 ") {
		t.Fatalf("after the removal (want the first number again, %s):\n%s", first, out)
	}
	must(t, cmdSend, "--home", alice, "bob", "just the phone")
	matchLines(t, "the phone's inbox", must(t, cmdInbox, "--home", bob),
		clockRE+`  alice: just the phone`)
}
