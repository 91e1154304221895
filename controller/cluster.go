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

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
)

// ClusterStore is what a ClusterAgent needs of the coordination store (coord.Etcd has it all).
type ClusterStore interface {
	coord.Store
	Record(ctx context.Context, pair string) ([]byte, error)
	Mark(ctx context.Context, h coord.Held, record []byte) error
	RegisterAgent(ctx context.Context, host, addr string) error
	AgentAddr(ctx context.Context, host string) (string, error)
}

// ClusterConfig configures a ClusterAgent: one host's agent for pairs that span two hosts.
type ClusterConfig struct {
	// Host is this agent's name, as pair placements name it.
	Host string
	// PeerAddr is the address (host:port) at which this agent serves PeerService; it is
	// published in the store for the peers.
	PeerAddr string
	// PeerCreds secure the connections to peer agents (insecure when nil).
	PeerCreds credentials.TransportCredentials
	StateDir  string
	// OverlayDir holds the secondaries' overlays (tmpfs is best).
	OverlayDir string
	Store      ClusterStore
	Log        *slog.Logger
	Watch      checkpoint.WatchConfig
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

func (c *ClusterConfig) defaults() error {
	if c.Host == "" {
		return errors.New("cluster: the agent needs a host name")
	}
	if c.Store == nil {
		return errors.New("cluster: no coordination store")
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.OverlayDir == "" {
		c.OverlayDir = filepath.Join(c.StateDir, "overlays")
	}
	set := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	set(&c.Tick, 100*time.Millisecond)
	set(&c.HeartbeatInterval, 100*time.Millisecond)
	set(&c.HeartbeatTimeout, 500*time.Millisecond)
	set(&c.LeaseTTL, time.Second)
	set(&c.FenceMargin, 200*time.Millisecond)
	if c.LeaseTTL%time.Second != 0 {
		return fmt.Errorf("cluster: lease TTL %v: the store counts leases in whole seconds", c.LeaseTTL)
	}
	if _, err := NewHostPolicy(c.hostConfig(true), c.Host); err != nil {
		return err
	}
	return nil
}

func (c *ClusterConfig) ticks(d time.Duration) int { return int((d + c.Tick - 1) / c.Tick) }

func (c *ClusterConfig) hostConfig(auto bool) HostConfig {
	ttl := c.ticks(c.LeaseTTL)
	return HostConfig{
		HeartbeatTimeout: c.ticks(c.HeartbeatTimeout), LeaseTTL: ttl, FenceMargin: c.ticks(c.FenceMargin),
		RenewEvery: max(1, ttl/5), AcquireEvery: max(1, c.ticks(c.HeartbeatInterval)*2), StandDownAfter: 3 * ttl,
		AutoReprotect: auto, RetryTicks: c.ticks(time.Second), MaxRetryTicks: c.ticks(30 * time.Second),
	}
}

// ClusterAgent runs this host's side of every pair placed on it. Pair specs live in the store;
// every agent watches them and runs a hostRunner for each pair it has a side of.
type ClusterAgent struct {
	cfg    ClusterConfig
	log    *slog.Logger
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	spawn *spawner // starts this agent's QEMUs so that they die with it

	mu      sync.Mutex
	runners map[string]*hostRunner
	conns   map[string]*grpc.ClientConn // peer agents by host
}

// NewClusterAgent registers the agent in the store and starts following the pairs placed on
// this host. The store may be down: the agent keeps trying.
func NewClusterAgent(cfg ClusterConfig) (*ClusterAgent, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	for _, d := range []string{cfg.StateDir, cfg.OverlayDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &ClusterAgent{cfg: cfg, log: cfg.Log, ctx: ctx, cancel: cancel, runners: map[string]*hostRunner{}, conns: map[string]*grpc.ClientConn{}, spawn: newSpawner()}
	a.wg.Add(1)
	go func() { defer a.wg.Done(); a.follow(ctx) }()
	return a, nil
}

// Close stops the agent. Its QEMUs stop with it (see spawner). A VM this host runs as a
// protected primary is first handed over to its secondary with a planned switchover; a VM
// running here alone is lost with the agent.
func (a *ClusterAgent) Close() {
	a.mu.Lock()
	rs := make([]*hostRunner, 0, len(a.runners))
	for _, r := range a.runners {
		rs = append(rs, r)
	}
	a.mu.Unlock()
	for _, r := range rs {
		r.drain()
	}
	a.cancel()
	a.wg.Wait()
	a.spawn.stop()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		c.Close()
	}
}

// follow registers the agent and runs a runner for each pair of this host, as the store says.
func (a *ClusterAgent) follow(ctx context.Context) {
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
	for ev := range a.cfg.Store.WatchPairs(ctx) {
		if ev.Deleted {
			a.drop(ev.Name)
			continue
		}
		var pc PairConfig
		if err := json.Unmarshal(ev.Value, &pc); err != nil {
			a.log.Error("unreadable pair in the store", "pair", ev.Name, "err", err)
			continue
		}
		a.ensure(pc)
	}
}

func (a *ClusterAgent) mySide(pc PairConfig) (Side, bool) {
	for i, s := range pc.Sides {
		if s.Agent == a.cfg.Host {
			return Side(i), true
		}
	}
	return 0, false
}

func (a *ClusterAgent) ensure(pc PairConfig) {
	side, ok := a.mySide(pc)
	if !ok {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if r, ok := a.runners[pc.Spec.Name]; ok {
		// A pair this host runs already: only its tunables may have changed (set at run time).
		select {
		case r.events <- specUpdate{pc: pc}:
		default:
			a.log.Warn("pair runner busy: a tunables update from the store was dropped (the runner keeps its tunables until the next update)", "pair", pc.Spec.Name)
		}
		return
	}
	if a.ctx.Err() != nil {
		return
	}
	r, err := newHostRunner(a, pc, side)
	if err != nil {
		a.log.Error("cannot run pair", "pair", pc.Spec.Name, "err", err)
		return
	}
	a.runners[pc.Spec.Name] = r
	a.wg.Add(1)
	go func() { defer a.wg.Done(); r.run(a.ctx) }()
}

func (a *ClusterAgent) drop(name string) {
	a.mu.Lock()
	r, ok := a.runners[name]
	delete(a.runners, name)
	a.mu.Unlock()
	if ok {
		_, _ = r.call(HStop{})
		r.stop()
		_ = os.RemoveAll(r.dir)
	}
}

func (a *ClusterAgent) runner(name string) (*hostRunner, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, ok := a.runners[name]
	if !ok {
		return nil, fmt.Errorf("pair %q: this host runs no side of it: %w", name, ErrNotFound)
	}
	return r, nil
}

// local returns the runner of a pair for a request that only the pair's own agents can serve.
func (a *ClusterAgent) local(name string) (*hostRunner, error) {
	r, err := a.runner(name)
	if err == nil {
		return r, nil
	}
	pc, cerr := a.Config(name)
	if cerr != nil {
		return nil, cerr
	}
	return nil, fmt.Errorf("pair %q runs on %s and %s: ask their agents: %w", name, pc.Sides[0].Agent, pc.Sides[1].Agent, ErrWrongState)
}

// peer returns a PeerService connection to host's agent.
func (a *ClusterAgent) peer(ctx context.Context, host string) (*grpc.ClientConn, error) {
	a.mu.Lock()
	c, ok := a.conns[host]
	a.mu.Unlock()
	if ok {
		return c, nil
	}
	addr, err := a.cfg.Store.AgentAddr(ctx, host)
	if err != nil {
		return nil, err
	}
	creds := a.cfg.PeerCreds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	c, err = grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if old, ok := a.conns[host]; ok {
		c.Close()
		return old, nil
	}
	a.conns[host] = c
	return c, nil
}

// Create validates the pair and stores it; the agents of its two hosts start it.
func (a *ClusterAgent) Create(pc PairConfig) (Status, error) {
	pc.Spec = pc.Spec.WithDefaults()
	if pc.Spec.QEMUVersion.Major == 0 && len(pc.Spec.QEMU) > 0 {
		// The command-line forms depend on the QEMU at hand; both hosts must run the same.
		ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
		v, err := checkpoint.DetectVersion(ctx, pc.Spec.QEMU)
		cancel()
		if err != nil {
			return Status{}, &checkpoint.FieldError{Field: "qemu_command", Reason: err.Error()}
		}
		pc.Spec.QEMUVersion = v
	}
	if err := pc.Spec.Validate(); err != nil {
		return Status{}, err
	}
	for i, sd := range pc.Sides {
		if sd.Agent == "" {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].host", i), Reason: "name the agent's host (placement host) and give its address"}
		}
		if net.ParseIP(sd.Host) == nil {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].address", i), Reason: fmt.Sprintf("%q is not an IP address", sd.Host)}
		}
		if sd.Disk == "" || !filepath.IsAbs(sd.Disk) {
			return Status{}, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].disk", i), Reason: fmt.Sprintf("%q: want an absolute path", sd.Disk)}
		}
	}
	if pc.Sides[0].Agent == pc.Sides[1].Agent {
		return Status{}, &checkpoint.FieldError{Field: "sides[1].host", Reason: "both sides on one host: use single-host mode"}
	}
	b, err := json.Marshal(pc)
	if err != nil {
		return Status{}, err
	}
	ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
	defer cancel()
	if err := a.cfg.Store.CreatePair(ctx, pc.Spec.Name, b); err != nil {
		if errors.Is(err, coord.ErrExists) {
			return Status{}, fmt.Errorf("%q: %w", pc.Spec.Name, ErrExists)
		}
		return Status{}, err
	}
	// Answer once this host follows the pair (the store's watch brings it here).
	if _, ok := a.mySide(pc); ok {
		for ctx.Err() == nil {
			if r, err := a.runner(pc.Spec.Name); err == nil {
				return r.status(), nil
			}
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return Status{Name: pc.Spec.Name, State: StateStarting, Cluster: true}, nil
}

// Get returns this host's view of a pair; for a pair that runs on other hosts, the store's.
func (a *ClusterAgent) Get(name string) (Status, error) {
	if r, err := a.runner(name); err == nil {
		return r.status(), nil
	}
	pc, err := a.Config(name)
	if err != nil {
		return Status{}, err
	}
	return a.storeView(pc), nil
}

// Config returns a pair's configuration, from the store for a pair of other hosts.
func (a *ClusterAgent) Config(name string) (PairConfig, error) {
	if r, err := a.runner(name); err == nil {
		return r.config(), nil
	}
	ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
	defer cancel()
	b, err := a.cfg.Store.GetPair(ctx, name)
	if errors.Is(err, coord.ErrNotFound) {
		return PairConfig{}, fmt.Errorf("pair %q: %w", name, ErrNotFound)
	}
	if err != nil {
		return PairConfig{}, err
	}
	var pc PairConfig
	if err := json.Unmarshal(b, &pc); err != nil {
		return PairConfig{}, fmt.Errorf("pair %q in the store: %w", name, err)
	}
	return pc, nil
}

// storeView is the status of a pair this host has no side of, as the store tells it: who holds
// the lease, at which epoch, and whether its last record says COLO.
func (a *ClusterAgent) storeView(pc PairConfig) Status {
	st := Status{Name: pc.Spec.Name, Cluster: true, State: StateStopped, AutoReprotect: !pc.NoAutoReprotect,
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
	st.PrimaryHost, st.Epoch, st.State = li.Holder, li.Epoch, StateDegraded
	var rec PrimaryRecord
	if b, err := a.cfg.Store.Record(ctx, pc.Spec.Name); err == nil && json.Unmarshal(b, &rec) == nil && rec.Holder == li.Holder && rec.Colo {
		st.State, st.Generation = StateProtected, rec.Gen
		for _, sd := range pc.Sides {
			if sd.Agent != li.Holder {
				st.SecondaryHost = sd.Agent
			}
		}
	}
	return st
}

// List returns every pair: this host's own with its view, the others with the store's.
func (a *ClusterAgent) List() []Status {
	a.mu.Lock()
	var out []Status
	seen := map[string]bool{}
	for name, r := range a.runners {
		out = append(out, r.status())
		seen[name] = true
	}
	a.mu.Unlock()
	ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
	all, err := a.cfg.Store.ListPairs(ctx)
	cancel()
	if err == nil {
		for name, b := range all {
			var pc PairConfig
			if seen[name] || json.Unmarshal(b, &pc) != nil {
				continue
			}
			out = append(out, a.storeView(pc))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Delete removes the pair from the store; both agents stop their sides.
func (a *ClusterAgent) Delete(name string) error {
	ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
	defer cancel()
	if err := a.cfg.Store.DeletePair(ctx, name); err != nil {
		if errors.Is(err, coord.ErrNotFound) {
			return fmt.Errorf("pair %q: %w", name, ErrNotFound)
		}
		return err
	}
	return nil
}

// Failover asks this host's primary for a planned switchover. A forced failover is not offered
// across hosts: killing the primary does the same, through the lease.
func (a *ClusterAgent) Failover(name string, forced bool) error {
	r, err := a.local(name)
	if err != nil {
		return err
	}
	if forced {
		return fmt.Errorf("forced failover: not offered for a pair that spans two hosts (a planned one is): %w", ErrWrongState)
	}
	ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
	defer cancel()
	return r.switchover(ctx)
}

// Reprotect: a primary running alone re-protects by itself as soon as its peer is back.
func (a *ClusterAgent) Reprotect(name string) error {
	if _, err := a.local(name); err != nil {
		return err
	}
	return fmt.Errorf("reprotect: a pair that spans two hosts re-protects by itself when the peer is back: %w", ErrWrongState)
}

// SetParameters changes tunables at run time; the agent of the host that runs the protected
// primary does it (the others say which host that is).
func (a *ClusterAgent) SetParameters(ctx context.Context, name string, t checkpoint.Tunables) error {
	r, err := a.local(name)
	if err != nil {
		return err
	}
	return r.setParameters(ctx, t)
}

// Watch streams this host's view of a pair.
func (a *ClusterAgent) Watch(ctx context.Context, name string) (<-chan Event2, error) {
	r, err := a.local(name)
	if err != nil {
		return nil, err
	}
	return r.watch(ctx), nil
}
