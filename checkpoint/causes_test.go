package checkpoint_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

// traceFile stands in for the file QEMU's log trace backend writes.
type traceFile struct {
	t *testing.T
	f *os.File
}

func (tf traceFile) write(lines ...string) {
	for _, l := range lines {
		if _, err := tf.f.WriteString(l + "\n"); err != nil {
			tf.t.Fatal(err)
		}
	}
}

// checkpointLines are the COLO frame's messages of one checkpoint: the request (up to the
// primary's STOP), then the flush and the rest.
var (
	requestLines = []string{"colo_send_message Send 'checkpoint-request' message", "colo_receive_message Receive 'checkpoint-reply' message"}
	flushLines   = []string{"colo_send_message Send 'vmstate-send' message", "colo_send_message Send 'vmstate-size' message",
		"colo_receive_message Receive 'vmstate-received' message", "colo_receive_message Receive 'vmstate-loaded' message"}
)

// startTraceServer is a fake QEMU that takes logfile (creating the file as QEMU does) and
// trace-event-set-state, failing the event named failOn.
func startTraceServer(t *testing.T, failOn string) *qmptest.Server {
	s := qmptest.New(t)
	s.Handle("human-monitor-command", func(c *qmptest.Conn, r *qmptest.Request) {
		var a struct {
			Line string `json:"command-line"`
		}
		_ = r.DecodeArgs(&a)
		if path, ok := strings.CutPrefix(a.Line, "logfile "); ok {
			if err := os.WriteFile(path, nil, 0o644); err != nil {
				c.ReplyError(r, "GenericError", err.Error())
				return
			}
		}
		c.Reply(r, "")
	})
	s.Handle("trace-event-set-state", func(c *qmptest.Conn, r *qmptest.Request) {
		var a struct {
			Name   string `json:"name"`
			Enable bool   `json:"enable"`
		}
		_ = r.DecodeArgs(&a)
		if a.Name == failOn && a.Enable {
			c.ReplyError(r, "GenericError", "No such event '"+a.Name+"'")
			return
		}
		c.Reply(r, struct{}{})
	})
	return s
}

func traceRequests(s *qmptest.Server) (on, off []string) {
	for _, r := range s.RequestsFor("trace-event-set-state") {
		var a struct {
			Name   string `json:"name"`
			Enable bool   `json:"enable"`
		}
		_ = json.Unmarshal(r.Args, &a)
		if a.Enable {
			on = append(on, a.Name)
		} else {
			off = append(off, a.Name)
		}
	}
	return on, off
}

func TestStartCauseTrace(t *testing.T) {
	s := startTraceServer(t, "")
	q := dial(t, s)
	path := filepath.Join(t.TempDir(), "trace.log")
	ct, err := checkpoint.StartCauseTrace(ctx10(t), q, path, checkpoint.TraceBasic)
	if err != nil {
		t.Fatal(err)
	}
	on, _ := traceRequests(s)
	for _, want := range []string{checkpoint.TraceOldPacket, checkpoint.TraceCompareUDP, checkpoint.TraceSendMessage, checkpoint.TraceReceiveMessage} {
		if !slices.Contains(on, want) {
			t.Errorf("basic trace did not turn on %s (on: %v)", want, on)
		}
	}
	if slices.Contains(on, checkpoint.TraceCompareIPInfo) {
		t.Errorf("basic trace turned on the per-packet %s", checkpoint.TraceCompareIPInfo)
	}
	if hmp := s.RequestsFor("human-monitor-command"); len(hmp) != 1 || !strings.Contains(string(hmp[0].Args), "logfile "+path) {
		t.Errorf("logfile not set: %v", hmp)
	}
	if err := ct.Stop(ctx10(t), q); err != nil {
		t.Fatal(err)
	}
	if _, off := traceRequests(s); len(off) != len(on) {
		t.Errorf("Stop turned off %v of %v", off, on)
	}

	// A QEMU without one of the events: an error naming it, and nothing left on.
	s2 := startTraceServer(t, checkpoint.TraceCompareIPInfo)
	q2 := dial(t, s2)
	if _, err := checkpoint.StartCauseTrace(ctx10(t), q2, filepath.Join(t.TempDir(), "t.log"), checkpoint.TraceDetailed); err == nil ||
		!strings.Contains(err.Error(), checkpoint.TraceCompareIPInfo) {
		t.Fatalf("error %v, want one naming %s", err, checkpoint.TraceCompareIPInfo)
	}
	on2, off2 := traceRequests(s2)
	for _, ev := range on2 {
		if ev != checkpoint.TraceCompareIPInfo && !slices.Contains(off2, ev) {
			t.Errorf("%s left on after the failed start", ev)
		}
	}
}

func TestObserverReasons(t *testing.T) {
	tests := []struct {
		name  string
		level checkpoint.TraceLevel
		// lines QEMU writes before the checkpoint's request
		lines []string
		// the checkpoint comes this long after the previous one
		after   time.Duration
		request bool
		want    checkpoint.Reason
	}{
		{"timer", checkpoint.TraceBasic, nil, 200 * time.Millisecond, false, checkpoint.ReasonTimer},
		{"tcp mismatch, basic trace", checkpoint.TraceBasic, nil, 40 * time.Millisecond, false, checkpoint.ReasonMismatch},
		{"tcp mismatch, detailed trace", checkpoint.TraceDetailed, []string{
			"colo_compare_ip_info ppkt size = 60, ip_src = 10.0.2.15, ip_dst = 10.0.2.2, spkt size = 60, ip_src = 10.0.2.15, ip_dst = 10.0.2.2",
			"colo_compare_ip_info ppkt size = 60, ip_src = 10.0.2.15, ip_dst = 10.0.2.2, spkt size = 60, ip_src = 10.0.2.15, ip_dst = 10.0.2.2",
		}, 40 * time.Millisecond, false, checkpoint.ReasonTCP},
		{"tcp match, then the timer", checkpoint.TraceDetailed, []string{
			"colo_compare_ip_info ppkt size = 66, ip_src = 10.0.2.15, ip_dst = 10.0.2.2, spkt size = 66, ip_src = 10.0.2.15, ip_dst = 10.0.2.2",
			"colo_compare_tcp_info pri: seq/ack= 1/2 hdlen= 66 pdlen= 6 offset= 0 flags=24",
			"colo_compare_tcp_info sec: seq/ack= 1/2 hdlen= 66 pdlen= 6 offset= 0 flags=24",
			"colo_compare_main : packet same and release packet",
		}, 200 * time.Millisecond, false, checkpoint.ReasonTimer},
		{"compare timeout", checkpoint.TraceBasic, []string{"colo_old_packet_check_found 1796216721033"}, 150 * time.Millisecond, false, checkpoint.ReasonTimeout},
		{"udp", checkpoint.TraceBasic, []string{"colo_compare_udp_miscompare : primary pkt size = 98", "colo_compare_udp_miscompare : Secondary pkt size = 98"},
			30 * time.Millisecond, false, checkpoint.ReasonUDP},
		{"icmp", checkpoint.TraceBasic, []string{"colo_compare_icmp_miscompare : primary pkt size = 98"}, 30 * time.Millisecond, false, checkpoint.ReasonICMP},
		{"delay changed", checkpoint.TraceBasic, nil, 20 * time.Millisecond, true, checkpoint.ReasonRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "trace.log")
			f, err := os.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			tf := traceFile{t, f}
			ct, err := checkpoint.OpenCauseTrace(path, tc.level)
			if err != nil {
				t.Fatal(err)
			}
			defer ct.Stop(ctx10(t), nil)
			o := checkpoint.NewObserver(200 * time.Millisecond)
			o.SetCauseTrace(ct)
			var infos []checkpoint.CheckpointInfo
			o.OnCheckpointInfo(func(i checkpoint.CheckpointInfo) { infos = append(infos, i) })
			t0 := time.Unix(1000, 0)
			o.Observe(ev("MIGRATION", t0, `{"status":"colo"}`))
			// A first checkpoint on the timer, with a mismatch during it: QEMU drops what comes
			// between a request and its flush, so it explains nothing.
			tf.write(requestLines...)
			o.Observe(ev("STOP", t0.Add(200*time.Millisecond), ""))
			tf.write("colo_old_packet_check_found 1796216721033")
			tf.write(flushLines...)
			o.Observe(ev("RESUME", t0.Add(210*time.Millisecond), ""))
			if tc.request {
				o.NoteRequest()
			}
			tf.write(tc.lines...)
			tf.write(requestLines...)
			at := t0.Add(200*time.Millisecond + tc.after)
			o.Observe(ev("STOP", at, ""))
			tf.write(flushLines...)
			o.Observe(ev("RESUME", at.Add(15*time.Millisecond), ""))
			st := o.Stats()
			if st.TraceErr != nil {
				t.Fatal(st.TraceErr)
			}
			if st.ByReason[checkpoint.ReasonTimer] < 1 || st.ByReason[tc.want] < 1 || st.Checkpoints != 2 {
				t.Fatalf("by reason %v, want the first on the timer and the second %s", st.ByReason, tc.want)
			}
			if st.LastReason != tc.want || len(infos) != 2 || infos[1].Reason != tc.want {
				t.Fatalf("last reason %s, infos %+v; want %s", st.LastReason, infos, tc.want)
			}
			if infos[1].Since != tc.after || infos[1].Pause != 15*time.Millisecond {
				t.Errorf("info %+v: want since %v, pause 15ms", infos[1], tc.after)
			}
		})
	}
}

// Without a cause trace the clock decides, as before.
func TestObserverReasonsWithoutTrace(t *testing.T) {
	o := checkpoint.NewObserver(200 * time.Millisecond)
	t0 := time.Unix(1000, 0)
	o.Observe(ev("MIGRATION", t0, `{"status":"colo"}`))
	at := t0
	for _, gap := range []time.Duration{200, 200, 50, 200} {
		at = at.Add(gap * time.Millisecond)
		o.Observe(ev("STOP", at, ""))
		o.Observe(ev("RESUME", at.Add(10*time.Millisecond), ""))
	}
	st := o.Stats()
	if st.ByReason[checkpoint.ReasonTimer] != 3 || st.ByReason[checkpoint.ReasonUnknown] != 1 {
		t.Fatalf("by reason %v, want 3 timer and 1 unknown", st.ByReason)
	}
}

// The trace file's read part is given back, and the reader carries on past the hole.
func TestCauseTraceReadsPastHoles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trace.log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ct, err := checkpoint.OpenCauseTrace(path, checkpoint.TraceBasic)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Stop(ctx10(t), nil)
	line := "colo_send_message Send 'checkpoint-request' message\n"
	total := 0
	for round := 0; round < 3; round++ {
		var b strings.Builder
		n := (1<<20)/len(line) + 1
		for i := 0; i < n; i++ {
			b.WriteString(line)
		}
		// A line cut in two by a read.
		b.WriteString("colo_receive_message Receive 'vmstate-")
		if _, err := f.WriteString(b.String()); err != nil {
			t.Fatal(err)
		}
		evs, err := ct.Read()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString("received' message\n"); err != nil {
			t.Fatal(err)
		}
		more, err := ct.Read()
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) != n || len(more) != 1 || more[0].Message != "vmstate-received" {
			t.Fatalf("round %d: %d events then %v, want %d then vmstate-received", round, len(evs), more, n)
		}
		total += n + 1
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if size := st.Size; st.Blocks*512 > 2<<20 || size < 3<<20 {
		t.Errorf("the trace file holds %d bytes on disk of %d after %d lines read, want the read part given back", st.Blocks*512, size, total)
	}
}

func TestExpiredScanCycle(t *testing.T) {
	for _, tc := range []struct {
		timeout time.Duration
		want    int
	}{{100 * time.Millisecond, 20}, {10 * time.Millisecond, 10}, {3 * time.Second, 600}, {time.Minute, 1000}} {
		if got := checkpoint.ExpiredScanCycle(tc.timeout); got != tc.want {
			t.Errorf("ExpiredScanCycle(%v) = %d ms, want %d", tc.timeout, got, tc.want)
		}
	}
}
