package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// settleBoot waits, before the first protection of a primary that booted the guest, until its
// QEMU (started then, exited closed at its exit) has run for the spec's BootSettle (see checkpoint.Tunables.BootSettle for why), and logs
// the wait, which progress reports as a step of its own (status and watch streams show it).
// It ends early with an error when ctx ends or the primary's QEMU exits.
func settleBoot(ctx context.Context, log *slog.Logger, progress checkpoint.Progress, spec checkpoint.Spec, started time.Time, exited <-chan struct{}) error {
	t0 := time.Now()
	left := spec.BootSettleLeft(started, t0)
	if left <= 0 {
		return nil
	}
	log.Info("letting the guest boot before the first protection", "wait", left.Round(time.Millisecond),
		"boot-settle", spec.Tunables.BootSettle, "accel", spec.ResolvedAccel())
	ev := checkpoint.StepEvent{Sequence: "boot-settle", Step: fmt.Sprintf("let the guest boot: %v of boot_settle %v left", left.Round(100*time.Millisecond), spec.Tunables.BootSettle),
		Index: 1, Total: 1, Phase: checkpoint.StepStarted}
	progress(ev)
	t := time.NewTimer(left)
	defer t.Stop()
	var err error
	select {
	case <-t.C:
	case <-exited:
		err = errors.New("the primary's QEMU exited while the guest booted")
	case <-ctx.Done():
		err = ctx.Err()
	}
	ev.Elapsed, ev.Phase, ev.Err = time.Since(t0), checkpoint.StepDone, err
	if err != nil {
		ev.Phase = checkpoint.StepFailed
	}
	progress(ev)
	return err
}
