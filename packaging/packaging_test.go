// Package packaging holds what installs lockstep on a host (a systemd unit for lockstepd, its
// default configuration) and the test of `make install`.
package packaging

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// install runs `make install DESTDIR=dest` from the repository's top.
func install(t *testing.T, dest string) string {
	t.Helper()
	cmd := exec.Command("make", "-s", "-C", "..", "install", "DESTDIR="+dest)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make install DESTDIR=%s: %v\n%s", dest, err, out)
	}
	return string(out)
}

// verify runs systemd-analyze verify on unit (a path inside root) with root as the file
// system, and returns what it printed.
func verify(t *testing.T, root, unit string) (string, error) {
	t.Helper()
	out, err := exec.Command("systemd-analyze", "verify", "--root="+root, unit).CombinedOutput()
	return string(out), err
}

func TestMakeInstall(t *testing.T) {
	dest := t.TempDir()
	install(t, dest)
	for _, f := range []struct {
		path string
		mode os.FileMode
		has  string
	}{
		{"usr/local/bin/lockstepd", 0o755, ""},
		{"usr/local/bin/lockstepctl", 0o755, ""},
		{"usr/local/lib/systemd/system/lockstepd.service", 0o644, "ExecStart=/usr/local/bin/lockstepd --config /etc/lockstep/lockstepd.yaml\n"},
		{"etc/lockstep/lockstepd.yaml", 0o644, "state-dir: /var/lib/lockstep\n"},
		{"usr/local/share/bash-completion/completions/lockstepctl", 0o644, "__start_lockstepctl"},
		{"usr/local/share/zsh/site-functions/_lockstepctl", 0o644, "#compdef lockstepctl"},
		{"usr/local/share/fish/vendor_completions.d/lockstepctl.fish", 0o644, "complete -c lockstepctl"},
		{"usr/local/share/doc/lockstep/README.md", 0o644, "lockstep"},
	} {
		p := filepath.Join(dest, f.path)
		st, err := os.Stat(p)
		if err != nil {
			t.Errorf("not installed: %v", err)
			continue
		}
		if st.Mode().Perm() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.path, st.Mode().Perm(), f.mode)
		}
		if b, _ := os.ReadFile(p); !bytes.Contains(b, []byte(f.has)) {
			t.Errorf("%s lacks %q", f.path, f.has)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(dest, "usr/local/lib/systemd/system/lockstepd.service"))
	for _, w := range []string{"StateDirectory=lockstep\n", "RuntimeDirectory=lockstep\n", "ConfigurationDirectory=lockstep\n", "KillMode=process\n"} {
		if !bytes.Contains(unit, []byte(w)) {
			t.Errorf("unit lacks %q", w)
		}
	}
	if bytes.Contains(unit, []byte("@")) {
		t.Errorf("unit has a placeholder left:\n%s", unit)
	}

	// An operator's edit of the configuration survives the next install.
	conf := filepath.Join(dest, "etc/lockstep/lockstepd.yaml")
	edited := []byte("state-dir: /srv/lockstep\n")
	os.WriteFile(conf, edited, 0o644)
	if out := install(t, dest); !strings.Contains(out, "keeping") {
		t.Errorf("second install said %q", out)
	}
	if b, _ := os.ReadFile(conf); !bytes.Equal(b, edited) {
		t.Errorf("install overwrote the configuration: %q", b)
	}
}

// The installed unit passes systemd-analyze verify against this host's systemd units, and a
// broken one does not.
func TestUnitVerifies(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze is not installed (Debian's systemd package; .ci/run installs it)")
	}
	dest := t.TempDir()
	install(t, dest)
	// verify resolves the unit's dependencies (sysinit.target, network-online.target) inside
	// --root: give it this host's units.
	if err := os.MkdirAll(filepath.Join(dest, "usr/lib/systemd"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", "/usr/lib/systemd/system", filepath.Join(dest, "usr/lib/systemd/")).CombinedOutput(); err != nil {
		t.Fatalf("copying the host's units: %v\n%s", err, out)
	}
	const unit = "/usr/local/lib/systemd/system/lockstepd.service"
	if out, err := verify(t, dest, unit); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("systemd-analyze verify %s: %v\n%s", unit, err, out)
	}
	// The check is real: without the binary the unit fails it.
	os.Remove(filepath.Join(dest, "usr/local/bin/lockstepd"))
	if out, err := verify(t, dest, unit); err == nil || !strings.Contains(out, "/usr/local/bin/lockstepd is not executable") {
		t.Fatalf("verify without the binary: %v\n%s", err, out)
	}
}

// The installed lockstepd starts with the installed configuration (the test's folders given as
// flags, which win over the file), and the installed lockstepctl talks to it.
func TestInstalledConfigStarts(t *testing.T) {
	dest := t.TempDir()
	install(t, dest)
	run := t.TempDir()
	sock := filepath.Join(run, "api.sock")
	d := exec.Command(filepath.Join(dest, "usr/local/bin/lockstepd"), "--config", filepath.Join(dest, "etc/lockstep/lockstepd.yaml"),
		"--state-dir", filepath.Join(run, "state"), "--overlay-dir", filepath.Join(run, "overlay"), "--listen", "unix://"+sock,
		"--metrics-listen", "127.0.0.1:0", "--host", "packaging-test")
	var logs bytes.Buffer
	d.Stdout, d.Stderr = &logs, &logs
	d.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- d.Wait() }()
	t.Cleanup(func() {
		d.Process.Kill() // by its PID; a no-op once it has exited
		<-exited
	})
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("lockstepd exited: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("lockstepd does not serve %s:\n%s", sock, logs.String())
		}
	}
	out, err := exec.Command(filepath.Join(dest, "usr/local/bin/lockstepctl"), "--addr", "unix://"+sock, "list").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "PAIR") {
		t.Fatalf("lockstepctl list: %v\n%s", err, out)
	}
	d.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("lockstepd after SIGTERM: %v\n%s", err, logs.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("lockstepd did not stop on SIGTERM:\n%s", logs.String())
	}
}
