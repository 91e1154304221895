// Package testpki writes the certificates that tests of lockstep's TLS listeners and clients
// need: a CA, a server certificate for 127.0.0.1, a client certificate, and a second CA with a
// client certificate of its own.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI holds PEM files written to a temporary folder: a CA, a server certificate for
// 127.0.0.1 and a client certificate both signed by it, and another CA with a client
// certificate of its own.
type PKI struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey, OtherCA, OtherCert, OtherKey string
}

// New writes a fresh PKI to a temporary folder of the test.
func New(t testing.TB) PKI {
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
	var p PKI
	ca, caKey, der, _ := issue(caTmpl("lockstep test CA"), nil, nil)
	p.CA = write("ca.pem", "CERTIFICATE", der)
	srv := leaf("lockstepd", x509.ExtKeyUsageServerAuth)
	srv.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	_, _, der, keyDER := issue(srv, ca, caKey)
	p.ServerCert, p.ServerKey = write("server.pem", "CERTIFICATE", der), write("server.key", "PRIVATE KEY", keyDER)
	_, _, der, keyDER = issue(leaf("operator", x509.ExtKeyUsageClientAuth), ca, caKey)
	p.ClientCert, p.ClientKey = write("client.pem", "CERTIFICATE", der), write("client.key", "PRIVATE KEY", keyDER)
	other, otherKey, der, _ := issue(caTmpl("some other CA"), nil, nil)
	p.OtherCA = write("other-ca.pem", "CERTIFICATE", der)
	_, _, der, keyDER = issue(leaf("intruder", x509.ExtKeyUsageClientAuth), other, otherKey)
	p.OtherCert, p.OtherKey = write("other.pem", "CERTIFICATE", der), write("other.key", "PRIVATE KEY", keyDER)
	return p
}
