package controller

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/internal/pki"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// hostCert issues host name's certificate from ca and returns it as PeerTLS material.
func hostCert(t *testing.T, ca *pki.CA, name string) pki.Leaf {
	t.Helper()
	leaf, err := ca.IssueHost(name, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return leaf
}

func peerTLSOf(t *testing.T, ca *pki.CA, name string) *PeerTLS {
	t.Helper()
	leaf := hostCert(t, ca, name)
	p, err := NewPeerTLS(leaf.CertPEM, leaf.KeyPEM, ca.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// tlsHost is one host's agent serving PeerService over mutual TLS on loopback.
type tlsHost struct {
	*testAgent
	addr string
	srv  *grpc.Server
}

// startTLSHost starts host's agent on the fake backend with a certificate from ca, and its
// PeerService listener.
func startTLSHost(t *testing.T, host string, ca *pki.CA, store Store) *tlsHost {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := newFakeBackend(t)
	cfg := AgentConfig{Host: host, PeerAddr: l.Addr().String(), StateDir: t.TempDir(), Store: store,
		Backends: map[string]checkpoint.Backend{"fake": b}, PeerTLS: peerTLSOf(t, ca, host),
		Watch: checkpoint.WatchConfig{Interval: 50 * time.Millisecond, Timeout: time.Second}}
	a, err := NewAgent(cfg)
	if err != nil {
		l.Close()
		t.Fatal(err)
	}
	creds, err := a.PeerServerCredentials()
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(creds))
	pb.RegisterPeerServiceServer(srv, &PeerServer{Agent: a})
	go func() { _ = srv.Serve(l) }()
	h := &tlsHost{testAgent: &testAgent{Agent: a, cfg: cfg, b: b}, addr: l.Addr().String(), srv: srv}
	t.Cleanup(func() { srv.Stop(); a.Close() })
	return h
}

// clientCreds are a caller's TLS credentials: trusting ca, presenting leaf unless it is empty.
func clientCreds(t *testing.T, ca *pki.CA, leaf pki.Leaf) credentials.TransportCredentials {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	cfg := &tls.Config{RootCAs: roots, ServerName: "b", MinVersion: tls.VersionTLS12, InsecureSkipVerify: true}
	if leaf.CertPEM != nil {
		cert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
		if err != nil {
			t.Fatal(err)
		}
		// Offer it whatever the server asks for, as an attacker would.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return credentials.NewTLS(cfg)
}

// peerClient dials addr's PeerService with creds.
func peerClient(t *testing.T, addr string, creds credentials.TransportCredentials) pb.PeerServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewPeerServiceClient(conn)
}

// Two hosts' agents protect a pair over a mutual-TLS peer link (and encrypted replication, the
// default between two hosts with certificates). Then callers that are not the pair's peer send
// host b's agent, which runs the secondary, what would fail the VM over, tear the secondary
// down and exchange heartbeats: a caller without a certificate, one with a certificate of
// another CA (naming host a, even), one with a valid certificate of host c, one with a valid
// certificate of host b itself, and a plaintext caller. Each is refused, each refusal is
// counted, and nothing changes: same primary, generation, epoch and secondary QEMU, no
// failover. The same tear-down with host a's certificate then does stop the secondary.
func TestPeerAuthRefusesWhatIsNotThePeer(t *testing.T) {
	ca, _, err := pki.NewCA("lockstep test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := pki.NewCA("some other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_, store := embeddedStore(t)
	ha, hb := startTLSHost(t, "a", ca, store), startTLSHost(t, "b", ca, store)
	pc := fakePair(t, "db1")
	pc.Sides[0].Agent, pc.Sides[1].Agent = "a", "b"
	if _, err := ha.Create(pc); err != nil {
		t.Fatal(err)
	}
	st := waitFor(t, ha.testAgent, "db1", "protected", func(s Status) bool {
		return s.State == StateProtected && s.PrimaryHost == "a" && s.Roles[SideA] == RolePrimary
	})
	waitFor(t, hb.testAgent, "db1", "protected on b's view", func(s Status) bool { return s.Roles[SideB] == RoleSecondary })
	secQEMU := sideQEMU(t, hb.testAgent, "db1", SideB)
	secPID := secQEMU.proc.Process.Pid
	// The replication was encrypted: the secondary's NBD server and its migration took TLS.
	var sawTLS bool
	for _, r := range secQEMU.srv.Requests() {
		if r.Command == "nbd-server-start" && strings.Contains(string(r.Args), `"tls-creds":"tlss1"`) {
			sawTLS = true
		}
	}
	if !sawTLS {
		t.Fatalf("the secondary's NBD server was started without TLS: %v", secQEMU.commands())
	}

	attackers := []struct {
		name  string
		creds credentials.TransportCredentials
		// want is the code of the refusal: a refused handshake is Unavailable.
		want codes.Code
	}{
		{"no certificate", clientCreds(t, ca, pki.Leaf{}), codes.Unavailable},
		{"another CA's certificate for host a", clientCreds(t, ca, hostCert(t, other, "a")), codes.Unavailable},
		{"valid certificate of host c", clientCreds(t, ca, hostCert(t, ca, "c")), codes.PermissionDenied},
		{"valid certificate of host b itself", clientCreds(t, ca, hostCert(t, ca, "b")), codes.PermissionDenied},
		{"plaintext", insecure.NewCredentials(), codes.Unavailable},
	}
	before := hb.peerAuthCounts()
	for _, at := range attackers {
		t.Run(at.name, func(t *testing.T) {
			c := peerClient(t, hb.addr, at.creds)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_, err := c.HandOver(ctx, &pb.HandOverRequest{PairName: "db1", Epoch: st.Epoch, Reason: pb.HandOverReason_HAND_OVER_REASON_PRIMARY_FAILED, Detail: "forged"})
			if status.Code(err) != at.want {
				t.Errorf("HandOver: %v, want %v", err, at.want)
			}
			_, err = c.TearDownSecondary(ctx, &pb.TearDownSecondaryRequest{PairName: "db1", Epoch: st.Epoch, Generation: uint64(st.Generation), Reason: "forged"})
			if status.Code(err) != at.want {
				t.Errorf("TearDownSecondary: %v, want %v", err, at.want)
			}
			resp, err := c.Heartbeat(ctx, &pb.HeartbeatRequest{PairName: "db1", Epoch: st.Epoch,
				Sender: &pb.PeerSideState{Host: "a", Role: pb.Role_ROLE_PRIMARY, PolicyRole: string(RolePrimary), Colo: true}})
			if status.Code(err) != at.want || resp != nil {
				t.Errorf("Heartbeat: %v (answer %v), want %v and no answer (no confirmation)", err, resp, at.want)
			}
		})
	}
	// Nothing changed.
	time.Sleep(500 * time.Millisecond) // a forged takeover would have begun by now
	for _, h := range []*tlsHost{ha, hb} {
		got, err := h.Get("db1")
		if err != nil {
			t.Fatal(err)
		}
		if got.State != StateProtected || got.PrimaryHost != "a" || got.Generation != st.Generation || got.Epoch != st.Epoch || got.Failovers != 0 || got.LastFailover != nil {
			t.Fatalf("host %s after the forged requests: %+v", h.cfg.Host, got)
		}
	}
	if q := sideQEMU(t, hb.testAgent, "db1", SideB); q.proc.Process.Pid != secPID {
		t.Fatal("the secondary QEMU changed")
	}
	select {
	case <-secQEMU.exited:
		t.Fatal("the forged tear-down stopped the secondary QEMU")
	default:
	}
	after := hb.peerAuthCounts()
	if n := after[authHandshake] - before[authHandshake]; n < 3 {
		t.Errorf("%d refused handshakes counted, want at least 3 (no certificate, another CA, plaintext)", n)
	}
	if n := after[authNotAPeer] - before[authNotAPeer]; n != 6 {
		t.Errorf("%d requests refused as not from the peer, want 6 (3 calls each from c and b)", n)
	}
	var page bytes.Buffer
	hb.WriteMetrics(&page)
	if !strings.Contains(page.String(), `lockstep_peer_auth_failures_total{reason="not-a-peer"} 6`) {
		t.Errorf("metrics lack the refusals:\n%s", page.String())
	}

	// The legitimate peer: host a's certificate (the request names the wrong sender first,
	// which is refused too), then the real thing takes effect.
	legit := peerClient(t, hb.addr, clientCreds(t, ca, hostCert(t, ca, "a")))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := legit.Heartbeat(ctx, &pb.HeartbeatRequest{PairName: "db1", Epoch: st.Epoch, Sender: &pb.PeerSideState{Host: "c"}}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("a heartbeat naming another sender than its certificate: %v, want PermissionDenied", err)
	}
	if _, err := legit.TearDownSecondary(ctx, &pb.TearDownSecondaryRequest{PairName: "db1", Epoch: st.Epoch, Generation: uint64(st.Generation), Reason: "test"}); err != nil {
		t.Fatalf("TearDownSecondary from host a's agent: %v", err)
	}
	select {
	case <-secQEMU.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("host a's tear-down did not stop the secondary QEMU")
	}
}

// A certificate that names no host, or whose common name is not the host it names, is no
// host certificate; one that does not chain to the CA neither.
func TestPeerTLSRefusesBadCertificates(t *testing.T) {
	ca, _, err := pki.NewCA("lockstep test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := pki.NewCA("some other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	op, err := ca.IssueClient("operator", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	good := hostCert(t, ca, "a")
	for _, tc := range []struct {
		name          string
		cert, key, ca []byte
		want          string
	}{
		{"operator certificate", op.CertPEM, op.KeyPEM, ca.CertPEM, "names no host"},
		{"another CA", good.CertPEM, good.KeyPEM, other.CertPEM, "not valid against the peer CA"},
		{"key of another certificate", good.CertPEM, op.KeyPEM, ca.CertPEM, "private key does not match"},
		{"no CA", good.CertPEM, good.KeyPEM, []byte("nothing"), "no PEM certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewPeerTLS(tc.cert, tc.key, tc.ca); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("NewPeerTLS: %v, want an error saying %q", err, tc.want)
			}
		})
	}
	p, err := NewPeerTLS(good.CertPEM, good.KeyPEM, ca.CertPEM)
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Names(); len(got) != 1 || got[0] != "a" {
		t.Fatalf("names %v, want [a]", got)
	}
}
