package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newFailoverCommand() *cobra.Command {
	var forced bool
	var reason string
	cmd := &cobra.Command{
		Use:   "failover PAIR",
		Short: "Switch a protected pair's roles over (planned); --forced fails over at once",
		Long: `Move the VM to the other side. Planned (the default): the primary's held output is flushed
with a checkpoint, the primary stops, the secondary takes over; clients keep their connections
and lose nothing. --forced: the secondary takes over at once from its last checkpoint, as if
the primary had died. Re-protection follows by itself unless the pair's autoReprotect is
false. The pair must be protected.`,
		Example: `  lockstepctl failover db1
  lockstepctl failover db1 --forced --reason "host A's disk is failing"`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			mode := pb.FailoverMode_FAILOVER_MODE_PLANNED
			if forced {
				mode = pb.FailoverMode_FAILOVER_MODE_FORCED
			}
			resp, err := a.client.Failover(ctx, &pb.FailoverRequest{Name: args[0], Mode: mode, Reason: reason})
			if err != nil {
				return err
			}
			f := resp.GetFailover()
			if a.output != "table" {
				if err := a.emit(&FailoverResult{Failover: pairspec.FailoverFromProto(f), Status: pairspec.StatusFromProto(resp.GetStatus())}); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(a.out, "failover of %s: %s in %v; now %s on %s\n", args[0], f.GetSequence(),
					f.GetDuration().AsDuration().Round(time.Millisecond), stateName(resp.GetStatus().GetState()), resp.GetStatus().GetPrimaryHost())
			}
			if !f.GetSucceeded() {
				return fmt.Errorf("failover failed at step %q: %s", f.GetFailedStep(), f.GetError())
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&forced, "forced", false, "fail over at once, as if the primary had died")
	cmd.Flags().StringVar(&reason, "reason", "", "why, for the logs and the failover's summary")
	return cmd
}

// FailoverResult is what failover prints with -o json or yaml.
type FailoverResult struct {
	Failover *pairspec.Failover `yaml:"failover" json:"failover"`
	Status   *pairspec.Status   `yaml:"status" json:"status"`
}
