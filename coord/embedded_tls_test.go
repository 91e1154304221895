package coord

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/internal/pki"
)

// writeLeaf writes a certificate and its key under dir as name.pem and name.key.
func writeLeaf(t *testing.T, dir, name string, l pki.Leaf) (cert, key string) {
	t.Helper()
	cert, key = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+".key")
	if err := os.WriteFile(cert, l.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, l.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// The embedded server over TLS: agents with their host certificates read and write; a client
// without a certificate, one with a certificate of another CA, and a plaintext client are
// refused and write nothing.
func TestEmbeddedTLS(t *testing.T) {
	dir := t.TempDir()
	ca, _, err := pki.NewCA("lockstep test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := pki.NewCA("some other CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	issue := func(ca *pki.CA, name string) (string, string) {
		l, err := ca.IssueHost(name, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return writeLeaf(t, dir, name, l)
	}
	srvCert, srvKey := issue(ca, "etcd")
	agentCert, agentKey := issue(ca, "hosta")
	otherCert, otherKey := issue(other, "intruder")

	emb, err := StartEmbedded(EmbeddedConfig{Dir: filepath.Join(dir, "data"), ClientURL: "https://127.0.0.1:0",
		TLS: &EmbeddedTLS{CertFile: srvCert, KeyFile: srvKey, CAFile: caFile}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	ep := emb.Endpoints()
	if !strings.HasPrefix(ep[0], "https://127.0.0.1:") {
		t.Fatalf("endpoints %v, want https on loopback", ep)
	}
	client := func(endpoints []string, cert, key string) *Etcd {
		t.Helper()
		tc, err := TLSConfig(cert, key, caFile)
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewEtcd(EtcdConfig{Endpoints: endpoints, TLS: tc, DialTimeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	good := client(ep, agentCert, agentKey)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := good.CreatePair(ctx, "db1", []byte(`{}`)); err != nil {
		t.Fatalf("an agent with its certificate: %v", err)
	}

	plain := "http://" + strings.TrimPrefix(ep[0], "https://")
	for _, tc := range []struct {
		name      string
		endpoints []string
		cert, key string
	}{
		{"no client certificate", ep, "", ""},
		{"certificate of another CA", ep, otherCert, otherKey},
		{"plaintext", []string{plain}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := client(tc.endpoints, tc.cert, tc.key)
			ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
			defer cancel()
			if err := bad.CreatePair(ctx, "evil", []byte(`{}`)); err == nil {
				t.Fatal("the store took a write from a client without a valid certificate")
			}
			if _, err := bad.ListPairs(ctx); err == nil {
				t.Fatal("the store answered a client without a valid certificate")
			}
		})
	}
	all, err := good.ListPairs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 1 || all["db1"] == nil {
		t.Fatalf("the store holds %v, want only db1", all)
	}
}

// TLS settings and the client URL's scheme go together; a missing file is named.
func TestEmbeddedTLSConfigErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		cfg  EmbeddedConfig
		want string
	}{
		{"https without TLS", EmbeddedConfig{Dir: dir, ClientURL: "https://127.0.0.1:0"}, "https needs a server certificate"},
		{"TLS with http", EmbeddedConfig{Dir: dir, ClientURL: "http://127.0.0.1:0", TLS: &EmbeddedTLS{CertFile: "a", KeyFile: "b", CAFile: "c"}}, "need an https client URL"},
		{"missing certificate", EmbeddedConfig{Dir: dir, ClientURL: "https://127.0.0.1:0", TLS: &EmbeddedTLS{CertFile: filepath.Join(dir, "none.pem"), KeyFile: "b", CAFile: "c"}}, "none.pem"},
		{"no CA", EmbeddedConfig{Dir: dir, ClientURL: "https://127.0.0.1:0", TLS: &EmbeddedTLS{CertFile: "a", KeyFile: "b"}}, "no client CA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, err := StartEmbedded(tc.cfg)
			if err == nil {
				e.Close()
				t.Fatal("started")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want %q", err, tc.want)
			}
		})
	}
}
