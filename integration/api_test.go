package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds lockstepd and lockstepctl once per test binary.
func binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "lsbin")
		if buildErr != nil {
			return
		}
		root, err := qemuenv.RepoRoot()
		if err != nil {
			buildErr = err
			return
		}
		out, err := exec.Command("go", "build", "-o", binDir+"/", root+"/cmd/lockstepd", root+"/cmd/lockstepctl").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v: %s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binDir
}

// daemon is a lockstepd process started by the test.
type daemon struct {
	cmd     *exec.Cmd
	sock    string
	metrics string
	log     *qemuenv.SyncBuffer
	done    chan struct{}
	// group: kill the whole process group (what the agent runs in a namespace of the lab);
	// otherwise only the agent. Its QEMUs have groups of their own and live on to be adopted;
	// the test kills them by the PIDs in their pid files.
	group bool
}

// killFenceKeeper kills, when the test ends (after the daemons it registered before), the fence
// keeper a lockstepd with state folder stateDir started: by the PID it wrote.
func killFenceKeeper(t *testing.T, stateDir string) {
	t.Cleanup(func() {
		b, err := os.ReadFile(filepath.Join(stateDir, "_fence.pid"))
		if err != nil {
			return
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

func startDaemon(t *testing.T, bin, stateDir, overlayDir, sock, metrics string) *daemon {
	t.Helper()
	cmd := exec.Command(filepath.Join(bin, "lockstepd"), "--state-dir", stateDir, "--overlay-dir", overlayDir,
		"--listen", "unix://"+sock, "--metrics-listen", metrics, "--log-level", "info")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	killFenceKeeper(t, stateDir)
	d := launchDaemon(t, cmd, sock, "lockstepd", false)
	d.metrics = metrics
	return d
}

// launchDaemon starts cmd, a lockstepd serving its API on sock, waits until it listens, and
// kills it when the test ends, printing its log (as name) if the test failed.
func launchDaemon(t *testing.T, cmd *exec.Cmd, sock, name string, group bool) *daemon {
	t.Helper()
	d := &daemon{cmd: cmd, sock: sock, log: &qemuenv.SyncBuffer{}, done: make(chan struct{}), group: group}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		d.kill()
		if t.Failed() {
			t.Logf("%s log:\n%s", name, d.log.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return d
		}
		select {
		case <-d.done:
			t.Fatalf("%s exited at start:\n%s", name, d.log.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen:\n%s", name, d.log.String())
		}
	}
}

// kill sends SIGKILL to the daemon (by its PID, or its process group's) and waits.
func (d *daemon) kill() {
	pid := d.cmd.Process.Pid
	if d.group {
		pid = -pid
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	<-d.done
}

func dialAPI(t *testing.T, sock string) pb.PairServiceClient {
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewPairServiceClient(conn)
}

func apiSpec(e *pairEnv, diskA, diskB string) *pb.PairSpec {
	s := e.spec
	auto := true
	return &pb.PairSpec{
		Name: "db1", MemoryMib: uint32(s.MemoryMiB), Vcpus: 1, Machine: "pc", Accel: pb.Accel_ACCEL_TCG,
		Kernel: s.Kernel, Initrd: s.Initrd, Append: s.Append, DiskSizeBytes: uint64(s.DiskSize),
		Nic:         &pb.Nic{Mac: guestMAC, Model: "e1000", Backend: pb.NicBackend_NIC_BACKEND_SOCKET},
		QemuCommand: s.QEMU, QemuImgCommand: s.QEMUImg,
		Tunables:      &pb.Tunables{CheckpointDelay: durationpb.New(200 * time.Millisecond)},
		Primary:       &pb.Placement{Host: "127.0.0.1", DiskPath: diskA, NetSocket: e.hub.VMPorts[0]},
		Secondary:     &pb.Placement{Host: "127.0.0.1", DiskPath: diskB, NetSocket: e.hub.VMPorts[1]},
		AutoReprotect: &auto,
	}
}

// waitPair waits until the pair is in state want at generation gen or later.
func waitPair(t *testing.T, c pb.PairServiceClient, want pb.PairState, gen uint64, within time.Duration) *pb.PairStatus {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := c.GetPair(ctx, &pb.GetPairRequest{Name: "db1"})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		st := resp.GetPair().GetStatus()
		if st.GetState() == want && st.GetGeneration() >= gen {
			return st
		}
		if st.GetState() == pb.PairState_PAIR_STATE_FAILED {
			t.Fatalf("pair failed: %s", st.GetStateReason())
		}
		if time.Now().After(deadline) {
			t.Fatalf("pair %s (gen %d) after %v, want %s gen %d: %s", st.GetState(), st.GetGeneration(), within, want, gen, st.GetStateReason())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code) *status.Status {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code {
		t.Fatalf("%s: got %v, want %s", what, err, code)
	}
	return st
}

// Everything an operator does, through the API only: create a pair and watch it to protected;
// kill the primary QEMU while a client writes (the watch stream shows each failover step, the
// client keeps its connection and loses nothing, re-protection completes by itself); a planned
// switchover with the client running; kill -9 of the agent (nothing fails over, the restarted
// agent adopts the pair); bad requests get their codes and change nothing.
func TestAPIOperator(t *testing.T) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	bin := binaries(t)
	e := newPairEnv(t, q, kernel, initrd, 200*time.Millisecond, 2)
	stateDir := filepath.Join(e.dir, "state")
	sock := filepath.Join(e.dir, "api.sock")
	mport := freePorts(t, 1)[0]
	metrics := fmt.Sprintf("127.0.0.1:%d", mport)
	d := startDaemon(t, bin, stateDir, e.overlayDir(), sock, metrics)
	t.Cleanup(func() { // the QEMUs outlive lockstepd by design: kill them by their PIDs
		for _, s := range []string{"a", "b"} {
			if pid, err := checkpoint.ReadPID(filepath.Join(stateDir, "db1", s)); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	c := dialAPI(t, sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	diskA := filepath.Join(e.dir, "a.raw")
	f, _ := os.Create(diskA)
	f.Truncate(e.spec.DiskSize)
	f.Close()
	spec := apiSpec(e, diskA, filepath.Join(e.dir, "b.raw"))

	// Bad specs: InvalidArgument naming the field; nothing is created.
	badSpec := apiSpec(e, diskA, filepath.Join(e.dir, "b.raw"))
	badSpec.Nic.Mac = "nope"
	badSpec.Machine = "q35"
	_, err := c.CreatePair(ctx, &pb.CreatePairRequest{Spec: badSpec})
	st := wantCode(t, "bad spec", err, codes.InvalidArgument)
	fields := map[string]bool{}
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fields[v.GetField()] = true
			}
		}
	}
	if !fields["spec.nic.mac"] || !fields["spec.machine"] {
		t.Errorf("bad spec details name %v, want spec.nic.mac and spec.machine", fields)
	}
	if resp, err := c.ListPairs(ctx, &pb.ListPairsRequest{}); err != nil || len(resp.GetPairs()) != 0 {
		t.Fatalf("a refused create left %v (%v)", resp.GetPairs(), err)
	}
	_, err = c.GetPair(ctx, &pb.GetPairRequest{Name: "nope"})
	wantCode(t, "unknown pair", err, codes.NotFound)

	if _, err := c.CreatePair(ctx, &pb.CreatePairRequest{Spec: spec}); err != nil {
		t.Fatal(err)
	}
	_, err = c.CreatePair(ctx, &pb.CreatePairRequest{Spec: spec})
	wantCode(t, "create twice", err, codes.AlreadyExists)
	_, err = c.Failover(ctx, &pb.FailoverRequest{Name: "db1"})
	wantCode(t, "failover while starting", err, codes.FailedPrecondition)

	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	stream, err := c.WatchPair(wctx, &pb.WatchPairRequest{Name: "db1"})
	if err != nil {
		t.Fatal(err)
	}
	var evMu sync.Mutex
	var events []*pb.PairEvent
	go func() {
		for {
			resp, err := stream.Recv()
			if err != nil {
				return
			}
			evMu.Lock()
			events = append(events, resp.GetEvent())
			evMu.Unlock()
		}
	}()
	w := startWriter(t, e.hub.ClientURL, 20*time.Millisecond)
	waitPair(t, c, pb.PairState_PAIR_STATE_PROTECTED, 1, 2*time.Minute)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	_, err = c.Reprotect(ctx, &pb.ReprotectRequest{Name: "db1"})
	wantCode(t, "reprotect while protected", err, codes.FailedPrecondition)
	_, err = c.SetParameters(ctx, &pb.SetParametersRequest{Name: "db1", CheckpointDelay: durationpb.New(-time.Second)})
	wantCode(t, "negative delay", err, codes.InvalidArgument)
	if sp, err := c.SetParameters(ctx, &pb.SetParametersRequest{Name: "db1", CheckpointDelay: durationpb.New(300 * time.Millisecond)}); err != nil ||
		sp.GetTunables().GetCheckpointDelay().AsDuration() != 300*time.Millisecond {
		t.Fatalf("set parameters: %v %v", sp, err)
	}
	if st := waitPair(t, c, pb.PairState_PAIR_STATE_PROTECTED, 1, time.Second); st.GetGeneration() != 1 {
		t.Fatalf("refused requests changed the pair: %v", st)
	}
	t0 := time.Now()
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	t.Logf("10 records after set-parameters in %v", time.Since(t0))

	// Kill the primary QEMU.
	pidA, err := checkpoint.ReadPID(filepath.Join(stateDir, "db1", "a"))
	if err != nil {
		t.Fatal(err)
	}
	kill := time.Now()
	syscall.Kill(pidA, syscall.SIGKILL)
	st2 := waitPair(t, c, pb.PairState_PAIR_STATE_PROTECTED, 2, 2*time.Minute)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	fa, _ := w.firstAckAfter(kill)
	t.Logf("automatic failover via lockstepd: first ack %v after the kill, sequence %v",
		fa.Sub(kill).Round(time.Millisecond), st2.GetLastFailover().GetDuration().AsDuration().Round(time.Millisecond))
	evMu.Lock()
	steps := map[string]bool{}
	for _, ev := range events {
		if s := ev.GetStep(); s != nil && s.GetPhase() == pb.StepPhase_STEP_PHASE_DONE {
			steps[s.GetSequence()+": "+s.GetStep()] = true
		}
	}
	evMu.Unlock()
	for _, want := range []string{"failover-as-secondary: secondary: x-colo-lost-heartbeat", "reprotect: primary: wait colo"} {
		if !steps[want] {
			t.Errorf("watch stream lacked step %q", want)
		}
	}

	// A planned switchover with the client running: the roles swap back.
	fr, err := c.Failover(ctx, &pb.FailoverRequest{Name: "db1", Mode: pb.FailoverMode_FAILOVER_MODE_PLANNED})
	if err != nil {
		t.Fatal(err)
	}
	if fr.GetFailover().GetTrigger() != pb.FailoverTrigger_FAILOVER_TRIGGER_PLANNED || !fr.GetFailover().GetSucceeded() {
		t.Fatalf("planned failover: %v", fr)
	}
	st3 := waitPair(t, c, pb.PairState_PAIR_STATE_PROTECTED, 3, 2*time.Minute)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	t.Logf("planned switchover: %v, primary now %s", fr.GetFailover().GetDuration().AsDuration().Round(time.Millisecond), st3.GetPrimaryHost())

	// kill -9 the agent: the VMs run on; the restarted agent adopts the pair.
	pidA, _ = checkpoint.ReadPID(filepath.Join(stateDir, "db1", "a"))
	d.kill()
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	startDaemon(t, bin, stateDir, e.overlayDir(), sock, metrics)
	c = dialAPI(t, sock)
	st4 := waitPair(t, c, pb.PairState_PAIR_STATE_PROTECTED, 3, 30*time.Second)
	if st4.GetGeneration() != 3 {
		t.Fatalf("after the agent restart: generation %d, want 3 (nothing re-done)", st4.GetGeneration())
	}
	if p, _ := checkpoint.ReadPID(filepath.Join(stateDir, "db1", "a")); p != pidA {
		t.Fatalf("the primary changed across the agent restart")
	}
	if st4.GetLastFailover() != nil {
		t.Errorf("the restarted agent reports a failover: %v", st4.GetLastFailover())
	}
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	time.Sleep(1500 * time.Millisecond)
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{`lockstep_pair_state{pair="db1",state="protected"} 1`, `lockstep_checkpoint_pause_seconds_count{pair="db1"}`, `lockstep_failovers_total{pair="db1"}`} {
		if !strings.Contains(string(body), m) {
			t.Errorf("metrics lack %s:\n%s", m, body)
		}
	}
	total := w.verify(t)
	t.Logf("%d records acknowledged through a failover, a switchover and an agent restart; none lost", total)
	if _, err := c.DeletePair(ctx, &pb.DeletePairRequest{Name: "db1"}); err != nil {
		t.Fatal(err)
	}
}
