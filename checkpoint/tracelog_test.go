package checkpoint_test

import (
	"strconv"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

func TestParseTraceLine(t *testing.T) {
	ts := time.Date(2026, 12, 2, 13, 5, 21, 33148000, time.UTC)
	tests := []struct {
		line string
		want checkpoint.TraceEvent
		ok   bool
	}{
		{"2026-12-02T13:05:21.033148Z colo_send_message Send 'checkpoint-request' message",
			checkpoint.TraceEvent{Time: ts, Name: checkpoint.TraceSendMessage, Message: "checkpoint-request"}, true},
		{"colo_receive_message Receive 'vmstate-received' message",
			checkpoint.TraceEvent{Name: checkpoint.TraceReceiveMessage, Message: "vmstate-received"}, true},
		{"1234@1796216721.033148:colo_vm_state_change Change 'run' => 'stop'",
			checkpoint.TraceEvent{Time: ts, Name: checkpoint.TraceVMStateChange, Message: "run=>stop"}, true},
		{"2026-12-02T13:05:21.033148Z colo_compare_ip_info ppkt size = 81, ip_src = 10.0.2.15, ip_dst = 10.0.2.2, spkt size = 60, ip_src = 10.0.2.15, ip_dst = 10.0.2.2",
			checkpoint.TraceEvent{Time: ts, Name: checkpoint.TraceCompareIPInfo, PrimarySize: 81, SecondarySize: 60}, true},
		{"colo_compare_tcp_info pri: seq/ack= 3060074100/2709764 hdlen= 54 pdlen= 6 offset= 0 flags=24",
			checkpoint.TraceEvent{Name: checkpoint.TraceCompareTCPInfo, Side: "pri", Seq: 3060074100, Ack: 2709764, HeaderLen: 54, PayloadLen: 6, Flags: 24}, true},
		{"colo_compare_main : packet same and release packet",
			checkpoint.TraceEvent{Name: checkpoint.TraceCompareMain, Message: "packet same and release packet"}, true},
		{"colo_compare_udp_miscompare : primary pkt size = 98",
			checkpoint.TraceEvent{Name: checkpoint.TraceCompareUDP, Message: "primary pkt size", Size: 98}, true},
		{"colo_old_packet_check_found 1796216721033",
			checkpoint.TraceEvent{Name: checkpoint.TraceOldPacket}, true},
		{"qemu-system-x86_64: -netdev bridge: bridge helper failed", checkpoint.TraceEvent{}, false},
		{"", checkpoint.TraceEvent{}, false},
		{"2026-12-02T13:05:21.033148Z qmp_enter_query_status {}", checkpoint.TraceEvent{}, false},
	}
	for _, tc := range tests {
		got, ok := checkpoint.ParseTraceLine(tc.line)
		if ok != tc.ok {
			t.Errorf("%q: ok %v, want %v", tc.line, ok, tc.ok)
			continue
		}
		if !ok {
			continue
		}
		got.Args = ""
		if !got.Time.Equal(tc.want.Time) {
			t.Errorf("%q: time %v, want %v", tc.line, got.Time, tc.want.Time)
		}
		got.Time, tc.want.Time = time.Time{}, time.Time{}
		if got != tc.want {
			t.Errorf("%q:\n got %+v\nwant %+v", tc.line, got, tc.want)
		}
	}
}

func TestTCPMismatchFinder(t *testing.T) {
	ip := func(p, s int) string {
		return "colo_compare_ip_info ppkt size = " + itoa(p) + ", ip_src = 10.0.2.15, ip_dst = 10.0.2.2, spkt size = " + itoa(s) + ", ip_src = 10.0.2.15, ip_dst = 10.0.2.2"
	}
	tcp := func(side string, size, off int) string {
		return "colo_compare_tcp_info " + side + ": seq/ack= 1/2 hdlen= 54 pdlen= " + itoa(size-54) + " offset= " + itoa(off) + " flags=24"
	}
	const release = "colo_compare_main : packet same and release packet"
	const request = "colo_send_message Send 'checkpoint-request' message"
	tests := []struct {
		name  string
		lines []string
		want  []checkpoint.Mismatch
	}{
		{"a match", []string{ip(60, 60), tcp("pri", 60, 0), tcp("sec", 60, 0), release, request}, nil},
		{"a partial match", []string{ip(81, 90), ip(81, 90), tcp("pri", 81, 0), tcp("sec", 90, 27), release, request}, nil},
		{"a mismatch before the checkpoint", []string{ip(60, 60), ip(60, 60), request}, []checkpoint.Mismatch{{PrimarySize: 60, SecondarySize: 60}}},
		{"a mismatch, then a release", []string{ip(81, 60), release}, []checkpoint.Mismatch{{PrimarySize: 81, SecondarySize: 60}}},
		{"a mismatch, then a match of other frames", []string{ip(60, 60), ip(66, 66), tcp("pri", 66, 0), tcp("sec", 66, 0), request},
			[]checkpoint.Mismatch{{PrimarySize: 60, SecondarySize: 60}}},
		{"a mismatch, then a match of frames of the same sizes", []string{ip(60, 60), ip(60, 60), tcp("pri", 60, 0), tcp("sec", 60, 0), request},
			[]checkpoint.Mismatch{{PrimarySize: 60, SecondarySize: 60}}},
		{"two tries that failed, then another comparison", []string{ip(60, 60), ip(60, 60), ip(60, 60), tcp("pri", 60, 0), tcp("sec", 60, 0)},
			[]checkpoint.Mismatch{{PrimarySize: 60, SecondarySize: 60}}},
	}
	for _, tc := range tests {
		var f checkpoint.TCPMismatchFinder
		var got []checkpoint.Mismatch
		for _, l := range tc.lines {
			ev, ok := checkpoint.ParseTraceLine(l)
			if !ok {
				t.Fatalf("%s: unparsed %q", tc.name, l)
			}
			got = append(got, f.Feed(ev)...)
		}
		if len(got) != len(tc.want) {
			t.Errorf("%s: mismatches %+v, want %+v", tc.name, got, tc.want)
			continue
		}
		for i := range got {
			if got[i].PrimarySize != tc.want[i].PrimarySize || got[i].SecondarySize != tc.want[i].SecondarySize {
				t.Errorf("%s: mismatch %+v, want %+v", tc.name, got[i], tc.want[i])
			}
		}
	}
}

func itoa(n int) string { return strconv.Itoa(n) }
