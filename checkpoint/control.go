package checkpoint

import (
	"context"
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
