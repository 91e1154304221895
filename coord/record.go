package coord

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The primary record and the agents' addresses: the two things besides specs and leases that
// the agents of a pair share through the store.
//
// The primary record (<prefix>records/<pair>) is written by the lease holder, under its lease,
// before it releases guest output in a new way (booted, took over, went on without its
// secondary, entered COLO). It survives the lease, so that whoever acquires the lease next learns
// who released output last and how: a secondary takes over only if the record says its primary
// was in COLO with it, and a frozen primary resumes only if the record is still its own.

func (s *Etcd) recordKey(pair string) string { return s.prefix + "records/" + pair }
func (s *Etcd) agentKey(host string) string  { return s.prefix + "agents/" + host }

// Record returns the pair's primary record (nil when none was ever written).
func (s *Etcd) Record(ctx context.Context, pair string) ([]byte, error) {
	if err := checkName("pair", pair); err != nil {
		return nil, err
	}
	resp, err := s.cli.Get(ctx, s.recordKey(pair))
	if err != nil {
		return nil, fail("record "+pair, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, nil
	}
	return resp.Kvs[0].Value, nil
}

// Mark writes the pair's primary record, only while h is still the pair's lease (the lease
// key's CreateRevision is h.Epoch); ErrLeaseLost otherwise.
func (s *Etcd) Mark(ctx context.Context, h Held, record []byte) error {
	if err := checkName("pair", h.Pair); err != nil {
		return err
	}
	lk := s.leaseKey(h.Pair)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(lk), "=", int64(h.Epoch))).
		Then(clientv3.OpPut(s.recordKey(h.Pair), string(record))).
		Commit()
	if err != nil {
		return fail("mark "+h.Pair, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("coord: mark %s at epoch %d: %w", h.Pair, h.Epoch, ErrLeaseLost)
	}
	return nil
}

// RegisterAgent publishes the address at which host's agent serves its peers.
func (s *Etcd) RegisterAgent(ctx context.Context, host, addr string) error {
	if err := checkName("host", host); err != nil {
		return err
	}
	if _, err := s.cli.Put(ctx, s.agentKey(host), addr); err != nil {
		return fail("register agent "+host, err)
	}
	return nil
}

// AgentAddr returns the peer address host's agent registered; ErrNotFound if none.
func (s *Etcd) AgentAddr(ctx context.Context, host string) (string, error) {
	if err := checkName("host", host); err != nil {
		return "", err
	}
	resp, err := s.cli.Get(ctx, s.agentKey(host))
	if err != nil {
		return "", fail("agent "+host, err)
	}
	if len(resp.Kvs) == 0 {
		return "", fmt.Errorf("coord: agent %s has not registered: %w", host, ErrNotFound)
	}
	return string(resp.Kvs[0].Value), nil
}
