package integration

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/colodiag"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/netlab"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

// causeTraceEvents are the primary's trace events the cause analysis reads.
var causeTraceEvents = []string{
	checkpoint.TraceCompareIPInfo, checkpoint.TraceCompareTCPInfo, checkpoint.TraceCompareMain,
	checkpoint.TraceCompareDrop, checkpoint.TraceCompareUDP, checkpoint.TraceCompareICMP,
	checkpoint.TraceOldPacket, checkpoint.TraceSendMessage, checkpoint.TraceReceiveMessage,
	checkpoint.TraceVMStateChange,
}

// causeRun is one workload's measurement.
type causeRun struct {
	name     string
	report   colodiag.Report
	stats    checkpoint.Stats
	ops      float64 // records or requests per second
	maxWait  time.Duration
	examples map[colodiag.Cause][]string
	// retrans and segs are the client's TCP retransmissions and segments sent (bridge LAN
	// only: slirp's own are not visible); -1 when unknown.
	retrans, segs int64
	// slow counts the requests answered after more than 200 ms (Linux's minimum
	// retransmission timeout), of n.
	slow, n int
	// pauses are the parts of each checkpoint's pause, from the primary's trace.
	pauses []colodiag.PauseParts
}

// BenchmarkColoCauses counts the checkpoints of a protected pair by cause, on the hub LAN (a
// QEMU hub, slirp as the clients' TCP peer: what the single-host tests, the demo and the
// benchmark used) and on the bridge LAN (testLAN: a Linux bridge, taps and a Linux client in
// network namespaces), each with two workloads of 30 s (LOCKSTEP_CAUSES_SECONDS): the demo's
// (one TCP connection, a record every 20 ms, each acknowledged after an fsync in the guest) and
// a request/response one (a new connection per request, a ping and its reply, every 20 ms).
//
// The causes come from QEMU's own trace events of the primary (colo_compare_*, the COLO frame's
// messages, which mark every checkpoint and its flush) and from a replay of colo-compare's
// comparison (package colodiag) over the frames that reached it, captured on the loopback of
// the primary's COLO channels. Run it with
//
//	go test -run '^$' -bench ColoCauses -benchtime 1x -timeout 30m ./integration/
//
// (needs root for the capture and the namespaces; -bench ColoCauses/bridge runs one LAN).
func BenchmarkColoCauses(b *testing.B) {
	q := qemuenv.QEMU11(b)
	kernel, initrd := guestImages(b)
	secs := 30
	if v, err := strconv.Atoi(os.Getenv("LOCKSTEP_CAUSES_SECONDS")); err == nil && v > 0 {
		secs = v
	}
	var mu sync.Mutex
	var runs []causeRun
	for _, lan := range []string{"hub", "bridge"} {
		for _, model := range []string{"e1000", "virtio"} {
			b.Run(lan+"/"+model, func(b *testing.B) {
				if model == "virtio" && !guestHasModule("virtio_net") {
					b.Skip("the test guest was built without virtio_net (run `make guest`)")
				}
				for i := 0; i < b.N; i++ {
					rs := causeBench(b, q, kernel, initrd, lan, model, time.Duration(secs)*time.Second)
					mu.Lock()
					runs = append(runs, rs...)
					mu.Unlock()
				}
			})
		}
	}
	if len(runs) == 0 {
		return
	}
	var names []string
	var reps []colodiag.Report
	for _, r := range runs {
		names = append(names, r.name)
		reps = append(reps, r.report)
	}
	fmt.Printf("\ncheckpoints by cause, QEMU %s (TCG), x-checkpoint-delay 200ms, %d s per workload\n\n%s\n", q.Version, secs, colodiag.Table(names, reps))
	var sets [][]colodiag.PauseParts
	for _, r := range runs {
		sets = append(sets, r.pauses)
	}
	fmt.Printf("%s\n", colodiag.PauseTable(names, sets))
	fmt.Printf("%-26s %10s %10s %8s %10s %10s %10s %12s %16s\n", "workload", "ops/s", "ckpt/s", "early", "pause p50", "pause p99", "max wait", "wait >200ms", "client retrans")
	for _, r := range runs {
		rt := "-"
		if r.retrans >= 0 {
			rt = fmt.Sprintf("%d of %d", r.retrans, r.segs)
		}
		fmt.Printf("%-26s %10.1f %10.1f %7.0f%% %10v %10v %10v %12s %16s\n", r.name, r.ops, r.stats.Rate,
			100*float64(r.stats.Early)/float64(max(r.stats.Checkpoints, 1)), r.stats.PauseP50.Round(100*time.Microsecond),
			r.stats.PauseP99.Round(100*time.Microsecond), r.maxWait.Round(time.Millisecond), fmt.Sprintf("%d of %d", r.slow, r.n), rt)
	}
	for _, r := range runs {
		for _, ex := range r.report.NeverExamples {
			fmt.Printf("%s, a reply the secondary never sent: %s\n", r.name, ex)
		}
		for _, c := range colodiag.AllCauses {
			for _, ex := range r.examples[c] {
				fmt.Printf("%s, %s: %s\n", r.name, c, ex)
			}
		}
	}
}

func causeBench(b *testing.B, q *qemuenv.QEMU, kernel, initrd, lan, model string, phase time.Duration) []causeRun {
	var e *pairEnv
	if lan == "hub" {
		e = newPairEnv(b, q, kernel, initrd, 200*time.Millisecond, 2)
	} else {
		e = newPairEnvLAN(b, q, kernel, initrd, 200*time.Millisecond)
	}
	if model == "virtio" {
		e.spec.NIC.Model = "virtio-net-pci"
	}
	// LOCKSTEP_CAUSES_NOREWRITER=1 measures without the secondary's filter-rewriter.
	e.spec.Tunables.NoRewriter = os.Getenv("LOCKSTEP_CAUSES_NOREWRITER") == "1"
	// LOCKSTEP_CAUSES_COMPARE_TIMEOUT (a duration) sets colo-compare's compare_timeout.
	if d, err := time.ParseDuration(os.Getenv("LOCKSTEP_CAUSES_COMPARE_TIMEOUT")); err == nil {
		e.spec.Tunables.CompareTimeout = d
	}
	name := lan + " " + model
	e.log = nil
	// Timestamps on the trace lines, which the analysis matches with the capture.
	e.spec.QEMU = append(append([]string(nil), e.spec.QEMU...), "-msg", "timestamp=on")
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	var ns *netlab.Node
	if e.lan != nil {
		ns = e.lan.Host
	}
	var capt *colodiag.Capture
	var gen checkpoint.Generation
	e.beforeProtect = func(g checkpoint.Generation) {
		gen = g
		var err error
		capt, err = startChannelCapture(ns, g.Ports)
		if err != nil {
			b.Fatal(err)
		}
	}
	prim := e.bootPrimary(ctx)
	// As the agent does: protection starts once the guest has booted and settled.
	c := e.connect(b, 90*time.Second)
	c.Close()
	time.Sleep(10 * time.Second)
	p := e.protect(ctx, prim, 1, false)
	defer func() {
		if capt != nil {
			capt.Stop()
		}
	}()
	tracePath := filepath.Join(e.dir, "primary.trace")
	if err := enableTrace(ctx, prim.QMP, tracePath, causeTraceEvents); err != nil {
		b.Fatal(err)
	}
	// The secondary's filter-rewriter: its sequence offsets per packet.
	secTrace := filepath.Join(e.dir, "secondary.trace")
	if err := enableTrace(ctx, p.secondary.QMP, secTrace, []string{checkpoint.TraceRewriterPacket, checkpoint.TraceRewriterOffset,
		checkpoint.TraceReceiveMessage, checkpoint.TraceSendMessage}); err != nil {
		b.Fatal(err)
	}
	if d := os.Getenv("LOCKSTEP_CAUSES_KEEP"); d != "" {
		b.Cleanup(func() {
			for _, f := range []string{tracePath, secTrace} {
				if data, err := os.ReadFile(f); err == nil {
					_ = os.WriteFile(filepath.Join(d, lan+"-"+model+"-"+filepath.Base(f)), data, 0o644)
				}
			}
		})
	}
	p.waitCheckpoints(b, 5, 30*time.Second)

	var runs []causeRun
	type window struct{ from, to time.Time }
	var wins []window

	tcp := func() (int64, int64) {
		if e.lan == nil {
			return -1, -1
		}
		r, o, err := e.lan.ClientTCP()
		if err != nil {
			b.Fatal(err)
		}
		return int64(r), int64(o)
	}

	// The demo's workload, on a connection opened after protection as the demo's client does.
	w := e.startWriter(b, 20*time.Millisecond)
	w.waitAcked(b, 3, 30*time.Second)
	p.obs.Reset()
	r0, o0 := tcp()
	a0, t0 := w.Acked(), time.Now()
	time.Sleep(phase)
	st := p.obs.Stats()
	rate := float64(w.Acked()-a0) / time.Since(t0).Seconds()
	r1, o1 := tcp()
	wins = append(wins, window{t0, time.Now()})
	w.mu.Lock()
	mw := w.maxWait
	slow, total := 0, 0
	for i := int(a0); i < len(w.ackAt); i++ {
		total++
		if w.ackAt[i].Sub(w.sentAt[i]) > 200*time.Millisecond {
			slow++
		}
	}
	w.mu.Unlock()
	w.verify(b)
	runs = append(runs, causeRun{name: name + " records", stats: st, ops: rate, maxWait: mw, retrans: r1 - r0, segs: o1 - o0, slow: slow, n: total})

	// Request/response: a new connection per request.
	time.Sleep(time.Second)
	p.obs.Reset()
	r0, o0 = tcp()
	t1 := time.Now()
	n, longest, slowReq := reqResp(b, e, phase, 20*time.Millisecond)
	st = p.obs.Stats()
	r1, o1 = tcp()
	wins = append(wins, window{t1, time.Now()})
	runs = append(runs, causeRun{name: name + " req/resp", stats: st, ops: float64(n) / time.Since(t1).Seconds(), maxWait: longest,
		retrans: r1 - r0, segs: o1 - o0, slow: slowReq, n: n})

	frames, cerr := capt.Stop()
	capt = nil
	if cerr != nil {
		b.Logf("capture: %v", cerr)
	}
	trace, err := readTrace(tracePath)
	if err != nil {
		b.Fatal(err)
	}
	pin, err := colodiag.ChannelPackets(frames, func(src, dst uint16) bool { return int(src) == gen.Ports.CompareIn }, checkpoint.VnetHdr(e.spec))
	if err != nil {
		b.Fatal(err)
	}
	sin, err := colodiag.ChannelPackets(frames, func(src, dst uint16) bool { return int(dst) == gen.Ports.Compare }, checkpoint.VnetHdr(e.spec))
	if err != nil {
		b.Fatal(err)
	}
	mirror, err := colodiag.ChannelPackets(frames, func(src, dst uint16) bool { return int(src) == gen.Ports.Mirror }, checkpoint.VnetHdr(e.spec))
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("%s %s: %d trace events, %d primary and %d secondary frames to colo-compare", lan, model, len(trace), len(pin), len(sin))
	for i := range runs {
		runs[i].report = colodiag.Analyze(colodiag.Input{Trace: trace, Primary: pin, Secondary: sin, Mirror: mirror,
			Delay: e.spec.Tunables.CheckpointDelay, From: wins[i].from, To: wins[i].to})
		runs[i].pauses = colodiag.Pauses(trace, wins[i].from, wins[i].to)
		runs[i].examples = map[colodiag.Cause][]string{}
		for _, cp := range runs[i].report.Checkpoints {
			if cp.Mismatch != nil && len(runs[i].examples[cp.Cause]) < 2 {
				runs[i].examples[cp.Cause] = append(runs[i].examples[cp.Cause], cp.Mismatch.Describe())
			}
		}
	}
	return runs
}

// guestHasModule reports whether the test guest's build loads the kernel module name.
func guestHasModule(name string) bool {
	b, err := os.ReadFile(filepath.Join(qemuenv.BuildDir(), "guest", "current", "inputs.txt"))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if mods, ok := strings.CutPrefix(line, "modules "); ok {
			return slices.Contains(strings.Fields(mods), name)
		}
	}
	return false
}

// reqResp runs the request/response workload for d: every interval a new connection, one
// ping and its reply, closed again. It returns the requests answered, the longest one and how
// many took more than 200 ms.
func reqResp(b *testing.B, e *pairEnv, d, interval time.Duration) (int, time.Duration, int) {
	var dial client.Dialer
	addr := ""
	if e.lan != nil {
		dial, addr = e.lan.Dial, e.lan.GuestAddr()
	} else {
		var nd net.Dialer
		dial, addr = nd.DialContext, e.hub.ClientURL
	}
	end := time.Now().Add(d)
	n, slow := 0, 0
	var longest time.Duration
	for time.Now().Before(end) {
		t0 := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		conn, err := dial(ctx, "tcp", addr)
		if err != nil {
			cancel()
			b.Fatalf("request %d: %v", n+1, err)
		}
		c := client.New(conn)
		_, err = c.Ping(ctx)
		c.Close()
		cancel()
		if err != nil {
			b.Fatalf("request %d: %v", n+1, err)
		}
		n++
		took := time.Since(t0)
		longest = max(longest, took)
		if took > 200*time.Millisecond {
			slow++
		}
		time.Sleep(interval)
	}
	return n, longest, slow
}

// startChannelCapture captures, on the loopback of the namespace where the QEMUs run (ns; nil
// for this process's own), the frames of the primary's compare-in channel (from the server
// port ports.CompareIn) and of the secondary's output (to ports.Compare).
func startChannelCapture(ns *netlab.Node, ports checkpoint.Ports) (*colodiag.Capture, error) {
	var enter func(func()) error
	if ns != nil {
		enter = ns.Do
	}
	ci, cmp, mir := uint16(ports.CompareIn), uint16(ports.Compare), uint16(ports.Mirror)
	return colodiag.StartCapture("lo", enter, func(eth []byte, out bool) bool {
		if out {
			return false // loopback shows every frame twice
		}
		s, ok := colodiag.ParseSegment(eth)
		return ok && (s.Src.Port() == ci || s.Dst.Port() == cmp || s.Src.Port() == mir)
	})
}

// enableTrace sends the trace events of q to path: the log backend's file (HMP logfile) and
// the events turned on at run time.
func enableTrace(ctx context.Context, q *qmp.Client, path string, events []string) error {
	if _, err := q.HumanMonitorCommand(ctx, "logfile "+path); err != nil {
		return err
	}
	for _, ev := range events {
		if err := q.Execute(ctx, "trace-event-set-state", map[string]any{"name": ev, "enable": true}, nil); err != nil {
			return fmt.Errorf("trace-event-set-state %s: %w", ev, err)
		}
	}
	return nil
}

func readTrace(path string) ([]checkpoint.TraceEvent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var evs []checkpoint.TraceEvent
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		if ev, ok := checkpoint.ParseTraceLine(sc.Text()); ok {
			evs = append(evs, ev)
		}
	}
	return evs, sc.Err()
}
