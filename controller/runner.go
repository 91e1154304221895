package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
	"github.com/lockstepvm/lockstep/fence"
)

// runner owns one side of one pair in this agent: its policy, its QEMU, its lease, its copy of
// the migration connection. One goroutine (run) steps the policy and owns all of that state
// (etcd raft's node.go is the model: one select loop); the goroutines it starts are owned by it
// and stopped when it returns:
//   - the io goroutine runs store and peer requests in order (ioQueue, which never drops one);
//   - one worker at a time runs a long action (boot, protect, prepare, takeover, going alone)
//     and posts its result;
//   - each VM has a watcher that posts its failure signals;
//   - a heartbeat in flight posts its reply;
//   - the observer of a protected primary counts its checkpoints.
type runner struct {
	a      *Agent
	name   string
	side   Side
	holder string // the lease holder name of this side: host:side
	// peerLocal: the pair's other side runs in this agent too.
	peerLocal bool
	dir       string // the side's runtime folder (QMP socket, pid file, logs, side.json)
	log       *slog.Logger
	view      *pairView
	link      PeerLink
	backend   checkpoint.Backend
	pcp       atomic.Pointer[PairConfig] // the pair's config; replaced, never changed
	store     storeIO
	io        *ioQueue
	metrics   *pairMetrics

	inbox chan any      // results and signals for the run goroutine
	calls chan call     // API and peer requests, answered by the run goroutine
	specs chan struct{} // a new config is in pcp's successor slot
	next  atomic.Pointer[PairConfig]
	stopc chan struct{}
	// starts is the last of the operator's starts this side took (PairConfig.Starts).
	starts uint64
	// qmpVM is the VM countQMP read last, and qmpSeen what its QMP connection had counted.
	qmpVM   *checkpoint.VM
	qmpSeen checkpoint.QMPCounts
	quit    chan struct{} // closed when the loop starts to stop: nothing is posted any more
	done    chan struct{}

	fenceNext  atomic.Pointer[fence.Guard] // the newest guard for the host's fence keeper
	fenceWake  chan struct{}
	hbInFlight atomic.Bool
	lastHB     atomic.Int64 // unix nanoseconds of the last successful heartbeat exchange
	epochNow   atomic.Uint64

	// Owned by run.
	pol         *Policy
	vm          *checkpoint.VM
	vmCancel    context.CancelFunc
	held        coord.Held
	gen         checkpoint.Generation
	wasSecond   bool // the VM took over from a secondary: protect it with Reprotect
	worker      context.CancelFunc
	workerWG    sync.WaitGroup
	prepared    *prepared
	migLink     *os.File // this agent's copy of the migration connection
	obs         *checkpoint.Observation
	pendingPrep *pendingPrepare
	lastTick    time.Time
	handedOver  *handOverNote
	saved       sideState
	lastRole    Role
	guard       guardKey // what the fence keeper was last told
}

// guardKey is what the fence keeper's guard of this side depends on.
type guardKey struct {
	pid   int
	until int
	link  *os.File
}

// call is a request the run goroutine answers.
type call struct {
	ev    Event
	prep  *PrepareArgs                        // with PrepareRequest
	param bool                                // a request for the protected primary's QEMU and config
	fn    func(ctx context.Context) callReply // runs on the runner's loop, with its context
	reply chan callReply
}

type callReply struct {
	err  error
	view PeerView           // for PeerRequest
	prep chan prepareResult // for PrepareRequest
	vm   *checkpoint.VM     // for param
	pc   PairConfig         // for param
	pid  int                // for a drill: the QEMU killed, and when
	at   time.Time
	dir  string // for the console: the primary's runtime folder
}

type pendingPrepare struct {
	args PrepareArgs
	res  chan prepareResult
}

type prepareResult struct {
	res PrepareResult
	err error
}

// handOverNote remembers a hand-over this side asked for, to record the failover when the
// peer (of another host) is seen running the VM.
type handOverNote struct {
	at    time.Time
	kind  HandOverKind
	why   string
	epoch uint64
}

// Inbox messages that are not policy events.
type (
	// result is a worker's end: the policy's event and what the runner takes over.
	result struct {
		ev        Event
		vm        *checkpoint.VM
		gen       *checkpoint.Generation
		prepared  *prepared
		prep      chan prepareResult
		prepRes   PrepareResult
		wasSecond bool
		link      *os.File
		observe   *checkpoint.Observation
	}
	// leaseGot carries a granted lease with the policy's event.
	leaseGot struct {
		held coord.Held
		ev   Event
	}
	// vmSignal is a failure signal of the side's QEMU.
	vmSignal struct {
		vm  *checkpoint.VM
		sig checkpoint.Signal
	}
)

func newRunner(a *Agent, pc PairConfig, side Side, view *pairView, link PeerLink, backend checkpoint.Backend) *runner {
	holder := pc.Sides[side].Agent + ":" + side.String()
	r := &runner{
		a: a, name: pc.Spec.Name, side: side, holder: holder,
		dir: filepath.Join(a.cfg.StateDir, pc.Spec.Name, side.String()),
		log: a.log.With("pair", pc.Spec.Name, "side", side.String()), view: view, link: link, backend: backend,
		store: storeIO{st: a.cfg.Store, pair: pc.Spec.Name, holder: holder, ttl: a.cfg.LeaseTTL,
			timeout: a.cfg.HeartbeatTimeout, probe: min(a.cfg.HeartbeatTimeout, a.cfg.LeaseTTL/4)},
		io: newIOQueue(), metrics: newPairMetrics(),
		inbox: make(chan any, 64), calls: make(chan call), specs: make(chan struct{}, 1),
		stopc: make(chan struct{}), quit: make(chan struct{}), done: make(chan struct{}), fenceWake: make(chan struct{}, 1),
	}
	r.pcp.Store(&pc)
	return r
}

// config is the pair's config, safe from any goroutine.
func (r *runner) config() PairConfig { return *r.pcp.Load() }

func (r *runner) epoch() uint64 { return r.epochNow.Load() }

// localSide is this side's checkpoint.Side: runtime folder, disk, overlays.
func (r *runner) localSide() checkpoint.Side {
	sc := r.config().Sides[r.side]
	ov := filepath.Join(r.a.cfg.OverlayDir, r.name, r.side.String())
	return checkpoint.Side{Host: sc.Host, RunDir: r.dir, Disk: sc.Disk, DiskFormat: sc.DiskFormat,
		Active: filepath.Join(ov, "active.qcow2"), Hidden: filepath.Join(ov, "hidden.qcow2"), NetSocket: sc.NetSocket}
}

// do hands a request to the run goroutine and waits for its answer.
func (r *runner) do(ctx context.Context, c call) (callReply, error) {
	c.reply = make(chan callReply, 1)
	select {
	case r.calls <- c:
	case <-r.done:
		return callReply{}, fmt.Errorf("pair %q: its runner stopped: %w", r.name, ErrNotFound)
	case <-ctx.Done():
		return callReply{}, ctx.Err()
	}
	select {
	case rep := <-c.reply:
		return rep, rep.err
	case <-r.done:
		return callReply{}, fmt.Errorf("pair %q: its runner stopped: %w", r.name, ErrNotFound)
	}
}

func (r *runner) request(ctx context.Context, ev Event) error {
	_, err := r.do(ctx, call{ev: ev})
	return err
}

// stop ends the runner, once its goroutines have ended too; its QEMU runs on (a successor
// adopts it).
func (r *runner) stop() {
	select {
	case r.stopc <- struct{}{}:
	case <-r.done:
	}
	<-r.done
}

// post hands a message to the run goroutine; it gives up when ctx ends (the runner stops).
func (r *runner) post(ctx context.Context, m any) {
	select {
	case r.inbox <- m:
	case <-ctx.Done():
	case <-r.quit:
	}
}

// updateConfig brings a new config of the pair (tunables changed at run time, here or on the
// peer's agent through the store) to the run goroutine. Only the newest counts, so a slow
// runner coalesces updates instead of dropping any.
func (r *runner) updateConfig(pc PairConfig) {
	r.next.Store(&pc)
	select {
	case r.specs <- struct{}{}:
	default:
	}
}

// Peer requests: the peer's agent (in this process, or over PeerService) calls these.

func (r *runner) peerHeartbeat(ctx context.Context, v PeerView) (PeerView, error) {
	rep, err := r.do(ctx, call{ev: PeerRequest{View: v}})
	return rep.view, err
}

func (r *runner) peerPrepare(ctx context.Context, a PrepareArgs) (PrepareResult, error) {
	rep, err := r.do(ctx, call{ev: PrepareRequest{Gen: a.Gen, Epoch: a.Epoch}, prep: &a})
	if err != nil {
		return PrepareResult{}, err
	}
	select {
	case res := <-rep.prep:
		return res.res, res.err
	case <-ctx.Done():
		return PrepareResult{}, ctx.Err()
	case <-r.done:
		return PrepareResult{}, errors.New("the pair's runner stopped")
	}
}

func (r *runner) peerTearDown(ctx context.Context, epoch uint64, gen int) error {
	return r.request(ctx, TearDownRequest{Gen: gen})
}

func (r *runner) peerHandOver(ctx context.Context, epoch uint64, kind HandOverKind, why string) error {
	return r.request(ctx, HandOverRequest{Epoch: epoch, Kind: kind, Why: why})
}

func (r *runner) policyConfig() Config {
	pc := r.config()
	cfg := r.a.cfg.policyConfig(!pc.NoAutoReprotect)
	// The primary placement (side A) boots a pair that never ran.
	cfg.Preferred, cfg.Restart = r.side == SideA, pc.restart()
	return cfg
}

// abandon stops what start began for a runner whose loop never runs; its QEMU runs on.
func (r *runner) abandon() {
	close(r.quit)
	r.release()
	close(r.done)
}

// release stops the runner's goroutines and lets go of its QEMU without stopping it.
func (r *runner) release() {
	if r.worker != nil {
		r.worker()
	}
	r.stopObserver()
	if r.vmCancel != nil {
		r.vmCancel()
	}
	r.workerWG.Wait()
	if r.prepared != nil {
		r.prepared.cancel()
	}
	r.workerWG.Wait()
	if r.migLink != nil {
		r.migLink.Close()
	}
	if r.vm != nil {
		r.vm.Release()
	}
}

// run is the runner's loop.
func (r *runner) run(ctx context.Context) {
	defer close(r.done)
	ioctx, iocancel := context.WithCancel(ctx)
	var iowg sync.WaitGroup
	iowg.Add(2)
	go func() { defer iowg.Done(); r.io.run(ioctx) }()
	go func() { defer iowg.Done(); r.fenceLoop(ioctx) }()
	defer func() {
		close(r.quit)
		if r.worker != nil {
			r.worker()
		}
		iocancel()
		iowg.Wait()
		r.release()
	}()
	tick := time.NewTicker(r.a.cfg.Tick)
	defer tick.Stop()
	hb := time.NewTicker(r.a.cfg.HeartbeatInterval)
	defer hb.Stop()
	statsTick := time.NewTicker(time.Second)
	defer statsTick.Stop()
	r.lastTick = time.Now()
	r.publish(ctx)
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.stopc:
			return
		case now := <-tick.C:
			// Ticks the loop missed (it was busy, or the process was stopped) advance logical
			// time too: lease deadlines pass as they did in the store.
			n := max(1, int(now.Sub(r.lastTick)/r.a.cfg.Tick))
			r.lastTick = r.lastTick.Add(time.Duration(n) * r.a.cfg.Tick)
			if n > 2 {
				r.log.Warn("the agent missed ticks: its time jumped", "ticks", n)
			}
			r.step(ctx, Tick{N: n, Link: r.linkState()})
		case <-hb.C:
			r.heartbeat(ctx)
		case <-statsTick.C:
			r.publishStats()
		case <-r.specs:
			if pc := r.next.Swap(nil); pc != nil {
				r.setConfig(ctx, *pc)
			}
		case c := <-r.calls:
			r.answer(ctx, c)
		case m := <-r.inbox:
			r.handle(ctx, m)
		}
		r.publish(ctx)
	}
}

// setConfig takes a new config of the pair: the next protection uses its tunables, and the
// observer rates checkpoints against its delay.
//
// The operator's stop and start reach every side this way, through the store: a stop stops
// the side; a start (or a new one) asks it to start as an operator's start.
func (r *runner) setConfig(ctx context.Context, pc PairConfig) {
	cur := r.config()
	if pc.Version < cur.Version {
		return // older than what the runner has (the store's watch lags the API)
	}
	stop := pc.Stopped && !cur.Stopped
	start := !pc.Stopped && (cur.Stopped || pc.Starts != cur.Starts)
	cur.Spec.Tunables = pc.Spec.WithDefaults().Tunables
	cur.NoAutoReprotect, cur.RestartPolicy, cur.Stopped, cur.Starts, cur.Version = pc.NoAutoReprotect, pc.RestartPolicy, pc.Stopped, pc.Starts, pc.Version
	r.pcp.Store(&cur)
	if r.pol != nil {
		r.pol.SetOptions(!cur.NoAutoReprotect, cur.restart())
		switch {
		case stop:
			r.log.Info("the operator stopped the pair")
			r.step(ctx, Stop{Why: stoppedWhy})
		case start:
			r.log.Info("the operator started the pair")
			r.starts = cur.Starts
			r.step(ctx, Start{Operator: true})
		}
	}
	r.view.setConfig(cur)
	if r.obs != nil {
		r.obs.Observer.SetDelay(cur.Spec.Tunables.CheckpointDelay)
	}
}

func (r *runner) answer(ctx context.Context, c call) {
	if c.param {
		c.reply <- r.paramsTarget()
		return
	}
	if c.fn != nil {
		c.reply <- c.fn(ctx)
		return
	}
	acts, err := r.pol.Step(c.ev)
	rep := callReply{err: err}
	switch e := c.ev.(type) {
	case PeerRequest:
		if err == nil {
			rep.view = r.pol.Reply(e.View)
		}
	case PrepareRequest:
		if err == nil {
			r.pendingPrep = &pendingPrepare{args: *c.prep, res: make(chan prepareResult, 1)}
			rep.prep = r.pendingPrep.res
		}
	}
	c.reply <- rep
	if err != nil {
		r.log.Info("request refused", "request", fmt.Sprintf("%T", c.ev), "err", err)
		return
	}
	r.exec(ctx, acts)
}

func (r *runner) handle(ctx context.Context, m any) {
	switch e := m.(type) {
	case vmSignal:
		if e.vm != r.vm {
			return // about a VM that is gone already
		}
		switch e.sig.Kind {
		case checkpoint.SignalProcessExited, checkpoint.SignalQMPLost:
			r.log.Warn("local QEMU failure", "signal", e.sig.Kind)
			r.step(ctx, LocalFailed{Why: string(e.sig.Kind)})
		case checkpoint.SignalQMPTimeout:
			if r.pol.Fenced() {
				return // a frozen QEMU does not answer: that is the fence
			}
			r.log.Warn("local QEMU hangs", "signal", e.sig.Kind)
			r.step(ctx, LocalFailed{Why: string(e.sig.Kind)})
		case checkpoint.SignalColoExit:
			if e.sig.IsColoError() {
				r.log.Warn("COLO ended with an error")
				r.step(ctx, ColoLost{Why: "COLO_EXIT " + string(e.sig.Reason)})
			}
		case checkpoint.SignalMigrationFailed:
			r.log.Warn("the migration failed")
			r.step(ctx, ColoLost{Why: "migration failed"})
		}
	case leaseGot:
		prev := r.held
		r.held = e.held // the actions of this very step (the mark) need it
		r.step(ctx, e.ev)
		if r.pol.Holds() && r.pol.LeaseEpoch() != e.held.Epoch {
			r.held = prev // a late answer the policy did not take: it holds a newer lease
		}
	case migrationLink:
		if e.vm != r.vm || r.vm == nil {
			e.f.Close()
			return
		}
		if r.migLink != nil {
			r.migLink.Close()
		}
		r.migLink = e.f
	case result:
		if e.vm != nil {
			r.setVM(ctx, e.vm)
		}
		if e.gen != nil {
			r.gen = *e.gen
		}
		if e.wasSecond {
			r.wasSecond = true
		}
		if e.link != nil {
			if r.migLink != nil {
				r.migLink.Close()
			}
			r.migLink = e.link
		}
		if e.prepared != nil {
			if r.prepared != nil {
				r.prepared.cancel()
			}
			r.prepared = e.prepared
		}
		if e.observe != nil {
			r.runObserver(e.observe)
		}
		if e.prep != nil {
			var err error
			if f, ok := e.ev.(PrepareFailed); ok {
				err = errors.New(f.Err)
			}
			e.prep <- prepareResult{res: e.prepRes, err: err}
		}
		r.step(ctx, e.ev)
	case Event:
		r.step(ctx, e)
	}
}

func (r *runner) step(ctx context.Context, ev Event) {
	acts, err := r.pol.Step(ev)
	if err != nil {
		r.log.Debug("event refused", "event", fmt.Sprintf("%T", ev), "err", err)
	}
	r.exec(ctx, acts)
}

// linkState reads this agent's copy of the migration connection: whether the QEMUs still
// exchange checkpoints. Nothing flows between checkpoints, and a checkpoint comes at least
// every x-checkpoint-delay, so silence for twice that (and at least half a second more)
// means the other QEMU no longer checkpoints.
func (r *runner) linkState() LinkState {
	role := RoleSecondary
	if runsVM(r.pol.Role()) {
		role = RolePrimary
	}
	return r.linkStateAs(role)
}

// linkStateAs reads the link as a side of role reads it.
func (r *runner) linkStateAs(role Role) LinkState {
	if r.migLink == nil || r.vm == nil {
		return LinkUnknown
	}
	la, err := checkpoint.ReadLinkActivity(r.migLink)
	if err != nil {
		return LinkUnknown
	}
	if !la.Open {
		return LinkClosed
	}
	quiet := r.linkQuiet()
	since := la.SinceData
	if role == RolePrimary {
		// The primary sends the data; the secondary's replies and acknowledgements come back.
		since = min(la.SinceData, la.SinceAck)
	}
	if since > quiet {
		return LinkQuiet
	}
	return LinkActive
}

func (r *runner) setVM(ctx context.Context, vm *checkpoint.VM) {
	if r.vmCancel != nil {
		r.vmCancel()
	}
	r.vm = vm
	wctx, cancel := context.WithCancel(ctx)
	r.vmCancel = cancel
	sigs := make(chan checkpoint.Signal, 8)
	r.workerWG.Add(2)
	go func() { defer r.workerWG.Done(); checkpoint.Watch(wctx, vm, r.a.cfg.Watch, sigs) }()
	go func() {
		defer r.workerWG.Done()
		for {
			select {
			case sg := <-sigs:
				r.post(wctx, vmSignal{vm: vm, sig: sg})
			case <-wctx.Done():
				return
			}
		}
	}()
}

// dropVM forgets the VM without stopping it (it was handed to a sequence that stops it).
func (r *runner) dropVM() *checkpoint.VM {
	vm := r.vm
	if r.vmCancel != nil {
		r.vmCancel()
		r.vmCancel = nil
	}
	r.stopObserver()
	if r.prepared != nil {
		r.prepared.cancel()
		r.prepared = nil
	}
	if r.migLink != nil {
		r.migLink.Close()
		r.migLink = nil
	}
	r.vm = nil
	r.wasSecond = false
	return vm
}

func (r *runner) killVM(why string) {
	if vm := r.dropVM(); vm != nil {
		r.log.Info("killing QEMU", "pid", vm.PID(), "why", why)
		vm.Kill()
	}
}

// spawn runs a long action; the one before it, if any, is cancelled.
func (r *runner) spawn(ctx context.Context, f func(context.Context) any) {
	spawnLong(&r.worker, &r.workerWG, ctx, f, r.post)
}

// spawnLong runs one long action of a runner on its own goroutine, owned by wg, and hands its
// result to deliver. The action before it, whose cancel is in *cur, is cancelled first: a
// runner runs one long action at a time.
func spawnLong[T any](cur *context.CancelFunc, wg *sync.WaitGroup, ctx context.Context, f func(context.Context) T, deliver func(context.Context, any)) {
	if *cur != nil {
		(*cur)()
	}
	wctx, cancel := context.WithCancel(ctx)
	*cur = cancel
	wg.Add(1)
	go func() {
		defer wg.Done()
		deliver(wctx, f(wctx))
	}()
}

// heartbeat sends one heartbeat to the peer, unless one is still on its way.
func (r *runner) heartbeat(ctx context.Context) {
	if r.pol == nil || !r.hbInFlight.CompareAndSwap(false, true) {
		return
	}
	sent := r.pol.Now()
	view := r.pol.View()
	r.workerWG.Add(1)
	go func() {
		defer r.workerWG.Done()
		defer r.hbInFlight.Store(false)
		cctx, cancel := context.WithTimeout(ctx, r.a.cfg.HeartbeatTimeout)
		defer cancel()
		v, err := r.link.Heartbeat(cctx, r.name, view)
		if err != nil {
			return
		}
		r.lastHB.Store(time.Now().UnixNano())
		r.post(ctx, PeerReply{SentAt: sent, View: v})
	}()
}

// publish refreshes this side's snapshot in the pair's view, saves what a successor agent
// needs when it changed, and tells the peer at once when the role changed.
func (r *runner) publish(ctx context.Context) {
	r.countQMP()
	p := r.pol
	r.epochNow.Store(p.Epoch())
	s := sideSnap{role: p.Role(), why: p.Why(), epoch: p.Epoch(), gen: p.Generation(), colo: p.Colo(), fenced: p.Fenced(), marked: p.Marked(),
		storeOK: p.StoreOK(), peerOK: p.PeerReachable(), peer: p.Peer(), running: r.vm != nil, link: p.Link()}
	if ns := r.lastHB.Load(); ns > 0 {
		s.lastHB = time.Unix(0, ns)
	}
	if r.vm != nil {
		s.version = r.vm.Version()
	}
	r.view.update(r.side, s)
	r.persist()
	r.updateFence()
	if p.Role() != r.lastRole {
		r.log.Info("role", "from", r.lastRole, "to", p.Role(), "why", p.Why())
		r.lastRole = p.Role()
		r.heartbeat(ctx)
	}
	r.noteTakeover()
}

// noteTakeover records the failover a hand-over of ours led to, once the peer of another host
// runs the VM (a peer in this agent records its own takeover).
func (r *runner) noteTakeover() {
	h := r.handedOver
	if h == nil || r.pol.Role() != RoleIdle || !r.pol.PeerReachable() {
		return
	}
	peer := r.pol.Peer()
	if peer.Role != RolePrimary || peer.Epoch <= h.epoch {
		return
	}
	r.handedOver = nil
	if r.peerLocal {
		return
	}
	rec := &FailoverRecord{At: h.at, Why: h.why, Sequence: "hand-over to " + r.config().Sides[r.side.Other()].Agent,
		Took: time.Since(h.at), Trigger: triggerOf(h.kind)}
	r.view.failover(rec)
}

// countQMP adds to the metrics what the side's QMP connection refused or timed out since it
// was last read (a new QEMU's connection counts from zero).
func (r *runner) countQMP() {
	if r.vm != r.qmpVM {
		r.qmpVM, r.qmpSeen = r.vm, checkpoint.QMPCounts{}
	}
	if r.vm == nil {
		return
	}
	st := r.vm.QMPCounts()
	if st != r.qmpSeen {
		r.metrics.qmp(st.Refused-r.qmpSeen.Refused, st.Timeouts-r.qmpSeen.Timeouts)
		r.qmpSeen = st
	}
}

func (r *runner) publishStats() {
	if r.obs == nil {
		return
	}
	r.view.stats(r.side, r.obs.Observer.Stats())
}

// runObserver runs the observation of the primary's checkpoints until the next one or
// stopObserver.
func (r *runner) runObserver(o *checkpoint.Observation) {
	r.stopObserver()
	o.Start(r.metrics.checkpoint)
	r.obs = o
}

func (r *runner) stopObserver() {
	if r.obs != nil {
		r.obs.Stop()
	}
	r.obs = nil
}

// paramsTarget answers a request for the protected primary's QEMU and the pair's config: only
// the side that runs the protected primary can change tunables at run time.
func (r *runner) paramsTarget() callReply {
	if r.pol.Role() != RolePrimary {
		if r.pol.Peer().Role == RolePrimary {
			return callReply{err: fmt.Errorf("set parameters: host %s runs the primary; ask its agent: %w", r.config().Sides[r.side.Other()].Agent, ErrWrongState)}
		}
		return callReply{err: fmt.Errorf("set parameters: this side is %s, not the primary: %w", r.pol.Role(), ErrWrongState)}
	}
	if !r.pol.Colo() || r.vm == nil {
		return callReply{err: fmt.Errorf("set parameters: the pair is not protected (the primary runs alone); parameters apply to a protected pair: %w", ErrWrongState)}
	}
	return callReply{vm: r.vm, pc: r.config()}
}
