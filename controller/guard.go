package controller

import (
	"context"
	"time"

	"github.com/lockstepvm/lockstep/fence"
)

// The runner's side of the host's fence keeper (package fence): the guard of its primary QEMU.

// updateFence tells the host's fence keeper, when it changed, until when this side's primary
// QEMU may run without an active COLO link: just past the policy's own deadline (GuardUntil). A live
// agent moves it at every renewal; the sequences that take a side out of COLO start only with
// a lease that has life left (Policy.leaseLeft), so the keeper does not freeze them midway.
func (r *runner) updateFence() {
	if r.a.cfg.Fence == nil || r.vm == nil || !runsVM(r.pol.Role()) {
		r.guard = guardKey{}
		return
	}
	k := guardKey{pid: r.vm.PID(), until: r.pol.GuardUntil(), link: r.migLink}
	if k == r.guard {
		return
	}
	r.guard = k
	g := fence.Guard{PID: k.pid, Until: fence.Now() + time.Duration(k.until-r.pol.Now())*r.a.cfg.Tick, Quiet: r.linkQuiet()}
	if r.migLink != nil {
		if f, err := dupFile(r.migLink); err == nil {
			g.Link = f
		}
	}
	if old := r.fenceNext.Swap(&g); old != nil && old.Link != nil {
		old.Link.Close()
	}
	select {
	case r.fenceWake <- struct{}{}:
	default:
	}
}

// fenceLoop sends the newest guard to the fence keeper; only the newest counts.
func (r *runner) fenceLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			if g := r.fenceNext.Swap(nil); g != nil && g.Link != nil {
				g.Link.Close()
			}
			return
		case <-r.fenceWake:
			g := r.fenceNext.Swap(nil)
			if g == nil {
				continue
			}
			if err := r.a.cfg.Fence.Guard(*g); err != nil {
				r.log.Warn("the fence keeper did not take the guard", "pid", g.PID, "err", err)
			}
			if g.Link != nil {
				g.Link.Close()
			}
		}
	}
}

// linkQuiet is how long the migration link may be silent and still count as active.
func (r *runner) linkQuiet() time.Duration {
	d := r.config().Spec.Tunables.CheckpointDelay
	return max(2*d, d+500*time.Millisecond)
}
