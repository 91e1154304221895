package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
)

// Backend runs the process of one side of a pair: a bare QEMU process (Direct), or a domain of
// a hypervisor manager such as libvirt. The agent drives every side through a Backend and the
// VM it returns, and never knows which backend it is: what differs (how the process starts, how
// it is found again after an agent restart, how it is stopped) stays behind this interface.
//
// Every backend starts QEMU with the arguments PrimaryArgs and SecondaryArgs give (whatever its
// own configuration language, the COLO wiring must be exactly that), keeps lockstep's own QMP
// monitor at QMPSocket(Side.RunDir) and QEMU's pid file at Side.RunDir/qemu.pid.
type Backend interface {
	// Name names the backend in pair specs, logs and errors ("qemu", "libvirt").
	Name() string
	// Launch starts a side's QEMU and returns once its QMP monitor answers. A bad configuration
	// returns an error naming the field, and nothing is started.
	Launch(ctx context.Context, c LaunchConfig) (*VM, error)
	// Adopt takes over a side's QEMU that runs already, started by an earlier agent: its QMP
	// connection and its exit are the new agent's. It returns an error wrapping ErrNotRunning
	// when that side has no QEMU running.
	Adopt(ctx context.Context, c AdoptConfig) (*VM, error)
}

// AdoptConfig names the side whose running QEMU Adopt takes over.
type AdoptConfig struct {
	Spec Spec
	Role Role
	Side Side
	Log  *slog.Logger
}

// ErrNotRunning is wrapped by Adopt's error when the side has no QEMU running.
var ErrNotRunning = errors.New("no QEMU running")

// Direct is the backend that runs QEMU as a process of its own (its own process group, a pid
// file, lockstep's QMP socket): what lockstep did before backends existed.
type Direct struct {
	// Start, when set, starts the prepared command instead of cmd.Start.
	Start func(*exec.Cmd) error
}

// Name is "qemu".
func (Direct) Name() string { return "qemu" }

// Launch starts QEMU with Launch.
func (d Direct) Launch(ctx context.Context, c LaunchConfig) (*VM, error) {
	if c.Start == nil {
		c.Start = d.Start
	}
	return Launch(ctx, c)
}

// Adopt finds the QEMU through the pid file in the side's runtime folder.
func (Direct) Adopt(ctx context.Context, c AdoptConfig) (*VM, error) {
	pid, err := ReadPID(c.Side.RunDir)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotRunning, err)
	}
	return Adopt(ctx, c.Role, c.Side, pid, c.Log)
}
