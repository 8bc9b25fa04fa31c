package oplog_test

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/sluicehq/sluice"

// allowed lists, for each domain package, the domain packages it may
// import: dependencies point inward to oplog, and nothing imports gateway
// or cmd.
var allowed = map[string][]string{
	"oplog":     {},
	"topics":    {"oplog"},
	"buckets":   {"oplog", "topics"},
	"fanout":    {"oplog", "topics"},
	"analytics": {"oplog", "topics"},
	"delivery":  {"oplog", "topics", "buckets", "fanout"},
	"gateway":   {"oplog", "topics", "buckets", "fanout", "delivery", "analytics"},
}

// owners lists which packages may import a third-party technology.
var owners = map[string]func(pkg string) bool{
	"github.com/nats-io/nats-server/v2": func(p string) bool { return strings.HasPrefix(p, "cmd/") || strings.HasSuffix(p, "test") },
	"github.com/coder/websocket": func(p string) bool {
		return p == "gateway" || strings.HasPrefix(p, "gateway/") || p == "client" || strings.HasPrefix(p, "cmd/")
	},
	"github.com/dgraph-io/badger/v4": func(p string) bool {
		return p == "oplog" || p == "topics" || p == "fanout" || p == "analytics" || p == "delivery"
	},
}

// TestDependencies enforces the layering in README.md ("Package map").
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, module+"/...").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(strings.TrimPrefix(fields[0], module), "/")
		top := strings.Split(pkg, "/")[0]
		for _, imp := range fields[1:] {
			for tech, ok := range owners {
				if (imp == tech || strings.HasPrefix(imp, tech+"/")) && !ok(pkg) {
					t.Errorf("%s imports %s, which belongs to another package", pkg, imp)
				}
			}
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			dep := strings.TrimPrefix(imp, module+"/")
			depTop := strings.Split(dep, "/")[0]
			if depTop == "cmd" {
				t.Errorf("%s imports %s: nothing imports cmd", pkg, dep)
			}
			may, domain := allowed[top]
			if !domain || depTop == top {
				continue // cmd wires everything; a package may use its own subpackages
			}
			if !contains(may, depTop) {
				t.Errorf("%s imports %s: %s may import only %v", pkg, dep, top, may)
			}
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
