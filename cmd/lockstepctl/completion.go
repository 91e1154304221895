package main

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// completionTimeout bounds how long a shell waits for pair names.
const completionTimeout = 3 * time.Second

func (a *app) newCompletionCommand(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print a shell completion script",
		Long: `Print the completion script of a shell. It completes commands, flags and their values, and
pair names, which it asks the agent for (the agent of --addr, if given before the name).

  bash: source <(lockstepctl completion bash), or install it as
        /usr/share/bash-completion/completions/lockstepctl
  zsh:  lockstepctl completion zsh > "${fpath[1]}/_lockstepctl"
  fish: lockstepctl completion fish > ~/.config/fish/completions/lockstepctl.fish`,
		Example:               `  source <(lockstepctl completion bash)`,
		ValidArgs:             []string{"bash", "zsh", "fish"},
		DisableFlagsInUseLine: true,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("completion needs one shell: bash, zsh or fish")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			switch args[0] {
			case "bash":
				return root.GenBashCompletionV2(a.out, true)
			case "zsh":
				return root.GenZshCompletion(a.out)
			case "fish":
				return root.GenFishCompletion(a.out, true)
			}
			return usagef("completion supports bash, zsh and fish, not %q", args[0])
		},
	}
}

// completePairs completes a command's one pair name with the names the agent knows; it offers
// nothing (and no file names) when the agent cannot be reached.
func (a *app) completePairs(cmd *cobra.Command, args []string, toComplete string) ([]string, cobra.ShellCompDirective) {
	if len(args) > 0 {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	if err := a.dial(); err != nil {
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	ctx, cancel := context.WithTimeout(context.Background(), min(a.timeout, completionTimeout))
	defer cancel()
	resp, err := a.client.ListPairs(ctx, &pb.ListPairsRequest{})
	if err != nil {
		cobra.CompDebugln("listing pairs: "+err.Error(), true)
		return nil, cobra.ShellCompDirectiveNoFileComp
	}
	var names []string
	for _, p := range resp.GetPairs() {
		if n := p.GetSpec().GetName(); strings.HasPrefix(n, toComplete) {
			names = append(names, n+"\t"+stateName(p.GetStatus().GetState()))
		}
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}
