package guest_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest"
)

// cpioEntry is one file of a newc cpio archive.
type cpioEntry struct {
	mode uint32
	data []byte
}

// readInitramfs parses a gzip-compressed newc cpio archive.
func readInitramfs(t *testing.T, path string) map[string]cpioEntry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	files := make(map[string]cpioEntry)
	align := func(n int) int { return (n + 3) &^ 3 }
	for off := 0; ; {
		if off+110 > len(raw) || string(raw[off:off+6]) != "070701" {
			t.Fatalf("initramfs: no newc header at offset %d", off)
		}
		field := func(i int) int {
			v, err := strconv.ParseUint(string(raw[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("initramfs: bad header field at %d: %v", off, err)
			}
			return int(v)
		}
		mode, size, namesize := field(1), field(6), field(11)
		name := string(raw[off+110 : off+110+namesize-1])
		dataOff := align(off + 110 + namesize)
		if name == "TRAILER!!!" {
			return files
		}
		files[strings.TrimPrefix(name, "./")] = cpioEntry{mode: uint32(mode), data: raw[dataOff : dataOff+size]}
		off = align(dataOff + size)
	}
}

// TestBuildContents builds the guest (or finds it built) and checks what the
// initramfs holds, without booting it: so it runs where QEMU is missing.
func TestBuildContents(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the guest from Debian packages; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	p, err := guest.Build(ctx)
	if err != nil {
		t.Fatal(err)
	}
	files := readInitramfs(t, p.Initrd)

	init, ok := files["init"]
	if !ok || init.mode&0o111 == 0 || !bytes.HasPrefix(init.data, []byte("#!/bin/sh")) {
		t.Fatalf("initramfs lacks an executable /init script")
	}
	if l, ok := files["bin/sh"]; !ok || string(l.data) != "busybox" {
		t.Errorf("bin/sh is not a link to busybox")
	}
	for _, name := range []string{"bin/busybox", "bin/workload"} {
		e, ok := files[name]
		if !ok {
			t.Fatalf("initramfs lacks %s", name)
		}
		ef, err := elf.NewFile(bytes.NewReader(e.data))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, prog := range ef.Progs {
			if prog.Type == elf.PT_INTERP {
				t.Errorf("%s is dynamically linked; the initramfs has no C library", name)
			}
		}
		if ef.Machine != elf.EM_X86_64 {
			t.Errorf("%s is for %v", name, ef.Machine)
		}
	}

	// Every module in the load order is in the archive, e1000 loads apart
	// from the disk's modules, and each module comes after those it needs.
	order, ok := files["lib/modules/load-order"]
	if !ok {
		t.Fatal("initramfs lacks lib/modules/load-order")
	}
	pos := make(map[string][2]int) // module -> group, position in group
	lines := strings.Split(strings.TrimSpace(string(order.data)), "\n")
	for g, line := range lines {
		for i, m := range strings.Fields(line) {
			if _, ok := files["lib/modules/"+m]; !ok {
				t.Errorf("load-order names %s, which the archive lacks", m)
			}
			pos[m] = [2]int{g, i}
		}
	}
	before := func(a, b string) {
		pa, oka := pos[a]
		pb, okb := pos[b]
		if !oka || !okb || pa[0] != pb[0] || pa[1] >= pb[1] {
			t.Errorf("load order %q: want %s before %s in one group", lines, a, b)
		}
	}
	before("scsi_mod.ko", "libata.ko")
	before("libata.ko", "ata_piix.ko")
	before("scsi_mod.ko", "sd_mod.ko")
	before("crc-t10dif.ko", "sd_mod.ko")
	if e, ok := pos["e1000.ko"]; !ok || e[0] == pos["sd_mod.ko"][0] {
		t.Errorf("load order %q: want e1000.ko in a group of its own", lines)
	}

	// The kernel to boot is an x86-64 ELF (PVH) or a bzImage.
	k, err := os.ReadFile(p.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(k, []byte("\x7fELF")) && !(len(k) > 0x206 && string(k[0x202:0x206]) == "HdrS") {
		t.Errorf("%s is neither an ELF kernel nor a bzImage", p.Kernel)
	}

	// A second run of build.sh reuses the build.
	// (go test runs a package's tests in its folder, which holds build.sh.)
	script, err := filepath.Abs("build.sh")
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script, filepath.Dir(p.Dir))
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("build.sh again: %v\n%s", err, stderr.String())
	}
	if want := fmt.Sprintf("kernel=%s\ninitrd=%s\n", p.Kernel, p.Initrd); string(out) != want {
		t.Errorf("second build printed %q, want %q", out, want)
	}
	if !strings.Contains(stderr.String(), "up to date") {
		t.Errorf("second build rebuilt instead of reusing:\n%s", stderr.String())
	}
}
