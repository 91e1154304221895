package integration

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

// The Observer's checkpoint reasons from a real primary's cause trace. The pair runs on the hub
// LAN on purpose: there every new connection makes colo-compare mismatch (slirp does not use
// TCP timestamps, so the secondary's SYN-ACK is a frame that the guest's e1000 driver pads, and
// colo-compare counts the padding as data; BenchmarkColoCauses has the figures), which gives
// the trace TCP mismatches to report. A change of the checkpoint delay gives a requested one.
func TestColoCheckpointReasons(t *testing.T) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnv(t, q, kernel, initrd, 200*time.Millisecond, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	prim := e.bootPrimary(ctx)
	e.connect(t, 90*time.Second).Close()
	p := e.protect(ctx, prim, 1, false)
	ct, err := checkpoint.StartCauseTrace(ctx, prim.QMP, filepath.Join(prim.Side.RunDir, checkpoint.CauseTraceFile), checkpoint.TraceDetailed)
	if err != nil {
		t.Fatalf("%v\n%s", err, prim.LogTail())
	}
	defer ct.Stop(context.Background(), prim.QMP)
	p.obs.SetCauseTrace(ct)
	var infos []checkpoint.CheckpointInfo
	infoc := make(chan checkpoint.CheckpointInfo, 1024)
	p.obs.OnCheckpointInfo(func(i checkpoint.CheckpointInfo) {
		select {
		case infoc <- i:
		default:
		}
	})
	p.waitCheckpoints(t, 3, 30*time.Second)
	p.obs.Reset()

	// New connections, one request each, for 5 s.
	var d net.Dialer
	end := time.Now().Add(5 * time.Second)
	for n := 0; time.Now().Before(end); n++ {
		rctx, rcancel := context.WithTimeout(ctx, 20*time.Second)
		conn, err := d.DialContext(rctx, "tcp", e.hub.ClientURL)
		if err != nil {
			rcancel()
			t.Fatalf("request %d: %v", n, err)
		}
		c := client.New(conn)
		_, err = c.Ping(rctx)
		c.Close()
		rcancel()
		if err != nil {
			t.Fatalf("request %d: %v", n, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Quiet, then a delay change, which QEMU answers with a checkpoint at once.
	time.Sleep(time.Second)
	p.obs.NoteRequest()
	ms := uint32(300)
	if err := prim.QMP.MigrateSetParameters(ctx, qmp.MigrationParameters{XCheckpointDelay: &ms}); err != nil {
		t.Fatal(err)
	}
	p.obs.SetDelay(300 * time.Millisecond)
	time.Sleep(time.Second)

	st := p.obs.Stats()
	for len(infoc) > 0 {
		infos = append(infos, <-infoc)
	}
	t.Logf("%d checkpoints by reason %v, last %s %q; trace error %v", st.Checkpoints, st.ByReason, st.LastReason, st.LastDetail, st.TraceErr)
	if st.TraceErr != nil {
		t.Fatalf("reading the cause trace: %v", st.TraceErr)
	}
	var sum uint64
	for _, n := range st.ByReason {
		sum += n
	}
	if sum != st.Checkpoints || st.Checkpoints < 10 {
		t.Fatalf("reasons %v add up to %d of %d checkpoints", st.ByReason, sum, st.Checkpoints)
	}
	if st.ByReason[checkpoint.ReasonTCP] == 0 {
		t.Errorf("no TCP mismatch among %v: the trace did not reach the observer", st.ByReason)
	}
	if st.ByReason[checkpoint.ReasonTimer] == 0 {
		t.Errorf("no timer checkpoint among %v", st.ByReason)
	}
	if st.ByReason[checkpoint.ReasonRequest] != 1 {
		t.Errorf("%d requested checkpoints, want the delay change's 1 (%v)", st.ByReason[checkpoint.ReasonRequest], st.ByReason)
	}
	tcpDetail := false
	for _, i := range infos {
		if i.Reason == checkpoint.ReasonTCP && i.Detail != "" {
			tcpDetail = true
		}
	}
	if !tcpDetail {
		t.Errorf("no TCP mismatch came with the sizes of its frames")
	}
}
