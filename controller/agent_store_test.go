package controller

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/coord"
)

func embeddedStore(t *testing.T) *coord.Etcd {
	t.Helper()
	emb, err := coord.StartEmbedded(coord.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emb.Close() })
	store, err := coord.NewEtcd(coord.EtcdConfig{Endpoints: emb.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return store
}

// singleHostPair is a valid pair whose QEMU (/bin/false) exits at once: enough to see where the
// agent keeps the pair, without QEMU.
func singleHostPair(t *testing.T, name string) PairConfig {
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

func storedNames(t *testing.T, s coord.Store) map[string]bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	all, err := s.ListPairs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for n := range all {
		out[n] = true
	}
	return out
}

func agentNames(a *Agent) map[string]bool {
	out := map[string]bool{}
	for _, st := range a.List() {
		out[st.Name] = true
	}
	return out
}

// With a coordination store, the single-host agent keeps the pairs' configurations there: a
// pair created is in the store, a name the store has is refused without a folder being made, a
// new agent on a wiped state folder runs the pairs the store lists, a folder the store lacks
// is recorded in it, and a deleted pair leaves it.
func TestAgentKeepsPairsInTheStore(t *testing.T) {
	store := embeddedStore(t)
	state := t.TempDir()
	a, err := NewAgent(AgentConfig{StateDir: state, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(singleHostPair(t, "db1")); err != nil {
		t.Fatal(err)
	}
	if got := storedNames(t, store); !got["db1"] {
		t.Fatalf("store has %v after create, want db1", got)
	}
	// A pair only the store knows (created by an earlier agent whose folder is gone) is refused.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	other := singleHostPair(t, "db2")
	if err := store.CreatePair(ctx, "db2", []byte(`{"spec":{"name":"db2"}}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Create(other); !errors.Is(err, ErrExists) {
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
	legacy := singleHostPair(t, "old1")
	legacy.Spec = legacy.Spec.WithDefaults()
	if err := os.MkdirAll(filepath.Join(state, "old1"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeJSON(filepath.Join(state, "old1", "pair.json"), legacy); err != nil {
		t.Fatal(err)
	}
	a2, err := NewAgent(AgentConfig{StateDir: state, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	if got := agentNames(a2); !got["db1"] || !got["old1"] || len(got) != 2 {
		t.Fatalf("restarted agent runs %v, want db1 (from the store) and old1 (from its folder)", got)
	}
	if _, err := os.Stat(filepath.Join(state, "db1", "pair.json")); err != nil {
		t.Fatalf("the store's pair got no folder: %v", err)
	}
	if got := storedNames(t, store); !got["old1"] {
		t.Fatalf("store has %v, want old1 recorded from its folder", got)
	}
	for _, n := range []string{"db1", "old1"} {
		if err := a2.Delete(n); err != nil {
			t.Fatalf("delete %s: %v", n, err)
		}
	}
	if got := storedNames(t, store); len(got) != 0 {
		t.Fatalf("store has %v after the deletes, want nothing", got)
	}
	if _, err := a2.Get("db1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
}

// A two-host pair found among a single-host agent's pairs (placed on named hosts) is left alone.
func TestAgentLeavesTwoHostPairsAlone(t *testing.T) {
	store := embeddedStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	two := []byte(`{"spec":{"name":"db9"},"sides":[{"host":"10.0.0.1","disk":"/a","agent":"A"},{"host":"10.0.0.2","disk":"/b","agent":"B"}]}`)
	if err := store.CreatePair(ctx, "db9", two); err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	a, err := NewAgent(AgentConfig{StateDir: state, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if got := agentNames(a); len(got) != 0 {
		t.Fatalf("agent runs %v, want nothing", got)
	}
	if _, err := os.Stat(filepath.Join(state, "db9")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("folder made for a two-host pair: %v", err)
	}
}
