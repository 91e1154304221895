package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
)

// The operator's stop, start, drills and console.

// stoppedWhy is the reason a stopped pair's status gives.
const stoppedWhy = "stopped by the operator; start the pair to boot it again"

// modify changes a pair's config in the store, atomically (f may refuse), and hands the new
// config to this host's runners of it; the other host's agent follows the store.
func (a *Agent) modify(ctx context.Context, name string, f func(pc *PairConfig) error) (PairConfig, error) {
	var out PairConfig
	sctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	err := a.cfg.Store.ModifyPair(sctx, name, func(old []byte) ([]byte, error) {
		pc, err := decodePair(name, old)
		if err != nil {
			return nil, fmt.Errorf("pair %q in the store: %w", name, err)
		}
		if err := f(&pc); err != nil {
			return nil, err
		}
		pc.Version++
		out = pc
		return json.Marshal(pc)
	})
	switch {
	case errors.Is(err, coord.ErrNotFound):
		return out, fmt.Errorf("pair %q: %w", name, ErrNotFound)
	case errors.Is(err, coord.ErrUnavailable):
		return out, fmt.Errorf("coordination store: %w", err)
	case err != nil:
		return out, err
	}
	return out, nil
}

// applyConfig hands pc to this host's runners of the pair, one after the other (in
// localRunners' order), each on its loop: a stop or start it carries is taken before this
// returns.
func (a *Agent) applyConfig(ctx context.Context, name string, pc PairConfig) error {
	for _, r := range a.localRunners(name) {
		if _, err := r.do(ctx, call{fn: func(rctx context.Context) callReply {
			r.setConfig(rctx, pc)
			return callReply{}
		}}); err != nil {
			return err
		}
	}
	return nil
}

// localRunners returns this host's runners of a pair, those that run no VM first (so that a
// stop ends a secondary before its primary, which then cannot be taken over).
func (a *Agent) localRunners(name string) []*runner {
	pr, ok := a.pair(name)
	if !ok {
		return nil
	}
	st := pr.view.status()
	var first, last []*runner
	for s, r := range pr.runners {
		switch {
		case r == nil:
		case runsVM(st.Roles[s]):
			last = append(last, r)
		default:
			first = append(first, r)
		}
	}
	return append(first, last...)
}

// Stop stops a pair: both QEMUs end, the pair and its disks stay, and nothing boots it (agent
// restarts included) until Start. The primary's side records that it ran the VM last, so that
// a start boots its disk, which has every write the VM acknowledged.
func (a *Agent) Stop(ctx context.Context, name string) (Status, error) {
	pc, err := a.modify(ctx, name, func(pc *PairConfig) error {
		if pc.Stopped {
			return fmt.Errorf("stop: pair %q is stopped already: %w", name, ErrWrongState)
		}
		pc.Stopped = true
		return nil
	})
	if err != nil {
		return Status{}, err
	}
	if err := a.applyConfig(ctx, name, pc); err != nil {
		return Status{}, fmt.Errorf("stop: %w", err)
	}
	return a.Get(name)
}

// Start boots a stopped or failed pair's VM again, from the disk of the side that ran it last
// (a cold start), and the pair protects itself as it does after a create. It returns once the
// sides here were asked; the other host's agent follows the store.
func (a *Agent) Start(ctx context.Context, name string) (Status, error) {
	st, err := a.Get(name)
	if err != nil {
		return Status{}, err
	}
	pc, err := a.modify(ctx, name, func(pc *PairConfig) error {
		if !pc.Stopped && st.State != StateFailed && st.State != StateStopped {
			return fmt.Errorf("start: pair %q is %s; start is for a stopped or failed pair: %w", name, st.State, ErrWrongState)
		}
		pc.Stopped = false
		pc.Starts++
		return nil
	})
	if err != nil {
		return Status{}, err
	}
	if err := a.applyConfig(ctx, name, pc); err != nil {
		return Status{}, fmt.Errorf("start: %w", err)
	}
	return a.Get(name)
}

// DrillKill is the QEMU a drill killed.
type DrillKill struct {
	Host string
	PID  int
	At   time.Time
}

// Drill kills (SIGKILL), for real, the QEMU of the protected pair's primary (secondary false)
// or secondary, as a fault-tolerance drill; the agents then handle the loss as any other.
// Asked of the agent of the host that runs that side.
func (a *Agent) Drill(ctx context.Context, name string, secondary bool) (DrillKill, error) {
	pr, ok := a.pair(name)
	if !ok {
		pc, err := a.Config(name)
		if err != nil {
			return DrillKill{}, err
		}
		return DrillKill{}, fmt.Errorf("drill: pair %q runs on %s and %s: ask their agents: %w", name, pc.Sides[0].Agent, pc.Sides[1].Agent, ErrWrongState)
	}
	what := "primary"
	if secondary {
		what = "secondary"
	}
	st := pr.view.status()
	if st.State != StateProtected {
		return DrillKill{}, fmt.Errorf("drill: pair %q is %s; a drill needs a protected pair: %w", name, st.State, ErrWrongState)
	}
	for s, r := range pr.runners {
		if r == nil || runsVM(st.Roles[s]) == secondary {
			continue
		}
		rep, err := r.do(ctx, call{fn: func(context.Context) callReply { return r.drillKill(secondary) }})
		if err != nil {
			return DrillKill{}, err
		}
		return DrillKill{Host: a.cfg.Host, PID: rep.pid, At: rep.at}, nil
	}
	pc := pr.view.config()
	for s := range pc.Sides {
		if pr.runners[s] == nil {
			return DrillKill{}, fmt.Errorf("drill: host %s runs the %s; ask its agent: %w", pc.Sides[s].Agent, what, ErrWrongState)
		}
	}
	return DrillKill{}, fmt.Errorf("drill: pair %q has no %s: %w", name, what, ErrWrongState)
}

// drillKill runs on the runner's loop: it kills this side's QEMU if it still is the protected
// pair's primary (or secondary).
func (r *runner) drillKill(secondary bool) callReply {
	role, what := r.pol.Role(), "primary"
	ok := r.vm != nil && role == RolePrimary && r.pol.Colo()
	if secondary {
		ok, what = r.vm != nil && role == RoleSecondary, "secondary"
	}
	if !ok {
		return callReply{err: fmt.Errorf("drill: this side is %s (protected=%v), no longer the protected pair's %s: %w", role, r.pol.Colo(), what, ErrWrongState)}
	}
	pid := r.vm.PID()
	r.log.Warn("drill: killing this side's QEMU (SIGKILL)", "pid", pid, "role", role)
	at := time.Now()
	if err := r.vm.Signal(syscall.SIGKILL); err != nil {
		return callReply{err: fmt.Errorf("drill: killing QEMU %d: %w", pid, err)}
	}
	return callReply{pid: pid, at: at}
}

// Console connects to the serial console of the pair's primary, which this host must run:
// what is written to the connection goes to the guest's serial port, what the guest writes
// comes back. One console at a time per pair; the connection ends when the primary does.
func (a *Agent) Console(ctx context.Context, name string) (net.Conn, error) {
	pr, ok := a.pair(name)
	if !ok {
		pc, err := a.Config(name)
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("console: pair %q runs on %s and %s: ask their agents: %w", name, pc.Sides[0].Agent, pc.Sides[1].Agent, ErrWrongState)
	}
	st := pr.view.status()
	for s, r := range pr.runners {
		if r == nil || !runsVM(st.Roles[s]) {
			continue
		}
		rep, err := r.do(ctx, call{fn: func(context.Context) callReply {
			if r.vm == nil || !runsVM(r.pol.Role()) {
				return callReply{err: fmt.Errorf("console: this side is %s, not running the primary: %w", r.pol.Role(), ErrWrongState)}
			}
			return callReply{dir: r.vm.Side.RunDir}
		}})
		if err != nil {
			return nil, err
		}
		if !pr.console.CompareAndSwap(false, true) {
			return nil, fmt.Errorf("console: pair %q has a console attached already (one at a time): %w", name, ErrWrongState)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "unix", checkpoint.ConsoleSocket(rep.dir))
		if err != nil {
			pr.console.Store(false)
			return nil, fmt.Errorf("console: the primary's serial console: %w", err)
		}
		return &consoleConn{Conn: c, release: func() { pr.console.Store(false) }}, nil
	}
	if st.PrimaryHost != "" && !st.Local[st.PrimarySide] {
		return nil, fmt.Errorf("console: host %s runs the primary; ask its agent: %w", st.PrimaryHost, ErrWrongState)
	}
	return nil, fmt.Errorf("console: pair %q is %s, with no primary running: %w", name, st.State, ErrWrongState)
}

// consoleConn frees the pair's console when closed.
type consoleConn struct {
	net.Conn
	release func()
	once    sync.Once
}

func (c *consoleConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}
