package checkpoint

import (
	"context"
	"os"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lockstepvm/lockstep/qmp"
)

// Observer turns the primary's QMP events into checkpoint statistics. During COLO every
// checkpoint stops the primary and resumes it: a STOP then a RESUME event, whose QEMU timestamps
// give the pause. A checkpoint that starts sooner than EarlyFraction of the checkpoint delay after
// the start of the previous one came early (colo-compare found a mismatch, or the delay was changed); the
// others came on the timer.
//
// Bytes per checkpoint come from TCP_INFO of the migration socket when the caller opened it
// (ProtectConfig.DialMigration) and handed a copy to SetMigrationSocket: the bytes acknowledged
// by the secondary between two resumes.
//
// The Reason of each checkpoint (Stats.ByReason, OnCheckpointInfo) comes from a CauseTrace of
// the primary when one is set (SetCauseTrace): at every STOP the observer reads what QEMU
// traced since the previous checkpoint's flush up to this checkpoint's request, and a
// mismatch, a compare_timeout or a UDP/ICMP difference there is the reason. Without one, or
// when the trace names nothing, the clock decides: timer, or request (NoteRequest), or for an
// early checkpoint mismatch (a trace at TraceBasic that shows nothing else) or unknown.
type Observer struct {
	mu       sync.Mutex
	delay    time.Duration
	colo     bool
	stopAt   time.Time
	lastStop time.Time // start of the previous checkpoint
	// lastStopPrev is the start of the one before (for CheckpointInfo.Since).
	lastStopPrev time.Time
	lastEnd      time.Time
	count        uint64
	early        uint64
	pauses       []time.Duration // ring of the last window pauses
	next         int
	times        []time.Time // ring of checkpoint start times, for the rate
	sock         *os.File
	lastAcked    uint64
	bytesLast    uint64
	bytesSum     uint64
	coloExit     *qmp.ColoExitData
	onCkpt       func(pause time.Duration, early bool)
	onInfo       func(CheckpointInfo)

	trace      *CauseTrace
	traceErr   error
	win        traceWindow // since the last flush
	discarding bool        // between a request and its flush: QEMU drops what comes then
	// The trace's verdict on the checkpoint under way (set at its STOP).
	stopTraced bool
	stopReason Reason
	stopDetail string
	requested  bool
	byReason   map[Reason]uint64
	lastReason Reason
	lastDetail string
	drops      uint64
}

// CheckpointInfo describes one completed checkpoint.
type CheckpointInfo struct {
	// Start is the STOP event's time; Pause the time to the RESUME.
	Start time.Time
	Pause time.Duration
	// Since is the time since the previous checkpoint's start (0 for the first of a COLO run).
	Since time.Duration
	// Early is the clock's verdict: sooner than EarlyFraction of the delay.
	Early bool
	// Reason is why it happened; Detail says more where the trace does (the sizes of the TCP
	// frames that differed).
	Reason Reason
	Detail string
	// Bytes is the migration traffic of the checkpoint, 0 without a migration socket copy.
	Bytes uint64
}

// OnCheckpointInfo sets a function called (under the observer's lock: it must not block) at the
// end of every checkpoint with what the observer knows of it, for cumulative metrics such as
// lockstep_checkpoints_total{reason}.
func (o *Observer) OnCheckpointInfo(f func(CheckpointInfo)) {
	o.mu.Lock()
	o.onInfo = f
	o.mu.Unlock()
}

// SetCauseTrace gives the observer the primary's cause trace to read at every checkpoint (nil
// to stop reading one). The caller keeps it, and stops it when it ends the observer.
func (o *Observer) SetCauseTrace(t *CauseTrace) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.trace, o.traceErr = t, nil
	o.win, o.discarding, o.stopTraced = traceWindow{}, false, false
}

// NoteRequest tells the observer that the agent asked QEMU for a checkpoint (a change of
// x-checkpoint-delay makes it checkpoint at once): the next checkpoint that the trace does not
// explain has ReasonRequest.
func (o *Observer) NoteRequest() {
	o.mu.Lock()
	o.requested = true
	o.mu.Unlock()
}

// readTraceLocked feeds the new trace lines; it reports whether a checkpoint request was among
// them, and the verdict on the last one.
func (o *Observer) readTraceLocked() (bool, Reason, string) {
	if o.trace == nil {
		return false, "", ""
	}
	evs, err := o.trace.Read()
	if err != nil {
		o.traceErr = err
	}
	found := false
	var reason Reason
	var detail string
	for _, ev := range evs {
		if o.discarding {
			if ev.Name == TraceReceiveMessage && ev.Message == "vmstate-received" {
				o.discarding = false
				o.win = traceWindow{}
			}
			continue
		}
		request, flushed := o.win.feed(ev)
		switch {
		case request:
			found = true
			reason, detail = o.win.reason()
			o.drops += uint64(o.win.drops)
			o.discarding = true
		case flushed:
			// A flush without the request seen (the trace started mid-checkpoint).
			o.drops += uint64(o.win.drops)
			o.win = traceWindow{}
		}
	}
	return found, reason, detail
}

// OnCheckpoint sets a function called (under the observer's lock: it must not block) at the end
// of every checkpoint, for cumulative metrics.
func (o *Observer) OnCheckpoint(f func(pause time.Duration, early bool)) {
	o.mu.Lock()
	o.onCkpt = f
	o.mu.Unlock()
}

// EarlyFraction of the checkpoint delay separates early checkpoints from timer ones.
const EarlyFraction = 0.9

const window = 4096

// NewObserver returns an observer for a pair whose checkpoint delay is delay.
func NewObserver(delay time.Duration) *Observer { return &Observer{delay: delay} }

// SetDelay records a new checkpoint delay.
func (o *Observer) SetDelay(d time.Duration) {
	o.mu.Lock()
	o.delay = d
	o.mu.Unlock()
}

// SetMigrationSocket gives the observer its own copy of the migration socket. The observer
// closes it when replaced or on Close.
func (o *Observer) SetMigrationSocket(f *os.File) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.sock != nil {
		o.sock.Close()
	}
	o.sock = f
	o.lastAcked = o.ackedLocked()
}

// Reset clears the statistics (not the COLO state or the socket), to measure a new window.
func (o *Observer) Reset() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.count, o.early, o.next = 0, 0, 0
	o.pauses, o.times = nil, nil
	o.byReason, o.drops = nil, 0
	o.bytesSum, o.bytesLast = 0, 0
	o.lastStop, o.lastStopPrev = time.Time{}, time.Time{}
}

// Close releases the migration socket copy.
func (o *Observer) Close() {
	o.SetMigrationSocket(nil)
}

func (o *Observer) ackedLocked() uint64 {
	if o.sock == nil {
		return 0
	}
	info, err := unix.GetsockoptTCPInfo(int(o.sock.Fd()), unix.IPPROTO_TCP, unix.TCP_INFO)
	if err != nil {
		return 0
	}
	return info.Bytes_acked
}

// Events is the list of events the observer wants.
var ObserverEvents = []string{qmp.EventStop, qmp.EventResume, qmp.EventMigration, qmp.EventColoExit}

// Observe feeds one event.
func (o *Observer) Observe(ev *qmp.Event) {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch ev.Name {
	case qmp.EventMigration:
		var d qmp.MigrationEventData
		if ev.DecodeData(&d) == nil {
			if d.Status == qmp.MigrationColo {
				o.colo = true
				o.lastEnd = ev.Time
				o.lastStop, o.lastStopPrev = time.Time{}, time.Time{}
				o.lastAcked = o.ackedLocked()
			} else if d.Status == qmp.MigrationCompleted || d.Status == qmp.MigrationFailed {
				o.colo = false
			}
		}
	case qmp.EventColoExit:
		var d qmp.ColoExitData
		if ev.DecodeData(&d) == nil {
			o.coloExit = &d
		}
		o.colo = false
	case qmp.EventStop:
		if o.colo {
			o.stopAt = ev.Time
			o.stopTraced, o.stopReason, o.stopDetail = o.readTraceLocked()
		}
	case qmp.EventResume:
		if !o.colo || o.stopAt.IsZero() {
			return
		}
		pause := ev.Time.Sub(o.stopAt)
		// QEMU's checkpoint timer runs from the start of one checkpoint to the start of the next.
		early := !o.lastStop.IsZero() && o.stopAt.Sub(o.lastStop) < time.Duration(float64(o.delay)*EarlyFraction)
		if early {
			o.early++
		}
		reason, detail := o.reasonLocked(early)
		if o.byReason == nil {
			o.byReason = map[Reason]uint64{}
		}
		o.byReason[reason]++
		o.lastReason, o.lastDetail = reason, detail
		if o.onCkpt != nil {
			o.onCkpt(pause, early)
		}
		o.lastStopPrev, o.lastStop = o.lastStop, o.stopAt
		o.count++
		if len(o.pauses) < window {
			o.pauses = append(o.pauses, pause)
			o.times = append(o.times, o.stopAt)
		} else {
			o.pauses[o.next] = pause
			o.times[o.next] = o.stopAt
			o.next = (o.next + 1) % window
		}
		o.lastEnd = ev.Time
		o.stopAt = time.Time{}
		var since time.Duration
		if !o.lastStopPrev.IsZero() {
			since = o.lastStop.Sub(o.lastStopPrev)
		}
		var bytes uint64
		if o.sock != nil {
			acked := o.ackedLocked()
			o.bytesLast = acked - o.lastAcked
			o.bytesSum += o.bytesLast
			o.lastAcked = acked
			bytes = o.bytesLast
		}
		if o.onInfo != nil {
			o.onInfo(CheckpointInfo{Start: o.lastStop, Pause: pause, Since: since, Early: early, Reason: reason, Detail: detail, Bytes: bytes})
		}
	}
}

// reasonLocked decides the reason of the checkpoint ending now: the trace's verdict, else the
// agent's request, else the clock.
func (o *Observer) reasonLocked(early bool) (Reason, string) {
	traced, reason, detail := o.stopTraced, o.stopReason, o.stopDetail
	o.stopTraced, o.stopReason, o.stopDetail = false, "", ""
	requested := o.requested
	o.requested = false
	switch {
	case traced && reason != "":
		return reason, detail
	case requested:
		return ReasonRequest, ""
	case !early:
		return ReasonTimer, ""
	case traced && o.trace.Level() == TraceBasic:
		return ReasonMismatch, ""
	}
	return ReasonUnknown, ""
}

// Run feeds the observer from a subscription until ctx ends or the subscription does.
func (o *Observer) Run(ctx context.Context, sub *qmp.Subscription) error {
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			return err
		}
		o.Observe(ev)
	}
}

// Stats are the checkpoint statistics of a pair.
type Stats struct {
	Checkpoints uint64
	Early       uint64 // came sooner than the delay: a packet mismatch
	Timer       uint64
	// Rate is checkpoints per second over the recent window.
	Rate                                   float64
	PauseP50, PauseP99, PauseMax, PauseAvg time.Duration
	Last                                   time.Time
	// BytesLast and BytesAvg are migration bytes per checkpoint; 0 without a socket copy.
	BytesLast, BytesAvg uint64
	InColo              bool
	ColoExit            *qmp.ColoExitData
	// ByReason counts the checkpoints of each reason; LastReason and LastDetail are the latest
	// checkpoint's.
	ByReason   map[Reason]uint64
	LastReason Reason
	LastDetail string
	// CompareDrops counts the packets colo-compare dropped because a queue was full (cause
	// trace only).
	CompareDrops uint64
	// TraceErr is the last error reading the cause trace.
	TraceErr error
}

// Stats returns the current statistics.
func (o *Observer) Stats() Stats {
	o.mu.Lock()
	defer o.mu.Unlock()
	st := Stats{Checkpoints: o.count, Early: o.early, Timer: o.count - o.early, Last: o.lastEnd, InColo: o.colo, ColoExit: o.coloExit, BytesLast: o.bytesLast,
		LastReason: o.lastReason, LastDetail: o.lastDetail, CompareDrops: o.drops, TraceErr: o.traceErr}
	if len(o.byReason) > 0 {
		st.ByReason = make(map[Reason]uint64, len(o.byReason))
		for r, n := range o.byReason {
			st.ByReason[r] = n
		}
	}
	if o.count > 0 {
		st.BytesAvg = o.bytesSum / o.count
	}
	if len(o.pauses) == 0 {
		return st
	}
	sorted := append([]time.Duration(nil), o.pauses...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	var sum time.Duration
	for _, p := range sorted {
		sum += p
	}
	st.PauseAvg = sum / time.Duration(len(sorted))
	st.PauseP50 = percentile(sorted, 0.50)
	st.PauseP99 = percentile(sorted, 0.99)
	st.PauseMax = sorted[len(sorted)-1]
	if len(o.times) > 1 {
		first, last := o.times[0], o.times[0]
		for _, t := range o.times {
			if t.Before(first) {
				first = t
			}
			if t.After(last) {
				last = t
			}
		}
		if span := last.Sub(first); span > 0 {
			st.Rate = float64(len(o.times)-1) / span.Seconds()
		}
	}
	return st
}

// Pauses returns the pauses of the recent window, oldest first.
func (o *Observer) Pauses() []time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.pauses) < window {
		return append([]time.Duration(nil), o.pauses...)
	}
	return append(append([]time.Duration(nil), o.pauses[o.next:]...), o.pauses[:o.next]...)
}

// percentile of sorted values, nearest rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	idx := int(float64(len(sorted))*p+0.5) - 1
	if idx < 0 {
		idx = 0
	}
	if idx >= len(sorted) {
		idx = len(sorted) - 1
	}
	return sorted[idx]
}
