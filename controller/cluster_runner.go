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
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
	"github.com/lockstepvm/lockstep/qmp"
)

// hostRunner owns this host's side of one pair that spans two hosts: its HostPolicy, its QEMU,
// its lease. One goroutine (run) steps the policy; store requests and peer calls run in order
// on the io goroutine; long QMP sequences run on a worker.
type hostRunner struct {
	a      *ClusterAgent
	pcp    atomic.Pointer[PairConfig] // the pair's config; replaced (never changed) when tunables change
	name   string
	side   Side
	dir    string
	log    *slog.Logger
	pol    *HostPolicy
	events chan HostEvent
	calls  chan hostCall
	io     chan func(context.Context)
	stopc  chan chan struct{}
	done   chan struct{}

	// Owned by run.
	vm          *checkpoint.VM
	vmCancel    context.CancelFunc
	wasSecond   bool // the VM took over from a secondary: it still has the rewriter
	held        coord.Held
	gen         checkpoint.Generation
	worker      context.CancelFunc
	workerWG    sync.WaitGroup
	prepared    *prepared
	hbInFlight  atomic.Bool
	lastHB      atomic.Int64    // unix nanoseconds of the last successful exchange
	pendingPrep *pendingPrepare // the PrepareSecondary being served, for ActHPrepare
	metrics     *pairMetrics    // cumulative, across generations and roles

	pairView // status, watch streams, the observer
}

type hostCall struct {
	ev    HostEvent
	reply chan hostReply
	req   *pb.PrepareSecondaryRequest // with HPrepare: what the peer asked for
}

// pendingPrepare is a PrepareSecondary request and where its answer goes.
type pendingPrepare struct {
	req *pb.PrepareSecondaryRequest
	res chan prepareResult
}

type hostReply struct {
	err  error
	vm   *checkpoint.VM // for hParams: the protected primary's QEMU
	pc   PairConfig     // for hParams: the pair as this runner has it
	view PeerView
	prep chan prepareResult // for HPrepare: the prepared secondary, once ready
}

type prepareResult struct {
	resp *pb.PrepareSecondaryResponse
	err  error
}

// prepared is a secondary this host readied for its peer's primary.
type prepared struct {
	gen    checkpoint.Generation
	ln     net.Listener
	cancel context.CancelFunc
	// mig is this agent's copy of the migration connection once accepted: its TCP state tells
	// a dead primary (closed) from a hung or unreachable one (established).
	mig atomic.Pointer[os.File]
}

// primaryGone reports whether the primary's end of the migration connection is closed. A
// takeover then needs no yank (it is for a primary that hangs), and is better without one:
// measured in two-host mode (QEMU 11.1.3, TCG, host A's agent and QEMU killed), the
// survivor's guest crashed after the takeover in 6 of 18 runs with the yank and in 2 of 17
// without it. The crash itself, a guest kernel oops, is the known intermittent defect; the
// yank is not its only trigger.
func (p *prepared) primaryGone() bool {
	f := p.mig.Load()
	if f == nil {
		return false
	}
	sc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	var info *unix.TCPInfo
	var ierr error
	if err := sc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || ierr != nil {
		return false
	}
	return info.State != tcpEstablished
}

// tcpEstablished is the kernel's TCP_ESTABLISHED state in tcp_info.
const tcpEstablished = 1

// hostVMEvent carries a worker's result with the VM it started.
type hostVMEvent struct {
	ev        HostEvent
	vm        *checkpoint.VM
	gen       *checkpoint.Generation
	prepared  *prepared
	prep      chan prepareResult
	prepResp  *pb.PrepareSecondaryResponse
	wasSecond bool
}

func (hostVMEvent) isHostEvent() {}

// localSignal is a failure signal of the local QEMU, with the VM it is about.
// hParams asks the run goroutine for the protected primary's QEMU and the pair's config, to
// change tunables at run time; it is not a policy event.
type hParams struct{}

func (hParams) isHostEvent() {}

// specUpdate brings a pair's new config (tunables changed at run time) to the run goroutine.
type specUpdate struct{ pc PairConfig }

func (specUpdate) isHostEvent() {}

type localSignal struct {
	vm   *checkpoint.VM
	kind SignalKind
}

func (localSignal) isHostEvent() {}

func newHostRunner(a *ClusterAgent, pc PairConfig, side Side) (*hostRunner, error) {
	pc.Spec = pc.Spec.WithDefaults()
	pol, err := NewHostPolicy(a.cfg.hostConfig(!pc.NoAutoReprotect), a.cfg.Host)
	if err != nil {
		return nil, err
	}
	r := &hostRunner{
		a: a, name: pc.Spec.Name, side: side, dir: filepath.Join(a.cfg.StateDir, pc.Spec.Name),
		log: a.log.With("pair", pc.Spec.Name, "host", a.cfg.Host), pol: pol,
		events: make(chan HostEvent, 64), calls: make(chan hostCall), io: make(chan func(context.Context), 64),
		stopc: make(chan chan struct{}), done: make(chan struct{}),
		pairView: newPairView(Status{Name: pc.Spec.Name, State: StateStopped, Cluster: true, AutoReprotect: !pc.NoAutoReprotect}),
		metrics:  newPairMetrics(),
	}
	r.pcp.Store(&pc)
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		return nil, err
	}
	return r, nil
}

// config is the pair's config, safe from any goroutine.
func (r *hostRunner) config() PairConfig { return *r.pcp.Load() }

func (r *hostRunner) peerAgent() string { return r.config().Sides[r.side.Other()].Agent }

func (r *hostRunner) localSide() checkpoint.Side {
	sc := r.config().Sides[r.side]
	ov := filepath.Join(r.a.cfg.OverlayDir, r.name)
	return checkpoint.Side{Host: sc.Host, RunDir: filepath.Join(r.dir, "qemu"), Disk: sc.Disk,
		Active: filepath.Join(ov, "active.qcow2"), Hidden: filepath.Join(ov, "hidden.qcow2"), NetSocket: sc.NetSocket}
}

// call hands an event to the run goroutine and waits for the policy's answer.
func (r *hostRunner) call(ev HostEvent) (hostReply, error) { return r.callWith(hostCall{ev: ev}) }

func (r *hostRunner) callWith(c hostCall) (hostReply, error) {
	reply := make(chan hostReply, 1)
	c.reply = reply
	select {
	case r.calls <- c:
	case <-r.done:
		return hostReply{}, errors.New("the pair's runner stopped")
	}
	rep := <-reply
	return rep, rep.err
}

func (r *hostRunner) stop() {
	done := make(chan struct{})
	select {
	case r.stopc <- done:
		<-done
	case <-r.done:
	}
}

func (r *hostRunner) post(ctx context.Context, ev HostEvent) {
	select {
	case r.events <- ev:
	case <-ctx.Done():
	}
}

func (r *hostRunner) run(ctx context.Context) {
	defer close(r.done)
	ioctx, iocancel := context.WithCancel(ctx)
	var iowg sync.WaitGroup
	iowg.Add(1)
	go func() { // the io goroutine: store requests and peer calls, in order
		defer iowg.Done()
		for {
			select {
			case f := <-r.io:
				f(ioctx)
			case <-ioctx.Done():
				return
			}
		}
	}()
	tick := time.NewTicker(r.a.cfg.Tick)
	defer tick.Stop()
	hb := time.NewTicker(r.a.cfg.HeartbeatInterval)
	defer hb.Stop()
	statsTick := time.NewTicker(time.Second)
	defer statsTick.Stop()
	defer func() {
		if r.worker != nil {
			r.worker()
		}
		r.workerWG.Wait()
		iocancel()
		iowg.Wait()
		r.stopObserver()
		if r.vmCancel != nil {
			r.vmCancel()
		}
		if r.prepared != nil {
			r.prepared.cancel()
		}
		if r.vm != nil {
			r.vm.Release()
		}
		r.closeWatchers()
	}()
	if r.side == SideA {
		r.step(ctx, HStart{})
	}
	r.publish()
	for {
		select {
		case <-ctx.Done():
			return
		case done := <-r.stopc:
			defer close(done)
			return
		case <-tick.C:
			r.step(ctx, HTick{})
		case <-hb.C:
			r.heartbeat(ctx)
		case <-statsTick.C:
			r.publishStats()
		case c := <-r.calls:
			if _, ok := c.ev.(hParams); ok {
				c.reply <- r.paramsTarget()
				continue
			}
			rep := hostReply{}
			acts, err := r.pol.Step(c.ev)
			rep.err = err
			switch e := c.ev.(type) {
			case HPeerRequest:
				rep.view = r.pol.View()
				rep.view.Confirm = r.pol.Confirm(e.View)
			case HPrepare:
				if err == nil {
					r.pendingPrep = &pendingPrepare{req: c.req, res: make(chan prepareResult, 1)}
					rep.prep = r.pendingPrep.res
				}
			}
			c.reply <- rep
			r.exec(ctx, acts)
		case ev := <-r.events:
			r.handle(ctx, ev)
		}
		r.publish()
	}
}

func (r *hostRunner) handle(ctx context.Context, ev HostEvent) {
	switch e := ev.(type) {
	case specUpdate:
		// Tunables changed at run time (here or by the peer's agent, through the store): the
		// next protection uses them, and the observer rates checkpoints against the new delay.
		pc := r.config()
		pc.Spec.Tunables = e.pc.Spec.WithDefaults().Tunables
		r.pcp.Store(&pc)
		r.setObserverDelay(pc.Spec.Tunables.CheckpointDelay)
		return
	case localSignal:
		if e.vm != r.vm {
			return // about a VM that is gone already
		}
		if r.pol.Fenced() && e.kind == SigQMPTimeout {
			return // a frozen QEMU does not answer: that is the fence
		}
		r.log.Warn("local QEMU failure", "signal", e.kind)
		r.step(ctx, HLocalFailed{Why: string(e.kind)})
	case leaseGot:
		r.held = e.held
		r.step(ctx, e.ev)
	case hostVMEvent:
		if e.vm != nil {
			r.setVM(ctx, e.vm)
		}
		if e.gen != nil {
			r.gen = *e.gen
		}
		if e.wasSecond {
			r.wasSecond = true
		}
		if e.prepared != nil {
			if r.prepared != nil {
				r.prepared.cancel()
			}
			r.prepared = e.prepared
		}
		if e.prep != nil {
			e.prep <- prepareResult{resp: e.prepResp, err: errIf(e.ev)}
		}
		r.step(ctx, e.ev)
	default:
		r.step(ctx, ev)
	}
}

func errIf(ev HostEvent) error {
	if f, ok := ev.(HPrepareFailed); ok {
		return errors.New(f.Err)
	}
	return nil
}

func (r *hostRunner) step(ctx context.Context, ev HostEvent) {
	acts, err := r.pol.Step(ev)
	if err != nil {
		r.log.Debug("event refused", "event", fmt.Sprintf("%T", ev), "err", err)
	}
	r.exec(ctx, acts)
}

func (r *hostRunner) setVM(ctx context.Context, vm *checkpoint.VM) {
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
				kind, ok := signalKind(sg)
				if !ok || kind == SigColoExitError || kind == SigMigrationFailed {
					continue // the link to the peer: heartbeats and the policy decide
				}
				r.post(wctx, localSignal{vm: vm, kind: kind})
			case <-wctx.Done():
				return
			}
		}
	}()
}

func (r *hostRunner) killVM(why string) {
	if r.vmCancel != nil {
		r.vmCancel()
		r.vmCancel = nil
	}
	r.stopObserver()
	if r.prepared != nil {
		r.prepared.cancel()
		r.prepared = nil
	}
	if r.vm != nil {
		r.log.Info("killing QEMU", "pid", r.vm.PID(), "why", why)
		r.vm.Kill()
		r.vm = nil
	}
	r.wasSecond = false
}

// spawn runs a long action; the one before it, if any, is cancelled.
func (r *hostRunner) spawn(ctx context.Context, f func(context.Context) HostEvent) {
	spawnLong(&r.worker, &r.workerWG, ctx, f, r.post)
}

// queue runs f on the io goroutine, after everything queued before it.
func (r *hostRunner) queue(f func(context.Context)) {
	select {
	case r.io <- f:
	default:
		r.log.Warn("io queue full: dropping a store or peer request")
	}
}

func (r *hostRunner) storeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, r.a.cfg.HeartbeatTimeout)
}

// probeCtx bounds renewals and probes more tightly: a secondary must learn that the store is
// gone, and confirm so, before its primary's lease deadline freezes the primary.
func (r *hostRunner) probeCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, min(r.a.cfg.HeartbeatTimeout, r.a.cfg.LeaseTTL/4))
}

func (r *hostRunner) storeEvent(err error) HostEvent {
	if errors.Is(err, coord.ErrLeaseLost) {
		return HLeaseLost{}
	}
	return HStoreDown{}
}

func (r *hostRunner) exec(ctx context.Context, acts []HostAction) {
	st := r.a.cfg.Store
	for _, act := range acts {
		r.log.Info("action", "action", fmt.Sprintf("%T%+v", act, act))
		switch a := act.(type) {
		case ActHAcquire:
			r.queue(func(ctx context.Context) {
				cctx, cancel := r.storeCtx(ctx)
				defer cancel()
				h, err := st.Acquire(cctx, r.name, r.a.cfg.Host, r.a.cfg.LeaseTTL)
				var he *coord.HeldError
				switch {
				case err == nil:
					var prev PrimaryRecord
					b, rerr := st.Record(cctx, r.name)
					if rerr != nil {
						// Without the record no decision is safe: give the lease back.
						_ = st.Release(cctx, h)
						r.post(ctx, HStoreDown{})
						return
					}
					if len(b) > 0 {
						_ = json.Unmarshal(b, &prev)
					}
					r.post(ctx, leaseGot{held: h, ev: HLeaseAcquired{Epoch: h.Epoch, SentAt: a.SentAt, Prev: prev}})
				case errors.As(err, &he):
					r.post(ctx, HLeaseHeld{Holder: LeaseHolder{Holder: he.LeaseInfo.Holder, Epoch: he.LeaseInfo.Epoch}})
				default:
					r.post(ctx, HStoreDown{})
				}
			})
		case ActHRenew:
			h := r.held
			r.queue(func(ctx context.Context) {
				cctx, cancel := r.probeCtx(ctx)
				defer cancel()
				if err := st.Renew(cctx, h); err != nil {
					r.post(ctx, r.storeEvent(err))
					return
				}
				r.post(ctx, HLeaseRenewed(a))
			})
		case ActHRelease:
			h := r.held
			r.queue(func(ctx context.Context) {
				cctx, cancel := r.storeCtx(ctx)
				defer cancel()
				if h.Epoch == a.Epoch {
					if err := st.Release(cctx, h); err != nil {
						r.log.Warn("releasing the lease", "err", err)
					}
				}
			})
		case ActHProbeStore:
			r.queue(func(ctx context.Context) {
				cctx, cancel := r.probeCtx(ctx)
				defer cancel()
				li, err := st.Current(cctx, r.name)
				if err != nil {
					r.post(ctx, HStoreDown{})
					return
				}
				r.post(ctx, HStoreOK{Holder: LeaseHolder{Holder: li.Holder, Epoch: li.Epoch}})
			})
		case ActHMark:
			h := r.held
			r.queue(func(ctx context.Context) {
				if err := r.mark(ctx, h, a.Rec); err == nil {
					r.post(ctx, HMarked(a))
				}
			})
		case ActHFence:
			if r.vm != nil {
				r.log.Warn("fencing: freezing QEMU", "pid", r.vm.PID(), "why", a.Why)
				_ = r.vm.Signal(syscall.SIGSTOP)
			}
		case ActHUnfence:
			if r.vm != nil {
				r.log.Info("unfencing: resuming QEMU", "pid", r.vm.PID())
				_ = r.vm.Signal(syscall.SIGCONT)
			}
		case ActHKill:
			r.killVM(a.Why)
		case ActHBoot:
			r.spawn(ctx, func(ctx context.Context) HostEvent {
				vm, err := checkpoint.Launch(ctx, checkpoint.LaunchConfig{Spec: r.config().Spec, Role: checkpoint.RolePrimary, Side: r.localSide(), Log: r.log, Start: r.a.spawn.start})
				if err != nil {
					return HBootFailed{Err: err.Error()}
				}
				return hostVMEvent{ev: HBooted{}, vm: vm}
			})
		case ActHProtect:
			vm, reprotect := r.vm, r.wasSecond
			r.stopObserver()
			r.spawn(ctx, func(ctx context.Context) HostEvent { return r.protect(ctx, vm, a, reprotect) })
		case ActHPrepare:
			prep := r.pendingPrep
			r.pendingPrep = nil
			r.killVM("a new secondary")
			r.spawn(ctx, func(ctx context.Context) HostEvent { return r.prepare(ctx, a.Gen, prep) })
		case ActHTakeOver:
			vm, h, yank := r.vm, r.held, a.Yank
			if r.prepared != nil {
				if yank && r.prepared.primaryGone() {
					r.log.Info("the primary's migration connection is closed: taking over without a yank")
					yank = false
				}
				r.prepared.cancel()
				r.prepared = nil
			}
			r.spawn(ctx, func(ctx context.Context) HostEvent {
				if err := r.mark(ctx, h, a.Rec); err != nil {
					return HTakeoverFailed{Err: err.Error(), StoreDown: true}
				}
				if vm == nil {
					return HTakeoverFailed{Err: "no secondary QEMU"}
				}
				t0 := time.Now()
				took, err := checkpoint.FailoverAsSecondary(vm.QMP, yank).Run(ctx, r.log, r.progress)
				r.recordFailover(t0, a.Why, "failover-as-secondary", took, err)
				if err != nil {
					return HTakeoverFailed{Err: err.Error()}
				}
				return hostVMEvent{ev: HTakeoverDone{}, wasSecond: true}
			})
		case ActHGoAlone:
			vm, h, g := r.vm, r.held, r.gen
			r.stopObserver()
			r.spawn(ctx, func(ctx context.Context) HostEvent {
				if err := r.mark(ctx, h, a.Rec); err != nil {
					return HAloneFailed{Err: err.Error(), StoreDown: true}
				}
				if vm == nil {
					return HAloneFailed{Err: "no primary QEMU"}
				}
				seq := checkpoint.FailoverAsPrimary(vm.QMP, g)
				if a.Yank {
					seq = checkpoint.FailoverAsPrimaryYank(vm.QMP, g)
				}
				t0 := time.Now()
				took, err := seq.Run(ctx, r.log, r.progress)
				r.recordFailover(t0, a.Why, seq.Name, took, err)
				if err != nil {
					return HAloneFailed{Err: err.Error()}
				}
				return HAloneDone{}
			})
		case ActHSwitchover:
			vm := r.vm
			r.vm = nil
			if r.vmCancel != nil {
				r.vmCancel()
				r.vmCancel = nil
			}
			r.stopObserver()
			delay := uint32(r.config().Spec.Tunables.CheckpointDelay / time.Millisecond)
			r.queue(func(ctx context.Context) {
				if vm == nil {
					return
				}
				// Setting the delay during COLO starts a checkpoint at once: what colo-compare
				// holds is released, and the secondary has all the primary has.
				sub := vm.QMP.Subscribe(qmp.EventResume)
				cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				if err := vm.QMP.MigrateSetParameters(cctx, qmp.MigrationParameters{XCheckpointDelay: &delay}); err == nil {
					_, _ = sub.Next(cctx)
				}
				cancel()
				sub.Close()
				vm.Kill()
			})
		case ActHHandOver:
			peer, epoch := r.peerAgent(), a.Epoch
			r.queue(func(ctx context.Context) {
				cctx, cancel := context.WithTimeout(ctx, r.a.cfg.HeartbeatTimeout)
				defer cancel()
				c, err := r.a.peer(cctx, peer)
				if err == nil {
					_, err = pb.NewPeerServiceClient(c).HandOver(cctx, &pb.HandOverRequest{PairName: r.name, Epoch: epoch, Reason: pb.HandOverReason_HAND_OVER_REASON_PRIMARY_FAILED, Detail: a.Why})
				}
				if err != nil {
					r.log.Warn("hand-over not delivered; the peer will see it in heartbeats", "err", err)
				}
			})
		case ActHTearDownPeer:
			peer, epoch := r.peerAgent(), r.pol.Epoch()
			r.queue(func(ctx context.Context) {
				cctx, cancel := context.WithTimeout(ctx, time.Second)
				defer cancel()
				if c, err := r.a.peer(cctx, peer); err == nil {
					_, _ = pb.NewPeerServiceClient(c).TearDownSecondary(cctx, &pb.TearDownSecondaryRequest{PairName: r.name, Epoch: epoch, Generation: uint64(a.Gen), Reason: "protection failed"})
				}
			})
		}
	}
}

// leaseGot carries a granted lease to the run goroutine with the policy's event.
type leaseGot struct {
	held coord.Held
	ev   HLeaseAcquired
}

func (leaseGot) isHostEvent() {}

func (r *hostRunner) mark(ctx context.Context, h coord.Held, rec PrimaryRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, r.a.cfg.HeartbeatTimeout)
	defer cancel()
	if h.Epoch != rec.Epoch {
		return fmt.Errorf("mark at epoch %d with the lease of epoch %d: %w", rec.Epoch, h.Epoch, coord.ErrLeaseLost)
	}
	return r.a.cfg.Store.Mark(cctx, h, b)
}

func (r *hostRunner) recordFailover(t0 time.Time, why, seq string, took time.Duration, err error) {
	rec := &FailoverRecord{At: t0, Why: why, Sequence: seq, Took: took, Trigger: pb.FailoverTrigger_FAILOVER_TRIGGER_AUTOMATIC}
	if err != nil {
		var se *checkpoint.StepError
		if errors.As(err, &se) {
			rec.FailedStep = se.Step
		}
		rec.Error = err.Error()
	}
	r.mu.Lock()
	r.snap.LastFailover = rec
	r.snap.Failovers++
	r.mu.Unlock()
	r.broadcast(Event2{Kind: EventFailover, Time: time.Now(), Failover: rec})
}

// protect asks the peer for a secondary and runs the primary's half of the protection.
func (r *hostRunner) protect(ctx context.Context, prim *checkpoint.VM, a ActHProtect, reprotect bool) HostEvent {
	fail := func(err error) HostEvent { return HProtectFailed{Gen: a.Gen, Err: err.Error()} }
	if prim == nil {
		return fail(errors.New("no primary QEMU"))
	}
	pc := r.config() // one snapshot: tunables may change meanwhile
	if !reprotect {
		if err := settleBoot(ctx, r.log, r.progress, pc.Spec, prim.Started(), prim.Exited()); err != nil {
			return fail(err)
		}
	}
	ps := r.localSide()
	ports, err := freeTCPPorts(ps.Host, 4)
	if err != nil {
		return fail(err)
	}
	version, err := checkpoint.QEMUVersion(ctx, prim.QMP)
	if err != nil {
		return fail(err)
	}
	pctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	c, err := r.a.peer(pctx, r.peerAgent())
	if err != nil {
		return fail(fmt.Errorf("peer %s: %w", r.peerAgent(), err))
	}
	resp, err := pb.NewPeerServiceClient(c).PrepareSecondary(pctx, &pb.PrepareSecondaryRequest{
		PairName: r.name, Epoch: a.Epoch, Generation: uint64(a.Gen), Spec: PairSpecToProto(pc), PrimaryHost: r.a.cfg.Host,
		PrimaryAddress: ps.Host, PrimaryQemuVersion: version, ResyncDisk: true,
		Ports: &pb.ProtectionPorts{Mirror: uint32(ports[0]), Compare: uint32(ports[1])},
	})
	if err != nil {
		return fail(fmt.Errorf("the peer could not prepare a secondary: %w", err))
	}
	g := checkpoint.Generation{N: a.Gen, PrimaryHost: ps.Host, SecondaryHost: resp.GetSecondaryAddress(),
		Ports: checkpoint.Ports{NBD: int(resp.GetPorts().GetNbd()), Mirror: ports[0], Compare: ports[1], CompareIn: ports[2], CompareOut: ports[3]}}
	migAddr := net.JoinHostPort(resp.GetSecondaryAddress(), fmt.Sprint(resp.GetPorts().GetMigration()))
	obs := checkpoint.NewObserver(pc.Spec.Tunables.CheckpointDelay)
	obs.OnCheckpoint(r.metrics.checkpoint)
	cfg := checkpoint.ProtectConfig{
		Spec: pc.Spec, Gen: g, Primary: prim.QMP, SecondaryVersion: resp.GetSecondaryQemuVersion(),
		DialMigration: dialLink(migAddr, obs),
		OnResync:      r.resync,
	}
	sub, err := runProtection(ctx, r.log, r.progress, cfg, obs, reprotect)
	if err != nil {
		return fail(err)
	}
	r.runObserver(obs, sub)
	return hostVMEvent{ev: HProtected{Gen: a.Gen}, gen: &g}
}

// prepare starts a secondary for the peer's primary: its QEMU waits for the migration stream,
// which this agent accepts and hands to it, so that both ends have TCP_NODELAY.
func (r *hostRunner) prepare(ctx context.Context, gen int, pp *pendingPrepare) HostEvent {
	if pp == nil || pp.req == nil {
		return hostVMEvent{ev: HPrepareFailed{Gen: gen, Err: "no prepare request"}}
	}
	req, res := pp.req, pp.res
	fail := func(err error) HostEvent {
		return hostVMEvent{ev: HPrepareFailed{Gen: gen, Err: err.Error()}, prep: res}
	}
	ss := r.localSide()
	ports, err := freeTCPPorts(ss.Host, 3)
	if err != nil {
		return fail(err)
	}
	g := checkpoint.Generation{N: gen, PrimaryHost: req.GetPrimaryAddress(), SecondaryHost: ss.Host,
		Ports: checkpoint.Ports{NBD: ports[0], Mirror: int(req.GetPorts().GetMirror()), Compare: int(req.GetPorts().GetCompare()),
			CompareIn: ports[1], CompareOut: ports[2]}} // CompareIn/Out are the primary's own; unused here
	if err := ensureDisk(ss.Disk, r.config().Spec.DiskSize); err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(filepath.Dir(ss.Active), 0o700); err != nil {
		return fail(err)
	}
	vm, err := checkpoint.Launch(ctx, checkpoint.LaunchConfig{Spec: r.config().Spec, Role: checkpoint.RoleSecondary, Side: ss, PrimaryHost: g.PrimaryHost, Ports: g.Ports, Log: r.log, Start: r.a.spawn.start})
	if err != nil {
		return fail(err)
	}
	if _, err := checkpoint.PrepareSecondary(vm.QMP, g).Run(ctx, r.log, r.progress); err != nil {
		vm.Kill()
		return fail(err)
	}
	version, err := checkpoint.QEMUVersion(ctx, vm.QMP)
	if err != nil {
		vm.Kill()
		return fail(err)
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(ss.Host, "0"))
	if err != nil {
		vm.Kill()
		return fail(err)
	}
	pctx, cancel := context.WithCancel(r.a.ctx)
	p := &prepared{gen: g, ln: ln}
	p.cancel = func() {
		cancel()
		ln.Close()
		if f := p.mig.Swap(nil); f != nil {
			f.Close()
		}
	}
	r.workerWG.Add(1)
	go func() { // accepts the one migration connection of this generation
		defer r.workerWG.Done()
		defer ln.Close()
		stop := context.AfterFunc(pctx, func() { ln.Close() }) // a cancelled secondary stops waiting
		defer stop()
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		f, err := conn.(*net.TCPConn).File()
		if err != nil {
			return
		}
		defer f.Close()
		if keep, err := conn.(*net.TCPConn).File(); err == nil {
			p.mig.Store(keep)
			if pctx.Err() != nil { // cancelled meanwhile: nobody else will close it
				if f := p.mig.Swap(nil); f != nil {
					f.Close()
				}
			}
		}
		ictx, icancel := context.WithTimeout(pctx, 30*time.Second)
		defer icancel()
		if err := checkpoint.IncomingMigration(ictx, vm.QMP, g, f); err != nil {
			r.log.Error("handing the migration connection to the secondary", "err", err)
		}
	}()
	resp := &pb.PrepareSecondaryResponse{SecondaryAddress: ss.Host, SecondaryQemuVersion: version,
		Ports: &pb.ProtectionPorts{Migration: uint32(ln.Addr().(*net.TCPAddr).Port), Nbd: uint32(ports[0]), Mirror: req.GetPorts().GetMirror(), Compare: req.GetPorts().GetCompare()}}
	return hostVMEvent{ev: HPrepared{Gen: gen}, vm: vm, prepared: p, prep: res, prepResp: resp}
}

// heartbeat sends one heartbeat to the peer, unless one is still on its way.
func (r *hostRunner) heartbeat(ctx context.Context) {
	if !r.hbInFlight.CompareAndSwap(false, true) {
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
		c, err := r.a.peer(cctx, r.peerAgent())
		if err != nil {
			return
		}
		resp, err := pb.NewPeerServiceClient(c).Heartbeat(cctx, &pb.HeartbeatRequest{
			PairName: r.name, Epoch: view.Epoch, Sender: viewToProto(r.a.cfg.Host, view), SendTime: timestamppb.Now()})
		if err != nil {
			return
		}
		r.lastHB.Store(time.Now().UnixNano())
		v := viewFromProto(resp.GetReceiver(), resp.GetEpoch())
		v.Confirm = resp.GetStoreDownConfirmation()
		r.post(ctx, HPeerReply{SentAt: sent, View: v})
	}()
}

func viewToProto(host string, v PeerView) *pb.PeerSideState {
	role := pb.Role_ROLE_NONE
	switch v.Role {
	case RolePrimary, RoleProtecting, RoleAlone, RoleTakingOver, RoleBooting:
		role = pb.Role_ROLE_PRIMARY
	case RoleJoining, RoleSecondary:
		role = pb.Role_ROLE_SECONDARY
	}
	return &pb.PeerSideState{Host: host, Role: role, StoreReachable: v.StoreOK, Generation: uint64(v.Gen),
		PolicyRole: string(v.Role), Fenced: v.Fenced, Colo: v.Colo}
}

func viewFromProto(s *pb.PeerSideState, epoch uint64) PeerView {
	return PeerView{Role: HostRole(s.GetPolicyRole()), Epoch: epoch, Gen: int(s.GetGeneration()), Colo: s.GetColo(),
		Fenced: s.GetFenced(), StoreOK: s.GetStoreReachable()}
}

// publish refreshes the status from the policy and tells watchers of a state change.
func (r *hostRunner) publish() {
	p := r.pol
	peer := p.Peer()
	state := clusterState(p.Role(), p.Colo(), p.Fenced(), peer, p.PeerReachable())
	r.mu.Lock()
	s := &r.snap
	old := s.State
	s.State, s.Role, s.Reason, s.Epoch, s.Generation = state, p.Role(), p.Why(), p.Epoch(), p.Generation()
	s.StoreReachable, s.PeerReachable = p.StoreOK(), p.PeerReachable()
	if ns := r.lastHB.Load(); ns > 0 {
		s.LastHeartbeat = time.Unix(0, ns)
	}
	me, other := r.config().Sides[r.side], r.config().Sides[r.side.Other()]
	s.PrimaryHost, s.SecondaryHost = "", ""
	s.ColoMode = [2]string{}
	switch {
	case runsVM(p.Role()):
		s.PrimarySide, s.PrimaryHost = r.side, me.Agent
		if p.Colo() {
			s.SecondaryHost = other.Agent
		}
	case p.Role() == RoleSecondary || p.Role() == RoleJoining:
		s.PrimarySide, s.PrimaryHost, s.SecondaryHost = r.side.Other(), other.Agent, me.Agent
	case p.PeerReachable() && runsVM(peer.Role):
		s.PrimarySide, s.PrimaryHost = r.side.Other(), other.Agent
	}
	s.CheckpointTime = r.config().Spec.Tunables.CheckpointDelay
	if state != StateProtected {
		s.Checkpoints = checkpoint.Stats{}
	}
	changed := old != state
	if changed {
		s.Changed = time.Now()
	}
	why := s.Reason
	r.mu.Unlock()
	if changed {
		r.log.Info("state", "from", old, "to", state, "role", p.Role(), "reason", why)
		r.broadcast(Event2{Kind: EventState, Time: time.Now(), From: old, To: state, Reason: why})
	}
}

// clusterState is the pair's state as this host sees it.
func clusterState(role HostRole, colo, fenced bool, peer PeerView, peerOK bool) State {
	switch role {
	case RoleBooting:
		return StateStarting
	case RolePrimary:
		if fenced {
			return StateFailingOver
		}
		if colo {
			return StateProtected
		}
		return StateDegraded
	case RoleProtecting, RoleJoining:
		return StateProtecting
	case RoleSecondary:
		return StateProtected
	case RoleAlone, RoleTakingOver:
		return StateFailingOver
	case RoleFailed:
		return StateFailed
	}
	// Idle here: the peer's state, if it runs the VM.
	if peerOK {
		switch peer.Role {
		case RolePrimary:
			if peer.Colo {
				return StateProtected
			}
			return StateDegraded
		case RoleProtecting:
			return StateReprotecting
		case RoleAlone, RoleTakingOver:
			return StateFailingOver
		}
	}
	return StateStopped
}

func (r *hostRunner) watch(ctx context.Context) <-chan Event2 {
	return r.pairView.watch(ctx, r.done, &r.a.wg)
}

// switchover runs a planned switchover from this host's primary and waits until the peer runs
// the VM; the pair's failover count and last failover record it.
func (r *hostRunner) switchover(ctx context.Context) error {
	t0 := time.Now()
	if _, err := r.call(HSwitchover{}); err != nil {
		return err
	}
	peer := r.peerAgent()
	for r.status().PrimaryHost != peer {
		select {
		case <-ctx.Done():
			return fmt.Errorf("switchover: %s did not take over: %w", peer, ctx.Err())
		case <-r.done:
			return errors.New("switchover: the pair's runner stopped")
		case <-time.After(10 * time.Millisecond):
		}
	}
	rec := &FailoverRecord{At: t0, Why: "planned switchover to " + peer, Sequence: "planned switchover", Took: time.Since(t0), Trigger: pb.FailoverTrigger_FAILOVER_TRIGGER_PLANNED}
	r.mu.Lock()
	r.snap.LastFailover = rec
	r.snap.Failovers++
	r.mu.Unlock()
	r.broadcast(Event2{Kind: EventFailover, Time: time.Now(), Failover: rec})
	return nil
}

// drain hands a protected primary over to the peer before the agent stops: a planned
// switchover, waited for until the hand-over is sent (at most a few seconds).
func (r *hostRunner) drain() {
	if _, err := r.call(HSwitchover{}); err != nil {
		return
	}
	done := make(chan struct{})
	select {
	case r.io <- func(context.Context) { close(done) }:
	case <-time.After(time.Second):
		return
	}
	select {
	case <-done:
		r.log.Info("handed over to the peer before stopping")
	case <-time.After(5 * time.Second):
		r.log.Warn("the hand-over did not finish before stopping")
	}
}

// paramsTarget answers hParams on the run goroutine: the primary's QEMU if this host runs the
// pair's primary protected, else an error naming what is wrong.
func (r *hostRunner) paramsTarget() hostReply {
	if r.pol.Role() != RolePrimary {
		peer := r.peerAgent()
		if r.pol.Peer().Role == RolePrimary {
			return hostReply{err: fmt.Errorf("set parameters: host %s runs the primary; ask its agent: %w", peer, ErrWrongState)}
		}
		return hostReply{err: fmt.Errorf("set parameters: this host is %s, not the primary: %w", r.pol.Role(), ErrWrongState)}
	}
	if !r.pol.Colo() || r.vm == nil {
		return hostReply{err: fmt.Errorf("set parameters: the pair is not protected (the primary runs alone); parameters apply to a protected pair: %w", ErrWrongState)}
	}
	return hostReply{vm: r.vm, pc: r.config()}
}

// setParameters changes tunables at run time on the protected primary this host runs: QEMU's
// migration parameters first (the checkpoint delay takes effect at once), then the pair's spec
// in the store, which the peer's agent follows.
func (r *hostRunner) setParameters(ctx context.Context, t checkpoint.Tunables) error {
	rep, err := r.call(hParams{})
	if err != nil {
		return err
	}
	spec, err := mergeTunables(rep.pc.Spec, t)
	if err != nil {
		return err
	}
	if err := applyTunables(ctx, rep.vm.QMP, spec); err != nil {
		return fmt.Errorf("set parameters: %w", err)
	}
	pc := rep.pc
	pc.Spec = spec
	b, err := json.Marshal(pc)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := r.a.cfg.Store.UpdatePair(sctx, r.name, b); err != nil {
		// QEMU runs with the new values; the store (and so the peer and the next protection)
		// does not have them.
		return fmt.Errorf("set parameters: applied to QEMU, but the store did not take them: %w", err)
	}
	// At once, so that the caller's next read has it; the store's watch brings it here too.
	r.pcp.Store(&pc)
	r.setObserverDelay(pc.Spec.Tunables.CheckpointDelay)
	return nil
}
