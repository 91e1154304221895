package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/lockstepvm/lockstep/coord"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// TestMain lets the test binary stand in for lockstepd when lockstepd starts its fence keeper
// (os.Executable is the test binary here).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "fence-keeper" {
		os.Exit(runFenceKeeper(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// killKeeper kills, at the test's end, the fence keeper lockstepd started for stateDir (by the
// PID it wrote).
func killKeeper(t *testing.T, stateDir string) {
	t.Cleanup(func() {
		b, err := os.ReadFile(filepath.Join(stateDir, "_fence.pid"))
		if err != nil {
			return
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err == nil && pid > 0 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
}

func TestBadUsage(t *testing.T) {
	dir := t.TempDir()
	badConfig := filepath.Join(dir, "bad.yaml")
	os.WriteFile(badConfig, []byte("no-such-setting: 1\n"), 0o600)
	tests := []struct {
		name string
		args []string
	}{
		{"tcp without tls", []string{"--state-dir", dir, "--listen", "tcp://127.0.0.1:0"}},
		{"half of tls", []string{"--state-dir", dir, "--listen", "tcp://127.0.0.1:0", "--tls-cert", "x.pem"}},
		{"bad listen", []string{"--state-dir", dir, "--listen", "http://x"}},
		{"bad log format", []string{"--state-dir", dir, "--log-format", "xml"}},
		{"bad log level", []string{"--state-dir", dir, "--log-level", "loud"}},
		{"unknown flag", []string{"--frobnicate"}},
		{"stray argument", []string{"now"}},
		{"pprof without metrics", []string{"--state-dir", dir, "--pprof"}},
		{"unknown config key", []string{"--config", badConfig}},
		{"missing config", []string{"--config", filepath.Join(dir, "none.yaml")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if code := run(tc.args); code != 2 {
				t.Fatalf("exit %d, want 2", code)
			}
		})
	}
	if code := run([]string{"--help"}); code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
}

// The agent serves on a 0600 unix socket with gRPC health, takes settings from a config file,
// and stops on SIGTERM.
func TestServeAndStop(t *testing.T) {
	dir, err := os.MkdirTemp("", "lsd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	killKeeper(t, filepath.Join(dir, "state"))
	sock := filepath.Join(dir, "api.sock")
	cfg := filepath.Join(dir, "lockstepd.yaml")
	os.WriteFile(cfg, []byte("state-dir: "+filepath.Join(dir, "state")+"\noverlay-dir: "+filepath.Join(dir, "ovl")+"\nlog-format: json\n"), 0o600)
	done := make(chan int, 1)
	go func() { done <- run([]string{"--config", cfg, "--listen", "unix://" + sock}) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lockstepd did not listen")
		}
		time.Sleep(10 * time.Millisecond)
	}
	st, err := os.Stat(sock)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v %v, want 0600", st.Mode().Perm(), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state")); err != nil {
		t.Fatalf("the config file's state-dir was not used: %v", err)
	}
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hr, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: "lockstep.v1.PairService"})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", hr, err)
	}
	// A second agent on the same socket is refused.
	if code := run([]string{"--state-dir", filepath.Join(dir, "s2"), "--listen", "unix://" + sock}); code != 2 {
		t.Fatalf("second agent: exit %d", code)
	}
	stopBySIGTERM(t, done)
}

// A single-host agent that shares the store with two-host pairs (as the agent inside the
// store's own host does) never takes one of them for its own: it would boot the VM on another
// host's disk. Its pairs live under its own prefix.
func TestSingleHostIgnoresTwoHostPairs(t *testing.T) {
	dir := t.TempDir()
	killKeeper(t, filepath.Join(dir, "state"))
	emb, err := coord.StartEmbedded(coord.EmbeddedConfig{Dir: filepath.Join(dir, "etcd")})
	if err != nil {
		t.Fatal(err)
	}
	defer emb.Close()
	cluster, err := coord.NewEtcd(coord.EtcdConfig{Endpoints: emb.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer cluster.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	twoHost := []byte(`{"spec":{"name":"db1","memory_mib":128},"sides":[{"host":"10.0.0.1","disk":"/a/disk.raw","agent":"A"},{"host":"10.0.0.2","disk":"/b/disk.raw","agent":"B"}]}`)
	if err := cluster.CreatePair(ctx, "db1", twoHost); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "api.sock")
	guard := make(chan os.Signal, 1)
	signal.Notify(guard, syscall.SIGTERM)
	defer signal.Stop(guard)
	done := make(chan int, 1)
	go func() {
		done <- run([]string{"--state-dir", filepath.Join(dir, "state"), "--overlay-dir", filepath.Join(dir, "ovl"),
			"--listen", "unix://" + sock, "--host", "h1", "--etcd-endpoints", strings.Join(emb.Endpoints(), ",")})
	}()
	conn, err := grpc.NewClient("unix:"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var list *pb.ListPairsResponse
	for deadline := time.Now().Add(10 * time.Second); ; {
		list, err = pb.NewPairServiceClient(conn).ListPairs(ctx, &pb.ListPairsRequest{})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("list: %v", err)
	}
	if n := len(list.GetPairs()); n != 1 || list.GetPairs()[0].GetStatus().GetState() != pb.PairState_PAIR_STATE_STOPPED {
		t.Errorf("the agent lists %v, want db1 as the store tells it (stopped: nobody runs it yet)", list.GetPairs())
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "db1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the agent of h1 made a folder for a pair of hosts A and B: %v", err)
	}
	stopBySIGTERM(t, done)
}

// stopBySIGTERM stops the in-process agent whose run() result arrives on done, and checks that
// it exits 0.
func stopBySIGTERM(t *testing.T, done <-chan int) {
	t.Helper()
	syscall.Kill(os.Getpid(), syscall.SIGTERM)
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("exit %d after SIGTERM", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("lockstepd did not stop on SIGTERM")
	}
}
