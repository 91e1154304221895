package coord

import (
	"context"
	"net"
	"testing"
	"time"
)

// The latencies the tests only check happen at all, measured: run with
// `go test -run '^$' -bench . ./coord/`.

// BenchmarkWatchCloseAfterCancel: from the cancel of a WatchPairs context to its channel's close.
func BenchmarkWatchCloseAfterCancel(b *testing.B) {
	s := newStore(b, shared.Endpoints())
	mustCreateB(b, s, "p")
	for b.Loop() {
		ctx, cancel := context.WithCancel(b.Context())
		ch := s.WatchPairs(ctx)
		<-ch // the current pair
		cancel()
		for range ch {
		}
	}
}

// BenchmarkCallStoreDown: a call against a store that does not answer, with a 300 ms context,
// until it fails with ErrUnavailable (it should take the context's time, not more).
func BenchmarkCallStoreDown(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := newStore(b, []string{"http://" + addr})
	for b.Loop() {
		ctx, cancel := context.WithTimeout(b.Context(), 300*time.Millisecond)
		if _, err := s.ListPairs(ctx); err == nil {
			b.Fatal("ListPairs against a closed port succeeded")
		}
		cancel()
	}
}

// BenchmarkLeaseExpiry: from an Acquire with a 1 s TTL that nobody renews to the key's deletion.
func BenchmarkLeaseExpiry(b *testing.B) {
	s := newStore(b, shared.Endpoints())
	mustCreateB(b, s, "p")
	for b.Loop() {
		if _, err := s.Acquire(b.Context(), "p", "host-a", time.Second); err != nil {
			b.Fatal(err)
		}
		for {
			info, err := s.Current(b.Context(), "p")
			if err != nil {
				b.Fatal(err)
			}
			if info.Epoch == 0 {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func mustCreateB(b *testing.B, s *Etcd, name string) {
	if err := s.CreatePair(b.Context(), name, []byte("spec")); err != nil {
		b.Fatal(err)
	}
}
