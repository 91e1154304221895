package controller

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
)

func embeddedStore(t *testing.T) (*coord.Embedded, *coord.Etcd) {
	t.Helper()
	emb, err := coord.StartEmbedded(coord.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	return emb, storeAt(t, emb, "")
}

func storeAt(t *testing.T, emb *coord.Embedded, prefix string) *coord.Etcd {
	t.Helper()
	store, err := coord.NewEtcd(coord.EtcdConfig{Endpoints: emb.Endpoints(), Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return store
}

// localPair is a valid pair with both sides on this host whose QEMU (/bin/false) exits at
// once: enough to see where the agent keeps the pair, without QEMU.
func localPair(t *testing.T, name string) PairConfig {
	disk := filepath.Join(t.TempDir(), name+".raw")
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	return PairConfig{
		Spec: checkpoint.Spec{Name: name, MemoryMiB: 128, VCPUs: 1, Machine: "pc", Accel: "tcg", DiskSize: 1 << 20,
			NIC:  checkpoint.NIC{MAC: "52:54:00:12:34:56", Model: "e1000", Backend: "socket"},
			QEMU: []string{"/bin/false"}, QEMUVersion: checkpoint.Version{Major: 11, Minor: 1}},
		Sides: [2]SideConfig{{Host: "127.0.0.1", Disk: disk}, {Host: "127.0.0.1", Disk: disk + ".b"}},
	}
}

func storedPairs(t *testing.T, s coord.Store) map[string]PairConfig {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all, err := s.ListPairs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]PairConfig{}
	for n, b := range all {
		var pc PairConfig
		if err := json.Unmarshal(b, &pc); err != nil {
			t.Fatalf("pair %s in the store: %v", n, err)
		}
		out[n] = pc
	}
	return out
}

func localNames(a *Agent) map[string]bool {
	out := map[string]bool{}
	for _, st := range a.List() {
		if st.Local[0] || st.Local[1] {
			out[st.Name] = true
		}
	}
	return out
}

// The agent keeps the pairs in the store: a pair created is there with both sides placed on
// this host, a name the store has is refused without a folder being made, a new agent on a
// wiped state folder runs the pairs the store lists, a folder-only pair of an earlier agent is
// recorded, and a deleted pair leaves the store and its folder.
func TestAgentKeepsPairsInTheStore(t *testing.T) {
	_, store := embeddedStore(t)
	state := t.TempDir()
	a, err := NewAgent(AgentConfig{Host: "h1", StateDir: state, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(localPair(t, "db1")); err != nil {
		t.Fatal(err)
	}
	got := storedPairs(t, store)
	if pc, ok := got["db1"]; !ok || pc.Sides[0].Agent != "h1" || pc.Sides[1].Agent != "h1" {
		t.Fatalf("store has %+v after create, want db1 placed on h1 twice", got)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := store.CreatePair(ctx, "db2", []byte(`{"spec":{"name":"db2"}}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(localPair(t, "db2")); !errors.Is(err, ErrExists) {
		t.Fatalf("create of a name the store has: %v, want ErrExists", err)
	}
	if _, err := os.Stat(filepath.Join(state, "db2")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("refused create made a folder: %v", err)
	}
	if err := store.DeletePair(ctx, "db2"); err != nil {
		t.Fatal(err)
	}
	a.Close()

	// A wiped state folder, plus a folder-only pair from before the store.
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	legacy := localPair(t, "old1")
	legacy.Spec = legacy.Spec.WithDefaults()
	if err := os.MkdirAll(filepath.Join(state, "old1"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeJSON(filepath.Join(state, "old1", "pair.json"), legacy); err != nil {
		t.Fatal(err)
	}
	a2, err := NewAgent(AgentConfig{Host: "h1", StateDir: state, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	if got := localNames(a2); !got["db1"] || !got["old1"] || len(got) != 2 {
		t.Fatalf("restarted agent runs %v, want db1 (from the store) and old1 (from its folder)", got)
	}
	if pc, ok := storedPairs(t, store)["old1"]; !ok || pc.Sides[0].Agent != "h1" || pc.Sides[1].Agent != "h1" {
		t.Fatalf("old1 not recorded in the store on h1: %+v", pc)
	}
	for _, n := range []string{"db1", "old1"} {
		if err := a2.Delete(n); err != nil {
			t.Fatalf("delete %s: %v", n, err)
		}
		if _, err := os.Stat(filepath.Join(state, n)); !errors.Is(err, os.ErrNotExist) {
			ents, _ := exec.Command("find", filepath.Join(state, n)).CombinedOutput()
			t.Fatalf("deleted pair %s left its folder: %v %s", n, err, ents)
		}
	}
	if got := storedPairs(t, store); len(got) != 0 {
		t.Fatalf("store has %v after the deletes, want nothing", got)
	}
	if _, err := a2.Get("db1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if err := a2.Delete("db1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v, want ErrNotFound", err)
	}
}

// A store written by the earlier layout (the single-host agent's pairs under
// /lockstep/single/<host>/, sides without agents) is moved on the agent's first start: the
// pair is in the common layout, both sides placed on this host, and the old key is gone.
func TestAgentMigratesTheEarlierLayout(t *testing.T) {
	emb, store := embeddedStore(t)
	old := storeAt(t, emb, coord.DefaultPrefix+"single/h1/")
	pc := localPair(t, "db1")
	pc.Spec = pc.Spec.WithDefaults()
	b, _ := json.Marshal(pc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := old.CreatePair(ctx, "db1", b); err != nil {
		t.Fatal(err)
	}
	a, err := NewAgent(AgentConfig{Host: "h1", StateDir: t.TempDir(), Store: store, Legacy: old})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	got, ok := storedPairs(t, store)["db1"]
	if !ok || got.Sides[0].Agent != "h1" || got.Sides[1].Agent != "h1" || got.Sides[0].Disk != pc.Sides[0].Disk {
		t.Fatalf("migrated pair: %+v (found %v)", got, ok)
	}
	if left := storedPairs(t, old); len(left) != 0 {
		t.Fatalf("the earlier layout still has %v", left)
	}
	if !localNames(a)["db1"] {
		t.Fatal("the migrated pair does not run here")
	}
}

// An agent answers for pairs that run on other hosts from the store, refuses what only their
// agents can do, and refuses bad pairs naming the field, all without QEMU.
func TestAgentStoreView(t *testing.T) {
	_, store := embeddedStore(t)
	state := t.TempDir()
	a, err := NewAgent(AgentConfig{Host: "c", PeerAddr: "127.0.0.1:1", StateDir: state, Store: store})
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
		{"not an address", "sides[1].address", func(p *PairConfig) { p.Sides[1].Host = "hostb" }},
		{"relative disk", "sides[1].disk", func(p *PairConfig) { p.Sides[1].Disk = "b.raw" }},
		{"bad spec", "memory", func(p *PairConfig) { p.Spec.MemoryMiB = 1 }},
		{"unknown backend", "sides[0].backend", func(p *PairConfig) { p.Sides[0].Agent, p.Sides[0].Backend = "c", "nope" }},
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
	if st.State != StateStopped || !st.StoreReachable || st.PrimaryHost != "" || st.Local != [2]bool{} {
		t.Fatalf("a pair nobody runs yet: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(state, "db1")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a folder was made for a pair of other hosts: %v", err)
	}
	// Host x takes the lease and records COLO, as its agent would.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	h, err := store.Acquire(ctx, "db1", "x:a", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := json.Marshal(PrimaryRecord{Holder: "x:a", Epoch: h.Epoch, Gen: 3, Colo: true})
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
	if _, err := a.Failover(ctx, "db1", false, ""); !errors.Is(err, ErrWrongState) || !strings.Contains(err.Error(), "x and y") {
		t.Fatalf("failover of another hosts' pair: %v, want ErrWrongState naming x and y", err)
	}
	if err := a.SetParameters(ctx, "db1", checkpoint.Tunables{CheckpointDelay: time.Second}); !errors.Is(err, ErrWrongState) || !strings.Contains(err.Error(), "x and y") {
		t.Fatalf("set on another hosts' pair: %v, want ErrWrongState naming x and y", err)
	}
	if _, err := a.Watch(ctx, "db1"); !errors.Is(err, ErrWrongState) {
		t.Fatalf("watch of another hosts' pair: %v, want ErrWrongState", err)
	}
	for _, err := range []error{a.SetParameters(ctx, "nope", checkpoint.Tunables{CheckpointDelay: time.Second}), a.Reprotect("nope")} {
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("request for an unknown pair: %v, want ErrNotFound", err)
		}
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
}

// A pair whose sides are on two hosts needs an agent that serves the peer link.
func TestAgentRefusesTwoHostsWithoutPeerLink(t *testing.T) {
	_, store := embeddedStore(t)
	a, err := NewAgent(AgentConfig{Host: "h1", StateDir: t.TempDir(), Store: store})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	pc := localPair(t, "db1")
	pc.Sides[1].Agent = "h2"
	if _, err := a.Create(pc); err == nil || !strings.Contains(err.Error(), "--peer-listen") {
		t.Fatalf("create: %v, want a refusal naming --peer-listen", err)
	}
	if got := storedPairs(t, store); len(got) != 0 {
		t.Fatalf("refused pair stored: %v", got)
	}
}
