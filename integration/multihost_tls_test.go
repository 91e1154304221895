package integration

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/lockstepvm/lockstep/internal/pki"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// attackerCreds are TLS credentials of a caller on the client node that trusts any server and
// presents certFile/keyFile unless they are empty.
func attackerCreds(t *testing.T, certFile, keyFile string) credentials.TransportCredentials {
	t.Helper()
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return credentials.NewTLS(cfg)
}

// counterOf reads a counter's value from a metrics page (-1 when absent).
func counterOf(page, series string) int {
	m := regexp.MustCompile(regexp.QuoteMeta(series) + ` (\d+)`).FindStringSubmatch(page)
	if m == nil {
		return -1
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// TestTwoHostsForgedHandOver: while the pair is protected (A primary, B secondary), a caller
// on the client node sends B's agent a HandOver, which would make B take over, then a
// TearDownSecondary and a Heartbeat: without a certificate, with a certificate of another CA
// that names host A, with host C's valid certificate, and in plaintext. Every call is refused
// and counted in B's metrics; nothing fails over, the pair stays protected at the same epoch
// and generation, and the client's writes carry on over one connection, nothing lost. The
// pair's replication was encrypted all along: B's secondary QEMU runs with TLS credentials.
func TestTwoHostsForgedHandOver(t *testing.T) {
	c, spec := newCluster(t)
	w, st := c.protectWithWriter(spec)

	// The replication channels are encrypted: the secondary's command line has its credentials
	// for red0/red1, from the folder B's agent wrote.
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(c.qemuPID("B")) + "/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	args := strings.ReplaceAll(string(cmdline), "\x00", " ")
	if !strings.Contains(args, "tls-creds-x509,id=tlsred,endpoint=client") || !strings.Contains(args, ",tls-creds=tlsred") {
		t.Fatalf("B's secondary QEMU runs without replication TLS: %s", args)
	}
	if _, err := os.Stat(filepath.Join(c.dir, "B", "state", "db1", "b", "tls", "server-cert.pem")); err != nil {
		t.Fatalf("B's QEMU credentials folder: %v", err)
	}

	other, _, err := pki.NewCA("some other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	forgedA, err := other.IssueHost("A", []net.IP{net.IP(c.lab.Node("A").IP().AsSlice())}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	forgedDir := t.TempDir()
	os.WriteFile(filepath.Join(forgedDir, "A.pem"), forgedA.CertPEM, 0o600)
	os.WriteFile(filepath.Join(forgedDir, "A.key"), forgedA.KeyPEM, 0o600)

	before := c.metrics("B")
	peerB := netip.AddrPortFrom(c.lab.Node("B").IP(), 7444).String()
	client := c.lab.Node("client")
	for _, at := range []struct {
		name  string
		creds credentials.TransportCredentials
		want  codes.Code
	}{
		{"no certificate", attackerCreds(t, "", ""), codes.Unavailable},
		{"another CA's certificate naming host A", attackerCreds(t, filepath.Join(forgedDir, "A.pem"), filepath.Join(forgedDir, "A.key")), codes.Unavailable},
		{"host C's valid certificate", attackerCreds(t, filepath.Join(c.pki, "C.pem"), filepath.Join(c.pki, "C.key")), codes.PermissionDenied},
		{"plaintext", insecure.NewCredentials(), codes.Unavailable},
	} {
		conn, err := grpc.NewClient("passthrough:///"+peerB, grpc.WithTransportCredentials(at.creds),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) { return client.Dial(ctx, "tcp", addr) }))
		if err != nil {
			t.Fatal(err)
		}
		peer := pb.NewPeerServiceClient(conn)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, errH := peer.HandOver(ctx, &pb.HandOverRequest{PairName: "db1", Epoch: st.GetEpoch(), Reason: pb.HandOverReason_HAND_OVER_REASON_PRIMARY_FAILED, Detail: "forged"})
		_, errT := peer.TearDownSecondary(ctx, &pb.TearDownSecondaryRequest{PairName: "db1", Epoch: st.GetEpoch(), Generation: st.GetGeneration(), Reason: "forged"})
		resp, errB := peer.Heartbeat(ctx, &pb.HeartbeatRequest{PairName: "db1", Epoch: st.GetEpoch(),
			Sender: &pb.PeerSideState{Host: "A", Role: pb.Role_ROLE_PRIMARY, PolicyRole: "primary", Colo: true}})
		cancel()
		conn.Close()
		for call, err := range map[string]error{"HandOver": errH, "TearDownSecondary": errT, "Heartbeat": errB} {
			if status.Code(err) != at.want {
				t.Errorf("%s, %s: %v, want %v", at.name, call, err, at.want)
			}
		}
		if resp != nil {
			t.Errorf("%s: the heartbeat was answered: %v", at.name, resp)
		}
		t.Logf("%s: refused (%v)", at.name, status.Code(errH))
	}

	// Nothing fails over while the client writes on.
	acked := w.Acked()
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		for _, h := range []string{"A", "B"} {
			s := c.waitOn(h, pb.PairState_PAIR_STATE_PROTECTED, 2*time.Second)
			if s.GetPrimaryHost() != "A" || s.GetEpoch() != st.GetEpoch() || s.GetGeneration() != st.GetGeneration() || s.GetLastFailover() != nil {
				t.Fatalf("host %s after the forged requests: primary %q epoch %d generation %d last failover %v; want A, %d, %d, none",
					h, s.GetPrimaryHost(), s.GetEpoch(), s.GetGeneration(), s.GetLastFailover(), st.GetEpoch(), st.GetGeneration())
			}
		}
	}
	w.waitAcked(t, acked+25, 30*time.Second)
	after := c.metrics("B")
	hs := `lockstep_peer_auth_failures_total{reason="handshake"}`
	np := `lockstep_peer_auth_failures_total{reason="not-a-peer"}`
	if d := counterOf(after, hs) - counterOf(before, hs); d < 3 {
		t.Errorf("B counted %d refused handshakes, want at least 3", d)
	}
	if d := counterOf(after, np) - counterOf(before, np); d != 3 {
		t.Errorf("B counted %d requests from a host that is not the pair's peer, want 3", d)
	}
	if !strings.Contains(c.agents["B"].log.String(), "peer refused") {
		t.Error("B's log has no line about the refused peer")
	}
	n := w.verify(t)
	t.Logf("%d records acknowledged, none lost, same connection; still protected at epoch %d generation %d", n, st.GetEpoch(), st.GetGeneration())
}
