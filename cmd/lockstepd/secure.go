package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"

	"github.com/lockstepvm/lockstep/controller"
	"github.com/lockstepvm/lockstep/coord"
)

// The agents' network carries the peer link (--peer-listen) and the store (--etcd-serve,
// --etcd-endpoints); both run over mutual TLS, and plaintext on an address other hosts can
// reach needs an explicit --insecure, as the API's TCP listener does.

// loopbackHost reports whether host (a name or an address) is this machine only.
func loopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkPlaintext refuses plaintext peer and store addresses that are not loopback, unless
// --insecure.
func checkPlaintext(cfg config, peerTLS bool) error {
	if cfg.Insecure {
		return nil
	}
	if cfg.PeerListen != "" && !peerTLS {
		host, _, err := net.SplitHostPort(cfg.PeerListen)
		if err != nil {
			return fmt.Errorf("--peer-listen %s: %w", cfg.PeerListen, err)
		}
		if !loopbackHost(host) {
			return fmt.Errorf("--peer-listen %s: the peer link needs mutual TLS (--peer-cert, --peer-key, --peer-ca) or an explicit --insecure", cfg.PeerListen)
		}
	}
	check := func(flag, raw string) error {
		u, err := url.Parse(raw)
		if err != nil {
			return fmt.Errorf("%s %s: %w", flag, raw, err)
		}
		if u.Scheme == "http" && !loopbackHost(u.Hostname()) {
			return fmt.Errorf("%s %s: plaintext etcd on a non-loopback address needs an explicit --insecure (or https:// with --etcd-cert, --etcd-key, --etcd-ca)", flag, raw)
		}
		return nil
	}
	if cfg.EtcdServe != "" {
		if err := check("--etcd-serve", cfg.EtcdServe); err != nil {
			return err
		}
	}
	for _, e := range strings.Split(cfg.EtcdEndpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			if err := check("--etcd-endpoints", e); err != nil {
				return err
			}
		}
	}
	return nil
}

// loadPeerTLS reads the host certificate of the peer link: --peer-cert, --peer-key and
// --peer-ca, or, with none of them and a --peer-listen, the API's --tls-* (which must then be
// a host certificate). Nil without any.
func loadPeerTLS(cfg config) (*controller.PeerTLS, error) {
	cert, key, ca, flags := cfg.PeerCert, cfg.PeerKey, cfg.PeerCA, "--peer-cert, --peer-key, --peer-ca"
	if cert == "" && key == "" && ca == "" {
		if cfg.PeerListen == "" || (cfg.TLSCert == "" && cfg.TLSKey == "" && cfg.TLSCA == "") {
			return nil, nil
		}
		cert, key, ca, flags = cfg.TLSCert, cfg.TLSKey, cfg.TLSCA, "--tls-cert, --tls-key, --tls-ca (used for the peer link: no --peer-cert)"
	}
	if cert == "" || key == "" || ca == "" {
		return nil, fmt.Errorf("%s: the three go together", flags)
	}
	p, err := controller.LoadPeerTLS(cert, key, ca)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flags, err)
	}
	return p, nil
}

// embeddedTLS is the TLS of the etcd server inside lockstepd for an https --etcd-serve: its
// certificate is --etcd-cert/--etcd-key (the host's, which its own agent also connects with),
// its client CA --etcd-ca.
func embeddedTLS(cfg config) (*coord.EmbeddedTLS, error) {
	if !strings.HasPrefix(cfg.EtcdServe, "https://") {
		return nil, nil
	}
	if cfg.EtcdCert == "" || cfg.EtcdKey == "" || cfg.EtcdCA == "" {
		return nil, errors.New("--etcd-serve " + cfg.EtcdServe + ": https needs --etcd-cert, --etcd-key (the server's certificate) and --etcd-ca (the CA of the clients' certificates)")
	}
	return &coord.EmbeddedTLS{CertFile: cfg.EtcdCert, KeyFile: cfg.EtcdKey, CAFile: cfg.EtcdCA}, nil
}
