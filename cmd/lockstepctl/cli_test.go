package main

import (
	"bytes"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// TestMain lets the test binary stand in for lockstepctl, for the shells of the completion
// tests.
func TestMain(m *testing.M) {
	if os.Getenv("LOCKSTEPCTL_TEST_AS_CLI") == "1" {
		os.Exit(runWith(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

const exampleSpec = "../../pairspec/testdata/single-host.yaml"

func protectedPair(name string) *pb.Pair {
	yes := true
	return &pb.Pair{
		Spec: &pb.PairSpec{Name: name, MemoryMib: 128, DiskSizeBytes: 64 << 20, Accel: pb.Accel_ACCEL_TCG,
			Nic:      &pb.Nic{Mac: "52:54:00:12:34:56", Backend: pb.NicBackend_NIC_BACKEND_TAP, Tap: "tap0"},
			Tunables: &pb.Tunables{CheckpointDelay: durationpb.New(200 * time.Millisecond)}, AutoReprotect: &yes,
			Primary:   &pb.Placement{Host: "hosta", Address: "10.0.0.1", DiskPath: "/d/" + name + ".raw"},
			Secondary: &pb.Placement{Host: "hostb", Address: "10.0.0.2", DiskPath: "/d/" + name + ".raw"}},
		Status: &pb.PairStatus{State: pb.PairState_PAIR_STATE_PROTECTED, PrimaryHost: "hosta", SecondaryHost: "hostb", Generation: 2, Epoch: 5,
			StoreReachable: true, Peer: &pb.PeerStatus{Reachable: true},
			Primary:   &pb.SideStatus{Running: true, ColoMode: pb.ColoMode_COLO_MODE_PRIMARY},
			Secondary: &pb.SideStatus{Running: true, ColoMode: pb.ColoMode_COLO_MODE_SECONDARY}},
	}
}

// `get -o yaml | create -f -` (and the same in JSON) gives the agent the very spec it had.
func TestGetCreateRoundTrip(t *testing.T) {
	f, addr := serveFake(t)
	if code, out, errOut := runCtl("--addr", addr, "create", "-f", exampleSpec); code != exitOK || !strings.Contains(out, "pair db1 created: starting") {
		t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
	}
	for _, format := range []string{"yaml", "json"} {
		code, got, errOut := runCtl("--addr", addr, "get", "db1", "-o", format)
		if code != exitOK {
			t.Fatalf("get: exit %d: %s", code, errOut)
		}
		if code, _, errOut := runCtl("--addr", addr, "delete", "db1"); code != exitOK {
			t.Fatalf("delete: exit %d: %s", code, errOut)
		}
		var out, errB bytes.Buffer
		if code := runWith([]string{"--addr", addr, "create", "-f", "-", "-o", format}, strings.NewReader(got), &out, &errB); code != exitOK {
			t.Fatalf("create -f - from get -o %s: exit %d\n%s\n%s", format, code, errB.String(), got)
		}
		if errB.Len() > 0 {
			t.Errorf("create -f - printed: %s", errB.String())
		}
		if out.String() != got {
			t.Errorf("create -o %s printed\n%s\nwant the Pair as get printed it\n%s", format, out.String(), got)
		}
		first, last := f.created[0], f.created[len(f.created)-1]
		if !proto.Equal(first, last) {
			t.Fatalf("-o %s: the agent got\n%v\nthe first time and\n%v\nafter the round trip", format, first, last)
		}
	}
	if len(f.created) != 3 {
		t.Fatalf("%d creates, want 3", len(f.created))
	}
}

// The outputs of each command family: get and list whole Pairs, status the status.
func TestOutputShapes(t *testing.T) {
	_, addr := serveFake(t, protectedPair("db1"), protectedPair("db2"))
	decode := func(t *testing.T, args ...string) map[string]any {
		t.Helper()
		code, out, errOut := runCtl(append([]string{"--addr", addr, "-o", "json"}, args...)...)
		if code != exitOK {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
		var v map[string]any
		if err := json.Unmarshal([]byte(out), &v); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return v
	}
	if v := decode(t, "get", "db1"); v["kind"] != "Pair" || v["status"].(map[string]any)["state"] != "protected" || v["spec"].(map[string]any)["memory"] != "128Mi" {
		t.Errorf("get db1: %v", v)
	}
	for _, cmd := range [][]string{{"get"}, {"list"}} {
		if v := decode(t, cmd...); v["kind"] != "PairList" || len(v["items"].([]any)) != 2 {
			t.Errorf("%v: %v", cmd, v)
		}
	}
	if v := decode(t, "status", "db1"); v["state"] != "protected" || v["epoch"] != 5.0 || v["primary"].(map[string]any)["colo"] != "primary" {
		t.Errorf("status db1: %v", v)
	}
	if v := decode(t, "status"); v["db1"].(map[string]any)["state"] != "protected" || len(v) != 2 {
		t.Errorf("status: %v", v)
	}
	code, out, _ := runCtl("--addr", addr, "status", "db1")
	if code != exitOK || !strings.Contains(out, "state:             protected") || !strings.Contains(out, "epoch:") {
		t.Errorf("status table: %s", out)
	}
	code, out, _ = runCtl("--addr", addr, "get")
	if code != exitOK || !strings.Contains(out, "db1   protected  hosta    hostb") {
		t.Errorf("get table: %q", out)
	}
	code, out, _ = runCtl("--addr", addr, "get", "db1", "-o", "yaml")
	if p, err := pairspec.Decode([]byte(out)); code != exitOK || err != nil || p.Spec.NIC.Tap != "tap0" {
		t.Errorf("get -o yaml: %v\n%s", err, out)
	}
}

// A spec the agent refuses is reported with the file's line and column and the field's name
// in the file's format.
func TestAgentRefusalPlacedInFile(t *testing.T) {
	addr := agentAddr(t)
	dir := t.TempDir()
	b, err := os.ReadFile(exampleSpec)
	if err != nil {
		t.Fatal(err)
	}
	spec := filepath.Join(dir, "db1.yaml")
	doc := strings.Replace(string(b), "qemuCommand: [qemu-system-x86_64]", "qemuCommand: [/bin/false]", 1)
	os.WriteFile(spec, []byte(doc), 0o600)
	code, out, errOut := runCtl("--addr", addr, "create", "-f", spec)
	if code != exitUsage {
		t.Fatalf("exit %d, want 2\n%s%s", code, out, errOut)
	}
	line := strings.Count(doc[:strings.Index(doc, "qemuCommand")], "\n") + 1
	want := spec + ":" + strconv.Itoa(line) + ":3: spec.qemuCommand: "
	if !strings.Contains(errOut, want) || !strings.Contains(errOut, "(the agent's spec.qemu_command)") {
		t.Fatalf("stderr lacks %q:\n%s", want, errOut)
	}
}

// The old protobuf-JSON format still works, with a warning, and convert rewrites it.
func TestLegacySpec(t *testing.T) {
	f, addr := serveFake(t)
	old := filepath.Join(t.TempDir(), "old.yaml")
	os.WriteFile(old, []byte(`name: db1
memoryMib: 128
accel: ACCEL_TCG
diskSizeBytes: "67108864"
nic: {mac: "52:54:00:12:34:56", backend: NIC_BACKEND_SOCKET}
tunables: {checkpointDelay: 0.2s}
primary: {host: 127.0.0.1, diskPath: /d/a.raw, netSocket: "127.0.0.1:7001"}
secondary: {host: 127.0.0.1, diskPath: /d/b.raw, netSocket: "127.0.0.1:7002"}
`), 0o600)
	code, out, errOut := runCtl("--addr", addr, "create", "-f", old)
	if code != exitOK || !strings.Contains(errOut, "warning: "+old+" is a spec in the old protobuf-JSON format") || !strings.Contains(errOut, "lockstepctl convert -f "+old) {
		t.Fatalf("create from the old format: exit %d\n%s%s", code, out, errOut)
	}
	code, conv, errOut := runCtl("convert", "-f", old)
	if code != exitOK {
		t.Fatalf("convert: exit %d: %s", code, errOut)
	}
	for _, w := range []string{"apiVersion: lockstep.dev/v1", "memory: 128Mi", "accel: tcg", "size: 64Mi", "backend: socket", "checkpointDelay: 200ms"} {
		if !strings.Contains(conv, w) {
			t.Errorf("convert output lacks %q:\n%s", w, conv)
		}
	}
	p, err := pairspec.Decode([]byte(conv))
	if err != nil {
		t.Fatalf("converted spec refused: %v\n%s", err, conv)
	}
	// The converted spec says what the old one said (the old format leaves addresses out).
	want := proto.Clone(f.created[0]).(*pb.PairSpec)
	want.Primary.Address, want.Secondary.Address = "127.0.0.1", "127.0.0.1"
	if got := p.ToProto(); !proto.Equal(got, want) {
		t.Fatalf("converted: %v\nwant %v", got, want)
	}
	// A new-format spec with a misspelt field is refused with its place, before the agent.
	bad := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(bad, []byte(strings.Replace(conv, "memory:", "memroy:", 1)), 0o600)
	code, _, errOut = runCtl("--addr", addr, "create", "-f", bad)
	if code != exitUsage || !strings.Contains(errOut, bad+":6:3: spec.memroy: unknown field; did you mean memory?") {
		t.Fatalf("misspelt field: exit %d\n%s", code, errOut)
	}
	if len(f.created) != 1 {
		t.Fatalf("the agent got %d creates, want 1", len(f.created))
	}
}

// Every command has its own help with examples, through --help and through help.
func TestHelpOfEveryCommand(t *testing.T) {
	a := &app{ops: &fakeOps{}, out: &bytes.Buffer{}, errOut: &bytes.Buffer{}}
	root := a.newRootCommand()
	var names []string
	for _, c := range root.Commands() {
		if c.Hidden || c.Name() == "help" {
			continue
		}
		names = append(names, c.Name())
		if c.Long == "" || c.Example == "" {
			t.Errorf("%s: no long help or no example", c.Name())
		}
	}
	if len(names) < 16 {
		t.Fatalf("commands %v", names)
	}
	for _, n := range names {
		for _, args := range [][]string{{n, "--help"}, {"help", n}, {n, "-h", "--addr", "unix:///x"}} {
			code, out, errOut := runFake(&fakeOps{}, "", args...)
			if code != exitOK || !strings.Contains(out, "Usage:\n  lockstepctl "+n) || !strings.Contains(out, "Examples:") || !strings.Contains(out, "--addr ADDR") {
				t.Errorf("%v: exit %d\n%s%s", args, code, out, errOut)
			}
		}
	}
}

func TestStartStopDryRun(t *testing.T) {
	f, addr := serveFake(t, protectedPair("db1"))
	p := &fakeOps{agent: f}
	if code, out, errOut := runFake(p, "", "--addr", addr, "stop", "db1"); code != exitOK || out != "db1: stopped\n" {
		t.Fatalf("stop: exit %d %q %s", code, out, errOut)
	}
	if code, out, errOut := runFake(p, "", "start", "db1", "--addr", addr, "-o", "yaml"); code != exitOK || !strings.Contains(out, "state: starting") {
		t.Fatalf("start: exit %d %q %s", code, out, errOut)
	}
	if code, _, errOut := runFake(p, "", "--addr", addr, "start", "nope"); code != exitUsage || !strings.Contains(errOut, "no such pair") {
		t.Fatalf("start nope: exit %d %s", code, errOut)
	}
	code, _, errOut := runFake(p, "", "--addr", addr, "create", "--dry-run", "-f", exampleSpec)
	if code != exitUsage || !strings.Contains(errOut, `pair "db1" exists`) {
		t.Fatalf("dry run of a taken name: exit %d: %s", code, errOut)
	}
	empty, addr2 := serveFake(t)
	code, out, errOut := runFake(&fakeOps{agent: empty}, "", "--addr", addr2, "create", "--dry-run", "-f", exampleSpec)
	if code != exitOK || !strings.Contains(out, "kind: Pair") || !strings.Contains(out, "memory: 128Mi") {
		t.Fatalf("dry run: exit %d\n%s%s", code, out, errOut)
	}
	if len(f.created)+len(empty.created) != 0 {
		t.Fatalf("a dry run created %d pairs", len(f.created))
	}
}

func TestDrills(t *testing.T) {
	for _, tc := range []struct {
		name, cmd, outcome string
		code               int
		want               []string
	}{
		{"failover", "test-failover", "", exitOK, []string{"test-failover db1: killed the primary QEMU on hosta (pid 4242)", "detection      12ms", "QMP sequence   62ms     (failover-as-secondary on hostb)",
			"re-protection  1.5s", "total          1.574s   (kill -> protected)", "resync    [##############################] 100% 64/64 MiB"}},
		{"restart secondary", "test-restart-secondary", "", exitOK, []string{"killed the secondary QEMU", "failover-as-primary", "total          1.574s"}},
		{"failover fails", "test-failover", "failed", exitFailed, []string{"detection      12ms"}},
		{"never protected again", "test-failover", "never", exitFailed, []string{"QMP sequence   62ms"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, addr := serveFake(t, protectedPair("db1"))
			p := &fakeOps{agent: f, outcome: tc.outcome}
			code, out, errOut := runFake(p, "", "--addr", addr, tc.cmd, "db1", "--wait", "2s")
			if code != tc.code {
				t.Fatalf("exit %d, want %d\n%s%s", code, tc.code, out, errOut)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			if tc.outcome == "never" && !strings.Contains(errOut, "not protected again within 2s") {
				t.Errorf("stderr: %s", errOut)
			}
		})
	}
	t.Run("json report", func(t *testing.T) {
		f, addr := serveFake(t, protectedPair("db1"))
		code, out, errOut := runFake(&fakeOps{agent: f}, "", "--addr", addr, "-o", "json", "test-failover", "db1")
		var rep map[string]any
		if code != exitOK || json.Unmarshal([]byte(out), &rep) != nil {
			t.Fatalf("exit %d\n%s%s", code, out, errOut)
		}
		if rep["detection"] != "12ms" || rep["total"] != "1.574s" || rep["protected"] != true || rep["failover"].(map[string]any)["took"] != "62ms" {
			t.Fatalf("report %v", rep)
		}
	})
	t.Run("refused unless protected", func(t *testing.T) {
		deg := protectedPair("db1")
		deg.Status.State = pb.PairState_PAIR_STATE_DEGRADED
		f, addr := serveFake(t, deg)
		p := &fakeOps{agent: f}
		for _, cmd := range []string{"test-failover", "test-restart-secondary"} {
			code, _, errOut := runFake(p, "", "--addr", addr, cmd, "db1")
			if code != exitFailed || !strings.Contains(errOut, "the pair is degraded: not protected (a drill needs a protected pair)") {
				t.Errorf("%s: exit %d: %s", cmd, code, errOut)
			}
		}
		if len(p.kills) != 0 {
			t.Fatalf("killed %v", p.kills)
		}
	})
}

// syncBuffer is a buffer that a test reads while the command writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// console relays the keyboard to the guest and the guest to the screen, until ^].
func TestConsole(t *testing.T) {
	f, addr := serveFake(t, protectedPair("db1"))
	c := newFakeConsole("login: ")
	in, typing := io.Pipe()
	var out, errOut syncBuffer
	a := &app{in: in, out: &out, errOut: &errOut, ops: &fakeOps{agent: f, console: c}}
	code := make(chan int, 1)
	go func() { code <- a.execute([]string{"--addr", addr, "console", "db1"}) }()
	waitFor := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), want); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("stdout %q lacks %q", out.String(), want)
			}
		}
	}
	waitFor("login: ")
	typing.Write([]byte("root\r"))
	waitFor("[root\r]")
	typing.Write([]byte("\x1dignored"))
	if got := <-code; got != exitOK {
		t.Fatalf("exit %d: %s", got, errOut.String())
	}
	typing.Close()
	c.mu.Lock()
	sent, closed := c.sent.String(), c.closed
	c.mu.Unlock()
	if sent != "root\r" || !closed {
		t.Fatalf("sent %q (closed %v), want what came before ^]", sent, closed)
	}
	if e := errOut.String(); !strings.Contains(e, "escape character is ^]") || !strings.Contains(e, "Disconnected from db1") {
		t.Fatalf("stderr %q", e)
	}
}

func TestSetAndWatchOutputs(t *testing.T) {
	// set's flags are checked before the agent is asked.
	code, _, errOut := runCtl("--addr", "unix:///nonexistent", "set", "db1", "--max-bandwidth", "fast")
	if code != exitUsage || !strings.Contains(errOut, "--max-bandwidth") {
		t.Fatalf("set --max-bandwidth fast: exit %d %s", code, errOut)
	}
	ev := eventFromProto(stateEvent(time.Unix(0, 0), pb.PairState_PAIR_STATE_PROTECTED, pb.PairState_PAIR_STATE_FAILING_OVER, "killed"))
	var b bytes.Buffer
	if err := pairspec.EncodeJSON(&b, ev); err != nil || !strings.Contains(b.String(), `"type": "state"`) || !strings.Contains(b.String(), `"to": "failing-over"`) {
		t.Fatalf("event %s %v", b.String(), err)
	}
}
