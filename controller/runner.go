package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
	"github.com/lockstepvm/lockstep/qmp"
)

// Status is a pair's status as the API reports it.
type Status struct {
	Name           string
	State          State
	Reason         string
	PrimarySide    Side
	PrimaryHost    string
	SecondaryHost  string // empty while unprotected
	Generation     int
	Failovers      int
	ColoMode       [2]string // per side: none, primary, secondary, or "" when not running
	QEMUVersion    string
	Checkpoints    checkpoint.Stats
	ResyncOffset   int64
	ResyncLength   int64
	Step           *checkpoint.StepEvent // the step running now, if any
	LastFailover   *FailoverRecord
	AutoReprotect  bool
	CheckpointTime time.Duration
	// Changed is when the state last changed.
	Changed time.Time
	// Cluster: the pair spans two hosts, and the fields below say how this host sees it.
	Cluster        bool
	Epoch          uint64
	StoreReachable bool
	PeerReachable  bool
	LastHeartbeat  time.Time
	// Role is this host's role in a pair that spans two hosts.
	Role HostRole
}

// FailoverRecord describes the last failover.
type FailoverRecord struct {
	At         time.Time
	Why        string
	Sequence   string
	Took       time.Duration
	FailedStep string
	Error      string
	Trigger    pb.FailoverTrigger
}

// EventKind says what a PairEvent carries.
type EventKind string

// Kinds of pair events.
const (
	EventStatus      EventKind = "status"
	EventState       EventKind = "state"
	EventStep        EventKind = "step"
	EventCheckpoints EventKind = "checkpoints"
	EventResync      EventKind = "resync"
	EventFailover    EventKind = "failover"
)

// Event2 is one event of a pair's watch stream.
type Event2 struct {
	Kind     EventKind
	Time     time.Time
	Status   *Status               // EventStatus
	From, To State                 // EventState
	Reason   string                // EventState
	Step     *checkpoint.StepEvent // EventStep
	Stats    *checkpoint.Stats     // EventCheckpoints
	Resync   [2]int64              // EventResync: offset, length
	Failover *FailoverRecord       // EventFailover
}

// internal is an event for the runner with what the policy must not see (the VM a worker
// started, the side a signal came from, which VM it was about).
type internal struct {
	ev   Event
	vm   *checkpoint.VM
	side Side
	from *checkpoint.VM // for signals: the VM that raised it; stale ones are dropped
	gen  *checkpoint.Generation
	rec  *FailoverRecord
}

type opRequest struct {
	ev    Event
	reply chan error
}

type runner struct {
	name   string
	pc     PairConfig
	dir    string
	agent  *Agent
	log    *slog.Logger
	policy *Policy

	// Owned by the run goroutine.
	vms      [2]*checkpoint.VM
	watchers [2]context.CancelFunc
	worker   context.CancelFunc
	workerWG sync.WaitGroup
	gen      checkpoint.Generation

	events   chan internal
	requests chan opRequest
	stopReq  chan chan struct{}
	done     chan struct{} // closed when run returns

	pairView            // status, watch streams, the observer (under pairView.mu)
	pcSnap   PairConfig // copy of pc for readers outside the run goroutine (under mu)
	metrics  *pairMetrics
}

func (a *Agent) newRunner(pc PairConfig, p *Policy) *runner {
	pc.Spec = pc.Spec.WithDefaults()
	r := &runner{
		name: pc.Spec.Name, pc: pc, dir: a.pairDir(pc.Spec.Name), agent: a,
		log: a.log.With("pair", pc.Spec.Name), policy: p,
		events: make(chan internal, 64), requests: make(chan opRequest), stopReq: make(chan chan struct{}), done: make(chan struct{}),
		pairView: newPairView(Status{Name: pc.Spec.Name, State: StateStopped, AutoReprotect: !pc.NoAutoReprotect}),
	}
	r.pcSnap = pc
	r.metrics = newPairMetrics()
	return r
}

// side returns the checkpoint.Side of s: its runtime folder, disk and overlays.
func (r *runner) side(s Side) checkpoint.Side {
	sc := r.pc.Sides[s]
	ov := filepath.Join(r.agent.cfg.OverlayDir, r.name, s.String())
	return checkpoint.Side{
		Host: sc.Host, RunDir: filepath.Join(r.dir, s.String()), Disk: sc.Disk,
		Active: filepath.Join(ov, "active.qcow2"), Hidden: filepath.Join(ov, "hidden.qcow2"),
		NetSocket: sc.NetSocket,
	}
}

// request hands an operator event to the runner and waits for the policy's answer.
func (r *runner) request(ev Event) error {
	reply := make(chan error, 1)
	select {
	case r.requests <- opRequest{ev: ev, reply: reply}:
	case <-r.agent.ctx.Done():
		return errors.New("agent stopping")
	}
	return <-reply
}

// stop ends the runner (its QEMUs are left as the policy left them).
func (r *runner) stop() {
	done := make(chan struct{})
	select {
	case r.stopReq <- done:
		<-done
	case <-r.agent.ctx.Done():
	}
}

func (r *runner) send(ctx context.Context, in internal) {
	select {
	case r.events <- in:
	case <-ctx.Done():
	}
}

func (r *runner) run(ctx context.Context) {
	tick := time.NewTicker(TickInterval)
	defer tick.Stop()
	statsTick := time.NewTicker(time.Second)
	defer statsTick.Stop()
	// Watch the adopted VMs.
	for s, vm := range r.vms {
		if vm != nil {
			r.watchVM(ctx, Side(s), vm)
		}
	}
	if r.policy.State() == StateProtected && r.vms[r.policy.Primary()] != nil {
		r.startObserver(r.vms[r.policy.Primary()], nil)
	}
	r.publish("")
	defer close(r.done)
	defer func() {
		if r.worker != nil {
			r.worker()
		}
		r.workerWG.Wait()
		r.stopObserver()
		for s := range r.vms {
			if r.watchers[s] != nil {
				r.watchers[s]()
			}
			if r.vms[s] != nil {
				r.vms[s].Release()
			}
		}
		r.closeWatchers()
	}()
	for {
		var reason string
		select {
		case <-ctx.Done():
			return
		case done := <-r.stopReq:
			defer close(done)
			return
		case req := <-r.requests:
			if pe, ok := req.ev.(paramsEvent); ok {
				req.reply <- nil
				pe.errc <- r.applyParams(ctx, pe.spec)
				continue
			}
			acts, err := r.policy.Step(req.ev)
			req.reply <- err
			if err != nil {
				continue
			}
			r.exec(ctx, acts)
			reason = fmt.Sprintf("%T", req.ev)
		case in := <-r.events:
			if in.from != nil && r.current(in.side) != in.from {
				continue // about a VM that is gone already
			}
			if in.vm != nil {
				r.vms[in.side] = in.vm
				r.watchVM(ctx, in.side, in.vm)
			}
			if in.gen != nil {
				r.gen = *in.gen
			}
			if in.rec != nil {
				r.mu.Lock()
				r.snap.LastFailover = in.rec
				r.mu.Unlock()
				r.broadcast(Event2{Kind: EventFailover, Time: time.Now(), Failover: in.rec})
			}
			acts, _ := r.policy.Step(in.ev)
			r.exec(ctx, acts)
			r.dropUnneeded()
		case <-tick.C:
			acts, _ := r.policy.Step(EvTick{})
			r.exec(ctx, acts)
		case <-statsTick.C:
			r.publishStats()
		}
		r.publish(reason)
		r.persist()
	}
}

func (r *runner) current(s Side) *checkpoint.VM { return r.vms[s] }

// dropUnneeded kills QEMUs the policy no longer counts on (a worker's VM that arrived after
// the pair moved on).
func (r *runner) dropUnneeded() {
	st := r.policy.State()
	for s := range r.vms {
		side := Side(s)
		if r.vms[s] == nil {
			continue
		}
		needed := st != StateStopped && st != StateFailed &&
			(side == r.policy.Primary() || r.policy.HasSecondary())
		if !needed {
			r.kill(side, "no longer part of the pair")
		}
	}
}

func (r *runner) kill(s Side, why string) {
	if r.watchers[s] != nil {
		r.watchers[s]()
		r.watchers[s] = nil
	}
	if vm := r.vms[s]; vm != nil {
		r.log.Info("killing QEMU", "side", s, "pid", vm.PID(), "why", why)
		vm.Kill()
		r.vms[s] = nil
	}
	if s == r.policy.Primary() {
		r.stopObserver()
	}
}

func (r *runner) watchVM(ctx context.Context, s Side, vm *checkpoint.VM) {
	if r.watchers[s] != nil {
		r.watchers[s]()
	}
	wctx, cancel := context.WithCancel(ctx)
	r.watchers[s] = cancel
	sigs := make(chan checkpoint.Signal, 8)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); checkpoint.Watch(wctx, vm, r.agent.cfg.Watch, sigs) }()
	go func() {
		defer wg.Done()
		for {
			select {
			case sg := <-sigs:
				kind, ok := signalKind(sg)
				if !ok {
					continue
				}
				r.log.Warn("failure signal", "side", s, "signal", sg.String())
				r.send(wctx, internal{ev: EvSignal{Side: s, Kind: kind}, side: s, from: vm})
			case <-wctx.Done():
				return
			}
		}
	}()
	r.workerWG.Add(1)
	go func() { defer r.workerWG.Done(); <-wctx.Done(); wg.Wait() }()
}

func signalKind(s checkpoint.Signal) (SignalKind, bool) {
	switch s.Kind {
	case checkpoint.SignalProcessExited:
		return SigExited, true
	case checkpoint.SignalQMPLost:
		return SigQMPLost, true
	case checkpoint.SignalQMPTimeout:
		return SigQMPTimeout, true
	case checkpoint.SignalColoExit:
		if s.Reason == qmp.ColoExitError {
			return SigColoExitError, true
		}
	case checkpoint.SignalMigrationFailed:
		return SigMigrationFailed, true
	}
	return "", false
}

// exec carries out the policy's actions: kills at once, long actions on a worker goroutine
// that reports its end as an event.
func (r *runner) exec(ctx context.Context, acts []Action) {
	for _, a := range acts {
		r.log.Info("action", "action", fmt.Sprintf("%T%+v", a, a))
		switch a := a.(type) {
		case ActKill:
			r.kill(a.Side, a.Reason)
		case ActBoot:
			r.spawn(ctx, func(wctx context.Context) internal { return r.boot(wctx, a.Side) })
		case ActProtect:
			r.spawn(ctx, func(wctx context.Context) internal { return r.protect(wctx, a) })
		case ActFailoverAsSecondary:
			vm, why, gen := r.vms[a.Side], r.policy.Reason(), r.gen
			_ = gen
			r.stopObserver()
			r.spawn(ctx, func(wctx context.Context) internal {
				in := r.failover(wctx, a.Side, why, checkpoint.FailoverAsSecondary(vm.QMP, a.Yank))
				if strings.HasPrefix(why, "forced") {
					in.rec.Trigger = pb.FailoverTrigger_FAILOVER_TRIGGER_FORCED
				}
				return in
			})
		case ActFailoverAsPrimary:
			vm, why, gen := r.vms[a.Side], r.policy.Reason(), r.gen
			r.stopObserver()
			r.spawn(ctx, func(wctx context.Context) internal {
				return r.failover(wctx, a.Side, why, checkpoint.FailoverAsPrimary(vm.QMP, gen))
			})
		case ActSwitchover:
			prim, sec := r.vms[a.From], r.vms[a.From.Other()]
			r.stopObserver()
			r.spawn(ctx, func(wctx context.Context) internal { return r.switchover(wctx, a.From, prim, sec) })
		}
	}
}

// spawn runs one long action; the previous one, if any, is cancelled first.
func (r *runner) spawn(ctx context.Context, f func(context.Context) internal) {
	spawnLong(&r.worker, &r.workerWG, ctx, f, r.send)
}

func (r *runner) boot(ctx context.Context, s Side) internal {
	vm, err := checkpoint.Launch(ctx, checkpoint.LaunchConfig{Spec: r.pc.Spec, Role: checkpoint.RolePrimary, Side: r.side(s), Log: r.log})
	if err != nil {
		return internal{ev: EvBootFailed{Err: err.Error()}}
	}
	return internal{ev: EvBooted{Side: s}, vm: vm, side: s}
}

// freeTCPPorts reserves n distinct free ports on host (closed again before use).
func freeTCPPorts(host string, n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var out []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

func (r *runner) protect(ctx context.Context, a ActProtect) internal {
	fail := func(err error) internal {
		return internal{ev: EvProtectFailed{Gen: a.Gen, Err: err.Error()}}
	}
	prim := r.vms[a.Primary]
	if prim == nil {
		return fail(errors.New("no primary QEMU"))
	}
	if !a.Reprotect {
		if err := settleBoot(ctx, r.log, r.progress, r.pc.Spec, prim.Started(), prim.Exited()); err != nil {
			return fail(err)
		}
	}
	secSide := a.Primary.Other()
	ps, ss := r.side(a.Primary), r.side(secSide)
	ports, err := freeTCPPorts(ps.Host, 5)
	if err != nil {
		return fail(err)
	}
	g := checkpoint.Generation{N: a.Gen, PrimaryHost: ps.Host, SecondaryHost: ss.Host,
		Ports: checkpoint.Ports{NBD: ports[0], Mirror: ports[1], Compare: ports[2], CompareIn: ports[3], CompareOut: ports[4]}}
	// The secondary's replica: same size as the VM's disk; the resync fills it.
	if err := ensureDisk(ss.Disk, r.pc.Spec.DiskSize); err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(filepath.Dir(ss.Active), 0o700); err != nil {
		return fail(err)
	}
	sec, err := checkpoint.Launch(ctx, checkpoint.LaunchConfig{Spec: r.pc.Spec, Role: checkpoint.RoleSecondary, Side: ss, PrimaryHost: ps.Host, Ports: g.Ports, Log: r.log})
	if err != nil {
		return fail(err)
	}
	link, err := net.Listen("tcp", net.JoinHostPort(ss.Host, "0"))
	if err != nil {
		sec.Kill()
		return fail(err)
	}
	defer link.Close()
	obs := checkpoint.NewObserver(r.pc.Spec.Tunables.CheckpointDelay)
	cfg := checkpoint.ProtectConfig{
		Spec: r.pc.Spec, Gen: g, Primary: prim.QMP, Secondary: sec.QMP,
		DialMigration:   dialLink(link.Addr().String(), obs),
		AcceptMigration: acceptLink(link),
		OnResync:        r.resync,
	}
	sub, err := runProtection(ctx, r.log, r.progress, cfg, obs, a.Reprotect)
	if err != nil {
		sec.Kill()
		return fail(err)
	}
	r.startObserver(prim, &observerStart{obs: obs, sub: sub})
	return internal{ev: EvProtected{Gen: a.Gen}, vm: sec, side: secSide, gen: &g}
}

type observerStart struct {
	obs *checkpoint.Observer
	sub *qmp.Subscription
}

// startObserver runs the checkpoint observer of the primary. It may run on a worker: the
// observer is published under r.mu.
func (r *runner) startObserver(prim *checkpoint.VM, os *observerStart) {
	obs := checkpoint.NewObserver(r.pc.Spec.Tunables.CheckpointDelay)
	var sub *qmp.Subscription
	if os != nil {
		obs, sub = os.obs, os.sub
	} else {
		sub = prim.QMP.Subscribe(checkpoint.ObserverEvents...)
		obs.Observe(&qmp.Event{Name: qmp.EventMigration, Data: []byte(`{"status":"colo"}`), Time: time.Now()})
	}
	obs.OnCheckpoint(r.metrics.checkpoint)
	r.runObserver(obs, sub)
}

// runProtection runs the primary's protection sequence (Reprotect after a takeover, else
// StartProtection) with obs's subscription to the primary's events opened first, so that no
// checkpoint goes unseen. On failure it closes both and cleans the primary (abortProtection);
// on success the caller runs obs over the subscription.
func runProtection(ctx context.Context, lg *slog.Logger, progress checkpoint.Progress, cfg checkpoint.ProtectConfig, obs *checkpoint.Observer, reprotect bool) (*qmp.Subscription, error) {
	seq := checkpoint.StartProtection(cfg)
	if reprotect {
		seq = checkpoint.Reprotect(cfg)
	}
	sub := cfg.Primary.Subscribe(checkpoint.ObserverEvents...)
	if _, err := seq.Run(ctx, lg, progress); err != nil {
		sub.Close()
		obs.Close()
		abortProtection(lg, cfg.Primary, cfg.Gen, progress)
		return nil, err
	}
	return sub, nil
}

// abortProtection cleans a primary after a failed protection, so that the next attempt can
// add the same channels and objects again. It runs even when the worker was cancelled.
func abortProtection(lg *slog.Logger, p *qmp.Client, g checkpoint.Generation, progress checkpoint.Progress) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	seq := checkpoint.AbortProtection(p, g)
	if info, err := p.QueryMigrate(ctx); err == nil && info.Status == qmp.MigrationColo {
		// It failed after COLO started (its last check): COLO must end too.
		seq = checkpoint.FailoverAsPrimary(p, g)
	}
	if _, err := seq.Run(ctx, lg, progress); err != nil {
		lg.Error("cleaning up after a failed protection", "err", err)
	}
}

// dialLink opens the migration connection to addr; the observer keeps a copy of the socket to
// read TCP_INFO (bytes per checkpoint).
func dialLink(addr string, obs *checkpoint.Observer) func(context.Context) (*os.File, error) {
	return func(ctx context.Context) (*os.File, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		f, err := c.(*net.TCPConn).File()
		if err != nil {
			return nil, err
		}
		if dup, err := c.(*net.TCPConn).File(); err == nil {
			obs.SetMigrationSocket(dup)
		}
		return f, nil
	}
}

func acceptLink(ln net.Listener) func(context.Context) (*os.File, error) {
	return func(ctx context.Context) (*os.File, error) {
		if tl, ok := ln.(*net.TCPListener); ok {
			if d, ok := ctx.Deadline(); ok {
				tl.SetDeadline(d)
			}
		}
		c, err := ln.Accept()
		if err != nil {
			return nil, err
		}
		defer c.Close()
		return c.(*net.TCPConn).File()
	}
}

func ensureDisk(path string, size int64) error {
	if st, err := os.Stat(path); err == nil && st.Size() == size {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Truncate(size)
}

func (r *runner) failover(ctx context.Context, survivor Side, why string, seq checkpoint.Sequence) internal {
	t0 := time.Now()
	took, err := seq.Run(ctx, r.log, r.progress)
	rec := &FailoverRecord{At: t0, Why: why, Sequence: seq.Name, Took: took, Trigger: pb.FailoverTrigger_FAILOVER_TRIGGER_AUTOMATIC}
	if err != nil {
		var se *checkpoint.StepError
		if errors.As(err, &se) {
			rec.FailedStep = se.Step
		}
		rec.Error = err.Error()
		return internal{ev: EvFailoverFailed{Survivor: survivor, Err: err.Error()}, rec: rec}
	}
	return internal{ev: EvFailoverDone{Survivor: survivor}, rec: rec}
}

// switchover moves the VM to the secondary: a checkpoint flushes everything colo-compare holds,
// the old primary is killed right after it, and the secondary fails over.
func (r *runner) switchover(ctx context.Context, from Side, prim, sec *checkpoint.VM) internal {
	t0 := time.Now()
	sub := prim.QMP.Subscribe(qmp.EventResume)
	delay := uint32(r.pc.Spec.Tunables.CheckpointDelay / time.Millisecond)
	// Setting the delay during COLO starts a checkpoint at once.
	if err := prim.QMP.MigrateSetParameters(ctx, qmp.MigrationParameters{XCheckpointDelay: &delay}); err == nil {
		wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, _ = sub.Next(wctx)
		cancel()
	}
	sub.Close()
	prim.Kill()
	in := r.failover(ctx, from.Other(), "planned switchover", checkpoint.FailoverAsSecondary(sec.QMP, false))
	in.rec.At, in.rec.Took, in.rec.Trigger = t0, time.Since(t0), pb.FailoverTrigger_FAILOVER_TRIGGER_PLANNED
	return in
}

func (r *runner) setParameters(ctx context.Context, t checkpoint.Tunables) error {
	st := r.status()
	if st.State != StateProtected {
		return fmt.Errorf("set parameters: pair is %s; parameters apply to a protected pair: %w", st.State, ErrWrongState)
	}
	spec, err := mergeTunables(r.pc.Spec, t)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	// Run on the runner's goroutine, which owns the VMs.
	reply := make(chan error, 1)
	select {
	case r.requests <- opRequest{ev: paramsEvent{spec: spec, errc: errc}, reply: reply}:
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := <-reply; err != nil {
		return err
	}
	return <-errc
}

// applyParams sets the tunables on the primary's QEMU (the runner's goroutine owns the VMs).
func (r *runner) applyParams(ctx context.Context, spec checkpoint.Spec) error {
	prim := r.vms[r.policy.Primary()]
	if prim == nil || r.policy.State() != StateProtected {
		return fmt.Errorf("set parameters: pair is %s: %w", r.policy.State(), ErrWrongState)
	}
	if err := applyTunables(ctx, prim.QMP, spec); err != nil {
		return err
	}
	r.pc.Spec = spec
	r.mu.Lock()
	r.pcSnap = r.pc
	if r.obs != nil {
		r.obs.SetDelay(spec.Tunables.CheckpointDelay)
	}
	r.mu.Unlock()
	if err := r.agent.storePair(r.pc, false); err != nil {
		r.log.Error("saving the pair's new tunables in the coordination store", "err", err)
	}
	if err := writeJSON(filepath.Join(r.dir, "pair.json"), r.pc); err != nil {
		r.log.Error("saving the pair", "err", err)
	}
	return nil
}

// mergeTunables applies the run-time changes in t (its non-zero fields) to spec; the compare
// timeout cannot change at run time.
func mergeTunables(spec checkpoint.Spec, t checkpoint.Tunables) (checkpoint.Spec, error) {
	if t.CheckpointDelay != 0 {
		spec.Tunables.CheckpointDelay = t.CheckpointDelay
	}
	if t.MaxBandwidth != 0 {
		spec.Tunables.MaxBandwidth = t.MaxBandwidth
	}
	if t.CompareTimeout != 0 {
		return spec, &checkpoint.FieldError{Field: "compare_timeout", Reason: "takes effect at the next protection only; not changeable at run time"}
	}
	if err := spec.Validate(); err != nil {
		return spec, err
	}
	return spec, nil
}

// applyTunables sets the run-time tunables of spec on a protected primary's QEMU: the checkpoint
// delay (effective at once) and the bandwidth cap.
func applyTunables(ctx context.Context, q *qmp.Client, spec checkpoint.Spec) error {
	delay := uint32(spec.Tunables.CheckpointDelay / time.Millisecond)
	p := qmp.MigrationParameters{XCheckpointDelay: &delay}
	if spec.Tunables.MaxBandwidth > 0 {
		bw := spec.Tunables.MaxBandwidth
		p.MaxBandwidth = &bw
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return q.MigrateSetParameters(cctx, p)
}

// paramsEvent is handled by the runner itself, not the policy.
type paramsEvent struct {
	spec checkpoint.Spec
	errc chan error
}

func (paramsEvent) isEvent() {}

// publish refreshes the status snapshot from the policy and tells watchers of a state change.
func (r *runner) publish(reason string) {
	p := r.policy
	r.mu.Lock()
	old := r.snap.State
	s := &r.snap
	s.State, s.Reason, s.PrimarySide, s.Generation, s.Failovers = p.State(), p.Reason(), p.Primary(), p.Generation(), p.Failovers()
	s.PrimaryHost = r.pc.Sides[p.Primary()].Host
	s.SecondaryHost = ""
	if p.HasSecondary() {
		s.SecondaryHost = r.pc.Sides[p.Primary().Other()].Host
	}
	s.CheckpointTime = r.pc.Spec.Tunables.CheckpointDelay
	for i := range s.ColoMode {
		s.ColoMode[i] = ""
		if r.vms[i] != nil {
			if Side(i) == p.Primary() {
				s.ColoMode[i] = "primary"
			} else {
				s.ColoMode[i] = "secondary"
			}
			if p.State() != StateProtected {
				s.ColoMode[i] = "none"
			}
		}
	}
	if p.State() != StateProtected {
		s.Checkpoints = checkpoint.Stats{}
	}
	changed := old != s.State
	if changed {
		s.Changed = time.Now()
	}
	from, to, why := old, s.State, s.Reason
	r.mu.Unlock()
	if changed {
		r.log.Info("state", "from", from, "to", to, "reason", why)
		r.broadcast(Event2{Kind: EventState, Time: time.Now(), From: from, To: to, Reason: why})
	}
	_ = reason
}

func (r *runner) persist() {
	p := r.policy
	ps := persisted{Primary: p.Primary(), Gen: p.Generation(), Protected: p.State() == StateProtected, Started: p.State() != StateStopped}
	if err := writeJSON(filepath.Join(r.dir, "state.json"), ps); err != nil && !strings.Contains(err.Error(), "no such file") {
		r.log.Error("saving state", "err", err)
	}
}

func (r *runner) watch(ctx context.Context) <-chan Event2 {
	return r.pairView.watch(ctx, r.done, &r.agent.wg)
}
