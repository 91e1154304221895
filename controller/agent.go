package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
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
	// Store, when set, is where the pairs' configurations live (lockstepd's default: an etcd
	// server inside lockstepd, data in the state folder): Create, SetParameters and Delete write
	// there first, and a starting agent runs the pairs the store lists. Each pair's folder
	// keeps a copy (pair.json) and its run-time state. Without a Store, the folders are all.
	Store coord.Store
}

// storeTimeout bounds one call to the coordination store from the single-host agent.
const storeTimeout = 10 * time.Second

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
	stored, err := a.storedPairs()
	if err != nil {
		cancel()
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(cfg.StateDir))
	if err != nil {
		cancel()
		return nil, err
	}
	names := map[string]bool{}
	for _, e := range entries {
		if e.IsDir() && e.Name() != "overlays" && nameIsPair(e.Name()) {
			names[e.Name()] = true
		}
	}
	for name := range stored {
		names[name] = true
	}
	var toStart []*runner
	for name := range names {
		pc, fromStore := stored[name]
		var pcp *PairConfig
		if fromStore {
			pcp = &pc
		}
		r, fresh, err := a.adopt(name, pcp)
		if err != nil {
			a.log.Error("cannot adopt pair", "pair", name, "err", err)
			continue
		}
		if cfg.Store != nil && !fromStore {
			// A folder from before the store (or from a store that lost it): the store learns it.
			if err := a.storePair(r.pc, true); err != nil {
				a.log.Error("cannot record the pair in the coordination store", "pair", name, "err", err)
			} else {
				a.log.Info("pair recorded in the coordination store from its folder", "pair", name)
			}
		}
		r.publish("") // the status is right from the first Get
		a.pairs[r.name] = r
		a.start(r)
		if fresh {
			toStart = append(toStart, r)
		}
	}
	// Pairs the store lists that this machine never ran (their folders are gone): started, since
	// the store says they exist.
	for _, r := range toStart {
		a.log.Info("starting a pair the coordination store lists but no folder had", "pair", r.name)
		if err := r.request(EvStart{}); err != nil {
			a.log.Error("cannot start pair", "pair", r.name, "err", err)
		}
	}
	return a, nil
}

// nameIsPair tells whether a state-folder entry can be a pair's folder (pair names start with
// a letter or digit; the embedded store's folder starts with '_').
func nameIsPair(name string) bool {
	return name != "" && (name[0] >= 'a' && name[0] <= 'z' || name[0] >= 'A' && name[0] <= 'Z' || name[0] >= '0' && name[0] <= '9')
}

// storedPairs lists the pairs of the coordination store (none without a store).
func (a *Agent) storedPairs() (map[string]PairConfig, error) {
	out := map[string]PairConfig{}
	if a.cfg.Store == nil {
		return out, nil
	}
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	all, err := a.cfg.Store.ListPairs(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing the pairs in the coordination store: %w", err)
	}
	for name, b := range all {
		var pc PairConfig
		if err := json.Unmarshal(b, &pc); err != nil || pc.Spec.Name != name {
			a.log.Error("unreadable pair in the coordination store, left alone", "pair", name, "err", err)
			continue
		}
		if pc.Sides[0].Agent != "" || pc.Sides[1].Agent != "" {
			// Placed on named hosts: a two-host pair, which those hosts' agents run.
			a.log.Error("a two-host pair among this single-host agent's pairs in the store, left alone", "pair", name,
				"hosts", pc.Sides[0].Agent+","+pc.Sides[1].Agent)
			continue
		}
		out[name] = pc
	}
	return out, nil
}

// storePair writes a pair's configuration to the coordination store, creating or replacing it;
// without a store it does nothing.
func (a *Agent) storePair(pc PairConfig, create bool) error {
	if a.cfg.Store == nil {
		return nil
	}
	b, err := json.Marshal(pc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	if create {
		err = a.cfg.Store.CreatePair(ctx, pc.Spec.Name, b)
		if errors.Is(err, coord.ErrExists) {
			return fmt.Errorf("%q: %w (in the coordination store)", pc.Spec.Name, ErrExists)
		}
	} else {
		err = a.cfg.Store.UpdatePair(ctx, pc.Spec.Name, b)
	}
	if err != nil {
		return fmt.Errorf("coordination store: %w", err)
	}
	return nil
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
	if err := a.storePair(pc, true); err != nil {
		return Status{}, err
	}
	dir := a.pairDir(pc.Spec.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		a.unstore(pc.Spec.Name)
		return Status{}, err
	}
	if err := writeJSON(filepath.Join(dir, "pair.json"), pc); err != nil {
		a.unstore(pc.Spec.Name)
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
	rs := slices.Collect(maps.Values(a.pairs))
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
	if err := a.unstore(name); err != nil {
		return err
	}
	return os.RemoveAll(a.pairDir(name))
}

// unstore removes a pair from the coordination store; one already gone is no error.
func (a *Agent) unstore(name string) error {
	if a.cfg.Store == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(a.ctx, storeTimeout)
	defer cancel()
	if err := a.cfg.Store.DeletePair(ctx, name); err != nil && !errors.Is(err, coord.ErrNotFound) {
		return fmt.Errorf("removing pair %q from the coordination store: %w", name, err)
	}
	return nil
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

// adopt loads a pair, its configuration from the store (stored) or else from its folder, and
// takes over its running QEMUs. fresh says the pair has no folder yet (a pair only the store
// knew), which adopt creates.
func (a *Agent) adopt(name string, stored *PairConfig) (r *runner, fresh bool, err error) {
	dir := a.pairDir(name)
	var pc PairConfig
	if stored != nil {
		pc = *stored
		if _, err := os.Stat(filepath.Join(dir, "pair.json")); errors.Is(err, os.ErrNotExist) {
			fresh = true
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, false, err
		}
		if err := writeJSON(filepath.Join(dir, "pair.json"), pc); err != nil {
			return nil, false, err
		}
	} else if err := readJSON(filepath.Join(dir, "pair.json"), &pc); err != nil {
		return nil, false, err
	}
	var ps persisted
	_ = readJSON(filepath.Join(dir, "state.json"), &ps)
	r = a.newRunner(pc, nil)
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
	return r, fresh, nil
}
