package controller

import (
	"errors"
	"path/filepath"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// Encrypted replication: a pair's ReplicationTLS tunable decides whether the channels between
// its two QEMUs run over TLS (checkpoint/tls.go). Each side's QEMU gets a credentials folder in
// its runtime folder with this host's certificate (AgentConfig.PeerTLS), rewritten before every
// protection so that a renewed certificate takes effect at the next one.

// errNoReplicationCert refuses an encrypted protection on an agent without a certificate.
var errNoReplicationCert = errors.New("replication_tls is on, but this agent has no host certificate (--peer-cert, --peer-key, --peer-ca)")

// replicationTLSOn resolves the pair's ReplicationTLS on this agent: by default on when the
// two sides run on two hosts and this agent has a certificate (an agent of a plaintext peer
// link, --insecure, has none, and its pairs' replication stays plaintext too).
func (a *Agent) replicationTLSOn(pc PairConfig) bool {
	m := pc.Spec.Tunables.ReplicationTLS
	if (m == checkpoint.TLSAuto || m == "auto") && a.cfg.PeerTLS == nil {
		return false
	}
	return m.Enabled(pc.Sides[0].Agent != pc.Sides[1].Agent)
}

// replicationTLS prepares side's QEMU for an encrypted generation g of pc, when on (the
// primary's agent decides, replicationTLSOn, and tells the secondary's): it writes the side's
// credentials folder, sets side.TLSDir and fills in this side's part of g.TLS (its folder and
// the peer host's name). primary says which role this side has in g. Without encryption it
// leaves both alone.
func (r *runner) replicationTLS(pc PairConfig, on bool, side *checkpoint.Side, g *checkpoint.Generation, primary bool) error {
	if !on {
		return nil
	}
	p := r.a.cfg.PeerTLS
	if p == nil {
		return errNoReplicationCert
	}
	dir := filepath.Join(r.dir, "tls")
	if err := checkpoint.WriteTLSDir(dir, p.certPEM, p.keyPEM, p.caPEM); err != nil {
		return err
	}
	side.TLSDir = dir
	if g.TLS == nil {
		g.TLS = &checkpoint.GenTLS{}
	}
	peer := pc.Sides[r.side.Other()].Agent
	if primary {
		g.TLS.PrimaryDir, g.TLS.SecondaryName = dir, peer
	} else {
		g.TLS.SecondaryDir, g.TLS.PrimaryName = dir, peer
	}
	return nil
}
