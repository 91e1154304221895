// Package coord is lockstep's coordination store: pair specs and each pair's primary lease.
//
// The lease is what enforces DESIGN.md principle 2 ("never two primaries"): a side releases
// guest output only while it holds its pair's lease, so the store must tell apart three
// outcomes that lead to three different actions:
//   - the lease is ours (go on),
//   - the lease is gone or belongs to a newer epoch (ErrLeaseLost: fence now),
//   - the store cannot be reached (ErrUnavailable: fence before the lease could expire, unless
//     the peer confirms it cannot reach the store either).
//
// Store is the interface the controller uses; Etcd implements it on etcd v3, and Embedded runs a
// single-member etcd server inside the process for single-host mode and for tests.
package coord

import (
	"context"
	"errors"
	"time"
)

// The sentinel errors carry no "coord:" prefix because every error this package returns wraps
// them behind one that already names the package, the operation and the pair.
var (
	// ErrNotFound means there is no pair of that name.
	ErrNotFound = errors.New("no such pair")
	// ErrExists means a pair of that name exists already.
	ErrExists = errors.New("pair exists")
	// ErrHeld means another holder (or an earlier incarnation of this holder, which must use
	// Resume) holds the lease; the error text names holder and epoch.
	ErrHeld = errors.New("lease held")
	// ErrLeaseLost means the lease is no longer ours: it expired, was revoked or released, or the
	// key now belongs to another epoch. A primary that sees it must fence at once.
	ErrLeaseLost = errors.New("lease lost")
	// ErrUnavailable means the store could not be reached in time. The outcome of a write that
	// failed this way is unknown, so callers must treat the lease as "possibly still running out"
	// rather than as lost or as kept.
	ErrUnavailable = errors.New("store unavailable")
	// ErrInvalidName means a pair or holder name cannot be used as a key component (empty or
	// containing '/'), which would let one pair's key alias another's.
	ErrInvalidName = errors.New("invalid name")
)

// LeaseInfo is who holds a pair's primary lease. Epoch 0 means nobody does.
type LeaseInfo struct {
	Holder string
	// Epoch is the store revision at which this holder's tenure began. It strictly grows at every
	// new acquisition of any lease in the store, so a larger epoch always means a later primary
	// and can be used to fence stale peers.
	Epoch uint64
}

// Held is a lease this process holds. It is plain data so that an agent can save it to disk and
// Resume it after a restart.
type Held struct {
	Pair    string `json:"pair"`
	Holder  string `json:"holder"`
	Epoch   uint64 `json:"epoch"`
	LeaseID int64  `json:"lease_id"`
	// TTL is the TTL the store actually granted (whole seconds, at least the server's minimum),
	// which may exceed the one asked for; fencing deadlines must be computed from this value.
	TTL time.Duration `json:"ttl"`
}

// PairEvent is one change of a pair spec seen by WatchPairs.
type PairEvent struct {
	Name  string
	Value []byte
	// Deleted is set when the pair is gone; Value is then nil.
	Deleted bool
}

// Store is the coordination store as the controller sees it. Every method honours its ctx; an
// error that means the store could not be reached in time wraps ErrUnavailable. Calls wait for
// an unreachable store until their ctx ends (they do not fail on the first refused connection),
// so every call that matters for fencing needs a deadline.
type Store interface {
	// CreatePair stores a new pair spec; ErrExists if the name is taken.
	CreatePair(ctx context.Context, name string, value []byte) error
	// UpdatePair replaces a pair spec; ErrNotFound if absent.
	UpdatePair(ctx context.Context, name string, value []byte) error
	// ModifyPair replaces a pair spec with f of the stored one, atomically: when another
	// writer changed it meanwhile, f runs again on the newer spec. An error of f is returned
	// as is and nothing is written; ErrNotFound if absent.
	ModifyPair(ctx context.Context, name string, f func(old []byte) ([]byte, error)) error
	// GetPair returns a pair spec; ErrNotFound if absent.
	GetPair(ctx context.Context, name string) ([]byte, error)
	// ListPairs returns every pair spec by name.
	ListPairs(ctx context.Context) (map[string][]byte, error)
	// DeletePair removes a pair spec and, in the same transaction, its lease key, so that a
	// deleted pair cannot leave a primary behind; ErrNotFound if absent.
	DeletePair(ctx context.Context, name string) error
	// WatchPairs sends the current pairs (one event each) and then every change until ctx ends
	// or the store is closed, when the channel is closed. It survives reconnects and compaction
	// by listing again and sending Deleted events for pairs that vanished meanwhile.
	WatchPairs(ctx context.Context) <-chan PairEvent

	// Acquire takes the pair's primary lease for holder if nobody holds it, with a TTL of ttl
	// rounded up to whole seconds. If the lease is held (even by the same holder name, which
	// must use Resume instead), it returns the current LeaseInfo and an error wrapping ErrHeld.
	// ErrNotFound if the pair does not exist.
	Acquire(ctx context.Context, pair, holder string, ttl time.Duration) (Held, error)
	// Resume re-attaches to a lease held before a restart and refreshes it; ErrLeaseLost if the
	// key no longer carries h's epoch and etcd lease, or that lease has expired.
	Resume(ctx context.Context, h Held) (Held, error)
	// Renew refreshes the lease once and verifies the key still carries h's epoch; ErrLeaseLost
	// when not. The lease stays valid until at least the moment Renew was called plus h.TTL.
	Renew(ctx context.Context, h Held) error
	// Release gives the lease up if it is still h's epoch; releasing a lost lease is no error.
	Release(ctx context.Context, h Held) error
	// Current returns who holds the pair's lease now (Epoch 0 when free).
	Current(ctx context.Context, pair string) (LeaseInfo, error)
	// WatchLease sends the pair's LeaseInfo now and at every change (Epoch 0 when freed or
	// expired) until ctx ends or the store is closed, when the channel is closed.
	WatchLease(ctx context.Context, pair string) <-chan LeaseInfo
	// Close releases the connection; it does not release any lease.
	Close() error
}
