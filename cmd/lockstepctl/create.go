package main

import (
	"fmt"

	"github.com/spf13/cobra"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newCreateCommand() *cobra.Command {
	var file string
	var wait, dryRun bool
	cmd := &cobra.Command{
		Use:   "create -f FILE",
		Short: "Create a pair from a spec and start protecting it",
		Long: `Create a pair from a spec file (a lockstep.dev/v1 Pair in YAML or JSON; - reads standard
input) and start it: the primary boots, then a secondary joins and protection starts. The
spec is checked here first (every refusal names its field, line and column), then by the
agent. A Pair printed by "lockstepctl get PAIR -o yaml" can be given again; its status is
ignored.

Specs in the old protobuf-JSON format (memoryMib, diskSizeBytes, ACCEL_TCG) are still taken,
with a warning, for one more release; "lockstepctl convert" rewrites them.`,
		Example: `  lockstepctl create -f db1.yaml --wait
  lockstepctl get db1 -o yaml > db1.yaml && lockstepctl delete db1 && lockstepctl create -f db1.yaml
  lockstepctl get db1 -o yaml | sed s/db1/db2/g | lockstepctl create -f -`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return usagef("create needs -f FILE")
			}
			spec, doc, err := a.readSpec(file)
			if err != nil {
				return err
			}
			if err := a.dial(); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			if dryRun {
				p, err := a.ops.DryRunCreate(ctx, spec)
				if err != nil {
					return &agentSpecError{file: file, pair: doc, err: err}
				}
				return a.printCreated(p, true)
			}
			resp, err := a.client.CreatePair(ctx, &pb.CreatePairRequest{Spec: spec})
			if err != nil {
				return &agentSpecError{file: file, pair: doc, err: err}
			}
			if wait {
				return a.watch(spec.GetName(), true)
			}
			return a.printCreated(resp.GetPair(), false)
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "spec `FILE`: a lockstep.dev/v1 Pair in YAML or JSON, - for standard input")
	_ = cmd.MarkFlagFilename("filename", "yaml", "yml", "json")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the pair is protected, showing progress")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "have the agent check the spec and print it with its defaults filled in; create nothing")
	return cmd
}

// printCreated prints a created (or dry-run) pair: the whole Pair in json and yaml.
func (a *app) printCreated(p *pb.Pair, dryRun bool) error {
	if a.output != "table" {
		return a.printPairs([]*pb.Pair{p}, true)
	}
	if dryRun {
		a.output = "yaml"
		return a.printPairs([]*pb.Pair{p}, true)
	}
	fmt.Fprintf(a.out, "pair %s created: %s\n", p.GetSpec().GetName(), stateName(p.GetStatus().GetState()))
	return nil
}
