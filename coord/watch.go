package coord

import (
	"context"
	"errors"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// watchBuffer lets a consumer fall a little behind without stalling the watch goroutine; the
// goroutine never blocks anything but itself either way.
const watchBuffer = 16

// Backoff between attempts to list and watch again after the watch broke, so that a store that
// is down is not hammered, yet one that is back is noticed within a couple of seconds.
const (
	watchRetryMin = 100 * time.Millisecond
	watchRetryMax = 2 * time.Second
)

// errWatchClosed means the etcd watch channel closed without an error, which happens when the
// client is closing or the watch was cancelled by the server (e.g. no leader).
var errWatchClosed = errors.New("watch channel closed")

// watchLoop runs list-then-watch until ctx (or the store) ends. list returns the revision the
// listing was taken at; follow watches from the next one and returns when the watch breaks.
func (s *Etcd) watchLoop(ctx context.Context, what string, list func(context.Context) (int64, error), follow func(context.Context, int64) error) {
	delay := watchRetryMin
	for {
		rev, err := list(ctx)
		if err == nil {
			delay = watchRetryMin
			err = follow(ctx, rev)
		}
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("watch broke; listing again", "watch", what, "err", err, "retry_in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		delay = min(2*delay, watchRetryMax)
	}
}

// owned derives a context that also ends when the store is closed, and registers the goroutine
// that will use it so that Close can wait for it. ok is false once Close has begun.
func (s *Etcd) owned(ctx context.Context) (_ context.Context, done func(), ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, nil, false
	}
	s.wg.Add(1)
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() {
		stop()
		cancel()
		s.wg.Done()
	}, true
}

// send delivers v unless ctx ends first.
func send[T any](ctx context.Context, ch chan<- T, v T) bool {
	select {
	case ch <- v:
		return true
	case <-ctx.Done():
		return false
	}
}

// WatchPairs sends the current pairs and then every change, until ctx ends or the store is
// closed; then the channel is closed. After a broken watch (reconnect, compaction, leader loss)
// it lists again and sends only the differences, including Deleted events for pairs that
// vanished meanwhile.
func (s *Etcd) WatchPairs(ctx context.Context) <-chan PairEvent {
	out := make(chan PairEvent, watchBuffer)
	ctx, done, ok := s.owned(ctx)
	if !ok {
		close(out)
		return out
	}
	w := &pairWatcher{s: s, out: out, known: map[string]int64{}}
	go func() {
		defer close(out)
		defer done()
		s.watchLoop(ctx, "pairs", w.list, w.follow)
	}()
	return out
}

// pairWatcher is the state of one WatchPairs between its list and watch phases.
type pairWatcher struct {
	s   *Etcd
	out chan<- PairEvent
	// known maps each pair reported to the ModRevision reported, so that a re-list repeats
	// nothing the consumer has already seen and can tell which pairs vanished.
	known map[string]int64
}

// list reports the differences between the store and what was reported, and returns the
// revision of the listing.
func (w *pairWatcher) list(ctx context.Context) (int64, error) {
	prefix := w.s.pairKey("")
	resp, err := w.s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	seen := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), prefix)
		seen[name] = true
		if rev, ok := w.known[name]; ok && rev == kv.ModRevision {
			continue
		}
		if !send(ctx, w.out, PairEvent{Name: name, Value: kv.Value}) {
			return 0, ctx.Err()
		}
		w.known[name] = kv.ModRevision
	}
	for name := range w.known {
		if seen[name] {
			continue
		}
		if !send(ctx, w.out, PairEvent{Name: name, Deleted: true}) {
			return 0, ctx.Err()
		}
		delete(w.known, name)
	}
	return resp.Header.Revision, nil
}

// follow reports changes after rev until the watch breaks, returning why.
func (w *pairWatcher) follow(ctx context.Context, rev int64) error {
	prefix := w.s.pairKey("")
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// RequireLeader makes a member cut off from its cluster close the watch rather than
	// silently deliver nothing.
	wch := w.s.cli.Watch(clientv3.WithRequireLeader(wctx), prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return err
		}
		for _, ev := range resp.Events {
			name := strings.TrimPrefix(string(ev.Kv.Key), prefix)
			switch ev.Type {
			case clientv3.EventTypePut:
				if !send(ctx, w.out, PairEvent{Name: name, Value: ev.Kv.Value}) {
					return ctx.Err()
				}
				w.known[name] = ev.Kv.ModRevision
			case clientv3.EventTypeDelete:
				if _, ok := w.known[name]; !ok {
					continue
				}
				if !send(ctx, w.out, PairEvent{Name: name, Deleted: true}) {
					return ctx.Err()
				}
				delete(w.known, name)
			}
		}
	}
	return errWatchClosed
}

// WatchLease sends the pair's LeaseInfo now and at every change (Epoch 0 when freed or
// expired) until ctx ends or the store is closed; then the channel is closed. After a broken
// watch it reads the key again and sends it only if it differs from the last one sent.
func (s *Etcd) WatchLease(ctx context.Context, pair string) <-chan LeaseInfo {
	out := make(chan LeaseInfo, watchBuffer)
	if checkName("pair", pair) != nil {
		close(out)
		return out
	}
	ctx, done, ok := s.owned(ctx)
	if !ok {
		close(out)
		return out
	}
	w := &leaseWatcher{s: s, out: out, key: s.leaseKey(pair)}
	go func() {
		defer close(out)
		defer done()
		s.watchLoop(ctx, "lease "+pair, w.list, w.follow)
	}()
	return out
}

// leaseWatcher is the state of one WatchLease.
type leaseWatcher struct {
	s    *Etcd
	out  chan<- LeaseInfo
	key  string
	last LeaseInfo
	sent bool
}

// emit sends info unless it repeats the last one sent (a re-read after a reconnect).
func (w *leaseWatcher) emit(ctx context.Context, info LeaseInfo) bool {
	if w.sent && info == w.last {
		return true
	}
	if !send(ctx, w.out, info) {
		return false
	}
	w.last, w.sent = info, true
	return true
}

// list reads the key and reports it if it changed since the last report.
func (w *leaseWatcher) list(ctx context.Context) (int64, error) {
	resp, err := w.s.cli.Get(ctx, w.key)
	if err != nil {
		return 0, err
	}
	var info LeaseInfo
	if len(resp.Kvs) > 0 {
		info = leaseInfoOf(resp.Kvs[0])
	}
	if !w.emit(ctx, info) {
		return 0, ctx.Err()
	}
	return resp.Header.Revision, nil
}

// follow reports the key's changes after rev until the watch breaks, returning why.
func (w *leaseWatcher) follow(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := w.s.cli.Watch(clientv3.WithRequireLeader(wctx), w.key, clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return err
		}
		for _, ev := range resp.Events {
			var info LeaseInfo
			if ev.Type == clientv3.EventTypePut {
				info = leaseInfoOf(ev.Kv)
			}
			if !w.emit(ctx, info) {
				return ctx.Err()
			}
		}
	}
	return errWatchClosed
}
