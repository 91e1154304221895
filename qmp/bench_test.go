package qmp_test

// Benchmarks of this client against a real QEMU, next to go-qemu's SocketMonitor and a raw
// socket loop (the floor). One QEMU process per QEMU version serves all three: it has one QMP
// monitor per implementation, since a QMP monitor takes one client at a time, so every
// implementation talks to the same process in the same run.
//
//	go test -run '^$' -bench . -benchtime 2000x ./qmp/
//
// One op is one query-status command and its reply. Nobody decodes the command's result: the raw
// loop reads the reply line, go-qemu's Run decodes the reply's envelope (and returns bytes that
// alias its reader's buffer, which a concurrent caller must not read, so they are not read here),
// and this client decodes the envelope and matches the id (Execute with a nil result).
// RoundTrip/lockstep-typed is QueryStatus, which also decodes the result.
//
// BenchmarkRoundTrip is sequential latency (ns/op). BenchmarkConcurrent8 runs 8 callers sharing
// one connection; its ns/op is wall time per call, the inverse of the calls/s it reports.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	goqemu "github.com/digitalocean/go-qemu/qmp"

	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

const (
	benchCallers = 8
	benchWarmup  = 50
	// benchLimit bounds a whole sub-benchmark so that a stuck QEMU fails it instead of hanging.
	benchLimit = 5 * time.Minute
)

// benchQEMU is one QEMU process with a QMP monitor for each implementation.
type benchQEMU struct {
	q     *qemuenv.QEMU
	p     *qemuenv.Process
	socks map[string]string // implementation -> its monitor's unix socket
}

// startBenchQEMUs starts every available QEMU with -M none and three QMP monitors; b's cleanup
// kills them. It skips b when there is no QEMU.
func startBenchQEMUs(b *testing.B) []*benchQEMU {
	b.Helper()
	var out []*benchQEMU
	for _, q := range qemuenv.All(b) {
		dir := qemuenv.ShortTempDir(b)
		args := []string{"-M", "none", "-nodefaults", "-display", "none", "-accel", "tcg"}
		socks := map[string]string{}
		for _, impl := range []string{"raw", "goqemu"} {
			path := filepath.Join(dir, impl+".sock")
			socks[impl] = path
			args = append(args,
				"-chardev", fmt.Sprintf("socket,id=mon-%s,path=%s,server=on,wait=off", impl, path),
				"-mon", fmt.Sprintf("chardev=mon-%s,mode=control", impl))
		}
		p := qemuenv.Start(b, q, dir, args...)
		socks["lockstep"] = p.QMPPath
		for _, path := range socks {
			waitSocket(b, q, p, path)
		}
		out = append(out, &benchQEMU{q: q, p: p, socks: socks})
	}
	return out
}

// waitSocket waits until QEMU listens on path (qemuenv.Start waits only for its own socket).
func waitSocket(b *testing.B, q *qemuenv.QEMU, p *qemuenv.Process, path string) {
	b.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("QEMU %s: monitor %s did not open: %v\n%s", q.Name, path, err, p.Stderr.String())
		}
		select {
		case <-p.Exited():
			b.Fatalf("QEMU %s exited\n%s", q.Name, p.Stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A benchConn is one implementation's connection: call runs one command and waits for its reply.
// call must be safe for concurrent use.
type benchConn struct {
	call  func() error
	close func()
}

type dialer func(b *testing.B, path string) benchConn

var queryStatusLine = []byte(`{"execute":"query-status"}` + "\n")

// rawConn is the floor: one connection, one command written, one line read. It has no ids, no
// events, no deadlines; mu only serialises callers so that each reads its own reply.
type rawConn struct {
	mu sync.Mutex
	c  net.Conn
	r  *bufio.Reader
}

func dialRaw(b *testing.B, path string) benchConn { return dialRawCaps(b, path, `{}`) }

func dialRawOOB(b *testing.B, path string) benchConn {
	return dialRawCaps(b, path, `{"enable":["oob"]}`)
}

func dialRawCaps(b *testing.B, path, caps string) benchConn {
	b.Helper()
	c, err := net.DialTimeout("unix", path, 10*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	rc := &rawConn{c: c, r: bufio.NewReaderSize(c, 64<<10)}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greeting, err := rc.r.ReadSlice('\n')
	if err == nil && !bytes.HasPrefix(greeting, []byte(`{"QMP"`)) {
		err = fmt.Errorf("not a greeting: %q", greeting)
	}
	if err == nil {
		_, err = c.Write([]byte(`{"execute":"qmp_capabilities","arguments":` + caps + "}\n"))
	}
	if err == nil {
		err = rc.roundTripReply()
	}
	c.SetDeadline(time.Time{})
	if err != nil {
		c.Close()
		b.Fatalf("raw handshake: %v", err)
	}
	return benchConn{call: rc.roundTrip, close: func() { c.Close() }}
}

func (rc *rawConn) roundTrip() error {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if _, err := rc.c.Write(queryStatusLine); err != nil {
		return err
	}
	return rc.roundTripReply()
}

func (rc *rawConn) roundTripReply() error {
	line, err := rc.r.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte(`{"return"`)) {
		return fmt.Errorf("raw: unexpected reply %q", line)
	}
	return nil
}

func dialLockstep(b *testing.B, path string) benchConn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), benchLimit)
	c, err := qmp.Dial(ctx, "unix", path)
	if err != nil {
		cancel()
		b.Fatal(err)
	}
	return benchConn{
		call:  func() error { return c.Execute(ctx, "query-status", nil, nil) },
		close: func() { c.Close(); cancel() },
	}
}

func dialGoQEMU(b *testing.B, path string) benchConn {
	b.Helper()
	mon, err := goqemu.NewSocketMonitor("unix", path, 10*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	if err := mon.Connect(); err != nil {
		mon.Disconnect()
		b.Fatal(err)
	}
	// Events is never called, so the monitor's reader drops events instead of blocking on them.
	cmd := []byte(`{"execute":"query-status"}`)
	return benchConn{
		call: func() error {
			// The returned bytes alias the monitor's scanner buffer; they are not read.
			_, err := mon.Run(cmd)
			return err
		},
		close: func() { mon.Disconnect() },
	}
}

// benchImpl is one implementation under test and the monitor it uses.
type benchImpl struct {
	name string
	sock string // key of benchQEMU.socks
	dial dialer
}

// BenchmarkRoundTrip measures sequential round trips: one caller, one command at a time.
func BenchmarkRoundTrip(b *testing.B) {
	qs := startBenchQEMUs(b)
	impls := []benchImpl{
		{"raw", "raw", dialRaw},
		{"lockstep", "lockstep", dialLockstep},
		{"goqemu", "goqemu", dialGoQEMU},
		{"lockstep-typed", "lockstep", dialLockstepQueryStatus},
		{"lockstep-nodeadline", "lockstep", dialLockstepNoDeadline},
		{"raw-oob", "raw", dialRawOOB},
		{"lockstep-nooob", "lockstep", dialLockstepNoOOB},
	}
	for _, impl := range impls {
		b.Run(impl.name, func(b *testing.B) {
			for _, bq := range qs {
				b.Run("qemu-"+bq.q.Name, func(b *testing.B) {
					bc := impl.dial(b, bq.socks[impl.sock])
					defer bc.close()
					for range benchWarmup {
						if err := bc.call(); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportAllocs()
					cpu := startCPU()
					b.ResetTimer()
					for range b.N {
						if err := bc.call(); err != nil {
							b.Fatal(err)
						}
					}
					b.StopTimer()
					cpu.report(b)
				})
			}
		})
	}
}

// dialLockstepQueryStatus is this client through its typed QueryStatus: the reply's result is
// decoded too.
func dialLockstepQueryStatus(b *testing.B, path string) benchConn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), benchLimit)
	c, err := qmp.Dial(ctx, "unix", path)
	if err != nil {
		cancel()
		b.Fatal(err)
	}
	return benchConn{
		call: func() error {
			st, err := c.QueryStatus(ctx)
			if err == nil && st.Status == "" {
				err = errors.New("query-status: empty status")
			}
			return err
		},
		close: func() { c.Close(); cancel() },
	}
}

// BenchmarkConcurrent8 measures throughput with 8 callers sharing one connection. This client
// pipelines their commands (up to 7 in flight with OOB negotiated); go-qemu's Run holds a mutex
// across each round trip. raw-serial is the raw loop behind a mutex: the best a client that
// serialises round trips can do.
func BenchmarkConcurrent8(b *testing.B) {
	qs := startBenchQEMUs(b)
	impls := []benchImpl{
		{"raw-serial", "raw", dialRaw},
		{"lockstep", "lockstep", dialLockstep},
		{"goqemu", "goqemu", dialGoQEMU},
	}
	for _, impl := range impls {
		b.Run(impl.name, func(b *testing.B) {
			for _, bq := range qs {
				b.Run("qemu-"+bq.q.Name, func(b *testing.B) {
					bc := impl.dial(b, bq.socks[impl.sock])
					defer bc.close()
					for range benchWarmup {
						if err := bc.call(); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportAllocs()
					cpu := startCPU()
					b.ResetTimer()
					runConcurrent(b, benchCallers, bc.call)
					cpu.report(b)
				})
			}
		})
	}
}

// runConcurrent makes b.N calls from n goroutines and waits for all of them.
func runConcurrent(b *testing.B, n int, call func() error) {
	var next atomic.Int64
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				if err := call(); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Error(err)
	}
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(b.N)/s, "calls/s")
	}
}

// cpuMeter measures what the test process itself spends per call, which other load on the
// machine disturbs much less than wall time: CPU time (user and system, every thread) and
// context switches (voluntary and involuntary: each is a thread that slept or was preempted).
type cpuMeter struct {
	cpu time.Duration
	csw int64
}

func processUsage() cpuMeter {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return cpuMeter{}
	}
	return cpuMeter{cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), csw: ru.Nvcsw + ru.Nivcsw}
}

func startCPU() cpuMeter { return processUsage() }

// report adds the metrics cpu-ns/op and csw/op.
func (m cpuMeter) report(b *testing.B) {
	if b.N > 0 {
		now := processUsage()
		b.ReportMetric(float64(now.cpu-m.cpu)/float64(b.N), "cpu-ns/op")
		b.ReportMetric(float64(now.csw-m.csw)/float64(b.N), "csw/op")
	}
}

func dialLockstepNoDeadline(b *testing.B, path string) benchConn {
	b.Helper()
	c, err := qmp.Dial(context.Background(), "unix", path)
	if err != nil {
		b.Fatal(err)
	}
	return benchConn{
		call:  func() error { return c.Execute(context.Background(), "query-status", nil, nil) },
		close: func() { c.Close() },
	}
}

func dialLockstepNoOOB(b *testing.B, path string) benchConn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), benchLimit)
	c, err := qmp.Dial(ctx, "unix", path, qmp.WithoutOOB())
	if err != nil {
		cancel()
		b.Fatal(err)
	}
	return benchConn{
		call:  func() error { return c.Execute(ctx, "query-status", nil, nil) },
		close: func() { c.Close(); cancel() },
	}
}
