// Package pki makes the certificates lockstep's hosts and operators use with the Go standard
// library: a CA, host certificates (one per lockstepd: its identity on the peer link, its
// server and client certificate for the store, and the certificate its QEMUs present on the
// replication channels) and operator client certificates. lockstepctl certs and the tests use
// it; a site with a PKI of its own issues certificates of the same shape instead.
//
// A host certificate names its host three ways, all the same name: the URI SAN
// lockstep://host/NAME (what the agents check on the peer link), a DNS SAN NAME and the subject
// common name NAME (what QEMU's tls-authz checks on the replication channels); its IP SANs are
// the host's addresses, which QEMU's TLS clients check the server's certificate against.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"regexp"
	"strings"
	"time"
)

// hostURIPrefix starts the URI SAN that names a lockstep host.
const hostURIPrefix = "lockstep://host/"

// HostURI is the URI SAN that names host name.
func HostURI(name string) *url.URL {
	u, _ := url.Parse(hostURIPrefix + url.PathEscape(name))
	return u
}

// HostOfURI returns the host that u names, if u is a lockstep host URI.
func HostOfURI(u *url.URL) (string, bool) {
	if u == nil {
		return "", false
	}
	s := u.String()
	if !strings.HasPrefix(s, hostURIPrefix) {
		return "", false
	}
	name, err := url.PathUnescape(strings.TrimPrefix(s, hostURIPrefix))
	if err != nil || name == "" || strings.Contains(name, "/") {
		return "", false
	}
	return name, true
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ValidName reports whether name can name a host or an operator in a certificate: 1-63
// letters, digits, '.', '_' or '-', starting with a letter or digit.
func ValidName(name string) bool { return nameRE.MatchString(name) }

// CA is a certificate authority that can issue certificates.
type CA struct {
	Cert    *x509.Certificate
	CertPEM []byte
	key     crypto.Signer
}

// NewCA makes a self-signed CA valid for the given duration; it returns the CA and its key in
// PEM (keep it to issue more certificates later).
func NewCA(commonName string, validity time.Duration) (*CA, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		Subject: pkix.Name{CommonName: commonName}, IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	if err := setValidity(tmpl, validity); err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return &CA{Cert: cert, CertPEM: encodeCert(der), key: key}, keyPEM, nil
}

// LoadCA reads a CA from its certificate and key in PEM.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, errors.New("pki: the CA certificate is not a PEM CERTIFICATE")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: the CA certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("pki: that certificate is not a CA's")
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, errors.New("pki: the CA key is not PEM")
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		if ek, eerr := x509.ParseECPrivateKey(kb.Bytes); eerr == nil {
			k = ek
		} else {
			return nil, fmt.Errorf("pki: the CA key: %w", err)
		}
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("pki: the CA key cannot sign")
	}
	if !publicKeysEqual(signer.Public(), cert.PublicKey) {
		return nil, errors.New("pki: the CA key does not match the CA certificate")
	}
	return &CA{Cert: cert, CertPEM: encodeCert(cb.Bytes), key: signer}, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

// Leaf is an issued certificate and its key, in PEM.
type Leaf struct {
	CertPEM, KeyPEM []byte
}

// IssueHost issues the certificate of host name, valid on the given addresses: for server
// and client authentication, named as the package comment says.
func (ca *CA) IssueHost(name string, ips []net.IP, validity time.Duration) (Leaf, error) {
	if !ValidName(name) {
		return Leaf{}, fmt.Errorf("pki: host name %q: want 1-63 letters, digits, '.', '_' or '-'", name)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name},
		DNSNames:    []string{name},
		URIs:        []*url.URL{HostURI(name)},
		IPAddresses: ips,
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	return ca.issue(tmpl, validity)
}

// IssueClient issues an operator's client certificate (lockstepctl's --tls-cert): client
// authentication only, so that it can never speak for a host.
func (ca *CA) IssueClient(name string, validity time.Duration) (Leaf, error) {
	if !ValidName(name) {
		return Leaf{}, fmt.Errorf("pki: client name %q: want 1-63 letters, digits, '.', '_' or '-'", name)
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	return ca.issue(tmpl, validity)
}

func (ca *CA) issue(tmpl *x509.Certificate, validity time.Duration) (Leaf, error) {
	if err := setValidity(tmpl, validity); err != nil {
		return Leaf{}, err
	}
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Leaf{}, err
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return Leaf{}, err
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return Leaf{}, err
	}
	return Leaf{CertPEM: encodeCert(der), KeyPEM: keyPEM}, nil
}

// setValidity sets a random serial and the validity window; it starts an hour ago, so that
// hosts whose clocks differ a little accept a fresh certificate.
func setValidity(tmpl *x509.Certificate, validity time.Duration) error {
	if validity <= 0 {
		return fmt.Errorf("pki: validity %v: want a positive duration", validity)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return err
	}
	tmpl.SerialNumber = serial
	now := time.Now()
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Hour), now.Add(validity)
	return nil
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
