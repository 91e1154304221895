package netlab_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/guest/wire"
	"github.com/lockstepvm/lockstep/integration/netlab"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
)

// echo serves an echo service in n on n's mgmt address and returns its address; listener and
// connections close when the test ends.
func echo(t *testing.T, n *netlab.Node) string {
	t.Helper()
	ln, err := n.Listen("tcp", netip.AddrPortFrom(n.IP(), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// exchange sends a line on c and expects it back within d.
func exchange(c net.Conn, d time.Duration) error {
	c.SetDeadline(time.Now().Add(d))
	msg := []byte("ping " + time.Now().Format(time.RFC3339Nano) + "\n")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo returned %q, sent %q", got, msg)
	}
	return nil
}

// roundTrip dials addr from n, within d, and exchanges a line.
func roundTrip(n *netlab.Node, addr string, d time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	start := time.Now()
	c, err := n.Dial(ctx, "tcp", addr)
	if err != nil {
		return time.Since(start), err
	}
	defer c.Close()
	err = exchange(c, d)
	return time.Since(start), err
}

func mustReach(t *testing.T, n *netlab.Node, addr, what string) {
	t.Helper()
	if took, err := roundTrip(n, addr, 5*time.Second); err != nil {
		t.Fatalf("%s: %s -> %s failed after %v: %v", what, n.Name(), addr, took, err)
	}
}

func mustNotReach(t *testing.T, n *netlab.Node, addr, what string) {
	t.Helper()
	took, err := roundTrip(n, addr, time.Second)
	if err == nil {
		t.Fatalf("%s: %s -> %s worked", what, n.Name(), addr)
	}
	if took > 1500*time.Millisecond {
		t.Fatalf("%s: %s -> %s took %v to fail", what, n.Name(), addr, took)
	}
	t.Logf("%s: %s -> %s fails after %v: %v", what, n.Name(), addr, took.Round(time.Millisecond), err)
}

func TestCutHealIsolate(t *testing.T) {
	start := time.Now()
	lab := netlab.New(t, netlab.Options{})
	t.Logf("lab built in %v", time.Since(start).Round(time.Millisecond))
	a, b, etcd, cl := lab.Node("A"), lab.Node("B"), lab.Node("etcd"), lab.Node("client")

	aAddr, bAddr, etcdAddr := echo(t, a), echo(t, b), echo(t, etcd)
	mustReach(t, b, aAddr, "initially")
	mustReach(t, etcd, aAddr, "initially")
	mustReach(t, a, etcdAddr, "initially")
	mustReach(t, b, etcdAddr, "initially")
	mustReach(t, cl, aAddr, "initially")

	// A connection that is open when the link is cut sees silence, not an error, and carries
	// on once the link heals: TCP retransmits.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	open, err := b.Dial(ctx, "tcp", aAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	if err := exchange(open, 5*time.Second); err != nil {
		t.Fatal(err)
	}

	if err := lab.Cut(a, b); err != nil {
		t.Fatal(err)
	}
	t.Logf("after Cut:\n%s", lab)
	mustNotReach(t, b, aAddr, "cut A-B")
	mustNotReach(t, a, bAddr, "cut A-B")
	mustReach(t, b, etcdAddr, "cut A-B")
	mustReach(t, etcd, aAddr, "cut A-B")
	mustReach(t, cl, aAddr, "cut A-B")
	if err := exchange(open, 500*time.Millisecond); err == nil {
		t.Fatal("open connection B->A still works after Cut")
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("open connection B->A failed with %v, want a timeout", err)
	}

	if err := lab.Heal(a, b); err != nil {
		t.Fatal(err)
	}
	mustReach(t, b, aAddr, "healed")
	mustReach(t, a, bAddr, "healed")
	// The echo of the line sent during the cut comes first, then this one's; the
	// retransmission that brings the first through may wait for TCP's backed-off timer.
	healed := time.Now()
	if err := drainAndExchange(open, 10*time.Second); err != nil {
		t.Fatalf("open connection after Heal: %v", err)
	}
	t.Logf("open connection B->A works again %v after Heal", time.Since(healed).Round(time.Millisecond))

	if err := lab.Isolate(a); err != nil {
		t.Fatal(err)
	}
	t.Logf("after Isolate:\n%s", lab)
	mustNotReach(t, a, bAddr, "A isolated")
	mustNotReach(t, a, etcdAddr, "A isolated")
	mustNotReach(t, b, aAddr, "A isolated")
	mustNotReach(t, etcd, aAddr, "A isolated")
	mustReach(t, b, etcdAddr, "A isolated")
	if err := lab.Rejoin(a); err != nil {
		t.Fatal(err)
	}
	mustReach(t, a, bAddr, "A rejoined")
	mustReach(t, a, etcdAddr, "A rejoined")
	mustReach(t, b, aAddr, "A rejoined")
	mustReach(t, etcd, aAddr, "A rejoined")

	// A cut pair stays cut across Isolate and Rejoin of one of its nodes.
	if err := lab.Cut(a, etcd); err != nil {
		t.Fatal(err)
	}
	if err := lab.Isolate(etcd); err != nil {
		t.Fatal(err)
	}
	if err := lab.Rejoin(etcd); err != nil {
		t.Fatal(err)
	}
	mustNotReach(t, etcd, aAddr, "A-etcd cut, etcd rejoined")
	mustReach(t, etcd, bAddr, "A-etcd cut, etcd rejoined")
	if err := lab.Heal(a, etcd); err != nil {
		t.Fatal(err)
	}
	mustReach(t, etcd, aAddr, "A-etcd healed")
}

// drainAndExchange reads the echo of the line lost during a cut, then exchanges a new one.
func drainAndExchange(c net.Conn, d time.Duration) error {
	c.SetDeadline(time.Now().Add(d))
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		return fmt.Errorf("echo of the line sent during the cut: %w", err)
	}
	return exchange(c, d)
}

// Listen and Dial really are in the node's namespace: a node's address is not local to the
// test's own namespace, and loopback is per node.
func TestSocketsInNamespace(t *testing.T) {
	lab := netlab.New(t, netlab.Options{Nodes: []netlab.NodeSpec{{"A", netlab.RoleService}, {"B", netlab.RoleService}}})
	a, b := lab.Node("A"), lab.Node("B")
	if _, err := net.Listen("tcp", netip.AddrPortFrom(a.IP(), 0).String()); err == nil {
		t.Fatalf("A's address %v is bindable outside the lab", a.IP())
	}
	ln, err := a.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if c, err := b.Dial(ctx, "tcp", ln.Addr().String()); err == nil {
		c.Close()
		t.Fatal("B reached A's loopback listener")
	}
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	c, err := a.Dial(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(c)
	c.Close()
	if string(got) != "hi" {
		t.Fatalf("got %q", got)
	}
	// Every thread went back: none of the test process's threads is left in a node.
	own, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	tasks, _ := filepath.Glob("/proc/self/task/*/ns/net")
	for _, task := range tasks {
		if ns, err := os.Readlink(task); err == nil && ns != own {
			t.Errorf("thread %s is in %s, the process in %s", task, ns, own)
		}
	}
	out, err := a.Command(ctx, "ip", "-o", "-4", "addr", "show", "dev", "mgmt0").CombinedOutput()
	if err != nil || !strings.Contains(string(out), a.IP().String()+"/") {
		t.Fatalf("ip addr in A: %v: %s", err, out)
	}
	// No IPv6 chatter from the lab's interfaces: they have no link-local address.
	out, err = a.Command(ctx, "ip", "-o", "-6", "addr", "show", "dev", "mgmt0").CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Fatalf("IPv6 on A's mgmt0: %v: %s", err, out)
	}
}

// linkNames lists the interfaces of the test's own namespace.
func linkNames(t *testing.T) map[string]bool {
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	names := make(map[string]bool)
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 {
			names[strings.SplitN(strings.TrimSuffix(f[1], ":"), "@", 2)[0]] = true
		}
	}
	return names
}

func TestCleanupRemovesEverything(t *testing.T) {
	before := linkNames(t)
	var prefix string
	var sleeper *exec.Cmd
	exited := make(chan error, 1)
	// The test's own cleanup of the process it starts, should the lab's not have run.
	t.Cleanup(func() {
		if sleeper != nil && sleeper.Process != nil {
			syscall.Kill(-sleeper.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	})
	t.Run("lab", func(t *testing.T) {
		lab := netlab.New(t, netlab.Options{LANAgeing: 2 * time.Second})
		prefix = lab.Prefix()
		for _, n := range []*netlab.Node{lab.Switch(), lab.Node("B")} {
			br := map[bool]string{true: "lan", false: "brlan"}[n == lab.Switch()]
			out, err := n.Command(context.Background(), "ip", "-d", "link", "show", br).CombinedOutput()
			if err != nil || !strings.Contains(string(out), "ageing_time 200 ") {
				t.Errorf("%s's %s: want ageing_time 200 (2 s in 1/100 s): %v\n%s", n, br, err, out)
			}
		}
		a := lab.Node("A")
		if _, err := a.AddTap("vm0"); err != nil {
			t.Fatal(err)
		}
		if tap, err := lab.Node("B").AddTap(""); err != nil || tap != "tap0" {
			t.Fatalf("AddTap(\"\") = %q, %v", tap, err)
		}
		if _, err := lab.Node("etcd").AddTap("x"); err == nil {
			t.Fatal("tap on a service node")
		}
		if err := lab.Cut(a, lab.Node("B")); err != nil {
			t.Fatal(err)
		}
		// A process the test does not stop: the lab's cleanup must.
		sleeper = a.Command(context.Background(), "sleep", "600")
		if err := sleeper.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { exited <- sleeper.Wait() }()
		out, err := exec.Command("ip", "netns", "list").Output()
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(out), prefix+"-"); n != 5 {
			t.Fatalf("%d namespaces with prefix %s, want 5:\n%s", n, prefix, out)
		}
	})
	if prefix == "" {
		t.Skip("no lab was built (see the subtest)")
	}
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), prefix) {
		t.Fatalf("namespaces of %s left after cleanup:\n%s", prefix, out)
	}
	if m, _ := filepath.Glob("/run/netns/" + prefix + "*"); len(m) > 0 {
		t.Fatalf("left in /run/netns: %v", m)
	}
	select {
	case err := <-exited:
		exited <- err // for the cleanup above
		t.Logf("process left in A ended with the lab: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("process left in A still runs after the lab's cleanup")
	}
	for name := range linkNames(t) {
		if !before[name] && (name == "mgmt0" || name == "lan0" || name == "brlan" || name == "vm0" ||
			strings.HasPrefix(name, "m-") || strings.HasPrefix(name, "l-")) {
			t.Errorf("interface %s appeared in the test's own namespace", name)
		}
	}
}

// vm is a QEMU started in a node.
type vm struct {
	cmd     *exec.Cmd
	out     *qemuenv.SyncBuffer
	serial  string
	started time.Time
	exited  chan struct{}
	waitErr error
}

func (v *vm) console() string {
	b, _ := os.ReadFile(v.serial)
	return string(b)
}

// wireConn speaks the workload's protocol (package wire) over a connection that the test dialed
// itself, because package client dials its own.
type wireConn struct {
	c net.Conn
	r *bufio.Reader
}

func (w *wireConn) call(req []byte, d time.Duration) (string, error) {
	w.c.SetDeadline(time.Now().Add(d))
	if _, err := w.c.Write(req); err != nil {
		return "", err
	}
	line, err := w.r.ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func TestGuestOnTap(t *testing.T) {
	q := qemuenv.QEMU11(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	paths, err := guest.Build(ctx)
	if err != nil {
		t.Skipf("test guest not available (run `make guest`): %v", err)
	}
	lab := netlab.New(t, netlab.Options{})
	a, cl := lab.Node("A"), lab.Node("client")
	tap, err := a.AddTap("vm0")
	if err != nil {
		t.Fatal(err)
	}
	// The QEMU 11 launcher runs QEMU in a chroot that sees only some host folders, /tmp among
	// them; ShortTempDir is under os.TempDir.
	dir := qemuenv.ShortTempDir(t)
	disk := filepath.Join(dir, "disk.img")
	if err := guest.CreateDisk(disk, guest.DiskSize); err != nil {
		t.Fatal(err)
	}
	v := &vm{out: &qemuenv.SyncBuffer{}, serial: filepath.Join(dir, "serial.log"), exited: make(chan struct{})}
	v.cmd = a.Command(ctx, q.Path,
		"-accel", "tcg", "-M", "pc", "-m", "128", "-nodefaults", "-nographic", "-no-reboot",
		"-serial", "file:"+v.serial,
		"-kernel", paths.Kernel, "-initrd", paths.Initrd,
		"-append", guest.KernelCmdline(lab.GuestCIDR(), lab.LANIP(1).String()),
		"-drive", "file="+disk+",if=ide,format=raw",
		"-netdev", "tap,id=n0,ifname="+tap+",script=no,downscript=no,vhost=off",
		"-device", "e1000,netdev=n0,mac=52:54:00:12:34:56"+guest.NICOptions(ctx, q.Path),
	)
	v.cmd.Stdout, v.cmd.Stderr = v.out, v.out
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		v.waitErr = v.cmd.Wait()
		close(v.exited)
	}()
	t.Cleanup(func() {
		syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
		<-v.exited
	})
	t.Logf("QEMU %s (%s) in %s on %s, guest %s", q.Name, q.Version, a, tap, lab.GuestCIDR())

	// Note when the console shows the service listening, to tell the guest's boot from the
	// client's wait for ARP; the goroutine ends with the test.
	marked := make(chan time.Duration, 1)
	go func() {
		for {
			select {
			case <-v.exited:
				return
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
			if strings.Contains(v.console(), guest.ReadyMarker) {
				marked <- time.Since(v.started)
				return
			}
		}
	}()

	// Wait for the service: each attempt is bounded, because until the guest configures its
	// address the client's ARP requests go unanswered and a connect waits for ARP to give up.
	addr := netip.AddrPortFrom(lab.GuestIP(), guest.Port).String()
	deadline := time.Now().Add(2 * time.Minute)
	var w *wireConn
	var last error
	attempts := 0
	for w == nil {
		select {
		case <-v.exited:
			t.Fatalf("QEMU exited: %v\n%s\nconsole:\n%s", v.waitErr, v.out.String(), v.console())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest service at %s not ready after 2 min: %v\nQEMU: %s\nconsole:\n%s", addr, last, v.out.String(), v.console())
		}
		attempts++
		actx, acancel := context.WithTimeout(ctx, time.Second)
		c, err := cl.Dial(actx, "tcp", addr)
		acancel()
		if err != nil {
			last = err
			time.Sleep(100 * time.Millisecond)
			continue
		}
		wc := &wireConn{c: c, r: bufio.NewReaderSize(c, wire.MaxLine)}
		if line, err := wc.call([]byte("P\n"), time.Second); err != nil || line != "P" {
			last = fmt.Errorf("ping: %q, %v", line, err)
			c.Close()
			time.Sleep(100 * time.Millisecond)
			continue
		}
		w = wc
	}
	defer w.c.Close()
	boot := time.Since(v.started)
	con := v.console()
	t.Logf("guest answered from the client node %v after QEMU started (%d connection attempts)", boot.Round(time.Millisecond), attempts)
	select {
	case d := <-marked:
		t.Logf("console showed the service listening %v after QEMU started", d.Round(time.Millisecond))
	default:
	}
	// QEMU runs in A's namespace: the launcher's unshare and chroot exec in turn, so the PID is
	// QEMU's. (Outside it, QEMU would not fail: opening the tap by name would create a new,
	// unconnected tap in the wrong namespace.)
	if got, want := nsID(t, fmt.Sprintf("/proc/%d/ns/net", v.cmd.Process.Pid)), nsID(t, a.NSPath()); got != want {
		t.Errorf("QEMU's network namespace is %v, A's is %v", got, want)
	}
	if !strings.Contains(con, guest.ReadyMarker) {
		t.Errorf("console lacks %q:\n%s", guest.ReadyMarker, con)
	}
	if want := "network eth0 " + lab.GuestCIDR(); !strings.Contains(con, want) {
		t.Errorf("console lacks %q:\n%s", want, con)
	}

	const records = 20
	for n := uint64(1); n <= records; n++ {
		line, err := w.call(wire.AppendWrite(nil, n, client.Payload(n)), 10*time.Second)
		if err != nil || line != fmt.Sprintf("A %d", n) {
			t.Fatalf("record %d: reply %q, %v", n, line, err)
		}
	}
	want := client.Expected(records)
	for _, req := range []string{"Q\n", "D\n"} {
		line, err := w.call([]byte(req), 10*time.Second)
		if err != nil {
			t.Fatalf("%q: %v", req, err)
		}
		s, err := wire.ParseSummary(line)
		if err != nil || s != want {
			t.Fatalf("%q = %q (%v), want %v", req, line, err, want)
		}
	}
	var rtt time.Duration
	for range 10 {
		start := time.Now()
		if line, err := w.call([]byte("P\n"), 5*time.Second); err != nil || line != "P" {
			t.Fatalf("ping: %q, %v", line, err)
		}
		rtt += time.Since(start)
	}
	t.Logf("%d records acknowledged and read back (memory and disk); ping %v mean over the LAN", records, (rtt / 10).Round(time.Microsecond))

	// The switch learned where the guest's MAC is: frames for it go to A only, which is what
	// keeps a COLO secondary on B from receiving the guest's input twice.
	out, err := lab.Switch().Command(ctx, "bridge", "fdb", "show", "br", "lan").CombinedOutput()
	if err != nil {
		t.Fatalf("bridge fdb: %v: %s", err, out)
	}
	if !regexp.MustCompile(`(?m)^52:54:00:12:34:56 dev l-A `).Match(out) {
		t.Errorf("switch did not learn the guest's MAC on l-A:\n%s", out)
	}

	// The guest is on the LAN only: it is not reachable from mgmt.
	actx, acancel := context.WithTimeout(ctx, time.Second)
	defer acancel()
	if c, err := lab.Node("B").Dial(actx, "tcp", addr); err == nil {
		c.Close()
		t.Error("guest reachable from B, which has no LAN address")
	} else {
		t.Logf("dial from B, not on the LAN: %v", err)
	}
}

// nsID identifies the namespace that path (a /proc/PID/ns/net link or a /run/netns file) holds.
func nsID(t *testing.T, path string) [2]uint64 {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return [2]uint64{st.Dev, st.Ino}
}
