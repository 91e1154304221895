package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
)

func (a *app) newStopCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "stop PAIR",
		Short: "Stop a pair's QEMUs, keeping the pair and its disks",
		Long: `Stop both QEMUs of a pair, its VM included, and keep the pair and its disks: the pair is
then stopped, and "lockstepctl start" boots it again from the primary's disk. With -o json or
yaml it prints the pair's status.`,
		Example:           `  lockstepctl stop db1`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			st, err := a.ops.StopPair(ctx, args[0])
			if err != nil {
				return err
			}
			if a.output != "table" {
				return a.emit(pairspec.StatusFromProto(st))
			}
			fmt.Fprintf(a.out, "%s: %s\n", args[0], stateName(st.GetState()))
			return nil
		},
	}
}
