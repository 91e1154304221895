package main

import "github.com/spf13/cobra"

func (a *app) newListCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the pairs (the same as get without a name)",
		Long: `List every pair: a table with one line per pair, or with -o yaml or -o json a PairList of
whole Pair objects, as "get" prints them.`,
		Example: `  lockstepctl list
  lockstepctl list -o json | jq -r '.items[].metadata.name'`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := a.fetchPairs(nil)
			if err != nil {
				return err
			}
			return a.printPairs(ps, false)
		},
	}
}
