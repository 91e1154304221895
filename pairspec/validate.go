package pairspec

import (
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Limits, as the API documents them (proto/lockstep/v1/lockstep.proto).
const (
	MinMemory          = 64 * MiB
	MaxMemory          = 1 << 40 // 1Ti
	MaxVCPUs           = 255
	MaxDiskSize        = 1 << 50 // what the agent accepts
	MinCheckpointDelay = 10 * time.Millisecond
	MaxCheckpointDelay = time.Hour
	MinCompareTimeout  = 10 * time.Millisecond
	MaxCompareTimeout  = time.Minute
	MaxBootSettle      = 10 * time.Minute
)

var (
	nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`)
	macRE  = regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`)
)

// Validate checks a Pair's kind, name and spec against the API's documented rules and returns
// every refusal, each naming its field (without positions: use Decode for a document).
func Validate(p *Pair) error {
	return validate(p, func(string) (int, int) { return 0, 0 }).orNil()
}

func validate(p *Pair, at func(field string) (int, int)) Errors {
	var errs Errors
	bad := func(field, format string, a ...any) {
		l, c := at(field)
		errs = append(errs, &FieldError{Field: field, Line: l, Column: c, Reason: fmt.Sprintf(format, a...)})
	}
	switch p.APIVersion {
	case APIVersion:
	case "":
		bad("apiVersion", "missing: want apiVersion: %s", APIVersion)
	default:
		bad("apiVersion", "%q: want %s", p.APIVersion, APIVersion)
	}
	switch p.Kind {
	case KindPair:
	case "":
		bad("kind", "missing: want kind: %s", KindPair)
	case KindPairList:
		bad("kind", "%s: give one Pair per document (lockstepctl get NAME -o yaml prints one)", p.Kind)
	default:
		bad("kind", "%q: want %s", p.Kind, KindPair)
	}
	if p.Metadata.Name == "" {
		bad("metadata.name", "missing: every pair has a name")
	} else if !nameRE.MatchString(p.Metadata.Name) {
		bad("metadata.name", "%q: want 1-63 letters, digits, '-' or '_', starting with a letter or digit", p.Metadata.Name)
	}
	s := &p.Spec
	if m := uint64(s.Memory); m != 0 {
		switch {
		case m%MiB != 0 && m < MiB:
			bad("spec.memory", "%d is bytes: did you mean %dMi?", m, m)
		case m%MiB != 0:
			bad("spec.memory", "%s is not a whole number of MiB", s.Memory)
		case m < MinMemory || m > MaxMemory:
			bad("spec.memory", "%s: want 64Mi to 1Ti", s.Memory)
		}
	}
	if s.VCPUs > MaxVCPUs {
		bad("spec.vcpus", "%d: want 1 to %d", s.VCPUs, MaxVCPUs)
	}
	if s.Machine != "" && s.Machine != "pc" {
		bad("spec.machine", "%q: only pc (q35 crashes the COLO secondary at its first checkpoint)", s.Machine)
	}
	switch s.Accel {
	case "", "auto", "kvm", "tcg":
	default:
		bad("spec.accel", "%q: want auto, kvm or tcg", s.Accel)
	}
	switch s.RestartPolicy {
	case "", "always", "never":
	default:
		bad("spec.restartPolicy", "%q: want always or never", s.RestartPolicy)
	}
	if b := s.Boot; b != nil && b.Kernel == "" {
		if b.Initrd != "" {
			bad("spec.boot.initrd", "needs spec.boot.kernel")
		}
		if b.Cmdline != "" {
			bad("spec.boot.cmdline", "needs spec.boot.kernel")
		}
	}
	switch sz := uint64(s.Disk.Size); {
	case sz == 0:
		bad("spec.disk.size", "missing: the disk's virtual size, e.g. 64Gi")
	case sz%512 != 0:
		bad("spec.disk.size", "%d bytes: want a multiple of 512", sz)
	case sz > MaxDiskSize:
		bad("spec.disk.size", "%d bytes: want at most 1Pi", sz)
	}
	checkFormat := func(field, f string) {
		switch f {
		case "", "raw", "qcow2":
		default:
			bad(field, "%q: want raw or qcow2", f)
		}
	}
	checkFormat("spec.disk.format", s.Disk.Format)
	if s.Disk.Path != "" && !filepath.IsAbs(s.Disk.Path) {
		bad("spec.disk.path", "%q: want an absolute path", s.Disk.Path)
	}
	n := &s.NIC
	if n.MAC == "" {
		bad("spec.nic.mac", "missing: six hex pairs separated by ':', e.g. 52:54:00:12:34:56")
	} else if !macRE.MatchString(n.MAC) {
		bad("spec.nic.mac", "%q: want six hex pairs separated by ':'", n.MAC)
	}
	switch n.Model {
	case "", "e1000", "rtl8139", "virtio-net-pci":
	default:
		bad("spec.nic.model", "%q: want e1000, rtl8139 or virtio-net-pci", n.Model)
	}
	backend := n.backend()
	switch n.Backend {
	case "", "tap", "bridge", "socket":
	default:
		bad("spec.nic.backend", "%q: want tap, bridge or socket", n.Backend)
		backend = "invalid"
	}
	switch {
	case n.Backend == "" && n.Tap != "" && n.Bridge != "":
		bad("spec.nic.bridge", "give either nic.tap or nic.bridge, not both")
	case backend == "":
		bad("spec.nic", "no backend: set nic.tap (a tap interface), nic.bridge (a Linux bridge) or nic.backend: socket")
	case backend == "tap" && n.Tap == "":
		bad("spec.nic.tap", "missing: backend tap needs the tap interface's name")
	case backend == "bridge" && n.Bridge == "":
		bad("spec.nic.bridge", "missing: backend bridge needs the bridge's name")
	}
	if backend == "invalid" {
		backend = ""
	}
	if backend != "tap" && backend != "" && n.Tap != "" {
		bad("spec.nic.tap", "only with backend tap, not %s", backend)
	}
	if backend != "bridge" && backend != "" && n.Bridge != "" {
		bad("spec.nic.bridge", "only with backend bridge, not %s", backend)
	}
	for _, c := range []struct {
		field string
		cmd   []string
	}{{"spec.qemuCommand", s.QEMUCommand}, {"spec.qemuImgCommand", s.QEMUImgCommand}} {
		if len(c.cmd) > 0 && strings.TrimSpace(c.cmd[0]) == "" {
			bad(c.field+"[0]", "empty: the program to run")
		}
	}
	t := &s.Tunables
	if d := t.CheckpointDelay.D(); d != 0 && (d < MinCheckpointDelay || d > MaxCheckpointDelay) {
		bad("spec.checkpointDelay", "%v: want 10ms to 1h", d)
	}
	if d := t.CompareTimeout.D(); d != 0 && (d < MinCompareTimeout || d > MaxCompareTimeout) {
		bad("spec.compareTimeout", "%v: want 10ms to 1m", d)
	}
	if t.BootSettle != nil {
		if d := t.BootSettle.D(); d < 0 || d > MaxBootSettle {
			bad("spec.bootSettle", "%v: want 0s (none) to 10m", d)
		}
	}
	switch t.ReplicationTLS {
	case "", "auto", "on", "off":
	default:
		bad("spec.replicationTLS", "%q: want auto, on or off", t.ReplicationTLS)
	}
	type side struct {
		name string
		pl   *Placement
	}
	sides := []side{{"primary", &s.Primary}, {"secondary", &s.Secondary}}
	for _, sd := range sides {
		f := "spec." + sd.name
		pl := sd.pl
		if pl.Host == "" {
			bad(f+".host", "missing: the host whose agent runs this side (an IP address on a single host)")
		}
		switch {
		case pl.Address != "" && net.ParseIP(pl.Address) == nil:
			bad(f+".address", "%q: want an IP address", pl.Address)
		case pl.Address == "" && pl.Host != "" && net.ParseIP(pl.Host) == nil:
			bad(f+".address", "missing: %s is a host name, so this side needs the IP address its peer reaches it on", pl.Host)
		}
		path, _ := s.diskOf(pl)
		switch {
		case path == "":
			bad(f+".disk.path", "missing: the disk image's path on this side (or spec.disk.path for both)")
		case !filepath.IsAbs(path):
			if pl.Disk != nil && pl.Disk.Path != "" {
				bad(f+".disk.path", "%q: want an absolute path", path)
			}
		}
		if pl.Disk != nil {
			checkFormat(f+".disk.format", pl.Disk.Format)
		}
		if backend == "socket" {
			if pl.NetSocket == "" {
				bad(f+".netSocket", "missing: backend socket needs this side's hub port (host:port)")
			} else if _, port, err := net.SplitHostPort(pl.NetSocket); err != nil || port == "" {
				bad(f+".netSocket", "%q: want host:port", pl.NetSocket)
			}
		} else if pl.NetSocket != "" && backend != "" {
			bad(f+".netSocket", "only with nic.backend: socket, not %s", backend)
		}
	}
	pa, _ := s.diskOf(&s.Primary)
	pb, _ := s.diskOf(&s.Secondary)
	if pa != "" && pa == pb && s.Primary.Host == s.Secondary.Host && s.Primary.Host != "" {
		bad("spec.secondary.disk.path", "%s is the primary's image too, on the same host %s: give each side its own", pb, s.Primary.Host)
	}
	return errs
}

// backend is the NIC's backend, as written or as it follows from tap or bridge.
func (n *NIC) backend() string {
	switch {
	case n.Backend != "":
		return n.Backend
	case n.Tap != "" && n.Bridge == "":
		return "tap"
	case n.Bridge != "" && n.Tap == "":
		return "bridge"
	}
	return ""
}

// diskOf is a side's disk path and format: its own, or the pair's.
func (s *Spec) diskOf(pl *Placement) (path, format string) {
	path, format = s.Disk.Path, s.Disk.Format
	if pl.Disk != nil {
		if pl.Disk.Path != "" {
			path = pl.Disk.Path
		}
		if pl.Disk.Format != "" {
			format = pl.Disk.Format
		}
	}
	return path, format
}
