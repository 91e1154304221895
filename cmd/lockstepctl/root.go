package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// app is one run of lockstepctl: the global flags, the streams and the agent's connection.
type app struct {
	addr    string
	tlsCert string
	tlsKey  string
	tlsCA   string
	timeout time.Duration
	output  string

	in     io.Reader
	out    io.Writer
	errOut io.Writer

	conn   *grpc.ClientConn
	client pb.PairServiceClient

	// ops serves the operator's calls beyond reading and changing pairs (ops.go): grpcOps,
	// unless a test set a fake.
	ops opsAPI
}

const rootLong = `lockstepctl operates lockstep: VMs kept running in COLO lockstep on two hosts (or two QEMUs
on one). It talks to a lockstepd agent over its gRPC API.

A pair is written as a manifest (apiVersion: lockstep.dev/v1, kind: Pair); "lockstepctl get
PAIR -o yaml" prints one back, status included, and "create -f" takes that output again.`

const rootExample = `  lockstepctl create -f db1.yaml --wait
  lockstepctl get db1 -o yaml
  lockstepctl status db1
  lockstepctl watch db1
  lockstepctl failover db1
  lockstepctl set db1 --checkpoint-delay 500ms
  lockstepctl --addr tcp://agent1:7443 --tls-cert me.pem --tls-key me.key --tls-ca ca.pem list
  source <(lockstepctl completion bash)`

const rootFooter = `
Exit codes: 0 done, 1 the operation failed, 2 bad usage or bad input.
The agent's address defaults to $LOCKSTEP_ADDR, else ` + defaultAddr + `.
`

// newRootCommand builds the command tree.
func (a *app) newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "lockstepctl",
		Short:         "Operate lockstep's protected pairs of VMs",
		Long:          rootLong,
		Example:       rootExample,
		SilenceErrors: true,
		SilenceUsage:  true,
		// Without a command, the usage goes to standard error and the exit code is 2.
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				msg := fmt.Sprintf("unknown command %q (see lockstepctl help)", args[0])
				if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
					msg += "; did you mean " + strings.Join(s, " or ") + "?"
				}
				return usageError{msg}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SetOut(a.errOut)
			_ = cmd.Usage()
			return usageError{}
		},
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			switch a.output {
			case "table", "json", "yaml":
				return nil
			}
			return usagef("-o %q: want table, json or yaml", a.output)
		},
	}
	root.SetIn(a.in)
	root.SetOut(a.out)
	root.SetErr(a.errOut)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usagef("%v (see %s --help)", err, cmd.CommandPath())
	})
	root.SetUsageTemplate(root.UsageTemplate() + rootFooter)

	addr := os.Getenv("LOCKSTEP_ADDR")
	if addr == "" {
		addr = defaultAddr
	}
	pf := root.PersistentFlags()
	pf.StringVar(&a.addr, "addr", addr, "the agent's API at `ADDR`: unix:///path or tcp://host:port")
	pf.StringVar(&a.tlsCert, "tls-cert", "", "client certificate `FILE` (PEM) for an agent on tcp:// with mutual TLS")
	pf.StringVar(&a.tlsKey, "tls-key", "", "`FILE` of the client certificate's key (PEM)")
	pf.StringVar(&a.tlsCA, "tls-ca", "", "CA `FILE` (PEM) that the agent's certificate must chain to; the three go together (without them tcp:// is plaintext, for an agent started with --insecure)")
	pf.DurationVar(&a.timeout, "timeout", 30*time.Second, "wait at most `D` for the agent")
	pf.StringVarP(&a.output, "output", "o", "table", "output `FORMAT`: table, json or yaml")
	_ = root.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))
	_ = root.RegisterFlagCompletionFunc("addr", cobra.NoFileCompletions)
	for _, f := range []string{"tls-cert", "tls-key", "tls-ca"} {
		_ = root.MarkPersistentFlagFilename(f, "pem", "crt", "key")
	}

	root.AddGroup(&cobra.Group{ID: "pairs", Title: "Pairs:"}, &cobra.Group{ID: "other", Title: "Other commands:"})
	for _, c := range []*cobra.Command{
		a.newCreateCommand(), a.newGetCommand(), a.newListCommand(), a.newStatusCommand(), a.newWatchCommand(),
		a.newFailoverCommand(), a.newReprotectCommand(), a.newSetCommand(), a.newDeleteCommand(),
	} {
		c.GroupID = "pairs"
		root.AddCommand(c)
	}
	if a.ops == nil {
		a.ops = grpcOps{a: a}
	}
	for _, c := range []*cobra.Command{a.newStartCommand(), a.newStopCommand(), a.newTestFailoverCommand(),
		a.newTestRestartSecondaryCommand(), a.newConsoleCommand()} {
		c.GroupID = "pairs"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{a.newConvertCommand(), a.newCertsCommand(), a.newCompletionCommand(root)} {
		c.GroupID = "other"
		root.AddCommand(c)
	}
	root.SetHelpCommandGroupID("other")
	root.SetCompletionCommandGroupID("other")
	return root
}

// execute runs the command line and returns the exit code.
func (a *app) execute(args []string) int {
	root := a.newRootCommand()
	root.SetArgs(args)
	err := root.Execute()
	if a.conn != nil {
		a.conn.Close()
	}
	return a.report(err)
}

// ctx is the context of one unary call: --timeout from now.
func (a *app) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), a.timeout)
}

// pairArgs accepts exactly one pair name.
func pairArgs(cmd *cobra.Command, args []string) error {
	if len(args) != 1 {
		return usagef("%s needs exactly one pair name", cmd.Name())
	}
	return nil
}

// noArgs accepts none.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) != 0 {
		return usagef("%s takes no arguments", cmd.Name())
	}
	return nil
}

// flagSet reports whether the flag name was given on the command line.
func flagSet(fs *pflag.FlagSet, name string) bool {
	f := fs.Lookup(name)
	return f != nil && f.Changed
}
