package coord

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func clientIDOf(h Held) clientv3.LeaseID { return clientv3.LeaseID(h.LeaseID) }

func mustAcquire(t *testing.T, s *Etcd, pair, holder string, ttl time.Duration) Held {
	t.Helper()
	h, err := s.Acquire(testCtx(t), pair, holder, ttl)
	if err != nil {
		t.Fatalf("Acquire(%s, %s): %v", pair, holder, err)
	}
	return h
}

func wantCurrent(t *testing.T, s *Etcd, pair string, want LeaseInfo) {
	t.Helper()
	got, err := s.Current(testCtx(t), pair)
	if err != nil || got != want {
		t.Fatalf("Current(%s) = %+v, %v; want %+v", pair, got, err, want)
	}
}

func TestAcquire(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")

	a := mustAcquire(t, s, "p", "host-a", time.Second)
	if a.Epoch == 0 || a.LeaseID == 0 || a.Pair != "p" || a.Holder != "host-a" || a.TTL != time.Second {
		t.Fatalf("Acquire = %+v", a)
	}
	wantCurrent(t, s, "p", LeaseInfo{Holder: "host-a", Epoch: a.Epoch})

	for _, holder := range []string{"host-b", "host-a"} {
		t.Run("held/"+holder, func(t *testing.T) {
			got, err := s.Acquire(ctx, "p", holder, time.Second)
			if !errors.Is(err, ErrHeld) {
				t.Fatalf("err = %v, want ErrHeld", err)
			}
			var he *HeldError
			if !errors.As(err, &he) || he.LeaseInfo != (LeaseInfo{Holder: "host-a", Epoch: a.Epoch}) || he.Pair != "p" {
				t.Fatalf("HeldError = %+v", he)
			}
			if got != (Held{Pair: "p", Holder: "host-a", Epoch: a.Epoch}) {
				t.Fatalf("Held on ErrHeld = %+v, want the current holder with no lease ID", got)
			}
			// The failed attempt must not have disturbed the holder.
			if err := s.Renew(ctx, a); err != nil {
				t.Fatalf("holder's Renew after a failed Acquire: %v", err)
			}
		})
	}

	if err := s.Release(ctx, a); err != nil {
		t.Fatal(err)
	}
	wantCurrent(t, s, "p", LeaseInfo{})
	b := mustAcquire(t, s, "p", "host-b", time.Second)
	if b.Epoch <= a.Epoch {
		t.Fatalf("epoch after re-acquisition %d, not above %d", b.Epoch, a.Epoch)
	}
	wantCurrent(t, s, "p", LeaseInfo{Holder: "host-b", Epoch: b.Epoch})
}

func TestAcquireArguments(t *testing.T) {
	t.Parallel()
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	cases := []struct {
		name    string
		pair    string
		holder  string
		ttl     time.Duration
		wantErr error
		wantTTL time.Duration
	}{
		{"rounds up a fraction", "p", "h1", 1500 * time.Millisecond, nil, 2 * time.Second},
		{"rounds up a nanosecond", "p", "h2", time.Nanosecond, nil, time.Second},
		{"whole seconds kept", "p", "h3", 3 * time.Second, nil, 3 * time.Second},
		{"no such pair", "nope", "h", time.Second, ErrNotFound, 0},
		{"empty holder", "p", "", time.Second, ErrInvalidName, 0},
		{"bad pair name", "a/b", "h", time.Second, ErrInvalidName, 0},
		{"zero ttl", "p", "h", 0, nil, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			h, err := s.Acquire(ctx, tc.pair, tc.holder, tc.ttl)
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
			case tc.wantTTL == 0:
				if err == nil {
					t.Fatalf("Acquire = %+v, want an error", h)
				}
			default:
				if err != nil {
					t.Fatal(err)
				}
				if h.TTL != tc.wantTTL {
					t.Fatalf("TTL = %v, want %v", h.TTL, tc.wantTTL)
				}
				ttl, err := s.cli.TimeToLive(ctx, clientIDOf(h))
				if err != nil || ttl.GrantedTTL != int64(tc.wantTTL/time.Second) {
					t.Fatalf("etcd granted %+v, %v; want %v", ttl, err, tc.wantTTL)
				}
				if err := s.Release(ctx, h); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

func TestRenewKeepsLease(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	h := mustAcquire(t, s, "p", "host-a", time.Second)
	end := time.Now().Add(2500 * time.Millisecond)
	n := 0
	for time.Now().Before(end) {
		time.Sleep(250 * time.Millisecond)
		if err := s.Renew(ctx, h); err != nil {
			t.Fatalf("renew %d: %v", n, err)
		}
		n++
	}
	wantCurrent(t, s, "p", LeaseInfo{Holder: "host-a", Epoch: h.Epoch})
	if n < 9 {
		t.Fatalf("only %d renewals in 2.5 s", n)
	}
}

func TestLeaseExpires(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	watch := s.WatchLease(ctx, "p")
	if info, ok := recv(t, watch, 5*time.Second); !ok || info != (LeaseInfo{}) {
		t.Fatalf("first WatchLease value %+v, %v; want free", info, ok)
	}

	start := time.Now()
	h := mustAcquire(t, s, "p", "host-a", time.Second)
	if info, ok := recv(t, watch, 5*time.Second); !ok || info != (LeaseInfo{Holder: "host-a", Epoch: h.Epoch}) {
		t.Fatalf("WatchLease after Acquire: %+v, %v", info, ok)
	}
	// Nobody renews: etcd must delete the key after about one TTL.
	var gone time.Duration
	for {
		info, err := s.Current(ctx, "p")
		if err != nil {
			t.Fatal(err)
		}
		if info.Epoch == 0 {
			gone = time.Since(start)
			break
		}
		if time.Since(start) > h.TTL+liveness {
			t.Fatalf("lease still %+v %v after Acquire with TTL %v", info, time.Since(start), h.TTL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("lease with TTL %v gone %v after Acquire", h.TTL, gone.Round(time.Millisecond))
	if gone < h.TTL {
		t.Fatalf("lease gone after %v, before its TTL %v", gone, h.TTL)
	}
	if info, ok := recv(t, watch, 2*time.Second); !ok || info != (LeaseInfo{}) {
		t.Fatalf("WatchLease after expiry: %+v, %v; want free", info, ok)
	}
	if err := s.Renew(ctx, h); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Renew after expiry: %v, want ErrLeaseLost", err)
	}
}

func TestWatchLease(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	a := mustAcquire(t, s, "p", "host-a", 5*time.Second)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch := s.WatchLease(wctx, "p")
	next := func(want LeaseInfo) {
		t.Helper()
		if info, ok := recv(t, watch, 5*time.Second); !ok || info != want {
			t.Fatalf("WatchLease = %+v, %v; want %+v", info, ok, want)
		}
	}
	next(LeaseInfo{Holder: "host-a", Epoch: a.Epoch})
	// A renewal changes nothing anyone watches for.
	if err := s.Renew(ctx, a); err != nil {
		t.Fatal(err)
	}
	if err := s.Release(ctx, a); err != nil {
		t.Fatal(err)
	}
	next(LeaseInfo{})
	b := mustAcquire(t, s, "p", "host-b", 5*time.Second)
	next(LeaseInfo{Holder: "host-b", Epoch: b.Epoch})
	if err := s.DeletePair(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	next(LeaseInfo{})
	noMore(t, watch, 200*time.Millisecond)
	cancel()
	if _, ok := recv(t, watch, 2*time.Second); ok {
		t.Fatal("WatchLease channel open after cancel")
	}
}

func TestRenewLost(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		// lose makes a's lease stale and returns the holder that should own the pair then.
		lose func(t *testing.T, s *Etcd, a Held) LeaseInfo
	}{
		{"expired", func(t *testing.T, s *Etcd, a Held) LeaseInfo {
			waitFree(t, s, "p")
			return LeaseInfo{}
		}},
		{"expired and taken by another", func(t *testing.T, s *Etcd, a Held) LeaseInfo {
			waitFree(t, s, "p")
			b := mustAcquire(t, s, "p", "host-b", 5*time.Second)
			return LeaseInfo{Holder: "host-b", Epoch: b.Epoch}
		}},
		{"key taken over while the etcd lease lives", func(t *testing.T, s *Etcd, a Held) LeaseInfo {
			// An operator deleting the key by hand: a's etcd lease still answers keepalives,
			// only the key's epoch tells a that it is no longer primary.
			if _, err := s.cli.Delete(testCtx(t), s.leaseKey("p")); err != nil {
				t.Fatal(err)
			}
			b := mustAcquire(t, s, "p", "host-b", 5*time.Second)
			return LeaseInfo{Holder: "host-b", Epoch: b.Epoch}
		}},
		{"released", func(t *testing.T, s *Etcd, a Held) LeaseInfo {
			if err := s.Release(testCtx(t), a); err != nil {
				t.Fatal(err)
			}
			return LeaseInfo{}
		}},
		{"pair deleted", func(t *testing.T, s *Etcd, a Held) LeaseInfo {
			if err := s.DeletePair(testCtx(t), "p"); err != nil {
				t.Fatal(err)
			}
			return LeaseInfo{}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			s := newStore(t, shared.Endpoints())
			mustCreate(t, s, "p", "spec")
			a := mustAcquire(t, s, "p", "host-a", time.Second)
			want := tc.lose(t, s, a)
			if err := s.Renew(ctx, a); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Renew of a stale lease: %v, want ErrLeaseLost", err)
			}
			if _, err := s.Resume(ctx, a); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Resume of a stale lease: %v, want ErrLeaseLost", err)
			}
			// Neither call may have touched the current owner.
			wantCurrent(t, s, "p", want)
			// A stale Renew revokes the orphaned etcd lease rather than leaving it to expire.
			ttl, err := s.cli.TimeToLive(ctx, clientIDOf(a))
			if err != nil || ttl.TTL > 0 {
				t.Fatalf("stale etcd lease: %+v, %v; want gone", ttl, err)
			}
		})
	}
}

// waitFree waits until the pair's lease key is gone.
func waitFree(t *testing.T, s *Etcd, pair string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		info, err := s.Current(testCtx(t), pair)
		if err != nil {
			t.Fatal(err)
		}
		if info.Epoch == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("lease of %s not free after 5 s", pair)
}

func TestResume(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	h := mustAcquire(t, s, "p", "host-a", 2*time.Second)

	// A restarted agent has a new client and only what it saved.
	restarted := newStore(t, shared.Endpoints())
	saved := h
	saved.TTL = 0
	got, err := restarted.Resume(ctx, saved)
	if err != nil {
		t.Fatal(err)
	}
	if got != h {
		t.Fatalf("Resume = %+v, want %+v", got, h)
	}
	if err := restarted.Renew(ctx, got); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name   string
		mangle func(Held) Held
	}{
		{"wrong epoch", func(h Held) Held { h.Epoch++; return h }},
		{"older epoch", func(h Held) Held { h.Epoch--; return h }},
		{"wrong etcd lease", func(h Held) Held { h.LeaseID++; return h }},
		{"wrong holder", func(h Held) Held { h.Holder = "host-b"; return h }},
		{"no lease", func(h Held) Held { h.LeaseID = 0; return h }},
		{"zero", func(Held) Held { return Held{Pair: "p"} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := restarted.Resume(ctx, tc.mangle(h)); !errors.Is(err, ErrLeaseLost) {
				t.Fatalf("Resume: %v, want ErrLeaseLost", err)
			}
		})
	}
	// The invalid attempts left the real holder alone.
	if err := restarted.Renew(ctx, h); err != nil {
		t.Fatalf("Renew after invalid Resumes: %v", err)
	}
	wantCurrent(t, s, "p", LeaseInfo{Holder: "host-a", Epoch: h.Epoch})
}

func TestReleaseIdempotent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	a := mustAcquire(t, s, "p", "host-a", 5*time.Second)
	for i := range 2 {
		if err := s.Release(ctx, a); err != nil {
			t.Fatalf("Release #%d: %v", i+1, err)
		}
		wantCurrent(t, s, "p", LeaseInfo{})
	}
	b := mustAcquire(t, s, "p", "host-b", 5*time.Second)
	// A late Release of the old epoch must not free the successor's lease.
	if err := s.Release(ctx, a); err != nil {
		t.Fatal(err)
	}
	wantCurrent(t, s, "p", LeaseInfo{Holder: "host-b", Epoch: b.Epoch})
	if err := s.Renew(ctx, b); err != nil {
		t.Fatalf("successor's Renew after a stale Release: %v", err)
	}
	if err := s.Release(ctx, Held{}); err != nil {
		t.Fatalf("Release of the zero Held: %v", err)
	}
}

func TestDeletePairRemovesLease(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "spec")
	mustCreate(t, s, "q", "spec")
	h := mustAcquire(t, s, "p", "host-a", 5*time.Second)
	q := mustAcquire(t, s, "q", "host-a", 5*time.Second)
	if err := s.DeletePair(ctx, "p"); err != nil {
		t.Fatal(err)
	}
	resp, err := s.cli.Get(ctx, s.leaseKey("p"))
	if err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("lease key after DeletePair: %v, %v", resp.Kvs, err)
	}
	wantCurrent(t, s, "p", LeaseInfo{})
	if err := s.Renew(ctx, h); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("Renew after DeletePair: %v, want ErrLeaseLost", err)
	}
	if _, err := s.Acquire(ctx, "p", "host-a", time.Second); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Acquire of a deleted pair: %v, want ErrNotFound", err)
	}
	// Only p's lease went.
	wantCurrent(t, s, "q", LeaseInfo{Holder: "host-a", Epoch: q.Epoch})
}

func TestStoreDown(t *testing.T) {
	t.Parallel()
	e := startTestEmbedded(t, filepath.Join(t.TempDir(), "etcd"))
	ctx := testCtx(t)
	s := newStore(t, e.Endpoints())
	mustCreate(t, s, "p", "spec")
	h := mustAcquire(t, s, "p", "host-a", 5*time.Second)

	start := time.Now()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("embedded etcd closed in %v", time.Since(start).Round(time.Millisecond))

	calls := []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"Renew", func(ctx context.Context) error { return s.Renew(ctx, h) }},
		{"Acquire", func(ctx context.Context) error { _, err := s.Acquire(ctx, "p", "host-b", time.Second); return err }},
		{"Resume", func(ctx context.Context) error { _, err := s.Resume(ctx, h); return err }},
		{"Release", func(ctx context.Context) error { return s.Release(ctx, h) }},
		{"Current", func(ctx context.Context) error { _, err := s.Current(ctx, "p"); return err }},
		{"GetPair", func(ctx context.Context) error { _, err := s.GetPair(ctx, "p"); return err }},
		{"CreatePair", func(ctx context.Context) error { return s.CreatePair(ctx, "q", nil) }},
	}
	for _, tc := range calls {
		t.Run(tc.name, func(t *testing.T) {
			cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			err := tc.call(cctx)
			d := time.Since(start)
			t.Logf("%s with the store down: %v after %v", tc.name, err, d.Round(time.Millisecond))
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("err = %v, want ErrUnavailable", err)
			}
			if errors.Is(err, ErrLeaseLost) {
				t.Fatalf("store down reported as lease lost: %v", err)
			}
			if d > liveness {
				t.Fatalf("took %v to fail", d)
			}
		})
	}

	// A caller that gives up is not a store that is down.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.Renew(cctx, h); err == nil || errors.Is(err, ErrUnavailable) {
		t.Fatalf("Renew with a cancelled ctx: %v, want a non-ErrUnavailable error", err)
	}
}

func TestRestartKeepsPairsAndLeases(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "etcd")
	e := startTestEmbedded(t, dir)
	ctx := testCtx(t)
	s := newStore(t, e.Endpoints())
	mustCreate(t, s, "a", "spec-a")
	mustCreate(t, s, "b", "spec-b")
	h := mustAcquire(t, s, "a", "host-a", 5*time.Second)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	e2 := startTestEmbedded(t, dir)
	t.Logf("restart on the same data dir took %v", time.Since(start).Round(time.Millisecond))

	s2 := newStore(t, e2.Endpoints())
	got, err := s2.ListPairs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || string(got["a"]) != "spec-a" || string(got["b"]) != "spec-b" {
		t.Fatalf("pairs after restart: %q", got)
	}
	// etcd keeps leases across a restart (their TTL starts again when the new leader takes
	// over), so an agent restarted with its embedded store keeps its primary role.
	r, err := s2.Resume(ctx, h)
	if err != nil {
		t.Fatalf("Resume after restart: %v", err)
	}
	if r != h {
		t.Fatalf("Resume after restart = %+v, want %+v", r, h)
	}
	// And the epoch stays monotone across the restart.
	if err := s2.Release(ctx, r); err != nil {
		t.Fatal(err)
	}
	n := mustAcquire(t, s2, "a", "host-b", time.Second)
	if n.Epoch <= h.Epoch {
		t.Fatalf("epoch after restart %d, not above %d", n.Epoch, h.Epoch)
	}
}
