package client_test

import (
	"os/exec"
	"strings"
	"testing"
)

// The SDK is public: applications import it without the server. Its
// non-test code must never depend on courier's internal packages.
func TestNoInternalDependencies(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command in PATH")
	}
	for _, pkg := range []string{
		"github.com/courier-im/courier/client",
		"github.com/courier-im/courier/client/localstore",
		"github.com/courier-im/courier/client/e2e",
	} {
		out, err := exec.Command(goTool, "list", "-deps", pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			if strings.HasPrefix(dep, "github.com/courier-im/courier/internal/") {
				t.Errorf("%s depends on %s; the SDK must not import server code", pkg, dep)
			}
		}
	}
}
