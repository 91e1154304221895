package controller

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// settleBoot waits out what is left of the boot settle, shown as a step that starts and ends;
// a QEMU that has run long enough, or a spec with none, does not wait; the primary's exit or
// the context's end cut the wait short with an error.
func TestSettleBoot(t *testing.T) {
	spec := checkpoint.Spec{Tunables: checkpoint.Tunables{BootSettle: 150 * time.Millisecond}}
	var steps []checkpoint.StepEvent
	progress := func(e checkpoint.StepEvent) { steps = append(steps, e) }
	ctx := context.Background()
	quiet := slog.New(slog.DiscardHandler)

	t0 := time.Now()
	if err := settleBoot(ctx, quiet, progress, spec, t0, nil); err != nil {
		t.Fatal(err)
	}
	if waited := time.Since(t0); waited < 150*time.Millisecond {
		t.Fatalf("waited %v of a 150ms settle", waited)
	}
	if len(steps) != 2 || steps[0].Phase != checkpoint.StepStarted || steps[1].Phase != checkpoint.StepDone ||
		!strings.Contains(steps[0].Step, "let the guest boot") {
		t.Fatalf("steps %+v", steps)
	}

	steps = nil
	if err := settleBoot(ctx, quiet, progress, spec, time.Now().Add(-time.Second), nil); err != nil || len(steps) != 0 {
		t.Fatalf("a QEMU running for 1s: err %v, steps %+v", err, steps)
	}
	none := spec
	none.Tunables.BootSettle = -1
	if err := settleBoot(ctx, quiet, progress, none, time.Now(), nil); err != nil || len(steps) != 0 {
		t.Fatalf("no settle: err %v, steps %+v", err, steps)
	}

	exited := make(chan struct{})
	close(exited)
	long := spec
	long.Tunables.BootSettle = time.Hour
	if err := settleBoot(ctx, quiet, progress, long, time.Now(), exited); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("primary gone: %v", err)
	}
	if last := steps[len(steps)-1]; last.Phase != checkpoint.StepFailed {
		t.Fatalf("the cut wait ended as %s", last.Phase)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := settleBoot(cctx, quiet, progress, long, time.Now(), nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}
