// Package controller is lockstep's agent: one per-side policy (pure: events in, actions out),
// one runner loop per (pair, side) that carries out its actions through checkpoint/, the peer
// link between the two sides of a pair (gRPC between hosts, in-process on one host), and the
// adapters that serve the operator's API.
//
// One model covers one host and two: a pair has two sides, and each side is run by the agent
// of the host its placement names. A pair whose two placements name this host runs both sides
// in this agent, joined by the in-process peer link; nothing else differs.
package controller

import (
	"errors"
	"time"
)

// State is the state of a pair as the API reports it.
type State string

// Pair states.
const (
	StateStopped      State = "stopped"      // no QEMU runs
	StateStarting     State = "starting"     // the primary boots
	StateProtecting   State = "protecting"   // a secondary joins: resync, then COLO
	StateProtected    State = "protected"    // both in COLO
	StateDegraded     State = "degraded"     // the VM runs unprotected
	StateFailingOver  State = "failing-over" // a failover sequence runs
	StateReprotecting State = "reprotecting" // a fresh secondary joins a survivor
	StateFailed       State = "failed"       // the VM is lost or needs the operator
)

// Side names one of the pair's two slots. Roles move between sides at failovers.
type Side int

// The two sides.
const (
	SideA Side = iota
	SideB
)

// Other returns the other side.
func (s Side) Other() Side { return 1 - s }

func (s Side) String() string {
	if s == SideA {
		return "a"
	}
	return "b"
}

// Role is what one side of a pair does now.
type Role string

// Side roles.
const (
	RoleIdle        Role = "idle"         // no QEMU of the pair runs on this side
	RoleBooting     Role = "booting"      // the primary QEMU starts (the lease is held)
	RolePrimary     Role = "primary"      // runs the VM: alone, or in COLO with the peer
	RoleProtecting  Role = "protecting"   // primary; a protection with the peer runs
	RoleAlone       Role = "going-alone"  // primary; failover as primary runs (peer lost)
	RoleHandingOver Role = "handing-over" // primary; a planned switchover flushes and stops it
	RoleJoining     Role = "joining"      // a secondary for the peer, not yet in COLO
	RoleSecondary   Role = "secondary"    // the secondary, in COLO with the peer
	RoleTakingOver  Role = "taking-over"  // failover as secondary runs (the lease is held)
	RoleFailed      Role = "failed"       // the VM is lost here; the operator decides
)

// runsVM reports whether a side in role r runs the VM as its primary.
func runsVM(r Role) bool {
	return r == RolePrimary || r == RoleProtecting || r == RoleAlone || r == RoleTakingOver || r == RoleBooting || r == RoleHandingOver
}

// Errors of the agent's API; the gRPC adapter maps them to codes.
var (
	// ErrNotFound: no pair of that name.
	ErrNotFound = errors.New("no such pair")
	// ErrExists: a pair of that name exists.
	ErrExists = errors.New("a pair with that name exists")
	// ErrWrongState is wrapped by the error of a request the pair cannot take in its current
	// state; such a request changes nothing.
	ErrWrongState = errors.New("not possible in the pair's current state")
	// ErrStaleEpoch is wrapped by the error of a peer request whose fencing epoch is older than
	// the receiver's.
	ErrStaleEpoch = errors.New("stale fencing epoch")
)

// DefaultTick is the policy's logical tick; the agent's timings are counted in ticks.
const DefaultTick = 100 * time.Millisecond
