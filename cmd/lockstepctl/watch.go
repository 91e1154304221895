package main

import (
	"context"
	"errors"
	"fmt"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func (a *app) newWatchCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "watch PAIR",
		Short: "Stream a pair's events: state changes, steps, checkpoints, resync, failovers",
		Long: `Stream a pair's events until interrupted: first its status, then every state change,
every step of every sequence (protection, failover, re-protection), checkpoint statistics at
most once a second, resync progress and a summary of each failover. -o yaml prints one
document per event, -o json one object per event.`,
		Example: `  lockstepctl watch db1
  lockstepctl watch db1 -o json | jq -c 'select(.type == "state")'`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			return a.watch(args[0], false)
		},
	}
}

// Event is one event of a watch stream in plain form (-o json, -o yaml).
type Event struct {
	Time        *time.Time           `yaml:"time,omitempty" json:"time,omitempty"`
	Type        string               `yaml:"type" json:"type"`
	Status      *pairspec.Status     `yaml:"status,omitempty" json:"status,omitempty"`
	State       *StateChange         `yaml:"state,omitempty" json:"state,omitempty"`
	Step        *pairspec.Step       `yaml:"step,omitempty" json:"step,omitempty"`
	Checkpoints *pairspec.Checkpoint `yaml:"checkpoints,omitempty" json:"checkpoints,omitempty"`
	Resync      *pairspec.Resync     `yaml:"resync,omitempty" json:"resync,omitempty"`
	Failover    *pairspec.Failover   `yaml:"failover,omitempty" json:"failover,omitempty"`
}

// StateChange is a pair's move from one state to another.
type StateChange struct {
	From   string `yaml:"from" json:"from"`
	To     string `yaml:"to" json:"to"`
	Reason string `yaml:"reason,omitempty" json:"reason,omitempty"`
}

func eventFromProto(ev *pb.PairEvent) *Event {
	out := &Event{}
	if t := ev.GetTime(); t != nil {
		v := t.AsTime().UTC()
		out.Time = &v
	}
	switch e := ev.GetEvent().(type) {
	case *pb.PairEvent_Status:
		out.Type, out.Status = "status", pairspec.StatusFromProto(e.Status)
	case *pb.PairEvent_StateChange:
		out.Type = "state"
		out.State = &StateChange{From: stateName(e.StateChange.GetFromState()), To: stateName(e.StateChange.GetToState()), Reason: e.StateChange.GetReason()}
	case *pb.PairEvent_Step:
		out.Type, out.Step = "step", pairspec.StepFromProto(e.Step)
	case *pb.PairEvent_CheckpointStats:
		out.Type, out.Checkpoints = "checkpoints", pairspec.CheckpointsFromProto(e.CheckpointStats)
	case *pb.PairEvent_Resync:
		out.Type, out.Resync = "resync", &pairspec.Resync{CopiedBytes: e.Resync.GetOffset(), TotalBytes: e.Resync.GetLength()}
	case *pb.PairEvent_Failover:
		out.Type, out.Failover = "failover", pairspec.FailoverFromProto(e.Failover)
	default:
		out.Type = "unknown"
	}
	return out
}

// eventPrinter prints events as lines, or as objects with -o json or yaml.
type eventPrinter struct {
	a       *app
	lastBar string
	n       int
}

func (p *eventPrinter) print(ev *pb.PairEvent) error {
	a := p.a
	if a.output != "table" {
		if a.output == "yaml" && p.n > 0 {
			fmt.Fprintln(a.out, "---")
		}
		p.n++
		return a.emit(eventFromProto(ev))
	}
	ts := ev.GetTime().AsTime().Local().Format("15:04:05.000")
	switch e := ev.GetEvent().(type) {
	case *pb.PairEvent_Status:
		fmt.Fprintf(a.out, "%s status    %s, primary %s, generation %d\n", ts, stateName(e.Status.GetState()), e.Status.GetPrimaryHost(), e.Status.GetGeneration())
	case *pb.PairEvent_StateChange:
		fmt.Fprintf(a.out, "%s state     %s -> %s %s\n", ts, stateName(e.StateChange.GetFromState()), stateName(e.StateChange.GetToState()), e.StateChange.GetReason())
	case *pb.PairEvent_Step:
		s := e.Step
		if s.GetPhase() == pb.StepPhase_STEP_PHASE_STARTED {
			return nil
		}
		fmt.Fprintf(a.out, "%s step      %s %2d/%d %-4s %s (%v)%s\n", ts, s.GetSequence(), s.GetIndex(), s.GetTotal(),
			strings.ToLower(strings.TrimPrefix(s.GetPhase().String(), "STEP_PHASE_")), s.GetStep(), s.GetElapsed().AsDuration().Round(100*time.Microsecond), errSuffix(s.GetError()))
	case *pb.PairEvent_Resync:
		b := bar(e.Resync.GetOffset(), e.Resync.GetLength())
		if b != p.lastBar {
			fmt.Fprintf(a.out, "%s resync    %s\n", ts, b)
			p.lastBar = b
		}
	case *pb.PairEvent_CheckpointStats:
		s := e.CheckpointStats
		fmt.Fprintf(a.out, "%s ckpt      %d (%d early), %.1f/s, pause p50 %v p99 %v\n", ts, s.GetCount(), s.GetEarlyCount(), s.GetRatePerSecond(),
			s.GetPauseP50().AsDuration().Round(100*time.Microsecond), s.GetPauseP99().AsDuration().Round(100*time.Microsecond))
	case *pb.PairEvent_Failover:
		f := e.Failover
		fmt.Fprintf(a.out, "%s failover  %s in %v: %s%s\n", ts, f.GetSequence(), f.GetDuration().AsDuration().Round(time.Millisecond), f.GetReason(), errSuffix(f.GetError()))
	}
	return nil
}

// eventState is the state an event says the pair is in; unspecified if it says none.
func eventState(ev *pb.PairEvent) pb.PairState {
	switch e := ev.GetEvent().(type) {
	case *pb.PairEvent_Status:
		return e.Status.GetState()
	case *pb.PairEvent_StateChange:
		return e.StateChange.GetToState()
	}
	return pb.PairState_PAIR_STATE_UNSPECIFIED
}

// watch streams the pair's events until interrupted; with untilProtected it returns when the
// pair is protected (and fails when it fails).
func (a *app) watch(name string, untilProtected bool) error {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	stream, err := a.client.WatchPair(ctx, &pb.WatchPairRequest{Name: name})
	if err != nil {
		return err
	}
	pr := &eventPrinter{a: a}
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		ev := resp.GetEvent()
		if err := pr.print(ev); err != nil {
			return err
		}
		if untilProtected {
			switch eventState(ev) {
			case pb.PairState_PAIR_STATE_PROTECTED:
				return nil
			case pb.PairState_PAIR_STATE_FAILED:
				return errors.New("the pair failed")
			}
		}
	}
}
