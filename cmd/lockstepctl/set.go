package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newSetCommand() *cobra.Command {
	var delay, compare time.Duration
	var bandwidth string
	cmd := &cobra.Command{
		Use:   "set PAIR",
		Short: "Change a pair's tunables at run time",
		Long: `Change tunables of a running pair. They apply to the running QEMUs at once and are stored
with the pair's spec. With -o json or yaml it prints the tunables in effect, named as in the
spec.`,
		Example: `  lockstepctl set db1 --checkpoint-delay 500ms
  lockstepctl set db1 --max-bandwidth 100Mi/s
  lockstepctl set db1 --max-bandwidth 0    # back to QEMU's default`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &pb.SetParametersRequest{Name: args[0]}
			fs := cmd.Flags()
			if flagSet(fs, "checkpoint-delay") {
				req.CheckpointDelay = durationpb.New(delay)
			}
			if flagSet(fs, "compare-timeout") {
				req.CompareTimeout = durationpb.New(compare)
			}
			if flagSet(fs, "max-bandwidth") {
				bw, err := pairspec.ParseBytesPerSecond(bandwidth)
				if err != nil {
					return usagef("--max-bandwidth %v", err)
				}
				v := uint64(bw)
				req.MaxBandwidthBytesPerSecond = &v
			}
			if req.CheckpointDelay == nil && req.CompareTimeout == nil && req.MaxBandwidthBytesPerSecond == nil {
				return usagef("set needs at least one of --checkpoint-delay, --compare-timeout, --max-bandwidth")
			}
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			resp, err := a.client.SetParameters(ctx, req)
			if err != nil {
				return err
			}
			t := resp.GetTunables()
			if a.output != "table" {
				return a.emit(pairspec.FromProto(&pb.PairSpec{Tunables: t}, nil).Spec.Tunables)
			}
			fmt.Fprintf(a.out, "%s: checkpoint delay %v, compare timeout %v, max bandwidth %d B/s\n", args[0],
				t.GetCheckpointDelay().AsDuration(), t.GetCompareTimeout().AsDuration(), t.GetMaxBandwidthBytesPerSecond())
			return nil
		},
	}
	cmd.Flags().DurationVar(&delay, "checkpoint-delay", 0, "longest time `D` between checkpoints, 10ms to 1h, e.g. 200ms")
	cmd.Flags().DurationVar(&compare, "compare-timeout", 0, "how long (`D`) colo-compare holds a packet, 10ms to 1m (next protection only)")
	cmd.Flags().StringVar(&bandwidth, "max-bandwidth", "", "cap (`RATE`) of the checkpoint stream in bytes per second, e.g. 100Mi/s; 0 for QEMU's default")
	return cmd
}
