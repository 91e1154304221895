// Package fence is the keeper of the one fencing rule that must hold while a host's agent is
// gone: a primary QEMU whose lease may have lapsed, and whose COLO migration link is not
// active, is frozen (SIGSTOP).
//
// Why it exists (read from QEMU 11.1's migration/colo.c and net/colo-compare.c): a primary in
// COLO holds back its guest's IPv4 output until its secondary produced the same, so without a
// secondary it releases none of it; but colo-compare passes every frame it does not compare
// (ARP, IPv6, VLAN-tagged) straight to the wire, and a checkpoint that fails at its first step
// leaves the guest running. So a COLO primary left without its agent and cut from its
// secondary, whose peer then takes over, would go on emitting such frames, and a primary that
// ran alone would go on running without a lease. The agent freezes such a QEMU itself; the
// keeper, a small process of its own on the host that outlives agent restarts, does it when
// the agent is not there to (killed, frozen, being upgraded). A QEMU in COLO whose link is
// active is never frozen: its secondary does not take over while checkpoints arrive, so an
// agent restart fails nothing over.
//
// The agent tells the keeper, for each primary QEMU it runs, until when (CLOCK_MONOTONIC) the
// QEMU may run without an active link, with a copy of its migration connection. The keeper
// checks every guard every 50 ms. It signals through a pidfd, so a reused PID is never hit.
package fence

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Guard is what the keeper enforces for one QEMU.
type Guard struct {
	PID int `json:"pid"`
	// Until is the CLOCK_MONOTONIC time (Now's clock) until which the QEMU may run without
	// an active COLO link.
	Until time.Duration `json:"until"`
	// Quiet is how long the link may be silent and still count as active.
	Quiet time.Duration `json:"quiet"`
	// Link is a copy of the QEMU's migration connection (nil: no COLO link; the QEMU freezes
	// once Until passes).
	Link *os.File `json:"-"`
}

// Now returns CLOCK_MONOTONIC, the clock of Guard.Until, the same in every process.
func Now() time.Duration {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return time.Duration(ts.Nano())
}

type message struct {
	Op      string        `json:"op"` // guard, unguard, list
	PID     int           `json:"pid"`
	Until   time.Duration `json:"until,omitempty"`
	Quiet   time.Duration `json:"quiet,omitempty"`
	HasLink bool          `json:"has_link,omitempty"`
}

type reply struct {
	Err    string `json:"err,omitempty"`
	Frozen []int  `json:"frozen,omitempty"`
}

type guarded struct {
	g      Guard
	pidfd  int
	frozen bool
}

// Keeper holds the guards and enforces them.
type Keeper struct {
	log *slog.Logger
	mu  sync.Mutex
	gs  map[int]*guarded
}

// NewKeeper returns a keeper with no guards.
func NewKeeper(log *slog.Logger) *Keeper {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Keeper{log: log, gs: map[int]*guarded{}}
}

// Set replaces the guard of g.PID; the keeper takes ownership of g.Link.
func (k *Keeper) Set(g Guard) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if old, ok := k.gs[g.PID]; ok {
		if old.g.Link != nil && old.g.Link != g.Link {
			old.g.Link.Close()
		}
		old.g = g
		if g.Until > Now() {
			old.frozen = false // the agent may thaw it: a fresh guard says it may run
		}
		return nil
	}
	pidfd, err := unix.PidfdOpen(g.PID, 0)
	if err != nil {
		if g.Link != nil {
			g.Link.Close()
		}
		return fmt.Errorf("fence: pid %d: %w", g.PID, err)
	}
	k.gs[g.PID] = &guarded{g: g, pidfd: pidfd}
	return nil
}

// Remove drops the guard of pid.
func (k *Keeper) Remove(pid int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.drop(pid)
}

func (k *Keeper) drop(pid int) {
	if gd, ok := k.gs[pid]; ok {
		if gd.g.Link != nil {
			gd.g.Link.Close()
		}
		unix.Close(gd.pidfd)
		delete(k.gs, pid)
	}
}

// Frozen lists the PIDs the keeper froze.
func (k *Keeper) Frozen() []int {
	k.mu.Lock()
	defer k.mu.Unlock()
	var out []int
	for pid, gd := range k.gs {
		if gd.frozen {
			out = append(out, pid)
		}
	}
	return out
}

// linkActive reports whether data arrived on f within quiet.
func linkActive(f *os.File, quiet time.Duration) bool {
	if f == nil {
		return false
	}
	sc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	var info *unix.TCPInfo
	var ierr error
	if err := sc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil || ierr != nil {
		return false
	}
	const established = 1
	since := time.Duration(min(info.Last_data_recv, info.Last_ack_recv)) * time.Millisecond
	return info.State == established && since <= quiet
}

// Check enforces every guard once: a QEMU past its Until without an active link is frozen;
// guards of QEMUs that exited are dropped.
func (k *Keeper) Check() {
	now := Now()
	k.mu.Lock()
	defer k.mu.Unlock()
	for pid, gd := range k.gs {
		fds := []unix.PollFd{{Fd: int32(gd.pidfd), Events: unix.POLLIN}}
		if n, _ := unix.Poll(fds, 0); n > 0 {
			k.drop(pid) // exited
			continue
		}
		if gd.frozen || now <= gd.g.Until || linkActive(gd.g.Link, gd.g.Quiet) {
			continue
		}
		if err := unix.PidfdSendSignal(gd.pidfd, unix.SIGSTOP, nil, 0); err != nil {
			k.log.Error("freezing QEMU", "pid", pid, "err", err)
			continue
		}
		gd.frozen = true
		k.log.Warn("froze QEMU: its agent did not renew its lease in time and its COLO link is not active", "pid", pid,
			"late", (now - gd.g.Until).Round(time.Millisecond))
	}
}

// Run checks the guards every interval until ctx ends.
func (k *Keeper) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			k.Check()
		}
	}
}

// Serve runs a keeper on the unix socket path until ctx ends: it serves the agents' guards
// (one connection at a time is enough; each request is answered before the next) and checks
// them every 50 ms.
func Serve(ctx context.Context, path string, log *slog.Logger) error {
	k := NewKeeper(log)
	_ = os.Remove(path)
	old := unix.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return fmt.Errorf("fence: %w", err)
	}
	defer ln.Close()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Add(1)
	go func() { defer wg.Done(); k.Run(rctx, 50*time.Millisecond) }()
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("fence: %w", err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); k.serve(rctx, c) }()
	}
}

// serve answers one agent's connection.
func (k *Keeper) serve(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4))
	enc := json.NewEncoder(c)
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil {
			return
		}
		var link *os.File
		if oobn > 0 {
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					if fds, err := unix.ParseUnixRights(&m); err == nil {
						for i, fd := range fds {
							if i == 0 {
								link = os.NewFile(uintptr(fd), "link")
							} else {
								unix.Close(fd)
							}
						}
					}
				}
			}
		}
		var m message
		var rep reply
		if err := json.Unmarshal(buf[:n], &m); err != nil {
			rep.Err = "fence: bad request: " + err.Error()
		} else {
			switch m.Op {
			case "guard":
				if err := k.Set(Guard{PID: m.PID, Until: m.Until, Quiet: m.Quiet, Link: link}); err != nil {
					rep.Err = err.Error()
				}
				link = nil
			case "unguard":
				k.Remove(m.PID)
			case "list":
				rep.Frozen = k.Frozen()
			default:
				rep.Err = fmt.Sprintf("fence: unknown request %q", m.Op)
			}
		}
		if link != nil {
			link.Close()
		}
		if err := enc.Encode(rep); err != nil {
			return
		}
	}
}

// Client is an agent's connection to its host's keeper. Its methods are safe for concurrent
// use.
type Client struct {
	mu  sync.Mutex
	c   *net.UnixConn
	dec *json.Decoder
}

// Dial connects to the keeper at path.
func Dial(path string) (*Client, error) {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	return &Client{c: c, dec: json.NewDecoder(c)}, nil
}

// Close closes the connection; the keeper keeps the guards.
func (c *Client) Close() error { return c.c.Close() }

func (c *Client) call(m message, link *os.File) (reply, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return reply{}, err
	}
	var oob []byte
	if link != nil {
		oob = unix.UnixRights(int(link.Fd()))
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, _, err := c.c.WriteMsgUnix(b, oob, nil); err != nil {
		return reply{}, fmt.Errorf("fence: %w", err)
	}
	var rep reply
	if err := c.dec.Decode(&rep); err != nil {
		return reply{}, fmt.Errorf("fence: %w", err)
	}
	if rep.Err != "" {
		return rep, errors.New(rep.Err)
	}
	return rep, nil
}

// Guard sets the guard of g.PID; g.Link, when set, is sent (the caller keeps its own copy).
func (c *Client) Guard(g Guard) error {
	_, err := c.call(message{Op: "guard", PID: g.PID, Until: g.Until, Quiet: g.Quiet, HasLink: g.Link != nil}, g.Link)
	return err
}

// Unguard drops the guard of pid.
func (c *Client) Unguard(pid int) error {
	_, err := c.call(message{Op: "unguard", PID: pid}, nil)
	return err
}

// Frozen lists the PIDs the keeper froze.
func (c *Client) Frozen() ([]int, error) {
	rep, err := c.call(message{Op: "list"}, nil)
	return rep.Frozen, err
}
