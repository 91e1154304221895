package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/controller"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/internal/teststore"
)

// agentEnv is an agent in single-host mode with one pair on the test hub.
type agentEnv struct {
	e     *pairEnv
	agent *controller.Agent
	cfg   controller.AgentConfig
	pc    controller.PairConfig
}

func newAgentEnv(t *testing.T) *agentEnv {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnv(t, q, kernel, initrd, 200*time.Millisecond, 2)
	state := filepath.Join(e.dir, "state")
	cfg := controller.AgentConfig{Host: "local", StateDir: state, OverlayDir: e.overlayDir(), Log: e.log, Store: teststore.New(t)}
	a, err := controller.NewAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ae := &agentEnv{e: e, agent: a, cfg: cfg}
	t.Cleanup(func() { ae.stopAll() })
	diskA := filepath.Join(e.dir, "a.raw")
	f, err := os.Create(diskA)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(e.spec.DiskSize)
	f.Close()
	ae.pc = controller.PairConfig{Spec: e.spec, Sides: [2]controller.SideConfig{
		{Host: "127.0.0.1", Disk: diskA, NetSocket: e.hub.VMPorts[0]},
		{Host: "127.0.0.1", Disk: filepath.Join(e.dir, "b.raw"), NetSocket: e.hub.VMPorts[1]},
	}}
	return ae
}

// stopAll kills the pair's QEMUs (by the PIDs in their pid files) and stops the agent.
func (ae *agentEnv) stopAll() {
	if ae.agent != nil {
		for _, st := range ae.agent.List() {
			_ = ae.agent.Delete(st.Name)
		}
		ae.agent.Close()
	}
	for _, s := range []string{"a", "b"} {
		if pid, err := checkpoint.ReadPID(filepath.Join(ae.cfg.StateDir, ae.pc.Spec.Name, s)); err == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

func (ae *agentEnv) waitState(t *testing.T, want controller.State, within time.Duration) controller.Status {
	t.Helper()
	return ae.waitGen(t, want, 0, within)
}

// waitGen waits for the pair to be in state want at generation gen or later.
func (ae *agentEnv) waitGen(t *testing.T, want controller.State, gen int, within time.Duration) controller.Status {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st, err := ae.agent.Get(ae.pc.Spec.Name)
		if err != nil {
			t.Fatal(err)
		}
		if st.State == want && st.Generation >= gen {
			return st
		}
		if st.State == controller.StateFailed {
			t.Fatalf("pair failed: %s", st.Reason)
		}
		if time.Now().After(deadline) {
			t.Fatalf("state %s after %v, want %s (%s)", st.State, within, want, st.Reason)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func pidOf(t *testing.T, ae *agentEnv, side string) int {
	pid, err := checkpoint.ReadPID(filepath.Join(ae.cfg.StateDir, ae.pc.Spec.Name, side))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// The agent protects a pair by itself, fails it over automatically when the primary QEMU is
// killed (the client keeps its connection and loses nothing), re-protects by itself, and a
// restarted agent adopts the pair without failing anything over.
func TestAgentAutomaticFailoverAndAdoption(t *testing.T) {
	ae := newAgentEnv(t)
	if _, err := ae.agent.Create(ae.pc); err != nil {
		t.Fatal(err)
	}
	// Refused requests change nothing.
	if _, err := ae.agent.Create(ae.pc); !errors.Is(err, controller.ErrExists) {
		t.Errorf("second create: %v", err)
	}
	if _, err := ae.agent.Failover(context.Background(), "nope", false, ""); !errors.Is(err, controller.ErrNotFound) {
		t.Errorf("unknown pair: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events, err := ae.agent.Watch(ctx, ae.pc.Spec.Name)
	if err != nil {
		t.Fatal(err)
	}
	w := startWriter(t, ae.e.hub.ClientURL, 20*time.Millisecond)
	ae.waitState(t, controller.StateProtected, 90*time.Second)
	if err := ae.agent.Reprotect(ae.pc.Spec.Name); !errors.Is(err, controller.ErrWrongState) {
		t.Errorf("reprotect while protected: %v", err)
	}
	w.waitAcked(t, w.Acked()+20, 30*time.Second)

	kill := time.Now()
	if err := syscall.Kill(pidOf(t, ae, "a"), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	st := ae.waitGen(t, controller.StateProtected, 2, 90*time.Second)
	if st.PrimarySide != controller.SideB || st.Generation != 2 || st.LastFailover == nil {
		t.Fatalf("after the failover: %+v", st)
	}
	w.waitAcked(t, w.Acked()+5, 30*time.Second)
	fa, _ := w.firstAckAfter(kill)
	t.Logf("automatic failover: first ack %v after the kill; sequence %v; re-protected as generation %d",
		fa.Sub(kill).Round(time.Millisecond), st.LastFailover.Took.Round(time.Millisecond), st.Generation)

	// The watch stream saw the failover steps and the state changes.
	seen := map[string]bool{}
	drain := time.After(2 * time.Second)
loop:
	for {
		select {
		case ev := <-events:
			switch ev.Kind {
			case controller.EventStep:
				seen["step:"+ev.Step.Sequence] = true
			case controller.EventState:
				seen["state:"+string(ev.To)] = true
			case controller.EventFailover:
				seen["failover"] = true
			}
		case <-drain:
			break loop
		}
	}
	for _, k := range []string{"step:failover-as-secondary", "step:reprotect", "state:failing-over", "state:reprotecting", "state:protected", "failover"} {
		if !seen[k] {
			t.Errorf("watch stream lacked %s (saw %v)", k, seen)
		}
	}

	// Restart the agent: the pair is adopted, protected, and nothing fails over.
	pidB := pidOf(t, ae, "b")
	ae.agent.Close()
	a2, err := controller.NewAgent(ae.cfg)
	if err != nil {
		t.Fatal(err)
	}
	ae.agent = a2
	st2, err := a2.Get(ae.pc.Spec.Name)
	if err != nil {
		t.Fatal(err)
	}
	if st2.State != controller.StateProtected || st2.PrimarySide != controller.SideB {
		t.Fatalf("adopted pair: %+v", st2)
	}
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	if pidOf(t, ae, "b") != pidB || a2.List()[0].Failovers != 0 {
		t.Fatalf("the restart changed the primary or failed over")
	}
	w.verify(t)
}
