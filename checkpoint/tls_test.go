package checkpoint_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

func tlsGen() checkpoint.Generation {
	g := protectionGen()
	g.TLS = &checkpoint.GenTLS{PrimaryDir: "/run/a/tls", SecondaryDir: "/run/b/tls", PrimaryName: "hosta", SecondaryName: "hostb"}
	return g
}

// The commands of an encrypted protection, both QEMUs driven by one process: the secondary's
// server credentials, the primary's authorization and the incoming migration's TLS before the
// NBD server starts with TLS; the primary drops the TLS objects of earlier generations, adds
// its server and client credentials and the secondary's authorization, and then its chardev
// servers, its NBD client and its migration (with the host to check) take them. Everything
// else is the plaintext sequence.
func TestProtectTLSCommands(t *testing.T) {
	prim, sec := fakePrimary(t), fakeSecondary(t, 11, 1, 3)
	prim.Handle("qom-list", qmptest.Return([]map[string]string{
		{"name": "type", "type": "string"}, {"name": "m0", "type": "child<filter-mirror>"},
		{"name": "tlsc7", "type": "child<tls-creds-x509>"}, {"name": "tlsz7", "type": "child<authz-list>"}, {"name": "tlsred", "type": "child<tls-creds-x509>"},
	}))
	prim.Handle("object-del", qmptest.Return(struct{}{}))
	sec.Handle("object-add", qmptest.Return(struct{}{}))
	sec.Handle("migrate-set-parameters", qmptest.Return(struct{}{}))
	p, s := dial(t, prim), dial(t, sec)
	seq := checkpoint.StartProtection(checkpoint.ProtectConfig{
		Spec: validSpec(), Gen: tlsGen(), Primary: p, Secondary: s,
		DialMigration:   func(context.Context) (*os.File, error) { return pipeFile(t), nil },
		AcceptMigration: func(context.Context) (*os.File, error) { return pipeFile(t), nil },
	})
	if _, err := seq.Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	wantSec := []string{
		`query-version`, `query-qmp-schema`, `query-migrate-capabilities`,
		`migrate-set-capabilities {"capabilities":[{"capability":"return-path","state":true},{"capability":"x-colo","state":true}]}`,
		`object-add {"dir":"/run/b/tls","endpoint":"server","id":"tlss1","qom-type":"tls-creds-x509","verify-peer":true}`,
		`object-add {"id":"tlsz1","policy":"deny","qom-type":"authz-list","rules":[{"format":"exact","match":"CN=hosta","policy":"allow"},{"format":"glob","match":"CN=hosta,*","policy":"allow"}]}`,
		`migrate-set-parameters {"tls-creds":"tlss1","tls-authz":"tlsz1"}`,
		`nbd-server-start {"addr":{"data":{"host":"10.0.0.2","port":"2001"},"type":"inet"},"tls-authz":"tlsz1","tls-creds":"tlss1"}`,
		`nbd-server-add {"device":"parent0","writable":true}`,
		`getfd {"fdname":"mig1"}`, `migrate-incoming {"uri":"fd:mig1"}`, `query-colo-status`,
	}
	checkSent(t, "secondary", sent(sec), wantSec)
	want := slices.Clone(wantPrimaryProtection)
	tlsSteps := []string{
		`qom-list {"path":"/objects"}`,
		`object-del {"id":"tlsc7"}`, `object-del {"id":"tlsz7"}`, `object-del {"id":"tlsred"}`,
		`object-add {"dir":"/run/a/tls","endpoint":"server","id":"tlss1","qom-type":"tls-creds-x509","verify-peer":true}`,
		`object-add {"dir":"/run/a/tls","endpoint":"client","id":"tlsc1","qom-type":"tls-creds-x509","verify-peer":true}`,
		`object-add {"id":"tlsz1","policy":"deny","qom-type":"authz-list","rules":[{"format":"exact","match":"CN=hostb","policy":"allow"},{"format":"glob","match":"CN=hostb,*","policy":"allow"}]}`,
	}
	want = slices.Insert(want, 3, tlsSteps...)
	for i, w := range want {
		switch {
		case strings.Contains(w, `"id":"mirror0"`), strings.Contains(w, `"id":"compare1"`):
			want[i] = strings.Replace(w, `"server":true,`, `"server":true,"tls-authz":"tlsz1","tls-creds":"tlss1",`, 1)
		case strings.HasPrefix(w, "blockdev-add"):
			want[i] = strings.Replace(w, `"type":"inet"}`, `"type":"inet"},"tls-creds":"tlsc1"`, 1)
		case strings.HasPrefix(w, "migrate-set-parameters"):
			want[i] = `migrate-set-parameters {"x-checkpoint-delay":200,"tls-creds":"tlsc1","tls-hostname":"10.0.0.2"}`
		}
	}
	checkSent(t, "primary", sent(prim), want)
}

// The secondary's command line carries its client credentials for red0 and red1 with TLS, and
// nothing of it without.
func TestSecondaryArgsTLS(t *testing.T) {
	side := checkpoint.Side{Host: "10.0.0.2", RunDir: "/run/b", Disk: "/d/b.raw", Active: "/o/a.qcow2", Hidden: "/o/h.qcow2", NetSocket: "127.0.0.1:1"}
	ports := protectionGen().Ports
	plain := strings.Join(checkpoint.SecondaryArgs(validSpec(), side, "10.0.0.1", ports), " ")
	if strings.Contains(plain, "tls") {
		t.Fatalf("plaintext secondary with TLS options: %s", plain)
	}
	side.TLSDir = "/run/b/tls,x"
	args := strings.Join(checkpoint.SecondaryArgs(validSpec(), side, "10.0.0.1", ports), " ")
	for _, w := range []string{
		"-object tls-creds-x509,id=tlsred,endpoint=client,dir=/run/b/tls,,x,verify-peer=on -chardev socket,id=red0",
		"id=red0,host=10.0.0.1,port=2002,reconnect-ms=100,tls-creds=tlsred ",
		"id=red1,host=10.0.0.1,port=2003,reconnect-ms=100,tls-creds=tlsred ",
	} {
		if !strings.Contains(args, w) {
			t.Errorf("secondary args lack %q:\n%s", w, args)
		}
	}
}

func TestTLSMode(t *testing.T) {
	for _, tc := range []struct {
		m          checkpoint.TLSMode
		one, twoOn bool
	}{{checkpoint.TLSAuto, false, true}, {"auto", false, true}, {checkpoint.TLSOn, true, true}, {checkpoint.TLSOff, false, false}} {
		if got := tc.m.Enabled(false); got != tc.one {
			t.Errorf("%q on one host: %v", tc.m, got)
		}
		if got := tc.m.Enabled(true); got != tc.twoOn {
			t.Errorf("%q on two hosts: %v", tc.m, got)
		}
	}
	s := validSpec()
	s.Tunables.ReplicationTLS = "sometimes"
	var fe *checkpoint.FieldError
	if err := s.Validate(); !errors.As(err, &fe) || !strings.Contains(err.Error(), "replication_tls") {
		t.Fatalf("bad mode: %v, want a field error naming replication_tls", err)
	}
}

// WriteTLSDir writes QEMU's five files, 0600; a side whose folder lacks one is refused,
// naming tls_dir.
func TestWriteTLSDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if err := checkpoint.WriteTLSDir(dir, []byte("cert"), []byte("key"), []byte("ca")); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{checkpoint.TLSCACert: "ca", checkpoint.TLSServerCert: "cert", checkpoint.TLSServerKey: "key",
		checkpoint.TLSClientCert: "cert", checkpoint.TLSClientKey: "key"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		st, serr := os.Stat(filepath.Join(dir, name))
		if err != nil || string(b) != want || serr != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %q %v, mode %v", name, b, err, st.Mode().Perm())
		}
	}
	if err := checkpoint.WriteTLSDir(dir, nil, []byte("key"), []byte("ca")); err == nil {
		t.Error("a folder without a certificate was written")
	}
	s := validSpec()
	disk := filepath.Join(t.TempDir(), "d.raw")
	os.WriteFile(disk, make([]byte, s.DiskSize), 0o600)
	side := checkpoint.Side{Host: "127.0.0.1", RunDir: t.TempDir(), Disk: disk, Active: "/o/a", Hidden: "/o/h", NetSocket: "127.0.0.1:1", TLSDir: dir}
	if err := s.ValidateSide(checkpoint.RoleSecondary, side); err != nil {
		t.Fatalf("a complete folder: %v", err)
	}
	os.Remove(filepath.Join(dir, checkpoint.TLSClientKey))
	if err := s.ValidateSide(checkpoint.RoleSecondary, side); err == nil || !strings.Contains(err.Error(), "secondary.tls_dir") {
		t.Fatalf("a folder without the client key: %v, want an error naming secondary.tls_dir", err)
	}
}
