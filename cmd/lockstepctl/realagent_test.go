package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lockstepvm/lockstep/pairspec"
)

// Against the real agent (whose QEMU here is a script that only tells its version and whose
// VM therefore never runs): a lockstep.dev/v1 spec is accepted, `get -o yaml` prints it with
// the agent's defaults filled in, and that output creates the same pair again.
func TestRealAgentGetCreateRoundTrip(t *testing.T) {
	addr := agentAddr(t)
	dir := t.TempDir()
	qemu := filepath.Join(dir, "qemu")
	os.WriteFile(qemu, []byte("#!/bin/sh\n[ \"$1\" = --version ] && echo 'QEMU emulator version 11.1.3' && exit 0\nexit 1\n"), 0o755)
	disk := filepath.Join(dir, "a.raw")
	os.WriteFile(disk, make([]byte, 1<<20), 0o600)
	doc := `apiVersion: lockstep.dev/v1
kind: Pair
metadata: {name: rt1}
spec:
  memory: 128Mi
  accel: tcg
  disk: {size: 1Mi}
  nic: {mac: "52:54:00:12:34:56", backend: socket}
  qemuCommand: [` + qemu + `]
  qemuImgCommand: [` + qemu + `]
  checkpointDelay: 300ms
  bootSettle: 0s
  autoReprotect: false
  primary: {host: 127.0.0.1, disk: {path: ` + disk + `}, netSocket: "127.0.0.1:1"}
  secondary: {host: 127.0.0.1, disk: {path: ` + filepath.Join(dir, "b.raw") + `}, netSocket: "127.0.0.1:2"}
`
	ctl := func(stdin string, args ...string) string {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := runWith(append([]string{"--addr", addr}, args...), strings.NewReader(stdin), &out, &errOut); code != exitOK {
			t.Fatalf("%v: exit %d\n%s%s", args, code, out.String(), errOut.String())
		}
		return out.String()
	}
	ctl(doc, "create", "-f", "-")
	first := ctl("", "get", "rt1", "-o", "yaml")
	p1, err := pairspec.Decode([]byte(first))
	if err != nil {
		t.Fatalf("get -o yaml refused by create: %v\n%s", err, first)
	}
	for _, w := range []string{"memory: 128Mi", "vcpus: 1", "machine: pc", "model: e1000", "checkpointDelay: 300ms", "compareTimeout: 3s", "bootSettle: 0s", "autoReprotect: false", "status:"} {
		if !strings.Contains(first, w) {
			t.Errorf("get -o yaml lacks %q (the agent's defaults):\n%s", w, first)
		}
	}
	ctl("", "delete", "rt1")
	ctl(first, "create", "-f", "-")
	second := ctl("", "get", "rt1", "-o", "yaml")
	p2, err := pairspec.Decode([]byte(second))
	if err != nil {
		t.Fatal(err)
	}
	var s1, s2 bytes.Buffer
	pairspec.EncodeYAML(&s1, p1.Spec)
	pairspec.EncodeYAML(&s2, p2.Spec)
	if s1.String() != s2.String() {
		t.Fatalf("the spec changed in the round trip:\n%s\nthen\n%s", s1.String(), s2.String())
	}
	ctl("", "delete", "rt1")
}
