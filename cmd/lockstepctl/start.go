package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
)

func (a *app) newStartCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "start PAIR",
		Short: "Boot a stopped or failed pair's VM again and protect it",
		Long: `Boot the VM of a stopped or failed pair again, from the last primary's disk (a cold
restart), then protect it as at creation. With -o json or yaml it prints the pair's status.`,
		Example:           `  lockstepctl start db1 && lockstepctl watch db1`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			st, err := a.ops.StartPair(ctx, args[0])
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
