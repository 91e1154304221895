package main

import (
	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
)

func (a *app) newConvertCommand() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "convert -f FILE",
		Short: "Print a spec of the old protobuf-JSON format as a lockstep.dev/v1 Pair",
		Long: `Read a spec file (- for standard input) and print it as a lockstep.dev/v1 Pair, in YAML
(or JSON with -o json). A spec already in that format is checked and printed again. It works
offline: no agent is asked.`,
		Example: `  lockstepctl convert -f old-db1.yaml > db1.yaml`,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if file == "" {
				return usagef("convert needs -f FILE")
			}
			spec, _, err := a.readSpec(file)
			if err != nil {
				return err
			}
			p := pairspec.FromProto(spec, nil)
			if a.output != "json" {
				a.output = "yaml"
			}
			return a.emit(p)
		},
	}
	cmd.Flags().StringVarP(&file, "filename", "f", "", "spec `FILE`, - for standard input")
	_ = cmd.MarkFlagFilename("filename", "yaml", "yml", "json")
	return cmd
}
