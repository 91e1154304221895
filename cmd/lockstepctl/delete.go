package main

import (
	"fmt"

	"github.com/spf13/cobra"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newDeleteCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "delete PAIR",
		Short: "Stop a pair's QEMUs (its VM included) and forget the pair",
		Long: `Stop both QEMUs of a pair, the VM included, and forget the pair. The disk images are left
in place: "lockstepctl create" with the same spec boots the VM again from the primary's.`,
		Example:           `  lockstepctl get db1 -o yaml > db1.yaml && lockstepctl delete db1`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			if _, err := a.client.DeletePair(ctx, &pb.DeletePairRequest{Name: args[0]}); err != nil {
				return err
			}
			fmt.Fprintf(a.out, "%s deleted\n", args[0])
			return nil
		},
	}
}
