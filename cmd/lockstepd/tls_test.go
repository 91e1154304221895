package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/internal/testpki"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

type testPKI = testpki.PKI

func newTestPKI(t *testing.T) testPKI { return testpki.New(t) }

// clientTLS is a client's TLS configuration trusting caFile, with the client certificate
// certFile/keyFile unless they are empty.
func clientTLS(t *testing.T, caFile, certFile, keyFile string) credentials.TransportCredentials {
	t.Helper()
	return clientTLSVersion(t, 0, caFile, certFile, keyFile)
}

// clientTLSVersion is clientTLS with at most TLS version maxVersion (0: the newest).
func clientTLSVersion(t *testing.T, maxVersion uint16, caFile, certFile, keyFile string) credentials.TransportCredentials {
	t.Helper()
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("no CA certificate")
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12, MaxVersion: maxVersion}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		// Offer the certificate whatever the agent asks for: by itself Go's client offers none
		// that is not from a CA the agent names as acceptable, and the agent would never see it.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	}
	return credentials.NewTLS(cfg)
}

// call makes a health check and a ListPairs on addr (host:port) over a new connection with
// creds, and returns the first error.
func call(addr string, creds credentials.TransportCredentials) error {
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hr, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: pb.PairService_ServiceDesc.ServiceName})
	if err != nil {
		return err
	}
	if hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %v, want SERVING", hr.GetStatus())
	}
	lr, err := pb.NewPairServiceClient(conn).ListPairs(ctx, &pb.ListPairsRequest{})
	if err != nil {
		return fmt.Errorf("ListPairs: %w", err)
	}
	if n := len(lr.GetPairs()); n != 0 {
		return fmt.Errorf("ListPairs: %d pairs on a new agent", n)
	}
	return nil
}

// checkLeaks fails the test if goroutines it started outlive it. Call it first: cleanups run
// last-in first-out, so this check runs after the ones that stop the agents.
func checkLeaks(t *testing.T) {
	t.Helper()
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, before) })
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startTCPAgent runs lockstepd in this process on a TCP port of 127.0.0.1 with the extra
// arguments, waits until ready(addr) succeeds, and stops the agent with SIGTERM when the test
// ends. It returns host:port.
func startTCPAgent(t *testing.T, ready func(addr string) error, extra ...string) string {
	t.Helper()
	// SIGTERM stops run(); keep it from ever killing the test binary, whatever the timing.
	guard := make(chan os.Signal, 1)
	signal.Notify(guard, syscall.SIGTERM)
	t.Cleanup(func() { signal.Stop(guard) })
	dir := t.TempDir()
	killKeeper(t, filepath.Join(dir, "state"))
	for attempt := 1; ; attempt++ {
		addr := freePort(t)
		args := append([]string{"--state-dir", filepath.Join(dir, "state"), "--overlay-dir", filepath.Join(dir, "ovl"),
			"--listen", "tcp://" + addr}, extra...)
		done := make(chan int, 1)
		go func() { done <- run(args) }()
		if code, exited := waitReady(t, addr, ready, done); exited {
			if attempt < 3 { // the port may have been taken in between
				t.Logf("lockstepd exited %d at start; trying another port", code)
				continue
			}
			t.Fatalf("lockstepd exited %d at start", code)
		}
		t.Cleanup(func() {
			syscall.Kill(os.Getpid(), syscall.SIGTERM)
			select {
			case code := <-done:
				if code != 0 {
					t.Errorf("lockstepd exited %d after SIGTERM", code)
				}
			case <-time.After(10 * time.Second):
				t.Error("lockstepd did not stop on SIGTERM")
			}
		})
		return addr
	}
}

// waitReady waits until ready(addr) succeeds or the agent exits (with the code).
func waitReady(t *testing.T, addr string, ready func(string) error, done chan int) (int, bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case code := <-done:
			return code, true
		default:
		}
		err := ready(addr)
		if err == nil {
			return 0, false
		}
		if time.Now().After(deadline) {
			syscall.Kill(os.Getpid(), syscall.SIGTERM)
			<-done
			t.Fatalf("lockstepd on %s not ready: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The TCP listener with mutual TLS serves clients with a certificate from its CA and refuses
// every other client, and goes on serving the good ones.
func TestMutualTLS(t *testing.T) {
	checkLeaks(t)
	p := newTestPKI(t)
	good := clientTLS(t, p.CA, p.ClientCert, p.ClientKey)
	addr := startTCPAgent(t, func(addr string) error { return call(addr, good) },
		"--tls-cert", p.ServerCert, "--tls-key", p.ServerKey, "--tls-ca", p.CA)

	if err := call(addr, good); err != nil {
		t.Fatalf("client with a good certificate: %v", err)
	}
	// Under TLS 1.2 the agent checks the client's certificate inside the handshake, so the
	// client's handshake fails with the agent's alert. Under TLS 1.3 (what clients use by
	// default) the client's side of the handshake is over before the agent checks, and the agent's
	// alert races with the agent closing the connection: the client sees the alert, or a reset
	// connection or a broken pipe when it sends its HTTP/2 preface.
	tls13Refusal := func(alert string) []string {
		return []string{"error reading server preface: remote error: tls: " + alert, "connection reset by peer", "broken pipe", "error reading server preface: EOF"}
	}
	refused := []struct {
		name  string
		creds credentials.TransportCredentials
		want  []string // any of these in the error's message
	}{
		{"no client certificate, TLS 1.2", clientTLSVersion(t, tls.VersionTLS12, p.CA, "", ""),
			[]string{"authentication handshake failed: remote error: tls: handshake failure"}},
		{"certificate from another CA, TLS 1.2", clientTLSVersion(t, tls.VersionTLS12, p.CA, p.OtherCert, p.OtherKey),
			[]string{"authentication handshake failed: remote error: tls: unknown certificate authority"}},
		{"no client certificate, TLS 1.3", clientTLS(t, p.CA, "", ""), tls13Refusal("certificate required")},
		{"certificate from another CA, TLS 1.3", clientTLS(t, p.CA, p.OtherCert, p.OtherKey), tls13Refusal("unknown certificate authority")},
		// The agent closes a connection that does not start with a TLS handshake.
		{"plaintext client", insecure.NewCredentials(), []string{"error reading server preface", "connection reset by peer", "broken pipe"}},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			err := call(addr, tc.creds)
			if err == nil {
				t.Fatal("served; want refused")
			}
			st, _ := status.FromError(err)
			if st.Code() != codes.Unavailable {
				t.Errorf("code %v, want Unavailable: %v", st.Code(), err)
			}
			found := false
			for _, w := range tc.want {
				found = found || strings.Contains(st.Message(), w)
			}
			if !found {
				t.Errorf("error %q lacks any of %q", st.Message(), tc.want)
			}
			t.Logf("refused: %v", err)
			if err := call(addr, good); err != nil {
				t.Fatalf("the good client after the refusal: %v", err)
			}
		})
	}
	// The good client does not trust a server whose certificate is not from the CA it knows.
	if err := call(addr, clientTLS(t, p.OtherCA, p.ClientCert, p.ClientKey)); err == nil ||
		!strings.Contains(err.Error(), "certificate signed by unknown authority") {
		t.Errorf("client trusting another CA: %v, want an unknown-authority error", err)
	}
}

// --insecure is the explicit way to a plaintext TCP listener.
func TestInsecureTCP(t *testing.T) {
	checkLeaks(t)
	plain := insecure.NewCredentials()
	addr := startTCPAgent(t, func(addr string) error { return call(addr, plain) }, "--insecure")
	if err := call(addr, plain); err != nil {
		t.Fatal(err)
	}
}

// runStderr runs lockstepd in this process and returns its exit code and what it wrote to
// standard error.
func runStderr(t *testing.T, args ...string) (int, string) {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	saved := os.Stderr
	os.Stderr = f
	code := run(args)
	os.Stderr = saved
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return code, string(b)
}

// Bad TLS settings are refused at start with exit code 2 and a message that names the flags or
// the file at fault; nothing is left listening.
func TestTLSFlagErrors(t *testing.T) {
	checkLeaks(t)
	p := newTestPKI(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.pem")
	notPEM := filepath.Join(dir, "not.pem")
	os.WriteFile(notPEM, []byte("this is no certificate\n"), 0o600)
	aDir := filepath.Join(dir, "a-folder.pem") // exists but cannot be read as a file
	os.Mkdir(aDir, 0o700)
	addr := freePort(t)
	killKeeper(t, filepath.Join(dir, "state"))
	base := []string{"--state-dir", filepath.Join(dir, "state"), "--overlay-dir", filepath.Join(dir, "ovl"), "--listen", "tcp://" + addr}
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"tcp without tls or --insecure", nil, []string{"tcp://" + addr, "--tls-cert, --tls-key, --tls-ca", "--insecure"}},
		{"cert without key and ca", []string{"--tls-cert", p.ServerCert}, []string{"--tls-cert, --tls-key and --tls-ca together"}},
		{"key and ca without cert", []string{"--tls-key", p.ServerKey, "--tls-ca", p.CA}, []string{"--tls-cert, --tls-key and --tls-ca together"}},
		{"missing cert", []string{"--tls-cert", missing, "--tls-key", p.ServerKey, "--tls-ca", p.CA}, []string{"--tls-cert", missing, "no such file"}},
		{"missing key", []string{"--tls-cert", p.ServerCert, "--tls-key", missing, "--tls-ca", p.CA}, []string{"--tls-key", missing, "no such file"}},
		{"missing ca", []string{"--tls-cert", p.ServerCert, "--tls-key", p.ServerKey, "--tls-ca", missing}, []string{"--tls-ca", missing, "no such file"}},
		{"unreadable cert", []string{"--tls-cert", aDir, "--tls-key", p.ServerKey, "--tls-ca", p.CA}, []string{"--tls-cert", aDir, "is a directory"}},
		{"cert not PEM", []string{"--tls-cert", notPEM, "--tls-key", p.ServerKey, "--tls-ca", p.CA}, []string{"--tls-cert " + notPEM, "certificate input"}},
		{"key not PEM", []string{"--tls-cert", p.ServerCert, "--tls-key", notPEM, "--tls-ca", p.CA}, []string{"--tls-key " + notPEM, "key input"}},
		{"key of another certificate", []string{"--tls-cert", p.ServerCert, "--tls-key", p.ClientKey, "--tls-ca", p.CA}, []string{p.ServerCert, p.ClientKey, "does not match"}},
		{"ca not PEM", []string{"--tls-cert", p.ServerCert, "--tls-key", p.ServerKey, "--tls-ca", notPEM}, []string{"--tls-ca " + notPEM, "no certificate"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, stderr := runStderr(t, append(append([]string{}, base...), tc.args...)...)
			if code != 2 {
				t.Errorf("exit %d, want 2; stderr: %s", code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr %q lacks %q", stderr, w)
				}
			}
			if c, err := net.Dial("tcp", addr); err == nil {
				c.Close()
				t.Errorf("something listens on %s after a refused start", addr)
			}
		})
	}
}
