package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/lockstepvm/lockstep/fence"
)

// The fence keeper is a process of its own next to lockstepd (package fence says why): it
// outlives agent restarts, so that a primary QEMU whose agent is gone is still frozen once its
// lease may have lapsed and its COLO link is not active. lockstepd starts it when none answers
// on <state-dir>/_fence.sock, in a session of its own, its PID in <state-dir>/_fence.pid.

const fenceUsage = `lockstepd fence-keeper runs the host's fence keeper (lockstepd starts it by itself).

Usage:
  lockstepd fence-keeper --socket PATH [--log PATH]

Flags:
`

func runFenceKeeper(args []string) int {
	fs := flag.NewFlagSet("lockstepd fence-keeper", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), fenceUsage)
		fs.PrintDefaults()
	}
	sock := fs.String("socket", "", "unix socket to serve the agents on (required)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if *sock == "" || fs.NArg() > 0 {
		fs.Usage()
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("component", "fence-keeper")
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("fence keeper serving", "socket", *sock, "pid", os.Getpid())
	if err := fence.Serve(ctx, *sock, log); err != nil {
		log.Error("fence keeper", "err", err)
		return 1
	}
	return 0
}

// keeperLink is the agent's link to the fence keeper: should the keeper have gone, the next
// guard starts a new one (which the agent's guards fill again as they change).
type keeperLink struct {
	dir string
	log *slog.Logger
	mu  sync.Mutex
	c   *fence.Client
}

func startFenceKeeper(stateDir string, log *slog.Logger) (*keeperLink, error) {
	c, err := dialFenceKeeper(stateDir, log)
	if err != nil {
		return nil, err
	}
	return &keeperLink{dir: stateDir, log: log, c: c}, nil
}

// Guard sends g, reconnecting (and restarting the keeper) once if the connection failed.
func (k *keeperLink) Guard(g fence.Guard) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.c != nil {
		if err := k.c.Guard(g); err == nil {
			return nil
		}
		k.c.Close()
		k.c = nil
	}
	c, err := dialFenceKeeper(k.dir, k.log)
	if err != nil {
		return err
	}
	k.c = c
	return c.Guard(g)
}

// Close closes the connection; the keeper keeps its guards and runs on.
func (k *keeperLink) Close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.c != nil {
		k.c.Close()
		k.c = nil
	}
}

// dialFenceKeeper connects to the host's fence keeper, starting it first if none answers.
func dialFenceKeeper(stateDir string, log *slog.Logger) (*fence.Client, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, err
	}
	sock := filepath.Join(stateDir, "_fence.sock")
	if c, err := fence.Dial(sock); err == nil {
		log.Info("fence keeper found", "socket", sock)
		return c, nil
	}
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("fence keeper: %w", err)
	}
	logf, err := os.OpenFile(filepath.Join(stateDir, "_fence.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("fence keeper: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(self, "fence-keeper", "--socket", sock)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // it outlives this agent
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("fence keeper: %w", err)
	}
	pid := cmd.Process.Pid
	_ = os.WriteFile(filepath.Join(stateDir, "_fence.pid"), []byte(strconv.Itoa(pid)+"\n"), 0o600)
	go func() { _ = cmd.Wait() }() // reaped if it ends while this agent runs
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := fence.Dial(sock)
		if err == nil {
			log.Info("fence keeper started", "socket", sock, "pid", pid)
			return c, nil
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return nil, fmt.Errorf("fence keeper (pid %d) does not answer on %s: %w", pid, sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
