package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/guest"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/netlab"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// cluster is a two-host test set-up: host A and host B each with a lockstepd in two-host mode,
// the coordination store served by a third lockstepd on the etcd node, and a client node on the
// guests' LAN, each in a network namespace of the test's own. Everything runs over TLS as in
// production, with certificates made by lockstepctl certs: the peer link and the store with
// mutual TLS, and the pair's replication channels encrypted (the default between two hosts).
type cluster struct {
	t       *testing.T
	lab     *netlab.Lab
	dir     string
	bin     string
	pki     string // lockstepctl certs' folder: ca.pem, A, B, etcd and C (the client node's)
	agents  map[string]*daemon
	etcd    *daemon
	etcdURL string
}

// makePKI writes the lab's CA and host certificates with lockstepctl certs. C is a host that
// runs no side of any pair: its valid certificate is what an attacker on the client node could
// have.
func (c *cluster) makePKI() {
	c.pki = filepath.Join(c.dir, "pki")
	args := []string{"certs", "--dir", c.pki}
	for _, n := range []struct{ name, node string }{{"A", "A"}, {"B", "B"}, {"etcd", "etcd"}, {"C", "client"}} {
		args = append(args, "--host", n.name+"="+c.lab.Node(n.node).IP().String())
	}
	if out, err := exec.Command(filepath.Join(c.bin, "lockstepctl"), args...).CombinedOutput(); err != nil {
		c.t.Fatalf("lockstepctl certs: %v\n%s", err, out)
	}
}

// certArgs are the TLS flags of name's lockstepd: its host certificate for flag's prefix
// ("peer", "etcd").
func (c *cluster) certArgs(prefix, name string) []string {
	return []string{"--" + prefix + "-cert", filepath.Join(c.pki, name+".pem"), "--" + prefix + "-key", filepath.Join(c.pki, name+".key"),
		"--" + prefix + "-ca", filepath.Join(c.pki, "ca.pem")}
}

// agentArgs are the flags of host's agent.
func (c *cluster) agentArgs(host string) []string {
	n := c.lab.Node(host)
	args := []string{"--host", host, "--peer-listen", netip.AddrPortFrom(n.IP(), 7444).String(), "--etcd-endpoints", c.etcdURL,
		"--metrics-listen", netip.AddrPortFrom(n.IP(), 9464).String()}
	args = append(args, c.certArgs("peer", host)...)
	return append(args, c.certArgs("etcd", host)...)
}

func (c *cluster) start(node *netlab.Node, args ...string) *daemon {
	t := c.t
	dir := filepath.Join(c.dir, node.Name())
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	args = append([]string{"--state-dir", filepath.Join(dir, "state"), "--overlay-dir", filepath.Join(dir, "overlays"),
		"--listen", "unix://" + sock, "--log-level", "info"}, args...)
	cmd := node.Command(context.Background(), filepath.Join(c.bin, "lockstepd"), args...)
	killFenceKeeper(t, filepath.Join(dir, "state"))
	return launchDaemon(t, cmd, sock, "lockstepd on "+node.Name(), true)
}

func newCluster(t *testing.T) (*cluster, *pb.PairSpec) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	lab := netlab.New(t, netlab.Options{})
	c := &cluster{t: t, lab: lab, dir: qemuenv.ShortTempDir(t), bin: binaries(t), agents: map[string]*daemon{}}
	t.Cleanup(func() {
		// The agents leave their QEMUs running by design: kill them by the PIDs the agents wrote.
		for _, h := range []string{"A", "B"} {
			if t.Failed() {
				if b, err := os.ReadFile(filepath.Join(c.dir, h, "state", "db1", strings.ToLower(h), "console.log")); err == nil {
					t.Logf("guest console on %s:\n%s", h, consoleExcerpt(b))
					if d := os.Getenv("LOCKSTEP_CONSOLE_DIR"); d != "" {
						_ = os.WriteFile(filepath.Join(d, t.Name()+"-"+h+".log"), b, 0o644)
					}
				}
			}
			if pid, err := checkpoint.ReadPID(filepath.Join(c.dir, h, "state", "db1", strings.ToLower(h))); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	c.makePKI()
	etcdURL := fmt.Sprintf("https://%s", netip.AddrPortFrom(lab.Node("etcd").IP(), 2379))
	c.etcd, c.etcdURL = c.start(lab.Node("etcd"), append([]string{"--etcd-serve", etcdURL}, c.certArgs("etcd", "etcd")...)...), etcdURL
	for _, h := range []string{"A", "B"} {
		n := lab.Node(h)
		if _, err := n.AddTap("vm0"); err != nil {
			t.Fatal(err)
		}
		c.agents[h] = c.start(n, c.agentArgs(h)...)
	}
	diskA := filepath.Join(c.dir, "A", "disk.raw")
	if err := guest.CreateDisk(diskA, guest.DiskSize); err != nil {
		t.Fatal(err)
	}
	auto := true
	spec := &pb.PairSpec{
		Name: "db1", MemoryMib: 128, Vcpus: 1, Machine: "pc", Accel: pb.Accel_ACCEL_TCG,
		Kernel: kernel, Initrd: initrd, Append: guest.KernelCmdline(lab.GuestCIDR(), lab.LANIP(1).String()),
		DiskSizeBytes: guest.DiskSize,
		Nic:           &pb.Nic{Mac: guestMAC, Model: "e1000", Backend: pb.NicBackend_NIC_BACKEND_TAP, Tap: "vm0"},
		QemuCommand:   []string{q.Path}, QemuImgCommand: []string{q.Img},
		Tunables:      &pb.Tunables{CheckpointDelay: durationpb.New(200 * time.Millisecond)},
		Primary:       &pb.Placement{Host: "A", Address: lab.Node("A").IP().String(), DiskPath: diskA},
		Secondary:     &pb.Placement{Host: "B", Address: lab.Node("B").IP().String(), DiskPath: filepath.Join(c.dir, "B", "replica.raw")},
		AutoReprotect: &auto,
	}
	return c, spec
}

// waitOn waits until the agent of host reports the pair in state want.
func (c *cluster) waitOn(host string, want pb.PairState, within time.Duration) *pb.PairStatus {
	t := c.t
	api := dialAPI(t, c.agents[host].sock)
	deadline := time.Now().Add(within)
	var last *pb.PairStatus
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		resp, err := api.GetPair(ctx, &pb.GetPairRequest{Name: "db1"})
		cancel()
		if err == nil {
			last = resp.GetPair().GetStatus()
			if last.GetState() == want {
				return last
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("host %s: pair not %v within %v; last status %v", host, want, within, last)
	return nil
}

// connect opens the client's connection to the guest's service from the client node.
func (c *cluster) connect() *client.Client {
	t := c.t
	addr := netip.AddrPortFrom(c.lab.GuestIP(), guest.Port).String()
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := c.lab.Node("client").Dial(ctx, "tcp", addr)
		if err == nil {
			cl := client.New(conn)
			if _, err := cl.Ping(ctx); err == nil {
				cancel()
				return cl
			}
			cl.Close()
		}
		cancel()
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("the guest's service at %s never answered the client node", addr)
	return nil
}

// qemuPID reads the pid of host's QEMU for the pair.
func (c *cluster) qemuPID(host string) int {
	pid, err := checkpoint.ReadPID(filepath.Join(c.dir, host, "state", "db1", strings.ToLower(host)))
	if err != nil {
		c.t.Fatalf("QEMU pid on %s: %v", host, err)
	}
	return pid
}

// TestTwoHostsQEMUCrashFastPath: host A's primary QEMU crashes while its agent lives; A hands
// the lease over at once and B's secondary takes over. The client's connection carries on, and
// nothing it saw acknowledged is lost.
func TestTwoHostsQEMUCrashFastPath(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	t.Logf("protected: epoch %d generation %d", st.GetEpoch(), st.GetGeneration())

	pid := c.qemuPID("A")
	kill := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	before := w.Acked()
	w.waitAcked(t, before+10, 30*time.Second)
	first, _ := w.firstAckAfter(kill)
	t.Logf("fast path: kill -9 of A's QEMU -> first ack on the same connection %v", first.Sub(kill).Round(time.Millisecond))
	stB := c.waitOn("B", pb.PairState_PAIR_STATE_PROTECTED, 2*time.Minute)
	if stB.GetEpoch() <= st.GetEpoch() {
		t.Errorf("epoch after the takeover %d, want above %d", stB.GetEpoch(), st.GetEpoch())
	}
	if stB.GetPrimaryHost() != "B" {
		t.Errorf("primary after the takeover %q, want B", stB.GetPrimaryHost())
	}
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	n := w.verify(t)
	t.Logf("%d records acknowledged, all in the guest's memory and on its disk; re-protected at epoch %d generation %d", n, stB.GetEpoch(), stB.GetGeneration())
}

// protectWithWriter creates the pair through A's API, connects the client from the client node
// and waits until both hosts report the pair protected with records flowing.
func (c *cluster) protectWithWriter(spec *pb.PairSpec) (*writer, *pb.PairStatus) {
	t := c.t
	api := dialAPI(t, c.agents["A"].sock)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := api.CreatePair(ctx, &pb.CreatePairRequest{Spec: spec}); err != nil {
		t.Fatalf("create: %v", err)
	}
	w := startWriterOn(t, c.connect(), 20*time.Millisecond)
	st := c.waitOn("A", pb.PairState_PAIR_STATE_PROTECTED, 3*time.Minute)
	c.waitOn("B", pb.PairState_PAIR_STATE_PROTECTED, 30*time.Second)
	w.waitAcked(t, w.Acked()+25, 30*time.Second)
	return w, st
}

// TestTwoHostsHostLoss: host A is lost, its agent and its QEMU killed together; B takes over
// once A's lease expired, and the client's connection carries on with nothing lost.
func TestTwoHostsHostLoss(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	pid := c.qemuPID("A")
	kill := time.Now()
	c.agents["A"].kill()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	before := w.Acked()
	w.waitAcked(t, before+10, 30*time.Second)
	first, _ := w.firstAckAfter(kill)
	t.Logf("host loss: kill of A's agent and QEMU -> first ack on the same connection %v", first.Sub(kill).Round(time.Millisecond))
	stB := c.waitOn("B", pb.PairState_PAIR_STATE_DEGRADED, 30*time.Second)
	if stB.GetEpoch() <= st.GetEpoch() || stB.GetPrimaryHost() != "B" {
		t.Errorf("after the host loss: primary %q at epoch %d, want B above epoch %d", stB.GetPrimaryHost(), stB.GetEpoch(), st.GetEpoch())
	}
	n := w.verify(t)
	t.Logf("%d records acknowledged, all in the guest's memory and on its disk; B runs alone at epoch %d", n, stB.GetEpoch())
}

// TestTwoHostsLinkCut: the A-B link is cut while both reach the store: A keeps the primary role
// and runs on unprotected, B stands down; when the link comes back, protection does too.
func TestTwoHostsLinkCut(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	a, b := c.lab.Node("A"), c.lab.Node("B")
	cut := time.Now()
	if err := c.lab.Cut(a, b); err != nil {
		t.Fatal(err)
	}
	stA := c.waitOn("A", pb.PairState_PAIR_STATE_DEGRADED, 30*time.Second)
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	w.mu.Lock()
	longest := w.maxWait
	w.mu.Unlock()
	t.Logf("link cut: A runs alone (epoch %d, was %d) %v after the cut; the client's longest wait for an ack so far %v",
		stA.GetEpoch(), st.GetEpoch(), time.Since(cut).Round(time.Millisecond), longest.Round(time.Millisecond))
	if stA.GetPrimaryHost() != "A" || stA.GetEpoch() != st.GetEpoch() {
		t.Errorf("after the cut: primary %q epoch %d, want A at epoch %d", stA.GetPrimaryHost(), stA.GetEpoch(), st.GetEpoch())
	}
	// B stands down: its secondary is stale once A runs alone.
	c.waitOn("B", pb.PairState_PAIR_STATE_STOPPED, 30*time.Second)
	if err := c.lab.Heal(a, b); err != nil {
		t.Fatal(err)
	}
	back := c.waitOn("A", pb.PairState_PAIR_STATE_PROTECTED, 2*time.Minute)
	if back.GetGeneration() <= st.GetGeneration() {
		t.Errorf("generation after the heal %d, want above %d", back.GetGeneration(), st.GetGeneration())
	}
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	n := w.verify(t)
	t.Logf("%d records acknowledged, none lost; protected again at generation %d", n, back.GetGeneration())
}

// procState returns the state letter of /proc/PID/stat (R, S, T for stopped, ...).
func procState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "gone"
	}
	// The state follows the command name, which is in parentheses and may hold spaces.
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == ')' && i+2 < len(b) {
			return string(b[i+2])
		}
	}
	return "?"
}

// TestTwoHostsPrimaryIsolated: host A is cut from the store and from B while B still reaches
// the store. A freezes its VM before its lease can expire; only then does B take over. The
// client, still on the LAN, keeps its connection and loses nothing; when A is back, its stale
// VM is killed and B protects itself with a fresh secondary on A.
func TestTwoHostsPrimaryIsolated(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	pidA := c.qemuPID("A")
	apiB := dialAPI(t, c.agents["B"].sock)
	cut := time.Now()
	if err := c.lab.Isolate(c.lab.Node("A")); err != nil {
		t.Fatal(err)
	}
	var frozenAt, takenAt time.Time
	for time.Since(cut) < 30*time.Second && (frozenAt.IsZero() || takenAt.IsZero()) {
		if frozenAt.IsZero() && procState(pidA) == "T" {
			frozenAt = time.Now()
		}
		if takenAt.IsZero() {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			resp, err := apiB.GetPair(ctx, &pb.GetPairRequest{Name: "db1"})
			cancel()
			if err == nil && resp.GetPair().GetStatus().GetEpoch() > st.GetEpoch() && resp.GetPair().GetStatus().GetPrimaryHost() == "B" {
				takenAt = time.Now()
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	if frozenAt.IsZero() {
		t.Fatalf("A's QEMU (pid %d) was never frozen; its state is %s", pidA, procState(pidA))
	}
	if takenAt.IsZero() {
		t.Fatal("B never took over")
	}
	if !frozenAt.Before(takenAt) {
		t.Fatalf("B took over %v after the cut, before A froze its VM at %v", takenAt.Sub(cut), frozenAt.Sub(cut))
	}
	t.Logf("isolation of A: A froze its VM %v after the cut, B was primary %v after it", frozenAt.Sub(cut).Round(time.Millisecond), takenAt.Sub(cut).Round(time.Millisecond))
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	first, _ := w.firstAckAfter(cut)
	t.Logf("first ack after the cut %v", first.Sub(cut).Round(time.Millisecond))
	if err := c.lab.Rejoin(c.lab.Node("A")); err != nil {
		t.Fatal(err)
	}
	back := c.waitOn("B", pb.PairState_PAIR_STATE_PROTECTED, 2*time.Minute)
	if procState(pidA) != "gone" && procState(pidA) != "Z" {
		t.Errorf("A's stale QEMU (pid %d) still exists after A rejoined: state %s", pidA, procState(pidA))
	}
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	n := w.verify(t)
	t.Logf("%d records acknowledged, none lost; protected again with B primary at epoch %d generation %d", n, back.GetEpoch(), back.GetGeneration())
}

// TestTwoHostsStoreDown: the coordination store stops for 30 s (its process is SIGSTOPped).
// Nothing fails over; the pair stays protected, the status says the store is unreachable, and
// the client's writes carry on.
func TestTwoHostsStoreDown(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	apiA := dialAPI(t, c.agents["A"].sock)
	pid := c.etcd.cmd.Process.Pid
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
	sawUnreachable := false
	before := w.Acked()
	for time.Since(stopped) < 30*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := apiA.GetPair(ctx, &pb.GetPairRequest{Name: "db1"})
		cancel()
		if err != nil {
			t.Fatalf("status during the outage: %v", err)
		}
		s := resp.GetPair().GetStatus()
		if s.GetState() != pb.PairState_PAIR_STATE_PROTECTED {
			t.Fatalf("%v into the store outage the pair is %v (%s)", time.Since(stopped).Round(time.Millisecond), s.GetState(), s.GetStateReason())
		}
		if !s.GetStoreReachable() {
			sawUnreachable = true
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	if !sawUnreachable {
		t.Error("the status never said the store was unreachable during the outage")
	}
	during := w.Acked() - before
	w.mu.Lock()
	longest := w.maxWait
	w.mu.Unlock()
	t.Logf("store down 30 s: pair protected throughout, %d records acknowledged during the outage, the client's longest wait %v", during, longest.Round(time.Millisecond))
	if during < 100 {
		t.Errorf("only %d records acknowledged in 30 s of store outage", during)
	}
	after := c.waitOn("A", pb.PairState_PAIR_STATE_PROTECTED, 30*time.Second)
	if after.GetPrimaryHost() != "A" || after.GetGeneration() != st.GetGeneration() {
		t.Errorf("after the outage: primary %q generation %d, want A at generation %d (nothing failed over)", after.GetPrimaryHost(), after.GetGeneration(), st.GetGeneration())
	}
	n := w.verify(t)
	t.Logf("%d records acknowledged, none lost; epoch %d -> %d", n, st.GetEpoch(), after.GetEpoch())
}

// agentRestart kills (kill -9) or stops (SIGTERM, as an upgrade would) host's agent while the
// pair is protected, starts a new one, and checks that nothing failed over: the QEMUs outlive
// their agent and the new agent adopts them. It returns the client's longest wait for an
// acknowledgement across the restart.
func (c *cluster) agentRestart(w *writer, st *pb.PairStatus, host string, sigterm bool) time.Duration {
	t := c.t
	pids := map[string]int{"A": c.qemuPID("A"), "B": c.qemuPID("B")}
	w.mu.Lock()
	w.maxWait = 0
	w.mu.Unlock()
	t0 := time.Now()
	if sigterm {
		if err := c.agents[host].cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		select {
		case <-c.agents[host].done:
		case <-time.After(20 * time.Second):
			t.Fatalf("%s's agent did not stop within 20 s of SIGTERM", host)
		}
	} else {
		c.agents[host].kill()
	}
	for h, pid := range pids {
		if s := procState(pid); s == "gone" || s == "Z" {
			t.Fatalf("%s's QEMU (pid %d) ended with %s's agent", h, pid, host)
		}
	}
	c.agents[host] = c.start(c.lab.Node(host), c.agentArgs(host)...)
	back := c.waitOn(host, pb.PairState_PAIR_STATE_PROTECTED, 30*time.Second)
	t.Logf("%s's agent back %v after it was stopped", host, time.Since(t0).Round(time.Millisecond))
	w.waitAcked(t, w.Acked()+25, 30*time.Second)
	for h, pid := range pids {
		if got := c.qemuPID(h); got != pid {
			t.Fatalf("%s's QEMU changed across the agent restart: pid %d, was %d", h, got, pid)
		}
	}
	if back.GetPrimaryHost() != st.GetPrimaryHost() || back.GetGeneration() != st.GetGeneration() || back.GetLastFailover() != nil {
		t.Fatalf("the agent restart failed over: primary %q generation %d (was %q, %d), last failover %v",
			back.GetPrimaryHost(), back.GetGeneration(), st.GetPrimaryHost(), st.GetGeneration(), back.GetLastFailover())
	}
	for _, h := range []string{"A", "B"} {
		if s := c.waitOn(h, pb.PairState_PAIR_STATE_PROTECTED, 10*time.Second); s.GetLastFailover() != nil {
			t.Fatalf("%s reports a failover after the agent restart: %v", h, s.GetLastFailover())
		}
	}
	w.mu.Lock()
	longest := w.maxWait
	w.mu.Unlock()
	return longest
}

// TestTwoHostsAgentRestart: kill -9 of each host's agent in turn while protected, then an
// upgrade of each (SIGTERM, the new binary started): nothing fails over, the restarted agents
// adopt the QEMUs, and the client's writes carry on over one connection, nothing lost.
func TestTwoHostsAgentRestart(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	for _, step := range []struct {
		host    string
		sigterm bool
	}{{"A", false}, {"B", false}, {"A", true}, {"B", true}} {
		how := "kill -9"
		if step.sigterm {
			how = "SIGTERM (upgrade)"
		}
		longest := c.agentRestart(w, st, step.host, step.sigterm)
		t.Logf("%s of %s's agent: nothing failed over; the client's longest wait for an ack %v", how, step.host, longest.Round(time.Millisecond))
	}
	n := w.verify(t)
	t.Logf("%d records acknowledged, none lost, same connection, across four agent restarts", n)
}

// TestTwoHostsAgentKilledThenHostLost: A's agent is killed (its QEMU runs on, in COLO), then
// host A is lost before its agent returns: B takes over once A's lease has expired and no
// checkpoint arrives any more; nothing acknowledged is lost.
func TestTwoHostsAgentKilledThenHostLost(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	pidA := c.qemuPID("A")
	c.agents["A"].kill()
	w.waitAcked(t, w.Acked()+25, 30*time.Second)
	if s := c.waitOn("B", pb.PairState_PAIR_STATE_PROTECTED, 5*time.Second); s.GetPrimaryHost() != "A" {
		t.Fatalf("with A's agent gone the primary is %q, want A (nothing fails over)", s.GetPrimaryHost())
	}
	lost := time.Now()
	if err := syscall.Kill(pidA, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	first, _ := w.firstAckAfter(lost)
	stB := c.waitOn("B", pb.PairState_PAIR_STATE_DEGRADED, 30*time.Second)
	if stB.GetPrimaryHost() != "B" || stB.GetEpoch() <= st.GetEpoch() {
		t.Fatalf("after host A was lost: primary %q at epoch %d, want B above %d", stB.GetPrimaryHost(), stB.GetEpoch(), st.GetEpoch())
	}
	n := w.verify(t)
	t.Logf("agent killed, then host lost: first ack %v after the host loss; %d records acknowledged, none lost; B runs alone at epoch %d",
		first.Sub(lost).Round(time.Millisecond), n, stB.GetEpoch())
}

// TestTwoHostsSwitchover: an operator's planned switchover moves the VM from A to B while the
// client writes; B re-protects onto A. The client keeps its connection throughout.
func TestTwoHostsSwitchover(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	apiA, apiB := dialAPI(t, c.agents["A"].sock), dialAPI(t, c.agents["B"].sock)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// Tunables at run time: the primary's agent applies them and the store carries them to the
	// peer's, which uses them once it is the primary; the secondary's agent says who can.
	setDelay := &pb.SetParametersRequest{Name: "db1", CheckpointDelay: durationpb.New(300 * time.Millisecond)}
	if _, err := apiB.SetParameters(ctx, setDelay); status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "host A runs the primary") {
		t.Errorf("set asked of the secondary's agent: %v, want FailedPrecondition naming host A", err)
	}
	sp, err := apiA.SetParameters(ctx, setDelay)
	if err != nil || sp.GetTunables().GetCheckpointDelay().AsDuration() != 300*time.Millisecond {
		t.Fatalf("set on the primary's agent: %v %v", sp, err)
	}
	w.waitAcked(t, w.Acked()+5, 30*time.Second)
	metricsA := c.metrics("A")
	for _, m := range []string{`lockstep_pair_state{pair="db1",state="protected"} 1`, `lockstep_checkpoint_pause_seconds_count{pair="db1"}`} {
		if !strings.Contains(metricsA, m) {
			t.Errorf("A's metrics lack %s:\n%s", m, metricsA)
		}
	}
	if strings.Contains(metricsA, `lockstep_checkpoint_pause_seconds_count{pair="db1"} 0`) {
		t.Errorf("A's metrics count no checkpoint:\n%s", metricsA)
	}
	t0 := time.Now()
	resp, err := apiA.Failover(ctx, &pb.FailoverRequest{Name: "db1", Mode: pb.FailoverMode_FAILOVER_MODE_PLANNED})
	if err != nil {
		t.Fatalf("planned switchover: %v", err)
	}
	t.Logf("planned switchover A -> B returned after %v (trigger %v)", time.Since(t0).Round(time.Millisecond), resp.GetFailover().GetTrigger())
	w.waitAcked(t, w.Acked()+1, 30*time.Second)
	first, _ := w.firstAckAfter(t0)
	t.Logf("first ack after the switchover began: %v", first.Sub(t0).Round(time.Millisecond))
	if resp.GetFailover().GetTrigger() != pb.FailoverTrigger_FAILOVER_TRIGGER_PLANNED {
		t.Errorf("trigger %v, want PLANNED", resp.GetFailover().GetTrigger())
	}
	onB := c.waitOn("B", pb.PairState_PAIR_STATE_PROTECTED, 2*time.Minute)
	if onB.GetPrimaryHost() != "B" || onB.GetEpoch() <= st.GetEpoch() {
		t.Fatalf("after the switchover: primary %q at epoch %d, want B above %d", onB.GetPrimaryHost(), onB.GetEpoch(), st.GetEpoch())
	}
	if d := onB.GetTunables().GetCheckpointDelay().AsDuration(); d != 300*time.Millisecond {
		t.Errorf("B protects with checkpoint delay %v, want the 300ms set on A", d)
	}
	// Refused while B is the primary: A cannot switch over a VM it does not run.
	if _, err := apiA.Failover(ctx, &pb.FailoverRequest{Name: "db1", Mode: pb.FailoverMode_FAILOVER_MODE_PLANNED}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("switchover asked of the secondary's agent: %v, want FailedPrecondition", err)
	}
	w.waitAcked(t, w.Acked()+10, 30*time.Second)

	n := w.verify(t)
	t.Logf("%d records acknowledged, none lost, same connection", n)
}

// metrics fetches host's Prometheus metrics, from inside its namespace.
func (c *cluster) metrics(host string) string {
	n := c.lab.Node(host)
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: n.Dial}}
	resp, err := hc.Get("http://" + netip.AddrPortFrom(n.IP(), 9464).String() + "/metrics")
	if err != nil {
		c.t.Fatalf("metrics of %s: %v", host, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		c.t.Fatalf("metrics of %s: %v", host, err)
	}
	return string(b)
}

// consoleExcerpt is the part of a guest console worth reading after a failure: from the first
// kernel complaint (BUG, Oops, general protection fault, WARNING), else the tail; 8000 bytes at
// most.
func consoleExcerpt(b []byte) []byte {
	start := -1
	for _, m := range []string{"BUG:", "Oops", "general protection", "WARNING:", "Kernel panic"} {
		if i := bytes.Index(b, []byte(m)); i >= 0 && (start < 0 || i < start) {
			start = i
		}
	}
	if start < 0 {
		start = max(0, len(b)-3000)
	}
	if j := bytes.LastIndexByte(b[:start], '\n'); j >= 0 {
		start = j + 1
	}
	return b[start:min(len(b), start+8000)]
}

// TestTwoHostsFrozenAgentLinkCut: A's agent is frozen (SIGSTOP) while protected, and the A-B
// link is cut during the freeze. B takes over (A's lease lapses, no checkpoint arrives); the
// clients on the LAN carry on with B. A's QEMU, in COLO without a secondary, releases no guest
// frame after B's takeover (captured on A's tap). When A's agent wakes up and the link comes
// back, A's stale VM never releases anything, and A ends as B's secondary.
func TestTwoHostsFrozenAgentLinkCut(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)
	a, b := c.lab.Node("A"), c.lab.Node("B")
	capture, err := a.Capture("vm0")
	if err != nil {
		t.Fatal(err)
	}
	defer capture.Stop()
	mac, _ := net.ParseMAC(guestMAC)
	fromGuest := func(frames []netlab.Frame, after time.Time) (n int) {
		for _, f := range frames {
			if f.FromVM && bytes.Equal(f.Src, mac) && !f.Time.Before(after) {
				n++
			}
		}
		return n
	}
	// The capture sees A's guest answering the client before anything is done.
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	if n := fromGuest(capture.Frames(), time.Time{}); n == 0 {
		t.Fatalf("the capture on A's tap saw no guest frame while A was the primary (%d frames in all)", len(capture.Frames()))
	}
	apiB := dialAPI(t, c.agents["B"].sock)
	agentA := c.agents["A"].cmd.Process.Pid
	if err := syscall.Kill(agentA, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(agentA, syscall.SIGCONT) })
	frozen := time.Now()
	if err := c.lab.Cut(a, b); err != nil {
		t.Fatal(err)
	}
	// B takes over: its failover record says when.
	var takeover time.Time
	for deadline := time.Now().Add(30 * time.Second); takeover.IsZero() && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := apiB.GetPair(ctx, &pb.GetPairRequest{Name: "db1"})
		cancel()
		if err == nil {
			s := resp.GetPair().GetStatus()
			if lf := s.GetLastFailover(); lf != nil && s.GetPrimaryHost() == "B" && s.GetEpoch() > st.GetEpoch() {
				takeover = lf.GetStartTime().AsTime()
			}
		}
	}
	if takeover.IsZero() {
		t.Fatal("B did not take over from A's frozen agent behind the cut link")
	}
	t.Logf("B took over %v after A's agent was frozen and the A-B link cut", takeover.Sub(frozen).Round(time.Millisecond))
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	// Some seconds with A's agent still frozen: A's QEMU runs on without it.
	time.Sleep(3 * time.Second)
	if err := syscall.Kill(agentA, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	woke := time.Now()
	time.Sleep(2 * time.Second)
	if err := c.lab.Heal(a, b); err != nil {
		t.Fatal(err)
	}
	back := c.waitOn("B", pb.PairState_PAIR_STATE_PROTECTED, 2*time.Minute)
	if back.GetPrimaryHost() != "B" || back.GetSecondaryHost() != "A" {
		t.Fatalf("after the heal: primary %q secondary %q, want B and A", back.GetPrimaryHost(), back.GetSecondaryHost())
	}
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	frames, err := capture.Stop()
	if err != nil {
		t.Fatalf("capture on A's tap: %v", err)
	}
	// From the takeover until A's QEMU is A's new secondary, nothing may leave A's tap with the
	// guest's MAC: the new secondary's own frames go to its filters, not the wire, either.
	var before, after int
	for _, f := range frames {
		if !f.FromVM || !bytes.Equal(f.Src, mac) {
			continue
		}
		if f.Time.Before(takeover) {
			before++
			continue
		}
		after++
		t.Errorf("a guest frame left A's tap %v after B's takeover (EtherType %#04x, %d bytes, to %s)", f.Time.Sub(takeover).Round(time.Millisecond), f.Type, f.Len, f.Dst)
	}
	n := w.verify(t)
	t.Logf("%d guest frames left A before the takeover, %d after; A's agent woke %v after the takeover; %d records acknowledged, none lost; B primary at epoch %d, A its secondary",
		before, after, woke.Sub(takeover).Round(time.Millisecond), n, back.GetEpoch())
}
