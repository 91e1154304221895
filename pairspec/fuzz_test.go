package pairspec

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// checkProto checks a PairSpec against the rules proto/lockstep/v1/lockstep.proto documents
// for each field, written out here apart from the package's own validation so that the two
// check each other.
func checkProto(t testing.TB, s *pb.PairSpec) {
	t.Helper()
	fail := func(format string, a ...any) {
		t.Helper()
		t.Errorf("accepted spec breaks the API's rules: "+format+"\n%v", append(a, s)...)
	}
	if !regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$`).MatchString(s.GetName()) {
		fail("name %q", s.GetName())
	}
	if m := s.GetMemoryMib(); m != 0 && (m < 64 || m > 1048576) {
		fail("memory_mib %d", m)
	}
	if v := s.GetVcpus(); v > 255 {
		fail("vcpus %d", v)
	}
	if m := s.GetMachine(); m != "" && m != "pc" {
		fail("machine %q", m)
	}
	if _, ok := pb.Accel_name[int32(s.GetAccel())]; !ok {
		fail("accel %d", s.GetAccel())
	}
	if s.GetKernel() == "" && (s.GetInitrd() != "" || s.GetAppend() != "") {
		fail("initrd or append without kernel")
	}
	if d := s.GetDiskSizeBytes(); d == 0 || d%512 != 0 || d > 1<<50 {
		fail("disk_size_bytes %d", d)
	}
	n := s.GetNic()
	if !regexp.MustCompile(`^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$`).MatchString(n.GetMac()) {
		fail("nic.mac %q", n.GetMac())
	}
	switch n.GetModel() {
	case "", "e1000", "rtl8139", "virtio-net-pci":
	default:
		fail("nic.model %q", n.GetModel())
	}
	switch n.GetBackend() {
	case pb.NicBackend_NIC_BACKEND_TAP:
		if n.GetTap() == "" {
			fail("tap backend without tap")
		}
	case pb.NicBackend_NIC_BACKEND_BRIDGE:
		if n.GetBridge() == "" {
			fail("bridge backend without bridge")
		}
	case pb.NicBackend_NIC_BACKEND_SOCKET:
	default:
		fail("nic.backend %v", n.GetBackend())
	}
	for _, c := range [][]string{s.GetQemuCommand(), s.GetQemuImgCommand()} {
		if len(c) > 0 && strings.TrimSpace(c[0]) == "" {
			fail("empty command %q", c)
		}
	}
	if tu := s.GetTunables(); tu != nil {
		if d := tu.GetCheckpointDelay(); d != nil && (d.AsDuration() < 10*time.Millisecond || d.AsDuration() > time.Hour) {
			fail("checkpoint_delay %v", d.AsDuration())
		}
		if d := tu.GetCompareTimeout(); d != nil && (d.AsDuration() < 10*time.Millisecond || d.AsDuration() > time.Minute) {
			fail("compare_timeout %v", d.AsDuration())
		}
		if d := tu.GetBootSettle(); d != nil && (d.CheckValid() != nil || d.AsDuration() < 0 || d.AsDuration() > 10*time.Minute) {
			fail("boot_settle %v", d.AsDuration())
		}
	}
	for _, pl := range []*pb.Placement{s.GetPrimary(), s.GetSecondary()} {
		if pl.GetHost() == "" || net.ParseIP(pl.GetAddress()) == nil {
			fail("placement host %q address %q", pl.GetHost(), pl.GetAddress())
		}
		if !filepath.IsAbs(pl.GetDiskPath()) {
			fail("disk_path %q", pl.GetDiskPath())
		}
		switch pl.GetDiskFormat() {
		case "", "raw", "qcow2":
		default:
			fail("disk_format %q", pl.GetDiskFormat())
		}
		if n.GetBackend() == pb.NicBackend_NIC_BACKEND_SOCKET {
			if _, _, err := net.SplitHostPort(pl.GetNetSocket()); err != nil {
				fail("net_socket %q", pl.GetNetSocket())
			}
		}
	}
	if a, b := s.GetPrimary(), s.GetSecondary(); a.GetHost() == b.GetHost() && a.GetDiskPath() == b.GetDiskPath() {
		fail("one disk image for both sides on %s", a.GetHost())
	}
}

// FuzzDecode: whatever the document, Decode never panics, and either refuses it, every refusal
// naming a field and its position, or accepts it, and then the PairSpec it converts to obeys
// the API's rules and survives printing in both formats and reading back. Its seeds (the table
// cases and the examples) run with every go test.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(base))
	f.Add([]byte(base + "status: {state: protected}\n"))
	for _, tc := range [][2]string{
		{"  vcpus: 1", "  vcpu: 1"}, {"memory: 128Mi", "memory: 512"}, {"backend: socket", "tap: t0"}, {"size: 64Mi", "size: 1000"},
		{"  vcpus: 1", "  vcpus: &a 1\n  machine: *a"}, {"checkpointDelay: 200ms", "bootSettle: 0s"}, {"/disks/b.raw", "/disks/a.raw"},
		{"127.0.0.1:7002", "[::1]:7002"}, {"host: 127.0.0.1", "host: ::1"}, {"accel: tcg", "accel: auto"},
	} {
		f.Add([]byte(strings.Replace(base, tc[0], tc[1], 1)))
	}
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"apiVersion": "lockstep.dev/v1", "kind": "Pair", "metadata": {"name": "x"}, "spec": {"disk": {"size": "1Mi", "path": "/d"}, "nic": {"mac": "52:54:00:12:34:56", "tap": "t"}, "primary": {"host": "10.0.0.1"}, "secondary": {"host": "10.0.0.2"}}}`))
	f.Add([]byte("a: [\n"))
	f.Add([]byte("---\n---\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Decode(data)
		if err != nil {
			var es Errors
			if !errors.As(err, &es) || len(es) == 0 {
				t.Fatalf("refusal %T %v is not a list of field errors", err, err)
			}
			for _, e := range es {
				if e.Field == "" || e.Line < 1 || e.Column < 1 || e.Reason == "" {
					t.Fatalf("refusal without a field or a position: %+v", e)
				}
			}
			return
		}
		s := p.ToProto()
		checkProto(t, s)
		if err := Validate(FromProto(s, nil)); err != nil {
			t.Fatalf("the converted spec no longer validates: %v", err)
		}
		checkRoundTrip(t, s)
	})
}
