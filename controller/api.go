package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
)

// The agent's API: what PairServer (grpc.go) serves, for the pairs of this host and, from the
// store, of the others.

// Create validates the pair, stores it and starts its local sides; the agent of the other
// host, if any, starts its side from the store. A bad config, or one that collides with
// another pair's resources, changes nothing.
func (a *Agent) Create(pc PairConfig) (Status, error) {
	pc, err := a.check(pc)
	if err != nil {
		return Status{}, err
	}
	b, err := json.Marshal(pc)
	if err != nil {
		return Status{}, err
	}
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	if err := a.cfg.Store.CreatePair(ctx, pc.Spec.Name, b); err != nil {
		if errors.Is(err, coord.ErrExists) {
			return Status{}, fmt.Errorf("%q: %w", pc.Spec.Name, ErrExists)
		}
		return Status{}, fmt.Errorf("coordination store: %w", err)
	}
	a.mu.Lock()
	delete(a.deleted, pc.Spec.Name)
	a.mu.Unlock()
	a.ensure(pc, false)
	return a.Get(pc.Spec.Name)
}

// DryRunCreate checks pc as Create would, conflicts with the other pairs included, and returns
// it as Create would store it (defaults filled in); it changes nothing.
func (a *Agent) DryRunCreate(pc PairConfig) (PairConfig, error) {
	return a.check(pc)
}

// check validates pc and fills in its defaults: the spec, the placements, this host's disk,
// and the resources other pairs in the store use.
func (a *Agent) check(pc PairConfig) (PairConfig, error) {
	pc.Spec = pc.Spec.WithDefaults()
	var verErr error
	if pc.Spec.QEMUVersion.Major == 0 && len(pc.Spec.QEMU) > 0 {
		// The command-line forms depend on the QEMU at hand; both sides must run the same.
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		v, err := checkpoint.DetectVersion(ctx, pc.Spec.QEMU)
		cancel()
		if err != nil {
			verErr = &checkpoint.FieldError{Field: "qemu_command", Reason: err.Error()}
			v = checkpoint.Version{Major: 11, Minor: 1} // lets Validate report the other fields
		}
		pc.Spec.QEMUVersion = v
	}
	if err := errors.Join(pc.Spec.Validate(), verErr); err != nil {
		return pc, err
	}
	for i := range pc.Sides {
		sd := &pc.Sides[i]
		if sd.Agent == "" {
			sd.Agent = a.cfg.Host
		}
		if net.ParseIP(sd.Host) == nil {
			return pc, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].address", i), Reason: fmt.Sprintf("%q is not an IP address", sd.Host)}
		}
		if sd.Disk == "" || !filepath.IsAbs(sd.Disk) {
			return pc, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].disk", i), Reason: fmt.Sprintf("%q: want an absolute path", sd.Disk)}
		}
		if b := sd.Backend; b != "" {
			if _, ok := a.cfg.Backends[b]; !ok && sd.Agent == a.cfg.Host {
				return pc, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].backend", i), Reason: fmt.Sprintf("%q: this agent has no such VM backend", b)}
			}
		}
	}
	local := a.localSides(pc)
	if pc.Sides[0].Agent != pc.Sides[1].Agent && a.cfg.PeerAddr == "" && (local[0] || local[1]) {
		return pc, &checkpoint.FieldError{Field: "sides", Reason: fmt.Sprintf("the sides run on %s and %s, but this agent serves no peer link (lockstepd --peer-listen)", pc.Sides[0].Agent, pc.Sides[1].Agent)}
	}
	if local[0] {
		if st, err := os.Stat(pc.Sides[0].Disk); err != nil {
			return pc, &checkpoint.FieldError{Field: "sides[0].disk", Reason: err.Error()}
		} else if pc.Sides[0].DiskFormat == "" && st.Size() != pc.Spec.DiskSize {
			return pc, &checkpoint.FieldError{Field: "sides[0].disk", Reason: fmt.Sprintf("%d bytes, the spec says %d", st.Size(), pc.Spec.DiskSize)}
		}
	}
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	all, err := a.cfg.Store.ListPairs(ctx)
	if err != nil {
		return pc, fmt.Errorf("coordination store: %w", err)
	}
	if _, ok := all[pc.Spec.Name]; ok {
		return pc, fmt.Errorf("%q: %w", pc.Spec.Name, ErrExists)
	}
	others := make(map[string]PairConfig, len(all))
	for n, b := range all {
		if o, err := decodePair(n, b); err == nil {
			others[n] = o
		}
	}
	if err := errors.Join(conflicts(pc, others)...); err != nil {
		return pc, err
	}
	return pc, nil
}

// recordFolderPairs records in the store the pairs an agent of the earlier layout kept only in
// its folders (pair.json), so that they run on.
func (a *Agent) recordFolderPairs() {
	entries, err := os.ReadDir(a.cfg.StateDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		var pc PairConfig
		if err := readJSON(filepath.Join(a.cfg.StateDir, e.Name(), "pair.json"), &pc); err != nil || pc.Spec.Name != e.Name() {
			continue
		}
		a.normalizeLegacy(&pc)
		b, _ := json.Marshal(pc)
		ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
		err := a.cfg.Store.CreatePair(ctx, pc.Spec.Name, b)
		cancel()
		switch {
		case err == nil:
			a.log.Info("pair recorded in the coordination store from its folder", "pair", pc.Spec.Name)
			_ = os.Remove(filepath.Join(a.cfg.StateDir, e.Name(), "pair.json"))
		case errors.Is(err, coord.ErrExists):
			_ = os.Remove(filepath.Join(a.cfg.StateDir, e.Name(), "pair.json"))
		default:
			a.log.Error("cannot record the pair in the coordination store", "pair", pc.Spec.Name, "err", err)
		}
	}
}

// normalizeLegacy places both sides of a pair of the single-host agent on this host.
func (a *Agent) normalizeLegacy(pc *PairConfig) {
	for i := range pc.Sides {
		if pc.Sides[i].Agent == "" {
			pc.Sides[i].Agent = a.cfg.Host
		}
	}
}

// migrateLegacy moves the pairs of the earlier single-host layout (cfg.Legacy) into the store,
// both sides placed on this host; the old keys go.
func (a *Agent) migrateLegacy() error {
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	all, err := a.cfg.Legacy.ListPairs(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for name, b := range all {
		pc, err := decodePair(name, b)
		if err != nil {
			errs = append(errs, fmt.Errorf("pair %q: %w", name, err))
			continue
		}
		a.normalizeLegacy(&pc)
		nb, _ := json.Marshal(pc)
		if err := a.cfg.Store.CreatePair(ctx, name, nb); err != nil && !errors.Is(err, coord.ErrExists) {
			errs = append(errs, fmt.Errorf("pair %q: %w", name, err))
			continue
		} else if errors.Is(err, coord.ErrExists) {
			a.log.Warn("a pair of the earlier layout has the name of a pair in the store; the store's is kept", "pair", name)
		}
		if err := a.cfg.Legacy.DeletePair(ctx, name); err != nil && !errors.Is(err, coord.ErrNotFound) {
			errs = append(errs, fmt.Errorf("pair %q: removing the old key: %w", name, err))
			continue
		}
		a.log.Info("pair moved from the single-host layout", "pair", name, "host", a.cfg.Host)
	}
	return errors.Join(errs...)
}

// Get returns this agent's view of a pair; for a pair that runs on other hosts, the store's.
func (a *Agent) Get(name string) (Status, error) {
	if pr, ok := a.pair(name); ok {
		return pr.view.status(), nil
	}
	pc, err := a.Config(name)
	if err != nil {
		return Status{}, err
	}
	return a.storeView(pc), nil
}

// Config returns a pair's configuration, from the store for a pair of other hosts.
func (a *Agent) Config(name string) (PairConfig, error) {
	if pr, ok := a.pair(name); ok {
		return pr.view.config(), nil
	}
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	b, err := a.cfg.Store.GetPair(ctx, name)
	if errors.Is(err, coord.ErrNotFound) {
		return PairConfig{}, fmt.Errorf("pair %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return PairConfig{}, fmt.Errorf("coordination store: %w", err)
	}
	pc, err := decodePair(name, b)
	if err != nil {
		return PairConfig{}, fmt.Errorf("pair %q in the store: %w", name, err)
	}
	return pc, nil
}

// storeView is the status of a pair this host runs no side of, as the store tells it: who holds
// the lease, at which epoch, and whether its last record says COLO.
func (a *Agent) storeView(pc PairConfig) Status {
	st := Status{Name: pc.Spec.Name, State: StateStopped, AutoReprotect: !pc.NoAutoReprotect,
		CheckpointTime: pc.Spec.Tunables.CheckpointDelay, Reason: "as the coordination store tells it: this host runs no side of the pair"}
	ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
	defer cancel()
	li, err := a.cfg.Store.Current(ctx, pc.Spec.Name)
	if err != nil {
		st.Reason = "the coordination store is unreachable: " + err.Error()
		return st
	}
	st.StoreReachable = true
	if li.Epoch == 0 {
		return st
	}
	st.Epoch, st.State = li.Epoch, StateDegraded
	for i, sd := range pc.Sides {
		if sd.Agent+":"+Side(i).String() == li.Holder {
			st.PrimarySide, st.PrimaryHost = Side(i), sd.Agent
		}
	}
	var rec PrimaryRecord
	if b, err := a.cfg.Store.Record(ctx, pc.Spec.Name); err == nil && json.Unmarshal(b, &rec) == nil && rec.Holder == li.Holder && rec.Colo {
		st.State, st.Generation = StateProtected, rec.Gen
		st.SecondaryHost = pc.Sides[st.PrimarySide.Other()].Agent
	}
	return st
}

// List returns every pair: this host's own with its view, the others with the store's.
func (a *Agent) List() []Status {
	a.mu.Lock()
	var out []Status
	seen := map[string]bool{}
	for name, pr := range a.pairs {
		out = append(out, pr.view.status())
		seen[name] = true
	}
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
	all, err := a.cfg.Store.ListPairs(ctx)
	cancel()
	if err == nil {
		for name, b := range all {
			if seen[name] {
				continue
			}
			if pc, err := decodePair(name, b); err == nil {
				out = append(out, a.storeView(pc))
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Delete removes the pair from the store and stops its sides here; the other host's agent
// stops its side when the store tells it.
func (a *Agent) Delete(name string) error {
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	// From now on, the watch's older events of the pair start nothing.
	a.mu.Lock()
	was := a.deleted[name]
	a.deleted[name] = true
	a.mu.Unlock()
	if err := a.cfg.Store.DeletePair(ctx, name); err != nil {
		if errors.Is(err, coord.ErrNotFound) {
			if _, ok := a.pair(name); !ok {
				a.mu.Lock()
				a.deleted[name] = was
				a.mu.Unlock()
				return fmt.Errorf("pair %q: %w", name, ErrNotFound)
			}
		} else {
			a.mu.Lock()
			a.deleted[name] = was
			a.mu.Unlock()
			return fmt.Errorf("coordination store: %w", err)
		}
	}
	a.drop(name)
	return nil
}

// primaryRunner returns the local runner that runs the pair's primary, or an error naming the
// host to ask.
func (a *Agent) primaryRunner(name, what string) (*runner, error) {
	pr, ok := a.pair(name)
	if !ok {
		pc, err := a.Config(name)
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("%s: pair %q runs on %s and %s: ask their agents: %w", what, name, pc.Sides[0].Agent, pc.Sides[1].Agent, ErrWrongState)
	}
	st := pr.view.status()
	for s, r := range pr.runners {
		if r != nil && runsVM(st.Roles[s]) {
			return r, nil
		}
	}
	if st.PrimaryHost != "" && !st.Local[st.PrimarySide] {
		return nil, fmt.Errorf("%s: host %s runs the primary; ask its agent: %w", what, st.PrimaryHost, ErrWrongState)
	}
	return nil, fmt.Errorf("%s: pair %q is %s, with no primary running: %w", what, name, st.State, ErrWrongState)
}

// Failover runs an operator's failover of a protected pair, asked of the agent of the host that
// runs its primary: a planned switchover (held output flushed first), or a forced failover (the
// primary killed at once). It returns the failover's record once the peer runs the VM.
func (a *Agent) Failover(ctx context.Context, name string, forced bool, reason string) (*FailoverRecord, error) {
	r, err := a.primaryRunner(name, "failover")
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := r.view.watch(wctx, r.done, &a.wg)
	t0 := time.Now()
	if err := r.request(ctx, FailoverRequest{Forced: forced, Reason: reason}); err != nil {
		return nil, err
	}
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return nil, fmt.Errorf("failover: pair %q went away", name)
			}
			if ev.Kind == EventFailover && !ev.Failover.At.Before(t0) {
				return ev.Failover, nil
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("failover: the peer did not take over: %w", ctx.Err())
		}
	}
}

// Reprotect asks the primary running alone to protect itself now.
func (a *Agent) Reprotect(name string) error {
	r, err := a.primaryRunner(name, "reprotect")
	if err != nil {
		return err
	}
	return r.request(a.ctx, ReprotectRequest{})
}

// SetParameters changes tunables at run time on the protected primary this host runs: QEMU's
// migration parameters first (the checkpoint delay takes effect at once), then the pair's spec
// in the store, which the peer's agent follows.
func (a *Agent) SetParameters(ctx context.Context, name string, t checkpoint.Tunables) error {
	r, err := a.primaryRunner(name, "set parameters")
	if err != nil {
		return err
	}
	rep, err := r.do(ctx, call{param: true})
	if err != nil {
		return err
	}
	spec, err := mergeTunables(rep.pc.Spec, t)
	if err != nil {
		return err
	}
	if err := applyTunables(ctx, rep.vm, spec); err != nil {
		return fmt.Errorf("set parameters: %w", err)
	}
	pc, err := a.modify(ctx, name, func(pc *PairConfig) error {
		pc.Spec.Tunables = spec.Tunables
		return nil
	})
	if err != nil {
		// QEMU runs with the new values; the store (and so the peer and the next protection)
		// does not have them.
		return fmt.Errorf("set parameters: applied to QEMU, but the store did not take them: %w", err)
	}
	// At once, so that the caller's next read has it; the store's watch brings it here too.
	if pr, ok := a.pair(name); ok {
		pr.view.setConfig(pc)
		for _, lr := range pr.runners {
			if lr != nil {
				lr.updateConfig(pc)
			}
		}
	}
	return nil
}

// Watch streams this agent's view of a pair: the current status first, then every change.
// The channel closes when ctx ends or the pair goes away; a watcher that falls behind loses
// events, never the agent.
func (a *Agent) Watch(ctx context.Context, name string) (<-chan WatchEvent, error) {
	pr, ok := a.pair(name)
	if !ok {
		pc, err := a.Config(name)
		if err != nil {
			return nil, err
		}
		return nil, fmt.Errorf("watch: pair %q runs on %s and %s: ask their agents: %w", name, pc.Sides[0].Agent, pc.Sides[1].Agent, ErrWrongState)
	}
	return pr.view.watch(ctx, pr.done, &a.wg), nil
}
