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
type Observer struct {
	mu        sync.Mutex
	delay     time.Duration
	colo      bool
	stopAt    time.Time
	lastStop  time.Time // start of the previous checkpoint
	lastEnd   time.Time
	count     uint64
	early     uint64
	pauses    []time.Duration // ring of the last window pauses
	next      int
	times     []time.Time // ring of checkpoint start times, for the rate
	sock      *os.File
	lastAcked uint64
	bytesLast uint64
	bytesSum  uint64
	coloExit  *qmp.ColoExitData
	onCkpt    func(pause time.Duration, early bool)
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
	o.bytesSum, o.bytesLast = 0, 0
	o.lastStop = time.Time{}
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
				o.lastStop = time.Time{}
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
		if o.onCkpt != nil {
			o.onCkpt(pause, early)
		}
		o.lastStop = o.stopAt
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
		if o.sock != nil {
			acked := o.ackedLocked()
			o.bytesLast = acked - o.lastAcked
			o.bytesSum += o.bytesLast
			o.lastAcked = acked
		}
	}
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
}

// Stats returns the current statistics.
func (o *Observer) Stats() Stats {
	o.mu.Lock()
	defer o.mu.Unlock()
	st := Stats{Checkpoints: o.count, Early: o.early, Timer: o.count - o.early, Last: o.lastEnd, InColo: o.colo, ColoExit: o.coloExit, BytesLast: o.bytesLast}
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
