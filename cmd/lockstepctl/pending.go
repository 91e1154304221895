package main

import (
	"context"
	"time"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// pendingAPI is what the CLI needs from the agent beyond today's PairService (issue 13). The
// commands built on it (create --dry-run, start, stop, test-failover, test-restart-secondary,
// console) are complete on the CLI's side and tested against a fake, but are left out of the
// shipped CLI until the API has these calls; app.pending is then set to an implementation over
// the gRPC client.
type pendingAPI interface {
	// DryRunCreate has the agent check spec as CreatePair would, conflicts included, and return
	// the pair as it would be stored (defaults filled in), changing nothing.
	// Wanted: CreatePairRequest.dry_run (bool); the response's pair with the status unset.
	DryRunCreate(ctx context.Context, spec *pb.PairSpec) (*pb.Pair, error)
	// StartPair boots a stopped (or failed) pair's VM again from the last primary's disk and
	// protects it. Wanted: rpc StartPair(StartPairRequest{name}) returns (StartPairResponse
	// {PairStatus status}); FAILED_PRECONDITION when it runs.
	StartPair(ctx context.Context, name string) (*pb.PairStatus, error)
	// StopPair stops both QEMUs of a pair and keeps the pair and its disks (state STOPPED).
	// Wanted: rpc StopPair(StopPairRequest{name}) returns (StopPairResponse{PairStatus status}).
	StopPair(ctx context.Context, name string) (*pb.PairStatus, error)
	// KillForDrill kills, for real (SIGKILL), the QEMU of the pair's side that has role
	// (primary or secondary) and says which QEMU it killed and when, by the agent's clock; it
	// refuses with FAILED_PRECONDITION unless the pair is protected. Wanted: rpc
	// Drill(DrillRequest{name, DrillTarget target}) returns (DrillResponse{string host, int64
	// pid, google.protobuf.Timestamp kill_time}).
	KillForDrill(ctx context.Context, name string, target drillTarget) (*drillKill, error)
	// Console attaches to the primary's serial console: what is sent goes to the guest's serial
	// port, what the guest writes comes back. Wanted: rpc Console(stream ConsoleRequest{name
	// (first message only), bytes input}) returns (stream ConsoleResponse{bytes output}).
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
