// Package netlab builds multi-host test networks out of Linux network namespaces, so that an
// integration test can put "host A", "host B", "the etcd host" and "the client" each in a
// namespace of its own, wire them to a shared management network and a guest LAN, and cut and
// heal links between them, all on one machine.
//
// The topology of a Lab (every name carries the lab's random prefix P, e.g. "ls3f2a"):
//
//	namespace P-sw (the switch):  bridge mgmt ── m-<node> ports, one per node
//	                              bridge lan  ── l-<node> ports, one per host and client
//	namespace P-<host>  (RoleHost, default A and B):
//	    mgmt0 (veth to the switch's mgmt bridge, MgmtNet.N)
//	    brlan (bridge) ── lan0 (veth to the switch's lan bridge), and one tap per AddTap
//	namespace P-<service> (RoleService, default etcd):  mgmt0 only
//	namespace P-<client> (RoleClient, default client):  mgmt0, and lan0 with LANNet.100+k
//
// Interface names are plain (mgmt0, lan0, brlan) because they live inside the lab's own
// namespaces, where nothing else can collide with them; the namespaces are the only
// machine-wide names, and they all start with the prefix, so leftovers of a killed test are
// easy to find (`ip netns list | grep ^ls`) and never collide with a parallel run.
//
// Everything is removed by the cleanup that New registers: deleting a namespace deletes every
// veth, bridge and tap in it. Processes still running in a namespace at cleanup are killed by
// PID first, because a namespace lives on while a process is inside it.
//
// IPv6 is disabled on every interface the lab creates (loopback keeps it): the kernel would
// otherwise send duplicate-address probes, router solicitations and MLD reports onto the guest
// LAN, packets that only add noise to what COLO compares.
package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Role says how a node is wired.
type Role int

const (
	// RoleHost is a machine that runs VMs: mgmt, plus a bridge brlan joined to the guest LAN
	// that AddTap attaches taps to. It has no address on the LAN, like a hypervisor whose
	// guests share a bridge it does not route for.
	RoleHost Role = iota
	// RoleService is a machine on mgmt only, such as the etcd host.
	RoleService
	// RoleClient is a machine on mgmt with an address on the guest LAN, to reach guests.
	RoleClient

	// roleSwitch marks the switch's namespace, which is no node of the topology.
	roleSwitch Role = -1
)

func (r Role) String() string {
	switch r {
	case RoleHost:
		return "host"
	case RoleService:
		return "service"
	case RoleClient:
		return "client"
	case roleSwitch:
		return "switch"
	}
	return "role" + strconv.Itoa(int(r))
}

// NodeSpec names one node of a lab and its role.
type NodeSpec struct {
	Name string // 1-10 characters of [A-Za-z0-9_]
	Role Role
}

// DefaultNodes is the topology that Options.Nodes defaults to.
var DefaultNodes = []NodeSpec{
	{"A", RoleHost}, {"B", RoleHost}, {"etcd", RoleService}, {"client", RoleClient},
}

// Options configures New. The zero value gives DefaultNodes on random /24 subnets.
type Options struct {
	// Nodes lists the nodes in the order they get mgmt addresses (.1, .2, ...); nil means
	// DefaultNodes.
	Nodes []NodeSpec
	// MgmtNet is the management network, IPv4 /24 or larger; the zero value is 10.77.X.0/24
	// with X random, so that an address seen in a log points to one lab run.
	MgmtNet netip.Prefix
	// LANNet is the guest LAN, IPv4 /24 or larger; the zero value is 10.78.X.0/24 with the
	// same X as MgmtNet's default.
	LANNet netip.Prefix
	// GuestHost is the host number of GuestIP within LANNet; 0 means 15.
	GuestHost int
	// LANAgeing sets how long the LAN bridges remember where a MAC address was seen; 0 keeps
	// the kernel's 300 s. A guest that moves to another host (a failover) is reachable there
	// only once the bridges relearn its MAC from a frame it sends, or once the old entry ages
	// out; a short ageing bounds that wait in tests whose guest stays silent.
	LANAgeing time.Duration
}

// Lab is one test network. Its methods may be called from any goroutine.
type Lab struct {
	t       testing.TB
	prefix  string
	mgmt    netip.Prefix
	lan     netip.Prefix
	guest   int
	ageing  time.Duration
	sw      *Node
	nodes   []*Node
	byName  map[string]*Node
	mu      sync.Mutex
	cuts    map[[2]string]bool // pairs of node names, sorted
	isolate map[string]bool
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9_]{1,10}$`)

// New builds a lab as opts describe and registers the cleanup that removes it. It skips the
// test when it is not running as root or when `ip netns` is unavailable, and fails it when
// building the network fails. Cleanup of each namespace is registered before the namespace is
// created, so a lab that fails halfway leaves nothing behind either.
func New(t testing.TB, opts Options) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("netlab: network namespaces need root (run the test as root)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("netlab: no ip command (install iproute2): %v", err)
	}
	if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
		t.Skipf("netlab: `ip netns` unavailable: %v: %s", err, bytes.TrimSpace(out))
	}
	specs := opts.Nodes
	if specs == nil {
		specs = DefaultNodes
	}
	seen := make(map[string]bool)
	for _, s := range specs {
		if !nameRE.MatchString(s.Name) || s.Name == "sw" {
			t.Fatalf("netlab: bad node name %q (1-10 of [A-Za-z0-9_], not \"sw\")", s.Name)
		}
		if seen[s.Name] {
			t.Fatalf("netlab: node %q given twice", s.Name)
		}
		seen[s.Name] = true
	}
	prefix, octet, err := newPrefix()
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	l := &Lab{
		t: t, prefix: prefix, mgmt: opts.MgmtNet, lan: opts.LANNet, guest: opts.GuestHost,
		ageing: opts.LANAgeing, byName: make(map[string]*Node),
		cuts: make(map[[2]string]bool), isolate: make(map[string]bool),
	}
	if !l.mgmt.IsValid() {
		l.mgmt = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 77, octet, 0}), 24)
	}
	if !l.lan.IsValid() {
		l.lan = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 78, octet, 0}), 24)
	}
	for _, p := range []netip.Prefix{l.mgmt, l.lan} {
		if !p.Addr().Is4() || p.Bits() > 24 {
			t.Fatalf("netlab: network %v must be IPv4 and /24 or larger", p)
		}
	}
	l.mgmt, l.lan = l.mgmt.Masked(), l.lan.Masked()
	if l.mgmt.Overlaps(l.lan) {
		t.Fatalf("netlab: mgmt %v and LAN %v overlap", l.mgmt, l.lan)
	}
	if l.guest == 0 {
		l.guest = 15
	}
	if l.guest < 1 || l.guest > 254 {
		t.Fatalf("netlab: GuestHost %d out of range", l.guest)
	}
	if len(specs) > 99 {
		t.Fatalf("netlab: %d nodes, at most 99", len(specs))
	}
	if err := l.build(specs); err != nil {
		t.Fatalf("netlab: building lab %s: %v", prefix, err)
	}
	t.Logf("%s", l)
	return l
}

// newPrefix picks "ls" and 4 random hex digits that no existing namespace starts with, and a
// random octet for the default subnets.
func newPrefix() (string, byte, error) {
	for range 20 {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", 0, err
		}
		p := fmt.Sprintf("ls%02x%02x", b[0], b[1])
		if m, _ := filepath.Glob("/run/netns/" + p + "*"); len(m) == 0 {
			return p, b[2], nil
		}
	}
	return "", 0, errors.New("no unused namespace prefix found")
}

func (l *Lab) build(specs []NodeSpec) error {
	l.sw = &Node{lab: l, name: "sw", ns: l.prefix + "-sw", role: roleSwitch}
	if err := l.addNamespace(l.sw); err != nil {
		return err
	}
	for _, br := range []string{"mgmt", "lan"} {
		args := []string{"link", "add", br, "type", "bridge"}
		if br == "lan" {
			args = append(args, l.ageingArgs()...)
		}
		if err := l.sw.ip(args...); err != nil {
			return err
		}
		if err := l.sw.ip("link", "set", br, "up"); err != nil {
			return err
		}
	}
	clients := 0
	for i, s := range specs {
		n := &Node{lab: l, name: s.Name, ns: l.prefix + "-" + s.Name, role: s.Role}
		n.ip4 = hostAddr(l.mgmt, i+1)
		if s.Role == RoleClient {
			n.lanIP = hostAddr(l.lan, 100+clients)
			clients++
			if n.lanIP == l.GuestIP() {
				return fmt.Errorf("client %s would get the guest's address %v", s.Name, n.lanIP)
			}
		}
		if err := l.addNamespace(n); err != nil {
			return err
		}
		l.nodes = append(l.nodes, n)
		l.byName[n.name] = n
		if err := l.wire(n); err != nil {
			return fmt.Errorf("node %s: %w", n.name, err)
		}
	}
	return nil
}

func (l *Lab) ageingArgs() []string {
	if l.ageing <= 0 {
		return nil
	}
	// The kernel counts ageing in USER_HZ ticks, 1/100 s.
	return []string{"ageing_time", strconv.FormatInt(max(int64(l.ageing/(10*time.Millisecond)), 1), 10)}
}

// addNamespace creates n's namespace, registering its removal first.
func (l *Lab) addNamespace(n *Node) error {
	n.nsPath = "/run/netns/" + n.ns
	l.t.Cleanup(func() { l.removeNamespace(n) })
	if out, err := exec.Command("ip", "netns", "add", n.ns).CombinedOutput(); err != nil {
		msg := string(bytes.TrimSpace(out))
		if strings.Contains(msg, "Operation not permitted") || strings.Contains(msg, "Permission denied") {
			l.t.Skipf("netlab: cannot create network namespaces here: ip netns add: %s", msg)
		}
		return fmt.Errorf("ip netns add %s: %v: %s", n.ns, err, msg)
	}
	if err := n.ip("link", "set", "lo", "up"); err != nil {
		return err
	}
	// Interfaces created from now on inherit "default"; lo, already there, keeps ::1.
	var werr error
	if err := n.inNS(func() {
		werr = os.WriteFile("/proc/sys/net/ipv6/conf/default/disable_ipv6", []byte("1"), 0)
	}); err != nil {
		return err
	}
	if werr != nil && !errors.Is(werr, os.ErrNotExist) { // no IPv6 in this kernel: nothing to quiet
		return fmt.Errorf("disabling IPv6 in %s: %w", n.ns, werr)
	}
	return nil
}

func (l *Lab) wire(n *Node) error {
	sw := l.sw
	bits := strconv.Itoa(l.mgmt.Bits())
	steps := [][]string{
		{"link", "add", "mgmt0", "type", "veth", "peer", "name", "m-" + n.name, "netns", sw.ns},
		{"addr", "add", n.ip4.String() + "/" + bits, "dev", "mgmt0"},
		{"link", "set", "mgmt0", "up"},
	}
	for _, s := range steps {
		if err := n.ip(s...); err != nil {
			return err
		}
	}
	if err := sw.ip("link", "set", "m-"+n.name, "master", "mgmt", "up"); err != nil {
		return err
	}
	switch n.role {
	case RoleService:
		return nil
	case RoleHost:
		steps = [][]string{
			append([]string{"link", "add", "brlan", "type", "bridge"}, l.ageingArgs()...),
			{"link", "set", "brlan", "up"},
			{"link", "add", "lan0", "type", "veth", "peer", "name", "l-" + n.name, "netns", sw.ns},
			{"link", "set", "lan0", "master", "brlan", "up"},
		}
	case RoleClient:
		steps = [][]string{
			{"link", "add", "lan0", "type", "veth", "peer", "name", "l-" + n.name, "netns", sw.ns},
			{"addr", "add", n.lanIP.String() + "/" + strconv.Itoa(l.lan.Bits()), "dev", "lan0"},
			{"link", "set", "lan0", "up"},
		}
	default:
		return fmt.Errorf("unknown role %d", n.role)
	}
	for _, s := range steps {
		if err := n.ip(s...); err != nil {
			return err
		}
	}
	return sw.ip("link", "set", "l-"+n.name, "master", "lan", "up")
}

// removeNamespace kills what still runs in n's namespace and deletes it.
func (l *Lab) removeNamespace(n *Node) {
	if _, err := os.Stat(n.nsPath); errors.Is(err, os.ErrNotExist) {
		return // never created
	}
	l.killInside(n)
	if out, err := exec.Command("ip", "netns", "del", n.ns).CombinedOutput(); err != nil {
		l.t.Errorf("netlab: ip netns del %s: %v: %s", n.ns, err, bytes.TrimSpace(out))
	}
}

// killInside sends SIGKILL, by PID, to every process whose network namespace is n's: a process
// the test forgot would keep the namespace, and its interfaces, alive after `ip netns del`.
func (l *Lab) killInside(n *Node) {
	out, err := exec.Command("ip", "netns", "pids", n.ns).Output()
	if err != nil {
		return
	}
	self := os.Getpid()
	for _, f := range strings.Fields(string(out)) {
		pid, err := strconv.Atoi(f)
		// The test process itself shows up while one of its threads is inside for a Dial.
		if err != nil || pid == self || pid <= 1 {
			continue
		}
		l.t.Logf("netlab: killing process %d left in namespace %s", pid, n.ns)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

func hostAddr(p netip.Prefix, n int) netip.Addr {
	a := p.Masked().Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// Prefix returns the lab's unique prefix, which starts the names of all its namespaces.
func (l *Lab) Prefix() string { return l.prefix }

// Node returns the node called name; it panics if there is none, since that is a mistake in
// the test.
func (l *Lab) Node(name string) *Node {
	n, ok := l.byName[name]
	if !ok {
		panic(fmt.Sprintf("netlab: lab %s has no node %q", l.prefix, name))
	}
	return n
}

// Nodes returns the nodes in the order of Options.Nodes.
func (l *Lab) Nodes() []*Node { return append([]*Node(nil), l.nodes...) }

// Switch returns the switch's namespace as a node without addresses, for running tools such
// as tcpdump or `bridge fdb` next to the bridges.
func (l *Lab) Switch() *Node { return l.sw }

// MgmtNet returns the management network.
func (l *Lab) MgmtNet() netip.Prefix { return l.mgmt }

// LANNet returns the guest LAN.
func (l *Lab) LANNet() netip.Prefix { return l.lan }

// LANIP returns the address with host number host on the guest LAN (LANIP(15) is
// 10.78.X.15 by default).
func (l *Lab) LANIP(host int) netip.Addr { return hostAddr(l.lan, host) }

// GuestIP returns the address meant for the guest (Options.GuestHost on the LAN).
func (l *Lab) GuestIP() netip.Addr { return l.LANIP(l.guest) }

// GuestCIDR returns GuestIP with the LAN's prefix length, as the guest's kernel command line
// wants it ("10.78.X.15/24").
func (l *Lab) GuestCIDR() string {
	return netip.PrefixFrom(l.GuestIP(), l.lan.Bits()).String()
}

func pairKey(a, b *Node) [2]string {
	k := [2]string{a.name, b.name}
	if k[0] > k[1] {
		k[0], k[1] = k[1], k[0]
	}
	return k
}

func (l *Lab) check(ns ...*Node) error {
	for _, n := range ns {
		if n == nil || n.lab != l || n == l.sw {
			return fmt.Errorf("netlab: node %v is not a node of lab %s", n, l.prefix)
		}
	}
	return nil
}

// Cut makes a and b unable to reach each other's mgmt address, in both directions, with a
// blackhole route to the peer in each namespace: packets are dropped before they leave, so an
// established connection sees silence, not a reset, and a new connection fails at once. The
// guest LAN is not affected. Cutting a cut pair again does nothing.
func (l *Lab) Cut(a, b *Node) error {
	if err := l.check(a, b); err != nil {
		return err
	}
	if a == b {
		return errors.New("netlab: cannot cut a node from itself")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	// replace, not add: it is idempotent should a previous call have failed halfway.
	if err := a.ip("route", "replace", "blackhole", b.ip4.String()+"/32"); err != nil {
		return err
	}
	if err := b.ip("route", "replace", "blackhole", a.ip4.String()+"/32"); err != nil {
		return err
	}
	l.cuts[pairKey(a, b)] = true
	return nil
}

// Heal undoes Cut(a, b). Healing a pair that is not cut does nothing.
func (l *Lab) Heal(a, b *Node) error {
	if err := l.check(a, b); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.cuts[pairKey(a, b)] {
		return nil
	}
	var errs []error
	for _, p := range [][2]*Node{{a, b}, {b, a}} {
		err := p[0].ip("route", "del", "blackhole", p[1].ip4.String()+"/32")
		if err != nil && !strings.Contains(err.Error(), "No such process") {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		delete(l.cuts, pairKey(a, b))
	}
	return errors.Join(errs...)
}

// Isolate cuts n from every node on mgmt by taking its mgmt link down; connections to and
// from it then fail with "network is unreachable" on its side and time out on the others'.
// Its LAN link stays up.
func (l *Lab) Isolate(n *Node) error {
	if err := l.check(n); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := n.ip("link", "set", "mgmt0", "down"); err != nil {
		return err
	}
	l.isolate[n.name] = true
	return nil
}

// Rejoin undoes Isolate(n). The kernel restores n's route to mgmt with the link; pairs cut
// with Cut stay cut.
func (l *Lab) Rejoin(n *Node) error {
	if err := l.check(n); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := n.ip("link", "set", "mgmt0", "up"); err != nil {
		return err
	}
	delete(l.isolate, n.name)
	return nil
}

// String describes the topology, its addresses and the current cuts, for test logs.
func (l *Lab) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "netlab %s: switch %s: bridge mgmt %v, bridge lan %v; guest %s\n",
		l.prefix, l.sw.ns, l.mgmt, l.lan, l.GuestCIDR())
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range l.nodes {
		fmt.Fprintf(&b, "  %-8s %-7s ns %-14s mgmt0 %v", n.name, n.role, n.ns, n.ip4)
		switch n.role {
		case RoleHost:
			fmt.Fprintf(&b, ", brlan taps %v", n.Taps())
		case RoleClient:
			fmt.Fprintf(&b, ", lan0 %v", n.lanIP)
		}
		if l.isolate[n.name] {
			b.WriteString(", ISOLATED")
		}
		b.WriteString("\n")
	}
	if len(l.cuts) > 0 {
		var cuts []string
		for k := range l.cuts {
			cuts = append(cuts, k[0]+"-"+k[1])
		}
		sort.Strings(cuts)
		fmt.Fprintf(&b, "  cut: %s\n", strings.Join(cuts, ", "))
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// ipTimeout bounds one ip command; they take milliseconds, but a wedged one must not hang the
// test until its global timeout.
const ipTimeout = 30 * time.Second

func runIP(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), ipTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
