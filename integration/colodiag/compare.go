package colodiag

import (
	"bytes"
	"encoding/binary"
	"time"
)

// This file is a model of colo-compare as QEMU 11.1 has it (net/colo-compare.c and net/colo.c):
// the per-connection queues sorted by sequence number, colo_compare_tcp with its
// "compare_seq" and maximum-ACK bookkeeping, the UDP/ICMP/other comparison, and the flush at a
// checkpoint. It reproduces QEMU's decisions, including the ones this package exists to
// explain, such as a TCP payload size taken from the frame's length (Ethernet padding counted).

// Pkt is one frame as colo-compare holds it.
type Pkt struct {
	// Time is when the frame reached colo-compare's socket.
	Time  time.Time
	Frame []byte
	// Primary is set for the primary's frame.
	Primary bool
	// IPv4 is false for the frames colo-compare passes on unsupported (ARP, IPv6, VLAN).
	IPv4  bool
	Proto uint8
	Key   ConnKey
	// TCP, as fill_pkt_tcp_info computes them: PayloadSize is the frame's size minus the headers,
	// so it counts Ethernet padding.
	Seq, Ack, SeqEnd        uint32
	HeaderSize, PayloadSize int
	Flags                   uint8
	Offset                  int
	// TrueLen is the TCP payload by the IP header's total length: PayloadSize without padding.
	TrueLen int
}

// Padded reports whether the frame is longer than its IP packet (Ethernet padding to 60 bytes).
func (p *Pkt) Padded() bool { return p.IPv4 && p.Proto == protoTCP && p.PayloadSize != p.TrueLen }

// PureACK reports whether the TCP segment carries no data.
func (p *Pkt) PureACK() bool {
	return p.IPv4 && p.Proto == protoTCP && p.TrueLen == 0 && p.Flags&(flagSYN|flagFIN|flagRST) == 0
}

// ConnKey is colo-compare's connection key: the 5-tuple as the guest sent it.
type ConnKey struct {
	Src, Dst         [4]byte
	SrcPort, DstPort uint16
	Proto            uint8
}

const (
	protoICMP = 1
	protoTCP  = 6
	protoUDP  = 17
)

// NewPkt parses a frame as colo-compare's parse_packet_early and fill_pkt_tcp_info do.
func NewPkt(t time.Time, frame []byte, primary bool) *Pkt {
	p := &Pkt{Time: t, Frame: frame, Primary: primary}
	if len(frame) < 14+20 || binary.BigEndian.Uint16(frame[12:14]) != 0x0800 {
		return p
	}
	ip := frame[14:]
	ihl := int(ip[0]&0x0f) * 4
	if ihl < 20 || len(frame) < 14+ihl {
		return p
	}
	p.IPv4 = true
	p.Proto = ip[9]
	copy(p.Key.Src[:], ip[12:16])
	copy(p.Key.Dst[:], ip[16:20])
	p.Key.Proto = p.Proto
	l4 := ip[ihl:]
	switch p.Proto {
	case protoTCP, protoUDP:
		if len(l4) >= 4 {
			p.Key.SrcPort = binary.BigEndian.Uint16(l4[0:2])
			p.Key.DstPort = binary.BigEndian.Uint16(l4[2:4])
		}
	}
	if p.Proto == protoTCP && len(l4) >= 20 {
		p.Seq = binary.BigEndian.Uint32(l4[4:8])
		p.Ack = binary.BigEndian.Uint32(l4[8:12])
		p.Flags = l4[13]
		p.HeaderSize = 14 + ihl + int(l4[12]>>4)*4
		p.PayloadSize = len(frame) - p.HeaderSize
		if p.PayloadSize < 0 {
			p.PayloadSize = 0
		}
		p.SeqEnd = p.Seq + uint32(p.PayloadSize)
		total := int(binary.BigEndian.Uint16(ip[2:4]))
		p.TrueLen = total - (p.HeaderSize - 14)
		if p.TrueLen < 0 {
			p.TrueLen = 0
		}
	}
	return p
}

func after(a, b uint32) bool { return int32(a-b) > 0 }

type conn struct {
	key        ConnKey
	p, s       []*Pkt // index 0 is the GQueue's head; colo-compare pops from the tail
	pack, sack uint32
	compareSeq uint32
	// flushedEnd is the highest SeqEnd of the primary's packets released by a flush, and
	// flushedAt that flush's time: what a later secondary packet may be a stale twin of.
	flushedEnd uint32
	flushed    bool
	flushedAt  time.Time
	// flushedHolds are the flushed data packets whose secondary twin has not come yet.
	flushedHolds []*Hold
}

// Mismatch is a comparison colo-compare found different (it then asks for a checkpoint).
type Mismatch struct {
	Time time.Time
	Key  ConnKey
	// P and S are the heads compared (S nil for a primary packet without any secondary
	// packet, as in a UDP comparison against an empty list).
	P, S *Pkt
	// CompareSeq is the connection's compare_seq; FlushedEnd and Flushed describe the
	// primary's data released by the last flush of the connection, at FlushedAt.
	CompareSeq uint32
	FlushedEnd uint32
	Flushed    bool
	FlushedAt  time.Time
	// MinAck is the ACK bound colo-compare applied.
	MinAck uint32
}

// Model replays colo-compare.
type Model struct {
	conns map[ConnKey]*conn
	order []*conn
	// Mismatches are the comparisons found different, in order.
	Mismatches []Mismatch
	// Released counts the primary packets released by a match, by a flush, and unsupported.
	ReleasedMatch, ReleasedFlush, ReleasedUnsupported int
	// Compared counts the primary TCP packets with payload that were compared.
	Compared int
	// NonTCP counts the frames that were not TCP: unsupported (not IPv4) and other IPv4.
	Unsupported, OtherIP int
	// StaleArrivals counts the secondary's TCP data packets that arrived after a flush for
	// data the primary had already released by that flush (the twins of flushed packets, still
	// on their way when the flush came); StaleHarmless those of them that colo-compare drops as
	// already compared (at or below compare_seq), the rest head the secondary's queue.
	StaleArrivals, StaleHarmless int
	// Holds are the primary's TCP data packets released, with how long colo-compare held each.
	Holds []*Hold
}

// Hold is how one primary TCP data packet left colo-compare.
type Hold struct {
	P *Pkt
	// Released is when: at its match, or at a checkpoint's flush (ByFlush).
	Released time.Time
	ByFlush  bool
	// For a flushed packet: TwinHeld is set when the secondary's packet of the same data was
	// in the queue at the flush yet did not match; TwinLate is when the secondary's packet came
	// after the flush (zero: never, within the capture).
	TwinHeld bool
	TwinLate time.Time
}

// Held is how long colo-compare held the packet.
func (h *Hold) Held() time.Duration { return h.Released.Sub(h.P.Time) }

func (m *Model) release(c *conn, p *Pkt, t time.Time, byFlush bool) {
	if byFlush {
		m.ReleasedFlush++
	} else {
		m.ReleasedMatch++
	}
	if p.Proto != protoTCP || p.TrueLen == 0 {
		return
	}
	h := &Hold{P: p, Released: t, ByFlush: byFlush}
	if byFlush {
		for _, s := range c.s {
			if s.Seq == p.Seq && s.TrueLen == p.TrueLen {
				h.TwinHeld = true
			}
		}
		c.flushedHolds = append(c.flushedHolds, h)
	}
	m.Holds = append(m.Holds, h)
}

// NewModel returns an empty colo-compare.
func NewModel() *Model { return &Model{conns: map[ConnKey]*conn{}} }

func (m *Model) conn(k ConnKey) *conn {
	c := m.conns[k]
	if c == nil {
		c = &conn{key: k}
		m.conns[k] = c
		m.order = append(m.order, c)
	}
	return c
}

// insertSorted is colo_insert_packet's g_queue_insert_sorted with seq_sorter: from the head,
// skip the packets with a higher sequence number and insert before the first with one lower or
// equal, so that the tail holds the lowest (and, among equals, the oldest).
func insertSorted(q []*Pkt, p *Pkt) []*Pkt {
	i := 0
	for i < len(q) && int32(p.Seq-q[i].Seq) < 0 {
		i++
	}
	q = append(q, nil)
	copy(q[i+1:], q[i:])
	q[i] = p
	return q
}

func popTail(q *[]*Pkt) *Pkt {
	s := *q
	p := s[len(s)-1]
	*q = s[:len(s)-1]
	return p
}

func pushTail(q *[]*Pkt, p *Pkt) { *q = append(*q, p) }

// Add feeds one frame that reached colo-compare from the primary or the secondary.
func (m *Model) Add(p *Pkt) {
	if !p.IPv4 {
		m.Unsupported++
		if p.Primary {
			m.ReleasedUnsupported++
		}
		return
	}
	if p.Proto != protoTCP {
		m.OtherIP++
	}
	c := m.conn(p.Key)
	if p.Proto == protoTCP {
		// fill_pkt_tcp_info: "max_ack" becomes the ACK of the newest packet whenever it
		// differs, since the unsigned difference is always positive.
		if p.Primary {
			c.pack = p.Ack
			c.p = insertSorted(c.p, p)
		} else {
			for i, h := range c.flushedHolds {
				if h.P.Seq == p.Seq && h.P.TrueLen == p.TrueLen && !h.TwinHeld {
					h.TwinLate = p.Time
					c.flushedHolds = append(c.flushedHolds[:i], c.flushedHolds[i+1:]...)
					break
				}
			}
			if len(c.flushedHolds) > 64 {
				c.flushedHolds = c.flushedHolds[len(c.flushedHolds)-64:]
			}
			if p.TrueLen > 0 && c.flushed && p.Time.After(c.flushedAt) && !after(p.Seq+uint32(p.TrueLen), c.flushedEnd) {
				m.StaleArrivals++
				if c.compareSeq != 0 && !after(p.SeqEnd, c.compareSeq) {
					m.StaleHarmless++
				}
			}
			c.sack = p.Ack
			c.s = insertSorted(c.s, p)
		}
		m.compareTCP(c, p.Time)
		return
	}
	if p.Primary {
		pushTail(&c.p, p)
	} else {
		pushTail(&c.s, p)
	}
	m.comparePacket(c, p.Time)
}

func (m *Model) mismatch(c *conn, t time.Time, p, s *Pkt, minAck uint32) {
	m.Mismatches = append(m.Mismatches, Mismatch{Time: t, Key: c.key, P: p, S: s, CompareSeq: c.compareSeq,
		FlushedEnd: c.flushedEnd, Flushed: c.flushed, FlushedAt: c.flushedAt, MinAck: minAck})
}

const (
	freePrimary   = 1
	freeSecondary = 2
)

func (m *Model) compareTCP(c *conn, now time.Time) {
	minAck := min(c.pack, c.sack)
	var ppkt, spkt *Pkt
pri:
	if len(c.p) == 0 {
		return
	}
	ppkt = popTail(&c.p)
sec:
	if len(c.s) == 0 {
		pushTail(&c.p, ppkt)
		return
	}
	spkt = popTail(&c.s)
	if ppkt.Seq == ppkt.SeqEnd {
		m.release(c, ppkt, now, false) // released without comparison, as a packet without payload
		ppkt = nil
	}
	if ppkt != nil && c.compareSeq != 0 && !after(ppkt.SeqEnd, c.compareSeq) {
		m.release(c, ppkt, now, false) // "pri: this packet has compared"
		ppkt = nil
	}
	if spkt.Seq == spkt.SeqEnd {
		if ppkt == nil {
			goto pri
		}
		goto sec
	}
	if c.compareSeq != 0 && !after(spkt.SeqEnd, c.compareSeq) {
		if ppkt == nil { // "sec: this packet has compared"
			goto pri
		}
		goto sec
	}
	if ppkt == nil {
		pushTail(&c.s, spkt)
		goto pri
	}
	m.Compared++
	if mark, ok := markTCP(ppkt, spkt, minAck); ok {
		switch mark {
		case freePrimary:
			c.compareSeq = ppkt.SeqEnd
			m.release(c, ppkt, now, false)
			pushTail(&c.s, spkt)
			goto pri
		case freeSecondary:
			c.compareSeq = spkt.SeqEnd
			goto sec
		default:
			c.compareSeq = ppkt.SeqEnd
			m.release(c, ppkt, now, false)
			goto pri
		}
	}
	pushTail(&c.p, ppkt)
	pushTail(&c.s, spkt)
	m.mismatch(c, now, ppkt, spkt, minAck)
}

// payloadEqual is colo_compare_packet_payload's memcmp; bytes past a frame's end never match
// (QEMU would read past its buffer there).
func payloadEqual(p, s *Pkt, poff, soff, n int) bool {
	if n < 0 || poff+n > len(p.Frame) || soff+n > len(s.Frame) {
		return false
	}
	return bytes.Equal(p.Frame[poff:poff+n], s.Frame[soff:soff+n])
}

// markTCP is colo_mark_tcp_pkt.
func markTCP(p, s *Pkt, maxAck uint32) (int, bool) {
	if p.Seq == s.Seq && p.SeqEnd == s.SeqEnd {
		if payloadEqual(p, s, p.HeaderSize, s.HeaderSize, p.PayloadSize) {
			return freePrimary | freeSecondary, true
		}
	}
	if !after(p.SeqEnd, s.SeqEnd) {
		if payloadEqual(p, s, p.HeaderSize+p.Offset, s.HeaderSize+s.Offset, p.PayloadSize-p.Offset) {
			if !after(p.Ack, maxAck) {
				s.Offset += p.PayloadSize - p.Offset
				return freePrimary, true
			}
			return 0, false
		}
	} else if payloadEqual(p, s, p.HeaderSize+p.Offset, s.HeaderSize+s.Offset, s.PayloadSize-s.Offset) {
		p.Offset += s.PayloadSize - s.Offset
		return freeSecondary, true
	}
	return 0, false
}

// comparePacket is colo_compare_packet for UDP, ICMP and other IP protocols.
func (m *Model) comparePacket(c *conn, now time.Time) {
	for len(c.p) > 0 && len(c.s) > 0 {
		p := popTail(&c.p)
		found := -1
		for i, s := range c.s {
			if samePacket(p, s) {
				found = i
				break
			}
		}
		if found >= 0 {
			m.release(c, p, now, false)
			c.s = append(c.s[:found], c.s[found+1:]...)
			continue
		}
		pushTail(&c.p, p)
		m.mismatch(c, now, p, c.s[0], 0)
		return
	}
}

func samePacket(p, s *Pkt) bool {
	if len(p.Frame) != len(s.Frame) {
		return false
	}
	off := 0
	if p.Proto == protoUDP || p.Proto == protoICMP {
		off = 14 + int(p.Frame[14]&0x0f)*4
	}
	return bytes.Equal(p.Frame[off:], s.Frame[off:])
}

// Flush is colo_flush_packets at a checkpoint: every held primary packet goes out, every
// secondary packet is dropped. compare_seq and the ACK bounds stay.
func (m *Model) Flush(t time.Time) {
	for _, c := range m.order {
		for len(c.p) > 0 {
			p := popTail(&c.p)
			m.release(c, p, t, true)
			if p.Proto == protoTCP && (!c.flushed || after(p.SeqEnd, c.flushedEnd)) {
				c.flushedEnd, c.flushed, c.flushedAt = p.SeqEnd, true, t
			}
		}
		c.s = c.s[:0]
	}
}

// Oldest returns the oldest primary packet still held and how many secondary packets its
// connection holds, for a compare_timeout: the packet the secondary never produced in time.
func (m *Model) Oldest() (*Pkt, int) {
	var old *Pkt
	n := 0
	for _, c := range m.order {
		for _, p := range c.p {
			if old == nil || p.Time.Before(old.Time) {
				old, n = p, len(c.s)
			}
		}
	}
	return old, n
}

// Held returns how many packets colo-compare holds for the primary and the secondary.
func (m *Model) Held() (primary, secondary int) {
	for _, c := range m.order {
		primary += len(c.p)
		secondary += len(c.s)
	}
	return
}
