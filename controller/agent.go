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

	"google.golang.org/grpc/credentials"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
	"github.com/lockstepvm/lockstep/fence"
)

// Fence is the host's fence keeper as the agent uses it (fence.Client). The keeper drops the
// guard of a QEMU that exits by itself.
type Fence interface {
	Guard(g fence.Guard) error
}

// SideConfig places one side of a pair.
type SideConfig struct {
	// Host is the address the side listens on for its peer (127.0.0.1 when both sides run on
	// one host).
	Host string `json:"host"`
	// Disk is this side's disk image. Side A's is the VM's disk; side B's is its replica, created
	// (sparse, of the spec's size) when missing.
	Disk string `json:"disk"`
	// NetSocket is the side's port on the test hub (NIC backend socket).
	NetSocket string `json:"net_socket,omitempty"`
	// Agent names the host whose agent runs this side. Create fills in the creating agent's
	// host when it is empty.
	Agent string `json:"agent,omitempty"`
	// Backend names the VM backend that runs the side's QEMU ("qemu" when empty).
	Backend string `json:"backend,omitempty"`
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
	// Host is this agent's name, as pair placements name it.
	Host string
	// PeerAddr is where this agent serves PeerService (host:port), published in the store for
	// the agents of other hosts; empty when it runs no pair that spans two hosts.
	PeerAddr string
	// PeerCreds secure the connections to peer agents (insecure when nil).
	PeerCreds credentials.TransportCredentials
	// StateDir holds one folder per pair, with one per side (saved state, QEMU runtime files).
	StateDir string
	// OverlayDir holds the secondaries' overlays, emptied at every checkpoint: tmpfs is best.
	OverlayDir string
	// Store holds the pairs' specs, leases and primary records (lockstepd's default: an etcd
	// server inside lockstepd).
	Store Store
	// Legacy, when set, is where the single-host agent of earlier versions kept its pairs; they
	// are moved into Store when the agent starts.
	Legacy coord.Store
	Log    *slog.Logger
	Watch  checkpoint.WatchConfig
	// Backends are the VM backends by name; "qemu" (checkpoint.Direct) is always there.
	Backends map[string]checkpoint.Backend
	// Fence, when set, is the host's fence keeper: it freezes a primary QEMU whose agent is
	// gone once its lease may have lapsed and its COLO link is not active (package fence).
	Fence Fence
	// Tick is the policy's logical tick (100 ms by default); the timings below are rounded to
	// whole ticks.
	Tick time.Duration
	// HeartbeatInterval (100 ms), HeartbeatTimeout (500 ms) and LeaseTTL (1 s; the store's
	// granularity is whole seconds) are the failure-detection timings. A host loss fails over
	// about LeaseTTL after the host died; a QEMU crash hands over at once.
	HeartbeatInterval, HeartbeatTimeout, LeaseTTL time.Duration
	// FenceMargin is how long before its lease could expire a primary freezes its VM (200 ms).
	FenceMargin time.Duration
}

func (c *AgentConfig) defaults() error {
	if c.Host == "" {
		return errors.New("agent: a host name is needed")
	}
	if c.Store == nil {
		return errors.New("agent: no coordination store")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.OverlayDir == "" {
		c.OverlayDir = filepath.Join(c.StateDir, "overlays")
	}
	bs := map[string]checkpoint.Backend{"qemu": checkpoint.Direct{}}
	for n, b := range c.Backends {
		bs[n] = b
	}
	c.Backends = bs
	set := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	set(&c.Tick, DefaultTick)
	set(&c.HeartbeatInterval, 100*time.Millisecond)
	set(&c.HeartbeatTimeout, 500*time.Millisecond)
	set(&c.LeaseTTL, time.Second)
	set(&c.FenceMargin, 200*time.Millisecond)
	if c.LeaseTTL%time.Second != 0 {
		return fmt.Errorf("agent: lease TTL %v: the store counts leases in whole seconds", c.LeaseTTL)
	}
	_, err := NewPolicy(c.policyConfig(true), c.Host)
	return err
}

func (c *AgentConfig) ticks(d time.Duration) int { return int((d + c.Tick - 1) / c.Tick) }

func (c *AgentConfig) policyConfig(auto bool) Config {
	ttl := c.ticks(c.LeaseTTL)
	return Config{
		HeartbeatTimeout: c.ticks(c.HeartbeatTimeout), LeaseTTL: ttl, FenceMargin: c.ticks(c.FenceMargin),
		RenewEvery: max(1, ttl/5), AcquireEvery: max(1, c.ticks(c.HeartbeatInterval)*2), StandDownAfter: 3 * ttl,
		AutoReprotect: auto, RetryTicks: c.ticks(time.Second), MaxRetryTicks: c.ticks(30 * time.Second),
	}
}

// Agent runs this host's sides of every pair placed on it: one runner per (pair, side). A pair
// whose two placements name this host runs both sides here, joined by the in-process peer
// link; a pair whose other side is another host's talks to that host's agent over PeerService.
// Pair specs live in the store; every agent follows them.
type Agent struct {
	cfg    AgentConfig
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	links  *grpcLinks

	mu    sync.Mutex
	pairs map[string]*pairRun
}

// pairRun is a pair as this agent runs it: the runners of its local sides and its view.
type pairRun struct {
	cfg     PairConfig
	view    *pairView
	runners [2]*runner // nil for a side of another host
	done    chan struct{}
}

// NewAgent starts the agent: it moves pairs of the earlier layout into the store, registers
// its peer address, starts the pairs the store places on this host (adopting their running
// QEMUs), and follows the store for new, changed and deleted pairs. The store may be down:
// the agent keeps trying.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	for _, d := range []string{cfg.StateDir, cfg.OverlayDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &Agent{cfg: cfg, log: cfg.Log, ctx: ctx, cancel: cancel, pairs: map[string]*pairRun{},
		links: newGRPCLinks(cfg.Host, cfg.Store, cfg.PeerCreds)}
	if cfg.Legacy != nil {
		if err := a.migrateLegacy(); err != nil {
			a.log.Error("moving the single-host pairs of the earlier layout into the store", "err", err)
		}
	}
	a.recordFolderPairs()
	lctx, lcancel := context.WithTimeout(ctx, storeTimeout)
	all, err := cfg.Store.ListPairs(lctx)
	lcancel()
	if err != nil {
		a.log.Warn("cannot list the pairs in the store yet; following it", "err", err)
	}
	for name, b := range all {
		if pc, err := decodePair(name, b); err == nil {
			a.ensure(pc)
		} else {
			a.log.Error("unreadable pair in the store, left alone", "pair", name, "err", err)
		}
	}
	a.wg.Add(1)
	go func() { defer a.wg.Done(); a.follow(ctx) }()
	return a, nil
}

// storeTimeout bounds one call to the store on the API's behalf.
const storeTimeout = 10 * time.Second

func decodePair(name string, b []byte) (PairConfig, error) {
	var pc PairConfig
	if err := json.Unmarshal(b, &pc); err != nil {
		return pc, err
	}
	if pc.Spec.Name != name {
		return pc, fmt.Errorf("its spec names %q", pc.Spec.Name)
	}
	return pc, nil
}

// Close stops the agent. Its QEMUs keep running: a new agent adopts them, and nothing fails
// over because the agent stopped.
func (a *Agent) Close() {
	a.cancel()
	// Watch streams end first: their goroutines are the agent's too.
	a.mu.Lock()
	prs := a.pairs
	a.pairs = map[string]*pairRun{}
	for _, pr := range prs {
		close(pr.done)
	}
	a.mu.Unlock()
	a.wg.Wait()
	a.links.close()
	for _, pr := range prs {
		pr.view.closeWatchers()
	}
}

// follow registers the agent and keeps the runners in line with the store.
func (a *Agent) follow(ctx context.Context) {
	if a.cfg.PeerAddr != "" {
		for {
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := a.cfg.Store.RegisterAgent(rctx, a.cfg.Host, a.cfg.PeerAddr)
			cancel()
			if err == nil {
				break
			}
			a.log.Warn("cannot register in the store; retrying", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
		}
	}
	for ev := range a.cfg.Store.WatchPairs(ctx) {
		if ev.Deleted {
			a.drop(ev.Name)
			continue
		}
		pc, err := decodePair(ev.Name, ev.Value)
		if err != nil {
			a.log.Error("unreadable pair in the store", "pair", ev.Name, "err", err)
			continue
		}
		a.ensure(pc)
	}
}

// localSides says which sides of pc this agent runs.
func (a *Agent) localSides(pc PairConfig) [2]bool {
	return [2]bool{pc.Sides[0].Agent == a.cfg.Host, pc.Sides[1].Agent == a.cfg.Host}
}

// ensure runs the local sides of pc, or brings their runners the new config.
func (a *Agent) ensure(pc PairConfig) {
	local := a.localSides(pc)
	if !local[0] && !local[1] {
		return
	}
	pc.Spec = pc.Spec.WithDefaults()
	a.mu.Lock()
	defer a.mu.Unlock()
	if pr, ok := a.pairs[pc.Spec.Name]; ok {
		for _, r := range pr.runners {
			if r != nil {
				r.updateConfig(pc)
			}
		}
		return
	}
	if a.ctx.Err() != nil {
		return
	}
	var backends [2]checkpoint.Backend
	for s := range local {
		if !local[s] {
			continue
		}
		name := pc.Sides[s].Backend
		if name == "" {
			name = "qemu"
		}
		b, ok := a.cfg.Backends[name]
		if !ok {
			a.log.Error("cannot run pair: unknown VM backend", "pair", pc.Spec.Name, "side", Side(s), "backend", name)
			return
		}
		backends[s] = b
	}
	pr := &pairRun{cfg: pc, view: newPairView(pc, local), done: make(chan struct{})}
	for s := range local {
		if !local[s] {
			continue
		}
		side := Side(s)
		var link PeerLink
		if local[side.Other()] {
			link = localLink{a: a, side: side.Other()}
		} else {
			link = a.links.to(pc.Sides[side.Other()].Agent)
		}
		r := newRunner(a, pc, side, pr.view, link, backends[s])
		r.peerLocal = local[side.Other()]
		pr.runners[s] = r
	}
	a.pairs[pc.Spec.Name] = pr
	a.mu.Unlock()
	// Adoption first, so that the status is right from the first request; then the loops.
	for _, r := range pr.runners {
		if r != nil {
			r.start(a.ctx)
			r.publish(a.ctx)
		}
	}
	a.mu.Lock()
	if a.ctx.Err() != nil || a.pairs[pc.Spec.Name] != pr {
		// The agent is stopping, or the pair went away meanwhile: no loop starts; the loop
		// would have let go of the adopted QEMU the same way.
		for _, r := range pr.runners {
			if r != nil {
				r.abandon()
			}
		}
		return
	}
	for _, r := range pr.runners {
		if r != nil {
			a.wg.Add(1)
			go func() { defer a.wg.Done(); r.run(a.ctx) }()
		}
	}
}

// drop stops the local sides of a deleted pair, their QEMUs included, and removes its folder.
func (a *Agent) drop(name string) {
	a.mu.Lock()
	pr, ok := a.pairs[name]
	delete(a.pairs, name)
	a.mu.Unlock()
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
	defer cancel()
	for _, r := range pr.runners {
		if r != nil {
			_ = r.request(ctx, Stop{})
		}
	}
	for _, r := range pr.runners {
		if r != nil {
			r.stop()
		}
	}
	pr.view.closeWatchers()
	close(pr.done)
	_ = os.RemoveAll(filepath.Join(a.cfg.StateDir, name))
	_ = os.RemoveAll(filepath.Join(a.cfg.OverlayDir, name))
}

func (a *Agent) pair(name string) (*pairRun, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	pr, ok := a.pairs[name]
	return pr, ok
}

// runnerOf returns the runner of a local side (for the in-process peer link).
func (a *Agent) runnerOf(name string, side Side) (*runner, error) {
	pr, ok := a.pair(name)
	if !ok || pr.runners[side] == nil {
		return nil, fmt.Errorf("pair %q: side %s does not run in this agent: %w", name, side, ErrNotFound)
	}
	return pr.runners[side], nil
}

// remoteTarget returns the runner of this host's side of a pair for a request from sender's
// agent ("" when the request does not name its sender).
func (a *Agent) remoteTarget(name, sender string) (*runner, error) {
	pr, ok := a.pair(name)
	if !ok {
		return nil, fmt.Errorf("pair %q: this host runs no side of it: %w", name, ErrNotFound)
	}
	var found *runner
	for s, r := range pr.runners {
		if r == nil {
			continue
		}
		if peer := pr.cfg.Sides[Side(s).Other()].Agent; peer == a.cfg.Host || (sender != "" && peer != sender) {
			continue
		}
		found = r
	}
	if found == nil {
		return nil, fmt.Errorf("pair %q: no side of it here has %q as its peer: %w", name, sender, ErrNotFound)
	}
	return found, nil
}

// Create validates the pair, stores it and starts its local sides; the agent of the other
// host, if any, starts its side from the store. A bad config changes nothing.
func (a *Agent) Create(pc PairConfig) (Status, error) {
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
		return Status{}, err
	}
	for i := range pc.Sides {
		sd := &pc.Sides[i]
		if sd.Agent == "" {
			sd.Agent = a.cfg.Host
		}
		if net.ParseIP(sd.Host) == nil {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].address", i), Reason: fmt.Sprintf("%q is not an IP address", sd.Host)}
		}
		if sd.Disk == "" || !filepath.IsAbs(sd.Disk) {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].disk", i), Reason: fmt.Sprintf("%q: want an absolute path", sd.Disk)}
		}
		if b := sd.Backend; b != "" {
			if _, ok := a.cfg.Backends[b]; !ok && sd.Agent == a.cfg.Host {
				return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].backend", i), Reason: fmt.Sprintf("%q: this agent has no such VM backend", b)}
			}
		}
	}
	local := a.localSides(pc)
	if pc.Sides[0].Agent != pc.Sides[1].Agent && a.cfg.PeerAddr == "" && (local[0] || local[1]) {
		return Status{}, &checkpoint.FieldError{Field: "sides", Reason: fmt.Sprintf("the sides run on %s and %s, but this agent serves no peer link (lockstepd --peer-listen)", pc.Sides[0].Agent, pc.Sides[1].Agent)}
	}
	if local[0] {
		if st, err := os.Stat(pc.Sides[0].Disk); err != nil {
			return Status{}, &checkpoint.FieldError{Field: "sides[0].disk", Reason: err.Error()}
		} else if st.Size() != pc.Spec.DiskSize {
			return Status{}, &checkpoint.FieldError{Field: "sides[0].disk", Reason: fmt.Sprintf("%d bytes, the spec says %d", st.Size(), pc.Spec.DiskSize)}
		}
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
	a.ensure(pc)
	return a.Get(pc.Spec.Name)
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
	if err := a.cfg.Store.DeletePair(ctx, name); err != nil {
		if errors.Is(err, coord.ErrNotFound) {
			if _, ok := a.pair(name); !ok {
				return fmt.Errorf("pair %q: %w", name, ErrNotFound)
			}
		} else {
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
	pc := rep.pc
	pc.Spec = spec
	b, err := json.Marshal(pc)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	if err := a.cfg.Store.UpdatePair(sctx, name, b); err != nil {
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
