package integration

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

// guestImages returns the test guest's kernel and initramfs (built by `make guest`), or skips.
func guestImages(t testing.TB) (kernel, initrd string) {
	t.Helper()
	dir := filepath.Join(qemuenv.BuildDir(), "guest")
	kernel, initrd = filepath.Join(dir, "vmlinuz"), filepath.Join(dir, "initrd.img")
	for _, p := range []string{kernel, initrd} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("test guest not built (run `make guest`): %v", err)
		}
	}
	return kernel, initrd
}

// writer is the test's client: it writes numbered records on one TCP connection, each waiting
// for its acknowledgement, and records when each ack came.
type writer struct {
	c        *client.Client
	interval time.Duration
	stop     chan struct{}
	done     chan struct{}

	mu      sync.Mutex
	acked   uint64
	ackAt   []time.Time // ackAt[n-1] is when record n was acknowledged
	sentAt  []time.Time // sentAt[n-1] is when record n was sent
	maxWait time.Duration
	err     error
}

func startWriter(t testing.TB, addr string, interval time.Duration) *writer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := client.DialReady(ctx, addr, 200*time.Millisecond)
	if err != nil {
		t.Fatalf("guest service never answered on %s: %v", addr, err)
	}
	return startWriterOn(t, c, interval)
}

// startWriterOn writes records over a client the caller connected.
func startWriterOn(t testing.TB, c *client.Client, interval time.Duration) *writer {
	w := &writer{c: c, interval: interval, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	t.Cleanup(func() { w.Stop(); c.Close() })
	return w
}

func (w *writer) run() {
	defer close(w.done)
	for n := uint64(1); ; n++ {
		select {
		case <-w.stop:
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t0 := time.Now()
		err := w.c.Write(ctx, n, client.Payload(n))
		cancel()
		now := time.Now()
		w.mu.Lock()
		if err != nil {
			w.err = err
			w.mu.Unlock()
			return
		}
		w.acked = n
		w.ackAt = append(w.ackAt, now)
		w.sentAt = append(w.sentAt, t0)
		if d := now.Sub(t0); d > w.maxWait {
			w.maxWait = d
		}
		w.mu.Unlock()
		if w.interval > 0 {
			select {
			case <-w.stop:
				return
			case <-time.After(w.interval):
			}
		}
	}
}

// Stop ends the writing; it returns the last acknowledged record and the writer's error.
func (w *writer) Stop() (uint64, error) {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked, w.err
}

func (w *writer) Acked() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.acked
}

// firstAckAfter returns when the first record was acknowledged after t.
func (w *writer) firstAckAfter(t time.Time) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, a := range w.ackAt {
		if a.After(t) {
			return a, true
		}
	}
	return time.Time{}, false
}

// inFlightAt describes the record whose ack was the first after t: when it was sent relative
// to t (negative: before t, so it was in flight at t).
func (w *writer) inFlightAt(t time.Time) (n int, sentRel, ackRel time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, a := range w.ackAt {
		if a.After(t) {
			return i + 1, w.sentAt[i].Sub(t), a.Sub(t)
		}
	}
	return 0, 0, 0
}

func (w *writer) waitAcked(t testing.TB, n uint64, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for w.Acked() < n {
		w.mu.Lock()
		err := w.err
		w.mu.Unlock()
		if err != nil {
			t.Fatalf("client: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d records acknowledged within %v, want %d", w.Acked(), within, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// verify stops the writer and checks on the same connection that every acknowledged record is
// in the guest's memory and on its disk.
func (w *writer) verify(t testing.TB) uint64 {
	t.Helper()
	acked, err := w.Stop()
	if err != nil {
		t.Fatalf("client lost its connection or a write failed: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	want := client.Expected(acked)
	mem, err := w.c.Query(ctx)
	if err != nil {
		t.Fatalf("query on the same connection: %v", err)
	}
	if mem != want {
		t.Fatalf("guest memory log %+v, want %+v (every acknowledged record)", mem, want)
	}
	disk, err := w.c.QueryDisk(ctx)
	if err != nil {
		t.Fatalf("disk query: %v", err)
	}
	if disk != want {
		t.Fatalf("guest disk log %+v, want %+v", disk, want)
	}
	return acked
}

// pair is a running protected pair in the test.
type pair struct {
	e         *pairEnv
	primary   *checkpoint.VM
	secondary *checkpoint.VM
	gen       checkpoint.Generation
	obs       *checkpoint.Observer
	stopObs   func()
}

func (e *pairEnv) bootPrimary(ctx context.Context) *checkpoint.VM {
	side := e.side(e.nextHub)
	e.nextHub++
	return e.launch(ctx, checkpoint.RolePrimary, side, checkpoint.Ports{})
}

// protect starts a fresh secondary (on the hub port hubPort, on the hub LAN) and protects
// primary with it.
func (e *pairEnv) protect(ctx context.Context, primary *checkpoint.VM, hubPort int, reprotect bool) *pair {
	t := e.t
	g := e.generation()
	if e.beforeProtect != nil {
		e.beforeProtect(g)
	}
	sec := e.launch(ctx, checkpoint.RoleSecondary, e.side(hubPort), g.Ports)
	if e.tls != nil {
		g.TLS = e.tls.generation(primary.Side, sec.Side)
	}
	obs := checkpoint.NewObserver(e.spec.Tunables.CheckpointDelay)
	link := newMigrationLink(e.t)
	sub := primary.QMP.Subscribe(checkpoint.ObserverEvents...)
	octx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = obs.Run(octx, sub) }()
	p := &pair{e: e, primary: primary, secondary: sec, gen: g, obs: obs}
	p.stopObs = func() { cancel(); <-done; sub.Close(); obs.Close() }
	t.Cleanup(p.stopObs)
	var resyncSeen int64
	cfg := checkpoint.ProtectConfig{
		Spec: e.spec, Gen: g, Primary: primary.QMP, Secondary: sec.QMP,
		DialMigration:   link.dial(obs.SetMigrationSocket),
		AcceptMigration: link.accept,
		OnResync:        func(off, l int64) { resyncSeen = l },
	}
	if e.tls != nil {
		cfg.AcceptMigration = e.tls.peekingAccept(link.accept)
	}
	seq := checkpoint.StartProtection(cfg)
	if reprotect {
		seq = checkpoint.Reprotect(cfg)
	}
	took, err := seq.Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("%v\nprimary: %s\nsecondary: %s", err, primary.LogTail(), sec.LogTail())
	}
	// The mirror job's length is its progress measure; it covers at least the whole disk.
	if resyncSeen < e.spec.DiskSize {
		t.Errorf("resync progress reported length %d, want at least the disk's %d", resyncSeen, e.spec.DiskSize)
	}
	t.Logf("%s (generation %d) reached COLO in %v", seq.Name, g.N, took)
	return p
}

// waitCheckpoints waits until n checkpoints were observed.
func (p *pair) waitCheckpoints(t testing.TB, n uint64, within time.Duration) checkpoint.Stats {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		st := p.obs.Stats()
		if st.Checkpoints >= n {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d checkpoints within %v, want %d; stats %+v", st.Checkpoints, within, n, st)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// watchFor waits for a failure signal of kind from vm.
func watchFor(t testing.TB, vm *checkpoint.VM, cfg checkpoint.WatchConfig, kinds ...checkpoint.SignalKind) <-chan checkpoint.Signal {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan checkpoint.Signal, 16)
	out := make(chan checkpoint.Signal, 1)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); checkpoint.Watch(ctx, vm, cfg, sigs) }()
	go func() {
		defer wg.Done()
		for {
			select {
			case s := <-sigs:
				for _, k := range kinds {
					if s.Kind == k {
						out <- s
						return
					}
				}
				t.Logf("signal (ignored): %v", s)
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return out
}

func awaitSignal(t testing.TB, ch <-chan checkpoint.Signal, within time.Duration) checkpoint.Signal {
	t.Helper()
	select {
	case s := <-ch:
		return s
	case <-time.After(within):
		t.Fatalf("no failure signal within %v", within)
	}
	return checkpoint.Signal{}
}

func failoverReport(t testing.TB, what string, w *writer, kill, detected time.Time, seq time.Duration) {
	first, ok := w.firstAckAfter(kill)
	if !ok {
		t.Fatalf("%s: no reply after the kill", what)
	}
	n, sent, _ := w.inFlightAt(kill)
	t.Logf("%s: detection %v, QMP sequence %v, first reply %v after the kill (record %d, sent %v after the kill)",
		what, detected.Sub(kill).Round(time.Millisecond), seq.Round(time.Millisecond), first.Sub(kill).Round(time.Millisecond), n, sent.Round(time.Millisecond))
}

// Issue scenarios 1, 2 and 4: protect (checkpoints observed while a client writes), SIGKILL the
// primary (the secondary takes over, the same connection carries on, nothing acknowledged is
// lost), re-protect onto a fresh secondary with a visible resync, and SIGKILL the new primary.
func TestColoProtectFailoverReprotect(t *testing.T) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnvLAN(t, q, kernel, initrd, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	prim := e.bootPrimary(ctx)
	w := e.startWriter(t, 20*time.Millisecond)
	w.waitAcked(t, 5, 30*time.Second)
	p := e.protect(ctx, prim, 1, false)
	st := p.waitCheckpoints(t, 5, 30*time.Second)
	before := w.Acked()
	w.waitAcked(t, before+20, 30*time.Second)
	st = p.obs.Stats()
	if st.PauseP50 <= 0 || st.PauseMax < st.PauseP50 {
		t.Fatalf("no pause figures: %+v", st)
	}
	t.Logf("generation 1: %d checkpoints (%d early), pause p50 %v p99 %v, %.1f/s, %d bytes/checkpoint",
		st.Checkpoints, st.Early, st.PauseP50, st.PauseP99, st.Rate, st.BytesAvg)

	// Scenario 2: the primary dies.
	sig := watchFor(t, prim, checkpoint.WatchConfig{}, checkpoint.SignalProcessExited, checkpoint.SignalQMPLost)
	kill := time.Now()
	if err := prim.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	s := awaitSignal(t, sig, 10*time.Second)
	detected := time.Now()
	took, err := checkpoint.FailoverAsSecondary(p.secondary.QMP, false).Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("failover: %v\n%s", err, p.secondary.LogTail())
	}
	t.Logf("signal: %v", s)
	n := w.Acked()
	w.waitAcked(t, n+10, 30*time.Second)
	failoverReport(t, "primary SIGKILL", w, kill, detected, took)
	p.stopObs()

	// Scenario 4: re-protect the survivor onto a fresh secondary.
	survivor := p.secondary
	p2 := e.protect(ctx, survivor, 0, true)
	p2.waitCheckpoints(t, 5, 30*time.Second)
	n = w.Acked()
	w.waitAcked(t, n+20, 30*time.Second)
	sig2 := watchFor(t, survivor, checkpoint.WatchConfig{}, checkpoint.SignalProcessExited, checkpoint.SignalQMPLost)
	kill2 := time.Now()
	if err := survivor.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	awaitSignal(t, sig2, 10*time.Second)
	detected2 := time.Now()
	took2, err := checkpoint.FailoverAsSecondary(p2.secondary.QMP, false).Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("second failover: %v\n%s", err, p2.secondary.LogTail())
	}
	n = w.Acked()
	w.waitAcked(t, n+10, 30*time.Second)
	failoverReport(t, "new primary SIGKILL", w, kill2, detected2, took2)
	total := w.verify(t)
	t.Logf("%d records acknowledged across two generations, all present in memory and on disk; longest wait %v", total, w.maxWait)
}

// Issue scenario 3: the secondary dies; the primary carries on alone and the client never waits
// more than a second.
func TestColoSecondaryDies(t *testing.T) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnvLAN(t, q, kernel, initrd, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	prim := e.bootPrimary(ctx)
	w := e.startWriter(t, 20*time.Millisecond)
	w.waitAcked(t, 5, 30*time.Second)
	p := e.protect(ctx, prim, 1, false)
	p.waitCheckpoints(t, 5, 30*time.Second)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)

	// The primary notices through COLO_EXIT (its migration stream broke) or the watcher of the
	// secondary's process; whichever comes first.
	sigP := watchFor(t, prim, checkpoint.WatchConfig{}, checkpoint.SignalColoExit, checkpoint.SignalMigrationFailed)
	sigS := watchFor(t, p.secondary, checkpoint.WatchConfig{}, checkpoint.SignalProcessExited)
	kill := time.Now()
	if err := p.secondary.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var s checkpoint.Signal
	select {
	case s = <-sigP:
	case s = <-sigS:
	case <-time.After(10 * time.Second):
		t.Fatal("secondary's death not detected")
	}
	detected := time.Now()
	took, err := checkpoint.FailoverAsPrimary(prim.QMP, p.gen).Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("failover as primary: %v\n%s", err, prim.LogTail())
	}
	t.Logf("signal %v", s)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	failoverReport(t, "secondary SIGKILL", w, kill, detected, took)
	st, err := prim.QMP.QueryStatus(ctx)
	if err != nil || st.Status != qmp.RunStateRunning {
		t.Fatalf("primary after failover: %+v %v", st, err)
	}
	w.verify(t)
	if w.maxWait > time.Second {
		t.Fatalf("the client waited %v for an ack; want at most 1 s", w.maxWait)
	}
	t.Logf("longest wait for an ack: %v", w.maxWait)
}

// Issue scenario 5: the primary hangs (SIGSTOP). Its QMP stops answering: the watcher reports a
// QMP timeout, the secondary yanks its connections to the primary and takes over, and the hung
// primary is fenced (killed) before it could resume.
func TestColoPrimaryHangs(t *testing.T) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnvLAN(t, q, kernel, initrd, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	prim := e.bootPrimary(ctx)
	w := e.startWriter(t, 20*time.Millisecond)
	w.waitAcked(t, 5, 30*time.Second)
	p := e.protect(ctx, prim, 1, false)
	p.waitCheckpoints(t, 5, 30*time.Second)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)

	sig := watchFor(t, prim, checkpoint.WatchConfig{Interval: 100 * time.Millisecond, Timeout: 500 * time.Millisecond}, checkpoint.SignalQMPTimeout)
	stop := time.Now()
	if err := prim.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	s := awaitSignal(t, sig, 10*time.Second)
	detected := time.Now()
	took, err := checkpoint.FailoverAsSecondary(p.secondary.QMP, true).Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("failover: %v\n%s", err, p.secondary.LogTail())
	}
	// Fence: the hung primary must never run again.
	prim.Kill()
	t.Logf("signal %v", s)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	failoverReport(t, "primary SIGSTOP", w, stop, detected, took)
	w.verify(t)
}

// Issue scenario 6: a bad spec gets a clear error and starts no process.
func TestColoBadSpec(t *testing.T) {
	q := qemuenv.QEMU11(t)
	dir := qemuenv.ShortTempDir(t)
	ver, err := checkpoint.DetectVersion(context.Background(), []string{q.Path})
	if err != nil {
		t.Fatal(err)
	}
	spec := checkpoint.Spec{Name: "bad one", MemoryMiB: 128, DiskSize: 64 << 20, Machine: "q35",
		NIC: checkpoint.NIC{MAC: "zz", Backend: "socket"}, QEMU: []string{q.Path}, QEMUVersion: ver}.WithDefaults()
	run := filepath.Join(dir, "run")
	vm, err := checkpoint.Launch(context.Background(), checkpoint.LaunchConfig{Spec: spec, Role: checkpoint.RolePrimary,
		Side: checkpoint.Side{Host: "127.0.0.1", RunDir: run, Disk: filepath.Join(dir, "none.raw"), NetSocket: "127.0.0.1:1"}})
	if err == nil {
		vm.Kill()
		t.Fatal("a bad spec was launched")
	}
	for _, field := range []string{"spec: name", "spec: machine", "spec: nic.mac"} {
		if !containsStr(err.Error(), field) {
			t.Errorf("error %q does not name %s", err, field)
		}
	}
	if !errors.Is(err, checkpoint.ErrInvalidSpec) {
		t.Errorf("error does not wrap ErrInvalidSpec")
	}
	if _, serr := os.Stat(run); !os.IsNotExist(serr) {
		t.Errorf("run folder created for a bad spec")
	}
	t.Logf("refused: %v", fmt.Sprint(err))
}

func containsStr(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (func() bool {
		for i := 0; i+len(sub) <= len(s); i++ {
			if s[i:i+len(sub)] == sub {
				return true
			}
		}
		return false
	})())
}
