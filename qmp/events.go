package qmp

import (
	"context"
	"sync"
)

// DefaultQueueLimit is the number of events a Subscription holds for its reader before it drops.
const DefaultQueueLimit = 1 << 16

// Subscription receives the events of one Client that pass its filter.
//
// Policy: each subscription has its own queue, appended to by the client's reader without ever
// waiting. The queue grows as needed up to its limit (DefaultQueueLimit unless set with
// SubscribeLimit); past the limit new events are dropped and counted (Dropped), so a subscriber
// that stops reading costs bounded memory and delays no one. Events are delivered in the order
// QEMU sent them. Read them with Next, or select on Ready and drain with TryNext.
//
// When the connection ends, the events already queued can still be read; after them Next returns
// the connection's error. Close ends the subscription at once.
type Subscription struct {
	names map[string]bool // nil: all events
	limit int

	mu      sync.Mutex
	queue   []*Event
	dropped uint64
	err     error // set when the subscription or its connection ended
	ready   chan struct{}
	c       *Client
}

// Subscribe returns a subscription to the events with the given names, or to all events when no
// name is given.
func (c *Client) Subscribe(names ...string) *Subscription {
	return c.SubscribeLimit(DefaultQueueLimit, names...)
}

// SubscribeLimit is Subscribe with a queue limit of its own.
func (c *Client) SubscribeLimit(limit int, names ...string) *Subscription {
	if limit <= 0 {
		limit = DefaultQueueLimit
	}
	s := &Subscription{limit: limit, ready: make(chan struct{}, 1), c: c}
	if len(names) > 0 {
		s.names = make(map[string]bool, len(names))
		for _, n := range names {
			s.names[n] = true
		}
	}
	c.mu.Lock()
	if c.subs == nil {
		err := c.closeErr
		c.mu.Unlock()
		s.end(err)
		return s
	}
	c.subs[s] = struct{}{}
	c.mu.Unlock()
	return s
}

func (s *Subscription) wants(name string) bool { return s.names == nil || s.names[name] }

// push appends ev without blocking; called by the client's reader.
func (s *Subscription) push(ev *Event) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	if len(s.queue) >= s.limit {
		s.dropped++
		s.mu.Unlock()
		return
	}
	s.queue = append(s.queue, ev)
	s.mu.Unlock()
	s.signal()
}

func (s *Subscription) signal() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// end marks the subscription finished with err; queued events stay readable.
func (s *Subscription) end(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.signal()
}

// Ready returns a channel that receives a value whenever events may be waiting or the
// subscription ended. After a receive, drain with TryNext until it reports nothing.
func (s *Subscription) Ready() <-chan struct{} { return s.ready }

// TryNext returns the next queued event without waiting. ok is false when none is queued; err is
// then set if the subscription has ended.
func (s *Subscription) TryNext() (ev *Event, ok bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.queue) > 0 {
		ev = s.queue[0]
		s.queue[0] = nil
		s.queue = s.queue[1:]
		if len(s.queue) == 0 {
			s.queue = nil // let the backing array go
		}
		return ev, true, nil
	}
	return nil, false, s.err
}

// Next waits for the next event, the end of ctx, or the end of the subscription.
func (s *Subscription) Next(ctx context.Context) (*Event, error) {
	for {
		ev, ok, err := s.TryNext()
		if ok {
			return ev, nil
		}
		if err != nil {
			return nil, err
		}
		select {
		case <-s.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Dropped returns how many events were dropped because the queue was full.
func (s *Subscription) Dropped() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dropped
}

// Len returns the number of queued events.
func (s *Subscription) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

// Close ends the subscription and discards its queue.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	if s.c.subs != nil {
		delete(s.c.subs, s)
	}
	s.c.mu.Unlock()
	s.mu.Lock()
	s.queue = nil
	if s.err == nil {
		s.err = ErrSubscriptionClosed
	}
	s.mu.Unlock()
	s.signal()
}
