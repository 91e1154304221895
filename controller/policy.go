package controller

import (
	"fmt"
)

// This file is the policy of one side of a pair (DESIGN.md, principle 2: never two primaries).
// It is pure: events in, actions out, logical time in ticks; no I/O, no clock, no goroutines,
// and its state changes only inside Step. Each side of each pair has one, run by the runner of
// the agent whose host the side's placement names; the two sides talk through the peer link
// (heartbeats, prepare, tear-down, hand-over), and both talk to the coordination store, which
// holds the pair's primary lease and primary record.
//
// Why a QEMU may outlive its agent (read against QEMU 11.1's migration/colo.c and
// net/colo-compare.c; the agent's notes in DESIGN.md give the code):
//   - A primary in COLO sends its guest's IPv4 output through colo-compare, which releases a
//     packet only when the secondary produced the same packet, or at the end of a checkpoint
//     the secondary completed. Without its secondary (dead, unreachable, or failed over), a
//     COLO primary releases no IPv4 packet, whatever its agent does or does not do.
//   - A secondary in COLO sends its guest's output only to the primary's colo-compare, and
//     never fails over by itself: only x-colo-lost-heartbeat, which only an agent issues, takes
//     it out of COLO.
//   - So the lease has to guard only the decisions that take a side out of COLO (failover as
//     primary: ActGoAlone; failover as secondary: ActTakeOver), each a store transaction under
//     the lease's epoch (the primary record is written first, or nothing happens), and a
//     primary's running alone (it freezes when it cannot renew). A QEMU left in COLO by a dead
//     agent stays harmless; a primary left running alone by a dead agent is the only copy of
//     the VM, and the record (Colo false) keeps the peer from ever taking over from it.
//   - The case that breaks the first point: colo-compare passes frames it does not compare
//     (everything but IPv4: ARP, IPv6) straight out. A COLO primary whose agent is gone can
//     release such frames until its QEMU stops trying to checkpoint. The peer therefore takes
//     over from such a primary only once the migration link has gone quiet or closed (its QEMU
//     receives no checkpoints), and a primary whose agent lives freezes before its lease can
//     lapse, as before.
//
// The rules it keeps:
//   - A side takes a decision that takes it out of COLO only under the lease, after the store
//     wrote the primary record of that decision (ActTakeOver, ActGoAlone carry it).
//   - A primary releases output alone only while it holds the lease: one whose last
//     acknowledged renewal was sent LeaseTTL-FenceMargin ticks ago freezes its QEMU (SIGSTOP)
//     unless its secondary confirmed, in a heartbeat whose request was sent less than
//     HeartbeatTimeout-FenceMargin ticks ago, that it cannot reach the store either and is
//     still in COLO with it. A COLO primary whose migration link is active needs neither: its
//     secondary does not take over while checkpoints arrive. Once its link goes quiet or
//     closes, it freezes by the same rule (that stops the frames colo-compare does not hold).
//   - A secondary never confirms while it reaches the store, and takes over no sooner than
//     HeartbeatTimeout ticks after the last confirmation it gave.
//   - A secondary takes over only after the store granted it the lease, only if the record says
//     its primary was in COLO with it, and never on the loss of agent heartbeats alone while
//     its own QEMU still receives checkpoints (the migration link is active).
//   - A primary whose own QEMU died hands the lease over at once (fast path); a dead host's
//     lease expires (slow path).
//   - A frozen primary resumes only if it gets the lease back and the record says nobody ran
//     the VM since; otherwise its VM is stale and is killed.
//   - Time comes from ticks. A tick that reports missed ticks (the agent was frozen, or its
//     clock jumped) advances time by all of them, so that lease deadlines pass as they did in
//     the store, and no decision is taken until the store has answered a request sent after
//     the jump.
//   - A cold boot (a pair's first, a restart of its only copy, an operator's start) writes the
//     record first too (ActBoot carries it): a VM that released output the record does not
//     name would let a secondary of an older generation take over past it. Only the side the
//     record names boots (the preferred side when there is no record), so the restarted VM's
//     disk has every write it acknowledged.
//   - A stop marks the record "this side, alone" before the lease goes: a secondary still in
//     COLO then finds itself stale instead of taking the stopped VM over; a stopped side
//     prepares no secondary.
//   - A protection is complete (the pair shows protected, a failover may be asked) once the
//     record names the primary, its generation and COLO: until then its secondary could not
//     take over.

// Adopted is what a restarted agent found of its side: a QEMU that outlived the earlier agent,
// what it runs as, and what the earlier agent had saved.
type Adopted struct {
	// Role is RolePrimary or RoleSecondary: what the side's QEMU was started as.
	Role Role
	// Colo: QEMU reports COLO mode (query-colo-status) of its role. A QEMU whose COLO ended
	// with an error still reports it until a failover: a secondary then holds the VM as of
	// the last checkpoint, and may be the only copy left.
	Colo bool
	// ColoLost says why the QEMU's COLO ended, if it did (query-colo-status reason error).
	ColoLost string
	// Frozen: the earlier agent froze the QEMU (it is stopped by SIGSTOP).
	Frozen bool
	// Link is the migration link's state as the new agent first read it.
	Link LinkState
	// Gen, Epoch and LeaseEpoch: the protection generation, the highest fencing epoch known
	// and the epoch of the lease the side held (0 if none), as the earlier agent saved them.
	Gen        int
	Epoch      uint64
	LeaseEpoch uint64
	// Marked: the earlier agent's primary had its record say what it ran (Policy.Marked).
	Marked bool
}

// Policy is the state machine of one side of a pair. It does no I/O and reads no clock. Not
// safe for concurrent use; the side's runner owns it.
type Policy struct {
	cfg  Config
	self string
	now  int
	role Role
	why  string
	gen  int

	epoch         uint64 // the highest epoch known for the pair
	held          bool   // we hold the lease of epoch leaseEpoch
	leaseEpoch    uint64
	leaseDeadline int // until this tick the lease is surely ours
	acquiring     bool
	acquireAt     int // when the running acquisition was sent
	renewing      bool
	nextRenew     int
	probing       bool
	storeOK       bool
	storeDown     bool        // the last store request failed for want of the store (not merely unanswered)
	storeHolder   LeaseHolder // from the last probe or refusal
	storeSeen     int         // when storeHolder was learnt
	storeSince    int         // since when the store has shown that same holder and epoch

	colo         bool // as primary: in COLO with the peer's secondary
	marked       bool // the primary record says what we do now
	fenced       bool
	fencedEpoch  uint64 // the epoch we held when we froze
	confirmUntil int    // a primary may run without its lease until this tick
	lastConfirm  int    // as secondary: when we last confirmed
	handOver     bool   // the peer asked us to take over
	handOverKind HandOverKind
	handOverWhy  string
	coloLost     string // our QEMU left COLO by itself, and why
	link         LinkState

	// suspect: time jumped (missed ticks) at this tick; no decision until the store answered a
	// request sent at or after it (-1: no suspicion).
	suspect int
	// restoreUntil: an adopted side takes no decision and does not freeze before this tick,
	// unless the store or the peer answered first (its lease and its peer are unknown yet).
	restoreUntil int
	// peerGrace: before this tick an unheard peer does not count as lost (an adopted side,
	// an agent whose time jumped, or a QEMU just thawed has not had time to hear it).
	peerGrace int

	peerSeen     int // when the request of the last successful exchange was sent (or one arrived)
	peerEver     bool
	peer         PeerView
	peerLostAt   int // when the peer was first seen unreachable (-1: it is reachable)
	retryIn      int
	backoff      int
	reprotectNow bool   // an operator asked to protect now
	wantPrimary  bool   // Start was asked here
	operator     bool   // ... by an operator
	restartAt    int    // a cold restart is due at this tick
	startedAt    int    // when the last Start came
	restarts     int    // cold restarts in a row (their backoff)
	coldSince    int    // since when a cold start waits for a peer that may hold a COLO secondary (-1: not waiting)
	stopped      bool   // an operator stopped the pair: nothing starts by itself
	secEpoch     uint64 // as secondary: the epoch of the primary it was prepared for
	probeAt      int    // an idle side looks again whether it should boot the VM at this tick
	lastHolder   string // who ran the VM last, as the primary record said at the last acquisition
	failovers    int
}

// NewPolicy returns the idle side of self (its lease holder name).
func NewPolicy(cfg Config, self string) (*Policy, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.RetryTicks <= 0 {
		cfg.RetryTicks = 1
	}
	if cfg.MaxRetryTicks < cfg.RetryTicks {
		cfg.MaxRetryTicks = cfg.RetryTicks
	}
	if cfg.StandDownAfter <= 0 {
		cfg.StandDownAfter = cfg.LeaseTTL * 2
	}
	return &Policy{cfg: cfg, self: self, role: RoleIdle, lastConfirm: -1 << 30, backoff: cfg.RetryTicks, peerLostAt: -1, suspect: -1, coldSince: -1}, nil
}

// Restore returns the policy of a side whose QEMU outlived an earlier agent. A primary asks
// for its lease at once (resuming the earlier agent's); one whose COLO link is not active is
// frozen until it has it. A secondary in COLO carries on and waits for its peer's heartbeats.
// Neither takes a decision before the store or the peer answered or LeaseTTL ticks passed. A
// secondary not in COLO holds nothing worth keeping: it is killed.
func Restore(cfg Config, self string, a Adopted) (*Policy, []Action, error) {
	p, err := NewPolicy(cfg, self)
	if err != nil {
		return nil, nil, err
	}
	p.gen, p.epoch, p.leaseEpoch, p.link = a.Gen, max(a.Epoch, a.LeaseEpoch), a.LeaseEpoch, a.Link
	p.restoreUntil, p.peerGrace = cfg.LeaseTTL, cfg.HeartbeatTimeout
	switch {
	case a.Role == RolePrimary:
		p.role, p.colo, p.why, p.marked = RolePrimary, a.Colo, "adopted after an agent restart", a.Marked
		if a.Colo {
			p.coloLost = a.ColoLost
		}
		if a.Frozen {
			p.fenced, p.fencedEpoch, p.why = true, a.LeaseEpoch, "adopted frozen: its lease had lapsed"
		}
		return p, p.tryAcquire(), nil
	case a.Role == RoleSecondary && a.Colo:
		p.role, p.why, p.coloLost, p.secEpoch = RoleSecondary, "adopted after an agent restart", a.ColoLost, a.Epoch
		return p, nil, nil
	}
	p.role, p.why = RoleIdle, "an adopted secondary was not in COLO"
	return p, []Action{ActKill{Why: p.why}}, nil
}

// Role returns what this side does now.
func (p *Policy) Role() Role { return p.role }

// Why says why the side is in its role.
func (p *Policy) Why() string { return p.why }

// Epoch returns the highest fencing epoch this side knows.
func (p *Policy) Epoch() uint64 { return p.epoch }

// Generation returns the current protection generation.
func (p *Policy) Generation() int { return p.gen }

// Holds reports whether this side holds the lease (as far as it knows).
func (p *Policy) Holds() bool { return p.held }

// LeaseEpoch returns the epoch of the lease this side holds or held last.
func (p *Policy) LeaseEpoch() uint64 { return p.leaseEpoch }

// Marked reports whether the primary record says what this side's primary runs now (for a
// protected primary: that it is in COLO, so that its secondary may take over).
func (p *Policy) Marked() bool { return p.marked }

// Fenced reports whether this side's QEMU is frozen.
func (p *Policy) Fenced() bool { return p.fenced }

// Colo reports whether this side's QEMU is in COLO with the peer.
func (p *Policy) Colo() bool {
	return (p.isPrimary() && p.colo) || p.role == RoleSecondary
}

// StoreOK reports whether the last store request succeeded.
func (p *Policy) StoreOK() bool { return p.storeOK }

// PeerReachable reports whether the peer was heard from within the heartbeat timeout.
func (p *Policy) PeerReachable() bool {
	return p.peerEver && p.now-p.peerSeen < p.cfg.HeartbeatTimeout
}

// Peer returns the peer's view from its last heartbeat.
func (p *Policy) Peer() PeerView { return p.peer }

// Failovers counts the takeovers and goes-alone this side did.
func (p *Policy) Failovers() int { return p.failovers }

// Now returns the logical time.
func (p *Policy) Now() int { return p.now }

// Link returns the migration link's state as the last tick brought it.
func (p *Policy) Link() LinkState { return p.link }

// Releasing reports whether this side may release guest output now: it runs the primary,
// unfrozen, and holds the lease or a fresh confirmation.
func (p *Policy) Releasing() bool {
	return p.isPrimary() && !p.fenced && p.mayRun()
}

func (p *Policy) isPrimary() bool { return runsVM(p.role) }

func (p *Policy) mayRun() bool {
	return (p.held && p.now < p.leaseDeadline) || p.now < p.confirmUntil
}

func (p *Policy) restoring() bool { return p.now < p.restoreUntil }

// leaseLeft reports whether the held lease has some life left (a renewal interval): a
// sequence that takes the side out of COLO starts only then, so that it ends before the fence
// keeper would freeze the QEMU for a lapsed lease.
func (p *Policy) leaseLeft() bool {
	return p.held && p.leaseDeadline-p.now >= p.cfg.RenewEvery
}

// MayRunUntil is the tick until which this side's primary may run without an active COLO
// link: its lease's deadline or its secondary's confirmation, whichever is later. Past it,
// enforce freezes the primary. (An adopted primary gets no grace: the earlier agent's lease
// may have lapsed already; one whose COLO link is active needs none.)
func (p *Policy) MayRunUntil() int {
	until := p.confirmUntil
	if p.held {
		until = max(until, p.leaseDeadline)
	}
	return until
}

// GuardUntil is the tick the host's fence keeper is given for this side's primary: half the
// fence margin after MayRunUntil, so that a live agent freezes first and the keeper acts only
// for an agent that is not there, still before the store lets the lease go.
func (p *Policy) GuardUntil() int { return p.MayRunUntil() + p.cfg.FenceMargin/2 }

// peerLost reports whether the peer counts as unreachable: not heard within the heartbeat
// timeout, and not a peer an adopted side has had no time to hear yet.
func (p *Policy) peerLost() bool {
	return !p.PeerReachable() && p.now >= p.peerGrace
}

// thaw resumes a frozen QEMU. Its migration link reads quiet until its next checkpoint: the
// peer is not judged lost on that reading for a heartbeat timeout.
func (p *Policy) thaw(why string) Action {
	p.fenced, p.why = false, why
	p.peerGrace = max(p.peerGrace, p.now+p.cfg.HeartbeatTimeout)
	return ActThaw{}
}

func (p *Policy) record(colo bool) PrimaryRecord {
	return PrimaryRecord{Holder: p.self, Epoch: p.leaseEpoch, Gen: p.gen, Colo: colo}
}

// View is this side as the peer sees it in heartbeats, without a confirmation.
func (p *Policy) View() PeerView {
	return PeerView{Role: p.role, Epoch: p.epoch, Gen: p.gen, Colo: p.Colo(), Fenced: p.fenced, StoreOK: p.storeOK}
}

// Step feeds one event and returns the actions to carry out, in order. Requests the side
// cannot take return an error wrapping ErrWrongState or ErrStaleEpoch, and change nothing.
func (p *Policy) Step(ev Event) ([]Action, error) {
	var acts []Action
	switch e := ev.(type) {
	case Tick:
		n := max(e.N, 1)
		p.now += n
		p.link = e.Link
		if n > 1 {
			// Missed ticks: whatever this side believed of its lease and its peer may be
			// stale by now. Deadlines have passed as they did in the store; decisions wait
			// for a fresh answer from it.
			p.suspect, p.peerGrace = p.now, p.now+p.cfg.HeartbeatTimeout
			p.acquiring, p.renewing, p.probing = false, false, false
			p.nextRenew = p.now
		}
		acts = p.tick()
	case Start:
		if p.role != RoleIdle && p.role != RoleFailed {
			return nil, fmt.Errorf("start: this side is %s: %w", p.role, ErrWrongState)
		}
		p.wantPrimary, p.operator, p.role, p.why, p.restartAt, p.coldSince, p.stopped = true, e.Operator, RoleIdle, "starting", 0, -1, false
		p.startedAt = p.now
		acts = p.tryAcquire()
	case Stop:
		acts = p.stop(e.Why)
	case FailoverRequest:
		var err error
		if acts, err = p.failoverRequest(e); err != nil {
			return nil, err
		}
	case ReprotectRequest:
		switch {
		case p.role == RoleProtecting:
			return nil, fmt.Errorf("reprotect: a protection runs already: %w", ErrWrongState)
		case p.role != RolePrimary || p.colo || p.fenced:
			return nil, fmt.Errorf("reprotect: this side is %s (protected=%v, frozen=%v); only a primary running alone can be re-protected: %w", p.role, p.colo, p.fenced, ErrWrongState)
		case !p.PeerReachable():
			return nil, fmt.Errorf("reprotect: the peer is unreachable: %w", ErrWrongState)
		case p.peer.Role != RoleIdle && p.peer.Role != RoleFailed:
			return nil, fmt.Errorf("reprotect: the peer is %s, not ready for a secondary: %w", p.peer.Role, ErrWrongState)
		}
		p.reprotectNow, p.retryIn, p.backoff = true, 0, p.cfg.RetryTicks
	case LeaseAcquired:
		acts = p.acquired(e)
	case LeaseHeld:
		p.acquiring, p.storeOK = false, true
		p.sawHolder(e.Holder)
		p.storeAnswered(e.SentAt)
		if p.role == RoleIdle && p.wantPrimary && e.Holder.Holder != p.self && p.PeerReachable() &&
			(runsVM(p.peer.Role) && !p.peer.Fenced && p.peerSeen > p.startedAt || !p.operator && p.peer.Role != RoleIdle && p.peer.Role != RoleFailed) {
			// The peer runs the VM (or, its secondary, takes over): nothing for this side to
			// start. An operator's start needs to hear so after it was asked (the peer may
			// have been stopped too). (A peer holding the lease while idle is only reading the
			// primary record, as this side is about to: ask again, the record decides.)
			p.wantPrimary, p.operator, p.why = false, false, fmt.Sprintf("the VM runs on %s (epoch %d)", e.Holder.Holder, e.Holder.Epoch)
		}
		// Another side holding the lease does not make our VM stale: it may only be checking
		// the primary record, and give the lease back. The record decides, when we acquire.
		p.learnEpoch(e.Holder.Epoch)
	case LeaseRenewed:
		p.renewing, p.storeOK = false, true
		p.storeAnswered(e.SentAt)
		if p.held && e.Epoch == p.leaseEpoch {
			p.leaseDeadline = max(p.leaseDeadline, e.SentAt+p.cfg.LeaseTTL-p.cfg.FenceMargin)
			if p.fenced && p.fencedEpoch == p.leaseEpoch && p.mayRun() {
				// The lease never lapsed: nobody else can have run the VM.
				acts = append(acts, p.thaw("lease renewed again"))
			}
		}
	case LeaseLost:
		p.renewing, p.storeOK = false, true
		if e.Epoch != 0 && e.Epoch != p.leaseEpoch {
			break // about a lease this side no longer counts on
		}
		p.suspect, p.restoreUntil = -1, 0
		p.held = false
		acts = p.enforce()
		if p.isPrimary() {
			acts = append(acts, p.tryAcquire()...)
		}
	case StoreDown:
		p.acquiring, p.renewing, p.probing, p.storeOK, p.storeDown = false, false, false, false, true
	case StoreOK:
		p.probing, p.storeOK = false, true
		p.sawHolder(e.Holder)
		p.storeAnswered(e.SentAt)
		p.learnEpoch(e.Holder.Epoch)
	case PeerReply:
		if e.View.Confirm && p.isPrimary() && (p.suspect < 0 || e.SentAt >= p.suspect) {
			p.confirmUntil = max(p.confirmUntil, e.SentAt+p.cfg.HeartbeatTimeout-p.cfg.FenceMargin)
			if p.fenced && p.fencedEpoch == p.leaseEpoch && p.mayRun() {
				// Frozen because the store went away before the secondary said so: the
				// secondary is still in COLO with us and will not take over while it
				// confirms, so nobody else runs the VM.
				acts = append(acts, p.thaw("running on the secondary's confirmation: the store is unreachable"))
			}
		}
		acts = append(acts, p.peerHeard(e.SentAt, e.View)...)
	case PeerRequest:
		acts = p.peerHeard(p.now, e.View)
	case LocalFailed:
		acts = p.localFailed(e.Why)
	case ColoLost:
		if p.Colo() && p.coloLost == "" {
			p.coloLost = e.Why
		}
	case HandOverRequest:
		if e.Epoch < p.epoch {
			return nil, fmt.Errorf("hand-over of epoch %d: this side knows epoch %d: %w", e.Epoch, p.epoch, ErrStaleEpoch)
		}
		if p.role != RoleSecondary {
			return nil, fmt.Errorf("hand-over: this side is %s, not a secondary in COLO: %w", p.role, ErrWrongState)
		}
		p.handOver, p.handOverKind, p.handOverWhy = true, e.Kind, e.Why
		acts = p.tryAcquire()
	case Booted:
		if p.role == RoleBooting {
			p.role, p.why, p.colo, p.retryIn, p.marked, p.operator = RolePrimary, "running unprotected", false, 0, true, false
		}
	case BootFailed:
		switch {
		case p.role != RoleBooting:
		case e.StoreDown:
			// Nothing started: give the lease back and ask again (the record decides again).
			p.role, p.wantPrimary, p.why = RoleIdle, true, "boot postponed: "+e.Err
			p.restartAt = p.now + p.cfg.RetryTicks
			acts = append(acts, p.release()...)
		default:
			p.role, p.why, p.operator = RoleFailed, "the primary did not start: "+e.Err, false
			acts = append(acts, ActKill{Why: "boot failed"})
			acts = append(acts, p.release()...)
		}
	case Protected:
		if p.role == RoleProtecting && e.Gen == p.gen {
			p.role, p.colo, p.marked, p.why, p.backoff = RolePrimary, true, false, "", p.cfg.RetryTicks
			p.coloLost, p.reprotectNow, p.restarts = "", false, 0
			acts = append(acts, ActMark{Rec: p.record(true)})
		}
	case ProtectFailed:
		if p.role == RoleProtecting && e.Gen == p.gen {
			p.role, p.colo, p.why = RolePrimary, false, "protection failed: "+e.Err
			p.retryIn, p.backoff = p.backoff, min(p.backoff*2, p.cfg.MaxRetryTicks)
			p.reprotectNow = false
			acts = append(acts, ActTearDownPeer{Gen: e.Gen})
		}
	case Marked:
		p.lastHolder = e.Rec.Holder
		if e.Rec == p.record(p.colo) {
			p.marked = true
		}
	case Frozen:
		if p.isPrimary() && !p.fenced {
			// The keeper's freeze is the policy's own: the lease renewed or regained thaws it.
			p.fenced, p.fencedEpoch, p.why = true, p.leaseEpoch, "frozen by the fence keeper: its lease had lapsed"
		}
	case SwitchedOver:
		if p.role == RoleHandingOver {
			acts = p.handOverActions(p.handOverKind, p.handOverWhy)
		}
	case PrepareRequest:
		if e.Epoch < p.epoch {
			return nil, fmt.Errorf("prepare secondary for epoch %d: this side knows epoch %d: %w", e.Epoch, p.epoch, ErrStaleEpoch)
		}
		if p.role != RoleIdle && p.role != RoleFailed && p.role != RoleJoining && p.role != RoleSecondary {
			return nil, fmt.Errorf("prepare secondary: this side is %s: %w", p.role, ErrWrongState)
		}
		if p.stopped {
			return nil, fmt.Errorf("prepare secondary: the pair is stopped here: %w", ErrWrongState)
		}
		if p.role == RoleJoining || p.role == RoleSecondary {
			acts = append(acts, ActKill{Why: fmt.Sprintf("replaced by generation %d", e.Gen)})
		}
		p.epoch, p.gen, p.role, p.why, p.handOver, p.wantPrimary, p.coloLost = e.Epoch, e.Gen, RoleJoining, "", false, false, ""
		p.secEpoch = e.Epoch
		// The request itself shows the peer alive; its view comes with the next heartbeat.
		if !p.peerEver || p.now > p.peerSeen {
			p.peerSeen, p.peerEver = p.now, true
		}
		p.peerLostAt = -1
		acts = append(acts, ActStartSecondary{Gen: e.Gen})
	case Prepared:
		// Joining until the peer reports COLO of this generation.
	case PrepareFailed:
		if p.role == RoleJoining && e.Gen == p.gen {
			p.role, p.why = RoleIdle, "preparing the secondary failed: "+e.Err
			acts = append(acts, ActKill{Why: "prepare failed"})
		}
	case TearDownRequest:
		if (p.role == RoleJoining || p.role == RoleSecondary) && e.Gen == p.gen {
			p.role, p.why = RoleIdle, "torn down by the primary"
			acts = append(acts, ActKill{Why: "torn down"})
		}
	case TakeoverDone:
		p.lastHolder = p.self // its record was written first
		if p.role == RoleTakingOver {
			p.role, p.colo, p.marked, p.why, p.retryIn = RolePrimary, false, true, "took over: "+p.why, p.cfg.RetryTicks
			p.coloLost = ""
		}
	case TakeoverFailed:
		if p.role == RoleTakingOver {
			if e.StoreDown {
				// Nothing changed on the secondary: give the lease back and try again.
				p.role, p.why = RoleSecondary, "takeover postponed: "+e.Err
				p.failovers--
				acts = append(acts, p.release()...)
				if p.fenced {
					p.fenced = false // a secondary again: it releases nothing
					acts = append(acts, ActThaw{})
				}
			} else {
				p.role, p.why = RoleFailed, "takeover failed: "+e.Err
				acts = append(acts, ActKill{Why: "takeover failed"})
				acts = append(acts, p.release()...)
			}
		}
	case AloneDone:
		p.lastHolder = p.self
		if p.role == RoleAlone {
			p.role, p.colo, p.marked, p.retryIn, p.coloLost = RolePrimary, false, true, p.cfg.RetryTicks, ""
		}
	case AloneFailed:
		if p.role == RoleAlone {
			if e.StoreDown {
				// Still in COLO, output held by colo-compare: try again at the next tick.
				p.role, p.colo, p.why = RolePrimary, true, "going alone postponed: "+e.Err
				p.failovers--
			} else {
				p.role, p.why = RoleFailed, "failover as primary failed: "+e.Err
				acts = append(acts, ActKill{Why: "failover as primary failed"})
				acts = append(acts, p.release()...)
			}
		}
	default:
		return nil, fmt.Errorf("unknown event %T", ev)
	}
	acts = append(acts, p.decide()...)
	acts = append(acts, p.enforce()...)
	return acts, nil
}

// Reply decides, for the reply to a peer's heartbeat, whether this side confirms that the peer
// may run without renewing its lease, and records when it did; it returns the view to send.
func (p *Policy) Reply(peer PeerView) PeerView {
	v := p.View()
	// Only a known outage counts (a store request that failed), and never while this side
	// asks for the lease itself.
	v.Confirm = p.role == RoleSecondary && p.storeDown && !p.acquiring && !p.held && peer.Epoch == p.epoch && peer.Gen == p.gen && peer.Colo &&
		peer.Role == RolePrimary && p.coloLost == ""
	if v.Confirm {
		p.lastConfirm = p.now
	}
	return v
}

func (p *Policy) failoverRequest(e FailoverRequest) ([]Action, error) {
	what := "switchover"
	if e.Forced {
		what = "forced failover"
	}
	// Both kinds need the primary record to say COLO: without it the peer may not take over.
	if p.role != RolePrimary || !p.colo || p.fenced || !p.PeerReachable() || p.peer.Role != RoleSecondary || p.peer.Gen != p.gen || p.coloLost != "" || !p.marked {
		return nil, fmt.Errorf("%s: this side is %s (protected=%v, recorded=%v, peer reachable=%v, peer %s); only a protected primary with its secondary in COLO can fail over: %w",
			what, p.role, p.colo, p.marked, p.PeerReachable(), p.peer.Role, ErrWrongState)
	}
	why := e.Reason
	if e.Forced {
		if why == "" {
			why = "forced failover"
		}
		acts := []Action{ActKill{Why: "forced failover"}}
		return append(acts, p.handOverActions(HandOverForced, why)...), nil
	}
	if why == "" {
		why = "planned switchover"
	}
	// The lease stays ours until the QEMU is dead: a peer that got it sooner could take over
	// while the old primary still runs its last checkpoint.
	p.role, p.why, p.handOverKind, p.handOverWhy = RoleHandingOver, why, HandOverPlanned, why
	return []Action{ActSwitchover{}}, nil
}

// sawHolder records who the store says holds the lease now.
func (p *Policy) sawHolder(h LeaseHolder) {
	if h != p.storeHolder {
		p.storeSince = p.now
	}
	p.storeHolder, p.storeSeen = h, p.now
}

func (p *Policy) learnEpoch(e uint64) {
	if e > p.epoch {
		p.epoch = e
	}
}

// storeAnswered clears the suspicion of a time jump once the store answered a request sent
// after it, and ends the restore window.
func (p *Policy) storeAnswered(sentAt int) {
	p.storeDown = false
	if p.suspect >= 0 && sentAt >= p.suspect {
		p.suspect = -1
	}
	p.restoreUntil = 0
}

// OperatorStarting reports whether this side is carrying out an operator's start: it has not
// booted the VM yet, nor found that the other side boots it.
func (p *Policy) OperatorStarting() bool {
	return p.operator && (p.wantPrimary || p.role == RoleBooting)
}

// SetOptions changes the pair's options at run time: re-protection by itself, and the
// restart policy.
func (p *Policy) SetOptions(autoReprotect, restart bool) {
	p.cfg.AutoReprotect, p.cfg.Restart = autoReprotect, restart
}

func (p *Policy) release() []Action {
	if !p.held {
		return nil
	}
	p.held = false
	return []Action{ActRelease{Epoch: p.leaseEpoch}}
}

func (p *Policy) tryAcquire() []Action {
	// Asked to take over, a side asks again at every tick until the lease is released to it.
	every := p.cfg.AcquireEvery
	if p.handOver {
		every = 1
	}
	if p.acquiring || p.held || (p.acquireAt > 0 && p.now-p.acquireAt < every) {
		return nil
	}
	p.acquiring, p.acquireAt = true, p.now
	return []Action{ActAcquire{SentAt: p.now}}
}

func (p *Policy) becomeStale(why string) []Action {
	acts := []Action{ActKill{Why: "stale: " + why}}
	acts = append(acts, p.release()...)
	p.role, p.fenced, p.colo, p.marked, p.why, p.coloLost = RoleIdle, false, false, false, "stale: "+why, ""
	return acts
}

func (p *Policy) acquired(e LeaseAcquired) []Action {
	p.acquiring, p.storeOK = false, true
	p.storeAnswered(e.SentAt)
	if e.Epoch < p.leaseEpoch || (p.held && e.Epoch != p.leaseEpoch) {
		// A late answer: this side holds (or held) a newer lease since. The older one has
		// expired or will; nothing is decided on it.
		return nil
	}
	oldLease := p.leaseEpoch
	p.held, p.leaseEpoch = true, e.Epoch
	p.leaseDeadline = e.SentAt + p.cfg.LeaseTTL - p.cfg.FenceMargin
	p.sawHolder(LeaseHolder{Holder: p.self, Epoch: e.Epoch})
	p.nextRenew = p.now + p.cfg.RenewEvery
	p.learnEpoch(e.Epoch)
	p.gen = max(p.gen, e.Prev.Gen) // a side that lost its state learns where the pair was
	p.lastHolder = e.Prev.Holder
	// Only a side about to release output writes the record, so a record that is still ours
	// says nobody else released output since (our last mark may be older than our last lease,
	// when the store went away before it was written).
	// No record at all: nobody ever released output under a lease (a takeover writes one
	// first), so a primary's VM is nobody else's either.
	mine := (e.Prev.Holder == p.self && e.Prev.Epoch <= oldLease && oldLease != 0) || (e.Prev.Holder == "" && p.isPrimary())
	switch {
	case p.isPrimary():
		if !mine {
			return p.becomeStale(fmt.Sprintf("%s ran the VM at epoch %d meanwhile", e.Prev.Holder, e.Prev.Epoch))
		}
		// Ours again, and nobody ran the VM meanwhile: the record moves to the new epoch. It
		// already says what this side runs if it names this side, its generation and its COLO
		// (a secondary's takeover reads those, not the epoch).
		var acts []Action
		if p.fenced {
			acts = append(acts, p.thaw("lease regained"))
		}
		p.marked = e.Prev.Holder == p.self && e.Prev.Gen == p.gen && e.Prev.Colo == p.colo
		return append(acts, ActMark{Rec: p.record(p.colo)})
	case p.role == RoleSecondary && p.wantsLease():
		if e.Prev.Holder == p.self || e.Prev.Gen != p.gen || !e.Prev.Colo {
			// The primary released output without us since our last checkpoint: our copy is
			// stale, and the primary's is the VM. Give the lease back for it.
			return p.becomeStale(fmt.Sprintf("the primary record (%s, epoch %d, generation %d, colo %v) is not generation %d in COLO", e.Prev.Holder, e.Prev.Epoch, e.Prev.Gen, e.Prev.Colo, p.gen))
		}
		p.role, p.failovers = RoleTakingOver, p.failovers+1
		why := p.takeoverWhy()
		kind := HandOverFailed
		if p.handOver {
			kind = p.handOverKind
		}
		yank := p.link != LinkClosed && p.coloLost == "" && (!p.PeerReachable() || p.peer.Fenced)
		p.why, p.handOver = why, false
		return []Action{ActTakeOver{Yank: yank, Why: why, Kind: kind, Rec: p.record(false)}}
	case p.role == RoleIdle && p.wantPrimary && e.Prev.Holder == "" && p.cfg.Preferred:
		return p.boot("")
	case p.role == RoleIdle && p.wantPrimary && e.Prev.Holder == p.self && (p.operator || p.cfg.Restart):
		// This side ran the VM last: its disk has every write the VM acknowledged. A peer with
		// a secondary in COLO of that VM takes over warm instead (its clients keep their
		// connections): give it the lease, and the time to.
		if e.Prev.Colo && (p.PeerReachable() && p.peer.Colo || !p.PeerReachable() && p.waitingForPeer()) {
			// Out of the peer's way for a while: it needs the lease to take over. Then ask
			// again: if the peer took over, its lease says so; if its secondary is gone too,
			// this side boots.
			p.why = "starting: the peer may take over from its secondary first"
			p.probeAt, p.restartAt = p.now+5*p.cfg.RetryTicks, p.now+5*p.cfg.RetryTicks
			if !p.PeerReachable() {
				p.restartAt = p.now + p.cfg.AcquireEvery*2
			}
			return p.release()
		}
		return p.boot(fmt.Sprintf("cold start from this side's disk (it ran the VM last, at epoch %d)", e.Prev.Epoch))
	}
	// Nothing to do with a lease here.
	if p.role == RoleIdle && p.wantPrimary {
		p.wantPrimary = false
		switch {
		case e.Prev.Holder == "" || e.Prev.Holder == p.self:
			p.why = "not booting: the restart policy is never; start the pair to boot it"
		default:
			p.why = fmt.Sprintf("%s ran the VM last (epoch %d): its agent boots it", e.Prev.Holder, e.Prev.Epoch)
		}
	}
	return p.release()
}

func (p *Policy) takeoverWhy() string {
	switch {
	case p.handOver && p.handOverWhy != "":
		return "handed over: " + p.handOverWhy
	case p.handOver:
		return "handed over"
	case p.coloLost != "":
		return "COLO ended on the secondary: " + p.coloLost
	case p.link == LinkClosed:
		return "the primary closed the migration link"
	case p.PeerReachable() && p.peer.Fenced:
		return "primary is frozen"
	case p.PeerReachable():
		return fmt.Sprintf("primary is %s", p.peer.Role)
	}
	return "primary unreachable"
}

// boot starts the primary here under the lease just acquired.
func (p *Policy) boot(why string) []Action {
	// p.operator stays until the boot ends: a boot postponed by the store asks again.
	p.role, p.why, p.wantPrimary, p.coldSince, p.lastHolder = RoleBooting, why, false, -1, p.self
	p.colo, p.coloLost, p.fenced = false, "", false
	return []Action{ActBoot{Rec: p.record(false)}}
}

// waitingForPeer reports whether a cold start still gives an unreachable peer, which may hold
// a COLO secondary of the VM, its chance to take over first (three lease times).
func (p *Policy) waitingForPeer() bool {
	if p.coldSince < 0 {
		p.coldSince = p.now
	}
	return p.now-p.coldSince < 3*p.cfg.LeaseTTL
}

func (p *Policy) stop(why string) []Action {
	if why == "" {
		why = "stopped"
	}
	var acts []Action
	if p.role != RoleIdle {
		acts = append(acts, ActKill{Why: "stop"})
	}
	if p.held && p.isPrimary() {
		// The record says this side ran the VM last, alone, before the lease goes: a
		// secondary still in COLO finds it stale instead of taking over the stopped VM, and
		// a start boots this side's disk, which has every write the VM acknowledged.
		acts = append(acts, ActMark{Rec: p.record(false)})
	}
	acts = append(acts, p.release()...)
	p.role, p.fenced, p.colo, p.wantPrimary, p.why, p.coloLost, p.stopped = RoleIdle, false, false, false, why, "", true
	return acts
}

// handOverActions give the lease up and ask the peer to take over; our QEMU is dead or
// killed by the actions before these.
//
// After a crash the lease goes first, so that the peer's takeover can start the moment it
// hears. An operator's failover tells the peer first, so that its takeover records the
// operator's reason (it asks for the lease again at every tick until the release lands).
func (p *Policy) handOverActions(kind HandOverKind, why string) []Action {
	ho := ActHandOver{Epoch: p.epoch, Kind: kind, Why: why}
	var acts []Action
	if kind == HandOverFailed {
		acts = append(p.release(), ho)
	} else {
		acts = append([]Action{ho}, p.release()...)
	}
	p.role, p.colo, p.fenced, p.marked, p.why, p.coloLost = RoleIdle, false, false, false, why, ""
	return acts
}

func (p *Policy) localFailed(why string) []Action {
	switch {
	case p.role == RolePrimary && p.colo && !p.fenced && p.coloLost == "":
		// The fast path: our primary is dead; the peer's secondary takes over once we let go.
		return append([]Action{ActKill{Why: why}}, p.handOverActions(HandOverFailed, "primary failed: "+why)...)
	case p.isPrimary():
		acts := []Action{ActKill{Why: why}}
		acts = append(acts, p.release()...)
		p.role, p.colo, p.fenced, p.why, p.coloLost = RoleFailed, false, false, "the VM is lost: unprotected primary "+why, ""
		if p.cfg.Restart && p.role != RoleBooting {
			// The only running copy died, and its disk is here: boot it again, after a backoff
			// that grows while restarts keep failing.
			delay := min(p.cfg.RetryTicks<<min(p.restarts, 16), p.cfg.MaxRetryTicks)
			p.restarts++
			p.role, p.wantPrimary, p.operator, p.coldSince = RoleIdle, true, true, -1
			p.restartAt = p.now + delay
			p.why = fmt.Sprintf("restarting (cold, from this side's disk) in %d ticks: the only running copy of the VM %s", delay, why)
		}
		return acts
	case p.role == RoleJoining || p.role == RoleSecondary:
		p.role, p.why, p.coloLost = RoleIdle, "secondary "+why, ""
		return []Action{ActKill{Why: why}}
	}
	return nil
}

func (p *Policy) peerHeard(sentAt int, v PeerView) []Action {
	if !p.peerEver || sentAt > p.peerSeen {
		p.peerSeen = sentAt
	}
	p.peerEver = true
	p.peer = v
	p.peerLostAt = -1
	if p.role == RoleSecondary || !p.isPrimary() {
		p.restoreUntil = 0 // an adopted secondary has heard its peer
	}
	var acts []Action
	oldEpoch := p.epoch
	peerRuns := runsVM(v.Role)
	if v.Epoch > p.leaseEpoch && peerRuns && p.isPrimary() {
		// The peer runs the VM under a newer lease than ours: what runs here is stale.
		acts = append(acts, p.becomeStale(fmt.Sprintf("the peer is primary at epoch %d", v.Epoch))...)
	}
	if v.Epoch > p.epoch && peerRuns {
		if p.isPrimary() {
			acts = append(acts, p.becomeStale(fmt.Sprintf("the peer is primary at epoch %d", v.Epoch))...)
		}
		p.epoch = v.Epoch // a secondary follows its primary's epoch
	}
	if p.role == RoleJoining && v.Colo && v.Gen == p.gen && v.Epoch == p.epoch {
		p.role, p.why = RoleSecondary, ""
	}
	if p.role == RoleJoining && (v.Epoch == p.epoch && (v.Gen > p.gen || (v.Gen == p.gen && v.Role == RolePrimary && !v.Colo)) ||
		peerRuns && v.Epoch > p.secEpoch) {
		// The protection this secondary was prepared for ended without it.
		p.role, p.why = RoleIdle, "the primary's protection ended without this secondary"
		acts = append(acts, ActKill{Why: p.why})
	}
	if p.role == RoleSecondary && v.Role == RolePrimary && !v.Colo && (v.Gen == p.gen || v.Epoch > max(oldEpoch, p.secEpoch) || v.Epoch > p.secEpoch && v.Epoch == oldEpoch) && !v.Fenced {
		// Our primary runs on without us: this secondary is stale.
		p.role, p.why, p.coloLost = RoleIdle, "the primary runs without this secondary", ""
		acts = append(acts, ActKill{Why: p.why})
	}
	if p.role == RolePrimary && p.colo && !p.fenced && !v.Colo && v.Gen == p.gen && (v.Role == RoleIdle || v.Role == RoleFailed) && p.suspect < 0 {
		acts = append(acts, p.goAlone(false, "the secondary is gone")...)
	}
	return acts
}

func (p *Policy) goAlone(yank bool, why string) []Action {
	p.role, p.why = RoleAlone, why
	p.failovers++
	return []Action{ActGoAlone{Yank: yank, Why: why, Rec: p.record(false)}}
}

// wantsLease reports whether a secondary has reason to take over: it was asked to, its QEMU
// left COLO, or its primary is gone (frozen, stopped, or unreachable while no checkpoint
// arrives).
func (p *Policy) wantsLease() bool {
	reach := p.PeerReachable()
	return p.handOver || p.coloLost != "" || p.link == LinkClosed || (reach && p.peer.Fenced) ||
		(reach && (p.peer.Role == RoleIdle || p.peer.Role == RoleFailed)) ||
		(p.peerLost() && p.link != LinkActive)
}

func (p *Policy) tick() []Action {
	var acts []Action
	if !p.PeerReachable() && p.peerLostAt < 0 {
		p.peerLostAt = p.now
	}
	if p.acquiring && p.now-p.acquireAt >= p.cfg.AcquireEvery {
		p.acquiring = false // an answer that never came: ask again when needed
	}
	// The store: renew a held lease; the other roles probe it (a secondary's confirmations
	// depend on it).
	if p.now >= p.nextRenew {
		if p.held && !p.renewing {
			p.renewing, p.nextRenew = true, p.now+p.cfg.RenewEvery
			acts = append(acts, ActRenew{SentAt: p.now, Epoch: p.leaseEpoch})
		} else if !p.held && !p.probing && !p.acquiring {
			p.probing, p.nextRenew = true, p.now+p.cfg.RenewEvery
			acts = append(acts, ActProbeStore{SentAt: p.now})
		}
	}
	if p.isPrimary() && !p.marked && p.held && p.role != RoleAlone && p.role != RoleTakingOver && p.now%p.cfg.RenewEvery == 0 {
		acts = append(acts, ActMark{Rec: p.record(p.colo)})
	}
	if p.role == RolePrimary && !p.colo && !p.fenced && p.retryIn > 0 && p.PeerReachable() {
		p.retryIn--
	}
	return acts
}

// decide takes the decisions of the side's role, after every event.
func (p *Policy) decide() []Action {
	if p.suspect >= 0 || p.restoring() {
		// Time jumped, or the side was just adopted: a held lease must be renewed (it is,
		// by tick), and nothing else is decided until the store answered.
		if p.isPrimary() && !p.held {
			return p.tryAcquire()
		}
		return nil
	}
	var acts []Action
	reach := p.PeerReachable()
	switch p.role {
	case RoleIdle:
		if !p.wantPrimary && p.cfg.Restart && !p.stopped && p.now >= p.restartAt && (p.lastHolder == "" || p.lastHolder == p.self) &&
			(p.peerLost() || p.PeerReachable() && (p.peer.Role == RoleIdle || p.peer.Role == RoleFailed)) {
			// No copy of the VM runs on either side that this side can see: the side that ran
			// it last boots it again (acquired checks the record). Asked again now and then
			// while nothing runs.
			if p.now >= p.probeAt {
				p.wantPrimary, p.operator, p.coldSince = true, false, -1
				p.probeAt = p.now + 5*p.cfg.RetryTicks
			}
		}
		if p.wantPrimary && p.now >= p.restartAt {
			acts = append(acts, p.tryAcquire()...)
		}
	case RolePrimary:
		switch {
		case !p.held:
			acts = append(acts, p.tryAcquire()...)
		// Going alone needs a lease that is still good (its record is written under it); one
		// that lapsed freezes the primary first (enforce), and the lease regained thaws it.
		case p.colo && !p.fenced && p.coloLost != "" && p.leaseLeft():
			acts = append(acts, p.goAlone(false, "COLO ended: "+p.coloLost)...)
		case p.colo && !p.fenced && p.peerLost() && p.link != LinkActive && p.leaseLeft():
			acts = append(acts, p.goAlone(p.link != LinkClosed, "the secondary's host is unreachable")...)
		case !p.colo && !p.fenced && (p.cfg.AutoReprotect || p.reprotectNow) && reach && (p.peer.Role == RoleIdle || p.peer.Role == RoleFailed) && p.peer.Epoch <= p.epoch && p.retryIn <= 0:
			p.gen = max(p.gen, p.peer.Gen) + 1
			p.role, p.reprotectNow = RoleProtecting, false
			acts = append(acts, ActProtect{Gen: p.gen, Epoch: p.epoch})
		}
	case RoleSecondary:
		if p.wantsLease() && p.now-p.lastConfirm >= p.cfg.HeartbeatTimeout {
			acts = append(acts, p.tryAcquire()...)
		}
		// The peer keeps its lease renewed (the same epoch all along) but we cannot reach it,
		// and no checkpoint arrives: it runs alone by now.
		if p.peerLost() && p.link != LinkActive && p.storeOK && p.storeHolder.Holder != "" && p.storeHolder.Holder != p.self &&
			p.peerLostAt >= 0 && p.storeSeen > p.peerLostAt+p.cfg.LeaseTTL && p.now-p.peerLostAt >= p.cfg.StandDownAfter &&
			p.storeSeen-p.storeSince >= p.cfg.StandDownAfter {
			p.role, p.why, p.coloLost = RoleIdle, "stood down: the primary keeps its lease but is unreachable", ""
			acts = append(acts, ActKill{Why: p.why})
		}
	case RoleJoining:
		if !reach {
			p.role, p.why = RoleIdle, "the primary became unreachable before COLO"
			acts = append(acts, ActKill{Why: p.why})
		}
	}
	return acts
}

// coloHolds reports whether COLO itself holds this primary's output: it is in COLO and its
// migration link is active, so its secondary receives every checkpoint and will not take over
// while that lasts. Such a primary needs no lease to run on; it freezes only once the link
// goes quiet or closes (then frames colo-compare does not hold could reach the wire after the
// peer took over).
func (p *Policy) coloHolds() bool {
	return p.colo && p.link == LinkActive && p.coloLost == ""
}

// enforce freezes a primary that may no longer release output. A side in the middle of a
// boot, a takeover or a going-alone is not frozen: its sequence would hang on a stopped QEMU
// and the VM would be lost with it. Those sequences wrote their primary record under the lease
// first, so no other side can run the VM meanwhile; the freeze comes when they end.
func (p *Policy) enforce() []Action {
	if (p.role == RolePrimary || p.role == RoleProtecting) && !p.fenced && !p.mayRun() && !p.coloHolds() {
		p.fenced, p.fencedEpoch = true, p.leaseEpoch
		p.why = "lease not renewed in time and no confirmation from the secondary"
		return []Action{ActFreeze{Why: p.why}}
	}
	return nil
}
