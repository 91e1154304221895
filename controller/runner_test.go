package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

// The runner's loop against a fake QEMU: a real process (sleep) for the PID, whose death is
// the QEMU's, and a scripted QMP server (qmptest) that goes through protections, failovers and
// clean-ups as QEMU 11.1 does, with the migration connection the agent opened carrying a byte
// now and then as checkpoints would. Both sides of a pair run in one agent, joined by the
// in-process peer link.

// fakeQEMU is one fake QEMU process.
type fakeQEMU struct {
	b    *fakeBackend
	srv  *qmptest.Server
	proc *exec.Cmd
	role checkpoint.Role
	dir  string // the side's runtime folder

	mu       sync.Mutex
	mode     string // COLO mode: none, primary, secondary
	migStat  string // the primary's migration status
	incoming bool   // a secondary waiting for its migration
	mig      *os.File
	exited   chan struct{}
}

// fakeBackend launches and adopts fake QEMUs.
type fakeBackend struct {
	t *testing.T

	mu    sync.Mutex
	byDir map[string]*fakeQEMU
	// fail makes the next command of that name fail, on either side ("cmd" or "side:cmd").
	fail map[string]string
	hang map[string]bool
	all  []*fakeQEMU
}

func newFakeBackend(t *testing.T) *fakeBackend {
	b := &fakeBackend{t: t, byDir: map[string]*fakeQEMU{}, fail: map[string]string{}, hang: map[string]bool{}}
	t.Cleanup(func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		for _, q := range b.all {
			q.kill()
		}
	})
	return b
}

func (b *fakeBackend) Name() string { return "fake" }

// failNext makes the next command cmd fail with QEMU's answer desc.
func (b *fakeBackend) failNext(cmd, desc string) {
	b.mu.Lock()
	b.fail[cmd] = desc
	b.mu.Unlock()
}

func (b *fakeBackend) hangOn(cmd string, on bool) {
	b.mu.Lock()
	b.hang[cmd] = on
	b.mu.Unlock()
}

func (b *fakeBackend) byDirOf(dir string) *fakeQEMU {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.byDir[dir]
}

func (q *fakeQEMU) kill() {
	if q.proc.ProcessState == nil {
		_ = q.proc.Process.Kill()
	}
	<-q.exited
}

// handle registers a handler for cmd that the backend can make fail or hang.
func (q *fakeQEMU) handle(cmd string, h qmptest.Handler) {
	q.srv.Handle(cmd, func(c *qmptest.Conn, r *qmptest.Request) {
		q.b.mu.Lock()
		desc, fail := q.b.fail[cmd]
		if fail {
			delete(q.b.fail, cmd)
		}
		hang := q.b.hang[cmd]
		q.b.mu.Unlock()
		switch {
		case fail:
			c.ReplyError(r, "GenericError", desc)
		case hang:
			<-c.Done()
		default:
			h(c, r)
		}
	})
}

func (q *fakeQEMU) ok(cmds ...string) {
	for _, cmd := range cmds {
		q.handle(cmd, qmptest.Return(struct{}{}))
	}
}

func (q *fakeQEMU) set(f func()) {
	q.mu.Lock()
	f()
	q.mu.Unlock()
}

func (b *fakeBackend) Launch(ctx context.Context, c checkpoint.LaunchConfig) (*checkpoint.VM, error) {
	if err := os.MkdirAll(c.Side.RunDir, 0o700); err != nil {
		return nil, err
	}
	q := &fakeQEMU{b: b, srv: qmptest.New(b.t), role: c.Role, dir: c.Side.RunDir, mode: "none", migStat: "none", exited: make(chan struct{})}
	q.incoming = c.Role == checkpoint.RoleSecondary
	q.proc = exec.Command("sleep", "600")
	if err := q.proc.Start(); err != nil {
		return nil, err
	}
	go func() { _ = q.proc.Wait(); close(q.exited) }()
	if err := os.WriteFile(filepath.Join(c.Side.RunDir, "qemu.pid"), []byte(fmt.Sprint(q.proc.Process.Pid)), 0o600); err != nil {
		return nil, err
	}
	q.script()
	b.mu.Lock()
	b.byDir[c.Side.RunDir] = q
	b.all = append(b.all, q)
	b.mu.Unlock()
	return q.attach(ctx)
}

func (q *fakeQEMU) attach(ctx context.Context) (*checkpoint.VM, error) {
	cl, err := qmp.Dial(ctx, q.srv.Network(), q.srv.Addr())
	if err != nil {
		return nil, err
	}
	return checkpoint.Attach(checkpoint.AttachConfig{Role: q.role, Side: checkpoint.Side{RunDir: q.dir}, PID: q.proc.Process.Pid, QMP: cl,
		Kill: func() { _ = q.proc.Process.Kill(); <-q.exited }})
}

func (b *fakeBackend) Adopt(ctx context.Context, c checkpoint.AdoptConfig) (*checkpoint.VM, error) {
	q := b.byDirOf(c.Side.RunDir)
	if q == nil {
		return nil, checkpoint.ErrNotRunning
	}
	select {
	case <-q.exited:
		return nil, checkpoint.ErrNotRunning
	default:
	}
	return q.attach(ctx)
}

// script makes the fake answer what lockstep sends, as QEMU 11.1 would.
func (q *fakeQEMU) script() {
	srv := q.srv
	schema := `[{"name":"query-migrate-capabilities","meta-type":"command","arg-type":"9"},{"name":"blockdev-add","meta-type":"command","arg-type":"0"},{"name":"0","meta-type":"object","members":[],"variants":[{"case":"nbd","type":"1"}]},{"name":"announce-self","meta-type":"command","arg-type":"0"}]`
	srv.Handle("query-version", qmptest.Return(map[string]any{"qemu": map[string]int{"major": 11, "minor": 1, "micro": 3}}))
	srv.Handle("query-qmp-schema", func(c *qmptest.Conn, r *qmptest.Request) {
		c.Reply(r, json.RawMessage(schema))
	})
	srv.Handle("query-migrate-capabilities", qmptest.Return([]qmp.MigrationCapability{{Capability: "x-colo"}, {Capability: "return-path"}, {Capability: "events"}, {Capability: "pause-before-switchover"}}))
	q.handle("query-status", func(c *qmptest.Conn, r *qmptest.Request) {
		q.mu.Lock()
		st := qmp.RunStateRunning
		if q.incoming {
			st = "inmigrate"
		}
		q.mu.Unlock()
		c.Reply(r, qmp.Status{Status: st, Running: !q.incoming})
	})
	q.handle("query-colo-status", func(c *qmptest.Conn, r *qmptest.Request) {
		q.mu.Lock()
		defer q.mu.Unlock()
		c.Reply(r, qmp.ColoStatus{Mode: qmp.ColoMode(q.mode)})
	})
	q.handle("query-migrate", func(c *qmptest.Conn, r *qmptest.Request) {
		q.mu.Lock()
		defer q.mu.Unlock()
		c.Reply(r, qmp.MigrationInfo{Status: qmp.MigrationStatus(q.migStat)})
	})
	q.ok("chardev-add", "blockdev-add", "object-add", "migrate-set-capabilities", "migrate-set-parameters", "qom-set",
		"block-job-dismiss", "x-blockdev-change", "nbd-server-start", "nbd-server-add", "object-del", "chardev-remove",
		"blockdev-del", "announce-self", "nbd-server-stop", "migrate_cancel")
	q.handle("yank", qmptest.Return(struct{}{}))
	q.handle("getfd", func(c *qmptest.Conn, r *qmptest.Request) {
		for i, f := range r.Files {
			if i == 0 {
				q.set(func() { q.mig = f })
				go q.checkpoints(f)
			} else {
				f.Close()
			}
		}
		c.Reply(r, struct{}{})
	})
	q.handle("migrate-incoming", func(c *qmptest.Conn, r *qmptest.Request) {
		q.set(func() { q.incoming, q.mode = false, "secondary" })
		c.Reply(r, struct{}{})
	})
	now := time.Now()
	replyThen := func(f func(), event string, data any) qmptest.Handler {
		return func(c *qmptest.Conn, r *qmptest.Request) {
			if f != nil {
				q.set(f)
			}
			c.Reply(r, struct{}{})
			c.Event(event, data, now)
		}
	}
	var job string
	q.handle("blockdev-mirror", func(c *qmptest.Conn, r *qmptest.Request) {
		var a struct {
			JobID string `json:"job-id"`
		}
		_ = r.DecodeArgs(&a)
		q.set(func() { job = a.JobID })
		c.Reply(r, struct{}{})
		c.Event("JOB_STATUS_CHANGE", map[string]string{"id": a.JobID, "status": "ready"}, now)
	})
	q.handle("query-block-jobs", func(c *qmptest.Conn, r *qmptest.Request) {
		q.mu.Lock()
		j := job
		q.mu.Unlock()
		c.Reply(r, []qmp.BlockJobInfo{{Device: j, Len: 1 << 20, Offset: 1 << 20, Ready: true}})
	})
	q.handle("block-job-cancel", func(c *qmptest.Conn, r *qmptest.Request) {
		q.mu.Lock()
		j := job
		q.mu.Unlock()
		c.Reply(r, struct{}{})
		c.Event("JOB_STATUS_CHANGE", map[string]string{"id": j, "status": "concluded"}, now)
	})
	q.handle("query-chardev", qmptest.Return([]qmp.ChardevInfo{
		{Label: "mirror0", Filename: "tcp:127.0.0.1:1,server=on <-> 127.0.0.1:50001"},
		{Label: "compare1", Filename: "tcp:127.0.0.1:2,server=on <-> 127.0.0.1:50002"},
	}))
	q.handle("migrate", replyThen(func() { q.migStat = "pre-switchover" }, "MIGRATION", map[string]string{"status": "pre-switchover"}))
	q.handle("migrate-continue", replyThen(func() { q.migStat, q.mode = "colo", "primary" }, "MIGRATION", map[string]string{"status": "colo"}))
	q.handle("x-colo-lost-heartbeat", replyThen(func() { q.mode, q.migStat = "none", "completed" }, "COLO_EXIT", map[string]string{"mode": q.mode, "reason": "request"}))
}

// checkpoints writes a byte to the migration connection now and then, as checkpoints do, so
// that the agents' copies read an active link, until the connection or the process ends.
func (q *fakeQEMU) checkpoints(f *os.File) {
	defer f.Close()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-q.exited:
			return
		case <-t.C:
			if _, err := f.Write([]byte{0}); err != nil {
				return
			}
		}
	}
}

// commands lists the commands the fake received, after qmp_capabilities and without the
// periodic queries.
func (q *fakeQEMU) commands() []string {
	var out []string
	for _, r := range q.srv.Requests() {
		switch r.Command {
		case "qmp_capabilities", "query-status", "query-block-jobs", "query-migrate", "query-colo-status", "query-chardev",
			"query-version", "query-qmp-schema", "query-migrate-capabilities":
			continue
		}
		out = append(out, r.Command)
	}
	return out
}

// testAgent is an agent running both sides of pairs on the fake backend.
type testAgent struct {
	*Agent
	cfg AgentConfig
	b   *fakeBackend
}

func newTestAgent(t *testing.T) *testAgent {
	_, store := embeddedStore(t)
	b := newFakeBackend(t)
	cfg := AgentConfig{Host: "h1", StateDir: t.TempDir(), Store: store, Backends: map[string]checkpoint.Backend{"fake": b},
		Watch: checkpoint.WatchConfig{Interval: 50 * time.Millisecond, Timeout: time.Second}}
	a, err := NewAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ta := &testAgent{Agent: a, cfg: cfg, b: b}
	t.Cleanup(func() { ta.Close() })
	return ta
}

// restart stops the agent (its fake QEMUs run on) and starts a new one on the same folders.
func (ta *testAgent) restart(t *testing.T) {
	ta.Close()
	a, err := NewAgent(ta.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ta.Agent = a
}

func fakePair(t *testing.T, name string) PairConfig {
	pc := localPair(t, name)
	pc.Spec.QEMU, pc.Spec.QEMUImg = []string{"/bin/false"}, []string{"/bin/true"}
	pc.Spec.Tunables.BootSettle = -1
	pc.Spec.Tunables.CheckpointDelay = 100 * time.Millisecond
	for i := range pc.Sides {
		pc.Sides[i].Backend = "fake"
	}
	return pc
}

// waitFor waits until the pair's status satisfies ok, or fails with the last status.
func waitFor(t *testing.T, a *testAgent, name, what string, ok func(Status) bool) Status {
	t.Helper()
	var st Status
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var err error
		if st, err = a.Get(name); err == nil && ok(st) {
			return st
		}
	}
	t.Fatalf("pair %s never %s; last status %+v", name, what, st)
	return st
}

func protected(gen int, primary Side) func(Status) bool {
	return func(s Status) bool {
		return s.State == StateProtected && s.Generation >= gen && s.PrimarySide == primary &&
			s.Roles[primary] == RolePrimary && s.Roles[primary.Other()] == RoleSecondary
	}
}

func sideQEMU(t *testing.T, a *testAgent, name string, s Side) *fakeQEMU {
	t.Helper()
	q := a.b.byDirOf(filepath.Join(a.cfg.StateDir, name, s.String()))
	if q == nil {
		t.Fatalf("no QEMU on side %s", s)
	}
	return q
}

func containsInOrder(got []string, want ...string) bool {
	i := 0
	for _, g := range got {
		if i < len(want) && g == want[i] {
			i++
		}
	}
	return i == len(want)
}

// The whole life of a pair on one host, through the runner's actions: boot, protection (the
// secondary prepared by the other side's runner over the in-process link), a QEMU crash handed
// over at once (fast path), re-protection, a planned switchover, a forced failover, and the
// agent restarted under running QEMUs: nothing fails over for it.
func TestRunnerLifecycle(t *testing.T) {
	a := newTestAgent(t)
	if _, err := a.Create(fakePair(t, "db1")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, a, "db1", "protected", protected(1, SideA))
	qa, qb := sideQEMU(t, a, "db1", SideA), sideQEMU(t, a, "db1", SideB)
	if !containsInOrder(qa.commands(), "chardev-add", "blockdev-add", "blockdev-mirror", "object-add", "migrate", "qom-set", "block-job-cancel", "x-blockdev-change", "migrate-continue") {
		t.Fatalf("the primary's protection sent %v", qa.commands())
	}
	if !containsInOrder(qb.commands(), "migrate-set-capabilities", "nbd-server-start", "nbd-server-add", "getfd", "migrate-incoming") {
		t.Fatalf("the secondary's preparation sent %v", qb.commands())
	}

	// The primary QEMU dies: side A hands over, side B takes over, and A joins as its secondary.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := a.Watch(ctx, "db1")
	if err != nil {
		t.Fatal(err)
	}
	_ = qa.proc.Process.Kill()
	st := waitFor(t, a, "db1", "protected on b", protected(2, SideB))
	if st.LastFailover == nil || st.LastFailover.Sequence != "failover-as-secondary" || st.LastFailover.Error != "" || st.Failovers != 1 {
		t.Fatalf("after the crash: %+v", st.LastFailover)
	}
	if !containsInOrder(qb.commands(), "nbd-server-stop", "x-colo-lost-heartbeat", "object-del", "announce-self") {
		t.Fatalf("the takeover sent %v", qb.commands())
	}
	// The crashed side lets go of the lease first and then hands over (one tick sooner): the
	// secondary may take over on its heartbeat's idle role before the hand-over arrives.
	if got := st.LastFailover.Why; !strings.Contains(got, "handed over") && got != "primary is idle" {
		t.Errorf("takeover reason %q, want a hand-over or the primary's idle role", got)
	}
	seen := map[EventKind]bool{}
	for drain := time.After(200 * time.Millisecond); ; {
		select {
		case ev := <-events:
			seen[ev.Kind] = true
			continue
		case <-drain:
		}
		break
	}
	for _, k := range []EventKind{EventStatus, EventState, EventStep, EventFailover} {
		if !seen[k] {
			t.Errorf("the watch stream lacked %s events (saw %v)", k, seen)
		}
	}

	// A planned switchover back to A, asked of the agent; then a forced one to B.
	rec, err := a.Failover(ctx, "db1", false, "maintenance of b")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(rec.Why, "maintenance of b") {
		t.Errorf("switchover record: %+v, want the reason passed through", rec)
	}
	waitFor(t, a, "db1", "protected on a", protected(3, SideA))
	if _, err := a.Failover(ctx, "db1", true, ""); err != nil {
		t.Fatal(err)
	}
	st = waitFor(t, a, "db1", "protected on b", protected(4, SideB))

	// The agent restarts; the QEMUs run on and are adopted; nothing fails over.
	pids := [2]int{sideQEMU(t, a, "db1", SideA).proc.Process.Pid, sideQEMU(t, a, "db1", SideB).proc.Process.Pid}
	a.restart(t)
	got, err := a.Get("db1")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != StateProtected || got.PrimarySide != SideB || got.Generation != st.Generation {
		t.Fatalf("adopted pair: %+v", got)
	}
	time.Sleep(time.Second) // a lease time: an adopted pair that would fail over does so by now
	got = waitFor(t, a, "db1", "protected on b", protected(st.Generation, SideB))
	if got.Generation != st.Generation || got.Failovers != 0 || got.LastFailover != nil {
		t.Fatalf("the restart failed over: %+v", got)
	}
	for s, pid := range pids {
		if q := sideQEMU(t, a, "db1", Side(s)); q.proc.Process.Pid != pid {
			t.Fatalf("side %s's QEMU changed across the restart", Side(s))
		}
	}
	if err := a.Delete("db1"); err != nil {
		t.Fatal(err)
	}
	for _, q := range a.b.all {
		select {
		case <-q.exited:
		case <-time.After(5 * time.Second):
			t.Fatal("a QEMU outlived the deletion of its pair")
		}
	}
}

// A step of the protection that fails is reported with its name, the primary is cleaned up
// (so that the next attempt can add the same objects), the secondary is torn down, and the
// pair is protected at the next attempt.
func TestRunnerProtectionStepFails(t *testing.T) {
	a := newTestAgent(t)
	a.b.failNext("nbd-server-start", "Failed to bind socket: Address already in use")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := a.Create(fakePair(t, "db1")); err != nil {
		t.Fatal(err)
	}
	events, err := a.Watch(ctx, "db1")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, a, "db1", "protected", protected(2, SideA))
	var failed []string
	for drain := time.After(100 * time.Millisecond); ; {
		select {
		case ev := <-events:
			if ev.Kind == EventStep && ev.Step.Phase == checkpoint.StepFailed {
				failed = append(failed, ev.Step.Sequence+": "+ev.Step.Step+": "+fmt.Sprint(ev.Step.Err))
			}
			continue
		case <-drain:
		}
		break
	}
	if len(failed) == 0 || !strings.Contains(failed[0], "nbd-server-start") || !strings.Contains(failed[0], "Address already in use") {
		t.Fatalf("failed steps seen: %v, want nbd-server-start with QEMU's answer", failed)
	}

	// A failure on the primary after its channels exist: the clean-up removes them.
	a.b.failNext("migrate", "Migration failed for a reason of the test")
	qa := sideQEMU(t, a, "db1", SideA)
	before := len(qa.commands())
	qb := sideQEMU(t, a, "db1", SideB)
	_ = qb.proc.Process.Kill() // the secondary dies: A goes alone, then re-protects (and fails once)
	waitFor(t, a, "db1", "protected", protected(4, SideA))
	after := qa.commands()[before:]
	if !containsInOrder(after, "migrate", "migrate_cancel", "chardev-remove", "chardev-add") {
		t.Fatalf("after a failed migrate the primary got %v, want the clean-up before the retry", after)
	}
	// The primary's refused migrate is counted.
	var page strings.Builder
	a.WriteMetrics(&page)
	var refused int
	if _, err := fmt.Sscanf(page.String()[strings.Index(page.String(), `lockstep_qmp_errors_total{pair="db1"}`):], `lockstep_qmp_errors_total{pair="db1"} %d`, &refused); err != nil || refused < 1 {
		t.Fatalf("lockstep_qmp_errors_total of db1: %d (%v), want the refused migrate counted", refused, err)
	}
}

// Requests the pair cannot take change nothing and say why; a request racing the pair's
// deletion returns, whatever it finds.
func TestRunnerRefusalsAndDeleteRace(t *testing.T) {
	a := newTestAgent(t)
	if _, err := a.Create(fakePair(t, "db1")); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := a.Reprotect("db1"); !errors.Is(err, ErrWrongState) {
		t.Errorf("reprotect while starting: %v, want ErrWrongState", err)
	}
	st := waitFor(t, a, "db1", "protected", protected(1, SideA))
	if err := a.Reprotect("db1"); !errors.Is(err, ErrWrongState) {
		t.Errorf("reprotect while protected: %v, want ErrWrongState", err)
	}
	if err := a.SetParameters(ctx, "db1", checkpoint.Tunables{CompareTimeout: time.Second}); err == nil || !strings.Contains(err.Error(), "compare_timeout") {
		t.Errorf("compare timeout at run time: %v, want a refusal naming compare_timeout", err)
	}
	if err := a.SetParameters(ctx, "db1", checkpoint.Tunables{CheckpointDelay: 300 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if pc, _ := a.Config("db1"); pc.Spec.Tunables.CheckpointDelay != 300*time.Millisecond {
		t.Errorf("checkpoint delay after set: %v", pc.Spec.Tunables.CheckpointDelay)
	}
	if got, _ := a.Get("db1"); got.Generation != st.Generation || got.State != StateProtected {
		t.Fatalf("refused requests changed the pair: %+v", got)
	}

	done := make(chan error, 2)
	go func() { _, err := a.Failover(ctx, "db1", false, ""); done <- err }()
	go func() { done <- a.Delete("db1") }()
	for i := 0; i < 2; i++ {
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrWrongState) && !strings.Contains(err.Error(), "went away") {
				t.Errorf("a request racing the deletion: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("a request racing the deletion never returned")
		}
	}
	if _, err := a.Get("db1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after the deletion: %v, want ErrNotFound", err)
	}
}

// Closing the agent while a protection hangs in a QEMU returns at once and leaves the QEMUs
// running for the next agent.
func TestRunnerCloseDuringProtection(t *testing.T) {
	a := newTestAgent(t)
	a.b.hangOn("migrate", true)
	if _, err := a.Create(fakePair(t, "db1")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, a, "db1", "protecting", func(s Status) bool {
		return s.Roles[SideA] == RoleProtecting && s.Step != nil && strings.Contains(s.Step.Step, "migrate")
	})
	closed := make(chan struct{})
	go func() { a.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(15 * time.Second):
		t.Fatal("Close did not return while a protection hung")
	}
	for _, q := range a.b.all {
		select {
		case <-q.exited:
			t.Fatal("a QEMU died with its agent")
		default:
		}
	}
	a.b.hangOn("migrate", false)
	a.restart(t)
	waitFor(t, a, "db1", "protected", protected(1, SideA))
}
