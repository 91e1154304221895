package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// fakeAgent is a PairService that keeps pairs in memory and streams the events a test gives
// it: for what the real agent cannot do without QEMU (a protected pair, a drill).
type fakeAgent struct {
	pb.UnimplementedPairServiceServer
	mu       sync.Mutex
	pairs    map[string]*pb.Pair
	watchers map[string][]chan *pb.PairEvent
	created  []*pb.PairSpec
}

// serveFake serves a fakeAgent with the given pairs on a unix socket until the test ends.
func serveFake(t *testing.T, pairs ...*pb.Pair) (*fakeAgent, string) {
	t.Helper()
	f := &fakeAgent{pairs: map[string]*pb.Pair{}, watchers: map[string][]chan *pb.PairEvent{}}
	for _, p := range pairs {
		f.pairs[p.GetSpec().GetName()] = p
	}
	dir, err := os.MkdirTemp("", "lsfake")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterPairServiceServer(srv, f)
	served := make(chan struct{})
	go func() { srv.Serve(l); close(served) }()
	t.Cleanup(func() { srv.Stop(); <-served; os.RemoveAll(dir) })
	return f, "unix://" + sock
}

func (f *fakeAgent) CreatePair(ctx context.Context, req *pb.CreatePairRequest) (*pb.CreatePairResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	name := req.GetSpec().GetName()
	if _, ok := f.pairs[name]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "pair %q exists", name)
	}
	p := &pb.Pair{Spec: proto.Clone(req.GetSpec()).(*pb.PairSpec), Status: &pb.PairStatus{State: pb.PairState_PAIR_STATE_STARTING, PrimaryHost: req.GetSpec().GetPrimary().GetHost()}}
	f.pairs[name] = p
	f.created = append(f.created, p.Spec)
	return &pb.CreatePairResponse{Pair: p}, nil
}

func (f *fakeAgent) get(name string) (*pb.Pair, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p, ok := f.pairs[name]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "pair %q: no such pair", name)
	}
	return proto.Clone(p).(*pb.Pair), nil
}

func (f *fakeAgent) GetPair(ctx context.Context, req *pb.GetPairRequest) (*pb.GetPairResponse, error) {
	p, err := f.get(req.GetName())
	if err != nil {
		return nil, err
	}
	return &pb.GetPairResponse{Pair: p}, nil
}

func (f *fakeAgent) ListPairs(ctx context.Context, req *pb.ListPairsRequest) (*pb.ListPairsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := &pb.ListPairsResponse{}
	for _, p := range f.pairs {
		out.Pairs = append(out.Pairs, proto.Clone(p).(*pb.Pair))
	}
	sort.Slice(out.Pairs, func(i, j int) bool { return out.Pairs[i].GetSpec().GetName() < out.Pairs[j].GetSpec().GetName() })
	return out, nil
}

func (f *fakeAgent) DeletePair(ctx context.Context, req *pb.DeletePairRequest) (*pb.DeletePairResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pairs[req.GetName()]; !ok {
		return nil, status.Errorf(codes.NotFound, "pair %q: no such pair", req.GetName())
	}
	delete(f.pairs, req.GetName())
	return &pb.DeletePairResponse{}, nil
}

// WatchPair sends the status, then what emit sends, until the client goes.
func (f *fakeAgent) WatchPair(req *pb.WatchPairRequest, stream pb.PairService_WatchPairServer) error {
	p, err := f.get(req.GetName())
	if err != nil {
		return err
	}
	ch := make(chan *pb.PairEvent, 100)
	f.mu.Lock()
	f.watchers[req.GetName()] = append(f.watchers[req.GetName()], ch)
	f.mu.Unlock()
	if err := stream.Send(&pb.WatchPairResponse{Event: &pb.PairEvent{Time: timestamppb.Now(), Event: &pb.PairEvent_Status{Status: p.GetStatus()}}}); err != nil {
		return err
	}
	for {
		select {
		case <-stream.Context().Done():
			return nil
		case ev := <-ch:
			if err := stream.Send(&pb.WatchPairResponse{Event: ev}); err != nil {
				return err
			}
		}
	}
}

// emit sends events to the pair's watchers, and applies their states to the pair.
func (f *fakeAgent) emit(name string, evs ...*pb.PairEvent) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ev := range evs {
		if st := eventState(ev); st != pb.PairState_PAIR_STATE_UNSPECIFIED {
			if p := f.pairs[name]; p != nil {
				p.Status.State = st
			}
		}
		for _, ch := range f.watchers[name] {
			ch <- ev
		}
	}
}

func stateEvent(at time.Time, from, to pb.PairState, why string) *pb.PairEvent {
	return &pb.PairEvent{Time: timestamppb.New(at), Event: &pb.PairEvent_StateChange{StateChange: &pb.StateChange{FromState: from, ToState: to, Reason: why}}}
}

// fakeOps is the operator's API over a fakeAgent: a drill plays a failover's events.
type fakeOps struct {
	agent *fakeAgent
	// outcome of a drill: "protected" (the default), "failed" or "never" (no protection).
	outcome string
	kills   []string

	console *fakeConsole
}

var _ opsAPI = (*fakeOps)(nil)

func (f *fakeOps) DryRunCreate(ctx context.Context, spec *pb.PairSpec) (*pb.Pair, error) {
	s := proto.Clone(spec).(*pb.PairSpec)
	if s.MemoryMib == 0 {
		s.MemoryMib = 512
	}
	if _, err := f.agent.get(s.GetName()); err == nil {
		return nil, status.Errorf(codes.AlreadyExists, "pair %q exists", s.GetName())
	}
	return &pb.Pair{Spec: s}, nil
}

func (f *fakeOps) setState(name string, st pb.PairState) (*pb.PairStatus, error) {
	if _, err := f.agent.get(name); err != nil {
		return nil, err
	}
	f.agent.mu.Lock()
	defer f.agent.mu.Unlock()
	f.agent.pairs[name].Status.State = st
	return proto.Clone(f.agent.pairs[name].Status).(*pb.PairStatus), nil
}

func (f *fakeOps) StartPair(ctx context.Context, name string) (*pb.PairStatus, error) {
	return f.setState(name, pb.PairState_PAIR_STATE_STARTING)
}

func (f *fakeOps) StopPair(ctx context.Context, name string) (*pb.PairStatus, error) {
	return f.setState(name, pb.PairState_PAIR_STATE_STOPPED)
}

// KillForDrill plays what the agent reports when a side's QEMU is killed: detection 12 ms after
// the kill, a 62 ms failover sequence, then re-protection 1.5 s later.
func (f *fakeOps) KillForDrill(ctx context.Context, name string, target drillTarget) (*drillKill, error) {
	p, err := f.agent.get(name)
	if err != nil {
		return nil, err
	}
	if p.GetStatus().GetState() != pb.PairState_PAIR_STATE_PROTECTED {
		return nil, status.Errorf(codes.FailedPrecondition, "pair %q is not protected", name)
	}
	f.kills = append(f.kills, target.String())
	t0 := time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)
	prot, fo, deg, rep := pb.PairState_PAIR_STATE_PROTECTED, pb.PairState_PAIR_STATE_FAILING_OVER, pb.PairState_PAIR_STATE_DEGRADED, pb.PairState_PAIR_STATE_REPROTECTING
	seq := "failover-as-secondary"
	if target == drillSecondary {
		seq = "failover-as-primary"
	}
	evs := []*pb.PairEvent{
		stateEvent(t0.Add(12*time.Millisecond), prot, fo, target.String()+" QEMU exited: killed"),
		{Time: timestamppb.New(t0.Add(40 * time.Millisecond)), Event: &pb.PairEvent_Step{Step: &pb.StepProgress{Sequence: seq, Step: "secondary: x-colo-lost-heartbeat", Index: 2, Total: 8, Phase: pb.StepPhase_STEP_PHASE_DONE, Elapsed: durationpb.New(13 * time.Millisecond)}}},
		{Time: timestamppb.New(t0.Add(74 * time.Millisecond)), Event: &pb.PairEvent_Failover{Failover: &pb.FailoverSummary{Sequence: seq, Duration: durationpb.New(62 * time.Millisecond), Succeeded: f.outcome != "failed", ToHost: "hostb", FailedStep: map[bool]string{true: "secondary: x-colo-lost-heartbeat"}[f.outcome == "failed"], Error: map[bool]string{true: "QMP timeout"}[f.outcome == "failed"]}}},
	}
	switch f.outcome {
	case "failed":
		evs = append(evs, stateEvent(t0.Add(80*time.Millisecond), fo, pb.PairState_PAIR_STATE_FAILED, "failover failed"))
	case "never":
		evs = append(evs, stateEvent(t0.Add(75*time.Millisecond), fo, deg, "killed"))
	default:
		evs = append(evs, stateEvent(t0.Add(75*time.Millisecond), fo, deg, "killed"), stateEvent(t0.Add(500*time.Millisecond), deg, rep, "auto re-protection"),
			&pb.PairEvent{Time: timestamppb.New(t0.Add(time.Second)), Event: &pb.PairEvent_Resync{Resync: &pb.ResyncProgress{Offset: 64 << 20, Length: 64 << 20}}},
			stateEvent(t0.Add(1574*time.Millisecond), rep, prot, ""))
	}
	f.agent.emit(name, evs...)
	return &drillKill{Host: "hosta", PID: 4242, At: t0}, nil
}

func (f *fakeOps) Console(ctx context.Context, name string) (consoleStream, error) {
	if _, err := f.agent.get(name); err != nil {
		return nil, err
	}
	f.console.ctx = ctx
	return f.console, nil
}

// fakeConsole is a console whose guest writes a greeting, then echoes each input in brackets.
type fakeConsole struct {
	mu     sync.Mutex
	sent   bytes.Buffer
	out    chan []byte
	closed bool
	ctx    context.Context // the session's: Recv ends with it, as a gRPC stream's does
}

func newFakeConsole(greeting string) *fakeConsole {
	c := &fakeConsole{out: make(chan []byte, 100)}
	c.out <- []byte(greeting)
	return c
}

func (c *fakeConsole) Send(p []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sent.Write(p)
	c.out <- []byte(fmt.Sprintf("[%s]", p))
	return nil
}

func (c *fakeConsole) Recv() ([]byte, error) {
	select {
	case p := <-c.out:
		return p, nil
	case <-c.ctx.Done():
		return nil, c.ctx.Err()
	}
}

func (c *fakeConsole) CloseSend() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	return nil
}

// runFake runs lockstepctl with the operator's commands over f.
func runFake(p *fakeOps, stdin string, args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	a := &app{in: bytes.NewBufferString(stdin), out: &out, errOut: &errOut, ops: p}
	code := a.execute(args)
	return code, out.String(), errOut.String()
}
