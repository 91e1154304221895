package coord

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// shared is one embedded etcd for the tests that do not stop or restart their server; each test
// works under its own key prefix so that tests can run in parallel on it.
var shared *Embedded

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "coord-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	shared, err = StartEmbedded(EmbeddedConfig{Dir: filepath.Join(dir, "etcd")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	shared.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

// prefixes gives each test (each run of it, under -count) a key prefix of its own, shared by
// all the stores that test opens.
var (
	prefixes   sync.Map // testing.TB -> string
	prefixSeq  atomic.Int64
	processTag = strconv.FormatInt(time.Now().UnixNano(), 36)
)

func testPrefix(t testing.TB) string {
	p, _ := prefixes.LoadOrStore(t, fmt.Sprintf("/test/%s-%d/%s/", processTag, prefixSeq.Add(1), t.Name()))
	return p.(string)
}

// newStore returns a client of endpoints under the test's prefix, closed at cleanup.
func newStore(t testing.TB, endpoints []string) *Etcd {
	t.Helper()
	s, err := NewEtcd(EtcdConfig{
		Endpoints:   endpoints,
		DialTimeout: time.Second,
		Prefix:      testPrefix(t),
		Log:         slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	return s
}

// startTestEmbedded starts a server of the test's own, for tests that stop or restart it.
func startTestEmbedded(t *testing.T, dir string) *Embedded {
	t.Helper()
	start := time.Now()
	e, err := StartEmbedded(EmbeddedConfig{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("embedded etcd in %s ready in %v at %v", dir, time.Since(start).Round(time.Millisecond), e.Endpoints())
	t.Cleanup(func() { e.Close() })
	return e
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// recv waits up to d for a value from ch; ok is false on timeout or a closed channel.
func recv[T any](t *testing.T, ch <-chan T, d time.Duration) (T, bool) {
	t.Helper()
	select {
	case v, ok := <-ch:
		return v, ok
	case <-time.After(d):
		var zero T
		return zero, false
	}
}

// noMore fails if ch delivers anything within d.
func noMore[T any](t *testing.T, ch <-chan T, d time.Duration) {
	t.Helper()
	select {
	case v, ok := <-ch:
		if ok {
			t.Fatalf("unexpected extra value %+v", v)
		}
		t.Fatal("channel closed unexpectedly")
	case <-time.After(d):
	}
}

func mustCreate(t *testing.T, s *Etcd, name, value string) {
	t.Helper()
	if err := s.CreatePair(testCtx(t), name, []byte(value)); err != nil {
		t.Fatal(err)
	}
}

func TestPairs(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		op      func(ctx context.Context, s *Etcd) error
		wantErr error
		// want is the value of pair "p" afterwards; "" means it must not exist.
		want string
	}{
		{"create new", func(ctx context.Context, s *Etcd) error { return s.CreatePair(ctx, "q", []byte("q1")) }, nil, "v1"},
		{"create existing", func(ctx context.Context, s *Etcd) error { return s.CreatePair(ctx, "p", []byte("v2")) }, ErrExists, "v1"},
		{"update existing", func(ctx context.Context, s *Etcd) error { return s.UpdatePair(ctx, "p", []byte("v2")) }, nil, "v2"},
		{"update missing", func(ctx context.Context, s *Etcd) error { return s.UpdatePair(ctx, "nope", []byte("x")) }, ErrNotFound, "v1"},
		{"modify existing", func(ctx context.Context, s *Etcd) error {
			return s.ModifyPair(ctx, "p", func(old []byte) ([]byte, error) { return append(old, "+m"...), nil })
		}, nil, "v1+m"},
		{"modify missing", func(ctx context.Context, s *Etcd) error {
			return s.ModifyPair(ctx, "nope", func(old []byte) ([]byte, error) { return []byte("x"), nil })
		}, ErrNotFound, "v1"},
		{"modify refused by f", func(ctx context.Context, s *Etcd) error {
			return s.ModifyPair(ctx, "p", func(old []byte) ([]byte, error) { return []byte("x"), errRefused })
		}, errRefused, "v1"},
		{"get missing", func(ctx context.Context, s *Etcd) error { _, err := s.GetPair(ctx, "nope"); return err }, ErrNotFound, "v1"},
		{"delete existing", func(ctx context.Context, s *Etcd) error { return s.DeletePair(ctx, "p") }, nil, ""},
		{"delete missing", func(ctx context.Context, s *Etcd) error { return s.DeletePair(ctx, "nope") }, ErrNotFound, "v1"},
		{"empty name", func(ctx context.Context, s *Etcd) error { return s.CreatePair(ctx, "", []byte("x")) }, ErrInvalidName, "v1"},
		{"name with slash", func(ctx context.Context, s *Etcd) error { return s.CreatePair(ctx, "p/x", []byte("x")) }, ErrInvalidName, "v1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := testCtx(t)
			s := newStore(t, shared.Endpoints())
			mustCreate(t, s, "p", "v1")
			err := tc.op(ctx, s)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			got, err := s.GetPair(ctx, "p")
			switch {
			case tc.want == "" && !errors.Is(err, ErrNotFound):
				t.Fatalf("after: GetPair(p) = %q, %v; want ErrNotFound", got, err)
			case tc.want != "" && (err != nil || string(got) != tc.want):
				t.Fatalf("after: GetPair(p) = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

var errRefused = errors.New("refused")

// TestModifyPairConcurrent: concurrent modifications of one pair lose none of each other's.
func TestModifyPairConcurrent(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "p", "")
	const writers, each = 4, 10
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				errs <- s.ModifyPair(ctx, "p", func(old []byte) ([]byte, error) { return append(old, byte('a'+w)), nil })
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.GetPair(ctx, "p")
	if err != nil {
		t.Fatal(err)
	}
	for w := range writers {
		if n := strings.Count(string(got), string(rune('a'+w))); n != each {
			t.Fatalf("writer %d's modifications in the pair: %d of %d (value %q)", w, n, each, got)
		}
	}
}

func TestListPairs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	other, err := NewEtcd(EtcdConfig{Endpoints: shared.Endpoints(), Prefix: s.prefix + "x"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := other.CreatePair(ctx, "b", []byte("other prefix")); err != nil {
		t.Fatal(err)
	}
	got, err := s.ListPairs(ctx)
	if err != nil || len(got) != 0 {
		t.Fatalf("empty ListPairs = %v, %v", got, err)
	}
	want := map[string][]byte{"a": []byte("1"), "b": []byte("2"), "c": []byte("3")}
	for k, v := range want {
		mustCreate(t, s, k, string(v))
	}
	if err := s.DeletePair(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	delete(want, "c")
	got, err = s.ListPairs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !maps.EqualFunc(got, want, func(a, b []byte) bool { return string(a) == string(b) }) {
		t.Fatalf("ListPairs = %q, want %q", got, want)
	}
}

func TestWatchPairs(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	s := newStore(t, shared.Endpoints())
	mustCreate(t, s, "a", "a1")
	mustCreate(t, s, "b", "b1")

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := s.WatchPairs(wctx)
	// The initial listing comes in key order, then the changes in commit order.
	want := []PairEvent{{Name: "a", Value: []byte("a1")}, {Name: "b", Value: []byte("b1")}}
	check := func(want []PairEvent) {
		t.Helper()
		for _, w := range want {
			ev, ok := recv(t, ch, 5*time.Second)
			if !ok {
				t.Fatalf("no event, want %+v", w)
			}
			if ev.Name != w.Name || string(ev.Value) != string(w.Value) || ev.Deleted != w.Deleted {
				t.Fatalf("event %+v (value %q), want %+v (value %q)", ev, ev.Value, w, w.Value)
			}
		}
	}
	check(want)

	mustCreate(t, s, "c", "c1")
	if err := s.UpdatePair(ctx, "a", []byte("a2")); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePair(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	check([]PairEvent{{Name: "c", Value: []byte("c1")}, {Name: "a", Value: []byte("a2")}, {Name: "b", Deleted: true}})
	noMore(t, ch, 200*time.Millisecond)

	// The channel closes (BenchmarkWatchCloseAfterCancel measures how soon); liveness guards
	// only say that it does.
	cancel()
	for {
		select {
		case _, ok := <-ch:
			if ok {
				t.Fatal("event after cancel")
			}
			return
		case <-time.After(liveness):
			t.Fatalf("channel still open %v after cancel", liveness)
		}
	}
}

// liveness bounds a wait for something that must happen, not how soon: the benchmarks
// measure that.
const liveness = 30 * time.Second

// TestPairWatcherRelist drives the list and watch phases directly: a watch that broke must
// report only what changed meanwhile, vanished pairs included, and a compacted revision must
// break the watch rather than silently skip events.
func TestPairWatcherRelist(t *testing.T) {
	t.Parallel()
	// A server of its own because the compaction would disturb other tests' watches.
	e := startTestEmbedded(t, filepath.Join(t.TempDir(), "etcd"))
	ctx := testCtx(t)
	s := newStore(t, e.Endpoints())
	mustCreate(t, s, "a", "a1")
	mustCreate(t, s, "b", "b1")

	out := make(chan PairEvent, 100)
	w := &pairWatcher{s: s, out: out, known: map[string]int64{}}
	drain := func() []string {
		var got []string
		for {
			select {
			case ev := <-out:
				got = append(got, fmt.Sprintf("%s=%s/%v", ev.Name, ev.Value, ev.Deleted))
			default:
				return got
			}
		}
	}
	rev1, err := w.list(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(drain()); got != "[a=a1/false b=b1/false]" {
		t.Fatalf("first list: %s", got)
	}

	if err := s.UpdatePair(ctx, "a", []byte("a2")); err != nil {
		t.Fatal(err)
	}
	if err := s.DeletePair(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, s, "c", "c1")
	rev2, err := w.list(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(drain()); got != "[a=a2/false c=c1/false b=/true]" {
		t.Fatalf("re-list: %s", got)
	}
	if _, err := w.list(ctx); err != nil {
		t.Fatal(err)
	}
	if got := drain(); len(got) != 0 {
		t.Fatalf("re-list without changes sent %v", got)
	}

	if _, err := s.cli.Compact(ctx, rev2); err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err = w.follow(fctx, rev1)
	if err == nil || fctx.Err() != nil {
		t.Fatalf("follow from compacted revision %d: %v (ctx %v)", rev1, err, fctx.Err())
	}
	t.Logf("follow from compacted revision: %v", err)
}

func TestWatchClosedByStoreClose(t *testing.T) {
	t.Parallel()
	s := newStore(t, shared.Endpoints())
	pairs := s.WatchPairs(context.Background())
	lease := s.WatchLease(context.Background(), "p")
	if info, ok := recv(t, lease, 5*time.Second); !ok || info != (LeaseInfo{}) {
		t.Fatalf("first lease info %+v, %v", info, ok)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Close waits for the watch goroutines, so both channels are closed by now.
	for name, ch := range map[string]func() bool{
		"pairs": func() bool { _, ok := <-pairs; return ok },
		"lease": func() bool { _, ok := <-lease; return ok },
	} {
		if ch() {
			t.Errorf("%s channel still open after Close", name)
		}
	}
	if _, ok := <-s.WatchPairs(context.Background()); ok {
		t.Error("WatchPairs after Close delivered an event")
	}
}

// TestWatchSurvivesRestart stops the server under running watches and starts it again on the
// same data dir and client port: the watches must carry on by themselves.
func TestWatchSurvivesRestart(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "etcd")
	e := startTestEmbedded(t, dir)
	ctx := testCtx(t)
	s := newStore(t, e.Endpoints())
	mustCreate(t, s, "a", "a1")
	mustCreate(t, s, "p", "spec")
	pairs := s.WatchPairs(ctx)
	lease := s.WatchLease(ctx, "p")
	if ev, ok := recv(t, pairs, 5*time.Second); !ok || ev.Name != "a" {
		t.Fatalf("first pair event %+v, %v", ev, ok)
	}
	if ev, ok := recv(t, pairs, 5*time.Second); !ok || ev.Name != "p" {
		t.Fatalf("second pair event %+v, %v", ev, ok)
	}
	if info, ok := recv(t, lease, 5*time.Second); !ok || info != (LeaseInfo{}) {
		t.Fatalf("first lease info %+v, %v", info, ok)
	}

	start := time.Now()
	e.Close()
	t.Logf("embedded etcd with 2 open watches closed in %v", time.Since(start).Round(time.Millisecond))
	noMore(t, pairs, 300*time.Millisecond)
	start = time.Now()
	e2, err := StartEmbedded(EmbeddedConfig{Dir: dir, ClientURL: e.Endpoints()[0]})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	t.Logf("restarted in %v", time.Since(start).Round(time.Millisecond))

	start = time.Now()
	mustCreate(t, s, "b", "b1")
	h := mustAcquire(t, s, "p", "host-a", 5*time.Second)
	if ev, ok := recv(t, pairs, 10*time.Second); !ok || ev.Name != "b" || string(ev.Value) != "b1" || ev.Deleted {
		t.Fatalf("pair event after restart %+v, %v", ev, ok)
	}
	if info, ok := recv(t, lease, 10*time.Second); !ok || info != (LeaseInfo{Holder: "host-a", Epoch: h.Epoch}) {
		t.Fatalf("lease info after restart %+v, %v", info, ok)
	}
	t.Logf("watches delivered %v after the first write following the restart", time.Since(start).Round(time.Millisecond))
	// Both watches are still live, and the shutdown below must not have to wait for them.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}
