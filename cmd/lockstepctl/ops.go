package main

import (
	"context"
	"time"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// opsAPI is the operator's calls beyond reading and changing pairs: a dry-run create, start
// and stop, drills and the console. grpcOps serves them over the agent's PairService; the
// tests put a fake in its place (fake_test.go).
type opsAPI interface {
	// DryRunCreate has the agent check spec as CreatePair would, conflicts included, and return
	// the pair as it would be stored (defaults filled in), changing nothing.
	DryRunCreate(ctx context.Context, spec *pb.PairSpec) (*pb.Pair, error)
	// StartPair boots a stopped (or failed) pair's VM again from the last primary's disk and
	// protects it; FAILED_PRECONDITION when it runs.
	StartPair(ctx context.Context, name string) (*pb.PairStatus, error)
	// StopPair stops both QEMUs of a pair and keeps the pair and its disks (state STOPPED).
	StopPair(ctx context.Context, name string) (*pb.PairStatus, error)
	// KillForDrill kills, for real (SIGKILL), the QEMU of the pair's side that has role
	// (primary or secondary) and says which QEMU it killed and when, by the agent's clock; it
	// refuses with FAILED_PRECONDITION unless the pair is protected.
	KillForDrill(ctx context.Context, name string, target drillTarget) (*drillKill, error)
	// Console attaches to the primary's serial console: what is sent goes to the guest's serial
	// port, what the guest writes comes back.
	Console(ctx context.Context, name string) (consoleStream, error)
}

// drillTarget is the side a drill kills.
type drillTarget int

// Drill targets.
const (
	drillPrimary drillTarget = iota + 1
	drillSecondary
)

func (t drillTarget) String() string {
	if t == drillSecondary {
		return "secondary"
	}
	return "primary"
}

// drillKill is the QEMU a drill killed.
type drillKill struct {
	Host string
	PID  int64
	At   time.Time
}

// consoleStream is an attached serial console.
type consoleStream interface {
	// Send writes to the guest's serial port.
	Send(p []byte) error
	// Recv returns what the guest wrote next; io.EOF when the console closed.
	Recv() ([]byte, error)
	// CloseSend says no more input comes.
	CloseSend() error
}

// grpcOps is opsAPI over the agent's PairService.
type grpcOps struct{ a *app }

var _ opsAPI = grpcOps{}

func (g grpcOps) DryRunCreate(ctx context.Context, spec *pb.PairSpec) (*pb.Pair, error) {
	resp, err := g.a.client.CreatePair(ctx, &pb.CreatePairRequest{Spec: spec, DryRun: true})
	if err != nil {
		return nil, err
	}
	return resp.GetPair(), nil
}

func (g grpcOps) StartPair(ctx context.Context, name string) (*pb.PairStatus, error) {
	resp, err := g.a.client.StartPair(ctx, &pb.StartPairRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return resp.GetStatus(), nil
}

func (g grpcOps) StopPair(ctx context.Context, name string) (*pb.PairStatus, error) {
	resp, err := g.a.client.StopPair(ctx, &pb.StopPairRequest{Name: name})
	if err != nil {
		return nil, err
	}
	return resp.GetStatus(), nil
}

func (g grpcOps) KillForDrill(ctx context.Context, name string, target drillTarget) (*drillKill, error) {
	t := pb.DrillTarget_DRILL_TARGET_PRIMARY
	if target == drillSecondary {
		t = pb.DrillTarget_DRILL_TARGET_SECONDARY
	}
	resp, err := g.a.client.Drill(ctx, &pb.DrillRequest{Name: name, Target: t})
	if err != nil {
		return nil, err
	}
	return &drillKill{Host: resp.GetHost(), PID: resp.GetPid(), At: resp.GetKillTime().AsTime()}, nil
}

func (g grpcOps) Console(ctx context.Context, name string) (consoleStream, error) {
	s, err := g.a.client.Console(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.Send(&pb.ConsoleRequest{Name: name}); err != nil {
		return nil, err
	}
	// The agent's first answer says whether it attached: an empty response, or its refusal
	// (unknown pair, no primary on that host, a console attached already).
	if _, err := s.Recv(); err != nil {
		return nil, err
	}
	return &grpcConsole{s: s}, nil
}

// grpcConsole is a consoleStream over the Console RPC.
type grpcConsole struct {
	s interface {
		Send(*pb.ConsoleRequest) error
		Recv() (*pb.ConsoleResponse, error)
		CloseSend() error
	}
}

func (c *grpcConsole) Send(p []byte) error { return c.s.Send(&pb.ConsoleRequest{Input: p}) }

func (c *grpcConsole) Recv() ([]byte, error) {
	m, err := c.s.Recv()
	if err != nil {
		return nil, err
	}
	return m.GetOutput(), nil
}

func (c *grpcConsole) CloseSend() error { return c.s.CloseSend() }
