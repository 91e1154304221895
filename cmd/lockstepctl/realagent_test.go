package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	for _, w := range []string{"memory: 128Mi", "vcpus: 1", "machine: pc", "model: e1000", "checkpointDelay: 300ms", "compareTimeout: 100ms", "bootSettle: 0s", "autoReprotect: false", "status:"} {
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

// Against the real agent: a dry run checks and fills in and creates nothing; a pair that takes
// another's MAC and disk is refused naming it, before and at create; stop, start and their
// refusals; the drills and the console refuse a pair that is not protected or runs no primary.
func TestRealAgentOperatorCalls(t *testing.T) {
	addr := agentAddr(t)
	dir := t.TempDir()
	qemu := filepath.Join(dir, "qemu")
	os.WriteFile(qemu, []byte("#!/bin/sh\n[ \"$1\" = --version ] && echo 'QEMU emulator version 11.1.3' && exit 0\nexit 1\n"), 0o755)
	disk := filepath.Join(dir, "a.raw")
	os.WriteFile(disk, make([]byte, 1<<20), 0o600)
	other := filepath.Join(dir, "c.raw")
	os.WriteFile(other, make([]byte, 1<<20), 0o600)
	spec := func(name, mac, pdisk, sdisk, ports string) string {
		return `apiVersion: lockstep.dev/v1
kind: Pair
metadata: {name: ` + name + `}
spec:
  memory: 128Mi
  accel: tcg
  disk: {size: 1Mi}
  nic: {mac: "` + mac + `", backend: socket}
  qemuCommand: [` + qemu + `]
  qemuImgCommand: [` + qemu + `]
  restartPolicy: never
  primary: {host: 127.0.0.1, disk: {path: ` + pdisk + `}, netSocket: "127.0.0.1:` + ports + `1"}
  secondary: {host: 127.0.0.1, disk: {path: ` + sdisk + `}, netSocket: "127.0.0.1:` + ports + `2"}
`
	}
	ctl := func(stdin string, want int, args ...string) (string, string) {
		t.Helper()
		var out, errOut bytes.Buffer
		if code := runWith(append([]string{"--addr", addr}, args...), strings.NewReader(stdin), &out, &errOut); code != want {
			t.Fatalf("%v: exit %d, want %d\n%s%s", args, code, want, out.String(), errOut.String())
		}
		return out.String(), errOut.String()
	}
	out, _ := ctl(spec("op1", "52:54:00:00:00:01", disk, filepath.Join(dir, "b.raw"), "1"), exitOK, "create", "--dry-run", "-f", "-")
	for _, w := range []string{"kind: Pair", "name: op1", "vcpus: 1", "machine: pc", "restartPolicy: never"} {
		if !strings.Contains(out, w) {
			t.Errorf("dry run lacks %q:\n%s", w, out)
		}
	}
	if out, _ := ctl("", exitOK, "list"); strings.Contains(out, "op1") {
		t.Fatalf("a dry run created the pair:\n%s", out)
	}
	ctl(spec("op1", "52:54:00:00:00:01", disk, filepath.Join(dir, "b.raw"), "1"), exitOK, "create", "-f", "-")
	// Same MAC, same primary disk as op1's, same secondary hub port: every field named, with op1.
	clash := spec("op2", "52:54:00:00:00:01", disk, filepath.Join(dir, "d.raw"), "1")
	for _, args := range [][]string{{"create", "--dry-run", "-f", "-"}, {"create", "-f", "-"}} {
		_, errOut := ctl(clash, exitUsage, args...)
		for _, w := range []string{"nic.mac", "primary.disk", "secondary.netSocket", `pair "op1"`} {
			if !strings.Contains(errOut, w) {
				t.Errorf("%v of a clashing pair: the refusal lacks %q:\n%s", args, w, errOut)
			}
		}
	}
	if out, _ := ctl("", exitOK, "list"); strings.Contains(out, "op2") {
		t.Fatalf("a refused pair was created:\n%s", out)
	}
	// op1's QEMU never runs (restart policy never): the pair fails; start is allowed, a drill
	// and the console are not.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if out, _ := ctl("", exitOK, "status", "op1", "-o", "json"); strings.Contains(out, `"state": "failed"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("op1 did not fail although its QEMU cannot start")
		}
	}
	if _, errOut := ctl("", exitFailed, "test-failover", "op1"); !strings.Contains(errOut, "protected") {
		t.Errorf("test-failover of an unprotected pair: %s", errOut)
	}
	if _, errOut := ctl("", exitFailed, "test-restart-secondary", "op1"); !strings.Contains(errOut, "protected") {
		t.Errorf("test-restart-secondary of an unprotected pair: %s", errOut)
	}
	if _, errOut := ctl("", exitFailed, "console", "op1"); !strings.Contains(errOut, "no primary running") {
		t.Errorf("console of a pair with no primary: %s", errOut)
	}
	if out, _ := ctl("", exitOK, "stop", "op1"); !strings.Contains(out, "stopped") {
		t.Errorf("stop: %s", out)
	}
	if _, errOut := ctl("", exitFailed, "stop", "op1"); !strings.Contains(errOut, "stopped already") {
		t.Errorf("second stop: %s", errOut)
	}
	if out, _ := ctl("", exitOK, "status", "op1", "-o", "json"); !strings.Contains(out, `"state": "stopped"`) || !strings.Contains(out, "stopped by the operator") {
		t.Errorf("status of a stopped pair:\n%s", out)
	}
	ctl("", exitOK, "start", "op1")
	if _, errOut := ctl("", exitUsage, "start", "nope"); !strings.Contains(errOut, "nope") {
		t.Errorf("start of an unknown pair: %s", errOut)
	}
	ctl("", exitOK, "delete", "op1")
	// The clashing spec is fine once op1 is gone.
	ctl(clash, exitOK, "create", "--dry-run", "-f", "-")
	_ = other
}
