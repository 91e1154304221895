package guest_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest"
	"github.com/lockstepvm/lockstep/integration/guest/client"
)

// qemuBinary returns the QEMU to boot the guest with: $LOCKSTEP_QEMU72, or
// qemu-system-x86_64 from PATH. It skips the test when there is none.
func qemuBinary(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("LOCKSTEP_QEMU72")
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		t.Skipf("no QEMU to boot the guest (%v): apt-get install qemu-system-x86, or set LOCKSTEP_QEMU72", err)
	}
	return path
}

// vm is one QEMU process running the guest, killed when the test ends.
type vm struct {
	cmd     *exec.Cmd
	addr    string // host side of the forwarded workload port
	serial  string // path of the serial console log
	started time.Time
	exited  chan struct{} // closed when QEMU has exited and been reaped
	stderr  *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// boot starts QEMU on the guest with disk as its IDE disk and the workload's
// port forwarded from a free loopback port.
func boot(t *testing.T, qemu string, p guest.Paths, disk, name string) *vm {
	t.Helper()
	// The free port may be taken before QEMU binds it; QEMU then exits at
	// once, and another port is tried.
	for attempt := 1; ; attempt++ {
		port := freePort(t)
		v := &vm{
			addr:   fmt.Sprintf("127.0.0.1:%d", port),
			serial: filepath.Join(t.TempDir(), name+"-serial.log"),
			exited: make(chan struct{}),
			stderr: &lockedBuffer{},
		}
		v.cmd = exec.Command(qemu,
			"-accel", "tcg", "-M", "pc", "-m", "128",
			"-nodefaults", "-nographic", "-no-reboot",
			"-serial", "file:"+v.serial,
			"-kernel", p.Kernel, "-initrd", p.Initrd,
			"-append", guest.KernelCmdline("", ""),
			"-drive", "file="+disk+",if=ide,format=raw",
			"-netdev", fmt.Sprintf("user,id=n0,hostfwd=tcp:127.0.0.1:%d-10.0.2.15:%d", port, guest.Port),
			"-device", "e1000,netdev=n0,mac=52:54:00:12:34:56"+guest.NICOptions(context.Background(), qemu),
		)
		v.cmd.Stdout = v.stderr
		v.cmd.Stderr = v.stderr
		v.started = time.Now()
		if err := v.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			v.cmd.Wait()
			close(v.exited)
		}()
		t.Cleanup(v.kill)
		select {
		case <-v.exited:
			if attempt < 3 && strings.Contains(v.stderr.String(), "host forwarding") {
				continue
			}
			t.Fatalf("QEMU exited at once: %v\n%s", v.cmd.ProcessState, v.stderr.String())
		case <-time.After(500 * time.Millisecond):
		}
		return v
	}
}

// kill kills QEMU by its PID, as a power cut would, and reaps it.
func (v *vm) kill() {
	v.cmd.Process.Kill()
	<-v.exited
}

// console returns the serial console output so far.
func (v *vm) console(t *testing.T) string {
	b, err := os.ReadFile(v.serial)
	if err != nil {
		t.Logf("serial log: %v", err)
	}
	return string(b)
}

// waitReady waits for the workload to answer a ping, failing early if QEMU
// exits, and returns a connection to it and the time since QEMU started.
func (v *vm) waitReady(t *testing.T, timeout time.Duration) (*client.Client, time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// Stop waiting as soon as QEMU dies, and note when the console shows
	// the service listening; the goroutine ends with ctx.
	marked := make(chan time.Duration, 1)
	go func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-v.exited:
				cancel()
				return
			case <-ctx.Done():
				return
			case <-tick.C:
				if b, _ := os.ReadFile(v.serial); bytes.Contains(b, []byte(guest.ReadyMarker)) {
					marked <- time.Since(v.started)
					return
				}
			}
		}
	}()
	c, err := client.DialReady(ctx, v.addr, 50*time.Millisecond)
	if err != nil {
		select {
		case <-v.exited:
			err = fmt.Errorf("QEMU exited (%v): %s", v.cmd.ProcessState, v.stderr.String())
		default:
		}
		t.Fatalf("guest service not ready: %v\nserial console:\n%s", err, v.console(t))
	}
	took := time.Since(v.started)
	select {
	case d := <-marked:
		t.Logf("console showed the service listening %v after QEMU started", d.Round(time.Millisecond))
	default:
	}
	t.Cleanup(func() { c.Close() })
	return c, took
}

func TestBootWriteRecover(t *testing.T) {
	qemu := qemuBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	paths, err := guest.Build(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: kernel %s, initrd %s", paths.Kernel, paths.Initrd)
	disk := filepath.Join(t.TempDir(), "disk.img")
	if err := guest.CreateDisk(disk, guest.DiskSize); err != nil {
		t.Fatal(err)
	}

	// First boot: a blank disk, records written over one connection.
	v := boot(t, qemu, paths, disk, "boot1")
	c, took := v.waitReady(t, 2*time.Minute)
	t.Logf("first boot: service answered %v after QEMU started", took.Round(time.Millisecond))
	con := v.console(t)
	for _, want := range []string{guest.ReadyMarker + ":7777", "lockstep-guest: network eth0 10.0.2.15/24 gw 10.0.2.2", "reads direct, recovered 0 records"} {
		if !strings.Contains(con, want) {
			t.Errorf("serial console lacks %q:\n%s", want, con)
		}
	}

	opCtx, opCancel := context.WithTimeout(ctx, 2*time.Minute)
	defer opCancel()
	const first = 100
	start := time.Now()
	for n := uint64(1); n <= first; n++ {
		if err := c.Write(opCtx, n, client.Payload(n)); err != nil {
			t.Fatalf("record %d: %v", n, err)
		}
	}
	t.Logf("%d acknowledged writes (fsync each) in %v", first, time.Since(start).Round(time.Millisecond))
	var se *client.ServerError
	if err := c.Write(opCtx, first+2, client.Payload(first+2)); !errors.As(err, &se) {
		t.Fatalf("gap accepted: %v", err)
	}
	if err := c.Write(opCtx, first, client.Payload(first)); !errors.As(err, &se) {
		t.Fatalf("repeated record accepted: %v", err)
	}
	var rtt time.Duration
	for i := 0; i < 10; i++ {
		d, err := c.Ping(opCtx)
		if err != nil {
			t.Fatal(err)
		}
		rtt += d
	}
	t.Logf("ping round trip %v mean", (rtt / 10).Round(time.Microsecond))

	// A second connection sees the same log, in memory and on the disk.
	c2, err := client.Dial(opCtx, v.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	want := client.Expected(first)
	if s, err := c2.Query(opCtx); err != nil || s != want {
		t.Fatalf("Query = %v, %v; want %v", s, err, want)
	}
	if s, err := c2.QueryDisk(opCtx); err != nil || s != want {
		t.Fatalf("QueryDisk = %v, %v; want %v", s, err, want)
	}

	// Power cut: every acknowledged record must be on the disk image, and a
	// new boot recovers them and goes on.
	v.kill()
	v2 := boot(t, qemu, paths, disk, "boot2")
	c3, took := v2.waitReady(t, 2*time.Minute)
	t.Logf("second boot: service answered %v after QEMU started", took.Round(time.Millisecond))
	if con := v2.console(t); !strings.Contains(con, fmt.Sprintf("recovered %d records, last %d", first, first)) {
		t.Errorf("second boot did not report recovering %d records:\n%s", first, con)
	}
	if s, err := c3.Query(opCtx); err != nil || s != want {
		t.Fatalf("after reboot Query = %v, %v; want %v", s, err, want)
	}
	for n := uint64(first + 1); n <= first+10; n++ {
		if err := c3.Write(opCtx, n, client.Payload(n)); err != nil {
			t.Fatalf("record %d after reboot: %v", n, err)
		}
	}
	want = client.Expected(first + 10)
	if s, err := c3.QueryDisk(opCtx); err != nil || s != want {
		t.Fatalf("after reboot QueryDisk = %v, %v; want %v", s, err, want)
	}
}
