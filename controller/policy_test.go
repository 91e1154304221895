package controller

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the expected output of testdata/*.txt")

func sideOf(s string) (Side, error) {
	switch s {
	case "a":
		return SideA, nil
	case "b":
		return SideB, nil
	}
	return 0, fmt.Errorf("side %q: want a or b", s)
}

// parseEvent reads one event of a script line.
func parseEvent(line string) (Event, int, error) {
	f := strings.Fields(line)
	if len(f) == 0 {
		return nil, 0, errors.New("empty event")
	}
	arg := func(i int) string {
		if i < len(f) {
			return f[i]
		}
		return ""
	}
	rest := func(i int) string {
		if i < len(f) {
			return strings.Join(f[i:], " ")
		}
		return ""
	}
	switch f[0] {
	case "start":
		return EvStart{}, 1, nil
	case "stop":
		return EvStop{}, 1, nil
	case "booted":
		s, err := sideOf(arg(1))
		return EvBooted{Side: s}, 1, err
	case "boot-failed":
		return EvBootFailed{Err: rest(1)}, 1, nil
	case "protected":
		g, err := strconv.Atoi(arg(1))
		return EvProtected{Gen: g}, 1, err
	case "protect-failed":
		g, err := strconv.Atoi(arg(1))
		return EvProtectFailed{Gen: g, Err: rest(2)}, 1, err
	case "signal":
		s, err := sideOf(arg(1))
		return EvSignal{Side: s, Kind: SignalKind(arg(2))}, 1, err
	case "failover-done":
		s, err := sideOf(arg(1))
		return EvFailoverDone{Survivor: s}, 1, err
	case "failover-failed":
		s, err := sideOf(arg(1))
		return EvFailoverFailed{Survivor: s, Err: rest(2)}, 1, err
	case "tick":
		n := 1
		if arg(1) != "" {
			var err error
			if n, err = strconv.Atoi(arg(1)); err != nil {
				return nil, 0, err
			}
		}
		return EvTick{}, n, nil
	case "failover":
		return EvFailover{Forced: arg(1) == "forced"}, 1, nil
	case "reprotect":
		return EvReprotect{}, 1, nil
	}
	return nil, 0, fmt.Errorf("unknown event %q", f[0])
}

func describe(a Action) string {
	switch a := a.(type) {
	case ActBoot:
		return fmt.Sprintf("boot %s", a.Side)
	case ActProtect:
		if a.Reprotect {
			return fmt.Sprintf("reprotect gen=%d primary=%s", a.Gen, a.Primary)
		}
		return fmt.Sprintf("protect gen=%d primary=%s", a.Gen, a.Primary)
	case ActKill:
		return fmt.Sprintf("kill %s (%s)", a.Side, a.Reason)
	case ActFailoverAsSecondary:
		return fmt.Sprintf("failover-as-secondary %s yank=%v", a.Side, a.Yank)
	case ActFailoverAsPrimary:
		return fmt.Sprintf("failover-as-primary %s", a.Side)
	case ActSwitchover:
		return fmt.Sprintf("switchover from %s", a.From)
	}
	return fmt.Sprintf("%T", a)
}

func snapshot(p *Policy) string {
	s := fmt.Sprintf("state=%s primary=%s secondary=%v gen=%d failovers=%d", p.State(), p.Primary(), p.HasSecondary(), p.Generation(), p.Failovers())
	if p.Reason() != "" {
		s += " reason=" + strconv.Quote(p.Reason())
	}
	return s
}

// apply feeds one script line and returns the output lines.
func apply(t *testing.T, p *Policy, line string) []string {
	ev, n, err := parseEvent(line)
	if err != nil {
		t.Fatalf("%q: %v", line, err)
	}
	var out []string
	for i := 0; i < n; i++ {
		before := snapshot(p)
		acts, err := p.Step(ev)
		if err != nil {
			if snapshot(p) != before {
				t.Fatalf("%q: a refused request changed the pair: %s -> %s", line, before, snapshot(p))
			}
			out = append(out, "error: "+err.Error())
		}
		checkInvariants(t, line, acts)
		for _, a := range acts {
			out = append(out, "  "+describe(a))
		}
	}
	return append(out, snapshot(p))
}

// checkInvariants holds for every step: a side only takes over after the other side was fenced
// in the same batch, and nothing is both failed over from and to.
func checkInvariants(t *testing.T, line string, acts []Action) {
	t.Helper()
	killed := map[Side]bool{}
	for _, a := range acts {
		switch a := a.(type) {
		case ActKill:
			killed[a.Side] = true
		case ActFailoverAsSecondary:
			if !killed[a.Side.Other()] {
				t.Errorf("%q: the secondary on %s takes over before the primary on %s was fenced: %v", line, a.Side, a.Side.Other(), acts)
			}
			if killed[a.Side] {
				t.Errorf("%q: failover onto a side just killed: %v", line, acts)
			}
		case ActFailoverAsPrimary:
			if !killed[a.Side.Other()] {
				t.Errorf("%q: the primary on %s runs on alone before the secondary was fenced: %v", line, a.Side, acts)
			}
			if killed[a.Side] {
				t.Errorf("%q: failover onto a side just killed: %v", line, acts)
			}
		}
	}
}

// TestScripts runs testdata/*.txt: lines starting with "> " are events, the lines after them the
// expected output (actions, then the pair's state). `go test -run TestScripts -update` rewrites
// the expected output.
func TestScripts(t *testing.T) {
	files, err := filepath.Glob("testdata/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts: %v", err)
	}
	for _, file := range files {
		if filepath.Base(file) == "transitions.txt" {
			continue
		}
		t.Run(filepath.Base(file), func(t *testing.T) {
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			var lines []string
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				lines = append(lines, sc.Text())
			}
			f.Close()
			p := NewPolicy(DefaultConfig)
			var out []string
			for i := 0; i < len(lines); i++ {
				l := lines[i]
				if !strings.HasPrefix(l, "> ") {
					continue
				}
				var want []string
				j := i + 1
				for ; j < len(lines) && !strings.HasPrefix(lines[j], "> ") && !strings.HasPrefix(lines[j], "#"); j++ {
					if strings.TrimSpace(lines[j]) != "" {
						want = append(want, lines[j])
					}
				}
				got := apply(t, p, strings.TrimPrefix(l, "> "))
				if !*update && strings.Join(got, "\n") != strings.Join(want, "\n") {
					t.Errorf("%s:%d %s\ngot:\n%s\nwant:\n%s", file, i+1, l, strings.Join(got, "\n"), strings.Join(want, "\n"))
				}
				out = append(out, l)
				out = append(out, got...)
				out = append(out, "")
				// Keep comments that follow the block.
				for j < len(lines) && strings.HasPrefix(lines[j], "#") {
					out = append(out, lines[j])
					j++
				}
				i = j - 1
			}
			if *update {
				// Keep the leading comments.
				var head []string
				for _, l := range lines {
					if strings.HasPrefix(l, "> ") {
						break
					}
					head = append(head, l)
				}
				all := append(head, out...)
				if err := os.WriteFile(file, []byte(strings.Join(all, "\n")), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// reach drives a fresh policy into each state along a path of events, with the primary on a.
var reach = map[State][]string{
	StateStopped:      {},
	StateStarting:     {"start"},
	StateProtecting:   {"start", "booted a"},
	StateProtected:    {"start", "booted a", "protected 1"},
	StateFailingOver:  {"start", "booted a", "protected 1", "signal a exited"},
	StateReprotecting: {"start", "booted a", "protected 1", "signal a exited", "failover-done b", "tick 5"},
	StateDegraded:     {"start", "booted a", "protected 1", "signal a exited", "failover-done b", "tick 5", "protect-failed 2 nbd refused"},
	StateFailed:       {"start", "boot-failed no kvm"},
}

var allEvents = []string{
	"start", "stop", "booted a", "booted b", "boot-failed x", "protected 1", "protected 2", "protect-failed 1 x", "protect-failed 2 x",
	"failover-done a", "failover-done b", "failover-failed a x", "failover-failed b x", "tick", "failover planned", "failover forced", "reprotect",
}

func init() {
	for _, side := range []string{"a", "b"} {
		for _, k := range []SignalKind{SigExited, SigQMPLost, SigQMPTimeout, SigColoExitError, SigMigrationFailed} {
			allEvents = append(allEvents, fmt.Sprintf("signal %s %s", side, k))
		}
	}
}

// TestEveryEventInEveryState feeds every event (every failure signal of either side included) to
// the pair in every state, checks the invariants, and compares the outcome with
// testdata/transitions.txt (rewritten with -update), so that every transition is reviewed.
func TestEveryEventInEveryState(t *testing.T) {
	states := []State{StateStopped, StateStarting, StateProtecting, StateProtected, StateFailingOver, StateReprotecting, StateDegraded, StateFailed}
	var out []string
	for _, st := range states {
		out = append(out, "## "+string(st))
		for _, ev := range allEvents {
			p := NewPolicy(DefaultConfig)
			for _, l := range reach[st] {
				apply(t, p, l)
			}
			if p.State() != st {
				t.Fatalf("path to %s ended in %s", st, p.State())
			}
			out = append(out, "> "+ev)
			out = append(out, apply(t, p, ev)...)
		}
		out = append(out, "")
	}
	got := strings.Join(out, "\n")
	const file = "testdata/transitions.txt"
	if *update {
		if err := os.WriteFile(file, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if string(want) != got {
		wl, gl := strings.Split(string(want), "\n"), strings.Split(got, "\n")
		for i := 0; i < len(wl) && i < len(gl); i++ {
			if wl[i] != gl[i] {
				t.Fatalf("%s differs at line %d:\n got: %s\nwant: %s\n(run with -update after reviewing)", file, i+1, gl[i], wl[i])
			}
		}
		t.Fatalf("%s differs in length: got %d lines, want %d", file, len(gl), len(wl))
	}
}

func TestRetryBackoff(t *testing.T) {
	p := NewPolicy(Config{AutoReprotect: true, RetryTicks: 2, MaxRetryTicks: 5})
	for _, l := range reach[StateDegraded] {
		apply(t, p, l)
	}
	// Degraded after a failed reprotection: 2 ticks, then a new attempt; failures double the
	// wait up to 5.
	var waits []int
	for attempt := 0; attempt < 4; attempt++ {
		n := 0
		for p.State() == StateDegraded {
			if _, err := p.Step(EvTick{}); err != nil {
				t.Fatal(err)
			}
			n++
			if n > 100 {
				t.Fatal("never retried")
			}
		}
		waits = append(waits, n)
		if _, err := p.Step(EvProtectFailed{Gen: p.Generation(), Err: "again"}); err != nil {
			t.Fatal(err)
		}
	}
	if fmt.Sprint(waits) != "[2 4 5 5]" {
		t.Fatalf("waits %v", waits)
	}
	// Success resets the backoff.
	for p.State() == StateDegraded {
		p.Step(EvTick{})
	}
	p.Step(EvProtected{Gen: p.Generation()})
	if p.State() != StateProtected || p.backoff != 2 {
		t.Fatalf("after success: %s backoff %d", p.State(), p.backoff)
	}
}

func TestNoAutoReprotect(t *testing.T) {
	p := NewPolicy(Config{AutoReprotect: false})
	for _, l := range []string{"start", "booted a", "protected 1", "signal b exited", "failover-done a", "tick 100"} {
		apply(t, p, l)
	}
	if p.State() != StateDegraded {
		t.Fatalf("state %s, want degraded and waiting for the operator", p.State())
	}
	acts, err := p.Step(EvReprotect{})
	if err != nil || len(acts) != 1 {
		t.Fatalf("operator reprotect: %v %v", acts, err)
	}
}

func TestRestore(t *testing.T) {
	p := Restore(DefaultConfig, SideB, true, 7)
	if p.State() != StateProtected || p.Primary() != SideB || p.Generation() != 7 {
		t.Fatalf("%s", snapshot(p))
	}
	acts, _ := p.Step(EvSignal{Side: SideB, Kind: SigExited})
	if len(acts) != 2 || describe(acts[1]) != "failover-as-secondary a yank=false" {
		t.Fatalf("%v", acts)
	}
}
