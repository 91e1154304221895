package main

import (
	"github.com/spf13/cobra"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newGetCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "get [PAIR]",
		Short: "Print pairs: the spec with defaults filled in, and the status",
		Long: `Print a pair (every pair without PAIR). -o yaml and -o json print whole Pair objects
(apiVersion, kind, metadata, spec, status) in the format "create -f" takes; without PAIR, a
PairList. The table has one line per pair.`,
		Example: `  lockstepctl get
  lockstepctl get db1 -o yaml
  lockstepctl get db1 -o json | jq .status.state
  lockstepctl get db1 -o yaml | lockstepctl create -f -    # after delete, on another agent, ...`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("get takes at most one pair name")
			}
			return nil
		},
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ps, err := a.fetchPairs(args)
			if err != nil {
				return err
			}
			return a.printPairs(ps, len(args) == 1)
		},
	}
}

// fetchPairs gets the named pair, or every pair without a name.
func (a *app) fetchPairs(args []string) ([]*pb.Pair, error) {
	if err := a.dial(); err != nil {
		return nil, err
	}
	ctx, cancel := a.ctx()
	defer cancel()
	if len(args) == 1 {
		resp, err := a.client.GetPair(ctx, &pb.GetPairRequest{Name: args[0]})
		if err != nil {
			return nil, err
		}
		return []*pb.Pair{resp.GetPair()}, nil
	}
	resp, err := a.client.ListPairs(ctx, &pb.ListPairsRequest{})
	if err != nil {
		return nil, err
	}
	return resp.GetPairs(), nil
}
