package client_test

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/fnv"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/client"
	"github.com/lockstepvm/lockstep/integration/guest/logsvc"
)

// service is the real workload service running in-process on loopback with
// a file as its disk.
type service struct {
	addr   string
	dev    *logsvc.FileDevice
	cancel context.CancelFunc
	done   chan error
}

func startService(t *testing.T, diskPath string) *service {
	t.Helper()
	dev, err := logsvc.OpenDevice(diskPath)
	if err != nil {
		t.Fatal(err)
	}
	l, err := logsvc.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &service{addr: ln.Addr().String(), dev: dev, cancel: cancel, done: make(chan error, 1)}
	go func() { s.done <- (&logsvc.Server{Log: l, Logf: t.Logf}).Serve(ctx, ln) }()
	t.Cleanup(s.stop)
	return s
}

// stop stops the service and closes its disk; it may be called twice.
func (s *service) stop() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	<-s.done
	s.dev.Close()
	s.cancel = nil
}

func newDisk(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 4<<20); err != nil {
		t.Fatal(err)
	}
	return path
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, addr string) *client.Client {
	t.Helper()
	c, err := client.Dial(ctxT(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func writeRange(t *testing.T, c *client.Client, from, to uint64) {
	t.Helper()
	ctx := ctxT(t)
	for n := from; n <= to; n++ {
		if err := c.Write(ctx, n, client.Payload(n)); err != nil {
			t.Fatalf("write %d: %v", n, err)
		}
	}
}

func checkSummaries(t *testing.T, c *client.Client, n uint64) {
	t.Helper()
	ctx := ctxT(t)
	want := client.Expected(n)
	if got, err := c.Query(ctx); err != nil || got != want {
		t.Fatalf("Query = %v, %v; want %v", got, err, want)
	}
	if got, err := c.QueryDisk(ctx); err != nil || got != want {
		t.Fatalf("QueryDisk = %v, %v; want %v", got, err, want)
	}
}

func TestWriteQueryRecover(t *testing.T) {
	disk := newDisk(t)
	svc := startService(t, disk)
	c := dial(t, svc.addr)
	ctx := ctxT(t)

	writeRange(t, c, 1, 200)
	checkSummaries(t, c, 200)

	// A gap and a repeat are refused, and change nothing.
	for _, n := range []uint64{202, 200, 1} {
		var se *client.ServerError
		if err := c.Write(ctx, n, client.Payload(n)); !errors.As(err, &se) {
			t.Fatalf("write %d: %v, want a ServerError", n, err)
		}
	}
	checkSummaries(t, c, 200)
	if d, err := c.Ping(ctx); err != nil || d <= 0 {
		t.Fatalf("Ping = %v, %v", d, err)
	}

	// A restarted service recovers the log from its disk and goes on.
	svc.stop()
	if _, err := c.Ping(ctx); err == nil {
		t.Fatal("ping answered by a stopped service")
	}
	svc2 := startService(t, disk)
	c2 := dial(t, svc2.addr)
	checkSummaries(t, c2, 200)
	writeRange(t, c2, 201, 250)
	checkSummaries(t, c2, 250)
}

// TestChecksumDefinition recomputes the summary from the documented
// definition with the standard library's FNV-1a, independently of package
// wire, and compares it with what the service reports.
func TestChecksumDefinition(t *testing.T) {
	svc := startService(t, newDisk(t))
	c := dial(t, svc.addr)
	const n = 37
	writeRange(t, c, 1, n)
	h := fnv.New64a()
	for i := uint64(1); i <= n; i++ {
		p := client.Payload(i)
		var hdr [12]byte
		binary.BigEndian.PutUint64(hdr[0:8], i)
		binary.BigEndian.PutUint32(hdr[8:12], uint32(len(p)))
		h.Write(hdr[:])
		h.Write(p)
	}
	got, err := c.Query(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if uint64(got.Checksum) != h.Sum64() || got.Count != n || got.Last != n {
		t.Fatalf("service summary %v, independent checksum %016x", got, h.Sum64())
	}
	if client.Expected(n) != got {
		t.Fatalf("Expected(%d) = %v, service %v", n, client.Expected(n), got)
	}
	if client.Expected(n) == client.Expected(n-1) {
		t.Fatal("Expected does not depend on n")
	}
}

// TestConcurrentWriters races writers on separate connections for the same
// record numbers: each number must be acknowledged to exactly one of them,
// and the log must hold exactly the acknowledged records.
func TestConcurrentWriters(t *testing.T) {
	svc := startService(t, newDisk(t))
	const writers, records = 4, 100
	ctx := ctxT(t)
	var (
		mu    sync.Mutex
		acked = make(map[uint64]int)
		wg    sync.WaitGroup
	)
	for w := 0; w < writers; w++ {
		c := dial(t, svc.addr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := uint64(1); n <= records; {
				err := c.Write(ctx, n, client.Payload(n))
				var se *client.ServerError
				switch {
				case err == nil:
					mu.Lock()
					acked[n]++
					mu.Unlock()
					n++
				case errors.As(err, &se):
					// Someone else got n first: learn where the log is.
					s, err := c.Query(ctx)
					if err != nil {
						t.Error(err)
						return
					}
					n = s.Last + 1
				default:
					t.Error(err)
					return
				}
			}
		}()
	}
	// A reader queries while the writers run: counts never go backwards.
	reader := dial(t, svc.addr)
	var prev uint64
	for i := 0; i < 50; i++ {
		s, err := reader.Query(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if s.Count < prev || s.Count != s.Last {
			t.Fatalf("summary went from count %d to %v", prev, s)
		}
		prev = s.Count
	}
	wg.Wait()
	for n := uint64(1); n <= records; n++ {
		if acked[n] != 1 {
			t.Errorf("record %d acknowledged %d times", n, acked[n])
		}
	}
	checkSummaries(t, reader, records)
}

// silentServer accepts connections and never answers.
func silentServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var conns []net.Conn
	var mu sync.Mutex
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

func TestDeadlineAndCancel(t *testing.T) {
	addr := silentServer(t)
	c := dial(t, addr)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := c.Write(ctx, 1, client.Payload(1))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("write to a silent server: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("deadline honoured only after %v", d)
	}
	// The reply to the timed-out request may still come: the client must
	// not take it for the reply to a later request.
	if _, err := c.Query(ctxT(t)); !errors.Is(err, client.ErrBroken) {
		t.Fatalf("call after a timeout: %v, want ErrBroken", err)
	}

	// Cancellation without a deadline unblocks a call too.
	c2 := dial(t, addr)
	ctx2, cancel2 := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel2)
	if _, err := c2.Ping(ctx2); !errors.Is(err, context.Canceled) {
		t.Fatalf("ping cancelled: %v, want Canceled", err)
	}
}

// TestDeadlineDoesNotLeak checks that a context that ends after a call
// returned does not break the next call.
func TestDeadlineDoesNotLeak(t *testing.T) {
	svc := startService(t, newDisk(t))
	c := dial(t, svc.addr)
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		if _, err := c.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	if _, err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	time.Sleep(50 * time.Millisecond)
	writeRange(t, c, 1, 3)
}

// TestDialReady waits for a service that comes up after a while, behind a
// listener that first accepts and drops connections as QEMU's forwarder does
// while the guest boots.
func TestDialReady(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	dropped := make(chan struct{})
	go func() {
		defer close(dropped)
		for i := 0; i < 3; i++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
		ln.Close()
	}()
	type result struct {
		c   *client.Client
		err error
	}
	res := make(chan result, 1)
	go func() {
		c, err := client.DialReady(ctxT(t), addr, 20*time.Millisecond)
		res <- result{c, err}
	}()
	<-dropped
	l, err := logsvc.Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	ln2, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&logsvc.Server{Log: l}).Serve(ctx, ln2) }()
	defer func() { cancel(); <-done }()
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.c.Close()
	if err := r.c.Write(ctxT(t), 1, client.Payload(1)); err != nil {
		t.Fatal(err)
	}

	// DialReady gives up when its context ends.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if _, err := client.DialReady(ctx2, silentServer(t), 20*time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("DialReady on a silent server: %v", err)
	}
}

func TestPayload(t *testing.T) {
	seen := make(map[string]bool)
	for n := uint64(1); n <= 1000; n++ {
		p := client.Payload(n)
		if len(p) != 64 || seen[string(p)] {
			t.Fatalf("Payload(%d) = %q: wrong size or repeated", n, p)
		}
		seen[string(p)] = true
	}
	if got := client.Payload(5); string(got) != "record 5 oxctzjdzuepqyrlxqrucegyofofclvqvhhhxdjynikwugwiikkkqxcm" {
		t.Fatalf("Payload(5) = %q changed: clients and stored disks no longer agree", got)
	}
}
