package server_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/courier-im/courier/internal/gateway"
)

// TestGoroutineTransport runs the device-facing suites (server_test.go,
// abuse_test.go, authz_test.go) again with the gateway on the goroutine
// transport (the default is epoll): this test binary, re-executed with
// COURIER_TEST_TRANSPORT set, which servertest.Start reads. Setting it by
// hand runs every test on that transport instead.
func TestGoroutineTransport(t *testing.T) {
	if os.Getenv("COURIER_TEST_TRANSPORT") != "" {
		t.Skip("already running on a chosen transport")
	}
	if testing.Short() {
		t.Skip("short: the suites run once, on the default transport")
	}
	t.Parallel()
	var names []string
	for _, file := range []string{"server_test.go", "abuse_test.go", "authz_test.go"} {
		f, err := parser.ParseFile(token.NewFileSet(), file, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range f.Decls {
			if fn, ok := d.(*ast.FuncDecl); ok && fn.Recv == nil && strings.HasPrefix(fn.Name.Name, "Test") {
				names = append(names, fn.Name.Name)
			}
		}
	}
	if len(names) < 20 {
		t.Fatalf("found only %d tests to run: %v", len(names), names)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^("+strings.Join(names, "|")+")$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), "COURIER_TEST_TRANSPORT="+gateway.TransportGoroutine)
	out, err := cmd.CombinedOutput()
	passed := strings.Count(string(out), "--- PASS: ")
	if err != nil {
		t.Fatalf("on the goroutine transport: %v\n%s", err, out)
	}
	if passed < len(names) {
		t.Fatalf("on the goroutine transport: %d of %d tests passed\n%s", passed, len(names), out)
	}
	t.Logf("%d tests passed on the goroutine transport", passed)
}
