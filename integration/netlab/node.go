package netlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"runtime"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Node is one machine of a lab: a network namespace and its interfaces.
type Node struct {
	lab    *Lab
	name   string
	ns     string // namespace name
	nsPath string // its bind mount, /run/netns/NAME
	role   Role
	ip4    netip.Addr // on mgmt
	lanIP  netip.Addr // clients only
	mu     sync.Mutex
	taps   []string
}

// Name returns the node's name in the lab ("A", "etcd").
func (n *Node) Name() string { return n.name }

// String returns the node's name and namespace.
func (n *Node) String() string { return n.name + "(" + n.ns + ")" }

// NS returns the name of the node's network namespace, as `ip netns` knows it.
func (n *Node) NS() string { return n.ns }

// NSPath returns the file that holds the node's namespace, for setns(2) or `nsenter --net=`.
func (n *Node) NSPath() string { return n.nsPath }

// Role returns how the node is wired.
func (n *Node) Role() Role { return n.role }

// IP returns the node's address on mgmt.
func (n *Node) IP() netip.Addr { return n.ip4 }

// LANIP returns the node's address on the guest LAN; it is valid for RoleClient nodes only.
func (n *Node) LANIP() netip.Addr { return n.lanIP }

// Taps returns the names of the taps added with AddTap.
func (n *Node) Taps() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.taps...)
}

var ifnameRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

// AddTap creates a persistent tap device called name in the node's namespace, enslaved to its
// brlan bridge, and returns its name; an empty name picks "tap0", "tap1", .... Give the name to
// QEMU as -netdev tap,ifname=NAME,script=no,downscript=no with QEMU running inside the node
// (Command). The tap has no carrier, and the bridge does not forward to it, until a QEMU holds
// it open; it outlives that QEMU, so a later QEMU can use it again. Only RoleHost nodes have a
// brlan.
func (n *Node) AddTap(name string) (string, error) {
	if n.role != RoleHost {
		return "", fmt.Errorf("netlab: %s is a %v node; taps need a host node's brlan", n, n.role)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if name == "" {
		name = fmt.Sprintf("tap%d", len(n.taps))
	}
	if !ifnameRE.MatchString(name) || name == "mgmt0" || name == "lan0" || name == "brlan" || name == "lo" {
		return "", fmt.Errorf("netlab: bad tap name %q", name)
	}
	if err := n.ip("tuntap", "add", "dev", name, "mode", "tap"); err != nil {
		return "", err
	}
	if err := n.ip("link", "set", name, "master", "brlan", "up"); err != nil {
		_ = n.ip("link", "del", name)
		return "", err
	}
	n.taps = append(n.taps, name)
	return name, nil
}

// CutLAN takes the node's link to the guest LAN down (a host's brlan uplink, a client's LAN
// interface), cutting it and its guests from the LAN.
func (n *Node) CutLAN() error { return n.setLAN("down") }

// HealLAN undoes CutLAN.
func (n *Node) HealLAN() error { return n.setLAN("up") }

func (n *Node) setLAN(state string) error {
	if n.role != RoleHost && n.role != RoleClient {
		return fmt.Errorf("netlab: %s has no LAN link", n)
	}
	return n.ip("link", "set", "lan0", state)
}

// Command returns a command that runs name with args inside the node's namespace, through
// `ip netns exec`, which replaces itself with the program, so the command's PID is the
// program's. The command leads its own process group; cancelling ctx kills the whole group
// with SIGKILL, and so should the test's cleanup (syscall.Kill(-cmd.Process.Pid, SIGKILL)),
// since a child left behind would keep the namespace alive (the lab's cleanup kills any process
// still inside, by PID, as a last resort). ip netns exec also gives the program a mount
// namespace of its own with a /sys that shows the node's interfaces.
func (n *Node) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	if ctx == nil {
		ctx = context.Background()
	}
	full := append([]string{"netns", "exec", n.ns, name}, args...)
	cmd := exec.CommandContext(ctx, "ip", full...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		if err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); err != nil {
			return cmd.Process.Kill()
		}
		return nil
	}
	return cmd
}

// Dial connects to addr on the named network from inside the node's namespace: the socket is
// made there, by the test process itself, and keeps working in that namespace whatever thread
// uses it later. Give addresses as IP literals: a host name would be resolved as in the test's
// own namespace. The signature fits gRPC's WithContextDialer with a closure.
func (n *Node) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	// No "happy eyeballs": racing dials run on other goroutines, hence other threads, outside
	// the namespace. With fast fallback off, every connect is made on the calling goroutine.
	d := net.Dialer{FallbackDelay: -1}
	var c net.Conn
	var derr error
	if err := n.inNS(func() { c, derr = d.DialContext(ctx, network, addr) }); err != nil {
		if c != nil {
			c.Close()
		}
		return nil, err
	}
	if derr != nil {
		return nil, fmt.Errorf("netlab: dial from %s: %w", n.name, derr)
	}
	return c, nil
}

// Listen listens on addr on the named network inside the node's namespace (see Dial); the
// connections it accepts are the namespace's too.
func (n *Node) Listen(network, addr string) (net.Listener, error) {
	var lc net.ListenConfig
	var ln net.Listener
	var lerr error
	if err := n.inNS(func() { ln, lerr = lc.Listen(context.Background(), network, addr) }); err != nil {
		if ln != nil {
			ln.Close()
		}
		return nil, err
	}
	if lerr != nil {
		return nil, fmt.Errorf("netlab: listen in %s: %w", n.name, lerr)
	}
	return ln, nil
}

// Do runs fn on an OS thread inside the node's network namespace, for code that must open its
// sockets there itself (a packet capture on one of the node's interfaces); sockets fn opens stay
// in the namespace whatever thread uses them later. fn must not start goroutines that expect
// the namespace: they run on other threads.
func (n *Node) Do(fn func()) error { return n.inNS(fn) }

// inNS runs fn on an OS thread switched into the node's network namespace, then switches the
// thread back. It uses a goroutine of its own so that, should the switch back fail, that
// goroutine can exit still locked to the thread, which makes the runtime end the thread instead
// of running other goroutines in the wrong namespace. Threads the runtime starts meanwhile come
// from its template thread, not from this one, so they stay in the original namespace.
func (n *Node) inNS(fn func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// thread-self, not self: the namespace of this thread, not of the main thread.
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: opening own network namespace: %w", err)
			return
		}
		defer unix.Close(orig)
		target, err := unix.Open(n.nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: opening namespace of %s: %w", n, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netlab: entering namespace of %s: %w", n, err)
			return
		}
		fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(errors.New("netlab: thread left in namespace "+n.ns+", dropped"), err)
			return // still locked: the runtime ends the thread with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	return <-errc
}

// ip runs `ip -n NS args...`.
func (n *Node) ip(args ...string) error {
	return runIP(append([]string{"-n", n.ns}, args...)...)
}
