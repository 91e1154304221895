// Package checkpoint holds the COLO mechanics of one protected VM: the QEMU command lines of a
// primary and a secondary, the named QMP step sequences that start protection, fail over either
// side and re-protect, the checkpoint observer, and the failure signals a pair's QEMUs raise.
package checkpoint

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Spec describes a protected VM: what both of its QEMUs share.
type Spec struct {
	// Name identifies the pair; letters, digits, '-' and '_'.
	Name string
	// MemoryMiB is the guest's memory. The secondary needs about twice this on its host.
	MemoryMiB int
	VCPUs     int
	// Machine is the QEMU machine type. Only "pc": q35 crashes the secondary at the first
	// checkpoint on QEMU 7.2.
	Machine string
	// Accel is "kvm", "tcg" or "auto" (kvm when /dev/kvm opens, else tcg).
	Accel string
	// Kernel, Initrd and Append boot a kernel directly (the test guest); empty to boot the disk.
	Kernel, Initrd, Append string
	// DiskSize is the virtual size in bytes of every image of the pair (equal sizes are
	// required by the replication driver).
	DiskSize int64
	NIC      NIC
	// QEMU is the command prefix that runs qemu-system-x86_64, e.g. ["qemu-system-x86_64"] or
	// a launcher; QEMUImg likewise for qemu-img.
	QEMU    []string
	QEMUImg []string
	// QEMUVersion is the major.minor of QEMU, which picks command-line forms that differ
	// between releases (chardev reconnect vs reconnect-ms). Learn it with DetectVersion.
	QEMUVersion Version
	Tunables    Tunables
}

// Version is a QEMU major.minor version.
type Version struct{ Major, Minor int }

func (v Version) String() string { return fmt.Sprintf("%d.%d", v.Major, v.Minor) }

// AtLeast reports whether v is major.minor or newer.
func (v Version) AtLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

// NIC is the guest's network card and its host backend.
type NIC struct {
	// MAC is the same on both sides: after a failover the survivor keeps the guest's MAC.
	MAC string
	// Model is the NIC device, "e1000" by default.
	Model string
	// Backend is "tap", "bridge" or "socket" (socket: tests' single-machine hub).
	Backend string
	// Tap is the tap interface name (backend tap); Bridge the bridge name (backend bridge, via
	// qemu-bridge-helper).
	Tap, Bridge string
}

// Tunables are the COLO knobs; zero values take the defaults.
type Tunables struct {
	// CheckpointDelay is x-checkpoint-delay: the longest time between checkpoints.
	CheckpointDelay time.Duration
	// CompareTimeout is how long colo-compare holds a primary packet without a secondary twin
	// before it asks for a checkpoint, which releases the packet (colo-compare looks every
	// ExpiredScanCycle). Default 100 ms, for what QEMU 11.1 does with a frame that reaches the
	// primary while it is stopped for a checkpoint: its tap backend reads the frame anyway (it
	// stops reading only once a frame could not be delivered), filter-mirror sends the copy to
	// the secondary at once and the primary delivers its own after it resumes; the secondary,
	// stopped too, keeps the copy in filter-rewriter's own queue, which QEMU flushes only when
	// the next TCP frame passes the filter. The secondary then never answers the request, and the
	// primary's answer would wait for the next checkpoint, up to the whole checkpoint delay; at
	// 200 ms and more the client's TCP retransmits (measured at QEMU's default of 3 s: 5 % of the
	// demo workload's acknowledgements took more than 200 ms, and the client retransmitted).
	CompareTimeout time.Duration
	// MaxBandwidth caps the migration stream in bytes per second; 0 leaves QEMU's default.
	MaxBandwidth uint64
	// NoRewriter leaves QEMU's filter-rewriter off the secondary. It is on by default, as in
	// QEMU's COLO documentation: it lets TCP connections opened between two checkpoints survive
	// a failover, and measured here it halves the time to the first reply after a failover.
	NoRewriter bool
	// BootSettle is how long a primary that booted the guest runs before its first protection
	// starts, counted from its QEMU's start; a negative value means not at all. Zero takes the
	// default: DefaultBootSettleTCG under TCG, none under KVM. Under TCG (QEMU 11.1), COLO
	// started while the guest kernel boots and loads its modules was measured to leave the
	// secondary's kernel memory corrupt: the survivor of a later failover oopsed in libata,
	// e1000, sd or the timer in about half of the runs with Debian's 6.1.192 kernel, and in
	// none of 6 runs once protection began after the boot. Re-protection of a running guest
	// never waits.
	BootSettle time.Duration
	// ReplicationTLS says whether the channels between the two QEMUs (migration, NBD, mirror
	// and compare) run over TLS, each QEMU presenting its host's certificate (tls.go). The
	// default (TLSAuto) encrypts them when the sides run on two hosts.
	ReplicationTLS TLSMode
}

// Defaults of the tunables.
const (
	DefaultCheckpointDelay = 200 * time.Millisecond
	DefaultCompareTimeout  = 100 * time.Millisecond
	DefaultBootSettleTCG   = 15 * time.Second
	// MaxBootSettle bounds BootSettle.
	MaxBootSettle = 10 * time.Minute
)

// ResolvedAccel is the accelerator QEMU will use: Accel, with "auto" decided by whether
// /dev/kvm opens on this machine.
func (s Spec) ResolvedAccel() string { return accelArg(s.Accel) }

// BootSettleLeft is how much longer a primary whose QEMU started at started must run before
// its first protection, at now; zero when it has run long enough or the spec asks for none.
func (s Spec) BootSettleLeft(started, now time.Time) time.Duration {
	if s.Tunables.BootSettle <= 0 {
		return 0
	}
	return max(0, s.Tunables.BootSettle-now.Sub(started))
}

// Side is where one QEMU of the pair runs and keeps its files.
type Side struct {
	// Host is the address this side listens on for its peer (migration and NBD for a secondary;
	// the mirror and compare channels for a primary).
	Host string
	// RunDir holds the QMP socket, the pid file and the logs of this side's QEMU.
	RunDir string
	// Disk is the VM's disk image on this side: the primary's image, or the secondary's replica
	// (its "parent").
	Disk string
	// DiskFormat is the format of Disk, "raw" by default.
	DiskFormat string
	// Active and Hidden are the secondary's overlays (qcow2); created by PrepareSecondaryDisks.
	Active, Hidden string
	// NetSocket is the address of the test hub's port for this side (backend socket).
	NetSocket string
	// TLSDir is this QEMU's x509 credentials folder (WriteTLSDir) when the replication channels
	// are encrypted; empty: plaintext.
	TLSDir string
}

// Ports are the TCP ports of one protection generation. Each re-protection takes new ones.
type Ports struct {
	// On the secondary's host.
	Migration, NBD int
	// On the primary's host: the secondary connects to Mirror and Compare; CompareIn and
	// CompareOut are loopback channels inside the primary.
	Mirror, Compare, CompareIn, CompareOut int
}

// List returns the ports in a fixed order.
func (p Ports) List() []int {
	return []int{p.Migration, p.NBD, p.Mirror, p.Compare, p.CompareIn, p.CompareOut}
}

// FieldError is a Spec validation failure naming the field.
type FieldError struct {
	Field  string
	Reason string
}

func (e *FieldError) Error() string { return fmt.Sprintf("spec: %s: %s", e.Field, e.Reason) }

// ErrInvalidSpec is wrapped by every validation error.
var ErrInvalidSpec = errors.New("invalid spec")

type fieldErrors []*FieldError

func (fe fieldErrors) Error() string {
	parts := make([]string, len(fe))
	for i, e := range fe {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}

func (fe fieldErrors) Unwrap() []error {
	out := []error{ErrInvalidSpec}
	for _, e := range fe {
		out = append(out, e)
	}
	return out
}

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)
	macRE  = regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`)
)

// WithDefaults returns s with zero fields set to their defaults.
func (s Spec) WithDefaults() Spec {
	if s.MemoryMiB == 0 {
		s.MemoryMiB = 512
	}
	if s.VCPUs == 0 {
		s.VCPUs = 1
	}
	if s.Machine == "" {
		s.Machine = "pc"
	}
	if s.Accel == "" {
		s.Accel = "auto"
	}
	if s.NIC.Model == "" {
		s.NIC.Model = "e1000"
	}
	if len(s.QEMU) == 0 {
		s.QEMU = []string{"qemu-system-x86_64"}
	}
	if len(s.QEMUImg) == 0 {
		s.QEMUImg = []string{"qemu-img"}
	}
	if s.Tunables.CheckpointDelay == 0 {
		s.Tunables.CheckpointDelay = DefaultCheckpointDelay
	}
	if s.Tunables.CompareTimeout == 0 {
		s.Tunables.CompareTimeout = DefaultCompareTimeout
	}
	if s.Tunables.BootSettle == 0 && s.ResolvedAccel() == "tcg" {
		s.Tunables.BootSettle = DefaultBootSettleTCG
	}
	return s
}

// Validate checks the spec (after defaults) and returns every problem, each naming its field.
func (s Spec) Validate() error {
	var errs fieldErrors
	bad := func(field, format string, a ...any) {
		errs = append(errs, &FieldError{Field: field, Reason: fmt.Sprintf(format, a...)})
	}
	if !nameRE.MatchString(s.Name) {
		bad("name", "%q: want 1-63 letters, digits, '-' or '_', starting with a letter or digit", s.Name)
	}
	if s.MemoryMiB < 64 || s.MemoryMiB > 1<<20 {
		bad("memory", "%d MiB: want 64 MiB to 1 TiB", s.MemoryMiB)
	}
	if s.VCPUs < 1 || s.VCPUs > 255 {
		bad("vcpus", "%d: want 1 to 255", s.VCPUs)
	}
	if s.Machine != "pc" {
		bad("machine", "%q: only \"pc\" (q35 crashes the COLO secondary at its first checkpoint)", s.Machine)
	}
	switch s.Accel {
	case "kvm", "tcg", "auto":
	default:
		bad("accel", "%q: want kvm, tcg or auto", s.Accel)
	}
	if s.Kernel == "" && (s.Initrd != "" || s.Append != "") {
		bad("kernel", "initrd or append given without a kernel")
	}
	if s.DiskSize <= 0 || s.DiskSize%512 != 0 {
		bad("disk_size", "%d: want a positive multiple of 512 bytes", s.DiskSize)
	}
	if !macRE.MatchString(s.NIC.MAC) {
		bad("nic.mac", "%q: want six hex pairs separated by ':'", s.NIC.MAC)
	}
	switch s.NIC.Model {
	case "e1000", "rtl8139", "virtio-net-pci":
	default:
		bad("nic.model", "%q: want e1000, rtl8139 or virtio-net-pci", s.NIC.Model)
	}
	switch s.NIC.Backend {
	case "tap":
		if s.NIC.Tap == "" {
			bad("nic.tap", "backend tap needs an interface name")
		}
	case "bridge":
		if s.NIC.Bridge == "" {
			bad("nic.bridge", "backend bridge needs a bridge name")
		}
	case "socket":
	default:
		bad("nic.backend", "%q: want tap, bridge or socket", s.NIC.Backend)
	}
	if len(s.QEMU) == 0 || s.QEMU[0] == "" {
		bad("qemu", "empty command")
	}
	if s.QEMUVersion.Major == 0 {
		bad("qemu_version", "unknown: detect it with DetectVersion")
	} else if !s.QEMUVersion.AtLeast(7, 2) {
		bad("qemu_version", "%s: lockstep needs QEMU 7.2 or newer", s.QEMUVersion)
	}
	if d := s.Tunables.CheckpointDelay; d < 10*time.Millisecond || d > time.Hour {
		bad("checkpoint_delay", "%v: want 10ms to 1h", d)
	}
	if d := s.Tunables.CompareTimeout; d < 10*time.Millisecond || d > time.Minute {
		bad("compare_timeout", "%v: want 10ms to 1m", d)
	}
	if d := s.Tunables.BootSettle; d > MaxBootSettle {
		bad("boot_settle", "%v: want at most %v", d, MaxBootSettle)
	}
	if m := s.Tunables.ReplicationTLS; !m.Valid() {
		bad("replication_tls", "%q: want auto, on or off", m)
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// ValidateSide checks one side's settings for a role.
func (s Spec) ValidateSide(role Role, side Side) error {
	var errs fieldErrors
	bad := func(field, format string, a ...any) {
		errs = append(errs, &FieldError{Field: string(role) + "." + field, Reason: fmt.Sprintf(format, a...)})
	}
	if net.ParseIP(side.Host) == nil {
		bad("host", "%q is not an IP address", side.Host)
	}
	if side.RunDir == "" || !filepath.IsAbs(side.RunDir) {
		bad("run_dir", "%q: want an absolute path", side.RunDir)
	} else if len(filepath.Join(side.RunDir, "qmp.sock")) > 100 {
		bad("run_dir", "%q is too long for a unix socket path", side.RunDir)
	}
	if side.Disk == "" {
		bad("disk", "no disk image")
	} else if st, err := os.Stat(side.Disk); err != nil {
		bad("disk", "%v", err)
	} else if side.DiskFormat == "" || side.DiskFormat == "raw" {
		if st.Size() != s.DiskSize {
			bad("disk", "%s is %d bytes, the spec says %d", side.Disk, st.Size(), s.DiskSize)
		}
	}
	if role == RoleSecondary && (side.Active == "" || side.Hidden == "") {
		bad("active", "a secondary needs active and hidden overlay paths")
	}
	if reason := tlsDirProblem(side.TLSDir); reason != "" {
		bad("tls_dir", "%s", reason)
	}
	if s.NIC.Backend == "socket" {
		if _, _, err := net.SplitHostPort(side.NetSocket); err != nil {
			bad("net_socket", "%q: %v", side.NetSocket, err)
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// ValidatePorts checks a generation's ports.
func ValidatePorts(p Ports) error {
	seen := map[int]bool{}
	var errs fieldErrors
	names := []string{"migration", "nbd", "mirror", "compare", "compare_in", "compare_out"}
	for i, port := range p.List() {
		if i == 0 && port == 0 {
			continue // the migration connection is handed over by the agent
		}
		if port < 1 || port > 65535 {
			errs = append(errs, &FieldError{Field: "ports." + names[i], Reason: fmt.Sprintf("%d is not a TCP port", port)})
		} else if seen[port] {
			errs = append(errs, &FieldError{Field: "ports." + names[i], Reason: fmt.Sprintf("%d is used twice", port)})
		}
		seen[port] = true
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// Role is the COLO role of one QEMU.
type Role string

// Roles.
const (
	RolePrimary   Role = "primary"
	RoleSecondary Role = "secondary"
)
