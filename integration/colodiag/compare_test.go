package colodiag

import (
	"encoding/binary"

	"github.com/lockstepvm/lockstep/checkpoint"
	"net/netip"
	"testing"
	"time"
)

// frame builds an Ethernet/IPv4/TCP frame from the guest 10.0.0.15:7777 to 10.0.0.100:40000,
// padded to 60 bytes as the guest's e1000 driver pads it; opts adds the 12 bytes of TCP
// timestamps that a Linux peer negotiates.
func frame(seq, ack uint32, flags uint8, payload string, opts bool) []byte {
	tcpLen := 20
	if opts {
		tcpLen = 32
	}
	ipLen := 20 + tcpLen + len(payload)
	b := make([]byte, 14+ipLen)
	binary.BigEndian.PutUint16(b[12:], 0x0800)
	ip := b[14:]
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(ipLen))
	ip[8], ip[9] = 64, protoTCP
	copy(ip[12:], []byte{10, 0, 0, 15})
	copy(ip[16:], []byte{10, 0, 0, 100})
	tcp := ip[20:]
	binary.BigEndian.PutUint16(tcp[0:], 7777)
	binary.BigEndian.PutUint16(tcp[2:], 40000)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	binary.BigEndian.PutUint32(tcp[8:], ack)
	tcp[12] = byte(tcpLen/4) << 4
	tcp[13] = flags
	copy(tcp[tcpLen:], payload)
	for len(b) < 60 {
		b = append(b, 0)
	}
	return b
}

var t0 = time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)

func at(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }

func TestNewPktPadding(t *testing.T) {
	p := NewPkt(t0, frame(100, 5, flagACK, "", false), true)
	if len(p.Frame) != 60 || p.PayloadSize != 6 || p.TrueLen != 0 || !p.Padded() || !p.PureACK() {
		t.Fatalf("padded pure ACK: size %d payload %d true %d padded %v", len(p.Frame), p.PayloadSize, p.TrueLen, p.Padded())
	}
	if p.SeqEnd != 106 {
		t.Errorf("colo-compare's seq_end %d, want 106 (the padding counted)", p.SeqEnd)
	}
	q := NewPkt(t0, frame(100, 5, flagACK, "", true), true)
	if q.Padded() || q.PayloadSize != 0 || q.SeqEnd != 100 {
		t.Errorf("pure ACK with timestamps: padded %v payload %d seq_end %d", q.Padded(), q.PayloadSize, q.SeqEnd)
	}
	r := NewPkt(t0, frame(100, 5, flagACK|flagPSH, "A 42\n", false), true)
	if r.TrueLen != 5 || r.PayloadSize != 6 || r.Key.SrcPort != 7777 || r.Key.DstPort != 40000 {
		t.Errorf("short reply: true %d payload %d key %+v", r.TrueLen, r.PayloadSize, r.Key)
	}
	arp := make([]byte, 60)
	binary.BigEndian.PutUint16(arp[12:], 0x0806)
	if NewPkt(t0, arp, true).IPv4 {
		t.Error("an ARP frame parsed as IPv4")
	}
}

func TestModel(t *testing.T) {
	tests := []struct {
		name string
		// steps: 'p' primary frame, 's' secondary frame, 'f' flush
		steps []struct {
			kind  byte
			frame []byte
		}
		mismatch bool
		cause    Cause
	}{
		{
			name:  "same reply on both sides matches",
			steps: steps('p', frame(100, 5, flagACK|flagPSH, "A 123\n", false), 's', frame(100, 5, flagACK|flagPSH, "A 123\n", false)),
		},
		{
			name: "an unpadded pure ACK only the secondary sent is ignored",
			steps: steps('s', frame(100, 5, flagACK, "", true), 'p', frame(100, 9, flagACK|flagPSH, "A 123\n", true),
				's', frame(100, 9, flagACK|flagPSH, "A 123\n", true)),
		},
		{
			name: "a padded pure ACK only the secondary sent mismatches the primary's reply",
			steps: steps('s', frame(100, 5, flagACK, "", false), 'p', frame(100, 9, flagACK|flagPSH, "A 123\n", false),
				's', frame(100, 9, flagACK|flagPSH, "A 123\n", false)),
			mismatch: true, cause: CausePaddedACK,
		},
		{
			name:     "a padded RST of the secondary",
			steps:    steps('p', frame(100, 9, flagACK|flagPSH, "P\n", true), 's', frame(1, 0, flagRST, "", false)),
			mismatch: true, cause: CausePaddedRST,
		},
		{
			name:     "different payload",
			steps:    steps('p', frame(100, 9, flagACK|flagPSH, "A 123\n", true), 's', frame(100, 9, flagACK|flagPSH, "A 124\n", true)),
			mismatch: true, cause: CausePayload,
		},
		{
			name: "a stale secondary reply after the flush of its twin",
			steps: steps('p', frame(100, 9, flagACK|flagPSH, "A 123\n", true), 'f', nil,
				's', frame(100, 9, flagACK|flagPSH, "A 123\n", true),
				'p', frame(106, 14, flagACK|flagPSH, "A 124\n", true)),
			mismatch: true, cause: CauseStale,
		},
		{
			name: "a stale secondary reply already compared is dropped",
			steps: steps('p', frame(100, 9, flagACK|flagPSH, "A 123\n", true), 's', frame(100, 9, flagACK|flagPSH, "A 123\n", true),
				'f', nil, 's', frame(100, 9, flagACK|flagPSH, "A 123\n", true),
				'p', frame(106, 14, flagACK|flagPSH, "A 124\n", true), 's', frame(106, 14, flagACK|flagPSH, "A 124\n", true)),
		},
		{
			name: "the primary splits what the secondary sends at once",
			steps: steps('p', frame(100, 9, flagACK|flagPSH, "S 1 2 ", true), 'p', frame(106, 9, flagACK|flagPSH, "abc\n", true),
				's', frame(100, 9, flagACK|flagPSH, "S 1 2 abc\n", true)),
		},
		{
			name: "the secondary acknowledges less than the primary",
			steps: steps('s', frame(100, 9, flagACK|flagPSH, "S 1 2 abc\n", true),
				'p', frame(100, 15, flagACK|flagPSH, "S 1 2 ", true)),
			mismatch: true, cause: CauseAckAhead,
		},
		{
			name: "the secondary sent data the primary did not",
			steps: steps('s', frame(90, 9, flagACK|flagPSH, "0123456789", true),
				'p', frame(100, 9, flagACK|flagPSH, "A 123\n", true)),
			mismatch: true, cause: CauseSecondaryExtra,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := NewModel()
			for i, st := range tc.steps {
				switch st.kind {
				case 'f':
					m.Flush(at(i))
				default:
					m.Add(NewPkt(at(i), st.frame, st.kind == 'p'))
				}
			}
			if got := len(m.Mismatches) > 0; got != tc.mismatch {
				for _, mm := range m.Mismatches {
					t.Log(mm.Describe())
				}
				t.Fatalf("mismatch %v, want %v", got, tc.mismatch)
			}
			if tc.mismatch {
				if c := Classify(m.Mismatches[0]); c != tc.cause {
					t.Errorf("cause %q, want %q (%s)", c, tc.cause, m.Mismatches[0].Describe())
				}
			} else if p, _ := m.Held(); p != 0 {
				t.Errorf("%d primary packets still held", p)
			}
		})
	}
}

func steps(a ...any) []struct {
	kind  byte
	frame []byte
} {
	var out []struct {
		kind  byte
		frame []byte
	}
	for i := 0; i < len(a); i += 2 {
		k := byte(a[i].(rune))
		var f []byte
		if a[i+1] != nil {
			f = a[i+1].([]byte)
		}
		out = append(out, struct {
			kind  byte
			frame []byte
		}{k, f})
	}
	return out
}

func TestChannelPackets(t *testing.T) {
	// A COLO channel from 127.0.0.1:5000 to :6000 carrying two packets, the second split over
	// two segments, the first segment sent twice.
	src := netip.MustParseAddrPort("127.0.0.1:5000")
	dst := netip.MustParseAddrPort("127.0.0.1:6000")
	pkt1, pkt2 := []byte("first frame"), []byte("second frame, longer")
	var stream []byte
	for _, p := range [][]byte{pkt1, pkt2} {
		stream = binary.BigEndian.AppendUint32(stream, uint32(len(p)))
		stream = append(stream, p...)
	}
	seg := func(seq uint32, flags uint8, data []byte) Frame {
		f := frame(0, 0, flags, string(data), false)
		ip := f[14:]
		copy(ip[12:16], src.Addr().AsSlice())
		copy(ip[16:20], dst.Addr().AsSlice())
		binary.BigEndian.PutUint16(ip[20:], src.Port())
		binary.BigEndian.PutUint16(ip[22:], dst.Port())
		binary.BigEndian.PutUint32(ip[24:], seq)
		return Frame{Time: at(int(seq)), Data: f}
	}
	frames := []Frame{
		seg(1000, flagSYN, nil),
		seg(1001, flagACK, stream[:20]),
		seg(1001, flagACK, stream[:20]),
		seg(1021, flagACK, stream[20:]),
	}
	got, err := ChannelPackets(frames, func(s, d uint16) bool { return s == 5000 }, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || string(got[0].Frame) != string(pkt1) || string(got[1].Frame) != string(pkt2) {
		t.Fatalf("packets %q", got)
	}
	if !got[0].Time.Equal(at(1001)) || !got[1].Time.Equal(at(1021)) {
		t.Errorf("times %v %v: want when each packet's last byte came", got[0].Time, got[1].Time)
	}
}

func TestPauses(t *testing.T) {
	lines := []string{
		"2026-12-02T13:05:21.033148Z colo_send_message Send 'checkpoint-request' message",
		"2026-12-02T13:05:21.033659Z colo_receive_message Receive 'checkpoint-reply' message",
		"2026-12-02T13:05:21.033988Z colo_vm_state_change Change 'run' => 'stop'",
		"2026-12-02T13:05:21.034002Z colo_send_message Send 'vmstate-send' message",
		"2026-12-02T13:05:21.038285Z colo_send_message Send 'vmstate-size' message",
		"2026-12-02T13:05:21.041061Z colo_receive_message Receive 'vmstate-received' message",
		"2026-12-02T13:05:21.044120Z colo_receive_message Receive 'vmstate-loaded' message",
		"2026-12-02T13:05:21.044224Z colo_vm_state_change Change 'stop' => 'run'",
		// A checkpoint the trace caught halfway is left out.
		"2026-12-02T13:05:21.238735Z colo_receive_message Receive 'vmstate-received' message",
		"2026-12-02T13:05:21.243371Z colo_vm_state_change Change 'stop' => 'run'",
	}
	var evs []checkpoint.TraceEvent
	for _, l := range lines {
		ev, ok := checkpoint.ParseTraceLine(l)
		if !ok {
			t.Fatalf("unparsed %q", l)
		}
		evs = append(evs, ev)
	}
	ps := Pauses(evs, time.Time{}, time.Time{})
	if len(ps) != 1 {
		t.Fatalf("%d checkpoints, want 1", len(ps))
	}
	p := ps[0]
	us := func(n int) time.Duration { return time.Duration(n) * time.Microsecond }
	if p.SecondaryStop != us(511) || p.Stop != us(329) || p.RAMAndDevices != us(4283) || p.SecondaryLoad != us(3059) ||
		p.Resume != us(104) || p.Pause != us(10236) {
		t.Errorf("parts %+v", p)
	}
}
