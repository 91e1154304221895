package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lockstepvm/lockstep/qmp"
)

// SignalKind names a failure signal of one QEMU.
type SignalKind string

// Failure signals.
const (
	SignalProcessExited   SignalKind = "process-exited"
	SignalQMPLost         SignalKind = "qmp-lost"
	SignalQMPTimeout      SignalKind = "qmp-timeout"
	SignalColoExit        SignalKind = "colo-exit"
	SignalMigrationFailed SignalKind = "migration-failed"
	SignalQuorumBad       SignalKind = "quorum-report-bad"
	SignalBlockJobError   SignalKind = "block-job-error"
)

// Signal is one failure signal, typed, with when it was seen.
type Signal struct {
	Kind SignalKind
	Role Role
	Time time.Time
	// Reason is COLO_EXIT's reason, for SignalColoExit.
	Reason qmp.ColoExitReason
	Detail string
}

func (s Signal) String() string {
	if s.Reason != "" {
		return fmt.Sprintf("%s %s (reason %s) %s", s.Role, s.Kind, s.Reason, s.Detail)
	}
	return fmt.Sprintf("%s %s %s", s.Role, s.Kind, s.Detail)
}

// WatchConfig tunes a Watch.
type WatchConfig struct {
	// Interval between health checks (query-status); default 100 ms.
	Interval time.Duration
	// Timeout of a health check; an unanswered check raises SignalQMPTimeout. Default 2 s: a
	// QEMU loading an incoming migration under TCG was measured missing 500 ms checks.
	Timeout time.Duration
}

// Watch reports the failure signals of one VM on out until ctx ends: the process exiting, the
// QMP connection closing, a health check that goes unanswered (a hung QEMU), and the events
// COLO_EXIT, MIGRATION failed, QUORUM_REPORT_BAD and BLOCK_JOB_ERROR. It never blocks on out for
// longer than ctx allows. A QMP timeout is reported once until QEMU answers again.
func Watch(ctx context.Context, vm *VM, cfg WatchConfig, out chan<- Signal) {
	if cfg.Interval == 0 {
		cfg.Interval = 100 * time.Millisecond
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	sub := vm.QMP.Subscribe(qmp.EventColoExit, qmp.EventMigration, qmp.EventQuorumReportBad, qmp.EventBlockJobError)
	defer sub.Close()
	emit := func(s Signal) bool {
		s.Role = vm.Role
		if s.Time.IsZero() {
			s.Time = time.Now()
		}
		select {
		case out <- s:
			return true
		case <-ctx.Done():
			return false
		}
	}
	tick := time.NewTicker(cfg.Interval)
	defer tick.Stop()
	hung := false
	qmpDone := vm.QMP.Done()
	checkDone := make(chan error, 1)
	checking := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-vm.Exited():
			emit(Signal{Kind: SignalProcessExited, Detail: fmt.Sprint(vm.err)})
			return
		case <-qmpDone:
			qmpDone = nil
			// The process exiting closes QMP too; give the exit a moment to be seen first.
			select {
			case <-vm.Exited():
				emit(Signal{Kind: SignalProcessExited, Detail: fmt.Sprint(vm.err)})
				return
			case <-time.After(50 * time.Millisecond):
			}
			if !emit(Signal{Kind: SignalQMPLost, Detail: fmt.Sprint(vm.QMP.Err())}) {
				return
			}
		case <-sub.Ready():
			for {
				ev, ok, _ := sub.TryNext()
				if !ok {
					break
				}
				if s, bad := eventSignal(ev); bad && !emit(s) {
					return
				}
			}
		case <-tick.C:
			if checking || qmpDone == nil {
				continue
			}
			checking = true
			go func() { // owned by this loop: it always finishes within cfg.Timeout
				cctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
				defer cancel()
				_, err := vm.QMP.QueryStatus(cctx)
				checkDone <- err
			}()
		case err := <-checkDone:
			checking = false
			if err == nil {
				hung = false
				continue
			}
			if errors.Is(err, context.DeadlineExceeded) && !hung {
				hung = true
				if !emit(Signal{Kind: SignalQMPTimeout, Detail: fmt.Sprintf("query-status unanswered for %v", cfg.Timeout)}) {
					return
				}
			}
		}
	}
}

// eventSignal maps a QMP event to a failure signal.
func eventSignal(ev *qmp.Event) (Signal, bool) {
	switch ev.Name {
	case qmp.EventColoExit:
		var d qmp.ColoExitData
		_ = ev.DecodeData(&d)
		return Signal{Kind: SignalColoExit, Time: ev.Time, Reason: d.Reason, Detail: "mode " + string(d.Mode)}, true
	case qmp.EventMigration:
		var d qmp.MigrationEventData
		_ = ev.DecodeData(&d)
		if d.Status == qmp.MigrationFailed {
			return Signal{Kind: SignalMigrationFailed, Time: ev.Time}, true
		}
	case qmp.EventQuorumReportBad:
		return Signal{Kind: SignalQuorumBad, Time: ev.Time, Detail: string(ev.Data)}, true
	case qmp.EventBlockJobError:
		return Signal{Kind: SignalBlockJobError, Time: ev.Time, Detail: string(ev.Data)}, true
	}
	return Signal{}, false
}
