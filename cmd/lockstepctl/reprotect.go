package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newReprotectCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "reprotect PAIR",
		Short: "Protect a degraded pair now",
		Long: `Start protecting a degraded pair now: a fresh secondary is prepared on the other side, the
disk resyncs, and COLO resumes. It returns once re-protection has started; follow it with
"lockstepctl watch". With -o json or yaml it prints the pair's status.`,
		Example:           `  lockstepctl reprotect db1 && lockstepctl watch db1`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			resp, err := a.client.Reprotect(ctx, &pb.ReprotectRequest{Name: args[0]})
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.emit(pairspec.StatusFromProto(resp.GetStatus()))
			}
			fmt.Fprintf(a.out, "%s: %s\n", args[0], stateName(resp.GetStatus().GetState()))
			return nil
		},
	}
}
