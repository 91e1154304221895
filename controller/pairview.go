package controller

import (
	"context"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp"
)

// pairView is what a pair's runner shows the outside: its status snapshot, the watch streams,
// and the checkpoint observer of its primary. The single-host runner and the two-host
// hostRunner both embed it; their run goroutine writes it, API calls and workers read it
// under mu.
type pairView struct {
	mu      sync.Mutex
	snap    Status
	subs    map[chan Event2]struct{}
	obs     *checkpoint.Observer
	obsStop func()
}

func newPairView(s Status) pairView {
	return pairView{snap: s, subs: map[chan Event2]struct{}{}}
}

// status returns a copy of the status.
func (v *pairView) status() Status {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := v.snap
	if s.Step != nil {
		e := *s.Step
		s.Step = &e
	}
	return s
}

// broadcast sends ev to every watcher; a watcher that falls behind loses events, the runner
// never waits.
func (v *pairView) broadcast(ev Event2) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for ch := range v.subs {
		select {
		case ch <- ev:
		default:
		}
	}
}

// watch returns a stream that starts with the current status; it closes when ctx ends or
// done closes (the runner stopped). wg owns the goroutine that waits for either.
func (v *pairView) watch(ctx context.Context, done <-chan struct{}, wg *sync.WaitGroup) <-chan Event2 {
	ch := make(chan Event2, 256)
	st := v.status()
	ch <- Event2{Kind: EventStatus, Time: time.Now(), Status: &st}
	v.mu.Lock()
	v.subs[ch] = struct{}{}
	v.mu.Unlock()
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case <-ctx.Done():
		case <-done:
		}
		v.mu.Lock()
		if _, ok := v.subs[ch]; ok {
			delete(v.subs, ch)
			close(ch)
		}
		v.mu.Unlock()
	}()
	return ch
}

// closeWatchers ends every stream (the runner is stopping).
func (v *pairView) closeWatchers() {
	v.mu.Lock()
	defer v.mu.Unlock()
	for ch := range v.subs {
		close(ch)
		delete(v.subs, ch)
	}
}

// progress publishes a step of a running sequence.
func (v *pairView) progress(ev checkpoint.StepEvent) {
	v.mu.Lock()
	if ev.Phase == checkpoint.StepStarted {
		e := ev
		v.snap.Step = &e
	} else if ev.Index == ev.Total || ev.Phase == checkpoint.StepFailed {
		v.snap.Step = nil
	}
	v.mu.Unlock()
	e := ev
	v.broadcast(Event2{Kind: EventStep, Time: time.Now(), Step: &e})
}

// resync publishes the disk resync's progress.
func (v *pairView) resync(off, l int64) {
	v.mu.Lock()
	v.snap.ResyncOffset, v.snap.ResyncLength = off, l
	v.mu.Unlock()
	v.broadcast(Event2{Kind: EventResync, Time: time.Now(), Resync: [2]int64{off, l}})
}

// runObserver runs obs over sub until the next runObserver or stopObserver; it may be called
// from a worker.
func (v *pairView) runObserver(obs *checkpoint.Observer, sub *qmp.Subscription) {
	octx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = obs.Run(octx, sub) }()
	v.mu.Lock()
	old := v.obsStop
	v.obs = obs
	v.obsStop = func() { cancel(); <-done; sub.Close(); obs.Close() }
	v.mu.Unlock()
	if old != nil {
		old()
	}
}

// setObserverDelay tells the running observer (if any) the new checkpoint delay.
func (v *pairView) setObserverDelay(d time.Duration) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.obs != nil {
		v.obs.SetDelay(d)
	}
}

func (v *pairView) stopObserver() {
	v.mu.Lock()
	stop := v.obsStop
	v.obs, v.obsStop = nil, nil
	v.mu.Unlock()
	if stop != nil {
		stop()
	}
}

// publishStats copies the observer's statistics into the status and the watch streams (once
// a second, from the run goroutine).
func (v *pairView) publishStats() {
	v.mu.Lock()
	obs := v.obs
	v.mu.Unlock()
	if obs == nil {
		return
	}
	st := obs.Stats()
	v.mu.Lock()
	v.snap.Checkpoints = st
	v.mu.Unlock()
	v.broadcast(Event2{Kind: EventCheckpoints, Time: time.Now(), Stats: &st})
}

// spawnLong runs one long action of a runner on its own goroutine, owned by wg, and hands its
// result to deliver. The action before it, whose cancel is in *cur, is cancelled first: a
// runner runs one long action at a time.
func spawnLong[T any](cur *context.CancelFunc, wg *sync.WaitGroup, ctx context.Context, f func(context.Context) T, deliver func(context.Context, T)) {
	if *cur != nil {
		(*cur)()
	}
	wctx, cancel := context.WithCancel(ctx)
	*cur = cancel
	wg.Add(1)
	go func() {
		defer wg.Done()
		deliver(wctx, f(wctx))
	}()
}
