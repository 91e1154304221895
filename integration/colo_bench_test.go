package integration

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

func sortedDurations(ds []time.Duration) []time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	return sortedDurations(ds)[len(ds)/2]
}

func spread(ds []time.Duration) string {
	if len(ds) == 0 {
		return "-"
	}
	s := sortedDurations(ds)
	return fmt.Sprintf("%v (%v-%v)", s[len(s)/2].Round(time.Millisecond), s[0].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}

// pinger sends pings on its own connection back to back and records when each was answered,
// which tells how soon the guest answered a request sent after a failure.
type pinger struct {
	c    *client.Client
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	sent []time.Time
	got  []time.Time
}

// startPingerOn pings over c, a connection of its own to the guest's service.
func startPingerOn(b testing.TB, c *client.Client) *pinger {
	p := &pinger{c: c, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			t0 := time.Now()
			_, err := c.Ping(ctx)
			cancel()
			if err != nil {
				return
			}
			p.mu.Lock()
			p.sent = append(p.sent, t0)
			p.got = append(p.got, time.Now())
			p.mu.Unlock()
		}
	}()
	b.Cleanup(func() { p.Stop() })
	return p
}

func (p *pinger) Stop() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
	p.c.Close()
}

// firstFreshReply returns how long after t the first ping sent after t was answered.
func (p *pinger) firstFreshReply(t time.Time) (time.Duration, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, s := range p.sent {
		if s.After(t) {
			return p.got[i].Sub(t), true
		}
	}
	return 0, false
}

type phase struct {
	name  string
	rate  float64
	st    checkpoint.Stats
	colo  bool
	delay time.Duration
}

// BenchmarkColo measures in one run, on QEMU 11.1 (TCG) with the test guest, and prints as a
// table: client throughput (back-to-back acknowledged records on one connection) unprotected
// and protected at x-checkpoint-delay 200, 1000 and 5000 ms, as ratios against the unprotected
// figure of the same run; checkpoint pauses; and the time from SIGKILL of the primary to the
// first reply, split into detection, the QMP failover sequence and the rest, over a chain of
// failovers, each followed by a re-protection onto a fresh secondary. `make bench` runs it once
// (-benchtime 1x): one iteration is the whole measurement.
func BenchmarkColo(b *testing.B) {
	for i := 0; i < b.N; i++ {
		coloBench(b)
	}
}

func coloBench(b *testing.B) {
	q := qemuenv.QEMU11(b)
	kernel, initrd := guestImages(b)
	failovers := 5
	phaseLen := 8 * time.Second
	e := newPairEnvLAN(b, q, kernel, initrd, 200*time.Millisecond)
	// LOCKSTEP_BENCH_NOREWRITER=1 measures without the secondary's filter-rewriter.
	e.spec.Tunables.NoRewriter = os.Getenv("LOCKSTEP_BENCH_NOREWRITER") == "1"
	e.log = nil // keep the table readable
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	prim := e.bootPrimary(ctx)
	w := e.startWriter(b, 0)
	w.waitAcked(b, 5, 30*time.Second)
	var phases []phase
	measure := func(name string, obs *checkpoint.Observer, delay time.Duration) {
		start := w.Acked()
		before := time.Now()
		time.Sleep(phaseLen)
		p := phase{name: name, rate: float64(w.Acked()-start) / time.Since(before).Seconds(), delay: delay}
		if obs != nil {
			p.st = obs.Stats()
			p.colo = true
		}
		phases = append(phases, p)
	}
	measure("unprotected", nil, 0)

	p := e.protect(ctx, prim, 1, false)
	for _, d := range []time.Duration{200 * time.Millisecond, 1000 * time.Millisecond, 5000 * time.Millisecond} {
		ms := uint32(d / time.Millisecond)
		if err := prim.QMP.MigrateSetParameters(ctx, qmp.MigrationParameters{XCheckpointDelay: &ms}); err != nil {
			b.Fatal(err)
		}
		// Each row's statistics are its own.
		obs := p.obs
		obs.SetDelay(d)
		time.Sleep(d) // let the first checkpoint at the new delay pass
		obs.Reset()
		measure(fmt.Sprintf("protected, delay %v", d), obs, d)
	}
	ms := uint32(200)
	if err := prim.QMP.MigrateSetParameters(ctx, qmp.MigrationParameters{XCheckpointDelay: &ms}); err != nil {
		b.Fatal(err)
	}

	// The failover chain.
	var detect, seq, rest, first, fresh, reprotect []time.Duration
	pg := startPingerOn(b, e.connect(b, 60*time.Second))
	cur := p
	for i := 0; i < failovers; i++ {
		w.waitAcked(b, w.Acked()+20, 30*time.Second)
		sig := watchFor(b, cur.primary, checkpoint.WatchConfig{}, checkpoint.SignalProcessExited, checkpoint.SignalQMPLost)
		kill := time.Now()
		if err := cur.primary.Signal(syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		awaitSignal(b, sig, 10*time.Second)
		det := time.Now()
		took, err := checkpoint.FailoverAsSecondary(cur.secondary.QMP, false).Run(ctx, nil, nil)
		if err != nil {
			b.Fatalf("failover %d: %v", i+1, err)
		}
		w.waitAcked(b, w.Acked()+5, 30*time.Second)
		fa, ok := w.firstAckAfter(kill)
		if !ok {
			b.Fatal("no ack after the kill")
		}
		fr, _ := pg.firstFreshReply(det.Add(took))
		detect = append(detect, det.Sub(kill))
		seq = append(seq, took)
		first = append(first, fa.Sub(kill))
		rest = append(rest, fa.Sub(kill)-det.Sub(kill)-took)
		fresh = append(fresh, det.Add(took).Sub(kill)+fr)
		cur.stopObs()
		if i == failovers-1 {
			break
		}
		t0 := time.Now()
		next := e.protect(ctx, cur.secondary, 0, true)
		reprotect = append(reprotect, time.Since(t0))
		cur = next
	}
	total := w.verify(b)

	var sb strings.Builder
	fmt.Fprintf(&sb, "\nlockstep COLO benchmark: QEMU %s (TCG), guest %d MiB, one client connection, records acknowledged after fsync\n\n", q.Version, e.spec.MemoryMiB)
	fmt.Fprintf(&sb, "%-26s %12s %8s %12s %8s %10s %10s %10s %12s\n", "phase", "records/s", "ratio", "checkpoints", "early", "pause p50", "pause p99", "pause avg", "bytes/ckpt")
	base := phases[0].rate
	for _, ph := range phases {
		if !ph.colo {
			fmt.Fprintf(&sb, "%-26s %12.1f %8.2f %12s %8s %10s %10s %10s %12s\n", ph.name, ph.rate, 1.0, "-", "-", "-", "-", "-", "-")
			continue
		}
		fmt.Fprintf(&sb, "%-26s %12.1f %8.2f %12d %8d %10v %10v %10v %12d\n", ph.name, ph.rate, ph.rate/base,
			ph.st.Checkpoints, ph.st.Early, ph.st.PauseP50.Round(100*time.Microsecond), ph.st.PauseP99.Round(100*time.Microsecond),
			ph.st.PauseAvg.Round(100*time.Microsecond), ph.st.BytesAvg)
	}
	fmt.Fprintf(&sb, "\nfailover: SIGKILL of the primary, %d times in a chain (re-protected in between), median (min-max)\n", len(first))
	fmt.Fprintf(&sb, "  detection (kill -> signal)                %s\n", spread(detect))
	fmt.Fprintf(&sb, "  QMP sequence on the secondary             %s\n", spread(seq))
	fmt.Fprintf(&sb, "  rest (until the in-flight write's ack)    %s\n", spread(rest))
	fmt.Fprintf(&sb, "  kill -> first ack on the same connection  %s\n", spread(first))
	fmt.Fprintf(&sb, "  kill -> first reply to a ping sent after the failover (second connection, sequential pings) %s\n", spread(fresh))
	fmt.Fprintf(&sb, "  re-protection (fresh secondary to COLO)   %s\n", spread(reprotect))
	fmt.Fprintf(&sb, "  records acknowledged: %d, lost: 0 (memory and disk checked), client connection kept\n", total)
	fmt.Fprintf(&sb, "\nbaseline (DESIGN.md, by hand): pause ~25 ms mean, failover sequence 20-30 ms, first reply 0.35-0.41 s\n")
	fmt.Fprint(os.Stdout, sb.String())
	b.ReportMetric(float64(median(first).Milliseconds()), "ms-first-reply")
	b.ReportMetric(float64(median(seq).Microseconds())/1000, "ms-failover-seq")
}
