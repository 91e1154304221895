package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/lockstepvm/lockstep/controller"
	"github.com/lockstepvm/lockstep/internal/teststore"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// agentAddr serves the PairService of an agent with no pairs on a unix socket.
func agentAddr(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "lsctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	a, err := controller.NewAgent(controller.AgentConfig{Host: "local", StateDir: filepath.Join(dir, "state"), Store: teststore.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterPairServiceServer(srv, &controller.PairServer{Agent: a})
	go srv.Serve(l)
	t.Cleanup(func() { srv.Stop(); a.Close() })
	return "unix://" + sock
}

func runCtl(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestExitCodesAndErrors(t *testing.T) {
	addr := agentAddr(t)
	badSpec := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(badSpec, []byte("name: db1\nmachine: q35\nmemoryMib: 128\ndiskSizeBytes: \"67108864\"\nnic: {mac: zz, backend: NIC_BACKEND_SOCKET}\nqemuCommand: [/bin/false]\nprimary: {host: 127.0.0.1, diskPath: /nonexistent}\nsecondary: {host: 127.0.0.1, diskPath: /nonexistent2}\n"), 0o600)
	notYAML := filepath.Join(t.TempDir(), "x.yaml")
	os.WriteFile(notYAML, []byte("name: [unclosed\n"), 0o600)
	tests := []struct {
		name   string
		args   []string
		code   int
		stderr string
		stdout string
	}{
		{"no command", nil, exitUsage, "Usage:", ""},
		{"help", []string{"help"}, exitOK, "", "Examples:"},
		{"unknown command", []string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`, ""},
		{"unknown pair", []string{"--addr", addr, "status", "nope"}, exitUsage, `pair "nope": no such pair`, ""},
		{"flags after the name", []string{"status", "nope", "--addr", addr}, exitUsage, "no such pair", ""},
		{"failover without a name", []string{"--addr", addr, "failover"}, exitUsage, "needs exactly one pair name", ""},
		{"failover unknown pair", []string{"--addr", addr, "failover", "nope", "--forced"}, exitUsage, "no such pair", ""},
		{"set without tunables", []string{"--addr", addr, "set", "db1"}, exitUsage, "at least one of", ""},
		{"create without a file", []string{"--addr", addr, "create"}, exitUsage, "create needs -f FILE", ""},
		{"create from a bad spec", []string{"--addr", addr, "create", "-f", badSpec}, exitUsage, "spec.machine", ""},
		{"create from a file that is not YAML", []string{"--addr", addr, "create", "-f", notYAML}, exitUsage, "spec ", ""},
		{"bad output format", []string{"--addr", addr, "-o", "xml", "list"}, exitUsage, `-o "xml"`, ""},
		{"bad address", []string{"--addr", "http://x", "list"}, exitUsage, "want unix:///path or tcp://host:port", ""},
		{"agent not running", []string{"--addr", "unix:///nonexistent/api.sock", "list"}, exitFailed, "is lockstepd running", ""},
		{"list", []string{"--addr", addr, "list"}, exitOK, "", "PAIR"},
		{"completion", []string{"completion", "bash"}, exitOK, "", "complete -o default -F __start_lockstepctl lockstepctl"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runCtl(tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			if tc.stderr != "" && !strings.Contains(errOut, tc.stderr) {
				t.Errorf("stderr %q lacks %q", errOut, tc.stderr)
			}
			if tc.stdout != "" && !strings.Contains(out, tc.stdout) {
				t.Errorf("stdout %q lacks %q", out, tc.stdout)
			}
		})
	}
	// The refused create left nothing behind.
	code, out, _ := runCtl("--addr", addr, "list", "-o", "json")
	if code != exitOK {
		t.Fatalf("list -o json: exit %d", code)
	}
	var v struct {
		APIVersion, Kind string
		Items            []any
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("list -o json is not JSON: %v\n%s", err, out)
	}
	if v.Kind != "PairList" || v.APIVersion != "lockstep.dev/v1" || len(v.Items) != 0 {
		t.Fatalf("pairs after a refused create: %s", out)
	}
	code, out, _ = runCtl("--addr", addr, "-o", "yaml", "list")
	if code != exitOK || !strings.Contains(out, "items: []") {
		t.Fatalf("list -o yaml: exit %d, %q", code, out)
	}
}

func TestProgressBar(t *testing.T) {
	if got := bar(32<<20, 64<<20); got != "[###############...............]  50% 32/64 MiB" {
		t.Fatalf("bar: %q", got)
	}
	if got := bar(0, 0); got != "" {
		t.Fatalf("bar of nothing: %q", got)
	}
}
