package controller

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
)

// sideState is what a side's runner saves for its successor (side.json in the side's folder),
// written whenever it changes: QEMUs outlive their agent, and a new agent adopts them with it.
type sideState struct {
	// Role is what the side's QEMU runs as: RolePrimary, RoleSecondary, or RoleIdle for none.
	Role Role `json:"role"`
	// Gen and Epoch: the protection generation and the highest fencing epoch known.
	Gen   int    `json:"generation"`
	Epoch uint64 `json:"epoch"`
	// Lease is the lease the side holds (zero when none), for the successor to resume.
	Lease coord.Held `json:"lease"`
	// Generation are the node names and ports of the current protection.
	Generation checkpoint.Generation `json:"protection"`
	// WasSecond: the VM took over from a secondary (it is protected with Reprotect).
	WasSecond bool `json:"was_secondary,omitempty"`
	// Link are the addresses of the migration connection, to find it again among QEMU's
	// file descriptors.
	Link *checkpoint.LinkAddrs `json:"link,omitempty"`
	// Starts is the last of the operator's starts (PairConfig.Starts) the side took: a start
	// made while no agent ran here is taken by the next one.
	Starts uint64 `json:"starts,omitempty"`
	// Starting: the side was carrying out an operator's start (Policy.OperatorStarting); a
	// successor that finds no QEMU carries it out.
	Starting bool `json:"starting,omitempty"`
	// Marked: the primary's record said what it ran (Policy.Marked).
	Marked bool `json:"marked,omitempty"`
}

const sideStateFile = "side.json"

// legacyState is the pair state file of the single-host agent before sides had agents of
// their own (state.json in the pair's folder).
type legacyState struct {
	Primary   Side `json:"primary"`
	Gen       int  `json:"generation"`
	Protected bool `json:"protected"`
	Started   bool `json:"started"`
}

func (r *runner) readSaved() sideState {
	var s sideState
	if err := readJSON(filepath.Join(r.dir, sideStateFile), &s); err == nil {
		return s
	}
	var ls legacyState
	if err := readJSON(filepath.Join(filepath.Dir(r.dir), "state.json"), &ls); err == nil && ls.Started {
		s.Role, s.Gen = RoleSecondary, ls.Gen
		if ls.Primary == r.side {
			s.Role = RolePrimary
		}
		r.log.Info("adopting from the single-host agent's saved state", "role", s.Role, "generation", s.Gen)
	}
	return s
}

// current is what the runner would save now.
func (r *runner) current() sideState {
	p := r.pol
	s := sideState{Role: RoleIdle, Gen: p.Generation(), Epoch: p.Epoch(), Generation: r.gen, WasSecond: r.wasSecond, Starts: r.starts, Starting: p.OperatorStarting(), Marked: p.Marked()}
	if r.vm != nil {
		switch {
		case runsVM(p.Role()):
			s.Role = RolePrimary
		case p.Role() == RoleSecondary || p.Role() == RoleJoining:
			s.Role = RoleSecondary
		}
	}
	if p.Holds() {
		s.Lease = r.held
	}
	if r.migLink != nil {
		if la, err := checkpoint.SocketAddrs(r.migLink); err == nil {
			s.Link = &la
		}
	}
	return s
}

// persist saves the side's state when it changed (not at every loop pass).
func (r *runner) persist() {
	cur := r.current()
	if sameState(cur, r.saved) {
		return
	}
	if err := writeJSON(filepath.Join(r.dir, sideStateFile), cur); err != nil {
		r.log.Error("saving the side's state", "err", err)
		return
	}
	r.saved = cur
}

func sameState(a, b sideState) bool {
	if (a.Link == nil) != (b.Link == nil) || (a.Link != nil && *a.Link != *b.Link) {
		return false
	}
	a.Link, b.Link = nil, nil
	return a == b
}

// start builds the side's policy: from the QEMU an earlier agent left running, if any (it is
// adopted, and nothing fails over because the agent restarted), else idle, and the preferred
// primary of a pair that never ran boots it.
//
// It runs before the runner's loop (the agent starts the loop after it), so that the pair's
// status is right from the first request.
func (r *runner) start(ctx context.Context) {
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		r.log.Error("cannot create the side's folder", "err", err)
	}
	r.saved = r.readSaved()
	r.starts = r.saved.Starts
	pc := r.config()
	cfg := r.policyConfig()
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	role := checkpoint.RolePrimary
	if r.saved.Role == RoleSecondary {
		role = checkpoint.RoleSecondary
	}
	vm, err := r.backend.Adopt(actx, checkpoint.AdoptConfig{Spec: pc.Spec, Role: role, Side: r.localSide(), Log: r.log})
	if err == nil {
		if pol, acts, ok := r.adopt(actx, vm, cfg); ok {
			r.pol = pol
			r.exec(ctx, acts)
			if pc.Stopped {
				// Stopped while no agent ran here: it stops now.
				r.step(ctx, Stop{Why: stoppedWhy})
			}
			return
		}
	} else if !errors.Is(err, checkpoint.ErrNotRunning) {
		r.log.Warn("a QEMU of this side may run but cannot be adopted", "err", err)
	}
	pol, perr := NewPolicy(cfg, r.holder)
	if perr != nil {
		panic(perr) // the agent validated the timings
	}
	r.pol = pol
	if pc.Stopped {
		r.step(ctx, Stop{Why: stoppedWhy})
	} else if pc.Starts != r.starts || r.saved.Starting {
		// The operator started the pair while no agent ran here, or the agent before did not
		// finish the start.
		r.starts = pc.Starts
		r.step(ctx, Start{Operator: true})
	} else {
		// The policy decides from the primary record whether this side boots the VM: the
		// preferred side a pair that never ran, the side that ran it last (restart policy
		// always) one whose copies are all gone.
		r.step(ctx, Start{})
	}
}

// adopt takes over the QEMU vm an earlier agent left running.
func (r *runner) adopt(ctx context.Context, vm *checkpoint.VM, cfg Config) (*Policy, []Action, bool) {
	cs, err := checkpoint.Inspect(ctx, vm)
	if err != nil {
		r.log.Warn("adopted QEMU does not answer query-colo-status; killing it", "err", err)
		vm.Kill()
		return nil, nil, false
	}
	a := Adopted{Gen: r.saved.Gen, Epoch: r.saved.Epoch, LeaseEpoch: r.saved.Lease.Epoch, Frozen: vm.Frozen(), Marked: r.saved.Marked}
	switch {
	case r.saved.Role == RolePrimary || r.saved.Role == RoleSecondary:
		a.Role = r.saved.Role
	case cs.Mode == "primary":
		a.Role = RolePrimary
	case cs.Mode == "secondary" || cs.Incoming:
		a.Role = RoleSecondary
	default:
		a.Role = RolePrimary
	}
	a.Colo = (a.Role == RolePrimary && cs.Mode == "primary") || (a.Role == RoleSecondary && cs.Mode == "secondary")
	if a.Role == RolePrimary && !a.Colo && cs.Migrating {
		// An agent that died while protecting left the migration in between: undo it, so
		// that the primary runs on as it did before.
		r.log.Info("the earlier agent left a protection unfinished: aborting it")
		checkpoint.CleanUpProtection(ctx, r.log, vm.QMP, r.saved.Generation, r.view.progress)
	}
	if a.Colo && r.saved.Link != nil {
		if f, err := vm.FindSocket(*r.saved.Link); err == nil {
			r.migLink = f
			if la, err := checkpoint.ReadLinkActivity(f); err == nil && !la.Open {
				a.ColoLost = "the migration connection closed while no agent ran"
			}
		} else {
			r.log.Warn("the migration connection of the adopted QEMU is not found: its link state is unknown", "err", err)
		}
	}
	if r.migLink != nil {
		r.vm = vm // linkState reads the link of the side's VM
		a.Link = r.linkStateAs(a.Role)
		r.vm = nil
	}
	pol, acts, err := Restore(cfg, r.holder, a)
	if err != nil {
		panic(err) // the agent validated the timings
	}
	r.gen, r.wasSecond, r.held = r.saved.Generation, r.saved.WasSecond, r.saved.Lease
	r.setVM(ctx, vm)
	if a.Role == RolePrimary && a.Colo {
		obs := checkpoint.ObserveInColo(vm, r.config().Spec.Tunables.CheckpointDelay)
		if r.migLink != nil {
			if f, err := dupFile(r.migLink); err == nil {
				obs.Observer.SetMigrationSocket(f)
			}
		}
		r.runObserver(obs)
	}
	r.log.Info("QEMU adopted", "pid", vm.PID(), "role", a.Role, "colo", a.Colo, "frozen", a.Frozen, "generation", a.Gen, "link", r.migLink != nil)
	return pol, acts, true
}

func dupFile(f *os.File) (*os.File, error) {
	sc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nf *os.File
	var derr error
	err = sc.Control(func(fd uintptr) {
		var n int
		n, derr = dupCloexec(int(fd))
		if derr == nil {
			nf = os.NewFile(uintptr(n), f.Name())
		}
	})
	if err != nil {
		return nil, err
	}
	return nf, derr
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

func dupCloexec(fd int) (int, error) { return unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0) }
