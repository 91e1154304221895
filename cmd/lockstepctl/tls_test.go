package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/lockstepvm/lockstep/controller"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// testPKI holds PEM files written to a temporary folder: a CA, a server certificate for
// 127.0.0.1 and a client certificate both signed by it, and another CA with a client
// certificate of its own.
type testPKI struct {
	ca, serverCert, serverKey, clientCert, clientKey, otherCA, otherCert, otherKey string
}

func newTestPKI(t *testing.T) testPKI {
	t.Helper()
	dir := t.TempDir()
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	serial := int64(0)
	// issue signs tmpl with parent (self-signed when parent is nil) and returns the
	// certificate, its key and their DER.
	issue := func(tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey, []byte, []byte) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		serial++
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return cert, key, der, keyDER
	}
	caTmpl := func(cn string) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	}
	leaf := func(cn string, usage x509.ExtKeyUsage) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, KeyUsage: x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{usage}}
	}
	var p testPKI
	ca, caKey, der, _ := issue(caTmpl("lockstep test CA"), nil, nil)
	p.ca = write("ca.pem", "CERTIFICATE", der)
	srv := leaf("lockstepd", x509.ExtKeyUsageServerAuth)
	srv.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	_, _, der, keyDER := issue(srv, ca, caKey)
	p.serverCert, p.serverKey = write("server.pem", "CERTIFICATE", der), write("server.key", "PRIVATE KEY", keyDER)
	_, _, der, keyDER = issue(leaf("operator", x509.ExtKeyUsageClientAuth), ca, caKey)
	p.clientCert, p.clientKey = write("client.pem", "CERTIFICATE", der), write("client.key", "PRIVATE KEY", keyDER)
	other, otherKey, der, _ := issue(caTmpl("some other CA"), nil, nil)
	p.otherCA = write("other-ca.pem", "CERTIFICATE", der)
	_, _, der, keyDER = issue(leaf("intruder", x509.ExtKeyUsageClientAuth), other, otherKey)
	p.otherCert, p.otherKey = write("other.pem", "CERTIFICATE", der), write("other.key", "PRIVATE KEY", keyDER)
	return p
}

// tlsAgentAddr serves the PairService of an agent with no pairs on 127.0.0.1 with mutual TLS,
// as lockstepd does with --tls-cert, --tls-key and --tls-ca, until the test ends.
func tlsAgentAddr(t *testing.T, p testPKI) string {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(p.serverCert, p.serverKey)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(p.ca)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	a, err := controller.NewAgent(controller.AgentConfig{StateDir: filepath.Join(t.TempDir(), "state")})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		a.Close()
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12})))
	pb.RegisterPairServiceServer(srv, &controller.PairServer{Agent: a})
	served := make(chan struct{})
	go func() { srv.Serve(l); close(served) }()
	t.Cleanup(func() { srv.Stop(); <-served; a.Close() })
	return "tcp://" + l.Addr().String()
}

// lockstepctl reaches an agent on TCP with mutual TLS through --tls-cert, --tls-key and
// --tls-ca, and says clearly what is wrong when it cannot.
func TestTLSClient(t *testing.T) {
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) }) // runs last: after the agent is stopped
	p := newTestPKI(t)
	addr := tlsAgentAddr(t, p)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.pem")
	notPEM := filepath.Join(dir, "not.pem")
	os.WriteFile(notPEM, []byte("this is no certificate\n"), 0o600)
	good := []string{"--tls-cert", p.clientCert, "--tls-key", p.clientKey, "--tls-ca", p.ca}
	with := func(args ...string) []string {
		return append([]string{"--addr", addr, "--timeout", "5s"}, args...)
	}
	tests := []struct {
		name   string
		args   []string
		code   int
		stderr []string // all of these
		stdout string
	}{
		{"good certificate", with(append(good, "list")...), exitOK, nil, "PAIR"},
		{"tls flags after the command", with(append([]string{"list", "-o", "json"}, good...)...), exitOK, nil, "{"},
		{"status of an unknown pair over TLS", with(append(good, "status", "nope")...), exitUsage, []string{"no such pair"}, ""},
		{"no tls flags", with("list"), exitFailed,
			[]string{"is lockstepd running and serving " + addr, "an agent with mutual TLS needs --tls-cert, --tls-key and --tls-ca"}, ""},
		// Go's client offers only a certificate from a CA the agent names, so it offers none
		// here, and the agent refuses the connection.
		{"certificate from another CA", with("--tls-cert", p.otherCert, "--tls-key", p.otherKey, "--tls-ca", p.ca, "list"), exitFailed,
			[]string{"is lockstepd running"}, ""},
		{"agent's certificate not from --tls-ca", with("--tls-cert", p.clientCert, "--tls-key", p.clientKey, "--tls-ca", p.otherCA, "list"), exitFailed,
			[]string{"authentication handshake failed", "certificate signed by unknown authority"}, ""},
		{"half of the tls flags", with("--tls-cert", p.clientCert, "list"), exitUsage,
			[]string{"mutual TLS needs --tls-cert, --tls-key and --tls-ca together"}, ""},
		{"missing cert", with("--tls-cert", missing, "--tls-key", p.clientKey, "--tls-ca", p.ca, "list"), exitUsage,
			[]string{"--tls-cert", missing, "no such file"}, ""},
		{"missing key", with("--tls-cert", p.clientCert, "--tls-key", missing, "--tls-ca", p.ca, "list"), exitUsage,
			[]string{"--tls-key", missing, "no such file"}, ""},
		{"missing ca", with("--tls-cert", p.clientCert, "--tls-key", p.clientKey, "--tls-ca", missing, "list"), exitUsage,
			[]string{"--tls-ca", missing, "no such file"}, ""},
		{"unreadable cert", with("--tls-cert", dir, "--tls-key", p.clientKey, "--tls-ca", p.ca, "list"), exitUsage,
			[]string{"--tls-cert", dir, "is a directory"}, ""},
		{"cert not PEM", with("--tls-cert", notPEM, "--tls-key", p.clientKey, "--tls-ca", p.ca, "list"), exitUsage,
			[]string{"--tls-cert " + notPEM, "certificate input"}, ""},
		{"key of another certificate", with("--tls-cert", p.clientCert, "--tls-key", p.otherKey, "--tls-ca", p.ca, "list"), exitUsage,
			[]string{p.clientCert, p.otherKey, "does not match"}, ""},
		{"ca not PEM", with("--tls-cert", p.clientCert, "--tls-key", p.clientKey, "--tls-ca", notPEM, "list"), exitUsage,
			[]string{"--tls-ca " + notPEM, "no certificate"}, ""},
		{"tls flags with a unix socket", append([]string{"--addr", "unix:///nonexistent/api.sock"}, append(good, "list")...), exitUsage,
			[]string{"are for a tcp:// address"}, ""},
		{"help", []string{"help"}, exitOK, nil, "--tls-cert FILE"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, out, errOut := runCtl(tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tc.code, out, errOut)
			}
			for _, w := range tc.stderr {
				if !strings.Contains(errOut, w) {
					t.Errorf("stderr %q lacks %q", errOut, w)
				}
			}
			if tc.stdout != "" && !strings.Contains(out, tc.stdout) {
				t.Errorf("stdout %q lacks %q", out, tc.stdout)
			}
		})
	}
	// The refusals did not stop the agent.
	if code, out, errOut := runCtl(with(append(good, "list")...)...); code != exitOK || !strings.Contains(out, "PAIR") {
		t.Fatalf("list after the refusals: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}
