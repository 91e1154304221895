package main

import (
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/lockstepvm/lockstep/pairspec"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// emit prints v in the format of -o (json or yaml).
func (a *app) emit(v any) error {
	if a.output == "json" {
		return pairspec.EncodeJSON(a.out, v)
	}
	return pairspec.EncodeYAML(a.out, v)
}

func stateName(s pb.PairState) string { return pairspec.StateWord(s) }

func coloName(m pb.ColoMode) string {
	return strings.ToLower(strings.TrimPrefix(m.String(), "COLO_MODE_"))
}

// printStatus prints one pair's status as a table.
func (a *app) printStatus(p *pb.Pair) error {
	st := p.GetStatus()
	w := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "pair:\t%s\n", p.GetSpec().GetName())
	fmt.Fprintf(w, "state:\t%s\t%s\n", stateName(st.GetState()), st.GetStateReason())
	fmt.Fprintf(w, "primary:\t%s\t%s\n", st.GetPrimaryHost(), coloName(st.GetPrimary().GetColoMode()))
	sec := st.GetSecondaryHost()
	if sec == "" {
		sec = "-"
	}
	fmt.Fprintf(w, "secondary:\t%s\t%s\n", sec, coloName(st.GetSecondary().GetColoMode()))
	fmt.Fprintf(w, "generation:\t%d\n", st.GetGeneration())
	if st.GetEpoch() > 0 {
		// A pair that spans two hosts: the fencing epoch, and what this agent reaches.
		fmt.Fprintf(w, "epoch:\t%d\n", st.GetEpoch())
		store := "reachable"
		if !st.GetStoreReachable() {
			store = "UNREACHABLE (the pair runs on without renewing its lease while its secondary confirms)"
		}
		fmt.Fprintf(w, "store:\t%s\n", store)
		peer := "reachable"
		if !st.GetPeer().GetReachable() {
			peer = "UNREACHABLE"
		}
		if t := st.GetPeer().GetLastHeartbeatTime(); t != nil {
			peer += fmt.Sprintf(" (last heartbeat %s)", t.AsTime().Local().Format("15:04:05.000"))
		}
		fmt.Fprintf(w, "peer agent:\t%s\n", peer)
	}
	cs := st.GetCheckpointStats()
	fmt.Fprintf(w, "checkpoints:\t%d (%d early)\t%.1f/s, pause p50 %v p99 %v, %d B each\n", cs.GetCount(), cs.GetEarlyCount(), cs.GetRatePerSecond(),
		cs.GetPauseP50().AsDuration().Round(100*time.Microsecond), cs.GetPauseP99().AsDuration().Round(100*time.Microsecond), cs.GetMeanCheckpointBytes())
	if r := st.GetResync(); r.GetLength() > 0 && st.GetState() != pb.PairState_PAIR_STATE_PROTECTED {
		fmt.Fprintf(w, "resync:\t%s\n", bar(r.GetOffset(), r.GetLength()))
	}
	if s := st.GetCurrentStep(); s != nil {
		fmt.Fprintf(w, "step:\t%s %d/%d\t%s\n", s.GetSequence(), s.GetIndex(), s.GetTotal(), s.GetStep())
	}
	if f := st.GetLastFailover(); f != nil {
		fmt.Fprintf(w, "last failover:\t%s\t%s in %v (%s)\n", f.GetStartTime().AsTime().Local().Format(time.DateTime), f.GetSequence(),
			f.GetDuration().AsDuration().Round(time.Millisecond), f.GetReason())
	}
	t := st.GetTunables()
	fmt.Fprintf(w, "checkpoint delay:\t%v\n", t.GetCheckpointDelay().AsDuration())
	if b := t.GetBootSettle().AsDuration(); b > 0 {
		fmt.Fprintf(w, "boot settle:\t%v before the first protection\n", b)
	}
	return w.Flush()
}

// printPairTable prints pairs as one line each.
func (a *app) printPairTable(ps []*pb.Pair) error {
	sort.Slice(ps, func(i, j int) bool { return ps[i].GetSpec().GetName() < ps[j].GetSpec().GetName() })
	w := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "PAIR\tSTATE\tPRIMARY\tSECONDARY\tGEN\tCHECKPOINTS\tPAUSE P50")
	for _, p := range ps {
		st := p.GetStatus()
		sec := st.GetSecondaryHost()
		if sec == "" {
			sec = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\t%v\n", p.GetSpec().GetName(), stateName(st.GetState()), st.GetPrimaryHost(), sec,
			st.GetGeneration(), st.GetCheckpointStats().GetCount(), st.GetCheckpointStats().GetPauseP50().AsDuration().Round(100*time.Microsecond))
	}
	return w.Flush()
}

// printPairs prints whole Pair objects (json, yaml) or their table: the output of get, list
// and create.
func (a *app) printPairs(ps []*pb.Pair, single bool) error {
	if a.output == "table" {
		return a.printPairTable(ps)
	}
	if single && len(ps) == 1 {
		return a.emit(pairspec.FromProto(ps[0].GetSpec(), ps[0].GetStatus()))
	}
	items := make([]pairspec.Pair, 0, len(ps))
	for _, p := range ps {
		items = append(items, *pairspec.FromProto(p.GetSpec(), p.GetStatus()))
	}
	return a.emit(pairspec.NewList(items))
}

// bar draws a progress bar.
func bar(off, length uint64) string {
	const width = 30
	if length == 0 {
		return ""
	}
	n := int(min(off, length) * width / length)
	return fmt.Sprintf("[%s%s] %3d%% %d/%d MiB", strings.Repeat("#", n), strings.Repeat(".", width-n), min(off, length)*100/length, off>>20, length>>20)
}

func errSuffix(s string) string {
	if s == "" {
		return ""
	}
	return ": " + s
}
