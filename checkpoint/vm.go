package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lockstepvm/lockstep/qmp"
)

// VM is one running QEMU of a pair, started by Launch. Its process is in its own process group;
// the VM's owner stops it with Kill.
type VM struct {
	Role   Role
	Side   Side
	QMP    *qmp.Client
	proc   *os.Process
	exited chan struct{}
	err    error
	// stopWatch ends the exit watcher of an attached VM (which is not our child).
	stopWatch chan struct{}
	started   time.Time
	// kill, when set, replaces SIGKILL by PID (a backend that must stop the process its own way,
	// such as a libvirt domain's destroy); it returns once the process is gone.
	kill func()
}

// Started is when the QEMU process started: when Launch started it, or for an adopted QEMU
// its start time read from /proc (the adoption time when that cannot be read).
func (v *VM) Started() time.Time { return v.started }

// processStart reads when process pid started, from /proc/<pid>/stat (field 22, in clock ticks
// since boot; Linux's USER_HZ is 100 on every architecture lockstep runs on) and /proc/stat's
// btime.
func processStart(pid int) (time.Time, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return time.Time{}, err
	}
	// The command name (field 2) is in parentheses and may hold spaces: count after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return time.Time{}, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return time.Time{}, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	ticks, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return time.Time{}, fmt.Errorf("/proc/%d/stat starttime: %w", pid, err)
	}
	st, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	for _, line := range strings.Split(string(st), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			btime, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, fmt.Errorf("/proc/stat btime: %w", err)
			}
			return time.Unix(btime, 0).Add(time.Duration(ticks) * 10 * time.Millisecond), nil
		}
	}
	return time.Time{}, errors.New("/proc/stat: no btime")
}

// PID returns the QEMU process id.
func (v *VM) PID() int { return v.proc.Pid }

// Exited is closed when the QEMU process has exited.
func (v *VM) Exited() <-chan struct{} { return v.exited }

// ExitErr returns how the process ended; valid after Exited is closed.
func (v *VM) ExitErr() error {
	<-v.exited
	return v.err
}

// Kill stops QEMU at once (SIGKILL by its PID, or the backend's own way), waits for it and
// closes the QMP connection.
func (v *VM) Kill() {
	if v.kill != nil {
		v.kill()
	} else {
		_ = v.proc.Signal(syscall.SIGKILL)
	}
	<-v.exited
	if v.QMP != nil {
		v.QMP.Close()
	}
}

// Release lets go of the VM without stopping QEMU: its QMP connection closes and, for an
// adopted VM, its exit watcher stops. The agent does this when it stops and leaves its VMs
// running.
func (v *VM) Release() {
	if v.QMP != nil {
		v.QMP.Close()
	}
	if v.stopWatch != nil {
		select {
		case <-v.stopWatch:
		default:
			close(v.stopWatch)
		}
	}
}

// QMPCounts are the commands of a VM's QMP connection that QEMU refused or did not answer in
// time.
type QMPCounts struct{ Refused, Timeouts uint64 }

// QMPCounts returns what the VM's QMP connection has counted since it opened.
func (v *VM) QMPCounts() QMPCounts {
	if v.QMP == nil {
		return QMPCounts{}
	}
	st := v.QMP.Stats()
	return QMPCounts{Refused: st.Refused, Timeouts: st.Timeouts}
}

// Signal sends sig to the QEMU process.
func (v *VM) Signal(sig syscall.Signal) error { return v.proc.Signal(sig) }

// AttachConfig describes a QEMU process this process did not start (or no longer waits for):
// an adopted one, or one a backend such as libvirt started.
type AttachConfig struct {
	Role Role
	Side Side
	PID  int
	// QMP is the connection to the QEMU's monitor; Attach takes ownership of it.
	QMP *qmp.Client
	// Kill, when set, stops the process instead of SIGKILL by PID and returns once it is gone.
	Kill func()
}

// Attach returns the VM of a running QEMU that is not this process's child: its exit is watched
// through a pidfd, and its start time is read from /proc.
func Attach(c AttachConfig) (*VM, error) {
	pidfd, err := unix.PidfdOpen(c.PID, 0)
	if err != nil {
		return nil, fmt.Errorf("attaching to QEMU pid %d: %w", c.PID, err)
	}
	proc, _ := os.FindProcess(c.PID)
	started, err := processStart(c.PID)
	if err != nil {
		started = time.Now()
	}
	vm := &VM{Role: c.Role, Side: c.Side, QMP: c.QMP, proc: proc, exited: make(chan struct{}), stopWatch: make(chan struct{}), started: started, kill: c.Kill}
	go func() { // owned by the VM: ends at the process's exit or at Release
		defer unix.Close(pidfd)
		fds := []unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 200)
			if n > 0 || (err != nil && err != unix.EINTR) {
				vm.err = errors.New("exited (not a child of this process)")
				close(vm.exited)
				return
			}
			select {
			case <-vm.stopWatch:
				return
			default:
			}
		}
	}()
	return vm, nil
}

// Adopt takes over a QEMU that runs already (started by an earlier agent): it connects to the
// QMP socket in side.RunDir and watches the process pid, which is not a child of this process,
// through a pidfd.
func Adopt(ctx context.Context, role Role, side Side, pid int, lg *slog.Logger) (*VM, error) {
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	if err := unix.Kill(pid, 0); err != nil {
		return nil, fmt.Errorf("adopting QEMU pid %d: %w: %w", pid, ErrNotRunning, err)
	}
	q, err := qmp.Dial(ctx, "unix", QMPSocket(side.RunDir), qmp.WithLogger(lg))
	if err != nil {
		return nil, fmt.Errorf("adopting QEMU pid %d: %w", pid, err)
	}
	vm, err := Attach(AttachConfig{Role: role, Side: side, PID: pid, QMP: q})
	if err != nil {
		q.Close()
		return nil, err
	}
	return vm, nil
}

// ReadPID reads the pid file QEMU wrote in its runtime folder.
func ReadPID(runDir string) (int, error) {
	b, err := os.ReadFile(filepath.Join(runDir, "qemu.pid"))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// LogTail returns the end of QEMU's own log (stdout and stderr).
func (v *VM) LogTail() string {
	b, _ := os.ReadFile(filepath.Join(v.Side.RunDir, "qemu.log"))
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// LaunchConfig is what Launch needs.
type LaunchConfig struct {
	Spec Spec
	Role Role
	Side Side
	// For a secondary: where the primary listens and the generation's ports.
	PrimaryHost string
	Ports       Ports
	Log         *slog.Logger
	// StartTimeout bounds the wait for QEMU's QMP socket (default 30 s).
	StartTimeout time.Duration
	// Start, when set, starts the prepared command instead of cmd.Start (an agent that must
	// not leave its QEMUs running without it starts them with a parent-death signal).
	Start func(*exec.Cmd) error
}

// Launch validates the configuration, prepares the side's files and starts QEMU. A bad
// configuration returns an error naming the field, and no process is started.
func Launch(ctx context.Context, c LaunchConfig) (*VM, error) {
	s := c.Spec
	if err := s.Validate(); err != nil {
		return nil, err
	}
	if err := s.ValidateSide(c.Role, c.Side); err != nil {
		return nil, err
	}
	if c.Role == RoleSecondary {
		if err := ValidatePorts(c.Ports); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(c.Side.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("run folder: %w", err)
	}
	var args []string
	switch c.Role {
	case RolePrimary:
		args = PrimaryArgs(s, c.Side)
	case RoleSecondary:
		if err := PrepareSecondaryDisks(ctx, s, c.Side); err != nil {
			return nil, err
		}
		args = SecondaryArgs(s, c.Side, c.PrimaryHost, c.Ports)
	default:
		return nil, fmt.Errorf("role %q: want primary or secondary", c.Role)
	}
	sock := QMPSocket(c.Side.RunDir)
	_ = os.Remove(sock)
	logf, err := os.OpenFile(filepath.Join(c.Side.RunDir, "qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	full := append(append([]string(nil), s.QEMU[1:]...), args...)
	cmd := exec.Command(s.QEMU[0], full...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	start := c.Start
	if start == nil {
		start = (*exec.Cmd).Start
	}
	if err := start(cmd); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting QEMU (%s): %w", s.QEMU[0], err)
	}
	vm := &VM{Role: c.Role, Side: c.Side, proc: cmd.Process, exited: make(chan struct{}), started: time.Now()}
	go func() { // owned by the VM: ends when the process does
		vm.err = cmd.Wait()
		logf.Close()
		close(vm.exited)
	}()
	lg := c.Log
	if lg == nil {
		lg = slog.New(slog.DiscardHandler)
	}
	lg.Info("QEMU started", "pair", s.Name, "role", c.Role, "pid", cmd.Process.Pid)
	timeout := c.StartTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		if _, err := os.Stat(sock); err == nil {
			q, err := qmp.Dial(wctx, "unix", sock, qmp.WithLogger(lg.With("pair", s.Name, "role", c.Role)))
			if err == nil {
				vm.QMP = q
				return vm, nil
			}
		}
		select {
		case <-vm.exited:
			return nil, fmt.Errorf("QEMU %s exited at start (%v): %s", c.Role, vm.err, vm.LogTail())
		case <-wctx.Done():
			vm.Kill()
			return nil, fmt.Errorf("QEMU %s: no QMP socket within %v: %s", c.Role, timeout, vm.LogTail())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// PrepareSecondaryDisks creates the secondary's active and hidden qcow2 overlays, of the spec's
// disk size, replacing old ones (they hold no state worth keeping across generations).
func PrepareSecondaryDisks(ctx context.Context, s Spec, side Side) error {
	for _, path := range []string{side.Active, side.Hidden} {
		_ = os.Remove(path)
		args := append(append([]string(nil), s.QEMUImg[1:]...), "create", "-q", "-f", "qcow2", path, strconv.FormatInt(s.DiskSize, 10))
		out, err := exec.CommandContext(ctx, s.QEMUImg[0], args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("creating overlay %s: %v: %s", path, err, bytes.TrimSpace(out))
		}
	}
	return nil
}

var versionRE = regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`)

// DetectVersion runs the QEMU command prefix with --version.
func DetectVersion(ctx context.Context, qemu []string) (Version, error) {
	if len(qemu) == 0 {
		return Version{}, errors.New("empty QEMU command")
	}
	args := append(append([]string(nil), qemu[1:]...), "--version")
	out, err := exec.CommandContext(ctx, qemu[0], args...).CombinedOutput()
	if err != nil {
		first, _, _ := bytes.Cut(bytes.TrimSpace(out), []byte("\n"))
		return Version{}, fmt.Errorf("%s --version: %v: %s", qemu[0], err, first)
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return Version{}, fmt.Errorf("%s --version printed no version: %q", qemu[0], out)
	}
	maj, _ := strconv.Atoi(string(m[1]))
	min, _ := strconv.Atoi(string(m[2]))
	return Version{Major: maj, Minor: min}, nil
}

// Version returns the QEMU version its QMP greeting announced ("11.1.3").
func (v *VM) Version() string {
	if v.QMP == nil {
		return ""
	}
	q := v.QMP.Greeting().Version.QEMU
	return fmt.Sprintf("%d.%d.%d", q.Major, q.Minor, q.Micro)
}
