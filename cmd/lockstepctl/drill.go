package main

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"

	"github.com/lockstepvm/lockstep/pairspec"
)

// DrillReport is what a drill measured (-o json, yaml).
type DrillReport struct {
	Pair   string    `yaml:"pair" json:"pair"`
	Target string    `yaml:"killed" json:"killed"`
	Host   string    `yaml:"host" json:"host"`
	PID    int64     `yaml:"pid" json:"pid"`
	At     time.Time `yaml:"at" json:"at"`
	// Detection is from the kill to the pair's first change of state.
	Detection pairspec.Duration `yaml:"detection" json:"detection"`
	// DetectedAs is that change.
	DetectedAs string `yaml:"detectedAs" json:"detectedAs"`
	// Failover is the QMP sequence that ran, if one did.
	Failover *pairspec.Failover `yaml:"failover,omitempty" json:"failover,omitempty"`
	// Reprotection is from the end of the failover (or the first change of state) to protected.
	Reprotection pairspec.Duration `yaml:"reprotection,omitempty" json:"reprotection,omitempty"`
	// Total is from the kill to protected.
	Total      pairspec.Duration `yaml:"total,omitempty" json:"total,omitempty"`
	Protected  bool              `yaml:"protected" json:"protected"`
	Generation uint64            `yaml:"generation,omitempty" json:"generation,omitempty"`
	Error      string            `yaml:"error,omitempty" json:"error,omitempty"`
}

// errNotProtected refuses a drill of a pair that is not protected.
var errNotProtected = errors.New("not protected")

// drill kills one side's QEMU through the agent and follows the pair until it is protected
// again, within wait.
func (a *app) drill(command, name string, target drillTarget, wait time.Duration) error {
	if err := a.dial(); err != nil {
		return err
	}
	ctx, cancel := a.ctx()
	resp, err := a.client.GetPair(ctx, &pb.GetPairRequest{Name: name})
	cancel()
	if err != nil {
		return err
	}
	if st := resp.GetPair().GetStatus().GetState(); st != pb.PairState_PAIR_STATE_PROTECTED {
		return fmt.Errorf("%s %s: the pair is %s: %w (a drill needs a protected pair)", command, name, stateName(st), errNotProtected)
	}
	// The wait is the client's own timer, not a deadline on the stream: a deadline goes to the
	// agent too, which may end the stream a moment before this side's context says why.
	wctx, wcancel := context.WithCancel(context.Background())
	defer wcancel()
	var timedOut atomic.Bool
	timer := time.AfterFunc(wait, func() { timedOut.Store(true); wcancel() })
	defer timer.Stop()
	stream, err := a.client.WatchPair(wctx, &pb.WatchPairRequest{Name: name})
	if err != nil {
		return err
	}
	// The stream's first event is the status: from then on nothing the kill causes is missed.
	if _, err := stream.Recv(); err != nil {
		return err
	}
	kctx, kcancel := a.ctx()
	kill, err := a.ops.KillForDrill(kctx, name, target)
	kcancel()
	if err != nil {
		return err
	}
	rep := &DrillReport{Pair: name, Target: target.String(), Host: kill.Host, PID: kill.PID, At: kill.At.UTC()}
	if a.output == "table" {
		fmt.Fprintf(a.out, "%s %s: killed the %s QEMU on %s (pid %d) at %s\n", command, name, target, kill.Host, kill.PID,
			kill.At.Local().Format("15:04:05.000"))
	}
	pr := &eventPrinter{a: &app{output: "table", out: a.out}}
	var detected, failedOver time.Time
	var ferr error
	for ferr == nil {
		r, err := stream.Recv()
		if err != nil {
			if timedOut.Load() {
				ferr = fmt.Errorf("%s %s: not protected again within %v", command, name, wait)
			} else {
				ferr = err
			}
			break
		}
		ev := r.GetEvent()
		if a.output == "table" {
			_ = pr.print(ev)
		}
		at := ev.GetTime().AsTime()
		if sc := ev.GetStateChange(); sc != nil && detected.IsZero() {
			detected = at
			rep.Detection = pairspec.Duration(at.Sub(kill.At))
			rep.DetectedAs = fmt.Sprintf("%s -> %s: %s", stateName(sc.GetFromState()), stateName(sc.GetToState()), sc.GetReason())
		}
		if f := ev.GetFailover(); f != nil {
			rep.Failover = pairspec.FailoverFromProto(f)
			failedOver = at
			if !f.GetSucceeded() {
				ferr = fmt.Errorf("%s %s: the failover failed at step %q: %s", command, name, f.GetFailedStep(), f.GetError())
			}
		}
		switch st := eventState(ev); {
		case st == pb.PairState_PAIR_STATE_FAILED:
			ferr = fmt.Errorf("%s %s: the pair failed", command, name)
		case st == pb.PairState_PAIR_STATE_PROTECTED && !detected.IsZero():
			from := failedOver
			if from.IsZero() {
				from = detected
			}
			rep.Reprotection = pairspec.Duration(at.Sub(from))
			rep.Total = pairspec.Duration(at.Sub(kill.At))
			rep.Protected = true
			if s := ev.GetStatus(); s != nil {
				rep.Generation = s.GetGeneration()
			}
			return a.printDrill(rep, nil)
		}
	}
	rep.Error = ferr.Error()
	return a.printDrill(rep, ferr)
}

func (a *app) printDrill(rep *DrillReport, failed error) error {
	if a.output != "table" {
		if err := a.emit(rep); err != nil {
			return err
		}
		return failed
	}
	ms := func(d pairspec.Duration) time.Duration { return d.D().Round(time.Millisecond) }
	fmt.Fprintf(a.out, "  detection      %-8v (kill -> %s)\n", ms(rep.Detection), rep.DetectedAs)
	if f := rep.Failover; f != nil {
		fmt.Fprintf(a.out, "  QMP sequence   %-8v (%s on %s)\n", f.Took.D().Round(time.Millisecond), f.Sequence, f.To)
	}
	if rep.Protected {
		fmt.Fprintf(a.out, "  re-protection  %-8v (failover done -> protected)\n", ms(rep.Reprotection))
		fmt.Fprintf(a.out, "  total          %-8v (kill -> protected)\n", ms(rep.Total))
	}
	return failed
}
