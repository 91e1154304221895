package qmp_test

// Benchmarks of this client against a real QEMU, next to go-qemu's SocketMonitor and a raw
// socket loop (the floor):
//
//	go test -run '^$' -bench . -benchtime 2000x ./qmp/
//
// One QEMU process per QEMU version (7.2, 11.1; those found, else the benchmarks skip) serves
// every implementation: a QMP monitor takes one client at a time, so the process has one monitor
// per implementation and all of them talk to the same QEMU in the same run.
//
// One op is one query-status command and its reply; nobody decodes the command's result:
//   - raw: its own connection; per op it writes {"execute":"query-status"}\n and reads one line.
//   - raw-id: the same loop sending exactly the bytes this client sends, an "id":"ls-N" with N
//     counting from 1 per connection. QEMU reads a monitor's input one byte per read, so each
//     request byte costs QEMU a poll and a read: raw-id is the floor for this client's wire
//     format, raw the floor for QMP.
//   - lockstep: this client, Execute with a nil result under a context with a deadline.
//   - goqemu: go-qemu's SocketMonitor.Run, which sends {"execute":"query-status"} (no newline, no
//     id). The bytes Run returns alias its reader's buffer, which the next reply overwrites, so a
//     concurrent caller must not read them; they are not read here. Events is never called, so its
//     reader drops events rather than blocking.
//
// BenchmarkRoundTrip is sequential latency (ns/op). BenchmarkConcurrent8 runs 8 callers sharing
// one connection; its ns/op is wall time per call, the inverse of the calls/s it reports. Both
// report cpu-ns/op and csw/op, what the test process itself spent per call (CPU time of every
// thread, context switches), which other load on the machine disturbs much less than wall time.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
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
	// benchLimit bounds one connection's use so that a stuck QEMU fails a benchmark, not hangs it.
	benchLimit = 5 * time.Minute
)

// BenchmarkRoundTrip measures sequential round trips: one caller, one command at a time.
func BenchmarkRoundTrip(b *testing.B) {
	runImpls(b, []benchImpl{
		{"raw", "raw", dialRaw},
		{"raw-id", "raw", dialRawID},
		{"lockstep", "lockstep", dialLockstep},
		{"lockstep-nooob", "lockstep", dialLockstepNoOOB},
		{"goqemu", "goqemu", dialGoQEMU},
	}, func(b *testing.B, call func() error) {
		for range b.N {
			if err := call(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkConcurrent8 measures throughput with 8 callers sharing one connection. This client
// pipelines their commands (up to 7 in flight with OOB negotiated); go-qemu's Run holds a mutex
// across each round trip. raw-serial is the raw loop behind a mutex: the best a client that
// serialises its round trips can do.
func BenchmarkConcurrent8(b *testing.B) {
	runImpls(b, []benchImpl{
		{"raw-serial", "raw", dialRaw},
		{"lockstep", "lockstep", dialLockstep},
		{"lockstep-nooob", "lockstep", dialLockstepNoOOB},
		{"goqemu", "goqemu", dialGoQEMU},
	}, func(b *testing.B, call func() error) {
		runConcurrent(b, benchCallers, call)
	})
}

// benchImpl is one implementation under test.
type benchImpl struct {
	name string
	mon  string // which monitor of the QEMU it uses
	dial func(b *testing.B, path string) benchConn
}

// benchConn is one implementation's connection. call runs one command and waits for its reply;
// it is safe for concurrent use.
type benchConn struct {
	call  func() error
	close func()
}

// benchMonitors are the QMP monitors each benchmark QEMU has; "lockstep" is qemuenv's own.
var benchMonitors = []string{"raw", "goqemu"}

// runImpls starts the QEMUs and runs sub-benchmark <impl>/qemu-<version> for each pair; run
// makes b.N calls.
func runImpls(b *testing.B, impls []benchImpl, run func(b *testing.B, call func() error)) {
	qs := startBenchQEMUs(b)
	for _, impl := range impls {
		b.Run(impl.name, func(b *testing.B) {
			for _, bq := range qs {
				b.Run("qemu-"+bq.q.Name, func(b *testing.B) {
					bc := impl.dial(b, bq.socks[impl.mon])
					defer bc.close()
					for range benchWarmup {
						if err := bc.call(); err != nil {
							b.Fatal(err)
						}
					}
					b.ReportAllocs()
					usage := processUsage()
					b.ResetTimer()
					run(b, bc.call)
					b.StopTimer()
					usage.report(b)
				})
			}
		})
	}
}

// benchQEMU is one QEMU process with a QMP monitor for each implementation.
type benchQEMU struct {
	q     *qemuenv.QEMU
	p     *qemuenv.Process
	socks map[string]string // monitor name -> its unix socket
}

// startBenchQEMUs starts every available QEMU with -M none and the benchmark monitors; b's
// cleanup kills them. It skips b when there is no QEMU.
func startBenchQEMUs(b *testing.B) []*benchQEMU {
	b.Helper()
	var out []*benchQEMU
	for _, q := range qemuenv.All(b) {
		dir := qemuenv.ShortTempDir(b)
		args := []string{"-M", "none", "-nodefaults", "-display", "none", "-accel", "tcg"}
		socks := map[string]string{}
		for _, name := range benchMonitors {
			path := filepath.Join(dir, name+".sock")
			socks[name] = path
			// -mon is deprecated in 11.x (it warns) but is the one syntax both QEMUs take.
			args = append(args,
				"-chardev", fmt.Sprintf("socket,id=mon-%s,path=%s,server=on,wait=off", name, path),
				"-mon", fmt.Sprintf("chardev=mon-%s,mode=control", name))
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

// rawConn is the floor: one connection, one command written, one line read, no deadlines and no
// allocations. mu only serialises concurrent callers so that each reads its own reply.
type rawConn struct {
	mu   sync.Mutex
	c    net.Conn
	r    *bufio.Reader
	id   bool   // send an "id" as this client does
	n    uint64 // last id sent
	line []byte // request buffer
}

func dialRaw(b *testing.B, path string) benchConn   { return dialRawConn(b, path, false) }
func dialRawID(b *testing.B, path string) benchConn { return dialRawConn(b, path, true) }

func dialRawConn(b *testing.B, path string, id bool) benchConn {
	b.Helper()
	c, err := net.DialTimeout("unix", path, 10*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	rc := &rawConn{c: c, r: bufio.NewReaderSize(c, 64<<10), id: id}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	greeting, err := rc.r.ReadSlice('\n')
	if err == nil && !bytes.HasPrefix(greeting, []byte(`{"QMP"`)) {
		err = fmt.Errorf("not a greeting: %q", greeting)
	}
	if err == nil {
		_, err = c.Write(rc.request("qmp_capabilities"))
	}
	if err == nil {
		err = rc.readReply()
	}
	c.SetDeadline(time.Time{})
	if err != nil {
		c.Close()
		b.Fatalf("raw handshake: %v", err)
	}
	return benchConn{
		call: func() error {
			rc.mu.Lock()
			defer rc.mu.Unlock()
			if _, err := rc.c.Write(rc.request("query-status")); err != nil {
				return err
			}
			return rc.readReply()
		},
		close: func() { c.Close() },
	}
}

// request returns the line for command: {"execute":"command"}\n or, with ids, the bytes this
// client sends: {"execute":"command","id":N} (no newline).
func (rc *rawConn) request(command string) []byte {
	l := append(rc.line[:0], `{"execute":"`...)
	l = append(l, command...)
	l = append(l, '"')
	if rc.id {
		rc.n++
		l = append(l, `,"id":`...)
		l = strconv.AppendUint(l, rc.n, 10)
		l = append(l, '}')
	} else {
		l = append(l, "}\n"...)
	}
	rc.line = l
	return l
}

func (rc *rawConn) readReply() error {
	line, err := rc.r.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte(`{"return"`)) {
		return fmt.Errorf("raw: unexpected reply %q", line)
	}
	return nil
}

func dialLockstep(b *testing.B, path string) benchConn { return dialLockstepOpts(b, path) }

// dialLockstepNoOOB declines out-of-band execution, as go-qemu does: QEMU then runs in-band
// commands straight from the monitor instead of through its OOB dispatch queue.
func dialLockstepNoOOB(b *testing.B, path string) benchConn {
	return dialLockstepOpts(b, path, qmp.WithoutOOB(), qmp.WithMaxInflight(8))
}

func dialLockstepOpts(b *testing.B, path string, opts ...qmp.Option) benchConn {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), benchLimit)
	c, err := qmp.Dial(ctx, "unix", path, opts...)
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
	cmd := []byte(`{"execute":"query-status"}`)
	return benchConn{
		call: func() error {
			_, err := mon.Run(cmd) // the reply's bytes alias go-qemu's buffer: not read
			return err
		},
		// Disconnect closes the socket and drains the reply stream until go-qemu's reader exits.
		close: func() { mon.Disconnect() },
	}
}

// runConcurrent makes b.N calls from n goroutines and returns when all have ended.
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

// usage is what the test process has spent so far: CPU time (user and system, every thread) and
// context switches (voluntary and involuntary).
type usage struct {
	cpu time.Duration
	csw int64
}

func processUsage() usage {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return usage{}
	}
	return usage{cpu: time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), csw: ru.Nvcsw + ru.Nivcsw}
}

// report adds what was spent since u, per call, as the metrics cpu-ns/op and csw/op.
func (u usage) report(b *testing.B) {
	if b.N > 0 {
		now := processUsage()
		b.ReportMetric(float64(now.cpu-u.cpu)/float64(b.N), "cpu-ns/op")
		b.ReportMetric(float64(now.csw-u.csw)/float64(b.N), "csw/op")
	}
}
