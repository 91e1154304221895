package controller

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// A ClusterAgent answers for pairs that run on other hosts from the store, refuses what only
// their agents can do, and refuses bad pairs, all without QEMU.
func TestClusterAgentStoreView(t *testing.T) {
	store := embeddedStore(t)
	a, err := NewClusterAgent(ClusterConfig{Host: "c", PeerAddr: "127.0.0.1:1", StateDir: t.TempDir(), Store: store})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)

	pc := PairConfig{
		Spec: checkpoint.Spec{Name: "db1", MemoryMiB: 128, VCPUs: 1, Machine: "pc", Accel: "tcg", DiskSize: 1 << 20,
			NIC:  checkpoint.NIC{MAC: "52:54:00:12:34:56", Model: "e1000", Backend: "tap", Tap: "vm0"},
			QEMU: []string{"qemu-system-x86_64"}, QEMUVersion: checkpoint.Version{Major: 11, Minor: 1}},
		Sides: [2]SideConfig{{Agent: "x", Host: "10.0.0.1", Disk: "/d/a.raw"}, {Agent: "y", Host: "10.0.0.2", Disk: "/d/b.raw"}},
	}
	for _, tc := range []struct {
		name, field string
		mod         func(*PairConfig)
	}{
		{"no agent", "sides[0].host", func(p *PairConfig) { p.Sides[0].Agent = "" }},
		{"not an address", "sides[1].address", func(p *PairConfig) { p.Sides[1].Host = "hostb" }},
		{"relative disk", "sides[1].disk", func(p *PairConfig) { p.Sides[1].Disk = "b.raw" }},
		{"one host", "sides[1].host", func(p *PairConfig) { p.Sides[1].Agent = "x" }},
		{"bad spec", "memory", func(p *PairConfig) { p.Spec.MemoryMiB = 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := pc
			tc.mod(&bad)
			_, err := a.Create(bad)
			var fe *checkpoint.FieldError
			if !errors.As(err, &fe) || !strings.Contains(err.Error(), tc.field) {
				t.Fatalf("create: %v, want a field error naming %s", err, tc.field)
			}
		})
	}
	if got := a.List(); len(got) != 0 {
		t.Fatalf("refused pairs were stored: %+v", got)
	}

	if _, err := a.Create(pc); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(pc); !errors.Is(err, ErrExists) {
		t.Fatalf("second create: %v, want ErrExists", err)
	}
	st, err := a.Get("db1")
	if err != nil {
		t.Fatal(err)
	}
	if st.State != StateStopped || !st.StoreReachable || st.PrimaryHost != "" {
		t.Fatalf("a pair nobody runs yet: %+v", st)
	}
	// Host x takes the lease and records COLO, as its agent would.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := store.Acquire(ctx, "db1", "x", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(PrimaryRecord{Holder: "x", Epoch: h.Epoch, Gen: 3, Colo: true})
	if err := store.Mark(ctx, h, rec); err != nil {
		t.Fatal(err)
	}
	st, err = a.Get("db1")
	if err != nil {
		t.Fatal(err)
	}
	if st.State != StateProtected || st.PrimaryHost != "x" || st.SecondaryHost != "y" || st.Epoch != h.Epoch || st.Generation != 3 {
		t.Fatalf("store view of a protected pair: %+v (epoch %d)", st, h.Epoch)
	}
	if l := a.List(); len(l) != 1 || l[0].Name != "db1" || l[0].PrimaryHost != "x" {
		t.Fatalf("list: %+v", l)
	}
	if err := a.Failover("db1", false); !errors.Is(err, ErrWrongState) || !strings.Contains(err.Error(), "x and y") {
		t.Fatalf("failover of another hosts' pair: %v, want ErrWrongState naming x and y", err)
	}
	if err := a.SetParameters(ctx, "db1", checkpoint.Tunables{CheckpointDelay: time.Second}); !errors.Is(err, ErrWrongState) || !strings.Contains(err.Error(), "x and y") {
		t.Fatalf("set on another hosts' pair: %v, want ErrWrongState naming x and y", err)
	}
	if err := a.SetParameters(ctx, "nope", checkpoint.Tunables{CheckpointDelay: time.Second}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("set on an unknown pair: %v, want ErrNotFound", err)
	}
	if _, err := a.Get("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown pair: %v, want ErrNotFound", err)
	}
	if err := a.Delete("db1"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Get("db1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted pair: %v, want ErrNotFound", err)
	}
	if b, err := store.Record(ctx, "db1"); err != nil || b != nil {
		t.Fatalf("the primary record outlived its pair: %q, %v", b, err)
	}
	if err := a.Delete("db1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v, want ErrNotFound", err)
	}
}

// primaryGone tells a closed migration connection (the primary's process died) from an open
// one (a hung or unreachable primary, which needs the yank).
func TestPreparedPrimaryGone(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	var p prepared
	if p.primaryGone() {
		t.Fatal("no connection accepted yet counts as gone")
	}
	f, err := server.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p.mig.Store(f)
	if p.primaryGone() {
		t.Fatal("an open connection counts as gone")
	}
	client.Close()
	deadline := time.Now().Add(2 * time.Second)
	for !p.primaryGone() {
		if time.Now().After(deadline) {
			t.Fatal("a connection closed by the primary's side still counts as open")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
