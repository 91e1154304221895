package main

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lockstepvm/lockstep/internal/testpki"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/lockstepvm/lockstep/controller"
	"github.com/lockstepvm/lockstep/internal/teststore"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

type testPKI = testpki.PKI

func newTestPKI(t *testing.T) testPKI { return testpki.New(t) }

// tlsAgentAddr serves the PairService of an agent with no pairs on 127.0.0.1 with mutual TLS,
// as lockstepd does with --tls-cert, --tls-key and --tls-ca, until the test ends.
func tlsAgentAddr(t *testing.T, p testPKI) string {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(p.ServerCert, p.ServerKey)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(p.CA)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	a, err := controller.NewAgent(controller.AgentConfig{Host: "local", StateDir: filepath.Join(t.TempDir(), "state"), Store: teststore.New(t)})
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
	good := []string{"--tls-cert", p.ClientCert, "--tls-key", p.ClientKey, "--tls-ca", p.CA}
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
		{"certificate from another CA", with("--tls-cert", p.OtherCert, "--tls-key", p.OtherKey, "--tls-ca", p.CA, "list"), exitFailed,
			[]string{"is lockstepd running"}, ""},
		{"agent's certificate not from --tls-ca", with("--tls-cert", p.ClientCert, "--tls-key", p.ClientKey, "--tls-ca", p.OtherCA, "list"), exitFailed,
			[]string{"authentication handshake failed", "certificate signed by unknown authority"}, ""},
		{"half of the tls flags", with("--tls-cert", p.ClientCert, "list"), exitUsage,
			[]string{"mutual TLS needs --tls-cert, --tls-key and --tls-ca together"}, ""},
		{"missing cert", with("--tls-cert", missing, "--tls-key", p.ClientKey, "--tls-ca", p.CA, "list"), exitUsage,
			[]string{"--tls-cert", missing, "no such file"}, ""},
		{"missing key", with("--tls-cert", p.ClientCert, "--tls-key", missing, "--tls-ca", p.CA, "list"), exitUsage,
			[]string{"--tls-key", missing, "no such file"}, ""},
		{"missing ca", with("--tls-cert", p.ClientCert, "--tls-key", p.ClientKey, "--tls-ca", missing, "list"), exitUsage,
			[]string{"--tls-ca", missing, "no such file"}, ""},
		{"unreadable cert", with("--tls-cert", dir, "--tls-key", p.ClientKey, "--tls-ca", p.CA, "list"), exitUsage,
			[]string{"--tls-cert", dir, "is a directory"}, ""},
		{"cert not PEM", with("--tls-cert", notPEM, "--tls-key", p.ClientKey, "--tls-ca", p.CA, "list"), exitUsage,
			[]string{"--tls-cert " + notPEM, "certificate input"}, ""},
		{"key of another certificate", with("--tls-cert", p.ClientCert, "--tls-key", p.OtherKey, "--tls-ca", p.CA, "list"), exitUsage,
			[]string{p.ClientCert, p.OtherKey, "does not match"}, ""},
		{"ca not PEM", with("--tls-cert", p.ClientCert, "--tls-key", p.ClientKey, "--tls-ca", notPEM, "list"), exitUsage,
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
