package fence

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sleeper starts a process the test owns, standing in for a QEMU.
func sleeper(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd
}

func state(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "gone"
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return s[i+2 : i+3]
}

// waitState waits until pid is in state want (T: stopped), or fails after a while.
func waitState(t *testing.T, pid int, want string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for state(pid) != want {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d is in state %s, want %s", pid, state(pid), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// link returns a connected TCP pair on loopback: the kept copy (as the agent keeps it) and the
// peer's end, which writes data to make the link active.
func link(t *testing.T) (*os.File, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	f, err := c.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	t.Cleanup(func() { f.Close(); s.Close() })
	return f, s
}

// The rule, through the keeper's socket as an agent uses it: a guard whose time is not up
// leaves its QEMU running; past its time with no link, the QEMU is frozen; past its time with
// an active link it runs on, and is frozen once the link goes quiet; a renewed guard unmarks a
// frozen one; an exited process's guard goes; bad requests are refused.
func TestKeeper(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "fence.sock")
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- Serve(ctx, sock, nil) }()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	var c *Client
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var err error
		if c, err = Dial(sock); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	defer c.Close()

	alone := sleeper(t)
	if err := c.Guard(Guard{PID: alone.Process.Pid, Until: Now() + 400*time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if s := state(alone.Process.Pid); s == "T" {
		t.Fatal("frozen before its time was up")
	}
	waitState(t, alone.Process.Pid, "T")
	if fr, err := c.Frozen(); err != nil || len(fr) != 1 || fr[0] != alone.Process.Pid {
		t.Fatalf("frozen list %v %v, want [%d]", fr, err, alone.Process.Pid)
	}

	colo := sleeper(t)
	f, peer := link(t)
	quiet := 300 * time.Millisecond
	if err := c.Guard(Guard{PID: colo.Process.Pid, Until: Now() - time.Second, Quiet: quiet, Link: f}); err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if _, err := peer.Write([]byte("checkpoint")); err != nil {
			t.Fatal(err)
		}
		if s := state(colo.Process.Pid); s == "T" {
			t.Fatal("a QEMU whose COLO link is active was frozen")
		}
	}
	waitState(t, colo.Process.Pid, "T") // the link went quiet

	// The agent regained the lease: it renews the guard and thaws the QEMU itself.
	if err := c.Guard(Guard{PID: alone.Process.Pid, Until: Now() + time.Minute}); err != nil {
		t.Fatal(err)
	}
	_ = syscall.Kill(alone.Process.Pid, syscall.SIGCONT)
	if fr, _ := c.Frozen(); len(fr) != 1 || fr[0] != colo.Process.Pid {
		t.Fatalf("frozen list %v after the renewal, want only %d", fr, colo.Process.Pid)
	}
	time.Sleep(150 * time.Millisecond)
	if s := state(alone.Process.Pid); s == "T" {
		t.Fatal("a renewed guard froze its QEMU again")
	}
	// An exited process's guard goes.
	_ = colo.Process.Kill()
	_ = colo.Wait()
	deadline := time.Now().Add(2 * time.Second)
	for {
		fr, _ := c.Frozen()
		if len(fr) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the exited process is still guarded: %v", fr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := c.Guard(Guard{PID: 1 << 30}); err == nil {
		t.Fatal("a guard of a process that does not exist was accepted")
	}
	if err := c.Unguard(alone.Process.Pid); err != nil {
		t.Fatal(err)
	}
}
