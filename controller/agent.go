package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp"
)

// Errors of the agent's API; the gRPC adapter maps them to codes.
var (
	ErrNotFound = errors.New("no such pair")
	ErrExists   = errors.New("a pair with that name exists")
)

// SideConfig places one side of a pair.
type SideConfig struct {
	// Host is the address the side listens on for its peer (127.0.0.1 on one host).
	Host string `json:"host"`
	// Disk is this side's disk image. Side A's is the VM's disk; side B's is its replica, created
	// (sparse, of the spec's size) when missing.
	Disk string `json:"disk"`
	// NetSocket is the side's port on the test hub (NIC backend socket).
	NetSocket string `json:"net_socket,omitempty"`
	// Agent names the host whose agent runs this side, for pairs that span two hosts; empty in
	// single-host mode.
	Agent string `json:"agent,omitempty"`
}

// PairConfig is what an operator asks for: a VM and where its two sides run.
type PairConfig struct {
	Spec  checkpoint.Spec `json:"spec"`
	Sides [2]SideConfig   `json:"sides"`
	// NoAutoReprotect leaves a degraded pair unprotected until the operator asks.
	NoAutoReprotect bool `json:"no_auto_reprotect,omitempty"`
}

// AgentConfig configures an agent.
type AgentConfig struct {
	// StateDir holds one folder per pair (spec, state, the sides' runtime folders).
	StateDir string
	// OverlayDir holds the secondaries' overlays, emptied at every checkpoint: tmpfs is best.
	OverlayDir string
	Log        *slog.Logger
	Watch      checkpoint.WatchConfig
}

// Agent runs pairs in single-host mode: both sides of each pair on this machine, one process
// hosting both. Each pair has one runner goroutine that owns its policy and its QEMUs.
type Agent struct {
	cfg    AgentConfig
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	pairs  map[string]*runner
	wg     sync.WaitGroup
}

// NewAgent starts an agent and adopts the pairs found in its state folder: their QEMUs keep
// running, and nothing fails over because the agent restarted.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.OverlayDir == "" {
		cfg.OverlayDir = filepath.Join(cfg.StateDir, "overlays")
	}
	for _, d := range []string{cfg.StateDir, cfg.OverlayDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{cfg: cfg, log: cfg.Log, ctx: ctx, cancel: cancel, pairs: map[string]*runner{}}
	entries, err := os.ReadDir(filepath.Join(cfg.StateDir))
	if err != nil {
		cancel()
		return nil, err
	}
	for _, e := range entries {
		if !e.IsDir() || e.Name() == "overlays" {
			continue
		}
		r, err := a.adopt(e.Name())
		if err != nil {
			a.log.Error("cannot adopt pair", "pair", e.Name(), "err", err)
			continue
		}
		r.publish("") // the status is right from the first Get
		a.pairs[r.name] = r
		a.start(r)
	}
	return a, nil
}

// Close stops the agent's goroutines. The QEMUs keep running; a new agent adopts them.
func (a *Agent) Close() {
	a.cancel()
	a.wg.Wait()
}

func (a *Agent) start(r *runner) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		r.run(a.ctx)
	}()
}

// persisted is the part of a pair's state that survives the agent.
type persisted struct {
	Primary   Side `json:"primary"`
	Gen       int  `json:"generation"`
	Protected bool `json:"protected"`
	Started   bool `json:"started"`
}

func (a *Agent) pairDir(name string) string { return filepath.Join(a.cfg.StateDir, name) }

// Create validates the pair and starts it: the primary boots on side A, then a secondary joins.
// A bad config changes nothing.
func (a *Agent) Create(pc PairConfig) (Status, error) {
	pc.Spec = pc.Spec.WithDefaults()
	var verErr error
	if pc.Spec.QEMUVersion.Major == 0 && len(pc.Spec.QEMU) > 0 {
		// The command-line forms depend on the QEMU at hand; ask it.
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
		return Status{}, err
	}
	for i, sd := range pc.Sides {
		if net.ParseIP(sd.Host) == nil {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].host", i), Reason: fmt.Sprintf("%q is not an IP address", sd.Host)}
		}
		if sd.Disk == "" || !filepath.IsAbs(sd.Disk) {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].disk", i), Reason: fmt.Sprintf("%q: want an absolute path", sd.Disk)}
		}
	}
	if st, err := os.Stat(pc.Sides[0].Disk); err != nil {
		return Status{}, &checkpoint.FieldError{Field: "sides[0].disk", Reason: err.Error()}
	} else if st.Size() != pc.Spec.DiskSize {
		return Status{}, &checkpoint.FieldError{Field: "sides[0].disk", Reason: fmt.Sprintf("%d bytes, the spec says %d", st.Size(), pc.Spec.DiskSize)}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.pairs[pc.Spec.Name]; ok {
		return Status{}, fmt.Errorf("%q: %w", pc.Spec.Name, ErrExists)
	}
	dir := a.pairDir(pc.Spec.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Status{}, err
	}
	if err := writeJSON(filepath.Join(dir, "pair.json"), pc); err != nil {
		return Status{}, err
	}
	r := a.newRunner(pc, NewPolicy(a.policyConfig(pc)))
	a.pairs[r.name] = r
	a.start(r)
	if err := r.request(EvStart{}); err != nil {
		return Status{}, err
	}
	return r.status(), nil
}

func (a *Agent) policyConfig(pc PairConfig) Config {
	c := DefaultConfig
	c.AutoReprotect = !pc.NoAutoReprotect
	return c
}

func (a *Agent) get(name string) (*runner, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, ok := a.pairs[name]
	if !ok {
		return nil, fmt.Errorf("pair %q: %w", name, ErrNotFound)
	}
	return r, nil
}

// Config returns a pair's configuration.
func (a *Agent) Config(name string) (PairConfig, error) {
	r, err := a.get(name)
	if err != nil {
		return PairConfig{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pcSnap, nil
}

// Get returns a pair's status.
func (a *Agent) Get(name string) (Status, error) {
	r, err := a.get(name)
	if err != nil {
		return Status{}, err
	}
	return r.status(), nil
}

// List returns every pair's status, by name.
func (a *Agent) List() []Status {
	a.mu.Lock()
	rs := make([]*runner, 0, len(a.pairs))
	for _, r := range a.pairs {
		rs = append(rs, r)
	}
	a.mu.Unlock()
	out := make([]Status, 0, len(rs))
	for _, r := range rs {
		out = append(out, r.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Delete stops a pair's QEMUs and forgets it.
func (a *Agent) Delete(name string) error {
	r, err := a.get(name)
	if err != nil {
		return err
	}
	if err := r.request(EvStop{}); err != nil && !errors.Is(err, ErrWrongState) {
		return err
	}
	r.stop()
	a.mu.Lock()
	delete(a.pairs, name)
	a.mu.Unlock()
	return os.RemoveAll(a.pairDir(name))
}

// Failover asks for a planned switchover, or a forced failover.
func (a *Agent) Failover(name string, forced bool) error {
	r, err := a.get(name)
	if err != nil {
		return err
	}
	return r.request(EvFailover{Forced: forced})
}

// Reprotect asks to protect a degraded pair now.
func (a *Agent) Reprotect(name string) error {
	r, err := a.get(name)
	if err != nil {
		return err
	}
	return r.request(EvReprotect{})
}

// SetParameters changes tunables at run time (the checkpoint delay takes effect at once).
func (a *Agent) SetParameters(ctx context.Context, name string, t checkpoint.Tunables) error {
	r, err := a.get(name)
	if err != nil {
		return err
	}
	return r.setParameters(ctx, t)
}

// Watch streams a pair's events: the current status first, then every change. The channel
// closes when ctx ends or the pair goes away; a watcher that falls behind loses events, never
// the agent.
func (a *Agent) Watch(ctx context.Context, name string) (<-chan Event2, error) {
	r, err := a.get(name)
	if err != nil {
		return nil, err
	}
	return r.watch(ctx), nil
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

// adopt loads a pair from its folder and takes over its running QEMUs.
func (a *Agent) adopt(name string) (*runner, error) {
	dir := a.pairDir(name)
	var pc PairConfig
	if err := readJSON(filepath.Join(dir, "pair.json"), &pc); err != nil {
		return nil, err
	}
	var ps persisted
	_ = readJSON(filepath.Join(dir, "state.json"), &ps)
	r := a.newRunner(pc, nil)
	ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
	defer cancel()
	var alive [2]*checkpoint.VM
	for _, s := range []Side{SideA, SideB} {
		side := r.side(s)
		pid, err := checkpoint.ReadPID(side.RunDir)
		if err != nil {
			continue
		}
		role := checkpoint.RoleSecondary
		if s == ps.Primary {
			role = checkpoint.RolePrimary
		}
		vm, err := checkpoint.Adopt(ctx, role, side, pid, a.log.With("pair", name, "side", s.String()))
		if err != nil {
			a.log.Info("side not running", "pair", name, "side", s, "err", err)
			continue
		}
		alive[s] = vm
	}
	prim, sec := alive[ps.Primary], alive[ps.Primary.Other()]
	protected := false
	if prim != nil && sec != nil {
		pc1, err1 := prim.QMP.QueryColoStatus(ctx)
		sc, err2 := sec.QMP.QueryColoStatus(ctx)
		protected = err1 == nil && err2 == nil && pc1.Mode == qmp.ColoModePrimary && sc.Mode == qmp.ColoModeSecondary
	}
	switch {
	case prim == nil && !ps.Started:
		r.policy = NewPolicy(a.policyConfig(pc))
	case prim == nil:
		r.policy = NewPolicy(a.policyConfig(pc))
		r.policy.state, r.policy.reason = StateFailed, "the primary was gone when the agent started"
		if sec != nil {
			sec.Kill()
		}
	default:
		r.policy = Restore(a.policyConfig(pc), ps.Primary, protected, ps.Gen)
		r.vms[ps.Primary] = prim
		if protected {
			r.vms[ps.Primary.Other()] = sec
		} else if sec != nil {
			sec.Kill() // a secondary outside COLO holds nothing worth keeping
		}
	}
	a.log.Info("pair adopted", "pair", name, "state", r.policy.State(), "primary", r.policy.Primary())
	return r, nil
}
