// Package guest builds the small Linux guest that the integration tests, the
// demo and the benchmarks run under QEMU, and describes how to boot it.
//
// The guest is a Debian 12 kernel and an initramfs with busybox, the modules
// of its devices (an e1000 NIC and an IDE disk) and the workload service of
// package logsvc, which listens on TCP port Port and keeps its log on the
// guest's first disk (/dev/sda, a raw image from CreateDisk). build.sh next to
// this file does the building; Build runs it. Boot it with, for example:
//
//	qemu-system-x86_64 -accel tcg -M pc -m 128 -nodefaults -nographic \
//	  -serial file:serial.log -kernel KERNEL -initrd INITRD \
//	  -append "$(KernelCmdline("", ""))" \
//	  -drive file=disk.img,if=ide,format=raw \
//	  -netdev user,id=n0,hostfwd=tcp:127.0.0.1:PORT-10.0.2.15:7777 \
//	  -device e1000,netdev=n0,mac=52:54:00:12:34:56$(NICOptions(qemu))
//
// and talk to it with package client once client.DialReady succeeds.
//
// Boot time under TCG, QEMU start to the service answering, measured on a
// 2-core machine shared with other work: 4-5.5 s with QEMU 7.2 and
// NICOptions, about 1 s more without them, 6.5-9 s with QEMU 11.1. Of that,
// 1 s is spent after the guest configured its network, because QEMU's e1000
// receives nothing for 1 s after the driver enables its receiver; connecting
// early does no harm, packets wait in QEMU's queue.
package guest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// Facts about the guest that the QEMU command line has to match.
const (
	// Port is the TCP port of the workload service in the guest.
	Port = wire.DefaultPort
	// DefaultIP is the address of the guest's eth0 unless the kernel command
	// line says otherwise; it is where QEMU's user network expects a guest.
	DefaultIP = "10.0.2.15/24"
	// DefaultGW is the guest's default gateway, QEMU's user-network host.
	DefaultGW = "10.0.2.2"
	// DiskSize is the size of the disk image tests use: 131071 records.
	DiskSize = 64 << 20
	// Marker is the prefix of the guest's own lines on its serial console.
	Marker = "lockstep-guest: "
	// ReadyMarker starts the console line that shows the service listening,
	// "lockstep-guest: workload listening on :7777".
	ReadyMarker = "lockstep-guest: workload listening on "
)

// Paths locates one build of the guest. The files do not change once built;
// a later build with other inputs goes to another folder.
type Paths struct {
	// Dir is the build's folder, named after the hash of its inputs.
	Dir string
	// Kernel is the image to pass to QEMU's -kernel: the uncompressed ELF
	// kernel (booted through its PVH entry point, seconds faster under TCG
	// than the compressed one) or, where the kernel lacks PVH, the bzImage.
	Kernel string
	// BzImage is the kernel's vmlinuz as Debian ships it.
	BzImage string
	// Initrd is the initramfs to pass to QEMU's -initrd.
	Initrd string
}

// KernelCmdline returns the kernel command line for the guest with eth0 at
// ip (CIDR, DefaultIP if empty) and gateway gw (DefaultGW if empty). The
// console is the first serial port; "quiet" keeps the boot fast, since every
// console line costs time under TCG; panic=-1 makes a panicking guest reboot
// at once (or exit QEMU with -no-reboot) instead of hanging.
func KernelCmdline(ip, gw string) string {
	if ip == "" {
		ip = DefaultIP
	}
	if gw == "" {
		gw = DefaultGW
	}
	return fmt.Sprintf("console=ttyS0 quiet panic=-1 lockstep.ip=%s lockstep.gw=%s", ip, gw)
}

var (
	nicMu   sync.Mutex
	nicOpts = make(map[string]string)
)

// NICOptions returns options to append to the guest's "-device e1000,..."
// that shorten its boot under the QEMU that qemu runs (a binary, or a
// launcher and its arguments), with a leading comma: ",romfile=" leaves out
// the iPXE option ROM, which a guest booted with -kernel never runs; and,
// where that QEMU has the option (7.2 has, 11.1 has not),
// ",autonegotiation=off" has the link up at once rather than 500 ms after
// the driver's probe, which saves the guest's init about 0.7 s. Both sides
// of a migration must use the same options. The answer is remembered per
// command.
func NICOptions(ctx context.Context, qemu ...string) string {
	key := strings.Join(qemu, "\x00")
	nicMu.Lock()
	defer nicMu.Unlock()
	if o, ok := nicOpts[key]; ok {
		return o
	}
	opts := ",romfile="
	if len(qemu) > 0 {
		args := append(append([]string{}, qemu[1:]...), "-device", "e1000,help")
		out, err := exec.CommandContext(ctx, qemu[0], args...).CombinedOutput()
		if err == nil && bytes.Contains(out, []byte("autonegotiation=")) {
			opts += ",autonegotiation=off"
		}
		if err != nil && ctx.Err() != nil {
			return opts // do not remember an answer cut short
		}
	}
	nicOpts[key] = opts
	return opts
}

// CreateDisk creates (or truncates) a raw disk image of size bytes at path,
// all zeros and sparse: the workload formats it on first use.
func CreateDisk(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

var (
	builtMu sync.Mutex
	built   = make(map[string]Paths)
)

// Build builds the guest into the default folder, $BUILD/guest, where BUILD
// defaults to the repository's build/ folder, or finds it already built
// there, and returns its paths. See BuildTo.
func Build(ctx context.Context) (Paths, error) { return BuildTo(ctx, "") }

// BuildTo builds the guest into outDir (the default folder if empty) by
// running build.sh, which reuses an earlier build whose inputs are unchanged.
// A successful result is remembered for the rest of the process. A first
// build downloads about 72 MB of Debian packages and takes a minute; when
// apt does not know the packages yet it runs apt-get update, which needs root.
func BuildTo(ctx context.Context, outDir string) (Paths, error) {
	builtMu.Lock()
	defer builtMu.Unlock()
	if p, ok := built[outDir]; ok {
		return p, nil
	}
	script, err := buildScript()
	if err != nil {
		return Paths{}, err
	}
	args := []string{script}
	if outDir != "" {
		args = append(args, outDir)
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", args...)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	// Killing bash may leave apt-get or go holding the pipes open; do not
	// wait for them forever.
	cmd.WaitDelay = 10 * time.Second
	if err := cmd.Run(); err != nil {
		return Paths{}, fmt.Errorf("guest build (%s): %w\n%s", script, err, tail(stderr.String(), 4000))
	}
	var p Paths
	sc := bufio.NewScanner(&stdout)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "kernel="); ok {
			p.Kernel = v
		} else if v, ok := strings.CutPrefix(sc.Text(), "initrd="); ok {
			p.Initrd = v
		}
	}
	if p.Kernel == "" || p.Initrd == "" {
		return Paths{}, fmt.Errorf("guest build (%s) printed no kernel= and initrd= lines:\n%s", script, tail(stdout.String(), 4000))
	}
	p.Dir = filepath.Dir(p.Kernel)
	p.BzImage = filepath.Join(p.Dir, "vmlinuz")
	for _, f := range []string{p.Kernel, p.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return Paths{}, fmt.Errorf("guest build: %w", err)
		}
	}
	built[outDir] = p
	return p, nil
}

// buildScript locates build.sh: next to this source file when the test
// binary was built from a checkout, else by walking up from the working
// directory to the repository root.
func buildScript() (string, error) {
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		s := filepath.Join(filepath.Dir(file), "build.sh")
		if _, err := os.Stat(s); err == nil {
			return s, nil
		}
	}
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		s := filepath.Join(dir, "integration", "guest", "build.sh")
		if _, err := os.Stat(s); err == nil {
			return s, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("guest: integration/guest/build.sh not found above the working directory")
		}
		dir = parent
	}
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}
