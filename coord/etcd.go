package coord

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// DefaultPrefix is where lockstep keeps its keys when EtcdConfig.Prefix is empty.
const DefaultPrefix = "/lockstep/"

// DefaultDialTimeout bounds connection set-up when EtcdConfig.DialTimeout is zero. It is short
// because an agent that cannot reach the store must learn it quickly, not after etcd's defaults.
const DefaultDialTimeout = 2 * time.Second

// EtcdConfig configures NewEtcd.
type EtcdConfig struct {
	// Endpoints are etcd client URLs, e.g. "http://127.0.0.1:2379".
	Endpoints []string
	// DialTimeout bounds connection set-up (DefaultDialTimeout if zero). The deadline of each
	// call is the caller's ctx.
	DialTimeout time.Duration
	// TLS is used for https endpoints; see TLSConfig.
	TLS *tls.Config
	// Prefix is prepended to every key (DefaultPrefix if empty; a missing trailing '/' is
	// added so that two prefixes cannot overlap by accident).
	Prefix string
	// Log receives this package's own messages and the etcd client's errors (slog.Default() if
	// nil).
	Log *slog.Logger
}

// Etcd is the Store on etcd v3. Keys are <prefix>pairs/<name> for specs and
// <prefix>leases/<name> for leases; a lease key's value is {"holder":...} attached to an etcd
// lease, so that etcd deletes it by itself when its holder stops renewing.
type Etcd struct {
	cli    *clientv3.Client
	prefix string
	log    *slog.Logger

	// ctx is cancelled by Close so that watch goroutines end with the store, not only with
	// their callers' contexts.
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex // guards closed against wg.Add racing with Close's wg.Wait
	closed bool
	wg     sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

var _ Store = (*Etcd)(nil)

// leaseValue is the JSON value of a lease key.
type leaseValue struct {
	Holder string `json:"holder"`
}

// NewEtcd returns a Store on the etcd cluster at cfg.Endpoints. It does not wait for the cluster:
// an agent must be able to start while the store is down and learn that from its calls.
func NewEtcd(cfg EtcdConfig) (*Etcd, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("coord: no etcd endpoints")
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	dial := cfg.DialTimeout
	if dial <= 0 {
		dial = DefaultDialTimeout
	}
	prefix := cfg.Prefix
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: dial,
		TLS:         cfg.TLS,
		// Keepalive pings detect a silently dead connection (a host gone without a RST)
		// within a few seconds, so that watches reconnect elsewhere instead of hanging.
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		Logger:               newZapLogger(log),
	})
	if err != nil {
		return nil, fmt.Errorf("coord: etcd client for %v: %w", cfg.Endpoints, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Etcd{cli: cli, prefix: prefix, log: log, ctx: ctx, cancel: cancel}, nil
}

// Close stops the watch goroutines, waits for them, and closes the client. Leases are left to
// expire (or to be resumed by the next incarnation); Close never releases them.
func (s *Etcd) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.wg.Wait()
		if err := s.cli.Close(); err != nil && !errors.Is(err, context.Canceled) {
			s.closeErr = fmt.Errorf("coord: close etcd client: %w", err)
		}
	})
	return s.closeErr
}

func (s *Etcd) pairKey(name string) string  { return s.prefix + "pairs/" + name }
func (s *Etcd) leaseKey(name string) string { return s.prefix + "leases/" + name }

// checkName rejects names that would make keys ambiguous: "a/b" under pairs/ would look like a
// pair "a" with a suffix to anyone listing by prefix.
func checkName(kind, name string) error {
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("coord: %s %q: %w", kind, name, ErrInvalidName)
	}
	return nil
}

// unreachable tells whether err means the store could not be reached (or did not answer in
// time), as opposed to an answer that was negative.
func unreachable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	if errors.Is(err, context.Canceled) {
		// The caller gave up (or we are closing): that says nothing about the store.
		return false
	}
	if errors.Is(err, rpctypes.ErrTooManyRequests) {
		return true
	}
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code() == codes.Unavailable || ee.Code() == codes.DeadlineExceeded
	}
	if st, ok := status.FromError(err); ok {
		return st.Code() == codes.Unavailable || st.Code() == codes.DeadlineExceeded
	}
	return false
}

// fail wraps an error from etcd, adding ErrUnavailable when it means "cannot reach".
func fail(op string, err error) error {
	if unreachable(err) {
		return fmt.Errorf("coord: %s: %w: %w", op, ErrUnavailable, err)
	}
	return fmt.Errorf("coord: %s: %w", op, err)
}

// CreatePair stores a new pair spec; ErrExists if the name is taken.
func (s *Etcd) CreatePair(ctx context.Context, name string, value []byte) error {
	return s.putPair(ctx, name, value, false)
}

// UpdatePair replaces a pair spec; ErrNotFound if absent.
func (s *Etcd) UpdatePair(ctx context.Context, name string, value []byte) error {
	return s.putPair(ctx, name, value, true)
}

// ModifyPair replaces a pair spec with f of the stored one, in a transaction that fails if
// another writer changed it since it was read (then f runs again on the new value).
func (s *Etcd) ModifyPair(ctx context.Context, name string, f func(old []byte) ([]byte, error)) error {
	if err := checkName("pair", name); err != nil {
		return err
	}
	k := s.pairKey(name)
	op := "modify pair " + name
	for {
		resp, err := s.cli.Get(ctx, k)
		if err != nil {
			return fail(op, err)
		}
		if len(resp.Kvs) == 0 {
			return fmt.Errorf("coord: %s: %w", op, ErrNotFound)
		}
		kv := resp.Kvs[0]
		value, err := f(kv.Value)
		if err != nil {
			return err
		}
		tr, err := s.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(k), "=", kv.ModRevision)).
			Then(clientv3.OpPut(k, string(value))).
			Commit()
		if err != nil {
			return fail(op, err)
		}
		if tr.Succeeded {
			return nil
		}
	}
}

// putPair writes a pair spec in one transaction, only if the pair exists (update) or only if
// it does not (create).
func (s *Etcd) putPair(ctx context.Context, name string, value []byte, update bool) error {
	if err := checkName("pair", name); err != nil {
		return err
	}
	op, cmp, refused := "create pair "+name, "=", ErrExists
	if update {
		op, cmp, refused = "update pair "+name, ">", ErrNotFound
	}
	k := s.pairKey(name)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(k), cmp, 0)).
		Then(clientv3.OpPut(k, string(value))).
		Commit()
	if err != nil {
		return fail(op, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("coord: %s: %w", op, refused)
	}
	return nil
}

// GetPair returns a pair spec; ErrNotFound if absent.
func (s *Etcd) GetPair(ctx context.Context, name string) ([]byte, error) {
	if err := checkName("pair", name); err != nil {
		return nil, err
	}
	resp, err := s.cli.Get(ctx, s.pairKey(name))
	if err != nil {
		return nil, fail("get pair "+name, err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("coord: get pair %s: %w", name, ErrNotFound)
	}
	return resp.Kvs[0].Value, nil
}

// ListPairs returns every pair spec by name.
func (s *Etcd) ListPairs(ctx context.Context) (map[string][]byte, error) {
	resp, err := s.cli.Get(ctx, s.pairKey(""), clientv3.WithPrefix())
	if err != nil {
		return nil, fail("list pairs", err)
	}
	out := make(map[string][]byte, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out[strings.TrimPrefix(string(kv.Key), s.pairKey(""))] = kv.Value
	}
	return out, nil
}

// DeletePair removes a pair spec and its lease key in one transaction; ErrNotFound if absent.
func (s *Etcd) DeletePair(ctx context.Context, name string) error {
	if err := checkName("pair", name); err != nil {
		return err
	}
	pk := s.pairKey(name)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(pk), ">", 0)).
		// The primary record goes too: a new pair of the same name starts with no history.
		Then(clientv3.OpDelete(pk), clientv3.OpDelete(s.leaseKey(name)), clientv3.OpDelete(s.recordKey(name))).
		Commit()
	if err != nil {
		return fail("delete pair "+name, err)
	}
	if !resp.Succeeded {
		return fmt.Errorf("coord: delete pair %s: %w", name, ErrNotFound)
	}
	return nil
}

// HeldError is the error of an Acquire that found the lease taken. It wraps ErrHeld.
type HeldError struct {
	Pair string
	LeaseInfo
}

// Error names the current holder so that logs say who is in the way.
func (e *HeldError) Error() string {
	return fmt.Sprintf("coord: acquire %s: %v by %q at epoch %d", e.Pair, ErrHeld, e.Holder, e.Epoch)
}

// Unwrap lets errors.Is(err, ErrHeld) work.
func (e *HeldError) Unwrap() error { return ErrHeld }

// ttlSeconds rounds ttl up to whole seconds because etcd leases have a resolution of a second;
// rounding down could make a lease expire before the caller's fencing deadline.
func ttlSeconds(ttl time.Duration) int64 {
	return int64((ttl + time.Second - 1) / time.Second)
}

// Acquire takes the pair's primary lease for holder if nobody holds it. The epoch is the lease
// key's CreateRevision. The lease stays valid until at least the moment Acquire was called plus
// the returned Held.TTL.
//
// If the lease is held, the returned Held carries the current holder and epoch with LeaseID 0
// (information, not a lease: Renew of it fails with ErrLeaseLost), and the error is a
// *HeldError wrapping ErrHeld.
func (s *Etcd) Acquire(ctx context.Context, pair, holder string, ttl time.Duration) (Held, error) {
	if err := checkName("pair", pair); err != nil {
		return Held{}, err
	}
	if err := checkName("holder", holder); err != nil {
		return Held{}, err
	}
	if ttl <= 0 {
		return Held{}, fmt.Errorf("coord: acquire %s: ttl %v must be positive", pair, ttl)
	}
	op := "acquire " + pair
	g, err := s.cli.Grant(ctx, ttlSeconds(ttl))
	if err != nil {
		return Held{}, fail(op, err)
	}
	val, err := json.Marshal(leaseValue{Holder: holder})
	if err != nil {
		s.revokeQuietly(ctx, g.ID)
		return Held{}, fmt.Errorf("coord: %s: %w", op, err)
	}
	pk, lk := s.pairKey(pair), s.leaseKey(pair)
	// Requiring the pair key in the same transaction means a lease can never outlive, or
	// precede, its pair: DeletePair removes both atomically.
	resp, err := s.cli.Txn(ctx).
		If(
			clientv3.Compare(clientv3.CreateRevision(pk), ">", 0),
			clientv3.Compare(clientv3.CreateRevision(lk), "=", 0),
		).
		Then(clientv3.OpPut(lk, string(val), clientv3.WithLease(g.ID))).
		Else(clientv3.OpGet(lk), clientv3.OpGet(pk, clientv3.WithCountOnly())).
		Commit()
	if err != nil {
		// The put may or may not have been applied. Revoking the fresh lease undoes it if it
		// was; if the revoke cannot get through either, the key dies with the lease after one
		// TTL since nobody renews it. Either way nobody believes it is primary.
		s.revokeQuietly(ctx, g.ID)
		return Held{}, fail(op, err)
	}
	if resp.Succeeded {
		// A write transaction's header revision is the revision of its writes, hence the
		// key's CreateRevision: no extra read needed.
		h := Held{
			Pair:    pair,
			Holder:  holder,
			Epoch:   uint64(resp.Header.Revision),
			LeaseID: int64(g.ID),
			TTL:     time.Duration(g.TTL) * time.Second,
		}
		s.log.Debug("lease acquired", "pair", pair, "holder", holder, "epoch", h.Epoch, "ttl", h.TTL)
		return h, nil
	}
	s.revokeQuietly(ctx, g.ID)
	if resp.Responses[1].GetResponseRange().GetCount() == 0 {
		return Held{}, fmt.Errorf("coord: %s: %w", op, ErrNotFound)
	}
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	if len(kvs) == 0 {
		// Both compares are evaluated against one revision, so this would be an etcd bug.
		return Held{}, fmt.Errorf("coord: %s: transaction failed but the lease key is absent", op)
	}
	info := leaseInfoOf(kvs[0])
	return Held{Pair: pair, Holder: info.Holder, Epoch: info.Epoch}, &HeldError{Pair: pair, LeaseInfo: info}
}

// leaseInfoOf decodes a lease key. A value that does not decode still names an epoch, which is
// what fencing needs; the holder is then reported as the raw value.
func leaseInfoOf(kv *mvccpb.KeyValue) LeaseInfo {
	var v leaseValue
	if err := json.Unmarshal(kv.Value, &v); err != nil {
		v.Holder = string(kv.Value)
	}
	return LeaseInfo{Holder: v.Holder, Epoch: uint64(kv.CreateRevision)}
}

// revokeQuietly gives back an etcd lease we no longer need. It is best effort: a lease we fail
// to revoke expires by itself after its TTL, and when the caller's ctx has ended we must not
// delay the caller further.
func (s *Etcd) revokeQuietly(ctx context.Context, id clientv3.LeaseID) {
	if ctx.Err() != nil {
		return
	}
	if _, err := s.cli.Revoke(ctx, id); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		s.log.Debug("revoke of unused etcd lease failed; it will expire", "lease", int64(id), "err", err)
	}
}

// renew is Renew returning the TTL etcd granted on refresh.
func (s *Etcd) renew(ctx context.Context, op string, h Held) (int64, error) {
	if h.LeaseID == 0 || h.Epoch == 0 {
		return 0, fmt.Errorf("coord: %s: %w: not a held lease (epoch %d, lease %d)", op, ErrLeaseLost, h.Epoch, h.LeaseID)
	}
	id := clientv3.LeaseID(h.LeaseID)
	// Refresh first, verify second: if the key is still ours after the refresh, it was ours
	// during it, so the refreshed deadline applies to our epoch.
	ka, err := s.cli.KeepAliveOnce(ctx, id)
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return 0, fmt.Errorf("coord: %s: %w: etcd lease %x expired or revoked", op, ErrLeaseLost, h.LeaseID)
		}
		return 0, fail(op, err)
	}
	resp, err := s.cli.Get(ctx, s.leaseKey(h.Pair))
	if err != nil {
		return 0, fail(op, err)
	}
	if len(resp.Kvs) == 0 {
		s.revokeQuietly(ctx, id)
		return 0, fmt.Errorf("coord: %s: %w: lease key gone (epoch %d)", op, ErrLeaseLost, h.Epoch)
	}
	kv := resp.Kvs[0]
	if uint64(kv.CreateRevision) != h.Epoch || kv.Lease != h.LeaseID {
		if kv.Lease != h.LeaseID {
			s.revokeQuietly(ctx, id)
		}
		info := leaseInfoOf(kv)
		return 0, fmt.Errorf("coord: %s: %w: epoch %d is now %q at epoch %d", op, ErrLeaseLost, h.Epoch, info.Holder, info.Epoch)
	}
	if info := leaseInfoOf(kv); info.Holder != h.Holder {
		return 0, fmt.Errorf("coord: %s: %w: epoch %d belongs to %q, not %q", op, ErrLeaseLost, h.Epoch, info.Holder, h.Holder)
	}
	return ka.TTL, nil
}

// Renew refreshes the lease once (a single keepalive, no background goroutine: the caller's
// renew loop is the one place that decides when to fence) and verifies the key still carries
// h's epoch and etcd lease. The lease stays valid until at least the moment Renew was called
// plus h.TTL.
func (s *Etcd) Renew(ctx context.Context, h Held) error {
	_, err := s.renew(ctx, "renew "+h.Pair, h)
	return err
}

// Resume re-attaches to a lease held before a restart: the key must still carry h's epoch,
// etcd lease and holder, and the etcd lease must be alive. It also refreshes the lease, so the
// caller may count a full TTL from the moment Resume was called. The returned Held carries the
// TTL etcd granted.
func (s *Etcd) Resume(ctx context.Context, h Held) (Held, error) {
	if err := checkName("pair", h.Pair); err != nil {
		return Held{}, err
	}
	op := "resume " + h.Pair
	// Check before refreshing so that a Held that is not ours (a wrong holder, an old file)
	// never extends somebody else's lease; renew checks again after the refresh.
	resp, err := s.cli.Get(ctx, s.leaseKey(h.Pair))
	if err != nil {
		return Held{}, fail(op, err)
	}
	if len(resp.Kvs) == 0 {
		return Held{}, fmt.Errorf("coord: %s: %w: lease key gone (epoch %d)", op, ErrLeaseLost, h.Epoch)
	}
	if kv := resp.Kvs[0]; uint64(kv.CreateRevision) != h.Epoch || kv.Lease != h.LeaseID || leaseInfoOf(kv).Holder != h.Holder {
		info := leaseInfoOf(kv)
		return Held{}, fmt.Errorf("coord: %s: %w: %q epoch %d lease %x is now %q at epoch %d lease %x", op, ErrLeaseLost,
			h.Holder, h.Epoch, h.LeaseID, info.Holder, info.Epoch, kv.Lease)
	}
	ttl, err := s.renew(ctx, op, h)
	if err != nil {
		return Held{}, err
	}
	h.TTL = time.Duration(ttl) * time.Second
	return h, nil
}

// Release deletes the lease key only if it still carries h's epoch, so that a late Release can
// never free a successor's lease, then revokes h's etcd lease. Releasing a lease that is already
// gone is no error.
func (s *Etcd) Release(ctx context.Context, h Held) error {
	if h.Epoch == 0 {
		return nil
	}
	if err := checkName("pair", h.Pair); err != nil {
		return err
	}
	op := "release " + h.Pair
	lk := s.leaseKey(h.Pair)
	if _, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(lk), "=", int64(h.Epoch))).
		Then(clientv3.OpDelete(lk)).
		Commit(); err != nil {
		return fail(op, err)
	}
	if h.LeaseID != 0 {
		if _, err := s.cli.Revoke(ctx, clientv3.LeaseID(h.LeaseID)); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return fail(op, err)
		}
	}
	s.log.Debug("lease released", "pair", h.Pair, "holder", h.Holder, "epoch", h.Epoch)
	return nil
}

// Current returns who holds the pair's lease now (Epoch 0 when free).
func (s *Etcd) Current(ctx context.Context, pair string) (LeaseInfo, error) {
	if err := checkName("pair", pair); err != nil {
		return LeaseInfo{}, err
	}
	resp, err := s.cli.Get(ctx, s.leaseKey(pair))
	if err != nil {
		return LeaseInfo{}, fail("current lease of "+pair, err)
	}
	if len(resp.Kvs) == 0 {
		return LeaseInfo{}, nil
	}
	return leaseInfoOf(resp.Kvs[0]), nil
}
