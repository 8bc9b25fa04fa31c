package client_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencies checks that an app importing the client does not pull
// in the server: of this module only the schemas, the codec and the diff
// package, and no NATS or badger.
func TestDependencies(t *testing.T) {
	const module = "github.com/sluicehq/sluice"
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", module+"/client").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	allowed := map[string]bool{
		module + "/client":                true,
		module + "/gateway/gatewaypb":     true,
		module + "/gateway/wire":          true,
		module + "/delivery/deliverypb":   true,
		module + "/delivery/diff":         true,
		module + "/analytics/analyticspb": true,
	}
	forbidden := []string{"github.com/nats-io/", "github.com/dgraph-io/"}
	n := 0
	for dep := range strings.FieldsSeq(string(out)) {
		n++
		if (dep == module || strings.HasPrefix(dep, module+"/")) && !allowed[dep] {
			t.Errorf("client depends on %s", dep)
		}
		for _, f := range forbidden {
			if strings.HasPrefix(dep, f) {
				t.Errorf("client depends on %s", dep)
			}
		}
	}
	if n < 10 {
		t.Fatalf("go list gave %d packages: %s", n, out)
	}
}
