package colodiag

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sort"
	"time"
)

// TCP flags.
const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagPSH = 0x08
	flagACK = 0x10
)

// Segment is an IPv4 TCP segment of a captured frame.
type Segment struct {
	Time     time.Time
	Src, Dst netip.AddrPort
	Seq, Ack uint32
	Flags    uint8
	Payload  []byte
}

// ParseSegment reads an IPv4 TCP segment out of an Ethernet frame; ok is false for anything
// else.
func ParseSegment(eth []byte) (s Segment, ok bool) {
	if len(eth) < 14+20 || binary.BigEndian.Uint16(eth[12:14]) != 0x0800 {
		return s, false
	}
	ip := eth[14:]
	ihl := int(ip[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(ip[2:4]))
	if ip[0]>>4 != 4 || ihl < 20 || ip[9] != 6 || total < ihl+20 || total > len(ip) {
		return s, false
	}
	tcp := ip[ihl:total]
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return s, false
	}
	src, _ := netip.AddrFromSlice(ip[12:16])
	dst, _ := netip.AddrFromSlice(ip[16:20])
	s.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:2]))
	s.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:4]))
	s.Seq = binary.BigEndian.Uint32(tcp[4:8])
	s.Ack = binary.BigEndian.Uint32(tcp[8:12])
	s.Flags = tcp[13]
	s.Payload = tcp[off:]
	return s, true
}

// ChannelPacket is one packet sent over a COLO channel: QEMU's socket chardevs carry the net
// filters' framing, a 4-byte big-endian length and then the frame, or with vnet_hdr_support
// (a virtio-net guest on a tap) the length, a 4-byte length of the virtio-net header and the
// header followed by the frame. Frame is the Ethernet frame without the header.
type ChannelPacket struct {
	// Time is when the capture saw the last byte of the packet: when it reached the reading
	// QEMU's socket.
	Time  time.Time
	Frame []byte
}

// ChannelPackets reassembles the TCP streams among frames whose ports match (for example, the
// data from the compare-in server port, or to the compare port) and cuts them into channel
// packets, in the order of their arrival. A channel that reconnected gives one stream per
// connection, each framed from its start.
func ChannelPackets(frames []Frame, match func(src, dst uint16) bool, vnet bool) ([]ChannelPacket, error) {
	hdr := 4
	if vnet {
		hdr = 8
	}
	type conn struct {
		start   time.Time
		next    uint32
		synced  bool
		pending map[uint32]Segment
		buf     []byte
		out     []ChannelPacket
	}
	conns := map[[2]netip.AddrPort]*conn{}
	var order []*conn
	cut := func(c *conn, t time.Time) error {
		for len(c.buf) >= hdr {
			n := int(binary.BigEndian.Uint32(c.buf[:4]))
			v := 0
			if vnet {
				v = int(binary.BigEndian.Uint32(c.buf[4:8]))
			}
			if n > 1<<20 || v > n {
				return fmt.Errorf("channel packet of %d bytes (vnet header %d): not a COLO channel, or the capture missed its start", n, v)
			}
			if len(c.buf) < hdr+n {
				break
			}
			c.out = append(c.out, ChannelPacket{Time: t, Frame: append([]byte(nil), c.buf[hdr+v:hdr+n]...)})
			c.buf = c.buf[hdr+n:]
		}
		return nil
	}
	for _, f := range frames {
		s, ok := ParseSegment(f.Data)
		if !ok || !match(s.Src.Port(), s.Dst.Port()) {
			continue
		}
		s.Time = f.Time
		key := [2]netip.AddrPort{s.Src, s.Dst}
		c := conns[key]
		if s.Flags&flagSYN != 0 {
			// A new connection on the same ports (a reconnected chardev) starts afresh.
			c = &conn{start: f.Time, next: s.Seq + 1, synced: true, pending: map[uint32]Segment{}}
			conns[key] = c
			order = append(order, c)
			continue
		}
		if c == nil {
			// The capture began after the connection did: its framing cannot be known.
			continue
		}
		if len(s.Payload) == 0 {
			continue
		}
		c.pending[s.Seq] = s
		for {
			progressed := false
			for seq, p := range c.pending {
				d := int32(c.next - seq)
				if d < 0 {
					continue // a gap before it
				}
				delete(c.pending, seq)
				if int(d) < len(p.Payload) {
					c.buf = append(c.buf, p.Payload[d:]...)
					c.next += uint32(len(p.Payload) - int(d))
					if err := cut(c, p.Time); err != nil {
						return nil, err
					}
				}
				progressed = true
			}
			if !progressed {
				break
			}
		}
	}
	var all []ChannelPacket
	for _, c := range order {
		all = append(all, c.out...)
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	return all, nil
}
