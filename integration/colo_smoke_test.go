package integration

import (
	"context"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/integration/qemuenv"
	"github.com/lockstepvm/lockstep/qmp"
)

// COLO between two diskless-boot QEMUs (no kernel: the firmware idles): the QMP sequences and the
// observer, without a guest.
func TestColoSmokeNoGuest(t *testing.T) {
	q := qemuenv.QEMU11(t)
	e := newPairEnvLAN(t, q, "", "", 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	p := e.launch(ctx, checkpoint.RolePrimary, e.side(0), checkpoint.Ports{})
	g := e.generation()
	s := e.launch(ctx, checkpoint.RoleSecondary, e.side(1), g.Ports)
	obs := checkpoint.NewObserver(e.spec.Tunables.CheckpointDelay)
	link := newMigrationLink(t)
	sub := p.QMP.Subscribe(checkpoint.ObserverEvents...)
	octx, ocancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); obs.Run(octx, sub) }()
	defer func() { ocancel(); <-done; sub.Close(); obs.Close() }()
	cfg := checkpoint.ProtectConfig{
		Spec: e.spec, Gen: g, Primary: p.QMP, Secondary: s.QMP,
		DialMigration:   link.dial(obs.SetMigrationSocket),
		AcceptMigration: link.accept,
		OnResync:        func(off, l int64) { t.Logf("resync %d/%d", off, l) },
	}
	seq := checkpoint.StartProtection(cfg)
	took, err := seq.Run(ctx, e.log, nil)
	if err != nil {
		t.Fatalf("%v\nprimary log: %s\nsecondary log: %s", err, p.LogTail(), s.LogTail())
	}
	t.Logf("protection took %v", took)
	time.Sleep(2 * time.Second)
	st := obs.Stats()
	t.Logf("stats %+v", st)
	if st.Checkpoints < 5 {
		t.Errorf("%d checkpoints in 2 s at 200 ms", st.Checkpoints)
	}
	cs, err := p.QMP.QueryColoStatus(ctx)
	if err != nil || cs.Mode != qmp.ColoModePrimary {
		t.Errorf("primary colo status %+v %v", cs, err)
	}
}
