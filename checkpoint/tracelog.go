package checkpoint

import (
	"strconv"
	"strings"
	"time"
)

// TraceEvent is one line of QEMU's "log" trace backend (Debian's QEMU is built with it) for the
// COLO events lockstep reads: colo-compare's, the filter-rewriter's and the COLO frame's
// (net/trace-events and migration/trace-events of QEMU 11.1). Fields that the event does not
// carry are zero.
type TraceEvent struct {
	// Time is the line's timestamp (QEMU started with "-msg timestamp=on"); zero without one.
	Time time.Time
	// Name is the trace event, e.g. "colo_compare_ip_info".
	Name string
	// Args is the text after the name, as QEMU formatted it.
	Args string

	// colo_compare_ip_info: the sizes of the primary's and the secondary's frame.
	PrimarySize, SecondarySize int
	// colo_compare_tcp_info: which side ("pri" or "sec") and the TCP fields colo-compare used.
	Side                                 string
	Seq, Ack                             uint32
	HeaderLen, PayloadLen, Offset, Flags int
	// colo_compare_main, colo_compare_drop_packet, colo_*_miscompare: the message; the COLO
	// frame's colo_send_message and colo_receive_message: the message name
	// ("checkpoint-request", "vmstate-received", ...); colo_vm_state_change: "old=>new".
	Message string
	// colo_compare_udp_miscompare, colo_compare_icmp_miscompare: the size they print.
	Size int
}

// Trace event names.
const (
	TraceCompareIPInfo     = "colo_compare_ip_info"
	TraceCompareTCPInfo    = "colo_compare_tcp_info"
	TraceCompareMain       = "colo_compare_main"
	TraceCompareDrop       = "colo_compare_drop_packet"
	TraceCompareUDP        = "colo_compare_udp_miscompare"
	TraceCompareICMP       = "colo_compare_icmp_miscompare"
	TraceOldPacket         = "colo_old_packet_check_found"
	TraceRewriterPacket    = "colo_filter_rewriter_pkt_info"
	TraceRewriterOffset    = "colo_filter_rewriter_conn_offset"
	TraceVMStateChange     = "colo_vm_state_change"
	TraceSendMessage       = "colo_send_message"
	TraceReceiveMessage    = "colo_receive_message"
	traceTimestampLayout   = "2006-01-02T15:04:05.999999Z"
	traceTimestampLenShort = len("2006-01-02T15:04:05Z")
)

// ParseTraceLine parses one line of QEMU's log trace backend. It accepts the three forms QEMU
// writes: "NAME ARGS" (no timestamps), "2026-12-02T13:05:21.033148Z NAME ARGS" (-msg
// timestamp=on on QEMU 8 and newer) and "PID@SECONDS.MICROS:NAME ARGS" (older QEMUs). ok is
// false for a line that is none of these (a QEMU error message, a blank line).
func ParseTraceLine(line string) (ev TraceEvent, ok bool) {
	line = strings.TrimRight(line, "\r\n")
	if len(line) > traceTimestampLenShort && line[4] == '-' && line[10] == 'T' {
		sp := strings.IndexByte(line, ' ')
		if sp < 0 {
			return ev, false
		}
		t, err := time.Parse(traceTimestampLayout, line[:sp])
		if err != nil {
			return ev, false
		}
		ev.Time, line = t, line[sp+1:]
	} else if at := strings.IndexByte(line, '@'); at > 0 && isDigits(line[:at]) {
		colon := strings.IndexByte(line, ':')
		if colon < at {
			return ev, false
		}
		sec, frac, _ := strings.Cut(line[at+1:colon], ".")
		s, err1 := strconv.ParseInt(sec, 10, 64)
		us, err2 := strconv.ParseInt(frac, 10, 64)
		if err1 != nil || err2 != nil {
			return ev, false
		}
		ev.Time, line = time.Unix(s, us*1000).UTC(), line[colon+1:]
	}
	name, args, _ := strings.Cut(line, " ")
	if !strings.HasPrefix(name, "colo_") {
		return ev, false
	}
	ev.Name, ev.Args = name, args
	switch name {
	case TraceCompareIPInfo:
		// "ppkt size = 60, ip_src = ..., ip_dst = ..., spkt size = 60, ip_src = ..., ip_dst = ..."
		ev.PrimarySize = intAfter(args, "ppkt size = ")
		ev.SecondarySize = intAfter(args, "spkt size = ")
	case TraceCompareTCPInfo:
		// "pri: seq/ack= 3060074100/2709764 hdlen= 54 pdlen= 6 offset= 0 flags=24"
		side, rest, _ := strings.Cut(args, ":")
		ev.Side = side
		if sa := fieldAfter(rest, "seq/ack= "); sa != "" {
			s, a, _ := strings.Cut(sa, "/")
			ev.Seq, ev.Ack = uint32(atou(s)), uint32(atou(a))
		}
		ev.HeaderLen = intAfter(rest, "hdlen= ")
		ev.PayloadLen = intAfter(rest, "pdlen= ")
		ev.Offset = intAfter(rest, "offset= ")
		ev.Flags = intAfter(rest, "flags=")
	case TraceCompareMain, TraceCompareDrop:
		ev.Message = strings.TrimSpace(strings.TrimPrefix(args, ":"))
	case TraceCompareUDP, TraceCompareICMP:
		// ": primary pkt size = 60"
		msg := strings.TrimSpace(strings.TrimPrefix(args, ":"))
		if m, n, ok := strings.Cut(msg, " = "); ok {
			ev.Message, ev.Size = m, int(atou(n))
		} else {
			ev.Message = msg
		}
	case TraceSendMessage, TraceReceiveMessage:
		// "Send 'checkpoint-request' message"
		if _, q, ok := strings.Cut(args, "'"); ok {
			ev.Message, _, _ = strings.Cut(q, "'")
		}
	case TraceVMStateChange:
		// "Change 'run' => 'stop'"
		parts := strings.Split(args, "'")
		if len(parts) >= 4 {
			ev.Message = parts[1] + "=>" + parts[3]
		}
	}
	return ev, true
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// fieldAfter returns the word that follows key in s.
func fieldAfter(s, key string) string {
	i := strings.Index(s, key)
	if i < 0 {
		return ""
	}
	s = s[i+len(key):]
	if j := strings.IndexAny(s, " ,"); j >= 0 {
		s = s[:j]
	}
	return s
}

func intAfter(s, key string) int { return int(atou(fieldAfter(s, key))) }

func atou(s string) uint64 {
	n, _ := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	return n
}

// TCPMismatchFinder reads colo-compare's per-packet trace events (TraceDetailed) and finds the
// TCP comparisons that did not match, which QEMU traces with no event of their own: every
// comparison prints one colo_compare_ip_info line, or two when its first try failed and it
// compared the unaligned part, and colo_compare_tcp_info pri and sec lines only when it matched
// (with a non-zero offset after a partial match); any other colo-compare line after an
// unexplained colo_compare_ip_info means that comparison failed.
type TCPMismatchFinder struct {
	pending []TraceEvent // ip_info lines not yet explained
	pri     *TraceEvent
}

// Mismatch is a failed TCP comparison: the sizes of the two frames colo-compare compared.
type Mismatch struct {
	Time                       time.Time
	PrimarySize, SecondarySize int
}

// Feed takes the next event and returns the comparisons it shows failed.
func (f *TCPMismatchFinder) Feed(ev TraceEvent) []Mismatch {
	switch ev.Name {
	case TraceCompareIPInfo:
		var out []Mismatch
		if n := len(f.pending); n > 0 {
			last := f.pending[n-1]
			if n == 2 || last.PrimarySize != ev.PrimarySize || last.SecondarySize != ev.SecondarySize {
				out = f.Flush()
			}
		}
		f.pending = append(f.pending, ev)
		return out
	case TraceCompareTCPInfo:
		if ev.Side == "pri" {
			e := ev
			f.pri = &e
			return nil
		}
		used := 1
		if f.pri != nil && (f.pri.Offset != 0 || ev.Offset != 0) {
			used = 2
		}
		f.pri = nil
		var out []Mismatch
		if n := len(f.pending); n > used {
			for _, p := range f.pending[:n-used] {
				out = append(out, Mismatch{Time: p.Time, PrimarySize: p.PrimarySize, SecondarySize: p.SecondarySize})
			}
			out = out[len(out)-1:] // one comparison
		}
		f.pending = f.pending[:0]
		return out
	case TraceSendMessage, TraceReceiveMessage, TraceVMStateChange:
		// The COLO thread's lines interleave with colo-compare's without ending a comparison,
		// except the checkpoint request, which closes the window.
		if ev.Message == "checkpoint-request" {
			return f.Flush()
		}
		return nil
	}
	if strings.HasPrefix(ev.Name, "colo_compare_") || ev.Name == TraceOldPacket {
		return f.Flush()
	}
	return nil
}

// Flush reports the comparison still pending as failed (the trace window ended after it).
func (f *TCPMismatchFinder) Flush() []Mismatch {
	f.pri = nil
	if len(f.pending) == 0 {
		return nil
	}
	p := f.pending[len(f.pending)-1]
	f.pending = f.pending[:0]
	return []Mismatch{{Time: p.Time, PrimarySize: p.PrimarySize, SecondarySize: p.SecondarySize}}
}
