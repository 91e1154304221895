package controller

import (
	"context"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// Status is a pair's status as the API reports it: the view of this agent, which runs one or
// both of the pair's sides.
type Status struct {
	Name        string
	State       State
	Reason      string
	PrimarySide Side
	// PrimaryHost and SecondaryHost name the agents (hosts) of the sides that run the primary
	// and the secondary; SecondaryHost is empty while unprotected.
	PrimaryHost   string
	SecondaryHost string
	Generation    int
	Failovers     int
	// ColoMode per side: none, primary or secondary for a running QEMU; "" when none runs here
	// (or the side is another host's).
	ColoMode [2]string
	// QEMUVersion per side ("" when no QEMU runs there or the side is another host's).
	QEMUVersion    [2]string
	Checkpoints    checkpoint.Stats
	ResyncOffset   int64
	ResyncLength   int64
	Step           *checkpoint.StepEvent // the step running now, if any
	LastFailover   *FailoverRecord
	AutoReprotect  bool
	CheckpointTime time.Duration
	// Changed is when the state last changed.
	Changed time.Time
	// Epoch is the highest fencing epoch this agent knows for the pair.
	Epoch uint64
	// StoreReachable and PeerReachable say whether this agent's side reached the store and the
	// other side's agent at their last exchange; LastHeartbeat is when that exchange was.
	StoreReachable bool
	PeerReachable  bool
	LastHeartbeat  time.Time
	// Roles of the two sides as their policies name them ("" for a side of another host).
	Roles [2]Role
	// Local says which sides run in this agent.
	Local [2]bool
	// Link is the migration link's state as the primary's side reads it.
	Link LinkState
}

// FailoverRecord describes a failover.
type FailoverRecord struct {
	At         time.Time
	Why        string
	Sequence   string
	Took       time.Duration
	FailedStep string
	Error      string
	Trigger    pb.FailoverTrigger
}

// EventKind says what a WatchEvent carries.
type EventKind string

// Kinds of watch events.
const (
	EventStatus      EventKind = "status"
	EventState       EventKind = "state"
	EventStep        EventKind = "step"
	EventCheckpoints EventKind = "checkpoints"
	EventResync      EventKind = "resync"
	EventFailover    EventKind = "failover"
)

// WatchEvent is one event of a pair's watch stream.
type WatchEvent struct {
	Kind     EventKind
	Time     time.Time
	Status   *Status               // EventStatus
	From, To State                 // EventState
	Reason   string                // EventState
	Step     *checkpoint.StepEvent // EventStep
	Stats    *checkpoint.Stats     // EventCheckpoints
	Resync   [2]int64              // EventResync: offset, length
	Failover *FailoverRecord       // EventFailover
}

// sideSnap is what one side's runner publishes of itself; the run goroutine writes it, under
// the pair view's lock.
type sideSnap struct {
	role         Role
	why          string
	epoch        uint64
	gen          int
	colo, fenced bool
	marked       bool // a primary's record says what it runs (a protection is complete once it does)
	storeOK      bool
	peerOK       bool
	peer         PeerView
	lastHB       time.Time
	running      bool
	version      string
	link         LinkState
	checkpoints  checkpoint.Stats
	hasStats     bool
}

// pairView is what this agent shows of one pair: the snapshots of the sides it runs, merged
// into one Status, and the watch streams. Every runner of the pair in this agent writes to it;
// API calls read it.
type pairView struct {
	mu    sync.Mutex
	name  string
	cfg   PairConfig
	sides [2]*sideSnap // nil for a side of another host
	subs  map[chan WatchEvent]struct{}

	state        State
	reason       string
	changed      time.Time
	step         *checkpoint.StepEvent
	resync       [2]int64
	lastFailover *FailoverRecord
	failovers    int
}

func newPairView(pc PairConfig, local [2]bool) *pairView {
	v := &pairView{name: pc.Spec.Name, cfg: pc, subs: map[chan WatchEvent]struct{}{}, state: StateStopped}
	for i := range local {
		if local[i] {
			v.sides[i] = &sideSnap{role: RoleIdle}
		}
	}
	return v
}

// mainSide picks the side whose view speaks for the pair: the local side that runs the VM, else
// a local side that is a secondary or joining, else the first local side.
func (v *pairView) mainSide() Side {
	for i, s := range v.sides {
		if s != nil && runsVM(s.role) {
			return Side(i)
		}
	}
	for i, s := range v.sides {
		if s != nil && (s.role == RoleSecondary || s.role == RoleJoining) {
			return Side(i)
		}
	}
	if v.sides[0] == nil {
		return SideB
	}
	return SideA
}

// statusLocked merges the sides' snapshots; v.mu is held.
func (v *pairView) statusLocked() Status {
	m := v.mainSide()
	s := v.sides[m]
	st := Status{Name: v.name, State: v.state, Reason: v.reason, Changed: v.changed, LastFailover: v.lastFailover,
		Failovers: v.failovers, ResyncOffset: v.resync[0], ResyncLength: v.resync[1], AutoReprotect: !v.cfg.NoAutoReprotect,
		CheckpointTime: v.cfg.Spec.Tunables.CheckpointDelay}
	if v.step != nil {
		e := *v.step
		st.Step = &e
	}
	for i, ss := range v.sides {
		if ss == nil {
			continue
		}
		st.Local[i] = true
		st.Roles[i] = ss.role
		st.Epoch = max(st.Epoch, ss.epoch)
		if ss.running {
			st.QEMUVersion[i] = ss.version
			switch {
			case ss.colo && runsVM(ss.role):
				st.ColoMode[i] = "primary"
			case ss.colo:
				st.ColoMode[i] = "secondary"
			default:
				st.ColoMode[i] = "none"
			}
		}
	}
	st.StoreReachable, st.PeerReachable, st.LastHeartbeat, st.Link = s.storeOK, s.peerOK, s.lastHB, s.link
	if v.sides[m.Other()] != nil {
		// Both sides run here: the peer is this agent itself.
		st.PeerReachable = true
	}
	me, other := v.cfg.Sides[m].Agent, v.cfg.Sides[m.Other()].Agent
	switch {
	case runsVM(s.role):
		st.PrimarySide, st.PrimaryHost, st.Generation = m, me, s.gen
		if s.colo {
			st.SecondaryHost = other
		}
	case s.role == RoleSecondary || s.role == RoleJoining:
		st.PrimarySide, st.PrimaryHost, st.SecondaryHost, st.Generation = m.Other(), other, me, s.gen
	case s.peerOK && runsVM(s.peer.Role):
		st.PrimarySide, st.PrimaryHost, st.Generation = m.Other(), other, s.peer.Gen
		if s.peer.Colo {
			st.SecondaryHost = me
		}
	default:
		st.Generation = s.gen
	}
	if st.State == StateProtected {
		for _, ss := range v.sides {
			if ss != nil && ss.hasStats {
				st.Checkpoints = ss.checkpoints
			}
		}
	}
	return st
}

func (v *pairView) status() Status {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.statusLocked()
}

// pairState is the pair's state as the side's snapshot s tells it.
func pairState(s *sideSnap) State {
	switch s.role {
	case RoleBooting:
		return StateStarting
	case RolePrimary:
		if s.fenced {
			return StateFailingOver
		}
		switch {
		case s.colo && !s.marked:
			// In COLO, but the record does not say so yet: the secondary could not take over.
			if s.gen > 1 {
				return StateReprotecting
			}
			return StateProtecting
		case s.colo:
			return StateProtected
		}
		return StateDegraded
	case RoleProtecting:
		if s.gen > 1 {
			return StateReprotecting
		}
		return StateProtecting
	case RoleJoining:
		if s.gen > 1 {
			return StateReprotecting
		}
		return StateProtecting
	case RoleSecondary:
		return StateProtected
	case RoleAlone, RoleTakingOver, RoleHandingOver:
		return StateFailingOver
	case RoleFailed:
		return StateFailed
	}
	// Idle here: the peer's state, if it runs the VM.
	if s.peerOK {
		switch s.peer.Role {
		case RolePrimary:
			if s.peer.Colo {
				return StateProtected
			}
			return StateDegraded
		case RoleProtecting:
			return StateReprotecting
		case RoleAlone, RoleTakingOver, RoleHandingOver:
			return StateFailingOver
		}
	}
	return StateStopped
}

// update stores a side's snapshot and tells watchers if the pair's state changed.
func (v *pairView) update(side Side, s sideSnap) {
	v.mu.Lock()
	old := v.sides[side]
	if old != nil {
		s.checkpoints, s.hasStats = old.checkpoints, old.hasStats
	}
	v.sides[side] = &s
	m := v.mainSide()
	ms := v.sides[m]
	state := pairState(ms)
	from := v.state
	changed := state != from
	if changed || ms.why != "" {
		v.reason = ms.why
	}
	if changed {
		v.state, v.changed = state, time.Now()
	}
	if state != StateProtected {
		for _, ss := range v.sides {
			if ss != nil {
				ss.checkpoints, ss.hasStats = checkpoint.Stats{}, false
			}
		}
	}
	why := v.reason
	v.mu.Unlock()
	if changed {
		v.broadcast(WatchEvent{Kind: EventState, Time: time.Now(), From: from, To: state, Reason: why})
	}
}

// setConfig replaces the pair's config (tunables changed).
func (v *pairView) setConfig(pc PairConfig) {
	v.mu.Lock()
	v.cfg = pc
	v.mu.Unlock()
}

func (v *pairView) config() PairConfig {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.cfg
}

// broadcast sends ev to every watcher; a watcher that falls behind loses events, the runner
// never waits.
func (v *pairView) broadcast(ev WatchEvent) {
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
// done closes (the pair went away). wg owns the goroutine that waits for either.
func (v *pairView) watch(ctx context.Context, done <-chan struct{}, wg *sync.WaitGroup) <-chan WatchEvent {
	ch := make(chan WatchEvent, 256)
	v.mu.Lock()
	st := v.statusLocked()
	ch <- WatchEvent{Kind: EventStatus, Time: time.Now(), Status: &st}
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

// closeWatchers ends every stream (the pair is going away).
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
		v.step = &e
	} else if ev.Index == ev.Total || ev.Phase == checkpoint.StepFailed {
		v.step = nil
	}
	v.mu.Unlock()
	e := ev
	v.broadcast(WatchEvent{Kind: EventStep, Time: time.Now(), Step: &e})
}

// resyncProgress publishes the disk resync's progress.
func (v *pairView) resyncProgress(off, l int64) {
	v.mu.Lock()
	v.resync = [2]int64{off, l}
	v.mu.Unlock()
	v.broadcast(WatchEvent{Kind: EventResync, Time: time.Now(), Resync: [2]int64{off, l}})
}

// failover publishes a failover record.
func (v *pairView) failover(rec *FailoverRecord) {
	v.mu.Lock()
	v.lastFailover = rec
	v.failovers++
	v.mu.Unlock()
	v.broadcast(WatchEvent{Kind: EventFailover, Time: time.Now(), Failover: rec})
}

// stats publishes a side's checkpoint statistics.
func (v *pairView) stats(side Side, st checkpoint.Stats) {
	v.mu.Lock()
	if s := v.sides[side]; s != nil {
		s.checkpoints, s.hasStats = st, true
	}
	v.mu.Unlock()
	v.broadcast(WatchEvent{Kind: EventCheckpoints, Time: time.Now(), Stats: &st})
}
