package main

import (
	"time"

	"github.com/spf13/cobra"
)

func (a *app) newTestRestartSecondaryCommand() *cobra.Command {
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "test-restart-secondary PAIR",
		Short: "Drill: kill the secondary's QEMU for real and follow the re-protection",
		Long: `A drill: the agent kills the secondary's QEMU (SIGKILL), the primary runs on alone, and a
fresh secondary is protected again. lockstepctl follows it and prints the detection time, the
QMP sequence the primary ran and its time, and the re-protection time. It refuses unless the
pair is protected, and exits 1 if the pair is not protected again within --wait.`,
		Example:           `  lockstepctl test-restart-secondary db1`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.drill(cmd.Name(), args[0], drillSecondary, wait)
		},
	}
	cmd.Flags().DurationVar(&wait, "wait", 10*time.Minute, "wait at most `D` for the pair to be protected again")
	return cmd
}
