package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/internal/pki"
	"github.com/lockstepvm/lockstep/qmp"
)

// replTLS gives each side of a pairEnv a host certificate of its own (host h1, h2, ... on
// 127.0.0.1, from one CA) in a QEMU credentials folder, and makes each generation encrypted.
type replTLS struct {
	ca *pki.CA

	mu    sync.Mutex
	names map[string]string // credentials folder -> host name
	first [][]byte          // the first bytes of each generation's migration stream
}

func newReplTLS(t testing.TB) *replTLS {
	ca, _, err := pki.NewCA("lockstep test CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &replTLS{ca: ca, names: map[string]string{}}
}

// sideDir writes the credentials folder of a new side whose runtime folder is runDir.
func (r *replTLS) sideDir(t testing.TB, runDir string) string {
	r.mu.Lock()
	name := fmt.Sprintf("h%d", len(r.names)+1)
	r.mu.Unlock()
	return r.dirFor(t, runDir, name, r.ca)
}

// dirFor writes a credentials folder under runDir with a certificate for host name from ca,
// which the folder names as its CA too.
func (r *replTLS) dirFor(t testing.TB, runDir, name string, ca *pki.CA) string {
	leaf, err := ca.IssueHost(name, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(runDir, "tls")
	if err := checkpoint.WriteTLSDir(dir, leaf.CertPEM, leaf.KeyPEM, ca.CertPEM); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.names[dir] = name
	r.mu.Unlock()
	return dir
}

// generation is the TLS wiring of a generation between the QEMUs of two sides.
func (r *replTLS) generation(primary, secondary checkpoint.Side) *checkpoint.GenTLS {
	r.mu.Lock()
	defer r.mu.Unlock()
	return &checkpoint.GenTLS{PrimaryDir: primary.TLSDir, SecondaryDir: secondary.TLSDir,
		PrimaryName: r.names[primary.TLSDir], SecondaryName: r.names[secondary.TLSDir]}
}

// peekingAccept wraps an AcceptMigration and records the first bytes the primary sent on the
// connection before the secondary gets it (MSG_PEEK leaves them for QEMU).
func (r *replTLS) peekingAccept(accept func(context.Context) (*os.File, error)) func(context.Context) (*os.File, error) {
	return func(ctx context.Context) (*os.File, error) {
		f, err := accept(ctx)
		if err != nil {
			return nil, err
		}
		b := peek(ctx, f, 5)
		r.mu.Lock()
		r.first = append(r.first, b)
		r.mu.Unlock()
		return f, nil
	}
}

// peek returns up to n bytes waiting on the socket f, waiting up to 5 s for them.
func peek(ctx context.Context, f *os.File, n int) []byte {
	sc, err := f.SyscallConn()
	if err != nil {
		return nil
	}
	buf := make([]byte, n)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		var got int
		_ = sc.Control(func(fd uintptr) {
			got, _, _ = unix.Recvfrom(int(fd), buf, unix.MSG_PEEK|unix.MSG_DONTWAIT)
		})
		if got >= n {
			return buf
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}

// checkEncrypted fails unless every generation's migration stream began with a TLS handshake
// record (content type 22, version 3.x) rather than QEMU's plaintext stream magic "QEVM".
func (r *replTLS) checkEncrypted(t testing.TB, gens int) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.first) != gens {
		t.Fatalf("%d migration streams seen, want %d", len(r.first), gens)
	}
	for i, b := range r.first {
		if len(b) < 3 || b[0] != 0x16 || b[1] != 3 {
			t.Fatalf("generation %d's migration stream began with %q, want a TLS handshake record", i+1, b)
		}
	}
}

// migrationTLSCreds is the tls-creds migration parameter of c's QEMU.
func migrationTLSCreds(ctx context.Context, t testing.TB, c *qmp.Client) string {
	t.Helper()
	var p struct {
		TLSCreds string `json:"tls-creds"`
	}
	if err := c.Execute(ctx, "query-migrate-parameters", nil, &p); err != nil {
		t.Fatal(err)
	}
	return p.TLSCreds
}

// Encrypted replication on QEMU 11.1: a client writes while the pair is protected over TLS
// (migration stream, NBD, mirror and compare channels), the primary is killed and the
// secondary takes over, the survivor is re-protected onto a fresh secondary, that secondary is
// killed and the primary goes on alone, it is protected again, and the primary is killed once
// more. Every generation's migration stream is TLS from its first byte; the client's
// connection carries on and nothing it saw acknowledged is lost.
func TestColoTLSProtectFailoverReprotect(t *testing.T) {
	q := qemuenv.QEMU11(t)
	kernel, initrd := guestImages(t)
	e := newPairEnv(t, q, kernel, initrd, 200*time.Millisecond, 3)
	e.tls = newReplTLS(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()

	prim := e.bootPrimary(ctx) // hub port 0
	w := startWriter(t, e.hub.ClientURL, 20*time.Millisecond)
	w.waitAcked(t, 5, 30*time.Second)

	// Generation 1: protect, then the primary dies.
	p := e.protect(ctx, prim, 1, false)
	st := p.waitCheckpoints(t, 5, 30*time.Second)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	if c := migrationTLSCreds(ctx, t, prim.QMP); c != "tlsc1" {
		t.Fatalf("the primary's migration tls-creds %q, want tlsc1", c)
	}
	t.Logf("generation 1 over TLS: %d checkpoints, pause p50 %v p99 %v, %d bytes/checkpoint", st.Checkpoints, st.PauseP50, st.PauseP99, st.BytesAvg)
	killPrimary := func(p *pair) {
		t.Helper()
		sig := watchFor(t, p.primary, checkpoint.WatchConfig{}, checkpoint.SignalProcessExited, checkpoint.SignalQMPLost)
		kill := time.Now()
		if err := p.primary.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		awaitSignal(t, sig, 10*time.Second)
		detected := time.Now()
		took, err := checkpoint.FailoverAsSecondary(p.secondary.QMP, false).Run(ctx, e.log, nil)
		if err != nil {
			t.Fatalf("failover as secondary: %v\n%s", err, p.secondary.LogTail())
		}
		w.waitAcked(t, w.Acked()+10, 30*time.Second)
		failoverReport(t, fmt.Sprintf("generation %d, primary SIGKILL", p.gen.N), w, kill, detected, took)
		p.stopObs()
	}
	killPrimary(p)

	// Generation 2: the survivor is re-protected onto a fresh secondary; then that one dies.
	survivor := p.secondary
	p2 := e.protect(ctx, survivor, 0, true)
	p2.waitCheckpoints(t, 5, 30*time.Second)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	if c := migrationTLSCreds(ctx, t, survivor.QMP); c != "tlsc2" {
		t.Fatalf("the survivor's migration tls-creds %q, want tlsc2", c)
	}
	sigS := watchFor(t, p2.secondary, checkpoint.WatchConfig{}, checkpoint.SignalProcessExited)
	kill := time.Now()
	if err := p2.secondary.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	awaitSignal(t, sigS, 10*time.Second)
	detected := time.Now()
	took, err := checkpoint.FailoverAsPrimary(survivor.QMP, p2.gen).Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("failover as primary: %v\n%s", err, survivor.LogTail())
	}
	w.waitAcked(t, w.Acked()+10, 30*time.Second)
	failoverReport(t, "generation 2, secondary SIGKILL", w, kill, detected, took)
	p2.stopObs()

	// Generation 3: the primary that ran alone is protected again (its generation-2 TLS
	// objects are dropped first), and then it dies too.
	p3 := e.protect(ctx, survivor, 1, false)
	p3.waitCheckpoints(t, 5, 30*time.Second)
	w.waitAcked(t, w.Acked()+20, 30*time.Second)
	objs := tlsObjects(ctx, t, survivor.QMP)
	if strings.Join(objs, " ") != "tlsc3 tlss3 tlsz3" {
		t.Errorf("TLS objects on the generation-3 primary: %v, want only generation 3's", objs)
	}
	killPrimary(p3)

	e.tls.checkEncrypted(t, 3)
	total := w.verify(t)
	t.Logf("%d records acknowledged across three encrypted generations, all in memory and on disk; longest wait %v", total, w.maxWait)
}

// tlsObjects lists the TLS objects (credentials and authorizations) of c's QEMU, sorted.
func tlsObjects(ctx context.Context, t testing.TB, c *qmp.Client) []string {
	t.Helper()
	var props []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}
	if err := c.Execute(ctx, "qom-list", map[string]any{"path": "/objects"}, &props); err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, p := range props {
		if strings.Contains(p.Type, "tls-creds") || strings.Contains(p.Type, "authz") {
			out = append(out, p.Name)
		}
	}
	sort.Strings(out)
	return out
}

// Encrypted replication refuses a QEMU that is not the pair's peer: the protection fails at
// the first channel the impostor opens, with QEMU's reason, whether its certificate names
// another host or comes from another CA. No guest is needed: the refusal comes before any
// memory is sent.
func TestColoTLSRefusesAnotherPeer(t *testing.T) {
	q := qemuenv.QEMU11(t)
	other, _, err := pki.NewCA("some other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// primary's certificate: its host name and CA
		primaryName string
		primaryCA   func(r *replTLS) *pki.CA
	}{
		{"primary certificate names another host", "intruder", func(r *replTLS) *pki.CA { return r.ca }},
		{"primary certificate from another CA", "h1", func(*replTLS) *pki.CA { return other }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newPairEnv(t, q, "", "", 200*time.Millisecond, 2)
			e.tls = newReplTLS(t)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			ps := e.side(0)
			// The primary presents tc's certificate; the secondary expects host h1.
			ps.TLSDir = e.tls.dirFor(t, ps.RunDir, tc.primaryName, tc.primaryCA(e.tls))
			prim := e.launch(ctx, checkpoint.RolePrimary, ps, checkpoint.Ports{})
			g := e.generation()
			sec := e.launch(ctx, checkpoint.RoleSecondary, e.side(1), g.Ports)
			g.TLS = e.tls.generation(prim.Side, sec.Side)
			g.TLS.PrimaryName = "h1"
			link := newMigrationLink(t)
			_, err := checkpoint.StartProtection(checkpoint.ProtectConfig{Spec: e.spec, Gen: g, Primary: prim.QMP, Secondary: sec.QMP,
				DialMigration: link.dial(nil), AcceptMigration: link.accept}).Run(ctx, e.log, nil)
			var se *checkpoint.StepError
			if !errors.As(err, &se) {
				t.Fatalf("protection with an impostor primary: %v, want a failed step", err)
			}
			if !strings.Contains(se.Step, "blockdev-add") {
				t.Fatalf("protection failed at %q: %v; want the NBD connection (blockdev-add) refused", se.Step, err)
			}
			t.Logf("refused: %v\nsecondary's log: %s", err, sec.LogTail())
			if st, err := sec.QMP.QueryColoStatus(ctx); err != nil || st.Mode != qmp.ColoModeNone {
				t.Fatalf("the secondary after the refusal: %+v %v, want COLO mode none", st, err)
			}
		})
	}
}
