package integration

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

// Protection split the way two hosts' agents run it: the secondary's QMP is driven only by the
// PrepareSecondary sequence and by a stand-in for its agent that accepts the migration
// connection and calls IncomingMigration; the primary's protection runs without the secondary's
// QMP. Then the secondary hangs (SIGSTOP: its connections neither break nor progress, as over a
// blackholed network) and the primary fails over with FailoverAsPrimaryYank.
//
// The secondary is stopped at two moments, which leave the primary stuck in different places:
// between checkpoints, its COLO thread waits for the reply to its next checkpoint request while
// the guest runs; inside a checkpoint (right after the primary's STOP event), it waits for the
// secondary to take the state while the guest stays stopped.
func TestColoSplitProtectAndYankFailover(t *testing.T) {
	t.Run("between checkpoints", func(t *testing.T) { splitYankFailover(t, false) })
	t.Run("in a checkpoint", func(t *testing.T) { splitYankFailover(t, true) })
}

func splitYankFailover(t *testing.T, inCheckpoint bool) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnvLAN(t, q, kernel, initrd, 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	prim := e.bootPrimary(ctx)
	w := e.startWriter(t, 20*time.Millisecond)
	w.waitAcked(t, 5, 30*time.Second)

	// The secondary's side.
	g := e.generation() // Ports.Migration 0: "-incoming defer"
	sec := e.launch(ctx, checkpoint.RoleSecondary, e.side(1), g.Ports)
	if _, err := checkpoint.PrepareSecondary(sec.QMP, g).Run(ctx, e.log, nil); err != nil {
		t.Fatalf("%v\nsecondary: %s", err, sec.LogTail())
	}
	secVersion, err := checkpoint.QEMUVersion(ctx, sec.QMP)
	if err != nil {
		t.Fatal(err)
	}
	link := newMigrationLink(t)
	actx, acancel := context.WithCancel(ctx)
	incoming := make(chan error, 1)
	go func() { // the secondary's agent: owned by the test, ended below
		f, err := link.accept(actx)
		if err != nil {
			incoming <- err
			return
		}
		defer f.Close() // QEMU holds its own copy
		incoming <- checkpoint.IncomingMigration(actx, sec.QMP, g, f)
	}()
	defer func() { acancel(); <-incoming }()

	// The primary's side.
	obs := checkpoint.NewObserver(e.spec.Tunables.CheckpointDelay)
	sub := prim.QMP.Subscribe(checkpoint.ObserverEvents...)
	octx, ocancel := context.WithCancel(context.Background())
	odone := make(chan struct{})
	go func() { defer close(odone); _ = obs.Run(octx, sub) }()
	p := &pair{e: e, primary: prim, secondary: sec, gen: g, obs: obs}
	p.stopObs = func() { ocancel(); <-odone; sub.Close(); obs.Close() }
	defer p.stopObs()
	var confirmed atomic.Int32
	cfg := checkpoint.ProtectConfig{
		Spec: e.spec, Gen: g, Primary: prim.QMP,
		DialMigration:    link.dial(obs.SetMigrationSocket),
		SecondaryVersion: secVersion,
		ConfirmSecondary: func(ctx context.Context) error {
			confirmed.Add(1)
			return checkpoint.SecondaryInColo(ctx, sec.QMP)
		},
	}
	seq := checkpoint.StartProtection(cfg)
	for _, name := range seq.StepNames() {
		if strings.HasPrefix(name, "secondary:") && name != "secondary: confirm colo" {
			t.Fatalf("primary-only protection has secondary step %q", name)
		}
	}
	took, err := seq.Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("%v\nprimary: %s\nsecondary: %s", err, prim.LogTail(), sec.LogTail())
	}
	select {
	case err := <-incoming:
		incoming <- err // for the deferred wait
		if err != nil {
			t.Fatalf("secondary's incoming migration: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the secondary's agent never finished migrate-incoming")
	}
	if confirmed.Load() != 1 {
		t.Fatalf("ConfirmSecondary called %d times, want 1", confirmed.Load())
	}
	t.Logf("split protection (secondary QEMU %s) reached COLO in %v", secVersion, took)
	st := p.waitCheckpoints(t, 5, 30*time.Second)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	st = obs.Stats()
	t.Logf("%d checkpoints (%d early), pause p50 %v max %v", st.Checkpoints, st.Early, st.PauseP50, st.PauseMax)

	// The secondary hangs. Give the primary time to get stuck (a checkpoint is due every 200 ms)
	// before it fails over.
	var stop time.Time
	if inCheckpoint {
		stop = stopInCheckpoint(t, ctx, prim, sec)
	} else {
		stop = time.Now()
		if err := sec.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	stuckAt := obs.Stats().Checkpoints
	ackedBefore := w.Acked()
	qctx, qcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	rs, qerr := prim.QMP.QueryStatus(qctx)
	qcancel()
	t.Logf("1.5 s after SIGSTOP: primary run state %q (err %v), %d checkpoints, record %d acknowledged", rs.Status, qerr, stuckAt, ackedBefore)
	if inCheckpoint && qerr == nil && rs.Status == qmp.RunStateRunning {
		t.Fatalf("the primary runs: it is not stuck inside a checkpoint")
	}

	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	failStart := time.Now()
	tookF, err := checkpoint.FailoverAsPrimaryYank(prim.QMP, g).Run(fctx, e.log, nil)
	fcancel()
	if err != nil {
		t.Fatalf("yank failover: %v\nprimary: %s", err, prim.LogTail())
	}
	if tookF > 5*time.Second {
		t.Errorf("yank failover took %v, want a few seconds at most", tookF)
	}
	// The run state right after the sequence, and until it settles.
	var states []string
	var last qmp.RunState
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		s, err := prim.QMP.QueryStatus(ctx)
		if err != nil {
			t.Fatalf("query-status after failover: %v", err)
		}
		if s.Status != last {
			states = append(states, fmt.Sprintf("%s@%v", s.Status, time.Since(failStart).Round(time.Millisecond)))
			last = s.Status
		}
		if s.Status == qmp.RunStateRunning {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("primary run states after the failover began: %v", states)
	if len(states) != 1 || last != qmp.RunStateRunning {
		t.Errorf("primary not running at once after the yank failover: %v", states)
	}
	cs, err := prim.QMP.QueryColoStatus(ctx)
	t.Logf("primary colo status after failover: %+v %v", cs, err)

	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	first, ok := w.firstAckAfter(failStart)
	if !ok {
		t.Fatal("no record acknowledged after the failover")
	}
	n, sent, _ := w.inFlightAt(stop)
	t.Logf("secondary SIGSTOP: yank failover sequence %v; first ack %v after the failover began, %v after the SIGSTOP (record %d, sent %v after the SIGSTOP); client's longest wait %v",
		tookF.Round(time.Millisecond), first.Sub(failStart).Round(time.Millisecond), first.Sub(stop).Round(time.Millisecond), n, sent.Round(time.Millisecond), w.maxWait.Round(time.Millisecond))
	total := w.verify(t)
	t.Logf("%d records acknowledged, all in the guest's memory and on its disk", total)
	t.Logf("primary's QEMU log: %s", prim.LogTail())
}

// stopInCheckpoint stops the secondary while the primary's guest is stopped for a checkpoint,
// so that the checkpoint never completes. A try that lands after the secondary answered (the
// primary resumes) is undone with SIGCONT, which the link survives, and repeated at the next
// checkpoint. It returns when the secondary was stopped.
func stopInCheckpoint(t *testing.T, ctx context.Context, prim, sec *checkpoint.VM) time.Time {
	t.Helper()
	sub := prim.QMP.Subscribe(qmp.EventStop, qmp.EventResume)
	defer sub.Close()
	for try := 1; try <= 10; try++ {
		for {
			ev, err := sub.Next(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if ev.Name == qmp.EventStop {
				break
			}
		}
		stop := time.Now()
		if err := sec.Signal(syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		_, err := sub.Next(wctx) // only RESUME can come
		cancel()
		if err != nil {
			t.Logf("secondary stopped inside a checkpoint (try %d)", try)
			return stop
		}
		if err := sec.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	}
	t.Fatal("never stopped the secondary inside a checkpoint in 10 tries")
	return time.Time{}
}
