package controller

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lockstepvm/lockstep/coord"
)

// Store is what the agent needs of the coordination store (coord.Etcd has it all): pair specs,
// each pair's primary lease and primary record, and the agents' peer addresses.
type Store interface {
	coord.Store
	Record(ctx context.Context, pair string) ([]byte, error)
	Mark(ctx context.Context, h coord.Held, record []byte) error
	RegisterAgent(ctx context.Context, host, addr string) error
	AgentAddr(ctx context.Context, host string) (string, error)
}

// ioQueue runs a runner's store and peer requests one after another, in order, on one
// goroutine. It never drops a request: a lost lease release or primary record would be a
// safety input lost without a trace. Its length is bounded in practice by the policy, which
// has at most one renewal, probe and acquisition in flight; it is reported in the metrics.
type ioQueue struct {
	mu     sync.Mutex
	q      []func(context.Context)
	wake   chan struct{}
	length atomic.Int64
	peak   atomic.Int64
}

func newIOQueue() *ioQueue { return &ioQueue{wake: make(chan struct{}, 1)} }

// push queues f; it never blocks.
func (q *ioQueue) push(f func(context.Context)) {
	q.mu.Lock()
	q.q = append(q.q, f)
	n := int64(len(q.q))
	q.mu.Unlock()
	q.length.Store(n)
	if n > q.peak.Load() {
		q.peak.Store(n)
	}
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// run executes queued requests until ctx ends; what is still queued then is dropped with the
// runner (the agent is stopping: its successor re-reads the store).
func (q *ioQueue) run(ctx context.Context) {
	for {
		q.mu.Lock()
		var f func(context.Context)
		if len(q.q) > 0 {
			f = q.q[0]
			q.q[0] = nil
			q.q = q.q[1:]
		}
		n := int64(len(q.q))
		q.mu.Unlock()
		q.length.Store(n)
		if f != nil {
			f(ctx)
			continue
		}
		select {
		case <-q.wake:
		case <-ctx.Done():
			return
		}
	}
}

// storeEvent maps a failed request about the lease of epoch to the policy's event.
func storeEvent(err error, epoch uint64) Event {
	if errors.Is(err, coord.ErrLeaseLost) {
		return LeaseLost{Epoch: epoch}
	}
	return StoreDown{}
}

// storeIO is a runner's access to the store: the lease of its side, the pair's primary record.
type storeIO struct {
	st      Store
	pair    string
	holder  string
	ttl     time.Duration
	timeout time.Duration // one request (acquire, release, mark)
	probe   time.Duration // renewals and probes: a secondary must learn the store is gone quickly
}

// acquire resumes the lease held (an earlier agent's, saved to disk) or takes a free one, and
// reads the primary record under it. Without the record no decision is safe: the lease is
// given back.
func (s *storeIO) acquire(ctx context.Context, prev coord.Held, sentAt int) (coord.Held, Event) {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	var h coord.Held
	var err error
	if prev.Epoch != 0 && prev.Holder == s.holder {
		h, err = s.st.Resume(cctx, prev)
	}
	if prev.Epoch == 0 || prev.Holder != s.holder || errors.Is(err, coord.ErrLeaseLost) {
		h, err = s.st.Acquire(cctx, s.pair, s.holder, s.ttl)
	}
	var he *coord.HeldError
	switch {
	case err == nil:
		b, rerr := s.st.Record(cctx, s.pair)
		if rerr != nil {
			_ = s.st.Release(cctx, h)
			return coord.Held{}, StoreDown{}
		}
		var rec PrimaryRecord
		if len(b) > 0 {
			if err := json.Unmarshal(b, &rec); err != nil {
				_ = s.st.Release(cctx, h)
				return coord.Held{}, StoreDown{}
			}
		}
		return h, LeaseAcquired{Epoch: h.Epoch, SentAt: sentAt, Prev: rec}
	case errors.As(err, &he):
		return coord.Held{}, LeaseHeld{Holder: LeaseHolder{Holder: he.LeaseInfo.Holder, Epoch: he.LeaseInfo.Epoch}, SentAt: sentAt}
	}
	return coord.Held{}, StoreDown{}
}

func (s *storeIO) renew(ctx context.Context, h coord.Held, sentAt int) Event {
	cctx, cancel := context.WithTimeout(ctx, s.probe)
	defer cancel()
	if err := s.st.Renew(cctx, h); err != nil {
		return storeEvent(err, h.Epoch)
	}
	return LeaseRenewed{SentAt: sentAt, Epoch: h.Epoch}
}

func (s *storeIO) release(ctx context.Context, h coord.Held) error {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return s.st.Release(cctx, h)
}

func (s *storeIO) current(ctx context.Context, sentAt int) Event {
	cctx, cancel := context.WithTimeout(ctx, s.probe)
	defer cancel()
	li, err := s.st.Current(cctx, s.pair)
	if err != nil {
		return StoreDown{}
	}
	return StoreOK{Holder: LeaseHolder{Holder: li.Holder, Epoch: li.Epoch}, SentAt: sentAt}
}

// mark writes the primary record under the lease h: a transaction that succeeds only while h
// is still the pair's lease. It is the store transaction behind every decision that takes a
// side out of COLO.
func (s *storeIO) mark(ctx context.Context, h coord.Held, rec PrimaryRecord) error {
	if h.Epoch != rec.Epoch {
		return fmt.Errorf("mark at epoch %d with the lease of epoch %d: %w", rec.Epoch, h.Epoch, coord.ErrLeaseLost)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	return s.st.Mark(cctx, h, b)
}
