package coord

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
)

// TLSConfig builds the client TLS configuration of the --etcd-cert, --etcd-key and --etcd-ca
// flags. All three empty means no TLS configuration (nil, nil), so the flags can be passed
// through unconditionally. cert and key go together (client authentication); ca alone verifies
// the server against that CA instead of the system pool.
func TLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	if certFile == "" && keyFile == "" && caFile == "" {
		return nil, nil
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("coord: etcd TLS: certificate and key must be given together")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("coord: etcd TLS: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("coord: etcd TLS: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("coord: etcd TLS: no PEM certificate in %s", caFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// EmbeddedTLS is the embedded etcd server's TLS: its certificate (for clients and its peer
// URL alike) and the CA of the client certificates it accepts.
type EmbeddedTLS struct {
	CertFile, KeyFile, CAFile string
}

// defaultEmbeddedTLSURL is the peer URL of an embedded server that serves TLS: loopback, as a
// single member never talks to a peer, and encrypted like the rest.
const defaultEmbeddedTLSURL = "https://127.0.0.1:0"

// checkTLS refuses an https URL without TLS settings, TLS settings with a plaintext client
// URL, and TLS settings missing a file.
func (cfg *EmbeddedConfig) checkTLS() error {
	https := strings.HasPrefix(cfg.ClientURL, "https://")
	switch {
	case https && cfg.TLS == nil:
		return fmt.Errorf("coord: embedded etcd at %s: https needs a server certificate, its key and a client CA", cfg.ClientURL)
	case !https && cfg.TLS != nil:
		return fmt.Errorf("coord: embedded etcd at %s: TLS settings need an https client URL", cfg.ClientURL)
	case cfg.TLS == nil:
		return nil
	}
	files := []struct{ what, path string }{{"certificate", cfg.TLS.CertFile}, {"key", cfg.TLS.KeyFile}, {"client CA", cfg.TLS.CAFile}}
	for _, f := range files {
		if f.path == "" {
			return fmt.Errorf("coord: embedded etcd TLS: no %s", f.what)
		}
	}
	for _, f := range files {
		if _, err := os.Stat(f.path); err != nil {
			return fmt.Errorf("coord: embedded etcd TLS %s: %w", f.what, err)
		}
	}
	if _, err := tls.LoadX509KeyPair(cfg.TLS.CertFile, cfg.TLS.KeyFile); err != nil {
		return fmt.Errorf("coord: embedded etcd TLS: %w", err)
	}
	return nil
}

// apply sets the server's TLS: client-certificate authentication for clients and for the peer
// URL (when it is https).
func (t *EmbeddedTLS) apply(ec *embed.Config, client, peer *url.URL) {
	if t == nil {
		return
	}
	info := transport.TLSInfo{CertFile: t.CertFile, KeyFile: t.KeyFile, TrustedCAFile: t.CAFile, ClientCertAuth: true,
		MinVersion: tls.VersionTLS12}
	if client.Scheme == "https" {
		ec.ClientTLSInfo = info
	}
	if peer.Scheme == "https" {
		ec.PeerTLSInfo = info
	}
}
