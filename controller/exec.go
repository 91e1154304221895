package controller

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// exec carries out the policy's actions, in order: store and peer requests on the io
// goroutine (in the order given), freezes and kills at once, long actions on the worker.
func (r *runner) exec(ctx context.Context, acts []Action) {
	for _, act := range acts {
		switch act.(type) {
		case ActRenew, ActProbeStore:
		default:
			r.log.Info("action", "action", fmt.Sprintf("%T%+v", act, act))
		}
		switch a := act.(type) {
		case ActAcquire:
			prev := r.held
			if prev.Epoch == 0 {
				prev = r.saved.Lease
			}
			r.io.push(func(ctx context.Context) {
				h, ev := r.store.acquire(ctx, prev, a.SentAt)
				if la, ok := ev.(LeaseAcquired); ok {
					r.post(ctx, leaseGot{held: h, ev: la})
					return
				}
				r.post(ctx, ev)
			})
		case ActRenew:
			h := r.held
			if h.Epoch != a.Epoch {
				r.log.Error("renewal of a lease the runner does not hold", "epoch", a.Epoch, "held", h.Epoch)
				r.io.push(func(ctx context.Context) { r.post(ctx, LeaseLost{Epoch: a.Epoch}) })
				continue
			}
			r.io.push(func(ctx context.Context) { r.post(ctx, r.store.renew(ctx, h, a.SentAt)) })
		case ActRelease:
			h := r.held
			r.io.push(func(ctx context.Context) {
				if h.Epoch != a.Epoch {
					return
				}
				if err := r.store.release(ctx, h); err != nil {
					r.log.Warn("releasing the lease (it expires by itself)", "epoch", h.Epoch, "err", err)
				}
			})
		case ActProbeStore:
			r.io.push(func(ctx context.Context) { r.post(ctx, r.store.current(ctx, a.SentAt)) })
		case ActMark:
			h := r.held
			r.io.push(func(ctx context.Context) {
				if err := r.store.mark(ctx, h, a.Rec); err != nil {
					r.log.Warn("writing the primary record", "record", fmt.Sprintf("%+v", a.Rec), "err", err)
					return
				}
				r.post(ctx, Marked(a))
			})
		case ActFreeze:
			if r.vm != nil {
				r.log.Warn("fencing: freezing QEMU", "pid", r.vm.PID(), "why", a.Why)
				_ = r.vm.Signal(syscall.SIGSTOP)
			}
		case ActThaw:
			if r.vm != nil {
				r.log.Info("unfencing: resuming QEMU", "pid", r.vm.PID())
				_ = r.vm.Signal(syscall.SIGCONT)
			}
		case ActKill:
			r.killVM(a.Why)
		case ActBoot:
			pc, h := r.config(), r.held
			r.spawn(ctx, func(ctx context.Context) any {
				if err := r.store.mark(ctx, h, a.Rec); err != nil {
					return BootFailed{Err: "the primary record was not written: " + err.Error(), StoreDown: true}
				}
				vm, err := r.backend.Launch(ctx, checkpoint.LaunchConfig{Spec: pc.Spec, Role: checkpoint.RolePrimary, Side: r.localSide(), Log: r.log})
				if err != nil {
					return BootFailed{Err: err.Error()}
				}
				return result{ev: Booted{}, vm: vm}
			})
		case ActProtect:
			vm, reprotect := r.vm, r.wasSecond
			r.stopObserver()
			r.spawn(ctx, func(ctx context.Context) any { return r.protect(ctx, vm, a, reprotect) })
		case ActStartSecondary:
			pp := r.pendingPrep
			r.pendingPrep = nil
			r.killVM("a new secondary")
			r.spawn(ctx, func(ctx context.Context) any { return r.prepare(ctx, a.Gen, pp) })
		case ActTakeOver:
			vm, h, yank := r.vm, r.held, a.Yank
			if r.prepared != nil {
				r.prepared.cancel()
				r.prepared = nil
			}
			if yank && r.linkState() == LinkClosed {
				r.log.Info("the primary's end of the migration connection is closed: taking over without a yank")
				yank = false
			}
			r.spawn(ctx, func(ctx context.Context) any {
				if err := r.store.mark(ctx, h, a.Rec); err != nil {
					return TakeoverFailed{Err: "the primary record was not written: " + err.Error(), StoreDown: true}
				}
				if vm == nil {
					return TakeoverFailed{Err: "no secondary QEMU"}
				}
				seq := checkpoint.FailoverAsSecondary(vm.QMP, yank)
				t0 := time.Now()
				took, err := seq.Run(ctx, r.log, r.view.progress)
				r.recordFailover(t0, a.Why, seq.Name, took, err, triggerOf(a.Kind))
				if err != nil {
					return TakeoverFailed{Err: err.Error()}
				}
				return result{ev: TakeoverDone{}, wasSecond: true}
			})
		case ActGoAlone:
			vm, h, g := r.vm, r.held, r.gen
			r.stopObserver()
			r.spawn(ctx, func(ctx context.Context) any {
				if err := r.store.mark(ctx, h, a.Rec); err != nil {
					return AloneFailed{Err: "the primary record was not written: " + err.Error(), StoreDown: true}
				}
				if vm == nil {
					return AloneFailed{Err: "no primary QEMU"}
				}
				seq := checkpoint.FailoverAsPrimary(vm.QMP, g)
				if a.Yank {
					seq = checkpoint.FailoverAsPrimaryYank(vm.QMP, g)
				}
				t0 := time.Now()
				took, err := seq.Run(ctx, r.log, r.view.progress)
				r.recordFailover(t0, a.Why, seq.Name, took, err, pb.FailoverTrigger_FAILOVER_TRIGGER_AUTOMATIC)
				if err != nil {
					return AloneFailed{Err: err.Error()}
				}
				return AloneDone{}
			})
		case ActSwitchover:
			vm := r.dropVM()
			delay := r.config().Spec.Tunables.CheckpointDelay
			r.spawn(ctx, func(ctx context.Context) any {
				if vm != nil {
					cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
					r.log.Info("switchover: a last checkpoint, then the old primary is killed", "pid", vm.PID())
					checkpoint.FlushAndKill(cctx, vm, delay)
					cancel()
				}
				return SwitchedOver{}
			})
		case ActHandOver:
			r.handedOver = &handOverNote{at: time.Now(), kind: a.Kind, why: a.Why, epoch: a.Epoch}
			r.io.push(func(ctx context.Context) {
				cctx, cancel := context.WithTimeout(ctx, 2*r.a.cfg.HeartbeatTimeout)
				defer cancel()
				if err := r.link.HandOver(cctx, r.name, a.Epoch, a.Kind, a.Why); err != nil {
					r.log.Warn("hand-over not delivered; the peer will see it in heartbeats", "err", err)
				}
			})
		case ActTearDownPeer:
			epoch := r.pol.Epoch()
			r.io.push(func(ctx context.Context) {
				cctx, cancel := context.WithTimeout(ctx, time.Second)
				defer cancel()
				if err := r.link.TearDown(cctx, r.name, epoch, a.Gen, "protection failed"); err != nil {
					r.log.Warn("tear-down of the peer's secondary not delivered", "gen", a.Gen, "err", err)
				}
			})
		}
	}
}

func triggerOf(k HandOverKind) pb.FailoverTrigger {
	switch k {
	case HandOverPlanned:
		return pb.FailoverTrigger_FAILOVER_TRIGGER_PLANNED
	case HandOverForced:
		return pb.FailoverTrigger_FAILOVER_TRIGGER_FORCED
	}
	return pb.FailoverTrigger_FAILOVER_TRIGGER_AUTOMATIC
}

func (r *runner) recordFailover(t0 time.Time, why, seq string, took time.Duration, err error, trigger pb.FailoverTrigger) {
	rec := &FailoverRecord{At: t0, Why: why, Sequence: seq, Took: took, Trigger: trigger}
	if err != nil {
		var se *checkpoint.StepError
		if errors.As(err, &se) {
			rec.FailedStep = se.Step
		}
		rec.Error = err.Error()
	}
	r.metrics.failover(took, err == nil)
	r.view.failover(rec)
}

// protect asks the peer for a secondary and runs the primary's half of the protection.
func (r *runner) protect(ctx context.Context, prim *checkpoint.VM, a ActProtect, reprotect bool) any {
	fail := func(err error) any { return ProtectFailed{Gen: a.Gen, Err: err.Error()} }
	if prim == nil {
		return fail(errors.New("no primary QEMU"))
	}
	pc := r.config() // one snapshot: tunables may change meanwhile
	if !reprotect {
		if err := settleBoot(ctx, r.log, r.view.progress, pc.Spec, prim.Started(), prim.Exited()); err != nil {
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
	tlsOn := r.a.replicationTLSOn(pc)
	res, err := r.link.Prepare(pctx, PrepareArgs{Pair: r.name, Epoch: a.Epoch, Gen: a.Gen, Config: pc, PrimaryHost: pc.Sides[r.side].Agent,
		PrimaryAddress: ps.Host, PrimaryQEMUVersion: version, MirrorPort: ports[0], ComparePort: ports[1], TLS: tlsOn})
	if err != nil {
		return fail(fmt.Errorf("the peer could not prepare a secondary: %w", err))
	}
	g := checkpoint.Generation{N: a.Gen, PrimaryHost: ps.Host, SecondaryHost: res.SecondaryAddress,
		Ports: checkpoint.Ports{NBD: res.NBDPort, Mirror: ports[0], Compare: ports[1], CompareIn: ports[2], CompareOut: ports[3]}}
	if err := r.replicationTLS(pc, tlsOn, &ps, &g, true); err != nil {
		return fail(err)
	}
	migAddr := net.JoinHostPort(res.SecondaryAddress, fmt.Sprint(res.MigrationPort))
	obs := checkpoint.Observe(prim, pc.Spec.Tunables.CheckpointDelay)
	var link *os.File
	cfg := checkpoint.ProtectConfig{
		Spec: pc.Spec, Gen: g, Primary: prim.QMP, SecondaryVersion: res.SecondaryQEMUVersion,
		DialMigration: dialLink(migAddr, obs.Observer, &link),
		OnResync:      r.view.resyncProgress,
	}
	if err := checkpoint.RunProtection(ctx, r.a.ctx, r.log, r.view.progress, cfg, obs, reprotect); err != nil {
		obs.Stop()
		if link != nil {
			link.Close()
		}
		return fail(err)
	}
	return result{ev: Protected{Gen: a.Gen}, gen: &g, link: link, observe: obs}
}

// dialLink opens the migration connection to addr with TCP_NODELAY (Go's default); the
// observer keeps a copy of the socket to read bytes per checkpoint, and *keep gets another for
// the runner's link state.
func dialLink(addr string, obs *checkpoint.Observer, keep **os.File) func(context.Context) (*os.File, error) {
	return func(ctx context.Context) (*os.File, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		tc := c.(*net.TCPConn)
		f, err := tc.File()
		if err != nil {
			return nil, err
		}
		if dup, err := tc.File(); err == nil {
			obs.SetMigrationSocket(dup)
		}
		if dup, err := tc.File(); err == nil {
			*keep = dup
		}
		return f, nil
	}
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

// ensureDisk creates the secondary's replica when it is missing: a sparse raw file of the
// spec's size, or a qcow2 image (qemu-img); a raw one of another size is resized.
func ensureDisk(ctx context.Context, spec checkpoint.Spec, side checkpoint.Side) error {
	path, size := side.Disk, spec.DiskSize
	if side.DiskFormat == "qcow2" {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return err
		}
		img := spec.QEMUImg
		if len(img) == 0 {
			img = []string{"qemu-img"}
		}
		args := append(append([]string{}, img[1:]...), "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
		if out, err := osexec.CommandContext(ctx, img[0], args...).CombinedOutput(); err != nil {
			return fmt.Errorf("creating the qcow2 replica %s: %v: %s", path, err, bytes.TrimSpace(out))
		}
		return nil
	}
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

// prepared is a secondary this side readied for its peer's primary: the listener for its
// migration connection, and this agent's copy of that connection once accepted.
type prepared struct {
	ln     net.Listener
	cancel context.CancelFunc
}

// prepare starts a secondary for the peer's primary: its QEMU waits for the migration stream,
// which this agent accepts and hands to it, so that both ends have TCP_NODELAY.
func (r *runner) prepare(ctx context.Context, gen int, pp *pendingPrepare) any {
	if pp == nil {
		return result{ev: PrepareFailed{Gen: gen, Err: "no prepare request"}}
	}
	req, res := pp.args, pp.res
	fail := func(err error) any {
		return result{ev: PrepareFailed{Gen: gen, Err: err.Error()}, prep: res}
	}
	// The pair as this agent has it (the store's copy), with the tunables the primary's agent
	// runs with, which may be newer.
	spec := r.config().Spec
	if req.Config.Spec.Name == spec.Name {
		spec.Tunables = req.Config.Spec.WithDefaults().Tunables
	}
	ss := r.localSide()
	ports, err := freeTCPPorts(ss.Host, 3)
	if err != nil {
		return fail(err)
	}
	g := checkpoint.Generation{N: gen, PrimaryHost: req.PrimaryAddress, SecondaryHost: ss.Host,
		Ports: checkpoint.Ports{NBD: ports[0], Mirror: req.MirrorPort, Compare: req.ComparePort,
			CompareIn: ports[1], CompareOut: ports[2]}} // CompareIn/Out are the primary's own; unused here
	// Encryption as the primary's agent decided for the generation.
	if err := r.replicationTLS(r.config(), req.TLS, &ss, &g, false); err != nil {
		return fail(err)
	}
	if err := ensureDisk(ctx, spec, ss); err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(filepath.Dir(ss.Active), 0o700); err != nil {
		return fail(err)
	}
	vm, err := r.backend.Launch(ctx, checkpoint.LaunchConfig{Spec: spec, Role: checkpoint.RoleSecondary, Side: ss, PrimaryHost: g.PrimaryHost, Ports: g.Ports, Log: r.log})
	if err != nil {
		return fail(err)
	}
	if _, err := checkpoint.PrepareSecondary(vm.QMP, g).Run(ctx, r.log, r.view.progress); err != nil {
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
	p := &prepared{ln: ln, cancel: func() { cancel(); ln.Close() }}
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
		tc := conn.(*net.TCPConn)
		f, err := tc.File()
		if err != nil {
			return
		}
		defer f.Close()
		if keep, err := tc.File(); err == nil {
			r.post(pctx, migrationLink{vm: vm, f: keep})
		}
		ictx, icancel := context.WithTimeout(pctx, 30*time.Second)
		defer icancel()
		if err := checkpoint.IncomingMigration(ictx, vm.QMP, g, f); err != nil {
			r.log.Error("handing the migration connection to the secondary", "err", err)
		}
	}()
	prepRes := PrepareResult{SecondaryAddress: ss.Host, SecondaryQEMUVersion: version, MigrationPort: ln.Addr().(*net.TCPAddr).Port, NBDPort: ports[0]}
	return result{ev: Prepared{Gen: gen}, vm: vm, gen: &g, prepared: p, prep: res, prepRes: prepRes}
}

// migrationLink brings the secondary's copy of the accepted migration connection to the run
// goroutine.
type migrationLink struct {
	vm *checkpoint.VM
	f  *os.File
}
