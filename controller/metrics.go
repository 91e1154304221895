package controller

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// pauseBuckets are the upper bounds (seconds) of the checkpoint pause histogram.
var pauseBuckets = []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}

// pairMetrics are a pair's cumulative counters, kept across generations and failovers.
type pairMetrics struct {
	mu          sync.Mutex
	checkpoints uint64
	early       uint64
	buckets     []uint64 // cumulative counts per bound, then +Inf
	pauseSum    float64
}

func newPairMetrics() *pairMetrics {
	return &pairMetrics{buckets: make([]uint64, len(pauseBuckets)+1)}
}

func (m *pairMetrics) checkpoint(pause time.Duration, early bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.checkpoints++
	if early {
		m.early++
	}
	s := pause.Seconds()
	m.pauseSum += s
	for i, b := range pauseBuckets {
		if s <= b {
			m.buckets[i]++
		}
	}
	m.buckets[len(pauseBuckets)]++
}

// WriteMetrics writes the agent's metrics in Prometheus' text exposition format.
func (a *Agent) WriteMetrics(w io.Writer) { writeMetrics(w, a.List(), a.metricsByPair()) }

// WriteMetrics writes, in Prometheus' text exposition format, the metrics of the pairs this
// host runs a side of, as this host sees them.
func (a *ClusterAgent) WriteMetrics(w io.Writer) {
	a.mu.Lock()
	rs := slices.Collect(maps.Values(a.runners))
	a.mu.Unlock()
	statuses := make([]Status, 0, len(rs))
	ms := make(map[string]*pairMetrics, len(rs))
	for _, r := range rs {
		statuses = append(statuses, r.status())
		ms[r.name] = r.metrics
	}
	sort.Slice(statuses, func(i, j int) bool { return statuses[i].Name < statuses[j].Name })
	writeMetrics(w, statuses, ms)
}

func writeMetrics(w io.Writer, statuses []Status, ms map[string]*pairMetrics) {
	var b strings.Builder
	b.WriteString("# HELP lockstep_pair_state Current state of each pair (1 for the state it is in).\n# TYPE lockstep_pair_state gauge\n")
	states := []State{StateStopped, StateStarting, StateProtecting, StateProtected, StateDegraded, StateFailingOver, StateReprotecting, StateFailed}
	for _, st := range statuses {
		for _, s := range states {
			v := 0
			if st.State == s {
				v = 1
			}
			fmt.Fprintf(&b, "lockstep_pair_state{pair=%q,state=%q} %d\n", st.Name, s, v)
		}
	}
	b.WriteString("# HELP lockstep_failovers_total Failovers of each pair since the agent started it or adopted it.\n# TYPE lockstep_failovers_total counter\n")
	for _, st := range statuses {
		fmt.Fprintf(&b, "lockstep_failovers_total{pair=%q} %d\n", st.Name, st.Failovers)
	}
	b.WriteString("# HELP lockstep_checkpoints_total COLO checkpoints of each pair; early ones came from a packet mismatch.\n# TYPE lockstep_checkpoints_total counter\n")
	names := make([]string, 0, len(ms))
	for n := range ms {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		m := ms[n]
		m.mu.Lock()
		fmt.Fprintf(&b, "lockstep_checkpoints_total{pair=%q,trigger=\"timer\"} %d\n", n, m.checkpoints-m.early)
		fmt.Fprintf(&b, "lockstep_checkpoints_total{pair=%q,trigger=\"mismatch\"} %d\n", n, m.early)
		m.mu.Unlock()
	}
	b.WriteString("# HELP lockstep_checkpoint_pause_seconds How long the primary was paused at each checkpoint (QEMU's STOP to RESUME).\n# TYPE lockstep_checkpoint_pause_seconds histogram\n")
	for _, n := range names {
		m := ms[n]
		m.mu.Lock()
		for i, bound := range pauseBuckets {
			fmt.Fprintf(&b, "lockstep_checkpoint_pause_seconds_bucket{pair=%q,le=\"%g\"} %d\n", n, bound, m.buckets[i])
		}
		fmt.Fprintf(&b, "lockstep_checkpoint_pause_seconds_bucket{pair=%q,le=\"+Inf\"} %d\n", n, m.buckets[len(pauseBuckets)])
		fmt.Fprintf(&b, "lockstep_checkpoint_pause_seconds_sum{pair=%q} %g\n", n, m.pauseSum)
		fmt.Fprintf(&b, "lockstep_checkpoint_pause_seconds_count{pair=%q} %d\n", n, m.checkpoints)
		m.mu.Unlock()
	}
	io.WriteString(w, b.String())
}

func (a *Agent) metricsByPair() map[string]*pairMetrics {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]*pairMetrics, len(a.pairs))
	for n, r := range a.pairs {
		out[n] = r.metrics
	}
	return out
}

// MetricFamilies lists the metric families lockstepd exports (the names dashboards and alert
// rules may use; histograms also export their _bucket, _sum and _count series).
func MetricFamilies() []string {
	return []string{"lockstep_pair_state", "lockstep_failovers_total", "lockstep_checkpoints_total", "lockstep_checkpoint_pause_seconds"}
}
