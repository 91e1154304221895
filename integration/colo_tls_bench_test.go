package integration

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
)

// BenchmarkReplicationTLS measures what encrypting the replication channels costs, in one
// run on QEMU 11.1 (TCG) with the test guest: one primary and one client writing back to back
// on one connection, protected in turn in plaintext and over TLS (plain, TLS, four times: each
// a fresh secondary, the previous one killed and the primary running on alone in between), at
// x-checkpoint-delay 200 ms. For each phase: the client's throughput as a ratio to the
// unprotected figure of the same run, the checkpoint pause (p50, p99, mean), bytes per
// checkpoint (the migration socket's TCP_INFO, TLS records included) and the time the
// protection took to reach COLO; then TLS against plaintext as ratios of the medians over the
// phases of each kind (medians, because a busy machine gives a phase an outlier now and then). `make bench` runs it
// once (-benchtime 1x).
func BenchmarkReplicationTLS(b *testing.B) {
	for i := 0; i < b.N; i++ {
		replicationTLSBench(b)
	}
}

type tlsPhase struct {
	name    string
	tls     bool
	rate    float64
	st      checkpoint.Stats
	protect time.Duration
}

func replicationTLSBench(b *testing.B) {
	q := qemuenv.QEMU11(b)
	kernel, initrd := guestImages(b)
	phaseLen := 8 * time.Second
	e := newPairEnv(b, q, kernel, initrd, 200*time.Millisecond, 2)
	e.log = nil // keep the table readable
	tlsEnv := newReplTLS(b)
	e.tls = tlsEnv // the primary gets its credentials folder
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	prim := e.bootPrimary(ctx) // hub port 0
	e.tls = nil
	w := startWriter(b, e.hub.ClientURL, 0)
	w.waitAcked(b, 5, 60*time.Second)
	rate := func() float64 {
		start, t0 := w.Acked(), time.Now()
		time.Sleep(phaseLen)
		return float64(w.Acked()-start) / time.Since(t0).Seconds()
	}
	base := rate()

	var phases []tlsPhase
	for i, encrypted := range []bool{false, true, false, true, false, true, false, true} {
		e.tls = nil
		if encrypted {
			e.tls = tlsEnv
		}
		t0 := time.Now()
		p := e.protect(ctx, prim, 1, false)
		took := time.Since(t0)
		p.waitCheckpoints(b, 3, 30*time.Second)
		p.obs.Reset()
		ph := tlsPhase{name: fmt.Sprintf("plaintext #%d", i/2+1), tls: encrypted, protect: took}
		if encrypted {
			ph.name = fmt.Sprintf("TLS #%d", i/2+1)
		}
		ph.rate = rate()
		ph.st = p.obs.Stats()
		phases = append(phases, ph)
		// The secondary goes; the primary runs on alone until the next protection.
		if err := p.secondary.Signal(syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		<-p.secondary.Exited()
		if _, err := checkpoint.FailoverAsPrimary(prim.QMP, p.gen).Run(ctx, nil, nil); err != nil {
			b.Fatalf("failover as primary after %s: %v\n%s", ph.name, err, prim.LogTail())
		}
		p.stopObs()
	}
	total := w.verify(b)
	tlsEnv.checkEncrypted(b, 4)

	var sb strings.Builder
	fmt.Fprintf(&sb, "\nreplication TLS benchmark: %s (TCG), guest %d MiB, x-checkpoint-delay 200 ms, one client connection writing back to back\n\n", q.Version, e.spec.MemoryMiB)
	fmt.Fprintf(&sb, "%-14s %10s %7s %12s %10s %10s %10s %12s %12s\n", "phase", "records/s", "ratio", "checkpoints", "pause p50", "pause p99", "pause avg", "bytes/ckpt", "to COLO")
	fmt.Fprintf(&sb, "%-14s %10.1f %7.2f %12s %10s %10s %10s %12s %12s\n", "unprotected", base, 1.0, "-", "-", "-", "-", "-", "-")
	var plain, enc []tlsPhase
	for _, ph := range phases {
		fmt.Fprintf(&sb, "%-14s %10.1f %7.2f %12d %10v %10v %10v %12d %12v\n", ph.name, ph.rate, ph.rate/base, ph.st.Checkpoints,
			ph.st.PauseP50.Round(100*time.Microsecond), ph.st.PauseP99.Round(100*time.Microsecond), ph.st.PauseAvg.Round(100*time.Microsecond),
			ph.st.BytesAvg, ph.protect.Round(time.Millisecond))
		if ph.tls {
			enc = append(enc, ph)
		} else {
			plain = append(plain, ph)
		}
	}
	// avg is the median over the phases.
	avg := func(ps []tlsPhase, f func(tlsPhase) float64) float64 {
		v := make([]float64, len(ps))
		for i, p := range ps {
			v[i] = f(p)
		}
		sort.Float64s(v)
		if n := len(v); n%2 == 0 {
			return (v[n/2-1] + v[n/2]) / 2
		}
		return v[len(v)/2]
	}
	ratio := func(f func(tlsPhase) float64) float64 { return avg(enc, f) / avg(plain, f) }
	p50 := ratio(func(p tlsPhase) float64 { return float64(p.st.PauseP50) })
	p99 := ratio(func(p tlsPhase) float64 { return float64(p.st.PauseP99) })
	pavg := ratio(func(p tlsPhase) float64 { return float64(p.st.PauseAvg) })
	bytes := ratio(func(p tlsPhase) float64 { return float64(p.st.BytesAvg) })
	thr := ratio(func(p tlsPhase) float64 { return p.rate })
	prot := ratio(func(p tlsPhase) float64 { return float64(p.protect) })
	fmt.Fprintf(&sb, "\nTLS / plaintext (medians of the %d phases each): pause p50 %.2f, p99 %.2f, mean %.2f; bytes per checkpoint %.3f; throughput %.2f; time to COLO %.2f\n",
		len(enc), p50, p99, pavg, bytes, thr, prot)
	meanTLS := time.Duration(avg(enc, func(p tlsPhase) float64 { return float64(p.st.PauseAvg) }))
	meanPlain := time.Duration(avg(plain, func(p tlsPhase) float64 { return float64(p.st.PauseAvg) }))
	mib := avg(enc, func(p tlsPhase) float64 { return float64(p.st.BytesAvg) }) / (1 << 20)
	fmt.Fprintf(&sb, "TLS adds %v to the median phase's mean pause, %.2f ms per MiB of checkpoint\n", (meanTLS - meanPlain).Round(10*time.Microsecond),
		float64(meanTLS-meanPlain)/float64(time.Millisecond)/mib)
	fmt.Fprintf(&sb, "records acknowledged: %d, lost: 0 (memory and disk checked), client connection kept across the eight protections\n", total)
	fmt.Fprint(os.Stdout, sb.String())
	b.ReportMetric(p50, "tls/plain-pause-p50")
	b.ReportMetric(p99, "tls/plain-pause-p99")
	b.ReportMetric(thr, "tls/plain-throughput")
	b.ReportMetric(bytes, "tls/plain-bytes")
}
