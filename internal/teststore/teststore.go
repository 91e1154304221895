// Package teststore gives tests a coordination store of their own: an etcd server inside the
// test process, on loopback, its data in the test's temporary folder.
package teststore

import (
	"testing"

	"github.com/lockstepvm/lockstep/coord"
)

// New starts an embedded etcd server for the test and returns a client of it; both stop when
// the test ends.
func New(t testing.TB) *coord.Etcd {
	t.Helper()
	emb, err := coord.StartEmbedded(coord.EmbeddedConfig{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	store, err := coord.NewEtcd(coord.EtcdConfig{Endpoints: emb.Endpoints()})
	if err != nil {
		emb.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close(); emb.Close() })
	return store
}
