package main

import (
	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
)

func (a *app) newStatusCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "status [PAIR]",
		Short: "Show how a pair is doing (every pair without PAIR)",
		Long: `Show a pair's status: state and why, which host runs the primary and the secondary, the
protection generation, checkpoint statistics, a resync's progress, the step being run, the
last failover; for a pair on two hosts also the fencing epoch and whether this agent reaches
the store and the peer agent. -o yaml and -o json print the status object (the same as the
status of "get -o yaml"); without PAIR, a mapping from each pair's name to its status.`,
		Example: `  lockstepctl status db1
  lockstepctl status db1 -o json | jq .checkpoints.pauseP99
  lockstepctl status`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("status takes at most one pair name")
			}
			return nil
		},
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := a.fetchPairs(args)
			if err != nil {
				return err
			}
			switch {
			case a.output == "table" && len(args) == 1:
				return a.printStatus(ps[0])
			case a.output == "table":
				return a.printPairTable(ps)
			case len(args) == 1:
				return a.emit(pairspec.StatusFromProto(ps[0].GetStatus()))
			}
			all := map[string]*pairspec.Status{}
			for _, p := range ps {
				all[p.GetSpec().GetName()] = pairspec.StatusFromProto(p.GetStatus())
			}
			return a.emit(all)
		},
	}
}
