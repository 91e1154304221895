package checkpoint

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/lockstepvm/lockstep/qmp"
)

// The sequences here split protection between two agents, each driving only its own QEMU: the
// secondary's agent runs PrepareSecondary and IncomingMigration, the primary's agent runs
// StartProtection or Reprotect with ProtectConfig.Secondary nil. QEMU sees the same commands as
// when one process drives both.

// PrepareSecondary readies a secondary started with "-incoming defer" for the primary's
// protection: its features are probed (QEMUVersion then answers from the probe), the COLO
// migration capabilities are set and its replica is exported over NBD on
// g.SecondaryHost:g.Ports.NBD. The migration connection comes afterwards, with
// IncomingMigration.
func PrepareSecondary(s *qmp.Client, g Generation) Sequence {
	var sf *qmp.Features
	steps := []Step{{Name: "secondary: probe QEMU", Timeout: 15 * time.Second, Run: func(ctx context.Context) error {
		var err error
		if sf, err = s.Features(ctx); err != nil {
			return fmt.Errorf("secondary: %w", err)
		}
		if !sf.HasCapability(qmp.CapXColo) {
			return fmt.Errorf("QEMU %s lacks migration capability %s", sf.Version, qmp.CapXColo)
		}
		return nil
	}}}
	steps = append(steps, secondarySteps(s, g, func() *qmp.Features { return sf })...)
	return Sequence{Name: "prepare-secondary", Steps: steps}
}

// secondarySteps are the secondary's part of protection; features returns the secondary's
// probed features once an earlier step has read them.
func secondarySteps(s *qmp.Client, g Generation, features func() *qmp.Features) []Step {
	steps := []Step{
		{Name: "secondary: migrate-set-capabilities", Run: func(ctx context.Context) error {
			return s.MigrateSetCapabilities(ctx, coloCaps(features()))
		}},
	}
	steps = append(steps, secondaryTLSSteps(s, g)...)
	return append(steps, []Step{
		{Name: "secondary: nbd-server-start", Run: func(ctx context.Context) error {
			return nbdServerStart(ctx, s, g)
		}},
		{Name: "secondary: nbd-server-add " + ReplicaNode, Run: func(ctx context.Context) error {
			return s.NBDServerAdd(ctx, ReplicaNode, true)
		}},
	}...)
}

// QEMUVersion returns the version of the QEMU behind c in the form ProtectConfig.SecondaryVersion
// takes ("11.1.3"). After PrepareSecondary it answers from the connection's cached probe,
// without asking QEMU again.
func QEMUVersion(ctx context.Context, c *qmp.Client) (string, error) {
	f, err := c.Features(ctx)
	if err != nil {
		return "", err
	}
	return f.Version.String(), nil
}

// IncomingMigration hands the secondary its end of the migration connection, accepted by its
// agent: getfd under g.MigrationFD(), then "migrate-incoming fd:". QEMU keeps its own copy of
// the descriptor, so the caller closes conn afterwards whatever the outcome.
func IncomingMigration(ctx context.Context, s *qmp.Client, g Generation, conn *os.File) error {
	if err := s.GetFD(ctx, g.MigrationFD(), conn); err != nil {
		return fmt.Errorf("secondary: %w", err)
	}
	if err := tlsNonblocking(g, conn); err != nil {
		return fmt.Errorf("secondary: %w", err)
	}
	if err := s.MigrateIncoming(ctx, "fd:"+g.MigrationFD()); err != nil {
		return fmt.Errorf("secondary: %w", err)
	}
	return nil
}

// SecondaryInColo checks that the secondary reports COLO mode secondary: the secondary's agent
// answers the primary's ConfirmSecondary with it.
func SecondaryInColo(ctx context.Context, s *qmp.Client) error {
	st, err := s.QueryColoStatus(ctx)
	if err != nil {
		return err
	}
	if st.Mode != qmp.ColoModeSecondary {
		return fmt.Errorf("secondary reports COLO mode %q", st.Mode)
	}
	return nil
}

// FailoverAsPrimaryYank is FailoverAsPrimary for a secondary that is lost without its
// connections breaking (a blackholed link, a hung host): the migration, the NBD client of the
// replica and the network channels to the secondary are first cut out of band, then the usual
// steps run, and the sequence ends when the guest runs again.
//
// Why each cut (seen on QEMU 11.1.3 with the secondary SIGSTOPped): the COLO thread waits on
// the migration socket, either for the reply to its next checkpoint request (the guest runs)
// or inside a checkpoint (the guest stopped, query-status "colo"). A guest write waits for the
// replica's NBD reply: without the NBD cut, x-blockdev-change or blockdev-del, which drain the
// quorum, never answered (4 runs of 4), and once even query-status went unanswered before any
// cut, most likely the checkpoint's vm_stop draining the same request with the main loop held.
// filter-mirror writes every packet the guest receives into mirror0 with a blocking write, which
// holds the main loop once that socket's buffer is full (not reached in these runs: the test
// client's traffic is small).
func FailoverAsPrimaryYank(p *qmp.Client, g Generation) Sequence {
	seq := FailoverAsPrimary(p, g)
	yank := Step{Name: "primary: yank migration and channels", Run: func(ctx context.Context) error {
		return yankAll(ctx, p, qmp.YankInstance{Type: "migration"}, qmp.YankInstance{Type: "block-node", NodeName: g.NBDNode()},
			qmp.YankInstance{Type: "chardev", ID: chMirror}, qmp.YankInstance{Type: "chardev", ID: chCompare})
	}}
	// x-colo-lost-heartbeat only requests the failover; a guest that a stuck checkpoint stopped
	// ("colo") is restarted afterwards by QEMU's migration thread (on 11.1.3 it ran again by the
	// time the sequence ended). Waiting for it makes the sequence's end mean "the guest runs".
	// Never cont: a guest that is not running here was stopped by something else (a fence), or
	// is still in COLO's own stop, where cont corrupts its state.
	wait := Step{Name: "primary: wait running", Run: func(ctx context.Context) error {
		return waitRunning(ctx, p)
	}}
	seq.Prepend(yank)
	seq.Append(wait)
	return seq
}

// waitRunning polls query-status until the guest runs.
func waitRunning(ctx context.Context, c *qmp.Client) error {
	var last qmp.RunState
	err := poll(ctx, 10*time.Millisecond, "the guest did not resume after COLO ended", func(ctx context.Context) (bool, error) {
		st, err := c.QueryStatus(ctx)
		switch {
		case err == nil && st.Status == qmp.RunStateRunning:
			return true, nil
		case err == nil:
			last = st.Status
			return false, nil
		case last == "" || ctx.Err() == nil:
			return false, err
		}
		return false, nil
	})
	if err != nil && last != "" {
		return fmt.Errorf("%w (run state %q)", err, last)
	}
	return err
}
