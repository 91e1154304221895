package colodiag

import (
	"bytes"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// Cause is why one checkpoint happened.
type Cause string

// Causes, most specific first.
const (
	CauseTimer = Cause("timer (x-checkpoint-delay)")
	// A TCP segment without data shorter than 60 bytes (no TCP options: a peer without TCP
	// timestamps) is padded by the guest's NIC driver; colo-compare takes the padding for 6
	// bytes of payload, so a pure ACK that only one side sent overlaps the other's data.
	CausePaddedACK = Cause("pure ACK padded to 60 bytes, padding compared as data")
	// The same for a RST (Linux sends its resets without options, so they are always padded)
	// and for a SYN-ACK (whose sequence number the secondary's filter-rewriter leaves as the
	// secondary chose it).
	CausePaddedRST = Cause("RST padded to 60 bytes, padding compared as data")
	CausePaddedSYN = Cause("SYN-ACK padded to 60 bytes, padding compared as data")
	// A data segment of fewer than 6 bytes, padded the same way: its padding counts too.
	CausePaddedData = Cause("short segment padded to 60 bytes, padding compared as data")
	// A secondary packet for data the primary already released at a flush: it came after the
	// checkpoint that flushed its twin and heads the secondary's queue.
	CauseStale        = Cause("stale secondary packet after a flush")
	CausePayload      = Cause("payload differs")
	CauseSegmentation = Cause("segmentation differs")
	// The data matched, but the primary's segment acknowledges input the secondary has not.
	CauseAckAhead       = Cause("primary ACKs input the secondary has not yet")
	CauseSecondaryExtra = Cause("secondary sent data the primary did not")
	CausePrimaryExtra   = Cause("primary sent data the secondary did not")
	// A primary packet waited compare_timeout for its secondary twin (colo_old_packet_check).
	CauseTimeout = Cause("compare_timeout: the secondary never produced the packet")
	CauseNonTCP  = Cause("non-TCP packet differs (UDP, ICMP, other)")
	// Early by the clock, yet the replay found no mismatch (a delay change, or a comparison
	// the replay saw differently from QEMU).
	CauseUnexplained = Cause("early, no mismatch found")
)

// Classify says why colo-compare found the pair of m different.
func Classify(m Mismatch) Cause {
	p, s := m.P, m.S
	if p == nil || s == nil || p.Proto != protoTCP || s.Proto != protoTCP {
		return CauseNonTCP
	}
	if p.Padded() || s.Padded() {
		for _, x := range []*Pkt{s, p} {
			if x.Padded() && x.TrueLen == 0 {
				switch {
				case x.Flags&flagRST != 0:
					return CausePaddedRST
				case x.Flags&flagSYN != 0:
					return CausePaddedSYN
				}
			}
		}
		if p.TrueLen == 0 || s.TrueLen == 0 {
			return CausePaddedACK
		}
		return CausePaddedData
	}
	sEnd := s.Seq + uint32(s.TrueLen)
	pEnd := p.Seq + uint32(p.TrueLen)
	if m.Flushed && !after(sEnd, m.FlushedEnd) && s.Time.After(m.FlushedAt) {
		return CauseStale
	}
	if p.Seq == s.Seq && p.TrueLen == s.TrueLen {
		return CausePayload
	}
	if !after(sEnd, p.Seq) {
		return CauseSecondaryExtra
	}
	if !after(pEnd, s.Seq) {
		return CausePrimaryExtra
	}
	// The ranges overlap: is the data the same where they do?
	lo, hi := p.Seq, pEnd
	if after(s.Seq, lo) {
		lo = s.Seq
	}
	if after(hi, sEnd) {
		hi = sEnd
	}
	n := int(hi - lo)
	pd := p.Frame[p.HeaderSize+int(lo-p.Seq):][:n]
	sd := s.Frame[s.HeaderSize+int(lo-s.Seq):][:n]
	if !bytes.Equal(pd, sd) {
		return CausePayload
	}
	if !after(p.SeqEnd, s.SeqEnd) && after(p.Ack, m.MinAck) {
		return CauseAckAhead
	}
	return CauseSegmentation
}

// Checkpoint is one checkpoint of the primary's trace.
type Checkpoint struct {
	// Request is when the COLO thread sent checkpoint-request; Received when the secondary
	// said it had the state (colo-compare flushes then); Resumed when the primary ran again.
	Request, Received, Resumed time.Time
	// Since is the time since the previous checkpoint's request (0 for the first).
	Since time.Duration
	Cause Cause
	// Mismatch is the first mismatch since the previous flush, if any.
	Mismatch *Mismatch
	// TraceMismatch is set when QEMU's own trace shows a TCP comparison without a match
	// (colo_compare_ip_info not followed by colo_compare_tcp_info) in the same window, and
	// TraceTimeout when it shows colo_old_packet_check_found.
	TraceMismatch, TraceTimeout bool
}

// Input is what Analyze needs.
type Input struct {
	// Trace is the primary's trace (with timestamps: -msg timestamp=on) of colo_compare_*,
	// colo_old_packet_check_found, colo_send_message and colo_receive_message.
	Trace []checkpoint.TraceEvent
	// Primary and Secondary are the frames that reached colo-compare from each side
	// (ChannelPackets of the primary_in and secondary_in channels).
	Primary, Secondary []ChannelPacket
	// Mirror, when given, is the primary's mirror channel: the guest's input as the secondary
	// receives it. It tells, for a reply the secondary never matched, when the request that it
	// answers reached the secondary.
	Mirror []ChannelPacket
	// Delay is x-checkpoint-delay; a checkpoint sooner than EarlyFraction of it after the
	// previous one is early.
	Delay time.Duration
	// From and To bound the checkpoints to report (zero: all).
	From, To time.Time
}

// Report is the outcome of Analyze.
type Report struct {
	Checkpoints []Checkpoint
	// Early counts the checkpoints that came sooner than the delay.
	Early int
	// ByCause counts the checkpoints of each cause.
	ByCause map[Cause]int
	// Frames counts what reached colo-compare, by side and kind.
	PrimaryFrames, SecondaryFrames   int
	PrimaryPadded, SecondaryPadded   int
	PrimaryPureACK, SecondaryPureACK int
	Unsupported, OtherIP             int
	// TraceAgrees counts the checkpoints the replay attributed to a TCP mismatch for which
	// QEMU's trace shows one too, of ReplayTCP; TraceOnly counts trace mismatches the replay
	// missed.
	TraceAgrees, ReplayTCP, TraceOnly int
	// StaleArrivals and StaleHarmless are the Model's, over the window.
	StaleArrivals, StaleHarmless int
	// HeldMatch and HeldFlush are how long the primary's TCP data packets waited in
	// colo-compare, released by a match or by a checkpoint's flush; of the flushed ones,
	// FlushTwinHeld had the secondary's twin in the queue (unmatched), FlushTwinLate got it
	// after the flush (LateBy later), FlushTwinNever never did.
	HeldMatch, HeldFlush                         []time.Duration
	FlushTwinHeld, FlushTwinLate, FlushTwinNever int
	LateBy                                       []time.Duration
	// For the flushed replies whose twin never came (Input.Mirror given): where the input
	// they acknowledge reached the secondary: while it was stopped for a checkpoint (between
	// the primary's checkpoint-request and the secondary's vmstate-loaded), while it ran, or
	// not at all.
	NeverInputStopped, NeverInputRunning, NeverInputMissing int
	// NeverExamples describe a few of them.
	NeverExamples []string
}

func (r *Report) count(p *Pkt) {
	frames, padded, acks := &r.SecondaryFrames, &r.SecondaryPadded, &r.SecondaryPureACK
	if p.Primary {
		frames, padded, acks = &r.PrimaryFrames, &r.PrimaryPadded, &r.PrimaryPureACK
	}
	*frames++
	if p.Padded() {
		*padded++
	}
	if p.PureACK() {
		*acks++
	}
}

type timelineItem struct {
	t    time.Time
	kind int // 0 trace, 1 primary, 2 secondary
	ev   checkpoint.TraceEvent
	pkt  *Pkt
}

// Analyze replays colo-compare over the captured frames, flushing where the trace shows a
// checkpoint's flush, and attributes every checkpoint of the trace to a cause.
func Analyze(in Input) Report {
	var items []timelineItem
	for _, ev := range in.Trace {
		items = append(items, timelineItem{t: ev.Time, kind: 0, ev: ev})
	}
	rep := Report{ByCause: map[Cause]int{}}
	for _, cp := range in.Primary {
		p := NewPkt(cp.Time, cp.Frame, true)
		items = append(items, timelineItem{t: cp.Time, kind: 1, pkt: p})
	}
	for _, cp := range in.Secondary {
		p := NewPkt(cp.Time, cp.Frame, false)
		items = append(items, timelineItem{t: cp.Time, kind: 2, pkt: p})
	}
	sort.SliceStable(items, func(i, j int) bool { return items[i].t.Before(items[j].t) })

	m := NewModel()
	var cps []Checkpoint
	var cur Checkpoint // the window since the last flush
	var lastRequest time.Time
	var firstMismatch *Mismatch
	var finder checkpoint.TCPMismatchFinder
	traceMismatch, traceTimeout := false, false
	var timeoutPkt *Pkt
	for _, it := range items {
		switch it.kind {
		case 1, 2:
			p := it.pkt
			inWindow := (in.From.IsZero() || !p.Time.Before(in.From)) && (in.To.IsZero() || !p.Time.After(in.To))
			// Frames outside the window are replayed all the same (the queues before the
			// window shape it), but not counted.
			if inWindow {
				rep.count(p)
			}
			n := len(m.Mismatches)
			u, o, sa, sh := m.Unsupported, m.OtherIP, m.StaleArrivals, m.StaleHarmless
			m.Add(p)
			if inWindow {
				rep.Unsupported += m.Unsupported - u
				rep.OtherIP += m.OtherIP - o
				rep.StaleArrivals += m.StaleArrivals - sa
				rep.StaleHarmless += m.StaleHarmless - sh
			}
			if firstMismatch == nil && len(m.Mismatches) > n {
				mm := m.Mismatches[n]
				firstMismatch = &mm
			}
			continue
		}
		ev := it.ev
		if len(finder.Feed(ev)) > 0 {
			traceMismatch = true
		}
		switch ev.Name {
		case checkpoint.TraceOldPacket:
			traceTimeout = true
			if timeoutPkt == nil {
				timeoutPkt, _ = m.Oldest()
			}
		case checkpoint.TraceSendMessage:
			if ev.Message != "checkpoint-request" {
				continue
			}
			cur.Request = ev.Time
			if !lastRequest.IsZero() {
				cur.Since = ev.Time.Sub(lastRequest)
			}
			lastRequest = ev.Time
			cur.Mismatch = firstMismatch
			cur.TraceMismatch, cur.TraceTimeout = traceMismatch, traceTimeout
			early := cur.Since > 0 && cur.Since < time.Duration(float64(in.Delay)*checkpoint.EarlyFraction)
			switch {
			case firstMismatch != nil:
				cur.Cause = Classify(*firstMismatch)
			case traceTimeout:
				cur.Cause = CauseTimeout
			case early:
				cur.Cause = CauseUnexplained
			default:
				cur.Cause = CauseTimer
			}
			cps = append(cps, cur)
		case checkpoint.TraceReceiveMessage:
			switch ev.Message {
			case "vmstate-received":
				// QEMU resets the checkpoint request here and colo-compare flushes: what
				// mismatched before now belongs to the checkpoint under way.
				m.Flush(ev.Time)
				if len(cps) > 0 {
					cps[len(cps)-1].Received = ev.Time
				}
				cur = Checkpoint{}
				firstMismatch = nil
				traceMismatch, traceTimeout, timeoutPkt = false, false, nil
			}
		case checkpoint.TraceVMStateChange:
			if ev.Message == "stop=>run" && len(cps) > 0 {
				cps[len(cps)-1].Resumed = ev.Time
			}
		}
	}
	// The mirrored input, by connection (as the guest sees it: client to guest) and end
	// sequence number.
	type inputKey struct {
		k   ConnKey
		end uint32
	}
	mirrored := map[inputKey]time.Time{}
	for _, cp := range in.Mirror {
		p := NewPkt(cp.Time, cp.Frame, false)
		if !p.IPv4 || p.Proto != protoTCP || p.TrueLen == 0 {
			continue
		}
		k := ConnKey{Src: p.Key.Dst, Dst: p.Key.Src, SrcPort: p.Key.DstPort, DstPort: p.Key.SrcPort, Proto: protoTCP}
		ik := inputKey{k, p.Seq + uint32(p.TrueLen)}
		if _, ok := mirrored[ik]; !ok {
			mirrored[ik] = cp.Time
		}
	}
	// stopped reports whether the secondary was stopped for a checkpoint at t: from the
	// request (it stops on receiving it) to vmstate-loaded (it has resumed by then).
	var stops [][2]time.Time
	var replies []time.Time // checkpoint-reply received: the primary stops right after
	var reqAt time.Time
	for _, ev := range in.Trace {
		switch {
		case ev.Name == checkpoint.TraceSendMessage && ev.Message == "checkpoint-request":
			reqAt = ev.Time
		case ev.Name == checkpoint.TraceReceiveMessage && ev.Message == "checkpoint-reply" && !reqAt.IsZero():
			replies = append(replies, ev.Time)
		case ev.Name == checkpoint.TraceReceiveMessage && ev.Message == "vmstate-loaded" && !reqAt.IsZero():
			stops = append(stops, [2]time.Time{reqAt, ev.Time})
			reqAt = time.Time{}
		}
	}
	window := func(t time.Time) string {
		i := sort.Search(len(stops), func(i int) bool { return !stops[i][1].Before(t) })
		if i >= len(stops) {
			return ""
		}
		r := ""
		if i < len(replies) {
			r = fmt.Sprintf(", primary stopped at +%v", replies[i].Sub(stops[i][0]).Round(10*time.Microsecond))
		}
		return fmt.Sprintf(" (checkpoint request at %s%s, secondary resumed by +%v)", stops[i][0].Format("15:04:05.000000"), r,
			stops[i][1].Sub(stops[i][0]).Round(10*time.Microsecond))
	}
	stopped := func(t time.Time) bool {
		i := sort.Search(len(stops), func(i int) bool { return !stops[i][1].Before(t) })
		return i < len(stops) && !t.Before(stops[i][0])
	}
	inWin := func(t time.Time) bool {
		return (in.From.IsZero() || !t.Before(in.From)) && (in.To.IsZero() || !t.After(in.To))
	}
	for _, h := range m.Holds {
		if !inWin(h.P.Time) {
			continue
		}
		if !h.ByFlush {
			rep.HeldMatch = append(rep.HeldMatch, h.Held())
			continue
		}
		rep.HeldFlush = append(rep.HeldFlush, h.Held())
		switch {
		case h.TwinHeld:
			rep.FlushTwinHeld++
		case !h.TwinLate.IsZero():
			rep.FlushTwinLate++
			rep.LateBy = append(rep.LateBy, h.TwinLate.Sub(h.Released))
		default:
			rep.FlushTwinNever++
			if in.Mirror == nil {
				break
			}
			at, ok := mirrored[inputKey{h.P.Key, h.P.Ack}]
			where := "never mirrored"
			switch {
			case !ok:
				rep.NeverInputMissing++
			case stopped(at):
				rep.NeverInputStopped++
				where = "mirrored while the secondary was stopped"
			default:
				rep.NeverInputRunning++
				where = "mirrored while the secondary ran"
			}
			if len(rep.NeverExamples) < 4 {
				rep.NeverExamples = append(rep.NeverExamples, fmt.Sprintf("reply seq %d+%d at %s held %v: the input it acknowledges (to %d) %s at %s%s",
					h.P.Seq, h.P.TrueLen, h.P.Time.Format("15:04:05.000000"), h.Held().Round(time.Millisecond), h.P.Ack, where, at.Format("15:04:05.000000"), window(at)))
			}
		}
	}
	for _, c := range cps {
		if (!in.From.IsZero() && c.Request.Before(in.From)) || (!in.To.IsZero() && c.Request.After(in.To)) {
			continue
		}
		rep.Checkpoints = append(rep.Checkpoints, c)
		if c.Since > 0 && c.Since < time.Duration(float64(in.Delay)*checkpoint.EarlyFraction) {
			rep.Early++
		}
		rep.ByCause[c.Cause]++
		replayTCP := c.Mismatch != nil && c.Cause != CauseNonTCP
		if replayTCP {
			rep.ReplayTCP++
			if c.TraceMismatch {
				rep.TraceAgrees++
			}
		} else if c.TraceMismatch {
			rep.TraceOnly++
		}
	}
	return rep
}

// AllCauses lists the causes in the order tables show them.
var AllCauses = []Cause{CauseTimer, CausePaddedACK, CausePaddedRST, CausePaddedSYN, CausePaddedData, CauseStale, CausePayload, CauseSegmentation,
	CauseAckAhead, CauseSecondaryExtra, CausePrimaryExtra, CauseTimeout, CauseNonTCP, CauseUnexplained}

// Describe prints one mismatch for a log.
func (m Mismatch) Describe() string {
	f := func(p *Pkt) string {
		if p == nil {
			return "none"
		}
		if p.Proto != protoTCP {
			return fmt.Sprintf("proto %d, %d bytes", p.Proto, len(p.Frame))
		}
		return fmt.Sprintf("seq %d+%d (frame %d B, colo-compare counts %d) ack %d flags %#x %q",
			p.Seq, p.TrueLen, len(p.Frame), p.PayloadSize, p.Ack, p.Flags, truncate(p.Frame[p.HeaderSize:], 32))
	}
	src := netip.AddrPortFrom(netip.AddrFrom4(m.Key.Src), m.Key.SrcPort)
	dst := netip.AddrPortFrom(netip.AddrFrom4(m.Key.Dst), m.Key.DstPort)
	return fmt.Sprintf("%s %v->%v compare_seq %d: primary %s | secondary %s", m.Time.Format("15:04:05.000000"), src, dst, m.CompareSeq, f(m.P), f(m.S))
}

func p50max(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	r := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	return r(s[len(s)/2]) + "/" + r(s[len(s)-1])
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}

// Table prints reports side by side: one row per cause, one column per report.
func Table(names []string, reps []Report) string {
	var b strings.Builder
	w := 58
	fmt.Fprintf(&b, "%-*s", w, "cause of the checkpoint")
	for _, n := range names {
		fmt.Fprintf(&b, " %16s", n)
	}
	b.WriteString("\n")
	row := func(label string, val func(Report) string) {
		fmt.Fprintf(&b, "%-*s", w, label)
		for _, r := range reps {
			fmt.Fprintf(&b, " %16s", val(r))
		}
		b.WriteString("\n")
	}
	for _, c := range AllCauses {
		c := c
		any := false
		for _, r := range reps {
			any = any || r.ByCause[c] > 0
		}
		if !any {
			continue
		}
		row(string(c), func(r Report) string { return fmt.Sprint(r.ByCause[c]) })
	}
	row("checkpoints", func(r Report) string { return fmt.Sprint(len(r.Checkpoints)) })
	row("early (sooner than 0.9 x delay)", func(r Report) string {
		if len(r.Checkpoints) == 0 {
			return "-"
		}
		return fmt.Sprintf("%d (%.0f%%)", r.Early, 100*float64(r.Early)/float64(len(r.Checkpoints)))
	})
	row("replayed TCP mismatches QEMU's trace confirms", func(r Report) string { return fmt.Sprintf("%d/%d", r.TraceAgrees, r.ReplayTCP) })
	row("trace mismatches the replay missed", func(r Report) string { return fmt.Sprint(r.TraceOnly) })
	row("frames to colo-compare: primary / secondary", func(r Report) string { return fmt.Sprintf("%d/%d", r.PrimaryFrames, r.SecondaryFrames) })
	row("  of them padded (< 60 bytes)", func(r Report) string { return fmt.Sprintf("%d/%d", r.PrimaryPadded, r.SecondaryPadded) })
	row("  of them pure ACKs", func(r Report) string { return fmt.Sprintf("%d/%d", r.PrimaryPureACK, r.SecondaryPureACK) })
	row("secondary data after the flush of its twin: all / dropped", func(r Report) string {
		return fmt.Sprintf("%d/%d", r.StaleArrivals, r.StaleHarmless)
	})
	row("primary data released on a match: n, held p50/max", func(r Report) string {
		return fmt.Sprintf("%d %s", len(r.HeldMatch), p50max(r.HeldMatch))
	})
	row("primary data released by a flush: n, held p50/max", func(r Report) string {
		return fmt.Sprintf("%d %s", len(r.HeldFlush), p50max(r.HeldFlush))
	})
	row("  secondary twin: unmatched in queue / late / never", func(r Report) string {
		return fmt.Sprintf("%d/%d/%d", r.FlushTwinHeld, r.FlushTwinLate, r.FlushTwinNever)
	})
	row("  late twins: after the flush p50/max", func(r Report) string { return p50max(r.LateBy) })
	row("  never: input mirrored with the secondary stopped/running/not", func(r Report) string {
		return fmt.Sprintf("%d/%d/%d", r.NeverInputStopped, r.NeverInputRunning, r.NeverInputMissing)
	})
	row("  not IPv4 (passed uncompared) / IPv4 not TCP", func(r Report) string { return fmt.Sprintf("%d/%d", r.Unsupported, r.OtherIP) })
	return b.String()
}
