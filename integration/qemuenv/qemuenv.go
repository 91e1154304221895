// Package qemuenv finds the QEMUs the integration tests use and starts QEMU processes that the
// calling test owns and kills by PID.
//
// The QEMUs (prepared by `make qemu`, scripts/qemu.sh):
//   - LOCKSTEP_QEMU72: Debian 12's QEMU 7.2; default build/bin/qemu72, else qemu-system-x86_64
//     from PATH.
//   - LOCKSTEP_QEMU11: QEMU 11.1 run from its Debian 13 root; default build/bin/qemu11.
package qemuenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// QEMU is one usable QEMU system emulator.
type QEMU struct {
	Name    string // "7.2" or "11.1", the name tests report
	Path    string // program to run (may be a launcher script)
	Img     string // its qemu-img, when found
	Version string // as printed by --version
	Major   int
	Minor   int
}

// RepoRoot returns the folder holding the module's go.mod.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("qemuenv: go.mod not found above the working folder")
		}
		dir = parent
	}
}

// BuildDir returns the project's build folder ($BUILD or <repo>/build).
func BuildDir() string {
	if b := os.Getenv("BUILD"); b != "" {
		return b
	}
	root, err := RepoRoot()
	if err != nil {
		return "build"
	}
	return filepath.Join(root, "build")
}

var versionRE = regexp.MustCompile(`version (\d+)\.(\d+)\.(\d+)`)

func probe(name, path, img string) (*QEMU, error) {
	if path == "" {
		return nil, fmt.Errorf("QEMU %s: no program", name)
	}
	if lp, err := exec.LookPath(path); err == nil {
		path = lp
	} else {
		return nil, fmt.Errorf("QEMU %s: %s not found: %v", name, path, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("QEMU %s: %s --version: %v: %s", name, path, err, bytes.TrimSpace(out))
	}
	m := versionRE.FindSubmatch(out)
	if m == nil {
		return nil, fmt.Errorf("QEMU %s: %s --version printed no version: %q", name, path, out)
	}
	q := &QEMU{Name: name, Path: path, Version: string(bytes.TrimSpace(bytes.SplitN(out, []byte("\n"), 2)[0]))}
	q.Major, _ = strconv.Atoi(string(m[1]))
	q.Minor, _ = strconv.Atoi(string(m[2]))
	if img != "" {
		if lp, err := exec.LookPath(img); err == nil {
			q.Img = lp
		}
	}
	return q, nil
}

func firstExisting(paths ...string) string {
	for _, p := range paths {
		if p == "" {
			continue
		}
		if _, err := exec.LookPath(p); err == nil {
			return p
		}
	}
	return ""
}

var (
	findOnce sync.Once
	found72  *QEMU
	found11  *QEMU
	err72    error
	err11    error
)

func find() {
	findOnce.Do(func() {
		b := BuildDir()
		p72 := os.Getenv("LOCKSTEP_QEMU72")
		if p72 == "" {
			p72 = firstExisting(filepath.Join(b, "bin", "qemu72"), "qemu-system-x86_64")
		}
		found72, err72 = probe("7.2", p72, firstExisting(filepath.Join(b, "bin", "qemu-img72"), "qemu-img"))
		p11 := os.Getenv("LOCKSTEP_QEMU11")
		if p11 == "" {
			p11 = filepath.Join(b, "bin", "qemu11")
		}
		found11, err11 = probe("11.1", p11, filepath.Join(b, "bin", "qemu-img11"))
		if err11 == nil && found11.Major < 11 {
			err11 = fmt.Errorf("QEMU 11.1: %s is %s", p11, found11.Version)
			found11 = nil
		}
	})
}

// QEMU72 returns Debian 12's QEMU or skips the test saying why it is missing.
func QEMU72(t testing.TB) *QEMU {
	t.Helper()
	find()
	if found72 == nil {
		t.Skipf("QEMU 7.2 not available (run `make qemu`): %v", err72)
	}
	return found72
}

// QEMU11 returns QEMU 11.1 or skips the test saying why it is missing.
func QEMU11(t testing.TB) *QEMU {
	t.Helper()
	find()
	if found11 == nil {
		t.Skipf("QEMU 11.1 not available (run `make qemu`): %v", err11)
	}
	return found11
}

// All returns every QEMU found; it skips the test only when there is none.
func All(t testing.TB) []*QEMU {
	t.Helper()
	find()
	var qs []*QEMU
	if found72 != nil {
		qs = append(qs, found72)
	}
	if found11 != nil {
		qs = append(qs, found11)
	}
	if len(qs) == 0 {
		t.Skipf("no QEMU available (run `make qemu`): 7.2: %v; 11.1: %v", err72, err11)
	}
	return qs
}

// ShortTempDir makes a temporary folder with a short path (unix socket paths are limited to 107
// bytes) that the test removes when it ends.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ls")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// Process is a QEMU started by a test.
type Process struct {
	Cmd     *exec.Cmd
	QMPPath string // unix socket of its QMP monitor
	Stderr  *SyncBuffer
	waitErr error
	exited  chan struct{}
}

// Exited is closed when the process has exited.
func (p *Process) Exited() <-chan struct{} { return p.exited }

// ExitErr is how the process ended (nil for exit status 0); valid once Exited is closed.
func (p *Process) ExitErr() error {
	<-p.exited
	return p.waitErr
}

// Kill sends SIGKILL to the process (by its PID) and waits for it.
func (p *Process) Kill() {
	if p.Cmd.Process != nil {
		_ = p.Cmd.Process.Kill()
	}
	<-p.exited
}

// Signal sends sig to the process by its PID.
func (p *Process) Signal(sig syscall.Signal) error { return p.Cmd.Process.Signal(sig) }

// Start runs q with args plus a QMP unix socket in dir; the test kills it by its PID when it
// ends. It waits until the QMP socket accepts connections.
func Start(t testing.TB, q *QEMU, dir string, args ...string) *Process {
	t.Helper()
	sock := filepath.Join(dir, fmt.Sprintf("qmp-%d.sock", time.Now().UnixNano()%1e9))
	full := append([]string{"-qmp", "unix:" + sock + ",server=on,wait=off"}, args...)
	cmd := exec.Command(q.Path, full...)
	stderr := &SyncBuffer{}
	cmd.Stdout = stderr
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting QEMU %s: %v", q.Name, err)
	}
	p := &Process{Cmd: cmd, QMPPath: sock, Stderr: stderr, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(p.Kill)
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return p
		}
		select {
		case <-p.exited:
			t.Fatalf("QEMU %s exited before its QMP socket opened: %v\n%s", q.Name, p.waitErr, stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("QEMU %s: QMP socket %s did not open in 30 s\n%s", q.Name, sock, stderr.String())
		}
	}
}

// SyncBuffer is a bytes.Buffer safe for a writer and readers in different goroutines.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
