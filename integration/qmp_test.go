// Package integration holds the end-to-end tests that run real QEMU (see qemuenv for which).
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

	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

func withTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// forEachQEMU runs f against every QEMU the machine has (7.2 and 11.1).
func forEachQEMU(t *testing.T, f func(t *testing.T, q *qemuenv.QEMU)) {
	for _, q := range qemuenv.All(t) {
		t.Run("qemu-"+q.Name, func(t *testing.T) { f(t, q) })
	}
}

func startNone(t *testing.T, q *qemuenv.QEMU) (*qemuenv.Process, *qmp.Client) {
	t.Helper()
	dir := qemuenv.ShortTempDir(t)
	p := qemuenv.Start(t, q, dir, "-M", "none", "-nodefaults", "-display", "none", "-accel", "tcg")
	c, err := qmp.Dial(withTimeout(t, 30*time.Second), "unix", p.QMPPath)
	if err != nil {
		t.Fatalf("QEMU %s: %v\n%s", q.Name, err, p.Stderr.String())
	}
	t.Cleanup(func() { c.Close() })
	// Registered after the kill, so it runs before it (cleanups run last first): a failed test
	// says whether QEMU had died on its own, and what it printed.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		select {
		case <-p.Exited():
			t.Logf("QEMU %s had exited: %v\n%s", q.Name, p.ExitErr(), p.Stderr.String())
		default:
			t.Logf("QEMU %s still running; its stderr:\n%s", q.Name, p.Stderr.String())
		}
	})
	return p, c
}

func TestQMPHandshakeAndProbe(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q *qemuenv.QEMU) {
		_, c := startNone(t, q)
		g := c.Greeting()
		if g.Version.QEMU.Major != q.Major || g.Version.QEMU.Minor != q.Minor {
			t.Errorf("greeting version %s, binary says %s", g.Version, q.Version)
		}
		if !c.OOB() {
			t.Error("QEMU offers oob but it was not negotiated")
		}
		f, err := c.Features(withTimeout(t, 30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for _, cp := range []string{qmp.CapXColo, qmp.CapReturnPath, qmp.CapEvents, qmp.CapPauseBeforeSwitchover} {
			if !f.HasCapability(cp) {
				t.Errorf("capability %s not found", cp)
			}
		}
		for _, cmd := range []string{"x-colo-lost-heartbeat", "query-colo-status", "x-blockdev-change", "yank", "blockdev-mirror", "nbd-server-start"} {
			if !f.HasCommand(cmd) {
				t.Errorf("command %s not found", cmd)
			}
		}
		// 7.2 takes chardev reconnect in seconds; 11.x only reconnect-ms.
		if q.Major >= 11 && (!f.ChardevReconnectMS || f.ChardevReconnect) {
			t.Errorf("11.x: reconnect-ms %v reconnect %v", f.ChardevReconnectMS, f.ChardevReconnect)
		}
		if q.Major == 7 && (f.ChardevReconnectMS || !f.ChardevReconnect) {
			t.Errorf("7.2: reconnect-ms %v reconnect %v", f.ChardevReconnectMS, f.ChardevReconnect)
		}
		cs, err := c.QueryColoStatus(withTimeout(t, 10*time.Second))
		if err != nil || cs.Mode != qmp.ColoModeNone {
			t.Errorf("query-colo-status %+v %v", cs, err)
		}
	})
}

func TestQMPStopContEvents(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q *qemuenv.QEMU) {
		_, c := startNone(t, q)
		ctx := withTimeout(t, 30*time.Second)
		sub := c.Subscribe(qmp.EventStop, qmp.EventResume)
		defer sub.Close()
		before := time.Now()
		if err := c.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		st, err := c.QueryStatus(ctx)
		if err != nil || st.Running || st.Status != qmp.RunStatePaused {
			t.Fatalf("after stop: %+v %v", st, err)
		}
		if err := c.Cont(ctx); err != nil {
			t.Fatal(err)
		}
		after := time.Now()
		stop, err := sub.Next(ctx)
		if err != nil || stop.Name != qmp.EventStop {
			t.Fatalf("first event %v %v", stop, err)
		}
		resume, err := sub.Next(ctx)
		if err != nil || resume.Name != qmp.EventResume {
			t.Fatalf("second event %v %v", resume, err)
		}
		// QEMU's own timestamps, microsecond precision, within the calls' wall-clock window.
		slack := time.Second
		for _, ev := range []*qmp.Event{stop, resume} {
			if ev.Time.Before(before.Add(-slack)) || ev.Time.After(after.Add(slack)) {
				t.Errorf("%s at %v, outside [%v, %v]", ev.Name, ev.Time, before, after)
			}
		}
		if resume.Time.Before(stop.Time) {
			t.Errorf("RESUME %v before STOP %v", resume.Time, stop.Time)
		}
		t.Logf("QEMU %s: STOP %s RESUME %s (%v apart)", q.Name, stop.Time.Format(time.StampMicro), resume.Time.Format(time.StampMicro), resume.Time.Sub(stop.Time))
	})
}

func TestQMPThousandConcurrentCalls(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q *qemuenv.QEMU) {
		_, c := startNone(t, q)
		ctx := withTimeout(t, 60*time.Second)
		const n = 1000
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				var err error
				if i%2 == 0 {
					var st qmp.Status
					st, err = c.QueryStatus(ctx)
					if err == nil && st.Status != qmp.RunStateRunning {
						err = fmt.Errorf("status %q", st.Status)
					}
				} else {
					var v qmp.VersionInfo
					v, err = c.QueryVersion(ctx)
					if err == nil && v.QEMU.Major != q.Major {
						err = fmt.Errorf("version %s", v)
					}
				}
				if err != nil {
					errs <- fmt.Errorf("call %d: %w", i, err)
				}
			}(i)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		if st := c.Stats(); st.UnknownReplies != 0 {
			t.Errorf("%d replies matched no call", st.UnknownReplies)
		}
	})
}

// An in-band blockdev-add blocks QEMU's main loop opening a FIFO (blkdebug reads its config
// file); an out-of-band yank must still be answered.
func TestQMPOOBYankWhileCommandWaits(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q *qemuenv.QEMU) {
		_, c := startNone(t, q)
		dir := qemuenv.ShortTempDir(t)
		fifo := filepath.Join(dir, "cfg.fifo")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		ctx := withTimeout(t, 30*time.Second)
		stuck := make(chan error, 1)
		go func() {
			stuck <- c.BlockdevAdd(ctx, map[string]any{
				"driver": "blkdebug", "node-name": "hang0", "config": fifo,
				"image": map[string]any{"driver": "null-co"},
			})
		}()
		// Give QEMU time to read the command and block on the FIFO.
		time.Sleep(300 * time.Millisecond)
		select {
		case err := <-stuck:
			t.Fatalf("blockdev-add did not block on the FIFO: %v", err)
		default:
		}
		yctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		err := c.Yank(yctx) // no instances: a no-op that QEMU answers
		if err != nil {
			t.Fatalf("OOB yank while an in-band command waits: %v", err)
		}
		select {
		case err := <-stuck:
			t.Fatalf("blockdev-add finished before the FIFO opened: %v", err)
		default:
		}
		// Open the FIFO for writing and close it: blkdebug reads an empty config and goes on.
		w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		w.Close()
		if err := <-stuck; err != nil && !errors.Is(err, context.Canceled) {
			t.Logf("blockdev-add after the FIFO opened: %v", err)
		}
		if _, err := c.QueryStatus(ctx); err != nil {
			t.Fatalf("connection unusable afterwards: %v", err)
		}
	})
}
