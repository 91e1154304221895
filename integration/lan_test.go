package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/guest"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/netlab"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
)

// testLAN is the single-host test LAN: the QEMUs of a pair run in one network namespace (the
// host) whose Linux bridge joins their NICs, and a Linux client in a namespace of its own sits
// on the same LAN. It is netlab's lab with one host node and one client node:
//
//	namespace <lab>-host:   bridge brlan ── one tap per QEMU (QEMU's bridge helper makes them, or AddTap)
//	                               └── lan0 ── (the lab's switch) ── lan0 of <lab>-client (LANIP 100)
//
// Why not the QEMU hub with slirp that the single-host tests used first: slirp does not use TCP
// timestamps, so the guest's pure ACKs are 54-byte frames that its e1000 driver pads to 60
// bytes, and colo-compare (QEMU 11.1) counts the padding as 6 bytes of payload: every pure ACK
// that only one of the two VMs sends then mismatches the other's next reply, one checkpoint per
// reply (see BenchmarkColoCauses). A Linux client uses timestamps, as most clients in production
// do, and retransmits after Linux's 200 ms minimum rather than slirp's second and more.
//
// Everything it creates goes with the test: the namespaces (netlab's cleanup kills what still
// runs inside, by PID) and the taps with them.
type testLAN struct {
	Lab *netlab.Lab
	// Host is where the QEMUs run (QEMUPrefix) and their COLO channels connect, on its
	// loopback; Client is the client machine.
	Host, Client *netlab.Node
}

// lanBridge is the host's bridge that the VMs join (netlab's brlan).
const lanBridge = "brlan"

// newTestLAN builds the LAN. It skips the test where network namespaces cannot be made (netlab
// needs root), and prepares QEMU's bridge helper for q.
func newTestLAN(t testing.TB, q *qemuenv.QEMU) *testLAN {
	t.Helper()
	lab := netlab.New(t, netlab.Options{Nodes: []netlab.NodeSpec{{Name: "host", Role: netlab.RoleHost}, {Name: "client", Role: netlab.RoleClient}}})
	allowBridge(t, q, lanBridge)
	return &testLAN{Lab: lab, Host: lab.Node("host"), Client: lab.Node("client")}
}

// QEMUPrefix returns the command prefix that runs the program of prefix (QEMU, or its launcher
// and arguments) inside the host's namespace: a Spec's QEMU field. `ip netns exec` replaces
// itself with the program, so a QEMU's PID is its own.
func (l *testLAN) QEMUPrefix(prefix ...string) []string {
	return append([]string{"ip", "netns", "exec", l.Host.NS()}, prefix...)
}

// NIC returns the guest NIC on the LAN: e1000 with mac, on the host's bridge through QEMU's
// bridge helper, which gives each QEMU a tap of its own.
func (l *testLAN) NIC(mac string) checkpoint.NIC {
	return checkpoint.NIC{MAC: mac, Model: "e1000", Backend: "bridge", Bridge: lanBridge}
}

// AddTap adds a tap on the host's bridge for a QEMU started with -netdev tap,ifname=NAME
// (checkpoint.NIC backend "tap"), and returns its name.
func (l *testLAN) AddTap(name string) (string, error) { return l.Host.AddTap(name) }

// GuestIP is the guest's address; GuestCIDR the same with the LAN's prefix length.
func (l *testLAN) GuestIP() netip.Addr { return l.Lab.GuestIP() }

// GuestCIDR is the guest's address with the LAN's prefix length.
func (l *testLAN) GuestCIDR() string { return l.Lab.GuestCIDR() }

// GuestAddr is the guest's service, as the client dials it.
func (l *testLAN) GuestAddr() string {
	return netip.AddrPortFrom(l.GuestIP(), guest.Port).String()
}

// KernelCmdline is the guest's kernel command line on this LAN (its gateway is the client).
func (l *testLAN) KernelCmdline() string {
	return guest.KernelCmdline(l.GuestCIDR(), l.Client.LANIP().String())
}

// Dial connects from the client's namespace; it fits client.Dialer and gRPC's dialers.
func (l *testLAN) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	return l.Client.Dial(ctx, network, addr)
}

// DialGuest connects the client to the guest's service once it answers a ping, within the
// given time.
func (l *testLAN) DialGuest(t testing.TB, within time.Duration) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	c, err := client.DialReadyWith(ctx, l.Dial, l.GuestAddr(), 200*time.Millisecond)
	if err != nil {
		t.Fatalf("the guest's service at %s never answered the client: %v", l.GuestAddr(), err)
	}
	return c
}

// ClientTCP returns the client namespace's TCP counters RetransSegs and OutSegs (from its
// /proc/net/snmp): how many segments the client sent again, of all it sent.
func (l *testLAN) ClientTCP() (retrans, out uint64, err error) {
	var data []byte
	var rerr error
	if err := l.Client.Do(func() { data, rerr = os.ReadFile("/proc/thread-self/net/snmp") }); err != nil {
		return 0, 0, err
	}
	if rerr != nil {
		return 0, 0, rerr
	}
	var names []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Tcp:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i := 1; i < len(f) && i < len(names); i++ {
			v, _ := strconv.ParseUint(f[i], 10, 64)
			switch names[i] {
			case "RetransSegs":
				retrans = v
			case "OutSegs":
				out = v
			}
		}
	}
	return retrans, out, nil
}

// allowBridge makes sure QEMU's bridge helper may attach taps to bridge: its ACL file
// (/etc/qemu/bridge.conf, as QEMU sees it) must say "allow BRIDGE". For the QEMU 11.1 that
// scripts/qemu.sh puts in a Debian 13 root under the build folder, the file belongs to that
// test root and is written there; a QEMU installed on this machine has its ACL in the
// machine's /etc/qemu, which a test must not change, so the test skips if it lacks the line.
func allowBridge(t testing.TB, q *qemuenv.QEMU, bridge string) {
	t.Helper()
	conf := "/etc/qemu/bridge.conf"
	inRoot := false
	// scripts/qemu.sh's launcher is BUILD/bin/qemu11 and its root BUILD/qemu11/root.
	if launcher, err := filepath.EvalSymlinks(q.Path); err == nil && filepath.Base(launcher) == "qemu11" {
		root := filepath.Join(filepath.Dir(filepath.Dir(launcher)), "qemu11", "root")
		if st, err := os.Stat(root); err == nil && st.IsDir() {
			conf, inRoot = filepath.Join(root, "etc", "qemu", "bridge.conf"), true
		}
	}
	if allows(conf, bridge) {
		return
	}
	if !inRoot {
		t.Skipf("QEMU's bridge helper may not use bridge %s: add \"allow %s\" to %s", bridge, bridge, conf)
	}
	if err := os.MkdirAll(filepath.Dir(conf), 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(conf, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := fmt.Fprintf(f, "allow %s\n", bridge); err != nil {
		t.Fatal(err)
	}
}

func allows(conf, bridge string) bool {
	f, err := os.Open(conf)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 2 && fields[0] == "allow" && (fields[1] == bridge || fields[1] == "all") {
			return true
		}
	}
	return false
}
