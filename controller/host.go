package controller

import (
	"errors"
	"fmt"
)

// This file is the policy of one host's side of a pair that spans two hosts (DESIGN.md,
// principle 2: never two primaries). Like Policy it is pure: events in, actions out, logical
// time in ticks. Each agent runs one HostPolicy per pair it has a side of; the two agents talk
// through heartbeats and hand-overs, and both talk to the coordination store, which holds the
// pair's primary lease.
//
// The rules it keeps:
//   - A side releases guest output only while it holds the lease: a primary whose lease could
//     expire (its last acknowledged renewal was sent LeaseTTL-FenceMargin ticks ago) freezes its
//     QEMU (SIGSTOP) unless its secondary confirmed, in a heartbeat whose request was sent less
//     than HeartbeatTimeout-FenceMargin ticks ago, that it cannot reach the store either and is
//     still in COLO with it.
//   - A secondary never confirms while it reaches the store, and takes over no sooner than
//     HeartbeatTimeout ticks after the last confirmation it gave.
//   - A secondary takes over only after the store granted it the lease.
//   - A primary whose own QEMU died hands the lease over at once (fast path); a dead host's
//     lease expires (slow path).
//   - A frozen primary resumes only if it gets the lease back and the store says nobody held it
//     since; otherwise its VM is stale and is killed.

// HostRole is what a host's side of a pair does now.
type HostRole string

// Host roles.
const (
	RoleIdle       HostRole = "idle"        // no QEMU of the pair runs here
	RoleBooting    HostRole = "booting"     // the primary QEMU starts (the lease is held)
	RolePrimary    HostRole = "primary"     // runs the VM: alone, or in COLO with the peer
	RoleProtecting HostRole = "protecting"  // primary; a protection with the peer runs
	RoleAlone      HostRole = "going-alone" // primary; failover as primary runs (peer lost)
	RoleJoining    HostRole = "joining"     // a secondary for the peer, not yet in COLO
	RoleSecondary  HostRole = "secondary"   // the secondary, in COLO with the peer
	RoleTakingOver HostRole = "taking-over" // failover as secondary runs (the lease is held)
	RoleFailed     HostRole = "failed"      // the VM is lost here; the operator decides
)

// PeerView is what a heartbeat tells of the other side.
type PeerView struct {
	Role  HostRole
	Epoch uint64
	Gen   int
	// Colo: the side's QEMU is in COLO (as primary or secondary) of generation Gen.
	Colo bool
	// Fenced: the side is a primary whose QEMU is frozen.
	Fenced bool
	// StoreOK: the side reaches the coordination store.
	StoreOK bool
	// Confirm: the side confirms, as a secondary that cannot reach the store, that the
	// receiver may run on without renewing its lease.
	Confirm bool
}

// LeaseHolder names who holds a pair's lease. Epoch 0: nobody.
type LeaseHolder struct {
	Holder string
	Epoch  uint64
}

// PrimaryRecord is what the last side to release guest output wrote in the store before it
// did: who, under which lease epoch, and whether its output then went through COLO with the
// secondary of generation Gen. A secondary takes over only if the record says its primary was
// in COLO with it (else the primary released output alone and the secondary's copy is stale);
// a frozen primary resumes only if the record is still its own.
type PrimaryRecord struct {
	Holder string
	Epoch  uint64
	Gen    int
	Colo   bool
}

// Host events.
type (
	// HTick advances logical time by one tick.
	HTick struct{}
	// HStart asks the preferred primary to run the pair.
	HStart struct{}
	// HStop asks to stop this side (the pair is being deleted).
	HStop struct{}
	// HLeaseAcquired: the store granted us the lease. Prev is the primary record found.
	HLeaseAcquired struct {
		Epoch  uint64
		SentAt int
		Prev   PrimaryRecord
	}
	// HLeaseHeld: an acquisition was refused, the lease is Holder's.
	HLeaseHeld struct{ Holder LeaseHolder }
	// HLeaseRenewed: a renewal sent at SentAt was acknowledged.
	HLeaseRenewed struct{ SentAt int }
	// HLeaseLost: the store says our lease is gone.
	HLeaseLost struct{}
	// HStoreDown: a store request failed for want of the store.
	HStoreDown struct{}
	// HStoreOK: a store probe answered; Holder holds the lease now.
	HStoreOK struct{ Holder LeaseHolder }
	// HPeerReply: a heartbeat we sent at SentAt was answered.
	HPeerReply struct {
		SentAt int
		View   PeerView
	}
	// HPeerRequest: the peer's heartbeat arrived; the reply carries our view (HostPolicy.View).
	HPeerRequest struct{ View PeerView }
	// HLocalFailed: our QEMU died or hangs (and has been killed).
	HLocalFailed struct{ Why string }
	// HHandOver: the peer asks us to take over (its primary died, or a planned switchover).
	HHandOver struct{ Epoch uint64 }
	// HBooted, HBootFailed: the end of ActHBoot.
	HBooted     struct{}
	HBootFailed struct{ Err string }
	// HProtected, HProtectFailed: the end of ActHProtect.
	HProtected     struct{ Gen int }
	HProtectFailed struct {
		Gen int
		Err string
	}
	// HPrepare: the peer (a primary of epoch Epoch) asks for a secondary of generation Gen.
	HPrepare struct {
		Gen   int
		Epoch uint64
	}
	// HPrepared, HPrepareFailed: the end of ActHPrepare.
	HPrepared      struct{ Gen int }
	HPrepareFailed struct {
		Gen int
		Err string
	}
	// HTearDown: the peer asks us to drop the secondary of generation Gen.
	HTearDown struct{ Gen int }
	// HTakeoverDone, HTakeoverFailed: the end of ActHTakeOver. StoreDown: the primary record
	// could not be written, nothing was changed, and the lease was released.
	HTakeoverDone   struct{}
	HTakeoverFailed struct {
		Err       string
		StoreDown bool
	}
	// HAloneDone, HAloneFailed: the end of ActHGoAlone. StoreDown: the primary record could not
	// be written first, so the primary stays in COLO (its output held) and tries again.
	HAloneDone   struct{}
	HAloneFailed struct {
		Err       string
		StoreDown bool
	}
	// HMarked: the primary record of an ActHMark was written.
	HMarked struct{ Rec PrimaryRecord }
	// HSwitchover: an operator's planned switchover, asked of the primary.
	HSwitchover struct{}
)

// HostEvent is an input of HostPolicy.
type HostEvent interface{ isHostEvent() }

func (HTick) isHostEvent()           {}
func (HStart) isHostEvent()          {}
func (HStop) isHostEvent()           {}
func (HLeaseAcquired) isHostEvent()  {}
func (HLeaseHeld) isHostEvent()      {}
func (HLeaseRenewed) isHostEvent()   {}
func (HLeaseLost) isHostEvent()      {}
func (HStoreDown) isHostEvent()      {}
func (HStoreOK) isHostEvent()        {}
func (HPeerReply) isHostEvent()      {}
func (HPeerRequest) isHostEvent()    {}
func (HLocalFailed) isHostEvent()    {}
func (HHandOver) isHostEvent()       {}
func (HBooted) isHostEvent()         {}
func (HBootFailed) isHostEvent()     {}
func (HProtected) isHostEvent()      {}
func (HProtectFailed) isHostEvent()  {}
func (HPrepare) isHostEvent()        {}
func (HPrepared) isHostEvent()       {}
func (HPrepareFailed) isHostEvent()  {}
func (HTearDown) isHostEvent()       {}
func (HTakeoverDone) isHostEvent()   {}
func (HTakeoverFailed) isHostEvent() {}
func (HAloneDone) isHostEvent()      {}
func (HAloneFailed) isHostEvent()    {}
func (HSwitchover) isHostEvent()     {}
func (HMarked) isHostEvent()         {}

// HostAction is an output of HostPolicy for the agent to carry out.
type HostAction interface{ isHostAction() }

// Host actions. Long ones report their end with an event (ActHBoot → HBooted/HBootFailed,
// ActHProtect → HProtected/HProtectFailed, ActHPrepare → HPrepared/HPrepareFailed,
// ActHTakeOver → HTakeoverDone/HTakeoverFailed, ActHGoAlone → HAloneDone/HAloneFailed); store
// requests report with HLeaseAcquired/HLeaseHeld/HLeaseRenewed/HLeaseLost/HStoreOK/HStoreDown.
type (
	// ActHAcquire asks the store for the lease; SentAt is now.
	ActHAcquire struct{ SentAt int }
	// ActHRenew renews the held lease; SentAt is now.
	ActHRenew struct{ SentAt int }
	// ActHRelease gives the lease up (it must be done before ActHHandOver is sent).
	ActHRelease struct{ Epoch uint64 }
	// ActHProbeStore asks the store who holds the lease (a secondary's check of the store).
	ActHProbeStore struct{}
	// ActHBoot starts the primary QEMU here.
	ActHBoot struct{}
	// ActHProtect protects our primary with a secondary the peer prepares.
	ActHProtect struct {
		Gen   int
		Epoch uint64
	}
	// ActHPrepare starts a secondary here for the peer's primary.
	ActHPrepare struct{ Gen int }
	// ActHFence freezes our QEMU (SIGSTOP): it releases nothing until resumed or killed.
	ActHFence struct{ Why string }
	// ActHUnfence resumes a frozen QEMU (SIGCONT).
	ActHUnfence struct{}
	// ActHKill kills our QEMU.
	ActHKill struct{ Why string }
	// ActHTakeOver writes the primary record Rec (under the lease), then fails our secondary
	// over: it becomes the primary.
	ActHTakeOver struct {
		Yank bool
		Why  string
		Rec  PrimaryRecord
	}
	// ActHGoAlone writes the primary record Rec (Colo false, under the lease), then makes our
	// primary run on without its secondary. Without the record written, nothing is done.
	ActHGoAlone struct {
		Yank bool
		Why  string
		Rec  PrimaryRecord
	}
	// ActHMark writes the primary record Rec under the lease (after COLO started, or after the
	// lease was regained).
	ActHMark struct{ Rec PrimaryRecord }
	// ActHHandOver asks the peer to take over at once.
	ActHHandOver struct {
		Epoch uint64
		Why   string
	}
	// ActHTearDownPeer asks the peer to drop its secondary of generation Gen.
	ActHTearDownPeer struct{ Gen int }
	// ActHSwitchover flushes our primary's held output with a checkpoint and kills it; the
	// actions after it release the lease and hand over.
	ActHSwitchover struct{}
)

func (ActHAcquire) isHostAction()      {}
func (ActHRenew) isHostAction()        {}
func (ActHRelease) isHostAction()      {}
func (ActHProbeStore) isHostAction()   {}
func (ActHBoot) isHostAction()         {}
func (ActHProtect) isHostAction()      {}
func (ActHPrepare) isHostAction()      {}
func (ActHFence) isHostAction()        {}
func (ActHUnfence) isHostAction()      {}
func (ActHKill) isHostAction()         {}
func (ActHTakeOver) isHostAction()     {}
func (ActHGoAlone) isHostAction()      {}
func (ActHHandOver) isHostAction()     {}
func (ActHTearDownPeer) isHostAction() {}
func (ActHSwitchover) isHostAction()   {}
func (ActHMark) isHostAction()         {}

// HostConfig are the timings of HostPolicy, in ticks.
type HostConfig struct {
	// HeartbeatTimeout: a peer not heard from for this long is unreachable.
	HeartbeatTimeout int
	// LeaseTTL is the lease's time to live in the store.
	LeaseTTL int
	// FenceMargin: how long before its lease could expire (or its peer's confirmation goes
	// stale) a primary freezes its QEMU; it covers the time the freeze takes and clock drift.
	FenceMargin int
	// RenewEvery is the interval of lease renewals (and of a secondary's store probes).
	RenewEvery int
	// AcquireEvery is the interval of attempts to acquire the lease.
	AcquireEvery int
	// StandDownAfter: a secondary whose peer is unreachable while the peer keeps the lease
	// renewed for this long drops its secondary (the primary runs alone by then).
	StandDownAfter int
	// AutoReprotect: a primary running alone protects itself again when the peer is back.
	AutoReprotect bool
	// RetryTicks and MaxRetryTicks: the backoff between protection attempts.
	RetryTicks, MaxRetryTicks int
}

func (c HostConfig) validate() error {
	switch {
	case c.LeaseTTL <= 0 || c.HeartbeatTimeout <= 0 || c.RenewEvery <= 0 || c.AcquireEvery <= 0:
		return fmt.Errorf("host policy: every timing must be positive: %+v", c)
	case c.FenceMargin <= 0 || c.FenceMargin >= c.LeaseTTL || c.FenceMargin >= c.HeartbeatTimeout:
		return fmt.Errorf("host policy: the fence margin (%d) must be positive and below the lease TTL (%d) and the heartbeat timeout (%d)", c.FenceMargin, c.LeaseTTL, c.HeartbeatTimeout)
	case c.RenewEvery >= c.LeaseTTL-c.FenceMargin:
		return fmt.Errorf("host policy: renewals every %d ticks cannot keep a lease of %d ticks with a fence margin of %d", c.RenewEvery, c.LeaseTTL, c.FenceMargin)
	}
	return nil
}

// HostPolicy is the state machine of one host's side of a pair. It does no I/O and reads no
// clock. Not safe for concurrent use; the agent's runner owns it.
type HostPolicy struct {
	cfg  HostConfig
	self string
	now  int
	role HostRole
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
	storeHolder   LeaseHolder // from the last probe or refusal
	storeSeen     int         // when storeHolder was learnt

	colo         bool // as primary: in COLO with the peer's secondary
	marked       bool // the primary record says what we do now
	fenced       bool
	fencedEpoch  uint64 // the epoch we held when we froze
	confirmUntil int    // a primary may run without its lease until this tick
	lastConfirm  int    // as secondary: when we last confirmed
	handOver     bool   // the peer asked us to take over

	peerSeen    int // when the request of the last successful exchange was sent (or one arrived)
	peerEver    bool
	peer        PeerView
	peerLostAt  int // when the peer was first seen unreachable (-1: it is reachable)
	retryIn     int
	backoff     int
	wantPrimary bool // HStart was asked here
	failovers   int
}

// NewHostPolicy returns the idle side of host self.
func NewHostPolicy(cfg HostConfig, self string) (*HostPolicy, error) {
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
	return &HostPolicy{cfg: cfg, self: self, role: RoleIdle, lastConfirm: -1 << 30, backoff: cfg.RetryTicks, peerLostAt: -1}, nil
}

// Role returns what this side does now.
func (h *HostPolicy) Role() HostRole { return h.role }

// Why says why the side is in its role.
func (h *HostPolicy) Why() string { return h.why }

// Epoch returns the highest fencing epoch this side knows.
func (h *HostPolicy) Epoch() uint64 { return h.epoch }

// Generation returns the current protection generation.
func (h *HostPolicy) Generation() int { return h.gen }

// Holds reports whether this side holds the lease (as far as it knows).
func (h *HostPolicy) Holds() bool { return h.held }

// LeaseEpoch returns the epoch of the lease this side holds or held last.
func (h *HostPolicy) LeaseEpoch() uint64 { return h.leaseEpoch }

// Fenced reports whether this side's QEMU is frozen.
func (h *HostPolicy) Fenced() bool { return h.fenced }

// Colo reports whether this side's QEMU is in COLO with the peer.
func (h *HostPolicy) Colo() bool {
	return (h.isPrimary() && h.colo) || h.role == RoleSecondary
}

// StoreOK reports whether the last store request succeeded.
func (h *HostPolicy) StoreOK() bool { return h.storeOK }

// PeerReachable reports whether the peer was heard from within the heartbeat timeout.
func (h *HostPolicy) PeerReachable() bool {
	return h.peerEver && h.now-h.peerSeen < h.cfg.HeartbeatTimeout
}

// Peer returns the peer's view from its last heartbeat.
func (h *HostPolicy) Peer() PeerView { return h.peer }

// Failovers counts the takeovers and goes-alone this side did.
func (h *HostPolicy) Failovers() int { return h.failovers }

// Now returns the logical time.
func (h *HostPolicy) Now() int { return h.now }

// Releasing reports whether this side may release guest output now: it runs the primary,
// unfrozen, and holds the lease or a fresh confirmation.
func (h *HostPolicy) Releasing() bool {
	return h.isPrimary() && !h.fenced && h.mayRun()
}

func (h *HostPolicy) isPrimary() bool { return runsVM(h.role) }

// runsVM reports whether a side in role r runs the VM as its primary.
func runsVM(r HostRole) bool {
	return r == RolePrimary || r == RoleProtecting || r == RoleAlone || r == RoleTakingOver || r == RoleBooting
}

func (h *HostPolicy) mayRun() bool {
	return (h.held && h.now < h.leaseDeadline) || h.now < h.confirmUntil
}

func (h *HostPolicy) record(colo bool) PrimaryRecord {
	return PrimaryRecord{Holder: h.self, Epoch: h.leaseEpoch, Gen: h.gen, Colo: colo}
}

// View is this side as the peer sees it in heartbeats, without a confirmation.
func (h *HostPolicy) View() PeerView {
	return PeerView{Role: h.role, Epoch: h.epoch, Gen: h.gen, Colo: h.Colo(), Fenced: h.fenced, StoreOK: h.storeOK}
}

// ErrStaleEpoch is wrapped by the error of a peer request whose fencing epoch is older than
// the receiver's.
var ErrStaleEpoch = errors.New("stale fencing epoch")

// Step feeds one event and returns the actions to carry out, in order. Requests the side
// cannot take return an error wrapping ErrWrongState or ErrStaleEpoch, and change nothing.
func (h *HostPolicy) Step(ev HostEvent) ([]HostAction, error) {
	var acts []HostAction
	switch e := ev.(type) {
	case HTick:
		h.now++
		acts = h.tick()
	case HStart:
		if h.role != RoleIdle && h.role != RoleFailed {
			return nil, fmt.Errorf("start: this side is %s: %w", h.role, ErrWrongState)
		}
		h.wantPrimary, h.role, h.why = true, RoleIdle, "starting"
		acts = h.tryAcquire()
	case HStop:
		acts = h.stop()
	case HSwitchover:
		if h.role != RolePrimary || !h.colo || h.fenced || !h.PeerReachable() || !h.marked || h.peer.Role != RoleSecondary || h.peer.Gen != h.gen {
			return nil, fmt.Errorf("switchover: this side is %s (protected=%v, recorded=%v, peer reachable=%v, peer %s), only a protected primary with its secondary in COLO can switch over: %w",
				h.role, h.colo, h.marked, h.PeerReachable(), h.peer.Role, ErrWrongState)
		}
		acts = []HostAction{ActHSwitchover{}}
		acts = append(acts, h.handOverActions("planned switchover")...)
	case HLeaseAcquired:
		acts = h.acquired(e)
	case HLeaseHeld:
		h.acquiring, h.storeOK = false, true
		h.storeHolder, h.storeSeen = e.Holder, h.now
		// Another side holding the lease does not make our VM stale: it may only be checking
		// the primary record, and give the lease back. The record decides, when we acquire.
		h.learnEpoch(e.Holder.Epoch)
	case HLeaseRenewed:
		h.renewing, h.storeOK = false, true
		if h.held {
			h.leaseDeadline = max(h.leaseDeadline, e.SentAt+h.cfg.LeaseTTL-h.cfg.FenceMargin)
			if h.fenced && h.fencedEpoch == h.leaseEpoch && h.mayRun() {
				// The lease never lapsed: nobody else can have run the VM.
				h.fenced, h.why = false, "lease renewed again"
				acts = append(acts, ActHUnfence{})
			}
		}
	case HLeaseLost:
		h.renewing, h.storeOK = false, true
		h.held = false
		acts = h.enforce()
		if h.isPrimary() {
			acts = append(acts, h.tryAcquire()...)
		}
	case HStoreDown:
		h.acquiring, h.renewing, h.probing, h.storeOK = false, false, false, false
	case HStoreOK:
		h.probing, h.storeOK = false, true
		h.storeHolder, h.storeSeen = e.Holder, h.now
		h.learnEpoch(e.Holder.Epoch)
	case HPeerReply:
		if e.View.Confirm && h.isPrimary() {
			h.confirmUntil = max(h.confirmUntil, e.SentAt+h.cfg.HeartbeatTimeout-h.cfg.FenceMargin)
			if h.fenced && h.fencedEpoch == h.leaseEpoch && h.mayRun() {
				// Frozen because the store went away before the secondary said so: the
				// secondary is still in COLO with us and will not take over while it
				// confirms, so nobody else runs the VM.
				h.fenced, h.why = false, "running on the secondary's confirmation: the store is unreachable"
				acts = append(acts, ActHUnfence{})
			}
		}
		acts = append(acts, h.peerHeard(e.SentAt, e.View)...)
	case HPeerRequest:
		acts = h.peerHeard(h.now, e.View)
	case HLocalFailed:
		acts = h.localFailed(e.Why)
	case HHandOver:
		if e.Epoch < h.epoch {
			return nil, fmt.Errorf("hand-over of epoch %d: this side knows epoch %d: %w", e.Epoch, h.epoch, ErrStaleEpoch)
		}
		if h.role != RoleSecondary {
			return nil, fmt.Errorf("hand-over: this side is %s, not a secondary in COLO: %w", h.role, ErrWrongState)
		}
		h.handOver = true
		acts = h.tryAcquire()
	case HBooted:
		if h.role == RoleBooting {
			h.role, h.why, h.colo, h.retryIn = RolePrimary, "running unprotected", false, 0
		}
	case HBootFailed:
		if h.role == RoleBooting {
			h.role, h.why = RoleFailed, "the primary did not start: "+e.Err
			acts = append(acts, ActHKill{Why: "boot failed"})
			acts = append(acts, h.release()...)
		}
	case HProtected:
		if h.role == RoleProtecting && e.Gen == h.gen {
			h.role, h.colo, h.marked, h.why, h.backoff = RolePrimary, true, false, "", h.cfg.RetryTicks
			acts = append(acts, ActHMark{Rec: h.record(true)})
		}
	case HProtectFailed:
		if h.role == RoleProtecting && e.Gen == h.gen {
			h.role, h.colo, h.why = RolePrimary, false, "protection failed: "+e.Err
			h.retryIn, h.backoff = h.backoff, min(h.backoff*2, h.cfg.MaxRetryTicks)
			acts = append(acts, ActHTearDownPeer{Gen: e.Gen})
		}
	case HMarked:
		if e.Rec == h.record(h.colo) {
			h.marked = true
		}
	case HPrepare:
		if e.Epoch < h.epoch {
			return nil, fmt.Errorf("prepare secondary for epoch %d: this side knows epoch %d: %w", e.Epoch, h.epoch, ErrStaleEpoch)
		}
		if h.role != RoleIdle && h.role != RoleFailed && h.role != RoleJoining && h.role != RoleSecondary {
			return nil, fmt.Errorf("prepare secondary: this side is %s: %w", h.role, ErrWrongState)
		}
		if h.role == RoleJoining || h.role == RoleSecondary {
			acts = append(acts, ActHKill{Why: fmt.Sprintf("replaced by generation %d", e.Gen)})
		}
		h.epoch, h.gen, h.role, h.why, h.handOver, h.wantPrimary = e.Epoch, e.Gen, RoleJoining, "", false, false
		acts = append(acts, ActHPrepare{Gen: e.Gen})
	case HPrepared:
		// Joining until the peer reports COLO of this generation.
	case HPrepareFailed:
		if h.role == RoleJoining && e.Gen == h.gen {
			h.role, h.why = RoleIdle, "preparing the secondary failed: "+e.Err
			acts = append(acts, ActHKill{Why: "prepare failed"})
		}
	case HTearDown:
		if (h.role == RoleJoining || h.role == RoleSecondary) && e.Gen == h.gen {
			h.role, h.why = RoleIdle, "torn down by the primary"
			acts = append(acts, ActHKill{Why: "torn down"})
		}
	case HTakeoverDone:
		if h.role == RoleTakingOver {
			h.role, h.colo, h.marked, h.why, h.retryIn = RolePrimary, false, true, "took over", h.cfg.RetryTicks
		}
	case HTakeoverFailed:
		if h.role == RoleTakingOver {
			if e.StoreDown {
				// Nothing changed on the secondary: give the lease back and try again.
				h.role, h.why = RoleSecondary, "takeover postponed: "+e.Err
				h.failovers--
				acts = append(acts, h.release()...)
			} else {
				h.role, h.why = RoleFailed, "takeover failed: "+e.Err
				acts = append(acts, ActHKill{Why: "takeover failed"})
				acts = append(acts, h.release()...)
			}
		}
	case HAloneDone:
		if h.role == RoleAlone {
			h.role, h.colo, h.marked, h.retryIn = RolePrimary, false, true, h.cfg.RetryTicks
		}
	case HAloneFailed:
		if h.role == RoleAlone {
			if e.StoreDown {
				// Still in COLO, output held by colo-compare: try again at the next tick.
				h.role, h.colo, h.why = RolePrimary, true, "going alone postponed: "+e.Err
				h.failovers--
			} else {
				h.role, h.why = RoleFailed, "failover as primary failed: "+e.Err
				acts = append(acts, ActHKill{Why: "failover as primary failed"})
				acts = append(acts, h.release()...)
			}
		}
	default:
		return nil, fmt.Errorf("unknown host event %T", ev)
	}
	acts = append(acts, h.enforce()...)
	return acts, nil
}

// Confirm decides, for the reply to a peer's heartbeat, whether this side confirms that the
// peer may run without renewing its lease, and records when it did.
func (h *HostPolicy) Confirm(peer PeerView) bool {
	ok := h.role == RoleSecondary && !h.storeOK && peer.Epoch == h.epoch && peer.Gen == h.gen && peer.Colo &&
		peer.Role == RolePrimary
	if ok {
		h.lastConfirm = h.now
	}
	return ok
}

func (h *HostPolicy) learnEpoch(e uint64) {
	if e > h.epoch {
		h.epoch = e
	}
}

func (h *HostPolicy) release() []HostAction {
	if !h.held {
		return nil
	}
	h.held = false
	return []HostAction{ActHRelease{Epoch: h.leaseEpoch}}
}

func (h *HostPolicy) tryAcquire() []HostAction {
	if h.acquiring || h.held || (h.acquireAt > 0 && h.now-h.acquireAt < h.cfg.AcquireEvery && !h.handOver) {
		return nil
	}
	h.acquiring, h.acquireAt = true, h.now
	return []HostAction{ActHAcquire{SentAt: h.now}}
}

func (h *HostPolicy) becomeStale(why string) []HostAction {
	acts := []HostAction{ActHKill{Why: "stale: " + why}}
	acts = append(acts, h.release()...)
	h.role, h.fenced, h.colo, h.marked, h.why = RoleIdle, false, false, false, "stale: "+why
	return acts
}

func (h *HostPolicy) acquired(e HLeaseAcquired) []HostAction {
	h.acquiring, h.storeOK = false, true
	oldLease := h.leaseEpoch
	h.held, h.leaseEpoch = true, e.Epoch
	h.leaseDeadline = e.SentAt + h.cfg.LeaseTTL - h.cfg.FenceMargin
	h.storeHolder, h.storeSeen = LeaseHolder{Holder: h.self, Epoch: e.Epoch}, h.now
	h.nextRenew = h.now + h.cfg.RenewEvery
	h.learnEpoch(e.Epoch)
	// Only a side about to release output writes the record, so a record that is still ours
	// says nobody else released output since (our last mark may be older than our last lease,
	// when the store went away before it was written).
	mine := e.Prev.Holder == h.self && e.Prev.Epoch <= oldLease && oldLease != 0
	switch {
	case h.isPrimary():
		if !mine {
			return h.becomeStale(fmt.Sprintf("%s ran the VM at epoch %d meanwhile", e.Prev.Holder, e.Prev.Epoch))
		}
		// Ours again, and nobody ran the VM meanwhile: the record moves to the new epoch.
		var acts []HostAction
		if h.fenced {
			h.fenced, h.why = false, "lease regained"
			acts = append(acts, ActHUnfence{})
		}
		h.marked = false
		return append(acts, ActHMark{Rec: h.record(h.colo)})
	case h.role == RoleSecondary:
		if e.Prev.Holder == h.self || e.Prev.Gen != h.gen || !e.Prev.Colo {
			// The primary released output without us since our last checkpoint: our copy is
			// stale, and the primary's is the VM. Give the lease back for it.
			acts := h.becomeStale(fmt.Sprintf("the primary record (%s, epoch %d, generation %d, colo %v) is not generation %d in COLO", e.Prev.Holder, e.Prev.Epoch, e.Prev.Gen, e.Prev.Colo, h.gen))
			return acts
		}
		h.role, h.failovers = RoleTakingOver, h.failovers+1
		why := "primary unreachable"
		if h.handOver {
			why = "handed over"
		} else if h.PeerReachable() {
			why = fmt.Sprintf("primary is %s", h.peer.Role)
			if h.peer.Fenced {
				why = "primary is frozen"
			}
		}
		h.why, h.handOver = why, false
		return []HostAction{ActHTakeOver{Yank: !h.PeerReachable() || h.peer.Fenced, Why: why, Rec: h.record(false)}}
	case h.role == RoleIdle && h.wantPrimary && e.Prev.Holder == "":
		h.role, h.why, h.wantPrimary = RoleBooting, "", false
		return []HostAction{ActHBoot{}, ActHMark{Rec: h.record(false)}}
	}
	// Nothing to do with a lease here.
	if h.role == RoleIdle && h.wantPrimary {
		h.wantPrimary, h.why = false, fmt.Sprintf("the pair ran before (%s at epoch %d): not booting a new VM", e.Prev.Holder, e.Prev.Epoch)
	}
	return h.release()
}

func (h *HostPolicy) stop() []HostAction {
	var acts []HostAction
	if h.role != RoleIdle {
		acts = append(acts, ActHKill{Why: "stop"})
	}
	acts = append(acts, h.release()...)
	h.role, h.fenced, h.colo, h.wantPrimary, h.why = RoleIdle, false, false, false, "stopped"
	return acts
}

// handOverActions give the lease up and ask the peer to take over; our QEMU is dead or
// killed by the actions before these.
func (h *HostPolicy) handOverActions(why string) []HostAction {
	acts := h.release()
	acts = append(acts, ActHHandOver{Epoch: h.epoch, Why: why})
	h.role, h.colo, h.fenced, h.marked, h.why = RoleIdle, false, false, false, why
	return acts
}

func (h *HostPolicy) localFailed(why string) []HostAction {
	switch {
	case h.role == RolePrimary && h.colo && !h.fenced:
		// The fast path: our primary is dead; the peer's secondary takes over once we let go.
		return append([]HostAction{ActHKill{Why: why}}, h.handOverActions("primary failed: "+why)...)
	case h.isPrimary():
		acts := []HostAction{ActHKill{Why: why}}
		acts = append(acts, h.release()...)
		h.role, h.colo, h.fenced, h.why = RoleFailed, false, false, "the VM is lost: unprotected primary "+why
		return acts
	case h.role == RoleJoining || h.role == RoleSecondary:
		h.role, h.why = RoleIdle, "secondary "+why
		return []HostAction{ActHKill{Why: why}}
	}
	return nil
}

func (h *HostPolicy) peerHeard(sentAt int, v PeerView) []HostAction {
	if !h.peerEver || sentAt > h.peerSeen {
		h.peerSeen = sentAt
	}
	h.peerEver = true
	h.peer = v
	h.peerLostAt = -1
	var acts []HostAction
	peerRuns := runsVM(v.Role)
	if v.Epoch > h.leaseEpoch && peerRuns && h.isPrimary() {
		// The peer runs the VM under a newer lease than ours: what runs here is stale.
		acts = append(acts, h.becomeStale(fmt.Sprintf("the peer is primary at epoch %d", v.Epoch))...)
	}
	if v.Epoch > h.epoch && peerRuns {
		if h.isPrimary() {
			acts = append(acts, h.becomeStale(fmt.Sprintf("the peer is primary at epoch %d", v.Epoch))...)
		}
		h.epoch = v.Epoch // a secondary follows its primary's epoch
	}
	if h.role == RoleJoining && v.Colo && v.Gen == h.gen && v.Epoch == h.epoch {
		h.role, h.why = RoleSecondary, ""
	}
	if h.role == RoleJoining && v.Epoch == h.epoch && (v.Gen > h.gen || (v.Gen == h.gen && v.Role == RolePrimary && !v.Colo)) {
		// The protection this secondary was prepared for ended without it.
		h.role, h.why = RoleIdle, "the primary's protection ended without this secondary"
		acts = append(acts, ActHKill{Why: h.why})
	}
	if h.role == RoleSecondary && v.Role == RolePrimary && !v.Colo && v.Gen == h.gen && !v.Fenced {
		// Our primary runs on without us: this secondary is stale.
		h.role, h.why = RoleIdle, "the primary runs without this secondary"
		acts = append(acts, ActHKill{Why: h.why})
	}
	if h.role == RolePrimary && h.colo && !h.fenced && !v.Colo && v.Gen == h.gen && (v.Role == RoleIdle || v.Role == RoleFailed) {
		acts = append(acts, h.goAlone(false, "the secondary is gone")...)
	}
	return acts
}

func (h *HostPolicy) goAlone(yank bool, why string) []HostAction {
	h.role, h.why = RoleAlone, why
	h.failovers++
	return []HostAction{ActHGoAlone{Yank: yank, Why: why, Rec: h.record(false)}}
}

func (h *HostPolicy) tick() []HostAction {
	var acts []HostAction
	reach := h.PeerReachable()
	if !reach && h.peerLostAt < 0 {
		h.peerLostAt = h.now
	}
	if h.acquiring && h.now-h.acquireAt >= h.cfg.AcquireEvery {
		h.acquiring = false // an answer that never came: ask again when needed
	}
	// The store: renew a held lease; the other roles probe it (a secondary's confirmations
	// depend on it).
	if h.now >= h.nextRenew {
		if h.held && !h.renewing {
			h.renewing, h.nextRenew = true, h.now+h.cfg.RenewEvery
			acts = append(acts, ActHRenew{SentAt: h.now})
		} else if !h.held && !h.probing && !h.acquiring {
			h.probing, h.nextRenew = true, h.now+h.cfg.RenewEvery
			acts = append(acts, ActHProbeStore{})
		}
	}
	if h.isPrimary() && !h.marked && h.held && h.role != RoleAlone && h.role != RoleTakingOver && h.now%h.cfg.RenewEvery == 0 {
		acts = append(acts, ActHMark{Rec: h.record(h.colo)})
	}
	switch h.role {
	case RoleIdle:
		if h.wantPrimary {
			acts = append(acts, h.tryAcquire()...)
		}
	case RolePrimary:
		switch {
		case !h.held:
			acts = append(acts, h.tryAcquire()...)
		case h.colo && !reach && !h.fenced:
			acts = append(acts, h.goAlone(true, "the secondary's host is unreachable")...)
		case !h.colo && !h.fenced && h.cfg.AutoReprotect && reach && (h.peer.Role == RoleIdle || h.peer.Role == RoleFailed) && h.peer.Epoch <= h.epoch:
			if h.retryIn > 0 {
				h.retryIn--
			} else {
				h.gen = max(h.gen, h.peer.Gen) + 1
				h.role = RoleProtecting
				acts = append(acts, ActHProtect{Gen: h.gen, Epoch: h.epoch})
			}
		}
	case RoleSecondary:
		wantLease := h.handOver || !reach || h.peer.Fenced || h.peer.Role == RoleIdle || h.peer.Role == RoleFailed
		if wantLease && h.now-h.lastConfirm >= h.cfg.HeartbeatTimeout {
			acts = append(acts, h.tryAcquire()...)
		}
		// The peer keeps its lease but we cannot reach it: it runs alone by now.
		if !reach && h.storeOK && h.storeHolder.Holder != "" && h.storeHolder.Holder != h.self &&
			h.peerLostAt >= 0 && h.storeSeen > h.peerLostAt+h.cfg.LeaseTTL && h.now-h.peerLostAt >= h.cfg.StandDownAfter {
			h.role, h.why = RoleIdle, "stood down: the primary keeps its lease but is unreachable"
			acts = append(acts, ActHKill{Why: h.why})
		}
	case RoleJoining:
		if !reach {
			h.role, h.why = RoleIdle, "the primary became unreachable before COLO"
			acts = append(acts, ActHKill{Why: h.why})
		}
	}
	return acts
}

// enforce freezes a primary that may no longer release output.
func (h *HostPolicy) enforce() []HostAction {
	if h.isPrimary() && !h.fenced && !h.mayRun() {
		h.fenced, h.fencedEpoch = true, h.leaseEpoch
		h.why = "lease not renewed in time and no confirmation from the secondary"
		return []HostAction{ActHFence{Why: h.why}}
	}
	return nil
}
