package controller

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"sort"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/lockstepvm/lockstep/internal/pki"
)

// The peer link between the agents of two hosts runs over mutual TLS. Each agent presents its
// host's certificate, which names the host (HostIdentities); a request is taken only from the
// agent of the host that a pair's placement names opposite this host's side, so that a valid
// certificate of host C cannot speak for host A. Refused connections and requests change
// nothing: they are logged with the peer and the reason and counted
// (lockstep_peer_auth_failures_total).

// PeerTLS is this host's certificate for the peer link and the CA that the certificates of
// the other hosts must chain to. The same certificate is what this host's QEMUs present on
// encrypted replication channels.
type PeerTLS struct {
	cert  tls.Certificate
	roots *x509.CertPool
	// names are the host identities of this host's own certificate.
	names                  []string
	certPEM, keyPEM, caPEM []byte
}

// LoadPeerTLS reads a host certificate, its key and the CA (PEM files). The certificate must
// name at least one host (HostIdentities) and chain to the CA.
func LoadPeerTLS(certFile, keyFile, caFile string) (*PeerTLS, error) {
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("peer certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fmt.Errorf("peer key: %w", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("peer CA: %w", err)
	}
	return NewPeerTLS(certPEM, keyPEM, caPEM)
}

// NewPeerTLS is LoadPeerTLS from the files' contents.
func NewPeerTLS(certPEM, keyPEM, caPEM []byte) (*PeerTLS, error) {
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("peer certificate and key: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("peer CA: no PEM certificate in it")
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fmt.Errorf("peer certificate: %w", err)
		}
	}
	names := HostIdentities(leaf)
	if len(names) == 0 {
		return nil, errors.New("peer certificate: it names no host (want a URI SAN lockstep://host/NAME or a DNS SAN)")
	}
	if !slices.Contains(names, leaf.Subject.CommonName) {
		// QEMU's tls-authz on the replication channels sees only the subject.
		return nil, fmt.Errorf("peer certificate: its subject common name %q is not the host it names (%v)", leaf.Subject.CommonName, names)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}); err != nil {
		return nil, fmt.Errorf("peer certificate: not valid against the peer CA for server and client authentication: %w", err)
	}
	return &PeerTLS{cert: cert, roots: roots, names: names, certPEM: certPEM, keyPEM: keyPEM, caPEM: caPEM}, nil
}

// Names returns the hosts this certificate names.
func (p *PeerTLS) Names() []string { return slices.Clone(p.names) }

// HostIdentities returns the hosts a certificate names: those of its URI SANs
// lockstep://host/NAME, or, when it has none, its DNS SANs.
func HostIdentities(c *x509.Certificate) []string {
	var out []string
	for _, u := range c.URIs {
		if h, ok := pki.HostOfURI(u); ok {
			out = append(out, h)
		}
	}
	if len(out) == 0 {
		out = append(out, c.DNSNames...)
	}
	sort.Strings(out)
	return slices.Compact(out)
}

// ServerConfig is the TLS configuration of the PeerService listener: the client must present
// a certificate from the CA that names a host.
func (p *PeerTLS) serverConfig() *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{p.cert}, ClientCAs: p.roots, ClientAuth: tls.RequireAndVerifyClientCert,
		MinVersion: tls.VersionTLS13,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || len(HostIdentities(cs.PeerCertificates[0])) == 0 {
				return errors.New("the client certificate names no lockstep host")
			}
			return nil
		},
	}
}

// ClientCredentials are the credentials of the agent's connections to the agents of other
// hosts: the server's certificate must chain to the CA and name the host dialed, which the
// agent passes as the connection's authority.
func (p *PeerTLS) ClientCredentials() credentials.TransportCredentials {
	return credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{p.cert}, MinVersion: tls.VersionTLS13,
		// The chain and the host name are checked below, against the host identities
		// (URI SANs) rather than the address dialed.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the peer agent presented no certificate")
			}
			leaf := cs.PeerCertificates[0]
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: p.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("the peer agent's certificate: %w", err)
			}
			if ids := HostIdentities(leaf); !slices.Contains(ids, cs.ServerName) {
				return fmt.Errorf("the peer agent's certificate names %v, not host %q", ids, cs.ServerName)
			}
			return nil
		},
	})
}

// peerAuth counts the refused peer connections and requests, by reason.
type peerAuth struct {
	mu       sync.Mutex
	failures map[string]uint64
}

// Reasons of refusals, the counter's label.
const (
	authHandshake = "handshake"  // no certificate, another CA, no host named, plaintext
	authNotAPeer  = "not-a-peer" // a valid certificate of a host the pair does not place opposite
	authNoCert    = "no-cert"    // a request without a verified certificate on a TLS agent
	authMismatch  = "wrong-host" // a request that names a sender its certificate does not
)

func (a *Agent) peerAuthFailed(reason, who, why string, attrs ...any) {
	a.auth.mu.Lock()
	if a.auth.failures == nil {
		a.auth.failures = map[string]uint64{}
	}
	a.auth.failures[reason]++
	a.auth.mu.Unlock()
	a.log.Warn("peer refused", append([]any{"peer", who, "reason", reason, "why", why}, attrs...)...)
}

// peerAuthCounts returns the refusals by reason.
func (a *Agent) peerAuthCounts() map[string]uint64 {
	a.auth.mu.Lock()
	defer a.auth.mu.Unlock()
	out := map[string]uint64{}
	for k, v := range a.auth.failures {
		out[k] = v
	}
	return out
}

// PeerServerCredentials are the credentials of the PeerService listener: mutual TLS with the
// agent's PeerTLS; a handshake that fails (no certificate, one of another CA, one naming no
// host, a plaintext client) is logged and counted.
func (a *Agent) PeerServerCredentials() (credentials.TransportCredentials, error) {
	if a.cfg.PeerTLS == nil {
		return nil, errors.New("agent: no peer certificate")
	}
	return countingCreds{TransportCredentials: credentials.NewTLS(a.cfg.PeerTLS.serverConfig()), a: a}, nil
}

type countingCreds struct {
	credentials.TransportCredentials
	a *Agent
}

func (c countingCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	out, info, err := c.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		c.a.peerAuthFailed(authHandshake, conn.RemoteAddr().String(), err.Error())
	}
	return out, info, err
}

func (c countingCreds) Clone() credentials.TransportCredentials {
	return countingCreds{TransportCredentials: c.TransportCredentials.Clone(), a: c.a}
}

// peerSender returns the host whose agent sent a PeerService request for pair, from its
// certificate: the host that a placement of the pair names opposite a side of this host. A
// request that names its sender (declared) must name that host. Over a plaintext link
// (--insecure) there is no certificate, and the request's own word is taken.
func (a *Agent) peerSender(ctx context.Context, pair, declared string) (string, error) {
	who, method := "unknown", grpc.ServerTransportStreamFromContext(ctx)
	p, ok := peer.FromContext(ctx)
	if ok && p.Addr != nil {
		who = p.Addr.String()
	}
	call := ""
	if method != nil {
		call = method.Method()
	}
	var info credentials.TLSInfo
	if ok {
		info, ok = p.AuthInfo.(credentials.TLSInfo)
	}
	if !ok {
		if a.cfg.PeerTLS == nil {
			return declared, nil
		}
		a.peerAuthFailed(authNoCert, who, "a request without TLS to an agent with a peer certificate", "pair", pair, "call", call)
		return "", status.Error(codes.Unauthenticated, "peer request without a client certificate")
	}
	if len(info.State.VerifiedChains) == 0 || len(info.State.PeerCertificates) == 0 {
		a.peerAuthFailed(authNoCert, who, "no verified client certificate", "pair", pair, "call", call)
		return "", status.Error(codes.Unauthenticated, "peer request without a verified client certificate")
	}
	ids := HostIdentities(info.State.PeerCertificates[0])
	pr, found := a.pair(pair)
	if !found {
		return "", status.Errorf(codes.NotFound, "pair %q: this host runs no side of it", pair)
	}
	sender := ""
	for s, r := range pr.runners {
		if r == nil {
			continue
		}
		if other := pr.cfg.Sides[Side(s).Other()].Agent; other != a.cfg.Host && slices.Contains(ids, other) {
			sender = other
		}
	}
	if sender == "" {
		why := fmt.Sprintf("its certificate names %v; pair %q places no side of those opposite this host's", ids, pair)
		a.peerAuthFailed(authNotAPeer, who, why, "pair", pair, "call", call)
		return "", status.Error(codes.PermissionDenied, "peer request refused: "+why)
	}
	if declared != "" && declared != sender {
		why := fmt.Sprintf("the request names host %q, its certificate %v", declared, ids)
		a.peerAuthFailed(authMismatch, who, why, "pair", pair, "call", call)
		return "", status.Error(codes.PermissionDenied, "peer request refused: "+why)
	}
	return sender, nil
}
