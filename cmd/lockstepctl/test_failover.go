package main

import (
	"time"

	"github.com/spf13/cobra"
)

func (a *app) newTestFailoverCommand() *cobra.Command {
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "test-failover PAIR",
		Short: "Drill: kill the primary's QEMU for real and follow the failover and re-protection",
		Long: `A drill: the agent kills the primary's QEMU (SIGKILL), the secondary takes over, and a fresh
secondary is protected again. lockstepctl follows it and prints the detection time (kill to
the agent's reaction), the failover's QMP sequence and its time, and the re-protection time.
It refuses unless the pair is protected, and exits 1 if the pair is not protected again
within --wait.`,
		Example: `  lockstepctl test-failover db1
  lockstepctl test-failover db1 -o json | jq .total`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.drill(cmd.Name(), args[0], drillPrimary, wait)
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", 10*time.Minute, "wait at most `D` for the pair to be protected again")
	return cmd
}
