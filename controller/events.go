package controller

import "fmt"

// The inputs and outputs of the per-side policy (policy.go), and its timings.

// PeerView is what a heartbeat tells of the other side.
type PeerView struct {
	Role  Role
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

// LinkState is what the agent reads off its own copy of the migration connection of its
// side's QEMU: whether the QEMUs still exchange checkpoints.
type LinkState int

// Link states.
const (
	// LinkUnknown: the agent has no copy of the connection (none exists, or it was lost with an
	// earlier agent).
	LinkUnknown LinkState = iota
	// LinkActive: data arrived within the checkpoint interval and its margin.
	LinkActive
	// LinkQuiet: the connection is open but nothing arrived for longer than that.
	LinkQuiet
	// LinkClosed: the peer's end closed or reset the connection.
	LinkClosed
)

func (l LinkState) String() string {
	return [...]string{"unknown", "active", "quiet", "closed"}[l]
}

// HandOverKind says why a primary asks its peer to take over.
type HandOverKind int

// Hand-over kinds.
const (
	HandOverFailed  HandOverKind = iota // the primary's QEMU died or hangs
	HandOverPlanned                     // an operator's planned switchover (or a drain)
	HandOverForced                      // an operator's forced failover
)

// Events of the policy.
type (
	// Tick advances logical time by N ticks (1 normally; more when ticks were missed) and
	// brings what the runner read off the migration link.
	Tick struct {
		N    int
		Link LinkState
	}
	// Start asks the side to run the pair if it should: the side that ran the primary last
	// (the primary record's holder) boots the VM again from its disk; a pair that never ran
	// boots on its preferred side (Config.Preferred). Operator is an operator's StartPair;
	// otherwise (an agent starting with no QEMU to adopt) only a restart policy of always lets
	// a pair that ran before boot again.
	Start struct{ Operator bool }
	// Stop asks to stop this side (the pair is stopped or deleted); Why is the status' reason.
	Stop struct{ Why string }
	// FailoverRequest is an operator's request of the primary: a planned switchover (its held
	// output flushed first) or a forced failover (its QEMU killed at once).
	FailoverRequest struct {
		Forced bool
		Reason string
	}
	// ReprotectRequest is an operator's request to protect a primary that runs alone now.
	ReprotectRequest struct{}
	// LeaseAcquired: the store granted us the lease. Prev is the primary record found.
	LeaseAcquired struct {
		Epoch  uint64
		SentAt int
		Prev   PrimaryRecord
	}
	// LeaseHeld: an acquisition sent at SentAt was refused, the lease is Holder's.
	LeaseHeld struct {
		Holder LeaseHolder
		SentAt int
	}
	// LeaseRenewed: a renewal of the lease of epoch Epoch, sent at SentAt, was acknowledged.
	LeaseRenewed struct {
		SentAt int
		Epoch  uint64
	}
	// LeaseLost: the store says our lease of epoch Epoch is gone (0: whichever we hold).
	LeaseLost struct{ Epoch uint64 }
	// StoreDown: a store request failed for want of the store.
	StoreDown struct{}
	// StoreOK: a store probe sent at SentAt answered; Holder holds the lease now.
	StoreOK struct {
		Holder LeaseHolder
		SentAt int
	}
	// PeerReply: a heartbeat we sent at SentAt was answered.
	PeerReply struct {
		SentAt int
		View   PeerView
	}
	// PeerRequest: the peer's heartbeat arrived; the reply carries our view (Policy.Reply).
	PeerRequest struct{ View PeerView }
	// LocalFailed: our QEMU died or hangs (and is killed).
	LocalFailed struct{ Why string }
	// ColoLost: our QEMU left COLO by itself (COLO_EXIT with an error, or a failed
	// migration): its peer's QEMU or the link between them is gone.
	ColoLost struct{ Why string }
	// HandOverRequest: the peer asks us to take over (its primary died, or a switchover).
	HandOverRequest struct {
		Epoch uint64
		Kind  HandOverKind
		Why   string
	}
	// Booted, BootFailed: the end of ActBoot.
	Booted     struct{}
	BootFailed struct {
		Err       string
		StoreDown bool // the primary record was not written: nothing was started
	}
	// Protected, ProtectFailed: the end of ActProtect.
	Protected     struct{ Gen int }
	ProtectFailed struct {
		Gen int
		Err string
	}
	// PrepareRequest: the peer (a primary of epoch Epoch) asks for a secondary of generation Gen.
	PrepareRequest struct {
		Gen   int
		Epoch uint64
	}
	// Prepared, PrepareFailed: the end of ActStartSecondary.
	Prepared      struct{ Gen int }
	PrepareFailed struct {
		Gen int
		Err string
	}
	// TearDownRequest: the peer asks us to drop the secondary of generation Gen.
	TearDownRequest struct{ Gen int }
	// TakeoverDone, TakeoverFailed: the end of ActTakeOver. StoreDown: the primary record
	// could not be written (the store is unreachable, or the lease is gone), nothing was
	// changed, and the lease is released.
	TakeoverDone   struct{}
	TakeoverFailed struct {
		Err       string
		StoreDown bool
	}
	// AloneDone, AloneFailed: the end of ActGoAlone. StoreDown: the primary record could not
	// be written first, so the primary stays in COLO (its output held) and tries again.
	AloneDone   struct{}
	AloneFailed struct {
		Err       string
		StoreDown bool
	}
	// Marked: the primary record of an ActMark was written.
	Marked struct{ Rec PrimaryRecord }
	// SwitchedOver: the end of ActSwitchover; the old primary's QEMU is dead.
	SwitchedOver struct{}
	// Frozen: the runner found this side's QEMU stopped (SIGSTOP) though the policy had not
	// frozen it: the host's fence keeper did, its lease having lapsed as far as the keeper knew.
	Frozen struct{}
)

// Event is an input of the policy.
type Event interface{ isEvent() }

func (Tick) isEvent()             {}
func (Start) isEvent()            {}
func (Stop) isEvent()             {}
func (FailoverRequest) isEvent()  {}
func (ReprotectRequest) isEvent() {}
func (LeaseAcquired) isEvent()    {}
func (LeaseHeld) isEvent()        {}
func (LeaseRenewed) isEvent()     {}
func (LeaseLost) isEvent()        {}
func (StoreDown) isEvent()        {}
func (StoreOK) isEvent()          {}
func (PeerReply) isEvent()        {}
func (PeerRequest) isEvent()      {}
func (LocalFailed) isEvent()      {}
func (ColoLost) isEvent()         {}
func (HandOverRequest) isEvent()  {}
func (Booted) isEvent()           {}
func (BootFailed) isEvent()       {}
func (Protected) isEvent()        {}
func (ProtectFailed) isEvent()    {}
func (PrepareRequest) isEvent()   {}
func (Prepared) isEvent()         {}
func (PrepareFailed) isEvent()    {}
func (TearDownRequest) isEvent()  {}
func (TakeoverDone) isEvent()     {}
func (TakeoverFailed) isEvent()   {}
func (AloneDone) isEvent()        {}
func (AloneFailed) isEvent()      {}
func (Marked) isEvent()           {}
func (SwitchedOver) isEvent()     {}
func (Frozen) isEvent()           {}

// Action is an output of the policy for the runner to carry out.
type Action interface{ isAction() }

// Actions. Long ones report their end with an event (ActBoot → Booted/BootFailed, ActProtect →
// Protected/ProtectFailed, ActStartSecondary → Prepared/PrepareFailed, ActTakeOver →
// TakeoverDone/TakeoverFailed, ActGoAlone → AloneDone/AloneFailed); store requests report with
// LeaseAcquired/LeaseHeld/LeaseRenewed/LeaseLost/StoreOK/StoreDown.
type (
	// ActAcquire asks the store for the lease (resuming the one an earlier agent of this side
	// held, if any); SentAt is now.
	ActAcquire struct{ SentAt int }
	// ActRenew renews the held lease of epoch Epoch; SentAt is now.
	ActRenew struct {
		SentAt int
		Epoch  uint64
	}
	// ActRelease gives the lease up.
	ActRelease struct{ Epoch uint64 }
	// ActProbeStore asks the store who holds the lease; SentAt is now.
	ActProbeStore struct{ SentAt int }
	// ActBoot writes the primary record Rec (this side runs the VM alone), then starts the
	// primary QEMU here: a VM must never release output the record does not name, else a
	// secondary of an older generation could take over past it (BootFailed{StoreDown} when
	// the record cannot be written; nothing started then).
	ActBoot struct{ Rec PrimaryRecord }
	// ActProtect protects our primary with a secondary the peer prepares.
	ActProtect struct {
		Gen   int
		Epoch uint64
	}
	// ActStartSecondary starts a secondary here for the peer's primary.
	ActStartSecondary struct{ Gen int }
	// ActFreeze freezes our QEMU (SIGSTOP): it releases nothing until thawed or killed.
	ActFreeze struct{ Why string }
	// ActThaw resumes a frozen QEMU (SIGCONT).
	ActThaw struct{}
	// ActKill kills our QEMU.
	ActKill struct{ Why string }
	// ActTakeOver writes the primary record Rec (under the lease), then fails our secondary
	// over: it becomes the primary.
	ActTakeOver struct {
		Yank bool
		Why  string
		Kind HandOverKind
		Rec  PrimaryRecord
	}
	// ActGoAlone writes the primary record Rec (Colo false, under the lease), then makes our
	// primary run on without its secondary. Without the record written, nothing is done.
	ActGoAlone struct {
		Yank bool
		Why  string
		Rec  PrimaryRecord
	}
	// ActMark writes the primary record Rec under the lease (after COLO started, or after the
	// lease was regained).
	ActMark struct{ Rec PrimaryRecord }
	// ActHandOver asks the peer to take over at once.
	ActHandOver struct {
		Epoch uint64
		Kind  HandOverKind
		Why   string
	}
	// ActTearDownPeer asks the peer to drop its secondary of generation Gen.
	ActTearDownPeer struct{ Gen int }
	// ActSwitchover flushes our primary's held output with a checkpoint and kills it, then
	// reports SwitchedOver; the lease is held until then, and handed over after.
	ActSwitchover struct{}
)

func (ActAcquire) isAction()        {}
func (ActRenew) isAction()          {}
func (ActRelease) isAction()        {}
func (ActProbeStore) isAction()     {}
func (ActBoot) isAction()           {}
func (ActProtect) isAction()        {}
func (ActStartSecondary) isAction() {}
func (ActFreeze) isAction()         {}
func (ActThaw) isAction()           {}
func (ActKill) isAction()           {}
func (ActTakeOver) isAction()       {}
func (ActGoAlone) isAction()        {}
func (ActHandOver) isAction()       {}
func (ActTearDownPeer) isAction()   {}
func (ActSwitchover) isAction()     {}
func (ActMark) isAction()           {}

// Config are the timings of the policy, in ticks.
type Config struct {
	// HeartbeatTimeout: a peer not heard from for this long is unreachable.
	HeartbeatTimeout int
	// LeaseTTL is the lease's time to live in the store.
	LeaseTTL int
	// FenceMargin: how long before its lease could expire (or its peer's confirmation goes
	// stale) a primary freezes its QEMU; it covers the time the freeze takes and clock drift.
	FenceMargin int
	// RenewEvery is the interval of lease renewals (and of the other sides' store probes).
	RenewEvery int
	// AcquireEvery is the interval of attempts to acquire the lease.
	AcquireEvery int
	// StandDownAfter: a secondary whose peer is unreachable while the peer keeps the lease
	// renewed for this long drops its secondary (the primary runs alone by then).
	StandDownAfter int
	// AutoReprotect: a primary running alone protects itself again when the peer is back.
	AutoReprotect bool
	// RetryTicks and MaxRetryTicks: the backoff between protection attempts, and between cold
	// restarts.
	RetryTicks, MaxRetryTicks int
	// Preferred: this side boots a pair that never ran (the primary placement's side).
	Preferred bool
	// Restart: when the only running copy of the VM dies here (a primary with no secondary in
	// COLO to take over), boot it again from this side's disk (restart policy always).
	Restart bool
}

func (c Config) validate() error {
	switch {
	case c.LeaseTTL <= 0 || c.HeartbeatTimeout <= 0 || c.RenewEvery <= 0 || c.AcquireEvery <= 0:
		return fmt.Errorf("policy: every timing must be positive: %+v", c)
	case c.FenceMargin <= 0 || c.FenceMargin >= c.LeaseTTL || c.FenceMargin >= c.HeartbeatTimeout:
		return fmt.Errorf("policy: the fence margin (%d) must be positive and below the lease TTL (%d) and the heartbeat timeout (%d)", c.FenceMargin, c.LeaseTTL, c.HeartbeatTimeout)
	case c.RenewEvery >= c.LeaseTTL-c.FenceMargin:
		return fmt.Errorf("policy: renewals every %d ticks cannot keep a lease of %d ticks with a fence margin of %d", c.RenewEvery, c.LeaseTTL, c.FenceMargin)
	}
	return nil
}
