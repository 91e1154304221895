package checkpoint

import (
	"context"
	"log/slog"
	"time"

	"github.com/lockstepvm/lockstep/qmp"
)

// SetRunTimeTunables sets the tunables of spec that a protected primary takes at run time: the
// checkpoint delay (a checkpoint follows at once) and the bandwidth cap.
func SetRunTimeTunables(ctx context.Context, vm *VM, spec Spec) error {
	delay := uint32(spec.Tunables.CheckpointDelay / time.Millisecond)
	p := qmp.MigrationParameters{XCheckpointDelay: &delay}
	if spec.Tunables.MaxBandwidth > 0 {
		bw := spec.Tunables.MaxBandwidth
		p.MaxBandwidth = &bw
	}
	return vm.QMP.MigrateSetParameters(ctx, p)
}

// Observation is a running Observer of a primary's checkpoints: its subscription to the
// primary's events, opened before the protection so that no checkpoint goes unseen.
type Observation struct {
	Observer *Observer
	sub      *qmp.Subscription
	cancel   context.CancelFunc
	done     chan struct{}
}

// Observe opens the subscription of an observation of vm's checkpoints; Start runs it.
func Observe(vm *VM, delay time.Duration) *Observation {
	return &Observation{Observer: NewObserver(delay), sub: vm.QMP.Subscribe(ObserverEvents...)}
}

// ObserveInColo is Observe for a primary already in COLO (adopted after an agent restart).
func ObserveInColo(vm *VM, delay time.Duration) *Observation {
	o := Observe(vm, delay)
	o.Observer.Observe(&qmp.Event{Name: qmp.EventMigration, Data: []byte(`{"status":"colo"}`), Time: time.Now()})
	return o
}

// Start runs the observation until Stop; onCheckpoint is called at the end of every checkpoint
// (it must not block).
func (o *Observation) Start(onCheckpoint func(pause time.Duration, early bool)) {
	o.Observer.OnCheckpoint(onCheckpoint)
	ctx, cancel := context.WithCancel(context.Background())
	o.cancel, o.done = cancel, make(chan struct{})
	go func() { defer close(o.done); _ = o.Observer.Run(ctx, o.sub) }()
}

// Stop ends the observation (started or not) and closes its subscription and socket copy.
func (o *Observation) Stop() {
	if o.cancel != nil {
		o.cancel()
		<-o.done
	}
	o.sub.Close()
	o.Observer.Close()
}

// RunProtection runs the primary's protection sequence (Reprotect for a primary that took over
// from a secondary, else StartProtection) under an observation opened first. On failure it
// cleans the primary (CleanUpProtection), so that the next attempt can add the same channels
// and objects again, and returns the sequence's error; on success the caller starts the
// observation.
//
// The clean-up runs even when ctx was cancelled (a protection superseded by another action
// still leaves a clean primary), under cleanupCtx, which bounds it (an agent that stops does
// not wait for it: its successor cleans up what it finds).
func RunProtection(ctx, cleanupCtx context.Context, lg *slog.Logger, progress Progress, cfg ProtectConfig, obs *Observation, reprotect bool) error {
	seq := StartProtection(cfg)
	if reprotect {
		seq = Reprotect(cfg)
	}
	if _, err := seq.Run(ctx, lg, progress); err != nil {
		CleanUpProtection(cleanupCtx, lg, cfg.Primary, cfg.Gen, progress)
		return err
	}
	return nil
}

// CleanUpProtection undoes a failed protection of generation g on the primary p: the
// AbortProtection sequence, or FailoverAsPrimary if COLO had started; at most 30 s, and no
// longer than ctx.
func CleanUpProtection(ctx context.Context, lg *slog.Logger, p *qmp.Client, g Generation, progress Progress) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	seq := AbortProtection(p, g)
	if info, err := p.QueryMigrate(ctx); err == nil && info.Status == qmp.MigrationColo {
		// It failed after COLO started (its last check): COLO must end too.
		seq = FailoverAsPrimary(p, g)
	}
	if _, err := seq.Run(ctx, lg, progress); err != nil {
		lg.Error("cleaning up after a failed protection", "err", err)
	}
}

// ColoState is what a QEMU says of its COLO role, for an agent adopting it.
type ColoState struct {
	// Mode is "primary", "secondary" or "none" (query-colo-status). A QEMU whose COLO ended
	// with an error still reports its mode until a failover.
	Mode string
	// Migrating: an outgoing migration is in progress and not in COLO (a protection that an
	// earlier agent left unfinished).
	Migrating bool
	// Incoming: the QEMU waits for an incoming migration (a secondary not yet in COLO).
	Incoming bool
}

// Inspect reads vm's COLO state.
func Inspect(ctx context.Context, vm *VM) (ColoState, error) {
	cs, err := vm.QMP.QueryColoStatus(ctx)
	if err != nil {
		return ColoState{}, err
	}
	out := ColoState{Mode: string(cs.Mode)}
	if out.Mode == "" {
		out.Mode = "none"
	}
	if info, err := vm.QMP.QueryMigrate(ctx); err == nil {
		switch info.Status {
		case "", qmp.MigrationNone, qmp.MigrationCompleted, qmp.MigrationCancelled, qmp.MigrationFailed, qmp.MigrationColo:
		default:
			out.Migrating = true
		}
	}
	if st, err := vm.QMP.QueryStatus(ctx); err == nil && st.Status == "inmigrate" {
		out.Incoming = true
	}
	return out, nil
}

// FlushAndKill ends a protected primary for a planned switchover: a checkpoint first, so that
// what colo-compare holds is released and the secondary has all the primary has (setting the
// checkpoint delay during COLO starts one at once), then SIGKILL. It waits for the checkpoint
// at most until ctx ends.
func FlushAndKill(ctx context.Context, vm *VM, delay time.Duration) {
	sub := vm.QMP.Subscribe(qmp.EventResume)
	d := uint32(delay / time.Millisecond)
	if err := vm.QMP.MigrateSetParameters(ctx, qmp.MigrationParameters{XCheckpointDelay: &d}); err == nil {
		_, _ = sub.Next(ctx)
	}
	sub.Close()
	vm.Kill()
}

// IsColoError reports whether s is COLO ending with an error (the peer's QEMU or the link
// between them is gone).
func (s Signal) IsColoError() bool {
	return s.Kind == SignalColoExit && s.Reason == qmp.ColoExitError
}
