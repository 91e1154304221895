// Command lockstepctl is the operator's CLI of lockstep: it talks to a lockstepd agent over its
// gRPC API (never to QEMU).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"gopkg.in/yaml.v3"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1 // the operation failed
	exitUsage  = 2 // bad usage or bad input
)

const defaultAddr = "unix:///run/lockstep/lockstepd.sock"

const usage = `lockstepctl operates lockstep: VMs kept running in COLO lockstep on two hosts.

Usage:
  lockstepctl [--addr ADDR] COMMAND [flags] [args]

Commands:
  create -f FILE         create a pair from a spec (YAML or JSON) and start protecting it
  list                   list the pairs
  status [PAIR]          show a pair's status (every pair's without PAIR)
  watch PAIR             stream a pair's events: state changes, steps, checkpoints, resync
  failover PAIR          switch the roles over (planned); --forced fails over at once
  reprotect PAIR         protect a degraded pair now
  set PAIR               change tunables at run time (--checkpoint-delay, --max-bandwidth)
  delete PAIR            stop a pair's VM and forget the pair
  completion bash        print a bash completion script

Global flags:
  --addr ADDR            the agent's API: unix:///path or tcp://host:port
                         (default $LOCKSTEP_ADDR or ` + defaultAddr + `)
  --tls-cert FILE        client certificate (PEM) for an agent on tcp:// with mutual TLS
  --tls-key FILE         the client certificate's key (PEM)
  --tls-ca FILE          CA (PEM) that the agent's certificate must chain to
                         (the three go together; without them tcp:// is plaintext,
                         for an agent started with --insecure)
  --timeout D            how long a command waits for the agent (default 30s)
  -o FORMAT              output: table, json or yaml (default table)

Examples:
  lockstepctl create -f db1.yaml
  lockstepctl status db1 -o json
  lockstepctl watch db1
  lockstepctl failover db1
  lockstepctl set db1 --checkpoint-delay 500ms
  lockstepctl --addr tcp://agent1:7443 --tls-cert me.pem --tls-key me.key --tls-ca ca.pem list

Exit codes: 0 done, 1 the operation failed, 2 bad usage or bad input.
`

type cli struct {
	addr    string
	tlsCert string
	tlsKey  string
	tlsCA   string
	timeout time.Duration
	output  string
	out     io.Writer
	errOut  io.Writer
	conn    *grpc.ClientConn
	client  pb.PairServiceClient
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

func run(args []string, stdout, stderr io.Writer) int {
	c := &cli{out: stdout, errOut: stderr}
	gfs := flag.NewFlagSet("lockstepctl", flag.ContinueOnError)
	gfs.SetOutput(stderr)
	gfs.Usage = func() { fmt.Fprint(stderr, usage) }
	addr := os.Getenv("LOCKSTEP_ADDR")
	if addr == "" {
		addr = defaultAddr
	}
	gfs.StringVar(&c.addr, "addr", addr, "")
	gfs.StringVar(&c.tlsCert, "tls-cert", "", "")
	gfs.StringVar(&c.tlsKey, "tls-key", "", "")
	gfs.StringVar(&c.tlsCA, "tls-ca", "", "")
	gfs.DurationVar(&c.timeout, "timeout", 30*time.Second, "")
	gfs.StringVar(&c.output, "o", "table", "")
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	rest := gfs.Args()
	if len(rest) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	cmd, cargs := rest[0], rest[1:]
	var err error
	switch cmd {
	case "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	case "completion":
		err = c.completion(cargs)
	case "create", "list", "status", "watch", "failover", "reprotect", "set", "delete":
		err = c.dispatch(cmd, cargs)
	default:
		err = usagef("unknown command %q (see lockstepctl help)", cmd)
	}
	return c.report(err)
}

// report prints err and returns the exit code for it.
func (c *cli) report(err error) int {
	if err == nil {
		return exitOK
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(c.errOut, "lockstepctl: %s\n", ue.msg)
		return exitUsage
	}
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	st, ok := status.FromError(err)
	if !ok {
		fmt.Fprintf(c.errOut, "lockstepctl: %v\n", err)
		return exitFailed
	}
	fmt.Fprintf(c.errOut, "lockstepctl: %s\n", st.Message())
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fmt.Fprintf(c.errOut, "  %s: %s\n", v.GetField(), v.GetDescription())
			}
		}
	}
	switch st.Code() {
	case codes.InvalidArgument, codes.NotFound, codes.AlreadyExists:
		return exitUsage
	case codes.Unavailable:
		fmt.Fprintf(c.errOut, "  is lockstepd running and serving %s? (--addr or $LOCKSTEP_ADDR)\n", c.addr)
		if strings.HasPrefix(c.addr, "tcp://") && c.tlsCert == "" {
			fmt.Fprintln(c.errOut, "  an agent with mutual TLS needs --tls-cert, --tls-key and --tls-ca")
		}
	}
	return exitFailed
}

func (c *cli) connect() error {
	target := c.addr
	creds := insecure.NewCredentials()
	useTLS := c.tlsCert != "" || c.tlsKey != "" || c.tlsCA != ""
	switch {
	case strings.HasPrefix(target, "unix://"):
		if useTLS {
			return usagef("--tls-cert, --tls-key and --tls-ca are for a tcp:// address, not %s", c.addr)
		}
		target = "unix:" + strings.TrimPrefix(target, "unix://")
	case strings.HasPrefix(target, "tcp://"):
		target = "passthrough:///" + strings.TrimPrefix(target, "tcp://")
		if useTLS {
			var err error
			if creds, err = c.clientTLS(); err != nil {
				return err
			}
		}
	default:
		return usagef("--addr %q: want unix:///path or tcp://host:port", c.addr)
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	c.conn, c.client = conn, pb.NewPairServiceClient(conn)
	return nil
}

// clientTLS loads the client side of mutual TLS from --tls-cert, --tls-key and --tls-ca.
func (c *cli) clientTLS() (credentials.TransportCredentials, error) {
	if c.tlsCert == "" || c.tlsKey == "" || c.tlsCA == "" {
		return nil, usagef("mutual TLS needs --tls-cert, --tls-key and --tls-ca together")
	}
	certPEM, err := os.ReadFile(c.tlsCert)
	if err != nil {
		return nil, usagef("--tls-cert: %v", err)
	}
	keyPEM, err := os.ReadFile(c.tlsKey)
	if err != nil {
		return nil, usagef("--tls-key: %v", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, usagef("--tls-cert %s, --tls-key %s: %v", c.tlsCert, c.tlsKey, err)
	}
	caPEM, err := os.ReadFile(c.tlsCA)
	if err != nil {
		return nil, usagef("--tls-ca: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, usagef("--tls-ca %s: no certificate in it", c.tlsCA)
	}
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}), nil
}

func (c *cli) dispatch(cmd string, args []string) error {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(c.errOut)
	var file, reason string
	var forced, wait bool
	var delay, compare time.Duration
	var bandwidth uint64
	fs.StringVar(&c.output, "o", c.output, "output: table, json or yaml")
	fs.StringVar(&c.addr, "addr", c.addr, "the agent's API: unix:///path or tcp://host:port")
	fs.StringVar(&c.tlsCert, "tls-cert", c.tlsCert, "client certificate (PEM) for mutual TLS")
	fs.StringVar(&c.tlsKey, "tls-key", c.tlsKey, "the client certificate's key (PEM)")
	fs.StringVar(&c.tlsCA, "tls-ca", c.tlsCA, "CA (PEM) that the agent's certificate must chain to")
	fs.DurationVar(&c.timeout, "timeout", c.timeout, "how long to wait for the agent")
	switch cmd {
	case "create":
		fs.StringVar(&file, "f", "", "spec file (YAML or JSON; - for standard input)")
		fs.BoolVar(&wait, "wait", false, "wait until the pair is protected, showing progress")
	case "failover":
		fs.BoolVar(&forced, "forced", false, "fail over at once, as if the primary had died")
		fs.StringVar(&reason, "reason", "", "why, for the record")
	case "set":
		fs.DurationVar(&delay, "checkpoint-delay", 0, "longest time between checkpoints, e.g. 200ms")
		fs.DurationVar(&compare, "compare-timeout", 0, "how long colo-compare holds a packet (next protection only)")
		fs.Uint64Var(&bandwidth, "max-bandwidth", 0, "cap of the checkpoint stream in bytes per second")
	}
	// Flags may come before or after the pair's name.
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			return usageError{err.Error()}
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	switch c.output {
	case "table", "json", "yaml":
	default:
		return usagef("-o %q: want table, json or yaml", c.output)
	}
	need := map[string]int{"create": 0, "list": 0, "watch": 1, "failover": 1, "reprotect": 1, "set": 1, "delete": 1}
	if cmd == "status" {
		if len(positional) > 1 {
			return usagef("status takes at most one pair name")
		}
	} else if len(positional) != need[cmd] {
		if need[cmd] == 1 {
			return usagef("%s needs exactly one pair name", cmd)
		}
		return usagef("%s takes no arguments", cmd)
	}
	if err := c.connect(); err != nil {
		return err
	}
	defer c.conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	switch cmd {
	case "create":
		if file == "" {
			return usagef("create needs -f FILE")
		}
		spec, err := readSpec(file)
		if err != nil {
			return err
		}
		resp, err := c.client.CreatePair(ctx, &pb.CreatePairRequest{Spec: spec})
		if err != nil {
			return err
		}
		if wait {
			return c.watch(spec.GetName(), true)
		}
		return c.print(resp.GetPair())
	case "list", "status":
		if len(positional) == 1 {
			resp, err := c.client.GetPair(ctx, &pb.GetPairRequest{Name: positional[0]})
			if err != nil {
				return err
			}
			return c.print(resp.GetPair())
		}
		resp, err := c.client.ListPairs(ctx, &pb.ListPairsRequest{})
		if err != nil {
			return err
		}
		return c.printList(resp.GetPairs())
	case "watch":
		return c.watch(positional[0], false)
	case "failover":
		mode := pb.FailoverMode_FAILOVER_MODE_PLANNED
		if forced {
			mode = pb.FailoverMode_FAILOVER_MODE_FORCED
		}
		resp, err := c.client.Failover(ctx, &pb.FailoverRequest{Name: positional[0], Mode: mode, Reason: reason})
		if err != nil {
			return err
		}
		if c.output != "table" {
			return c.emit(resp)
		}
		f := resp.GetFailover()
		fmt.Fprintf(c.out, "failover of %s: %s in %v; now %s on %s\n", positional[0], f.GetSequence(),
			f.GetDuration().AsDuration().Round(time.Millisecond), stateName(resp.GetStatus().GetState()), resp.GetStatus().GetPrimaryHost())
		if !f.GetSucceeded() {
			return fmt.Errorf("failover failed at step %q: %s", f.GetFailedStep(), f.GetError())
		}
		return nil
	case "reprotect":
		resp, err := c.client.Reprotect(ctx, &pb.ReprotectRequest{Name: positional[0]})
		if err != nil {
			return err
		}
		if c.output != "table" {
			return c.emit(resp)
		}
		fmt.Fprintf(c.out, "%s: %s\n", positional[0], stateName(resp.GetStatus().GetState()))
		return nil
	case "set":
		req := &pb.SetParametersRequest{Name: positional[0]}
		if delay != 0 {
			req.CheckpointDelay = durationpb.New(delay)
		}
		if compare != 0 {
			req.CompareTimeout = durationpb.New(compare)
		}
		if bandwidth != 0 {
			req.MaxBandwidthBytesPerSecond = &bandwidth
		}
		if req.CheckpointDelay == nil && req.CompareTimeout == nil && req.MaxBandwidthBytesPerSecond == nil {
			return usagef("set needs at least one of --checkpoint-delay, --compare-timeout, --max-bandwidth")
		}
		resp, err := c.client.SetParameters(ctx, req)
		if err != nil {
			return err
		}
		if c.output != "table" {
			return c.emit(resp)
		}
		t := resp.GetTunables()
		fmt.Fprintf(c.out, "%s: checkpoint delay %v, compare timeout %v, max bandwidth %d B/s\n", positional[0],
			t.GetCheckpointDelay().AsDuration(), t.GetCompareTimeout().AsDuration(), t.GetMaxBandwidthBytesPerSecond())
		return nil
	case "delete":
		if _, err := c.client.DeletePair(ctx, &pb.DeletePairRequest{Name: positional[0]}); err != nil {
			return err
		}
		fmt.Fprintf(c.out, "%s deleted\n", positional[0])
		return nil
	}
	return nil
}

// readSpec reads a PairSpec from YAML or JSON (protobuf JSON field names).
func readSpec(file string) (*pb.PairSpec, error) {
	var b []byte
	var err error
	if file == "-" {
		b, err = io.ReadAll(os.Stdin)
	} else {
		b, err = os.ReadFile(file)
	}
	if err != nil {
		return nil, usagef("spec: %v", err)
	}
	var v any
	if err := yaml.Unmarshal(b, &v); err != nil {
		return nil, usagef("spec %s: %v", file, err)
	}
	js, err := json.Marshal(jsonable(v))
	if err != nil {
		return nil, usagef("spec %s: %v", file, err)
	}
	spec := &pb.PairSpec{}
	if err := protojson.Unmarshal(js, spec); err != nil {
		return nil, usagef("spec %s: %v", file, err)
	}
	return spec, nil
}

// jsonable turns YAML's map[string]any trees into JSON-encodable values.
func jsonable(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			x[k] = jsonable(e)
		}
		return x
	case map[any]any:
		m := map[string]any{}
		for k, e := range x {
			m[fmt.Sprint(k)] = jsonable(e)
		}
		return m
	case []any:
		for i, e := range x {
			x[i] = jsonable(e)
		}
	}
	return v
}

var marshal = protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: false}

func (c *cli) emit(m proto.Message) error {
	b, err := marshal.Marshal(m)
	if err != nil {
		return err
	}
	if c.output == "json" {
		fmt.Fprintln(c.out, string(b))
		return nil
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	y, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	_, err = c.out.Write(y)
	return err
}

func stateName(s pb.PairState) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(s.String(), "PAIR_STATE_"), "_", "-"))
}

func (c *cli) print(p *pb.Pair) error {
	if c.output != "table" {
		return c.emit(p.GetStatus())
	}
	st := p.GetStatus()
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "pair:\t%s\n", p.GetSpec().GetName())
	fmt.Fprintf(w, "state:\t%s\t%s\n", stateName(st.GetState()), st.GetStateReason())
	fmt.Fprintf(w, "primary:\t%s\t%s\n", st.GetPrimaryHost(), strings.ToLower(strings.TrimPrefix(st.GetPrimary().GetColoMode().String(), "COLO_MODE_")))
	sec := st.GetSecondaryHost()
	if sec == "" {
		sec = "-"
	}
	fmt.Fprintf(w, "secondary:\t%s\t%s\n", sec, strings.ToLower(strings.TrimPrefix(st.GetSecondary().GetColoMode().String(), "COLO_MODE_")))
	fmt.Fprintf(w, "generation:\t%d\n", st.GetGeneration())
	if st.GetEpoch() > 0 {
		// A pair that spans two hosts: the fencing epoch, and what this agent reaches.
		fmt.Fprintf(w, "epoch:\t%d\n", st.GetEpoch())
		store := "reachable"
		if !st.GetStoreReachable() {
			store = "UNREACHABLE (the pair runs on without renewing its lease while its secondary confirms)"
		}
		fmt.Fprintf(w, "store:\t%s\n", store)
		peer := "reachable"
		if !st.GetPeer().GetReachable() {
			peer = "UNREACHABLE"
		}
		if t := st.GetPeer().GetLastHeartbeatTime(); t != nil {
			peer += fmt.Sprintf(" (last heartbeat %s)", t.AsTime().Local().Format("15:04:05.000"))
		}
		fmt.Fprintf(w, "peer agent:\t%s\n", peer)
	}
	cs := st.GetCheckpointStats()
	fmt.Fprintf(w, "checkpoints:\t%d (%d early)\t%.1f/s, pause p50 %v p99 %v, %d B each\n", cs.GetCount(), cs.GetEarlyCount(), cs.GetRatePerSecond(),
		cs.GetPauseP50().AsDuration().Round(100*time.Microsecond), cs.GetPauseP99().AsDuration().Round(100*time.Microsecond), cs.GetMeanCheckpointBytes())
	if r := st.GetResync(); r.GetLength() > 0 && st.GetState() != pb.PairState_PAIR_STATE_PROTECTED {
		fmt.Fprintf(w, "resync:\t%s\n", bar(r.GetOffset(), r.GetLength()))
	}
	if s := st.GetCurrentStep(); s != nil {
		fmt.Fprintf(w, "step:\t%s %d/%d\t%s\n", s.GetSequence(), s.GetIndex(), s.GetTotal(), s.GetStep())
	}
	if f := st.GetLastFailover(); f != nil {
		fmt.Fprintf(w, "last failover:\t%s\t%s in %v (%s)\n", f.GetStartTime().AsTime().Local().Format(time.DateTime), f.GetSequence(),
			f.GetDuration().AsDuration().Round(time.Millisecond), f.GetReason())
	}
	t := st.GetTunables()
	fmt.Fprintf(w, "checkpoint delay:\t%v\n", t.GetCheckpointDelay().AsDuration())
	if b := t.GetBootSettle().AsDuration(); b > 0 {
		fmt.Fprintf(w, "boot settle:\t%v before the first protection\n", b)
	}
	return w.Flush()
}

func (c *cli) printList(ps []*pb.Pair) error {
	if c.output != "table" {
		resp := &pb.ListPairsResponse{Pairs: ps}
		return c.emit(resp)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].GetSpec().GetName() < ps[j].GetSpec().GetName() })
	w := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "PAIR\tSTATE\tPRIMARY\tSECONDARY\tGEN\tCHECKPOINTS\tPAUSE P50")
	for _, p := range ps {
		st := p.GetStatus()
		sec := st.GetSecondaryHost()
		if sec == "" {
			sec = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\t%v\n", p.GetSpec().GetName(), stateName(st.GetState()), st.GetPrimaryHost(), sec,
			st.GetGeneration(), st.GetCheckpointStats().GetCount(), st.GetCheckpointStats().GetPauseP50().AsDuration().Round(100*time.Microsecond))
	}
	return w.Flush()
}

// bar draws a progress bar.
func bar(off, length uint64) string {
	const width = 30
	if length == 0 {
		return ""
	}
	n := int(off * width / length)
	return fmt.Sprintf("[%s%s] %3d%% %d/%d MiB", strings.Repeat("#", n), strings.Repeat(".", width-n), off*100/length, off>>20, length>>20)
}

// watch streams the pair's events until interrupted; with untilProtected it returns when the
// pair is protected (and fails when it fails).
func (c *cli) watch(name string, untilProtected bool) error {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	stream, err := c.client.WatchPair(ctx, &pb.WatchPairRequest{Name: name})
	if err != nil {
		return err
	}
	lastBar := ""
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		ev := resp.GetEvent()
		if c.output != "table" {
			if err := c.emit(ev); err != nil {
				return err
			}
		} else {
			ts := ev.GetTime().AsTime().Local().Format("15:04:05.000")
			switch e := ev.GetEvent().(type) {
			case *pb.PairEvent_Status:
				fmt.Fprintf(c.out, "%s status    %s, primary %s, generation %d\n", ts, stateName(e.Status.GetState()), e.Status.GetPrimaryHost(), e.Status.GetGeneration())
			case *pb.PairEvent_StateChange:
				fmt.Fprintf(c.out, "%s state     %s -> %s %s\n", ts, stateName(e.StateChange.GetFromState()), stateName(e.StateChange.GetToState()), e.StateChange.GetReason())
			case *pb.PairEvent_Step:
				s := e.Step
				if s.GetPhase() == pb.StepPhase_STEP_PHASE_STARTED {
					continue
				}
				fmt.Fprintf(c.out, "%s step      %s %2d/%d %-4s %s (%v)%s\n", ts, s.GetSequence(), s.GetIndex(), s.GetTotal(),
					strings.ToLower(strings.TrimPrefix(s.GetPhase().String(), "STEP_PHASE_")), s.GetStep(), s.GetElapsed().AsDuration().Round(100*time.Microsecond), errSuffix(s.GetError()))
			case *pb.PairEvent_Resync:
				b := bar(e.Resync.GetOffset(), e.Resync.GetLength())
				if b != lastBar {
					fmt.Fprintf(c.out, "%s resync    %s\n", ts, b)
					lastBar = b
				}
			case *pb.PairEvent_CheckpointStats:
				s := e.CheckpointStats
				fmt.Fprintf(c.out, "%s ckpt      %d (%d early), %.1f/s, pause p50 %v p99 %v\n", ts, s.GetCount(), s.GetEarlyCount(), s.GetRatePerSecond(),
					s.GetPauseP50().AsDuration().Round(100*time.Microsecond), s.GetPauseP99().AsDuration().Round(100*time.Microsecond))
			case *pb.PairEvent_Failover:
				f := e.Failover
				fmt.Fprintf(c.out, "%s failover  %s in %v: %s%s\n", ts, f.GetSequence(), f.GetDuration().AsDuration().Round(time.Millisecond), f.GetReason(), errSuffix(f.GetError()))
			}
		}
		if untilProtected {
			var st pb.PairState
			switch e := ev.GetEvent().(type) {
			case *pb.PairEvent_Status:
				st = e.Status.GetState()
			case *pb.PairEvent_StateChange:
				st = e.StateChange.GetToState()
			}
			switch st {
			case pb.PairState_PAIR_STATE_PROTECTED:
				return nil
			case pb.PairState_PAIR_STATE_FAILED:
				return errors.New("the pair failed")
			}
		}
	}
}

func errSuffix(s string) string {
	if s == "" {
		return ""
	}
	return ": " + s
}

func (c *cli) completion(args []string) error {
	if len(args) != 1 || args[0] != "bash" {
		return usagef("completion supports: bash")
	}
	fmt.Fprint(c.out, `# bash completion for lockstepctl; load with: source <(lockstepctl completion bash)
_lockstepctl() {
  local cur="${COMP_WORDS[COMP_CWORD]}" cmd="${COMP_WORDS[1]}"
  if [ "$COMP_CWORD" -eq 1 ]; then
    COMPREPLY=($(compgen -W "create list status watch failover reprotect set delete completion help" -- "$cur")); return
  fi
  case "$cmd" in
    status|watch|failover|reprotect|set|delete)
      if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "-o --forced --reason --checkpoint-delay --compare-timeout --max-bandwidth" -- "$cur"))
      else
        COMPREPLY=($(compgen -W "$(lockstepctl list 2>/dev/null | awk 'NR>1{print $1}')" -- "$cur"))
      fi ;;
    create) COMPREPLY=($(compgen -f -- "$cur")) ;;
  esac
}
complete -F _lockstepctl lockstepctl
`)
	return nil
}
