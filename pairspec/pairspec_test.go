package pairspec

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// base is a good spec that the bad cases below edit one line of.
const base = `apiVersion: lockstep.dev/v1
kind: Pair
metadata:
  name: db1
spec:
  memory: 128Mi
  vcpus: 1
  accel: tcg
  boot:
    kernel: /guest/vmlinuz
    initrd: /guest/initrd.gz
    cmdline: console=ttyS0
  disk:
    size: 64Mi
  nic:
    mac: "52:54:00:12:34:56"
    backend: socket
  qemuCommand: [qemu-system-x86_64]
  checkpointDelay: 200ms
  primary:
    host: 127.0.0.1
    disk: {path: /disks/a.raw}
    netSocket: 127.0.0.1:7001
  secondary:
    host: 127.0.0.1
    disk: {path: /disks/b.raw}
    netSocket: 127.0.0.1:7002
`

// edit replaces the first occurrence of old in base by new; the test fails if old is absent.
func edit(t testing.TB, old, new string) string {
	t.Helper()
	if !strings.Contains(base, old) {
		t.Fatalf("base lacks %q", old)
	}
	return strings.Replace(base, old, new, 1)
}

// lineOf is the line (from 1) of the first line of doc that contains s.
func lineOf(t testing.TB, doc, s string) int {
	t.Helper()
	for i, l := range strings.Split(doc, "\n") {
		if strings.Contains(l, s) {
			return i + 1
		}
	}
	t.Fatalf("document lacks %q:\n%s", s, doc)
	return 0
}

func TestDecodeGood(t *testing.T) {
	tap := strings.Replace(strings.Replace(strings.Replace(base, "    backend: socket\n", "    tap: tap0\n", 1),
		"    netSocket: 127.0.0.1:7001\n", "", 1), "    netSocket: 127.0.0.1:7002\n", "", 1)
	for _, tc := range []struct {
		name  string
		doc   string
		check func(t *testing.T, s *pb.PairSpec)
	}{
		{"base", base, func(t *testing.T, s *pb.PairSpec) {
			want := &pb.PairSpec{
				Name: "db1", MemoryMib: 128, Vcpus: 1, Accel: pb.Accel_ACCEL_TCG, Kernel: "/guest/vmlinuz", Initrd: "/guest/initrd.gz",
				Append: "console=ttyS0", DiskSizeBytes: 64 << 20,
				Nic:         &pb.Nic{Mac: "52:54:00:12:34:56", Backend: pb.NicBackend_NIC_BACKEND_SOCKET},
				QemuCommand: []string{"qemu-system-x86_64"}, Tunables: &pb.Tunables{CheckpointDelay: durationpb.New(200 * time.Millisecond)},
				Primary:   &pb.Placement{Host: "127.0.0.1", Address: "127.0.0.1", DiskPath: "/disks/a.raw", NetSocket: "127.0.0.1:7001"},
				Secondary: &pb.Placement{Host: "127.0.0.1", Address: "127.0.0.1", DiskPath: "/disks/b.raw", NetSocket: "127.0.0.1:7002"},
			}
			if !proto.Equal(s, want) {
				t.Errorf("got  %v\nwant %v", s, want)
			}
		}},
		{"tap backend implied", tap, func(t *testing.T, s *pb.PairSpec) {
			if s.GetNic().GetBackend() != pb.NicBackend_NIC_BACKEND_TAP || s.GetNic().GetTap() != "tap0" {
				t.Errorf("nic %v", s.GetNic())
			}
		}},
		{"units", edit(t, "  memory: 128Mi\n", "  memory: 2GiB\n  maxBandwidth: 100Mi/s\n  compareTimeout: 1m\n"), func(t *testing.T, s *pb.PairSpec) {
			if s.GetMemoryMib() != 2048 || s.GetTunables().GetMaxBandwidthBytesPerSecond() != 100<<20 || s.GetTunables().GetCompareTimeout().AsDuration() != time.Minute {
				t.Errorf("memory %d MiB, bandwidth %d, compare %v", s.GetMemoryMib(), s.GetTunables().GetMaxBandwidthBytesPerSecond(), s.GetTunables().GetCompareTimeout())
			}
		}},
		{"decimal disk size", edit(t, "size: 64Mi", "size: 1G"), func(t *testing.T, s *pb.PairSpec) {
			if s.GetDiskSizeBytes() != 1e9 {
				t.Errorf("disk size %d", s.GetDiskSizeBytes())
			}
		}},
		// boot_settle's three meanings: unset (the default), none, a duration.
		{"boot settle unset", base, func(t *testing.T, s *pb.PairSpec) {
			if s.GetTunables().GetBootSettle() != nil {
				t.Errorf("boot settle %v, want unset", s.GetTunables().GetBootSettle())
			}
		}},
		{"boot settle none", edit(t, "  checkpointDelay: 200ms\n", "  checkpointDelay: 200ms\n  bootSettle: 0s\n"), func(t *testing.T, s *pb.PairSpec) {
			if b := s.GetTunables().GetBootSettle(); b == nil || b.AsDuration() != 0 {
				t.Errorf("boot settle %v, want zero", b)
			}
		}},
		{"boot settle 40s", edit(t, "  checkpointDelay: 200ms\n", "  bootSettle: 40s\n"), func(t *testing.T, s *pb.PairSpec) {
			if b := s.GetTunables().GetBootSettle(); b.AsDuration() != 40*time.Second {
				t.Errorf("boot settle %v, want 40s", b)
			}
		}},
		{"auto re-protection off, rewriter off", edit(t, "  checkpointDelay: 200ms\n", "  autoReprotect: false\n  rewriter: false\n"), func(t *testing.T, s *pb.PairSpec) {
			if s.AutoReprotect == nil || s.GetAutoReprotect() || !s.GetTunables().GetNoRewriter() {
				t.Errorf("auto reprotect %v, no rewriter %v", s.AutoReprotect, s.GetTunables().GetNoRewriter())
			}
		}},
		{"two hosts, one path", `apiVersion: lockstep.dev/v1
kind: Pair
metadata: {name: web-2}
spec:
  disk: {size: 64Gi, path: /var/lib/lockstep/disks/web.qcow2, format: qcow2}
  nic: {mac: "52:54:00:aa:bb:cc", bridge: br0}
  primary: {host: hosta, address: 10.0.0.1}
  secondary: {host: hostb, address: 10.0.0.2, disk: {format: raw, path: /srv/web.raw}}
`, func(t *testing.T, s *pb.PairSpec) {
			a, b := s.GetPrimary(), s.GetSecondary()
			if a.GetDiskPath() != "/var/lib/lockstep/disks/web.qcow2" || a.GetDiskFormat() != "qcow2" || b.GetDiskPath() != "/srv/web.raw" ||
				b.GetDiskFormat() != "raw" || a.GetHost() != "hosta" || a.GetAddress() != "10.0.0.1" || s.GetNic().GetBackend() != pb.NicBackend_NIC_BACKEND_BRIDGE {
				t.Errorf("placements %v / %v, nic %v", a, b, s.GetNic())
			}
		}},
		{"JSON", `{"apiVersion": "lockstep.dev/v1", "kind": "Pair", "metadata": {"name": "db1"},
 "spec": {"disk": {"size": "64Mi", "path": "/d.raw"}, "nic": {"mac": "52:54:00:12:34:56", "tap": "tap0"},
  "primary": {"host": "10.0.0.1"}, "secondary": {"host": "10.0.0.2"}}}`, func(t *testing.T, s *pb.PairSpec) {
			if s.GetDiskSizeBytes() != 64<<20 || s.GetSecondary().GetDiskPath() != "/d.raw" {
				t.Errorf("spec %v", s)
			}
		}},
		{"status is ignored", base + "status:\n  state: protected\n  whatever: [1, 2]\n", func(t *testing.T, s *pb.PairSpec) {}},
		{"null is unset", edit(t, "  vcpus: 1\n", "  vcpus:\n"), func(t *testing.T, s *pb.PairSpec) {
			if s.GetVcpus() != 0 {
				t.Errorf("vcpus %d", s.GetVcpus())
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Decode([]byte(tc.doc))
			if err != nil {
				t.Fatalf("refused:\n%v", err)
			}
			s := p.ToProto()
			tc.check(t, s)
			checkProto(t, s)
		})
	}
}

func TestDecodeBad(t *testing.T) {
	for _, tc := range []struct {
		name   string
		doc    string
		field  string
		at     string // the text on the line the refusal points at
		col    int    // 0: not checked
		reason string
	}{
		{"unknown field", edit(t, "  vcpus: 1", "  vcpu: 1"), "spec.vcpu", "vcpu:", 3, "did you mean vcpus?"},
		{"misspelt nested field", edit(t, "    backend: socket", "    backnd: socket"), "spec.nic.backnd", "backnd", 5, "did you mean backend?"},
		{"unknown field, no near name", edit(t, "  vcpus: 1", "  colour: blue"), "spec.colour", "colour", 3, "spec takes memory, vcpus"},
		{"old format's field", edit(t, "  memory: 128Mi", "  memoryMib: 128"), "spec.memoryMib", "memoryMib", 3, "memory (with a unit"},
		{"unknown top-level field", base + "extra: 1\n", "extra", "extra:", 1, "a Pair takes apiVersion"},
		{"field given twice", edit(t, "  vcpus: 1", "  vcpus: 1\n  vcpus: 2"), "spec.vcpus", "vcpus: 2", 3, "given twice (first on line 7)"},
		{"wrong apiVersion", edit(t, "lockstep.dev/v1", "lockstep.dev/v2"), "apiVersion", "apiVersion", 13, "want lockstep.dev/v1"},
		{"no apiVersion", edit(t, "apiVersion: lockstep.dev/v1\n", ""), "apiVersion", "kind:", 1, "missing"},
		{"wrong kind", edit(t, "kind: Pair", "kind: Pod"), "kind", "kind:", 7, `"Pod": want Pair`},
		{"a PairList", edit(t, "kind: Pair", "kind: PairList"), "kind", "kind:", 7, "one Pair per document"},
		{"no name", edit(t, "  name: db1\n", "  name: \"\"\n"), "metadata.name", "name:", 0, "missing"},
		{"bad name", edit(t, "  name: db1", "  name: db 1"), "metadata.name", "name:", 9, "want 1-63 letters"},
		{"memory without a unit", edit(t, "memory: 128Mi", "memory: 512"), "spec.memory", "memory:", 11, "did you mean 512Mi?"},
		{"memory not whole MiB", edit(t, "memory: 128Mi", "memory: 1G"), "spec.memory", "memory:", 0, "not a whole number of MiB"},
		{"memory too small", edit(t, "memory: 128Mi", "memory: 32Mi"), "spec.memory", "memory:", 0, "want 64Mi to 1Ti"},
		{"memory a fraction", edit(t, "memory: 128Mi", "memory: 1.5Gi"), "spec.memory", "memory:", 0, "want a whole number with an optional unit"},
		{"memory a list", edit(t, "memory: 128Mi", "memory: [1]"), "spec.memory", "memory:", 0, "want a single value"},
		{"too many vcpus", edit(t, "vcpus: 1", "vcpus: 300"), "spec.vcpus", "vcpus:", 0, "want 1 to 255"},
		{"vcpus a word", edit(t, "vcpus: 1", "vcpus: two"), "spec.vcpus", "vcpus:", 0, "want a whole number"},
		{"vcpus negative", edit(t, "vcpus: 1", "vcpus: -1"), "spec.vcpus", "vcpus:", 0, "want a whole number"},
		{"vcpus huge", edit(t, "vcpus: 1", "vcpus: 99999999999"), "spec.vcpus", "vcpus:", 0, "too large"},
		{"q35", edit(t, "  accel: tcg", "  accel: tcg\n  machine: q35"), "spec.machine", "machine:", 0, "only pc"},
		{"unknown accel", edit(t, "accel: tcg", "accel: hvf"), "spec.accel", "accel:", 0, "want auto, kvm or tcg"},
		{"old accel", edit(t, "accel: tcg", "accel: ACCEL_TCG"), "spec.accel", "accel:", 0, "want auto, kvm or tcg"},
		{"initrd without a kernel", edit(t, "    kernel: /guest/vmlinuz\n", ""), "spec.boot.initrd", "initrd:", 0, "needs spec.boot.kernel"},
		{"no disk size", edit(t, "    size: 64Mi\n", ""), "spec.disk.size", "disk:", 0, "missing"},
		{"disk size not sectors", edit(t, "size: 64Mi", "size: 1000"), "spec.disk.size", "size:", 0, "multiple of 512"},
		{"disk size overflow", edit(t, "size: 64Mi", "size: 99999999999999Ei"), "spec.disk.size", "size:", 0, "too large"},
		{"disk format", edit(t, "    size: 64Mi", "    size: 64Mi\n    format: vmdk"), "spec.disk.format", "format:", 0, "want raw or qcow2"},
		{"relative disk path", edit(t, "{path: /disks/a.raw}", "{path: disks/a.raw}"), "spec.primary.disk.path", "disks/a.raw", 0, "absolute"},
		{"size on a side", edit(t, "{path: /disks/a.raw}", "{path: /disks/a.raw, size: 1Gi}"), "spec.primary.disk.size", "size: 1Gi", 0, "unknown field"},
		{"no MAC", edit(t, "    mac: \"52:54:00:12:34:56\"\n", ""), "spec.nic.mac", "nic:", 0, "missing"},
		{"bad MAC", edit(t, "52:54:00:12:34:56", "52:54:00:12:34"), "spec.nic.mac", "mac:", 0, "six hex pairs"},
		{"bad NIC model", edit(t, "    backend: socket", "    backend: socket\n    model: e100"), "spec.nic.model", "model:", 0, "want e1000"},
		{"no backend", edit(t, "    backend: socket\n", ""), "spec.nic", "nic:", 0, "no backend"},
		{"unknown backend", edit(t, "backend: socket", "backend: vde"), "spec.nic.backend", "backend:", 0, "want tap, bridge or socket"},
		{"tap and bridge", edit(t, "    backend: socket\n", "    tap: tap0\n    bridge: br0\n"), "spec.nic.bridge", "bridge:", 0, "not both"},
		{"tap without name", edit(t, "backend: socket", "backend: tap"), "spec.nic.tap", "nic:", 0, "missing"},
		{"bridge with socket", edit(t, "    backend: socket", "    backend: socket\n    bridge: br0"), "spec.nic.bridge", "bridge:", 0, "only with backend bridge"},
		{"socket without a hub port", edit(t, "    netSocket: 127.0.0.1:7002\n", ""), "spec.secondary.netSocket", "secondary:", 0, "missing"},
		{"hub port without a port", edit(t, "127.0.0.1:7002", "hub7002"), "spec.secondary.netSocket", "hub7002", 0, "want host:port"},
		{"empty QEMU command", edit(t, "[qemu-system-x86_64]", `[""]`), "spec.qemuCommand[0]", "qemuCommand", 0, "empty"},
		{"QEMU command a string", edit(t, "[qemu-system-x86_64]", "qemu-system-x86_64"), "spec.qemuCommand", "qemuCommand", 16, "want a list"},
		{"checkpoint delay too short", edit(t, "checkpointDelay: 200ms", "checkpointDelay: 5ms"), "spec.checkpointDelay", "checkpointDelay", 0, "want 10ms to 1h"},
		{"checkpoint delay without a unit", edit(t, "checkpointDelay: 200ms", "checkpointDelay: 200"), "spec.checkpointDelay", "checkpointDelay", 0, "has no unit"},
		{"checkpoint delay old form", edit(t, "checkpointDelay: 200ms", "checkpointDelay: 0.2s"), "", "", 0, ""}, // 0.2s is a Go duration: good
		{"compare timeout too long", edit(t, "checkpointDelay: 200ms", "compareTimeout: 2m"), "spec.compareTimeout", "compareTimeout", 0, "want 10ms to 1m"},
		{"boot settle too long", edit(t, "checkpointDelay: 200ms", "bootSettle: 11m"), "spec.bootSettle", "bootSettle", 0, "want 0s (none) to 10m"},
		{"boot settle negative", edit(t, "checkpointDelay: 200ms", "bootSettle: -1s"), "spec.bootSettle", "bootSettle", 0, "want 0s (none) to 10m"},
		{"bandwidth a word", edit(t, "checkpointDelay: 200ms", "maxBandwidth: fast"), "spec.maxBandwidth", "maxBandwidth", 0, "bytes per second"},
		{"replication TLS a word", edit(t, "checkpointDelay: 200ms", "replicationTLS: maybe"), "spec.replicationTLS", "replicationTLS", 0, "want auto, on or off"},
		{"replication TLS bad", edit(t, "checkpointDelay: 200ms", "replicationTLS: maybe"), "spec.replicationTLS", "replicationTLS", 0, "want auto, on or off"},
		{"replication TLS auto", edit(t, "checkpointDelay: 200ms", "replicationTLS: auto"), "", "", 0, ""},
		{"auto re-protect yes", edit(t, "checkpointDelay: 200ms", "autoReprotect: yes"), "spec.autoReprotect", "autoReprotect", 0, "want true or false"},
		{"no primary host", edit(t, "  primary:\n    host: 127.0.0.1\n", "  primary:\n"), "spec.primary.host", "primary:", 0, "missing"},
		{"no secondary", strings.Split(base, "  secondary:")[0], "spec.secondary.host", "spec:", 0, "missing"},
		{"address not an IP", edit(t, "  primary:\n    host: 127.0.0.1\n", "  primary:\n    host: 127.0.0.1\n    address: hosta\n"), "spec.primary.address", "address:", 0, "want an IP address"},
		{"host name without address", edit(t, "  primary:\n    host: 127.0.0.1\n", "  primary:\n    host: hosta\n"), "spec.primary.address", "primary:", 0, "needs the IP address"},
		{"one image for both sides on one host", edit(t, "/disks/b.raw", "/disks/a.raw"), "spec.secondary.disk.path", "{path: /disks/a.raw}\n    netSocket: 127.0.0.1:7002", 0, "the primary's image too"},
		{"spec a list", strings.Split(base, "spec:")[0] + "spec: [1]\n", "spec", "spec:", 7, "want a mapping"},
		{"an alias", edit(t, "  vcpus: 1", "  vcpus: &n 1\n  machine: *n"), "spec.machine", "machine:", 12, "aliases are not taken"},
		{"a custom tag", edit(t, "vcpus: 1", "vcpus: !!binary AQ=="), "spec.vcpus", "vcpus:", 0, "tag !!binary"},
		{"a second document", base + "---\n" + base, "(document)", "---", 0, "a second document"},
		{"not YAML", edit(t, "    mac: \"52:54:00:12:34:56\"", "    mac: \"52:54:00:12:34:56"), "spec.nic.mac", "", 0, "not valid YAML"},
		{"not YAML either", "apiVersion: lockstep.dev/v1\nkind: Pair\nspec:\n  vcpus: 1\n   memory: 1Gi\n", "spec.vcpus", "", 0, "not valid YAML"},
		{"empty", "", "apiVersion", "", 0, "empty document"},
		{"a list", "- 1\n", "(document)", "- 1", 1, "want a Pair"},
		{"JSON with an unknown field", `{"apiVersion": "lockstep.dev/v1", "kind": "Pair", "metadata": {"name": "db1", "labels": {}}}`, "metadata.labels", "", 79, "unknown field"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Decode([]byte(tc.doc))
			if tc.field == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted, want a refusal of %s", tc.field)
			}
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("error %T %v is not Errors", err, err)
			}
			line := 1
			if tc.at != "" {
				line = lineOf(t, tc.doc, strings.Split(tc.at, "\n")[0])
				if strings.Contains(tc.at, "\n") { // the second occurrence: the line after the first's
					idx := strings.Index(tc.doc, tc.at)
					line = strings.Count(tc.doc[:idx], "\n") + 1
				}
			}
			var found *FieldError
			for _, e := range es {
				if e.Field == "" || e.Line < 1 || e.Column < 1 || e.Reason == "" {
					t.Errorf("refusal without a field or a position: %+v", e)
				}
				if e.Field == tc.field && found == nil {
					found = e
				}
			}
			if found == nil {
				t.Fatalf("no refusal of %s in:\n%v", tc.field, err)
			}
			if tc.at != "" && found.Line != line {
				t.Errorf("%s refused at line %d, want %d (%q):\n%v", tc.field, found.Line, line, tc.at, err)
			}
			if tc.col != 0 && found.Column != tc.col {
				t.Errorf("%s refused at column %d, want %d:\n%v", tc.field, found.Column, tc.col, err)
			}
			if !strings.Contains(found.Reason, tc.reason) {
				t.Errorf("reason %q lacks %q", found.Reason, tc.reason)
			}
			if !strings.Contains(err.Error(), tc.field+": ") {
				t.Errorf("message %q does not name %s", err.Error(), tc.field)
			}
		})
	}
}

// Every problem of a spec comes back at once, in document order.
func TestDecodeReportsEveryProblem(t *testing.T) {
	doc := edit(t, "  vcpus: 1\n", "  vcpus: 300\n  memry: 1Gi\n")
	doc = strings.Replace(doc, "52:54:00:12:34:56", "zz", 1)
	_, err := Decode([]byte(doc))
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("err %v", err)
	}
	var fields []string
	for _, e := range es {
		fields = append(fields, e.Field)
	}
	if got, want := strings.Join(fields, " "), "spec.vcpus spec.memry spec.nic.mac"; got != want {
		t.Fatalf("refused %s, want %s:\n%v", got, want, err)
	}
}

// The documents under testdata are the examples the docs show; each decodes and round-trips.
func TestExamples(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.yaml")
	if len(files) < 2 {
		t.Fatalf("examples: %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		p, err := Decode(b)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		checkRoundTrip(t, p.ToProto())
	}
}

// checkRoundTrip: a PairSpec printed in both formats decodes back to the same PairSpec.
func checkRoundTrip(t testing.TB, s *pb.PairSpec) {
	t.Helper()
	for _, enc := range []struct {
		name string
		fn   func(*bytes.Buffer, any) error
	}{{"yaml", func(b *bytes.Buffer, v any) error { return EncodeYAML(b, v) }}, {"json", func(b *bytes.Buffer, v any) error { return EncodeJSON(b, v) }}} {
		var buf bytes.Buffer
		if err := enc.fn(&buf, FromProto(s, nil)); err != nil {
			t.Fatalf("%s: %v", enc.name, err)
		}
		p, err := Decode(buf.Bytes())
		if err != nil {
			t.Fatalf("%s output refused: %v\n%s", enc.name, err, buf.String())
		}
		if back := p.ToProto(); !proto.Equal(back, s) {
			t.Fatalf("%s round trip changed the spec:\n  in: %v\n out: %v\n%s", enc.name, s, back, buf.String())
		}
	}
}

// What the agent returns (defaults filled in, status, two hosts) prints as a Pair that decodes
// back to the same spec: `get -o yaml | create -f -`.
func TestAgentSpecRoundTrip(t *testing.T) {
	yes := true
	spec := &pb.PairSpec{
		Name: "db1", MemoryMib: 512, Vcpus: 1, Machine: "pc", Accel: pb.Accel_ACCEL_AUTO, DiskSizeBytes: 64 << 30,
		Nic:         &pb.Nic{Mac: "52:54:00:12:34:56", Model: "e1000", Backend: pb.NicBackend_NIC_BACKEND_BRIDGE, Bridge: "br0"},
		QemuCommand: []string{"qemu-system-x86_64"}, QemuImgCommand: []string{"qemu-img"},
		Tunables: &pb.Tunables{CheckpointDelay: durationpb.New(200 * time.Millisecond), CompareTimeout: durationpb.New(3 * time.Second),
			BootSettle: durationpb.New(0), NoRewriter: true, MaxBandwidthBytesPerSecond: 125e6},
		Primary:       &pb.Placement{Host: "hosta", Address: "10.0.0.1", DiskPath: "/var/lib/lockstep/db1.raw"},
		Secondary:     &pb.Placement{Host: "hostb", Address: "10.0.0.2", DiskPath: "/var/lib/lockstep/db1.raw"},
		AutoReprotect: &yes,
	}
	checkRoundTrip(t, spec)
	st := &pb.PairStatus{State: pb.PairState_PAIR_STATE_FAILING_OVER, PrimaryHost: "hostb", Generation: 3, Epoch: 9,
		Primary:         &pb.SideStatus{Running: true, ColoMode: pb.ColoMode_COLO_MODE_NONE, QemuVersion: "11.1.3"},
		CheckpointStats: &pb.CheckpointStats{Count: 10, EarlyCount: 2, PauseP50: durationpb.New(25 * time.Millisecond)},
		Resync:          &pb.ResyncProgress{Offset: 1, Length: 2}}
	var buf bytes.Buffer
	if err := EncodeYAML(&buf, FromProto(spec, st)); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{"state: failing-over", "colo: none", "pauseP50: 25ms", "mismatch: 2", "copiedBytes: 1", "maxBandwidth: 125M/s", "rewriter: false", "bootSettle: 0s"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	p, err := Decode(buf.Bytes())
	if err != nil {
		t.Fatalf("get output refused: %v\n%s", err, out)
	}
	if back := p.ToProto(); !proto.Equal(back, spec) {
		t.Fatalf("round trip changed the spec:\n  in: %v\n out: %v", spec, back)
	}
}

func TestUnits(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		out  string
	}{
		{"512Mi", 512 << 20, "512Mi"}, {"512MiB", 512 << 20, "512Mi"}, {"1Gi", 1 << 30, "1Gi"}, {"1024Mi", 1 << 30, "1Gi"},
		{"64Gi", 64 << 30, "64Gi"}, {"1G", 1e9, "1G"}, {"2k", 2000, "2k"}, {"1000", 1000, "1k"}, {"1500", 1500, "1500"}, {"4096", 4096, "4Ki"}, {"0", 0, "0"}, {"7", 7, "7"},
		{"1Ei", 1 << 60, "1Ei"}, {"16Ei", 0, ""}, {"1.5Gi", 0, ""}, {"Mi", 0, ""}, {"-1", 0, ""}, {"1 Gi", 0, ""},
	} {
		b, err := ParseBytes(tc.in)
		if tc.out == "" {
			if err == nil {
				t.Errorf("ParseBytes(%q) = %d, want an error", tc.in, b)
			}
			continue
		}
		if err != nil || uint64(b) != tc.want || b.String() != tc.out {
			t.Errorf("ParseBytes(%q) = %d (%s), %v; want %d (%s)", tc.in, b, b, err, tc.want, tc.out)
		}
	}
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{{"200ms", 200 * time.Millisecond, true}, {"1m30s", 90 * time.Second, true}, {"0", 0, true}, {"0.2s", 200 * time.Millisecond, true}, {"200", 0, false}, {"soon", 0, false}} {
		d, err := ParseDuration(tc.in)
		if (err == nil) != tc.ok || d.D() != tc.want {
			t.Errorf("ParseDuration(%q) = %v, %v", tc.in, d, err)
		}
	}
}

// Validate checks a Pair built in Go, naming fields without positions.
func TestValidate(t *testing.T) {
	p := FromProto(&pb.PairSpec{Name: "db1", DiskSizeBytes: 1 << 20, Nic: &pb.Nic{Mac: "52:54:00:12:34:56", Tap: "t0", Backend: pb.NicBackend_NIC_BACKEND_TAP},
		Primary: &pb.Placement{Host: "10.0.0.1", DiskPath: "/a"}, Secondary: &pb.Placement{Host: "10.0.0.2", DiskPath: "/a"}}, nil)
	if err := Validate(p); err != nil {
		t.Fatalf("good pair refused: %v", err)
	}
	p.Spec.VCPUs = 256
	err := Validate(p)
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "spec.vcpus" || fe.Line != 0 || err.Error() != "spec.vcpus: 256: want 1 to 255" {
		t.Fatalf("err %v", err)
	}
}

// The spec of README.md decodes, and its misspelling is refused as the page says.
func TestDocsExample(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	page := string(b)
	_, rest, ok := strings.Cut(page, "```yaml\n")
	doc, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("no yaml block in the page")
	}
	p, err := Decode([]byte(doc))
	if err != nil {
		t.Fatalf("the page's spec is refused: %v\n%s", err, doc)
	}
	checkProto(t, p.ToProto())
	_, err = Decode([]byte(strings.Replace(doc, "size:", "sise:", 1)))
	var es Errors
	if !errors.As(err, &es) || len(es) == 0 {
		t.Fatalf("misspelt: %v", err)
	}
	var said string
	for _, e := range es {
		if e.Field == "spec.disk.sise" {
			said = fmt.Sprintf("db1.yaml:%d:%d: %s: %s", e.Line, e.Column, e.Field, e.Reason)
		}
	}
	if !strings.Contains(page, "`"+said+"`") {
		t.Fatalf("the page does not say %q", said)
	}
}

// docs/spec.md has a row for every field of the format.
func TestSpecReferenceComplete(t *testing.T) {
	b, err := os.ReadFile("../docs/spec.md")
	if err != nil {
		t.Fatal(err)
	}
	page := string(b)
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for typ.Kind() == reflect.Pointer {
			typ = typ.Elem()
		}
		if typ == reflect.TypeFor[Placement]() && prefix == "spec.secondary" {
			return // one row for the secondary's fields: "spec.secondary.*"
		}
		for i := range typ.NumField() {
			f := typ.Field(i)
			name, opts, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			path := prefix
			if !strings.Contains(opts, "inline") {
				path = prefix + "." + name
			}
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct && ft.PkgPath() == typ.PkgPath() {
				walk(path, ft)
				continue
			}
			if !strings.Contains(page, "| `"+path+"` |") {
				t.Errorf("docs/spec.md has no row for %s", path)
			}
		}
	}
	walk("metadata", reflect.TypeFor[Metadata]())
	walk("spec", reflect.TypeFor[Spec]())
	if !strings.Contains(page, "| `spec.secondary.*` |") {
		t.Errorf("docs/spec.md has no row for spec.secondary.*")
	}
}
