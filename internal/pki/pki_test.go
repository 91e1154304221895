package pki

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"net/url"
	"testing"
	"time"
)

// A host certificate names its host three ways and chains to its CA; a CA read back from its
// files issues certificates that chain to it; a key of another CA is refused.
func TestIssueAndLoad(t *testing.T) {
	ca, key, err := NewCA("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	again, err := LoadCA(ca.CertPEM, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := again.IssueHost("hosta", []net.IP{net.IPv4(10, 0, 0, 1)}, 2*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(leaf.CertPEM)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if c.Subject.CommonName != "hosta" || len(c.DNSNames) != 1 || c.DNSNames[0] != "hosta" || len(c.URIs) != 1 || c.URIs[0].String() != "lockstep://host/hosta" {
		t.Fatalf("names: CN %q DNS %v URIs %v", c.Subject.CommonName, c.DNSNames, c.URIs)
	}
	if c.NotAfter.After(ca.Cert.NotAfter) {
		t.Errorf("the certificate outlives its CA: %v > %v", c.NotAfter, ca.Cert.NotAfter)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			t.Errorf("usage %v: %v", u, err)
		}
	}
	op, err := ca.IssueClient("alice", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ob, _ := pem.Decode(op.CertPEM)
	oc, _ := x509.ParseCertificate(ob.Bytes)
	if _, err := oc.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("an operator's certificate serves as a server's")
	}
	_, otherKey, _ := NewCA("other", time.Hour)
	if _, err := LoadCA(ca.CertPEM, otherKey); err == nil {
		t.Error("a CA with another CA's key was loaded")
	}
	if _, err := LoadCA(leaf.CertPEM, leaf.KeyPEM); err == nil {
		t.Error("a host certificate was loaded as a CA")
	}
	for _, bad := range []string{"", "a b", "-x", "a/b"} {
		if _, err := ca.IssueHost(bad, nil, time.Hour); err == nil {
			t.Errorf("host name %q issued", bad)
		}
	}
}

func TestHostOfURI(t *testing.T) {
	for raw, want := range map[string]string{
		"lockstep://host/hosta": "hosta", "lockstep://host/": "", "lockstep://host/a/b": "", "spiffe://host/hosta": "", "lockstep://other/hosta": "",
	} {
		u, _ := url.Parse(raw)
		got, ok := HostOfURI(u)
		if got != want || ok != (want != "") {
			t.Errorf("%s: %q %v, want %q", raw, got, ok, want)
		}
	}
	if got, ok := HostOfURI(HostURI("db-1.example")); !ok || got != "db-1.example" {
		t.Errorf("round trip: %q %v", got, ok)
	}
}
