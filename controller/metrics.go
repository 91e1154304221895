package controller

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"
)

// pauseBuckets are the upper bounds (seconds) of the checkpoint pause histogram.
var pauseBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}

// failoverBuckets are the upper bounds (seconds) of the failover duration histogram.
var failoverBuckets = []float64{0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

type histogram struct {
	bounds  []float64
	buckets []uint64 // cumulative counts per bound, then +Inf
	sum     float64
	count   uint64
}

func newHistogram(bounds []float64) histogram {
	return histogram{bounds: bounds, buckets: make([]uint64, len(bounds)+1)}
}

func (h *histogram) observe(s float64) {
	h.sum += s
	h.count++
	for i, b := range h.bounds {
		if s <= b {
			h.buckets[i]++
		}
	}
	h.buckets[len(h.bounds)]++
}

func (h *histogram) write(b *strings.Builder, name, pair string) {
	for i, bound := range h.bounds {
		fmt.Fprintf(b, "%s_bucket{pair=%q,le=\"%g\"} %d\n", name, pair, bound, h.buckets[i])
	}
	fmt.Fprintf(b, "%s_bucket{pair=%q,le=\"+Inf\"} %d\n", name, pair, h.buckets[len(h.bounds)])
	fmt.Fprintf(b, "%s_sum{pair=%q} %g\n", name, pair, h.sum)
	fmt.Fprintf(b, "%s_count{pair=%q} %d\n", name, pair, h.count)
}

func (h *histogram) add(o histogram) {
	for i := range h.buckets {
		h.buckets[i] += o.buckets[i]
	}
	h.sum += o.sum
	h.count += o.count
}

// counters are one side's cumulative counts, kept across generations and failovers.
type counters struct {
	checkpoints uint64
	early       uint64
	pauses      histogram
	failovers   histogram
	failed      uint64 // failover sequences that failed
	qmpRefused  uint64 // QMP commands QEMU answered with an error
	qmpTimeouts uint64 // QMP commands past their deadline
}

func newCounters() counters {
	return counters{pauses: newHistogram(pauseBuckets), failovers: newHistogram(failoverBuckets)}
}

func (c *counters) add(o counters) {
	c.checkpoints += o.checkpoints
	c.early += o.early
	c.pauses.add(o.pauses)
	c.failovers.add(o.failovers)
	c.failed += o.failed
	c.qmpRefused += o.qmpRefused
	c.qmpTimeouts += o.qmpTimeouts
}

// pairMetrics are a side's counters, written by its observer and workers, read by WriteMetrics.
type pairMetrics struct {
	mu sync.Mutex
	c  counters
}

func newPairMetrics() *pairMetrics { return &pairMetrics{c: newCounters()} }

func (m *pairMetrics) checkpoint(pause time.Duration, early bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.c.checkpoints++
	if early {
		m.c.early++
	}
	m.c.pauses.observe(pause.Seconds())
}

// qmp adds QMP commands refused by QEMU and past their deadline.
func (m *pairMetrics) qmp(refused, timeouts uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.c.qmpRefused += refused
	m.c.qmpTimeouts += timeouts
}

func (m *pairMetrics) failover(took time.Duration, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.c.failovers.observe(took.Seconds())
	if !ok {
		m.c.failed++
	}
}

// MetricFamilies lists the metric families lockstepd exports (the names dashboards and alert
// rules may use; histograms also export their _bucket, _sum and _count series).
func MetricFamilies() []string {
	return []string{"lockstep_pair_state", "lockstep_failovers_total", "lockstep_checkpoints_total", "lockstep_checkpoint_pause_seconds",
		"lockstep_checkpoint_bytes", "lockstep_resync_bytes", "lockstep_resync_total_bytes", "lockstep_fencing_epoch",
		"lockstep_store_reachable", "lockstep_peer_reachable", "lockstep_failover_duration_seconds", "lockstep_store_queue_length",
		"lockstep_peer_auth_failures_total", "lockstep_qmp_errors_total", "lockstep_qmp_timeouts_total"}
}

// WriteMetrics writes, in Prometheus' text exposition format, the metrics of the pairs this
// agent runs a side of, as this agent sees them.
func (a *Agent) WriteMetrics(w io.Writer) {
	type row struct {
		st    Status
		m     counters
		queue int64
	}
	a.mu.Lock()
	rows := make([]row, 0, len(a.pairs))
	prs := make([]*pairRun, 0, len(a.pairs))
	for _, pr := range a.pairs {
		prs = append(prs, pr)
	}
	a.mu.Unlock()
	for _, pr := range prs {
		rw := row{st: pr.view.status(), m: newCounters()}
		for _, r := range pr.runners {
			if r == nil {
				continue
			}
			r.metrics.mu.Lock()
			rw.m.add(r.metrics.c)
			r.metrics.mu.Unlock()
			rw.queue += r.io.length.Load()
		}
		rows = append(rows, rw)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].st.Name < rows[j].st.Name })
	var b strings.Builder
	family := func(name, typ, help string) {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	bool01 := func(v bool) int {
		if v {
			return 1
		}
		return 0
	}
	family("lockstep_pair_state", "gauge", "Current state of each pair (1 for the state it is in).")
	states := []State{StateStopped, StateStarting, StateProtecting, StateProtected, StateDegraded, StateFailingOver, StateReprotecting, StateFailed}
	for _, r := range rows {
		for _, s := range states {
			fmt.Fprintf(&b, "lockstep_pair_state{pair=%q,state=%q} %d\n", r.st.Name, s, bool01(r.st.State == s))
		}
	}
	family("lockstep_failovers_total", "counter", "Failovers of each pair that this agent ran or asked for since it started.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_failovers_total{pair=%q} %d\n", r.st.Name, r.st.Failovers)
	}
	family("lockstep_checkpoints_total", "counter", "COLO checkpoints of each pair; early ones came from a packet mismatch.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_checkpoints_total{pair=%q,trigger=\"timer\"} %d\n", r.st.Name, r.m.checkpoints-r.m.early)
		fmt.Fprintf(&b, "lockstep_checkpoints_total{pair=%q,trigger=\"mismatch\"} %d\n", r.st.Name, r.m.early)
	}
	family("lockstep_checkpoint_pause_seconds", "histogram", "How long the primary was paused at each checkpoint (QEMU's STOP to RESUME).")
	for _, r := range rows {
		r.m.pauses.write(&b, "lockstep_checkpoint_pause_seconds", r.st.Name)
	}
	family("lockstep_checkpoint_bytes", "gauge", "Bytes the last checkpoint sent to the secondary.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_checkpoint_bytes{pair=%q} %d\n", r.st.Name, r.st.Checkpoints.BytesLast)
	}
	family("lockstep_resync_bytes", "gauge", "Bytes of the disk the running (or last) resync has copied.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_resync_bytes{pair=%q} %d\n", r.st.Name, max(r.st.ResyncOffset, 0))
	}
	family("lockstep_resync_total_bytes", "gauge", "Bytes the running (or last) disk resync has to copy.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_resync_total_bytes{pair=%q} %d\n", r.st.Name, max(r.st.ResyncLength, 0))
	}
	family("lockstep_fencing_epoch", "gauge", "The highest fencing epoch (lease epoch) this agent knows for the pair.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_fencing_epoch{pair=%q} %d\n", r.st.Name, r.st.Epoch)
	}
	family("lockstep_store_reachable", "gauge", "1 if this agent's side of the pair reached the coordination store at its last request.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_store_reachable{pair=%q} %d\n", r.st.Name, bool01(r.st.StoreReachable))
	}
	family("lockstep_peer_reachable", "gauge", "1 if the agent of the pair's other side answered within the heartbeat timeout.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_peer_reachable{pair=%q} %d\n", r.st.Name, bool01(r.st.PeerReachable))
	}
	family("lockstep_failover_duration_seconds", "histogram", "How long the failover sequences this agent ran took (failed ones included).")
	for _, r := range rows {
		r.m.failovers.write(&b, "lockstep_failover_duration_seconds", r.st.Name)
	}
	family("lockstep_store_queue_length", "gauge", "Store and peer requests of the pair's sides waiting in this agent (never dropped).")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_store_queue_length{pair=%q} %d\n", r.st.Name, r.queue)
	}
	family("lockstep_qmp_errors_total", "counter", "QMP commands to the pair's QEMUs that QEMU refused (answered with an error).")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_qmp_errors_total{pair=%q} %d\n", r.st.Name, r.m.qmpRefused)
	}
	family("lockstep_qmp_timeouts_total", "counter", "QMP commands to the pair's QEMUs that QEMU did not answer before their deadline.")
	for _, r := range rows {
		fmt.Fprintf(&b, "lockstep_qmp_timeouts_total{pair=%q} %d\n", r.st.Name, r.m.qmpTimeouts)
	}
	family("lockstep_peer_auth_failures_total", "counter", "Peer-link connections and requests this agent refused, by reason (peerauth.go).")
	counts := a.peerAuthCounts()
	for _, reason := range []string{authHandshake, authNoCert, authNotAPeer, authMismatch} {
		fmt.Fprintf(&b, "lockstep_peer_auth_failures_total{reason=%q} %d\n", reason, counts[reason])
	}
	io.WriteString(w, b.String())
}
