package colodiag

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// PauseParts splits one checkpoint by the COLO frame's messages and state changes as QEMU 11.1
// traces them on the primary (migration/colo.c, colo_do_checkpoint_transaction):
//
//	checkpoint-request sent ─ reply received ─ run=>stop ─ vmstate-send sent ─ vmstate-size sent ─
//	vmstate-received ─ vmstate-loaded ─ stop=>run
//
// The guest is stopped from run=>stop to stop=>run (the pause).
type PauseParts struct {
	Start time.Time
	// SecondaryStop: request to reply, the secondary stopping its guest and answering.
	SecondaryStop time.Duration
	// Stop: reply to run=>stop, the primary stopping its guest.
	Stop time.Duration
	// DiskCheckpoint: run=>stop to vmstate-send, the primary's replication checkpoint.
	DiskCheckpoint time.Duration
	// RAMAndDevices: vmstate-send to vmstate-size, saving the device state into a buffer and
	// streaming the dirty RAM.
	RAMAndDevices time.Duration
	// DeviceTransfer: vmstate-size to vmstate-received, the device state buffer on the wire.
	DeviceTransfer time.Duration
	// SecondaryLoad: vmstate-received to vmstate-loaded, the secondary flushing its RAM cache,
	// loading the devices, checkpointing its disk and starting its guest.
	SecondaryLoad time.Duration
	// Resume: vmstate-loaded to stop=>run.
	Resume time.Duration
	// Pause is run=>stop to stop=>run.
	Pause time.Duration
}

// Pauses returns the parts of every complete checkpoint of a primary trace with timestamps,
// between from and to (zero: all).
func Pauses(trace []checkpoint.TraceEvent, from, to time.Time) []PauseParts {
	var out []PauseParts
	var t [8]time.Time
	step := -1
	for _, ev := range trace {
		if ev.Time.IsZero() {
			continue
		}
		next := -1
		switch {
		case ev.Name == checkpoint.TraceSendMessage && ev.Message == "checkpoint-request":
			step, t = 0, [8]time.Time{ev.Time}
			continue
		case ev.Name == checkpoint.TraceReceiveMessage && ev.Message == "checkpoint-reply":
			next = 1
		case ev.Name == checkpoint.TraceVMStateChange && ev.Message == "run=>stop":
			next = 2
		case ev.Name == checkpoint.TraceSendMessage && ev.Message == "vmstate-send":
			next = 3
		case ev.Name == checkpoint.TraceSendMessage && ev.Message == "vmstate-size":
			next = 4
		case ev.Name == checkpoint.TraceReceiveMessage && ev.Message == "vmstate-received":
			next = 5
		case ev.Name == checkpoint.TraceReceiveMessage && ev.Message == "vmstate-loaded":
			next = 6
		case ev.Name == checkpoint.TraceVMStateChange && ev.Message == "stop=>run":
			next = 7
		default:
			continue
		}
		if step < 0 || next != step+1 {
			step = -1 // out of order: a trace that started mid-checkpoint
			continue
		}
		step, t[next] = next, ev.Time
		if next == 7 {
			if (from.IsZero() || !t[0].Before(from)) && (to.IsZero() || !t[0].After(to)) {
				out = append(out, PauseParts{Start: t[0], SecondaryStop: t[1].Sub(t[0]), Stop: t[2].Sub(t[1]),
					DiskCheckpoint: t[3].Sub(t[2]), RAMAndDevices: t[4].Sub(t[3]), DeviceTransfer: t[5].Sub(t[4]),
					SecondaryLoad: t[6].Sub(t[5]), Resume: t[7].Sub(t[6]), Pause: t[7].Sub(t[2])})
			}
			step = -1
		}
	}
	return out
}

// PauseTable prints the p50 and p99 of each part, one column per set of checkpoints.
func PauseTable(names []string, sets [][]PauseParts) string {
	parts := []struct {
		name string
		get  func(PauseParts) time.Duration
	}{
		{"secondary stops (request -> reply)", func(p PauseParts) time.Duration { return p.SecondaryStop }},
		{"primary stops (reply -> stopped)", func(p PauseParts) time.Duration { return p.Stop }},
		{"primary disk checkpoint", func(p PauseParts) time.Duration { return p.DiskCheckpoint }},
		{"device state saved + dirty RAM sent", func(p PauseParts) time.Duration { return p.RAMAndDevices }},
		{"device state sent", func(p PauseParts) time.Duration { return p.DeviceTransfer }},
		{"secondary loads (RAM cache, devices, disk)", func(p PauseParts) time.Duration { return p.SecondaryLoad }},
		{"primary resumes", func(p PauseParts) time.Duration { return p.Resume }},
		{"pause (stopped -> running)", func(p PauseParts) time.Duration { return p.Pause }},
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%-44s", "part of a checkpoint, p50/p99")
	for _, n := range names {
		fmt.Fprintf(&b, " %22s", n)
	}
	b.WriteString("\n")
	for _, pt := range parts {
		fmt.Fprintf(&b, "%-44s", pt.name)
		for _, set := range sets {
			ds := make([]time.Duration, len(set))
			for i, p := range set {
				ds[i] = pt.get(p)
			}
			fmt.Fprintf(&b, " %22s", p50p99(ds))
		}
		b.WriteString("\n")
	}
	fmt.Fprintf(&b, "%-44s", "checkpoints")
	for _, set := range sets {
		fmt.Fprintf(&b, " %22d", len(set))
	}
	b.WriteString("\n")
	return b.String()
}

func p50p99(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(float64(len(s))*q))] }
	r := func(d time.Duration) string { return d.Round(10 * time.Microsecond).String() }
	return r(at(0.5)) + "/" + r(at(0.99))
}
