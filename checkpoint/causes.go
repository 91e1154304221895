package checkpoint

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/lockstepvm/lockstep/qmp"
)

// Reason is why a checkpoint happened.
type Reason string

// Reasons of checkpoints: the label values of lockstep_checkpoints_total{reason=...}.
const (
	// ReasonTimer: x-checkpoint-delay elapsed.
	ReasonTimer Reason = "timer"
	// ReasonTCP: colo-compare found a TCP packet of the primary that differs from the
	// secondary's (seen with TraceDetailed only).
	ReasonTCP Reason = "tcp_mismatch"
	// ReasonUDP and ReasonICMP: a UDP or ICMP packet's payload differed.
	ReasonUDP  Reason = "udp_mismatch"
	ReasonICMP Reason = "icmp_mismatch"
	// ReasonOther: a packet of another IP protocol, or a UDP or ICMP packet of another size,
	// differed (TraceDetailed only).
	ReasonOther Reason = "other_mismatch"
	// ReasonTimeout: a packet of the primary waited compare_timeout without the secondary
	// producing its twin.
	ReasonTimeout Reason = "compare_timeout"
	// ReasonMismatch: early, and the cause trace (TraceBasic) names no other cause: a TCP
	// packet differed (or a UDP/ICMP one in size), which TraceBasic cannot tell apart.
	ReasonMismatch Reason = "mismatch"
	// ReasonRequest: the agent asked for it (NoteRequest; a change of the checkpoint delay
	// makes QEMU checkpoint at once).
	ReasonRequest Reason = "request"
	// ReasonUnknown: early, without a cause trace, or with a detailed one that shows nothing.
	ReasonUnknown Reason = "unknown"
)

// Reasons lists every Reason, for metrics that export each label value from the start.
var Reasons = []Reason{ReasonTimer, ReasonTCP, ReasonUDP, ReasonICMP, ReasonOther, ReasonTimeout, ReasonMismatch, ReasonRequest, ReasonUnknown}

// TraceLevel chooses the trace events of a CauseTrace.
type TraceLevel int

const (
	// TraceBasic turns on the events that fire only when a checkpoint's cause is something
	// else than a TCP mismatch (compare_timeout, UDP and ICMP payload mismatches, queue
	// overflows) and the six messages of the COLO frame that delimit every checkpoint. It costs
	// nothing per packet: cheap enough to leave on in production.
	TraceBasic TraceLevel = iota
	// TraceDetailed adds colo-compare's per-packet events (colo_compare_ip_info,
	// colo_compare_tcp_info, colo_compare_main): one to four lines per compared packet, which
	// tell TCP mismatches apart and give the sizes of the packets that differed. For
	// diagnosis: each line is a write(2) in colo-compare's thread.
	TraceDetailed
)

func (l TraceLevel) events() []string {
	ev := []string{TraceOldPacket, TraceCompareUDP, TraceCompareICMP, TraceCompareDrop, TraceSendMessage, TraceReceiveMessage}
	if l == TraceDetailed {
		ev = append(ev, TraceCompareIPInfo, TraceCompareTCPInfo, TraceCompareMain)
	}
	return ev
}

// CauseTrace is a primary QEMU's trace of why it checkpoints: its colo-compare and COLO frame
// trace events, which QEMU's log trace backend writes to a file that CauseTrace reads back. An
// Observer given one (SetCauseTrace) reads the new lines at every checkpoint and attributes
// the checkpoint to a Reason. Reading costs one read(2) per checkpoint; the part of the file
// already read is given back to the file system (a hole is punched), so the file holds only
// unread lines whatever the run's length.
//
// It needs a QEMU built with the "log" trace backend (Debian's is): QMP trace-event-set-state
// turns the events on at run time and HMP logfile points the backend at the file, so a QEMU
// this agent adopted can be traced too.
type CauseTrace struct {
	path    string
	level   TraceLevel
	f       *os.File
	off     int64 // bytes read
	punched int64 // bytes given back
	partial []byte
}

// CauseTraceFile is the cause trace's file name in a side's run folder (QEMU can reach it).
const CauseTraceFile = "colo-trace.log"

// punchEvery is how much read data accumulates before it is given back.
const punchEvery = 1 << 20

// StartCauseTrace points q's log trace backend at path (QEMU creates or truncates the file;
// put it in the side's run folder, which QEMU can reach) and turns on the events of level. On
// error, the events it turned on are turned off again.
func StartCauseTrace(ctx context.Context, q *qmp.Client, path string, level TraceLevel) (*CauseTrace, error) {
	if _, err := q.HumanMonitorCommand(ctx, "logfile "+path); err != nil {
		return nil, fmt.Errorf("cause trace: logfile: %w", err)
	}
	t, err := OpenCauseTrace(path, level)
	if err != nil {
		return nil, err
	}
	for _, ev := range level.events() {
		if err := setTraceEvent(ctx, q, ev, true); err != nil {
			_ = t.Stop(context.WithoutCancel(ctx), q)
			return nil, fmt.Errorf("cause trace: %w", err)
		}
	}
	return t, nil
}

// OpenCauseTrace reads a trace file that a QEMU writes already (StartCauseTrace pointed it
// there, maybe from an earlier agent, with the events of level on), from its start.
func OpenCauseTrace(path string, level TraceLevel) (*CauseTrace, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("cause trace: %w", err)
	}
	return &CauseTrace{path: path, level: level, f: f}, nil
}

func setTraceEvent(ctx context.Context, q *qmp.Client, name string, on bool) error {
	if err := q.Execute(ctx, "trace-event-set-state", map[string]any{"name": name, "enable": on}, nil); err != nil {
		return fmt.Errorf("trace-event-set-state %s: %w", name, err)
	}
	return nil
}

// Path is the trace file.
func (t *CauseTrace) Path() string { return t.path }

// Level is the trace's level.
func (t *CauseTrace) Level() TraceLevel { return t.level }

// Stop turns the events off (when q is not nil and still answers) and closes the file. QEMU
// keeps the file open until its next logfile command or its exit.
func (t *CauseTrace) Stop(ctx context.Context, q *qmp.Client) error {
	var errs []error
	if q != nil {
		for _, ev := range t.level.events() {
			if err := setTraceEvent(ctx, q, ev, false); err != nil {
				errs = append(errs, err)
				break
			}
		}
	}
	if t.f != nil {
		errs = append(errs, t.f.Close())
		t.f = nil
	}
	return errors.Join(errs...)
}

// Read returns the events QEMU wrote since the last Read (complete lines only).
func (t *CauseTrace) Read() ([]TraceEvent, error) {
	if t.f == nil {
		return nil, nil
	}
	var evs []TraceEvent
	buf := make([]byte, 64<<10)
	for {
		n, err := t.f.ReadAt(buf, t.off)
		if n > 0 {
			t.off += int64(n)
			data := buf[:n]
			// A punched hole, or the zeros QEMU's file offset leaves after a truncation,
			// reads as NUL bytes: never part of a line.
			if bytes.IndexByte(data, 0) >= 0 {
				data = bytes.ReplaceAll(data, []byte{0}, nil)
			}
			t.partial = append(t.partial, data...)
			for {
				i := bytes.IndexByte(t.partial, '\n')
				if i < 0 {
					break
				}
				if ev, ok := ParseTraceLine(string(t.partial[:i])); ok {
					evs = append(evs, ev)
				}
				t.partial = t.partial[i+1:]
			}
			if len(t.partial) > 64<<10 { // not a trace line: drop it
				t.partial = t.partial[:0]
			}
		}
		if err == io.EOF || n < len(buf) {
			break
		}
		if err != nil {
			return evs, err
		}
	}
	if t.off-t.punched >= punchEvery {
		// Keep the page that holds the start of an unread partial line.
		upTo := (t.off - int64(len(t.partial))) &^ 4095
		if upTo > t.punched {
			if err := unix.Fallocate(int(t.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, t.punched, upTo-t.punched); err == nil {
				t.punched = upTo
			}
		}
	}
	return evs, nil
}

// traceWindow accumulates what the trace says between two checkpoints.
type traceWindow struct {
	timeout, udp, icmp, other, tcp bool
	drops                          int
	tcpFinder                      TCPMismatchFinder
	lastPSize, lastSSize           int
}

func (w *traceWindow) reason() (Reason, string) {
	switch {
	case w.timeout:
		return ReasonTimeout, "a primary packet waited compare_timeout"
	case w.udp:
		return ReasonUDP, ""
	case w.icmp:
		return ReasonICMP, ""
	case w.tcp:
		return ReasonTCP, fmt.Sprintf("tcp: primary frame %d B, secondary frame %d B", w.lastPSize, w.lastSSize)
	case w.other:
		return ReasonOther, ""
	}
	return "", ""
}

func (w *traceWindow) tcpMismatches(ms []Mismatch) {
	for _, m := range ms {
		w.tcp = true
		w.lastPSize, w.lastSSize = m.PrimarySize, m.SecondarySize
	}
}

// feed adds one event; it reports whether the event was a checkpoint request, which closes
// the window.
func (w *traceWindow) feed(ev TraceEvent) (request, flushed bool) {
	w.tcpMismatches(w.tcpFinder.Feed(ev))
	switch ev.Name {
	case TraceOldPacket:
		w.timeout = true
	case TraceCompareUDP:
		w.udp = true
	case TraceCompareICMP:
		w.icmp = true
	case TraceCompareDrop:
		w.drops++
	case TraceCompareMain:
		if strings.Contains(ev.Message, "packet different") || strings.Contains(ev.Message, "payload size of packets are different") {
			w.other = true
		}
	case TraceSendMessage:
		if ev.Message == "checkpoint-request" {
			w.tcpMismatches(w.tcpFinder.Flush())
			return true, false
		}
	case TraceReceiveMessage:
		if ev.Message == "vmstate-received" {
			return false, true
		}
	}
	return false, false
}
