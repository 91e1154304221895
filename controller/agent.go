package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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
	// DiskFormat is the format of Disk: "raw" (when empty) or "qcow2".
	DiskFormat string `json:"disk_format,omitempty"`
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
	// RestartPolicy is RestartAlways (the default, "") or RestartNever: whether the agent boots
	// the VM again, cold, when its only running copy dies.
	RestartPolicy string `json:"restart_policy,omitempty"`
	// Stopped: the operator stopped the pair (its QEMUs are gone, its disks kept); nothing
	// boots it until the operator starts it.
	Stopped bool `json:"stopped,omitempty"`
	// Starts counts the operator's starts: each one asks every side to start the pair again
	// (a failed pair too, which is not stopped).
	Starts uint64 `json:"starts,omitempty"`
	// Version counts the changes of the pair's config after its create (Agent.modify): a
	// runner takes no older config than the one it has, however late the store's watch
	// brings it.
	Version uint64 `json:"version,omitempty"`
}

// The restart policies of a pair.
const (
	RestartAlways = "always"
	RestartNever  = "never"
)

// restart reports whether the pair's restart policy boots its VM again.
func (pc PairConfig) restart() bool { return pc.RestartPolicy != RestartNever }

// AgentConfig configures an agent.
type AgentConfig struct {
	// Host is this agent's name, as pair placements name it.
	Host string
	// PeerAddr is where this agent serves PeerService (host:port), published in the store for
	// the agents of other hosts; empty when it runs no pair that spans two hosts.
	PeerAddr string
	// PeerCreds secure the connections to peer agents (insecure when nil; PeerTLS's client
	// credentials when PeerTLS is set).
	PeerCreds credentials.TransportCredentials
	// PeerTLS, when set, is this host's certificate: the peer link is mutual TLS, requests are
	// taken only from the agents of the pairs' peer hosts (peerauth.go), and this host's QEMUs
	// present it on encrypted replication channels (replicationtls.go).
	PeerTLS *PeerTLS
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
	if c.PeerCreds == nil && c.PeerTLS != nil {
		c.PeerCreds = c.PeerTLS.ClientCredentials()
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
		Restart: true,
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
	auth   peerAuth

	mu    sync.Mutex
	pairs map[string]*pairRun
	// deleted names the pairs this agent deleted whose deletion the store's watch has not
	// reported yet: an older event of theirs still on its way must not start them again.
	deleted map[string]bool
	// dropping has, for each pair being dropped, a channel closed once its runners are gone
	// and its folder removed.
	dropping map[string]chan struct{}
}

// pairRun is a pair as this agent runs it: the runners of its local sides and its view.
type pairRun struct {
	cfg     PairConfig
	view    *pairView
	runners [2]*runner // nil for a side of another host
	done    chan struct{}
	console atomic.Bool // a console is attached
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
	a := &Agent{cfg: cfg, log: cfg.Log, ctx: ctx, cancel: cancel, pairs: map[string]*pairRun{}, deleted: map[string]bool{}, dropping: map[string]chan struct{}{},
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
			a.ensure(pc, false)
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
			a.mu.Lock()
			delete(a.deleted, ev.Name)
			a.mu.Unlock()
			a.drop(ev.Name)
			continue
		}
		pc, err := decodePair(ev.Name, ev.Value)
		if err != nil {
			a.log.Error("unreadable pair in the store", "pair", ev.Name, "err", err)
			continue
		}
		a.ensure(pc, true)
	}
}

// localSides says which sides of pc this agent runs.
func (a *Agent) localSides(pc PairConfig) [2]bool {
	return [2]bool{pc.Sides[0].Agent == a.cfg.Host, pc.Sides[1].Agent == a.cfg.Host}
}

// ensure runs the local sides of pc, or brings their runners the new config. From the
// store's watch (watched), a pair this agent deleted is left alone: the event predates the
// deletion.
func (a *Agent) ensure(pc PairConfig, watched bool) {
	local := a.localSides(pc)
	if !local[0] && !local[1] {
		return
	}
	pc.Spec = pc.Spec.WithDefaults()
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		// A pair of the same name still being dropped goes first: its folder is removed.
		ch := a.dropping[pc.Spec.Name]
		if ch == nil {
			break
		}
		a.mu.Unlock()
		<-ch
		a.mu.Lock()
	}
	if watched && a.deleted[pc.Spec.Name] {
		return
	}
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
//
// Dropped twice at once (the API's delete and the store's watch), the second waits for the
// first.
func (a *Agent) drop(name string) {
	a.mu.Lock()
	pr, ok := a.pairs[name]
	if !ok {
		ch := a.dropping[name]
		a.mu.Unlock()
		if ch != nil {
			<-ch
		}
		return
	}
	delete(a.pairs, name)
	dropped := make(chan struct{})
	a.dropping[name] = dropped
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.dropping, name)
		a.mu.Unlock()
		close(dropped)
	}()
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
