package coord

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/internal/testpki"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestUnreachable(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{"deadline", context.DeadlineExceeded, true},
		{"wrapped deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), true},
		{"cancelled", context.Canceled, false},
		{"no leader", rpctypes.ErrNoLeader, true},
		{"server stopped", rpctypes.ErrStopped, true},
		{"request timed out", rpctypes.ErrTimeout, true},
		{"too many requests", rpctypes.ErrTooManyRequests, true},
		{"grpc unavailable", status.Error(codes.Unavailable, "connection refused"), true},
		{"grpc deadline", status.Error(codes.DeadlineExceeded, "slow"), true},
		{"lease not found", rpctypes.ErrLeaseNotFound, false},
		{"no space", rpctypes.ErrNoSpace, false},
		{"permission denied", rpctypes.ErrPermissionDenied, false},
		{"plain", errors.New("boom"), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := unreachable(tc.err); got != tc.want {
				t.Fatalf("unreachable(%v) = %v, want %v", tc.err, got, tc.want)
			}
			if got := errors.Is(fail("op", tc.err), ErrUnavailable); got != tc.want {
				t.Fatalf("fail wraps ErrUnavailable = %v, want %v", got, tc.want)
			}
			if !errors.Is(fail("op", tc.err), tc.err) {
				t.Fatal("fail lost the cause")
			}
		})
	}
}

func TestNewEtcdConfig(t *testing.T) {
	if _, err := NewEtcd(EtcdConfig{}); err == nil {
		t.Fatal("NewEtcd without endpoints succeeded")
	}
	for _, tc := range []struct{ prefix, want string }{
		{"", DefaultPrefix},
		{"/x", "/x/"},
		{"/x/", "/x/"},
	} {
		s, err := NewEtcd(EtcdConfig{Endpoints: shared.Endpoints(), Prefix: tc.prefix})
		if err != nil {
			t.Fatal(err)
		}
		if got := s.pairKey("p"); got != tc.want+"pairs/p" {
			t.Errorf("prefix %q: pair key %q", tc.prefix, got)
		}
		if got := s.leaseKey("p"); got != tc.want+"leases/p" {
			t.Errorf("prefix %q: lease key %q", tc.prefix, got)
		}
		s.Close()
	}
}

// TestNewEtcdStoreDown checks that an agent can start while the store is down and is told so
// by its first call, quickly.
func TestNewEtcdStoreDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := newStore(t, []string{"http://" + addr})
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = s.ListPairs(ctx)
	if !errors.Is(err, ErrUnavailable) || time.Since(start) > liveness {
		t.Fatalf("ListPairs against a closed port: %v after %v", err, time.Since(start))
	}
}

func TestStartEmbeddedErrors(t *testing.T) {
	if _, err := StartEmbedded(EmbeddedConfig{}); err == nil {
		t.Fatal("StartEmbedded without a dir succeeded")
	}
	if _, err := StartEmbedded(EmbeddedConfig{Dir: t.TempDir(), ClientURL: "unix:///x"}); err == nil {
		t.Fatal("StartEmbedded with a unix URL succeeded")
	}
	// A port somebody else holds: the error must say which server failed.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dir := filepath.Join(t.TempDir(), "etcd")
	_, err = StartEmbedded(EmbeddedConfig{Dir: dir, ClientURL: "http://" + l.Addr().String()})
	if err == nil || !strings.Contains(err.Error(), dir) {
		t.Fatalf("StartEmbedded on a taken port: %v, want an error naming %s", err, dir)
	}
}

func TestEmbeddedFixedPort(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	url := "http://" + l.Addr().String()
	l.Close()
	e, err := StartEmbedded(EmbeddedConfig{Dir: filepath.Join(t.TempDir(), "etcd"), ClientURL: url})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if got := e.Endpoints(); len(got) != 1 || got[0] != url {
		t.Fatalf("Endpoints = %v, want [%s]", got, url)
	}
	s := newStore(t, e.Endpoints())
	mustCreate(t, s, "p", "v")
	if got, err := s.GetPair(testCtx(t), "p"); err != nil || string(got) != "v" {
		t.Fatalf("GetPair = %q, %v", got, err)
	}
}

func TestZapBridge(t *testing.T) {
	var buf bytes.Buffer
	lg := newZapLogger(slog.New(slog.NewTextHandler(&buf, nil)))
	lg.Info("chatter")
	lg.Warn("more chatter")
	lg.With(zap.String("member", "m1")).Error("disk failed", zap.Int("code", 5))
	out := buf.String()
	if strings.Contains(out, "chatter") {
		t.Errorf("info/warn forwarded: %s", out)
	}
	for _, want := range []string{"level=ERROR", `msg="disk failed"`, "member=m1", "code=5", "component=etcd"} {
		if !strings.Contains(out, want) {
			t.Errorf("log %q lacks %q", out, want)
		}
	}
	if newZapLogger(nil).Core().Enabled(zap.ErrorLevel) {
		t.Error("nil slog logger should give a no-op zap logger")
	}
}

func TestTLSConfig(t *testing.T) {
	dir := t.TempDir()
	pki := testpki.New(t)
	caFile, certFile, keyFile := pki.CA, pki.ClientCert, pki.ClientKey
	junk := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(junk, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}

	cfg, err := TLSConfig("", "", "")
	if cfg != nil || err != nil {
		t.Fatalf("no flags: %v, %v; want nil, nil", cfg, err)
	}
	cfg, err = TLSConfig(certFile, keyFile, caFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Certificates) != 1 || cfg.RootCAs == nil {
		t.Fatalf("config: %d certificates, roots %v", len(cfg.Certificates), cfg.RootCAs)
	}
	leaf, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: cfg.RootCAs, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("client certificate does not verify against the CA pool: %v", err)
	}
	if cfg, err := TLSConfig("", "", caFile); err != nil || cfg.RootCAs == nil || len(cfg.Certificates) != 0 {
		t.Fatalf("CA only: %+v, %v", cfg, err)
	}

	for _, tc := range []struct{ name, cert, key, ca string }{
		{"cert without key", certFile, "", ""},
		{"key without cert", "", keyFile, ""},
		{"missing cert file", filepath.Join(dir, "nope.pem"), keyFile, ""},
		{"key of another file", certFile, caFile, ""},
		{"missing ca", "", "", filepath.Join(dir, "nope.pem")},
		{"ca without pem", "", "", junk},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if cfg, err := TLSConfig(tc.cert, tc.key, tc.ca); err == nil {
				t.Fatalf("TLSConfig = %+v, want an error", cfg)
			}
		})
	}
}
