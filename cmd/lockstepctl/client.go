package main

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// dial connects to the agent named by --addr (once per run).
func (a *app) dial() error {
	if a.conn != nil {
		return nil
	}
	target := a.addr
	creds := insecure.NewCredentials()
	useTLS := a.tlsCert != "" || a.tlsKey != "" || a.tlsCA != ""
	switch {
	case strings.HasPrefix(target, "unix://"):
		if useTLS {
			return usagef("--tls-cert, --tls-key and --tls-ca are for a tcp:// address, not %s", a.addr)
		}
		target = "unix:" + strings.TrimPrefix(target, "unix://")
	case strings.HasPrefix(target, "tcp://"):
		target = "passthrough:///" + strings.TrimPrefix(target, "tcp://")
		if useTLS {
			var err error
			if creds, err = a.clientTLS(); err != nil {
				return err
			}
		}
	default:
		return usagef("--addr %q: want unix:///path or tcp://host:port", a.addr)
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	a.conn, a.client = conn, pb.NewPairServiceClient(conn)
	return nil
}

// clientTLS loads the client side of mutual TLS from --tls-cert, --tls-key and --tls-ca.
func (a *app) clientTLS() (credentials.TransportCredentials, error) {
	if a.tlsCert == "" || a.tlsKey == "" || a.tlsCA == "" {
		return nil, usagef("mutual TLS needs --tls-cert, --tls-key and --tls-ca together")
	}
	certPEM, err := os.ReadFile(a.tlsCert)
	if err != nil {
		return nil, usagef("--tls-cert: %v", err)
	}
	keyPEM, err := os.ReadFile(a.tlsKey)
	if err != nil {
		return nil, usagef("--tls-key: %v", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, usagef("--tls-cert %s, --tls-key %s: %v", a.tlsCert, a.tlsKey, err)
	}
	caPEM, err := os.ReadFile(a.tlsCA)
	if err != nil {
		return nil, usagef("--tls-ca: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, usagef("--tls-ca %s: no certificate in it", a.tlsCA)
	}
	return credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}), nil
}
