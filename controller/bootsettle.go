package controller

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// settleBoot waits, before the first protection of a primary that booted the guest, until its
// QEMU has run for the spec's BootSettle (see checkpoint.Tunables.BootSettle for why), and logs
// the wait. It ends early with an error when ctx ends or the primary's QEMU exits.
func settleBoot(ctx context.Context, log *slog.Logger, spec checkpoint.Spec, prim *checkpoint.VM) error {
	left := spec.BootSettleLeft(prim.Started(), time.Now())
	if left <= 0 {
		return nil
	}
	log.Info("letting the guest boot before the first protection", "wait", left.Round(time.Millisecond),
		"boot-settle", spec.Tunables.BootSettle, "accel", spec.ResolvedAccel())
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-prim.Exited():
		return errors.New("the primary's QEMU exited while the guest booted")
	case <-ctx.Done():
		return ctx.Err()
	}
}
