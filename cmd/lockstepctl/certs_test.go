package main

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lockstepvm/lockstep/controller"
	"github.com/lockstepvm/lockstep/coord"
)

// certs makes a CA and host and operator certificates in one go; a second run adds a host
// with the same CA. The host certificates are what lockstepd takes for the peer link and the
// store, name their hosts, and carry a TLS connection both ways between two hosts; the
// operator's cannot speak for a host.
func TestCerts(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	code, out, errOut := runCtl("certs", "--dir", dir, "--host", "hosta=10.0.0.1,127.0.0.1", "--host", "etcd=10.0.0.9", "--client", "alice")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, w := range []string{"ca.pem  new CA", "hosta.pem  host hosta on [10.0.0.1 127.0.0.1]", "alice.pem  operator alice"} {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
	code, out, errOut = runCtl("certs", "--dir", dir, "--host", "hostb=10.0.0.2,127.0.0.1")
	if code != exitOK || !strings.Contains(out, "the CA already there") {
		t.Fatalf("second run: exit %d: %s%s", code, out, errOut)
	}
	for _, f := range []string{"ca.key", "hosta.key", "hostb.key", "alice.key"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, mode %v, want 0600", f, err, st.Mode().Perm())
		}
	}
	file := func(n string) string { return filepath.Join(dir, n) }
	pa, err := controller.LoadPeerTLS(file("hosta.pem"), file("hosta.key"), file("ca.pem"))
	if err != nil {
		t.Fatalf("hosta's certificate as a peer certificate: %v", err)
	}
	if got := pa.Names(); len(got) != 1 || got[0] != "hosta" {
		t.Errorf("hosta's certificate names %v", got)
	}
	if _, err := controller.LoadPeerTLS(file("alice.pem"), file("alice.key"), file("ca.pem")); err == nil {
		t.Error("the operator's certificate was taken for a host's")
	}
	if _, err := coord.TLSConfig(file("hostb.pem"), file("hostb.key"), file("ca.pem")); err != nil {
		t.Errorf("hostb's certificate for the store: %v", err)
	}

	// Host b's agent dials host a's over mutual TLS with these files, on loopback.
	pb, err := controller.LoadPeerTLS(file("hostb.pem"), file("hostb.key"), file("ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _ := os.ReadFile(file("ca.pem"))
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	srvCert, err := tls.LoadX509KeyPair(file("hosta.pem"), file("hosta.key"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientCAs: roots, ClientAuth: tls.RequireAndVerifyClientCert, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			got <- err.Error()
			return
		}
		got <- strings.Join(controller.HostIdentities(tc.ConnectionState().PeerCertificates[0]), ",")
	}()
	raw, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	conn, _, err := pb.ClientCredentials().ClientHandshake(t.Context(), "hosta", raw)
	if err != nil {
		t.Fatalf("hostb's agent dialing hosta: %v", err)
	}
	conn.Close()
	if who := <-got; who != "hostb" {
		t.Fatalf("hosta's side saw %q, want hostb", who)
	}
	// Dialed as another host, the same server is refused: its certificate names hosta.
	raw2, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw2.Close()
	go func() {
		if c, err := l.Accept(); err == nil {
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	if _, _, err := pb.ClientCredentials().ClientHandshake(t.Context(), "hostc", raw2); err == nil || !strings.Contains(err.Error(), `not host "hostc"`) {
		t.Fatalf("hostb's agent dialing hosta as hostc: %v, want a refusal", err)
	}
}

// Bad input: exit code 2, the flag named, nothing written.
func TestCertsBadInput(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no dir", []string{"certs", "--host", "a=10.0.0.1"}, "--dir"},
		{"nothing to make", []string{"certs", "--dir", "D"}, "at least one --host"},
		{"no address", []string{"certs", "--dir", "D", "--host", "a"}, `--host "a": give the host's addresses`},
		{"bad address", []string{"certs", "--dir", "D", "--host", "a=10.0.0.300"}, `"10.0.0.300" is not an IP address`},
		{"bad name", []string{"certs", "--dir", "D", "--host", "a b=10.0.0.1"}, `--host "a b=10.0.0.1": the name`},
		{"twice", []string{"certs", "--dir", "D", "--host", "a=10.0.0.1", "--client", "a"}, `"a" is given twice`},
		{"the CA's name", []string{"certs", "--dir", "D", "--client", "ca"}, "the CA's file"},
		{"days", []string{"certs", "--dir", "D", "--client", "x", "--days", "0"}, "--days 0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "pki")
			args := append([]string{}, tc.args...)
			for i, a := range args {
				if a == "D" {
					args[i] = dir
				}
			}
			code, _, errOut := runCtl(args...)
			if code != exitUsage || !strings.Contains(errOut, tc.want) {
				t.Fatalf("exit %d: %s; want 2 and %q", code, errOut, tc.want)
			}
			if _, err := os.Stat(dir); err == nil {
				t.Fatal("bad input wrote the folder")
			}
		})
	}
	// Half a CA is not reused, nor replaced.
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ca.pem"), []byte("x"), 0o600)
	if code, _, errOut := runCtl("certs", "--dir", dir, "--client", "x"); code != exitUsage || !strings.Contains(errOut, "ca.pem and ca.key but not the other") {
		t.Fatalf("half a CA: exit %d: %s", code, errOut)
	}
}
