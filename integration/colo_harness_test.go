package integration

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
)

const guestMAC = "52:54:00:12:34:56"

// freePorts reserves n distinct loopback TCP ports. They are closed again before use; the window
// in which another process could take one is short, and every port is this test's own.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

func genPorts(p []int) checkpoint.Ports {
	return checkpoint.Ports{Migration: p[0], NBD: p[1], Mirror: p[2], Compare: p[3], CompareIn: p[4], CompareOut: p[5]}
}

// hub is a QEMU "-M none" acting as the test LAN: a slirp user network that forwards a loopback
// port to the guest's service, and one socket port per VM, all on one hub.
type hub struct {
	proc      *qemuenv.Process
	ClientURL string   // 127.0.0.1:port forwarded to the guest's service
	VMPorts   []string // 127.0.0.1:port for each VM's socket netdev
}

func startHub(t testing.TB, q *qemuenv.QEMU, dir string, nVM int, guestIP string, guestPort int) *hub {
	t.Helper()
	ports := freePorts(t, nVM+1)
	args := []string{"-M", "none", "-nodefaults", "-display", "none",
		"-netdev", fmt.Sprintf("user,id=u0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:%d-%s:%d", ports[0], guestIP, guestPort),
		"-netdev", "hubport,id=hu0,hubid=0,netdev=u0",
	}
	h := &hub{ClientURL: fmt.Sprintf("127.0.0.1:%d", ports[0])}
	for i := 0; i < nVM; i++ {
		args = append(args,
			"-netdev", fmt.Sprintf("socket,id=s%d,listen=127.0.0.1:%d", i, ports[i+1]),
			"-netdev", fmt.Sprintf("hubport,id=hs%d,hubid=0,netdev=s%d", i, i))
		h.VMPorts = append(h.VMPorts, fmt.Sprintf("127.0.0.1:%d", ports[i+1]))
	}
	h.proc = qemuenv.Start(t, q, dir, args...)
	return h
}

// testLogger writes slog records to the test log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// pairEnv is one protected VM on this machine: a test LAN, a primary and a secondary, each
// with its own folder and images. The LAN is the bridge in a network namespace (lan,
// newPairEnvLAN) or the QEMU hub with slirp (hub, newPairEnv) that the agent's tests still use.
type pairEnv struct {
	t       testing.TB
	q       *qemuenv.QEMU
	dir     string
	spec    checkpoint.Spec
	hub     *hub
	lan     *testLAN
	log     *slog.Logger
	mu      sync.Mutex
	vms     []*checkpoint.VM
	sideN   int
	genN    int
	nextHub int
	ovDir   string
	// beforeProtect, when set, is called with each generation before its secondary starts
	// (a capture of its channels must begin before they connect).
	beforeProtect func(checkpoint.Generation)
	// tls, when set, encrypts the replication channels (colo_tls_test.go).
	tls *replTLS
}

// newPairEnv is a pair on the QEMU hub test LAN with hubPorts VM ports.
func newPairEnv(t testing.TB, q *qemuenv.QEMU, kernel, initrd string, delay time.Duration, hubPorts int) *pairEnv {
	e := newPairEnvBase(t, q, kernel, initrd, delay)
	e.spec.NIC = checkpoint.NIC{MAC: guestMAC, Model: "e1000", Backend: "socket"}
	e.spec.Append = "console=ttyS0 quiet lockstep.ip=10.0.2.15/24"
	if kernel == "" {
		e.spec.Append = ""
	}
	e.hub = startHub(t, q, e.dir, hubPorts, "10.0.2.15", 7777)
	return e
}

// newPairEnvLAN is a pair on the single-host bridge LAN (testLAN): both QEMUs run in the LAN's
// host namespace, each on a tap of its own on the bridge, and the test's clients connect from
// the client namespace.
func newPairEnvLAN(t testing.TB, q *qemuenv.QEMU, kernel, initrd string, delay time.Duration) *pairEnv {
	lan := newTestLAN(t, q)
	e := newPairEnvBase(t, q, kernel, initrd, delay)
	e.lan = lan
	e.spec.NIC = lan.NIC(guestMAC)
	e.spec.QEMU = lan.QEMUPrefix(q.Path)
	if kernel != "" {
		e.spec.Append = lan.KernelCmdline()
	}
	return e
}

func newPairEnvBase(t testing.TB, q *qemuenv.QEMU, kernel, initrd string, delay time.Duration) *pairEnv {
	dir := qemuenv.ShortTempDir(t)
	e := &pairEnv{t: t, q: q, dir: dir, log: testLogger(t)}
	ver, err := checkpoint.DetectVersion(context.Background(), []string{q.Path})
	if err != nil {
		t.Fatal(err)
	}
	img := q.Img
	if img == "" {
		t.Fatalf("QEMU %s has no qemu-img", q.Name)
	}
	e.spec = checkpoint.Spec{
		Name: "t", MemoryMiB: 128, VCPUs: 1, Machine: "pc", Accel: "tcg",
		Kernel: kernel, Initrd: initrd,
		DiskSize: 64 << 20,
		QEMU:     []string{q.Path}, QEMUImg: []string{img}, QEMUVersion: ver,
		Tunables: checkpoint.Tunables{CheckpointDelay: delay},
	}.WithDefaults()
	t.Cleanup(func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, vm := range e.vms {
			vm.Kill()
			if t.Failed() {
				// What the guest said: a failed test's first question is whether it crashed.
				if b, err := os.ReadFile(filepath.Join(vm.Side.RunDir, "console.log")); err == nil {
					t.Logf("guest console of the %s in %s:\n%s", vm.Role, vm.Side.RunDir, consoleExcerpt(b))
				}
				t.Logf("QEMU log of the %s: %s", vm.Role, vm.LogTail())
			}
		}
	})
	return e
}

// connect returns a client of the guest's service on the env's LAN once the service answers.
func (e *pairEnv) connect(t testing.TB, within time.Duration) *client.Client {
	t.Helper()
	if e.lan != nil {
		return e.lan.DialGuest(t, within)
	}
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	c, err := client.DialReady(ctx, e.hub.ClientURL, 200*time.Millisecond)
	if err != nil {
		t.Fatalf("guest service never answered on %s: %v", e.hub.ClientURL, err)
	}
	return c
}

// startWriter connects a writer of records every interval (0: back to back) to the guest.
func (e *pairEnv) startWriter(t testing.TB, interval time.Duration) *writer {
	return startWriterOn(t, e.connect(t, 60*time.Second), interval)
}

// side makes a new side's folder and a zeroed disk image of the spec's size; hubPort is its
// port on the hub LAN (ignored on the bridge LAN).
func (e *pairEnv) side(hubPort int) checkpoint.Side {
	e.sideN++
	d := filepath.Join(e.dir, fmt.Sprintf("s%d", e.sideN))
	if err := os.MkdirAll(d, 0o700); err != nil {
		e.t.Fatal(err)
	}
	disk := filepath.Join(d, "disk.raw")
	f, err := os.Create(disk)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := f.Truncate(e.spec.DiskSize); err != nil {
		e.t.Fatal(err)
	}
	f.Close()
	// The secondary's overlays are emptied at every checkpoint: keep them in memory (tmpfs), as
	// QEMU's COLO documentation does, or each checkpoint waits for the disk.
	ov := e.overlayDir()
	side := checkpoint.Side{
		Host: "127.0.0.1", RunDir: d, Disk: disk,
		Active: filepath.Join(ov, fmt.Sprintf("active%d.qcow2", e.sideN)), Hidden: filepath.Join(ov, fmt.Sprintf("hidden%d.qcow2", e.sideN)),
	}
	if e.hub != nil {
		side.NetSocket = e.hub.VMPorts[hubPort]
	}
	if e.tls != nil {
		side.TLSDir = e.tls.sideDir(e.t, d)
	}
	return side
}

// overlayDir returns a folder on tmpfs for the secondaries' overlays (the test's own, removed
// when it ends), or the test folder when /dev/shm is missing.
func (e *pairEnv) overlayDir() string {
	if e.ovDir != "" {
		return e.ovDir
	}
	e.ovDir = e.dir
	if d, err := os.MkdirTemp("/dev/shm", "lsov"); err == nil {
		e.ovDir = d
		e.t.Cleanup(func() { os.RemoveAll(d) })
	}
	return e.ovDir
}

func (e *pairEnv) launch(ctx context.Context, role checkpoint.Role, side checkpoint.Side, ports checkpoint.Ports) *checkpoint.VM {
	e.t.Helper()
	vm, err := checkpoint.Launch(ctx, checkpoint.LaunchConfig{
		Spec: e.spec, Role: role, Side: side, PrimaryHost: "127.0.0.1", Ports: ports, Log: e.log,
	})
	if err != nil {
		e.t.Fatalf("launch %s: %v", role, err)
	}
	e.mu.Lock()
	e.vms = append(e.vms, vm)
	e.mu.Unlock()
	return vm
}

// generation returns the next generation with fresh ports.
func (e *pairEnv) generation() checkpoint.Generation {
	e.genN++
	ports := genPorts(freePorts(e.t, 6))
	ports.Migration = 0 // handed over through a migrationLink
	return checkpoint.Generation{N: e.genN, Ports: ports, PrimaryHost: "127.0.0.1", SecondaryHost: "127.0.0.1"}
}

// migrationLink opens the migration connection in the test process: a loopback listener,
// DialMigration dials it (and keeps a copy of the primary's end for the observer's TCP_INFO),
// AcceptMigration returns the secondary's end. Both ends have TCP_NODELAY (Go's default).
type migrationLink struct {
	ln net.Listener
}

func newMigrationLink(t testing.TB) *migrationLink {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &migrationLink{ln: ln}
}

func (m *migrationLink) dial(keep func(*os.File)) func(ctx context.Context) (*os.File, error) {
	return func(ctx context.Context) (*os.File, error) {
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", m.ln.Addr().String())
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		f, err := conn.(*net.TCPConn).File()
		if err != nil {
			return nil, err
		}
		if keep != nil {
			if dup, err := dupFile(f); err == nil {
				keep(dup)
			}
		}
		return f, nil
	}
}

func (m *migrationLink) accept(ctx context.Context) (*os.File, error) {
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() { c, err := m.ln.Accept(); ch <- res{c, err} }()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		defer r.c.Close()
		return r.c.(*net.TCPConn).File()
	case <-ctx.Done():
		m.ln.Close() // ends the Accept
		return nil, ctx.Err()
	}
}
