package main

import (
	"context"
	"flag"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/lockstepvm/lockstep/internal/pki"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// hostPKI writes a CA and host certificates (on 127.0.0.1) for names into a temporary folder;
// it returns the folder (NAME.pem, NAME.key, ca.pem).
func hostPKI(t *testing.T, names ...string) string {
	t.Helper()
	dir := t.TempDir()
	ca, _, err := pki.NewCA("lockstep test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), ca.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, n := range names {
		l, err := ca.IssueHost(n, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, n+".pem"), l.CertPEM, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, n+".key"), l.KeyPEM, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	op, err := ca.IssueClient("operator", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "operator.pem"), op.CertPEM, 0o600)
	os.WriteFile(filepath.Join(dir, "operator.key"), op.KeyPEM, 0o600)
	return dir
}

// The peer link and the store refuse plaintext on addresses other hosts reach unless
// --insecure, and bad peer certificates are refused at start: exit code 2, a message naming
// the flag, nothing started.
func TestPeerAndStoreFlagErrors(t *testing.T) {
	checkLeaks(t)
	p := newTestPKI(t)
	h := hostPKI(t, "a")
	dir := t.TempDir()
	killKeeper(t, filepath.Join(dir, "state"))
	base := []string{"--state-dir", filepath.Join(dir, "state"), "--overlay-dir", filepath.Join(dir, "ovl"), "--listen", "unix://" + filepath.Join(dir, "api.sock")}
	hostTLS := []string{"--peer-cert", filepath.Join(h, "a.pem"), "--peer-key", filepath.Join(h, "a.key"), "--peer-ca", filepath.Join(h, "ca.pem")}
	tests := []struct {
		name    string
		args    []string
		want    []string
		notWant string
	}{
		{"plaintext peer link on a network address", []string{"--peer-listen", "192.0.2.1:7444"}, []string{"--peer-listen 192.0.2.1:7444", "mutual TLS", "--insecure"}, ""},
		{"plaintext etcd server on a network address", []string{"--etcd-serve", "http://192.0.2.1:2379"}, []string{"--etcd-serve http://192.0.2.1:2379", "--insecure"}, ""},
		{"plaintext etcd endpoint on a network address", []string{"--etcd-endpoints", "https://192.0.2.2:2379,http://192.0.2.1:2379"}, []string{"--etcd-endpoints http://192.0.2.1:2379", "--insecure"}, ""},
		{"https etcd server without certificates", []string{"--etcd-serve", "https://127.0.0.1:0"}, []string{"https needs --etcd-cert, --etcd-key", "--etcd-ca"}, ""},
		{"peer certificate without key and CA", []string{"--peer-cert", filepath.Join(h, "a.pem")}, []string{"--peer-cert, --peer-key, --peer-ca", "together"}, ""},
		{"peer certificate naming no host", []string{"--peer-cert", filepath.Join(h, "operator.pem"), "--peer-key", filepath.Join(h, "operator.key"), "--peer-ca", filepath.Join(h, "ca.pem")}, []string{"--peer-cert", "names no host"}, ""},
		{"peer certificate of another CA", append(hostTLS[:4:4], "--peer-ca", p.CA), []string{"--peer-cert", "not valid against the peer CA"}, ""},
		{"API certificate reused for the peer link, not a host's", []string{"--peer-listen", "127.0.0.1:0", "--tls-cert", p.ServerCert, "--tls-key", p.ServerKey, "--tls-ca", p.CA},
			[]string{"--tls-cert, --tls-key, --tls-ca (used for the peer link", "names no host"}, ""},
		{"--insecure lets a plaintext peer link through", []string{"--insecure", "--peer-listen", "192.0.2.1:7444"}, []string{"--peer-listen 192.0.2.1:7444"}, "mutual TLS"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, stderr := runStderr(t, append(append([]string{}, base...), tc.args...)...)
			if code != 2 {
				t.Errorf("exit %d, want 2; stderr: %s", code, stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr %q lacks %q", stderr, w)
				}
			}
			if tc.notWant != "" && strings.Contains(stderr, tc.notWant) {
				t.Errorf("stderr %q says %q", stderr, tc.notWant)
			}
		})
	}
}

// lockstepd with a host certificate serves the API and the peer link over mutual TLS (the
// peer link reusing --tls-*): a peer without a certificate and a plaintext one are refused and
// counted in the metrics; another host's valid certificate gets through the handshake and is
// then asked for a pair this host does not run.
func TestPeerListenMutualTLS(t *testing.T) {
	checkLeaks(t)
	h := hostPKI(t, "a", "c")
	peerAddr, metricsAddr := freePort(t), freePort(t)
	op := clientTLS(t, filepath.Join(h, "ca.pem"), filepath.Join(h, "operator.pem"), filepath.Join(h, "operator.key"))
	startTCPAgent(t, func(addr string) error { return call(addr, op) },
		"--tls-cert", filepath.Join(h, "a.pem"), "--tls-key", filepath.Join(h, "a.key"), "--tls-ca", filepath.Join(h, "ca.pem"),
		"--host", "a", "--peer-listen", peerAddr, "--metrics-listen", metricsAddr)

	handOver := func(creds credentials.TransportCredentials) error {
		conn, err := grpc.NewClient("passthrough:///"+peerAddr, grpc.WithTransportCredentials(creds))
		if err != nil {
			return err
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = pb.NewPeerServiceClient(conn).HandOver(ctx, &pb.HandOverRequest{PairName: "db1", Epoch: 1, Reason: pb.HandOverReason_HAND_OVER_REASON_FORCED})
		return err
	}
	for _, tc := range []struct {
		name  string
		creds credentials.TransportCredentials
		want  codes.Code
	}{
		{"no certificate", clientTLS(t, filepath.Join(h, "ca.pem"), "", ""), codes.Unavailable},
		{"plaintext", insecure.NewCredentials(), codes.Unavailable},
		{"operator certificate (names no host)", op, codes.Unavailable},
		{"host c's certificate", clientTLS(t, filepath.Join(h, "ca.pem"), filepath.Join(h, "c.pem"), filepath.Join(h, "c.key")), codes.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := handOver(tc.creds); status.Code(err) != tc.want {
				t.Fatalf("HandOver: %v, want %v", err, tc.want)
			}
		})
	}
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	page, _ := io.ReadAll(resp.Body)
	m := regexp.MustCompile(`lockstep_peer_auth_failures_total\{reason="handshake"\} (\d+)`).FindSubmatch(page)
	if m == nil {
		t.Fatalf("no handshake refusals in the metrics:\n%s", page)
	}
	if n, _ := strconv.Atoi(string(m[1])); n < 3 {
		t.Fatalf("%d refused handshakes counted, want at least 3", n)
	}
}

// The config file takes the two-host and TLS settings too; the command line wins.
func TestConfigFileTwoHostKeys(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "lockstepd.yaml")
	yaml := "host: hosta\npeer-listen: 10.0.0.1:7444\npeer-cert: /p/a.pem\npeer-key: /p/a.key\npeer-ca: /p/ca.pem\n" +
		"etcd-endpoints: https://10.0.0.9:2379\netcd-cert: /p/a.pem\netcd-key: /p/a.key\netcd-ca: /p/ca.pem\n" +
		"etcd-serve: https://10.0.0.9:2379\nheartbeat-interval: 200ms\nheartbeat-timeout: 1s\nlease-ttl: 2s\n"
	if err := os.WriteFile(path, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := flag.NewFlagSet("lockstepd", flag.ContinueOnError)
	var cfg config
	fs.StringVar(&cfg.Host, "host", "", "")
	if err := fs.Parse([]string{"--host", "fromflag"}); err != nil {
		t.Fatal(err)
	}
	if err := loadConfig(path, &cfg, fs); err != nil {
		t.Fatal(err)
	}
	want := config{Host: "fromflag", PeerListen: "10.0.0.1:7444", PeerCert: "/p/a.pem", PeerKey: "/p/a.key", PeerCA: "/p/ca.pem",
		EtcdEndpoints: "https://10.0.0.9:2379", EtcdCert: "/p/a.pem", EtcdKey: "/p/a.key", EtcdCA: "/p/ca.pem", EtcdServe: "https://10.0.0.9:2379",
		HeartbeatInterval: 200 * time.Millisecond, HeartbeatTimeout: time.Second, LeaseTTL: 2 * time.Second}
	if cfg != want {
		t.Fatalf("config %+v\nwant %+v", cfg, want)
	}
}
