package controller

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// PeerLink carries the messages between the two sides of a pair: heartbeats, the request for
// a secondary, its tear-down, and a hand-over. Between hosts it is gRPC (PeerService); when both
// sides run in this agent it is a function call, so the same runner code runs both ways.
type PeerLink interface {
	// Heartbeat sends this side's view to the peer and returns the peer's (with its
	// confirmation, if it gives one).
	Heartbeat(ctx context.Context, pair string, v PeerView) (PeerView, error)
	// Prepare asks the peer for a secondary and returns once it waits for the migration stream.
	Prepare(ctx context.Context, a PrepareArgs) (PrepareResult, error)
	// TearDown asks the peer to drop its secondary of generation gen.
	TearDown(ctx context.Context, pair string, epoch uint64, gen int, reason string) error
	// HandOver asks the peer to take over at once.
	HandOver(ctx context.Context, pair string, epoch uint64, kind HandOverKind, why string) error
}

// PrepareArgs is a primary's request for a secondary of generation Gen.
type PrepareArgs struct {
	Pair  string
	Epoch uint64
	Gen   int
	// Config is the pair as the primary's agent runs it (its tunables may be newer than the
	// store's copy the peer has).
	Config PairConfig
	// PrimaryHost names the primary's agent; PrimaryAddress is where the primary's QEMU
	// listens for the secondary's mirror and compare channels (MirrorPort, ComparePort).
	PrimaryHost, PrimaryAddress string
	PrimaryQEMUVersion          string
	MirrorPort, ComparePort     int
	// TLS: the generation's replication channels are encrypted (the primary's decision).
	TLS bool
}

// PrepareResult says where the prepared secondary waits.
type PrepareResult struct {
	SecondaryAddress     string
	SecondaryQEMUVersion string
	MigrationPort        int
	NBDPort              int
}

// localLink is the peer link to the other side of a pair that runs in this agent too.
type localLink struct {
	a    *Agent
	side Side // the peer's side
}

func (l localLink) peer(pair string) (*runner, error) {
	return l.a.runnerOf(pair, l.side)
}

func (l localLink) Heartbeat(ctx context.Context, pair string, v PeerView) (PeerView, error) {
	r, err := l.peer(pair)
	if err != nil {
		return PeerView{}, err
	}
	return r.peerHeartbeat(ctx, v)
}

func (l localLink) Prepare(ctx context.Context, a PrepareArgs) (PrepareResult, error) {
	r, err := l.peer(a.Pair)
	if err != nil {
		return PrepareResult{}, err
	}
	return r.peerPrepare(ctx, a)
}

func (l localLink) TearDown(ctx context.Context, pair string, epoch uint64, gen int, reason string) error {
	r, err := l.peer(pair)
	if err != nil {
		return err
	}
	return r.peerTearDown(ctx, epoch, gen)
}

func (l localLink) HandOver(ctx context.Context, pair string, epoch uint64, kind HandOverKind, why string) error {
	r, err := l.peer(pair)
	if err != nil {
		return err
	}
	return r.peerHandOver(ctx, epoch, kind, why)
}

// grpcLinks dials the peer agents of other hosts, found through the store, and keeps one
// connection per host.
type grpcLinks struct {
	self  string
	store Store
	creds credentials.TransportCredentials

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newGRPCLinks(self string, st Store, creds credentials.TransportCredentials) *grpcLinks {
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	return &grpcLinks{self: self, store: st, creds: creds, conns: map[string]*grpc.ClientConn{}}
}

func (g *grpcLinks) client(ctx context.Context, host string) (pb.PeerServiceClient, error) {
	g.mu.Lock()
	c, ok := g.conns[host]
	g.mu.Unlock()
	if !ok {
		addr, err := g.store.AgentAddr(ctx, host)
		if err != nil {
			return nil, fmt.Errorf("peer agent %s: %w", host, err)
		}
		// The authority is the host's name: the peer's certificate must name it (peerauth.go).
		nc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(g.creds), grpc.WithAuthority(host))
		if err != nil {
			return nil, fmt.Errorf("peer agent %s at %s: %w", host, addr, err)
		}
		g.mu.Lock()
		if old, ok := g.conns[host]; ok {
			nc.Close()
			c = old
		} else {
			g.conns[host] = nc
			c = nc
		}
		g.mu.Unlock()
	}
	return pb.NewPeerServiceClient(c), nil
}

func (g *grpcLinks) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	for h, c := range g.conns {
		c.Close()
		delete(g.conns, h)
	}
}

// to returns the link to host's agent.
func (g *grpcLinks) to(host string) PeerLink { return remoteLink{g: g, host: host} }

type remoteLink struct {
	g    *grpcLinks
	host string
}

func (l remoteLink) Heartbeat(ctx context.Context, pair string, v PeerView) (PeerView, error) {
	c, err := l.g.client(ctx, l.host)
	if err != nil {
		return PeerView{}, err
	}
	resp, err := c.Heartbeat(ctx, &pb.HeartbeatRequest{PairName: pair, Epoch: v.Epoch, Sender: viewToProto(l.g.self, v), SendTime: timestamppb.Now()})
	if err != nil {
		return PeerView{}, err
	}
	pv := viewFromProto(resp.GetReceiver(), resp.GetEpoch())
	pv.Confirm = resp.GetStoreDownConfirmation()
	return pv, nil
}

func (l remoteLink) Prepare(ctx context.Context, a PrepareArgs) (PrepareResult, error) {
	c, err := l.g.client(ctx, l.host)
	if err != nil {
		return PrepareResult{}, err
	}
	resp, err := c.PrepareSecondary(ctx, &pb.PrepareSecondaryRequest{
		PairName: a.Pair, Epoch: a.Epoch, Generation: uint64(a.Gen), Spec: PairSpecToProto(a.Config), PrimaryHost: a.PrimaryHost,
		PrimaryAddress: a.PrimaryAddress, PrimaryQemuVersion: a.PrimaryQEMUVersion, ResyncDisk: true, ReplicationTls: a.TLS,
		Ports: &pb.ProtectionPorts{Mirror: uint32(a.MirrorPort), Compare: uint32(a.ComparePort)},
	})
	if err != nil {
		return PrepareResult{}, err
	}
	return PrepareResult{SecondaryAddress: resp.GetSecondaryAddress(), SecondaryQEMUVersion: resp.GetSecondaryQemuVersion(),
		MigrationPort: int(resp.GetPorts().GetMigration()), NBDPort: int(resp.GetPorts().GetNbd())}, nil
}

func (l remoteLink) TearDown(ctx context.Context, pair string, epoch uint64, gen int, reason string) error {
	c, err := l.g.client(ctx, l.host)
	if err != nil {
		return err
	}
	_, err = c.TearDownSecondary(ctx, &pb.TearDownSecondaryRequest{PairName: pair, Epoch: epoch, Generation: uint64(gen), Reason: reason})
	return err
}

var handOverToProto = map[HandOverKind]pb.HandOverReason{
	HandOverFailed: pb.HandOverReason_HAND_OVER_REASON_PRIMARY_FAILED, HandOverPlanned: pb.HandOverReason_HAND_OVER_REASON_PLANNED,
	HandOverForced: pb.HandOverReason_HAND_OVER_REASON_FORCED,
}

func (l remoteLink) HandOver(ctx context.Context, pair string, epoch uint64, kind HandOverKind, why string) error {
	c, err := l.g.client(ctx, l.host)
	if err != nil {
		return err
	}
	_, err = c.HandOver(ctx, &pb.HandOverRequest{PairName: pair, Epoch: epoch, Reason: handOverToProto[kind], Detail: why})
	return err
}

func viewToProto(host string, v PeerView) *pb.PeerSideState {
	role := pb.Role_ROLE_NONE
	switch {
	case runsVM(v.Role):
		role = pb.Role_ROLE_PRIMARY
	case v.Role == RoleJoining || v.Role == RoleSecondary:
		role = pb.Role_ROLE_SECONDARY
	}
	return &pb.PeerSideState{Host: host, Role: role, StoreReachable: v.StoreOK, Generation: uint64(v.Gen),
		PolicyRole: string(v.Role), Fenced: v.Fenced, Colo: v.Colo}
}

func viewFromProto(s *pb.PeerSideState, epoch uint64) PeerView {
	return PeerView{Role: Role(s.GetPolicyRole()), Epoch: epoch, Gen: int(s.GetGeneration()), Colo: s.GetColo(),
		Fenced: s.GetFenced(), StoreOK: s.GetStoreReachable()}
}

// PeerServer is the gRPC adapter of PeerService over an Agent: the agent of a pair's other
// host calls it. Requests are events of the receiving side's policy; one with a stale fencing
// epoch is refused with FailedPrecondition and a StaleEpoch detail, and changes nothing.
type PeerServer struct {
	pb.UnimplementedPeerServiceServer
	Agent *Agent
}

// target is the runner of this host's side of pair, for a request from the agent of the host
// its certificate names (peerauth.go), which must be declared's when the request names one.
func (s *PeerServer) target(ctx context.Context, pair, declared string) (*runner, error) {
	sender, err := s.Agent.peerSender(ctx, pair, declared)
	if err != nil {
		return nil, err
	}
	r, err := s.Agent.remoteTarget(pair, sender)
	if err != nil {
		return nil, toGRPC(err)
	}
	return r, nil
}

func (s *PeerServer) refuse(r *runner, reqEpoch uint64, err error) error {
	if errors.Is(err, ErrStaleEpoch) {
		st := status.New(codes.FailedPrecondition, err.Error())
		if d, derr := st.WithDetails(&pb.StaleEpoch{RequestEpoch: reqEpoch, CurrentEpoch: r.epoch()}); derr == nil {
			return d.Err()
		}
		return st.Err()
	}
	return toGRPC(err)
}

// Heartbeat exchanges the two sides' views of a pair.
func (s *PeerServer) Heartbeat(ctx context.Context, req *pb.HeartbeatRequest) (*pb.HeartbeatResponse, error) {
	r, err := s.target(ctx, req.GetPairName(), req.GetSender().GetHost())
	if err != nil {
		return nil, err
	}
	v, err := r.peerHeartbeat(ctx, viewFromProto(req.GetSender(), req.GetEpoch()))
	if err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	return &pb.HeartbeatResponse{Epoch: v.Epoch, Receiver: viewToProto(s.Agent.cfg.Host, v), StoreDownConfirmation: v.Confirm}, nil
}

// PrepareSecondary starts a secondary for the sender's primary and returns once it waits for
// the migration stream.
func (s *PeerServer) PrepareSecondary(ctx context.Context, req *pb.PrepareSecondaryRequest) (*pb.PrepareSecondaryResponse, error) {
	if req.GetGeneration() == 0 || req.GetPorts().GetMirror() == 0 || req.GetPorts().GetCompare() == 0 || req.GetPrimaryAddress() == "" {
		return nil, status.Error(codes.InvalidArgument, "generation, primary_address, ports.mirror and ports.compare are required")
	}
	r, err := s.target(ctx, req.GetPairName(), req.GetPrimaryHost())
	if err != nil {
		return nil, err
	}
	pc, err := PairConfigFromProto(req.GetSpec())
	if err != nil {
		return nil, toGRPC(err)
	}
	res, err := r.peerPrepare(ctx, PrepareArgs{Pair: req.GetPairName(), Epoch: req.GetEpoch(), Gen: int(req.GetGeneration()), Config: pc,
		PrimaryHost: req.GetPrimaryHost(), PrimaryAddress: req.GetPrimaryAddress(), PrimaryQEMUVersion: req.GetPrimaryQemuVersion(),
		MirrorPort: int(req.GetPorts().GetMirror()), ComparePort: int(req.GetPorts().GetCompare()), TLS: req.GetReplicationTls()})
	if err != nil {
		if errors.Is(err, ErrStaleEpoch) || errors.Is(err, ErrWrongState) {
			return nil, s.refuse(r, req.GetEpoch(), err)
		}
		return nil, status.Error(codes.Aborted, "preparing the secondary: "+err.Error())
	}
	return &pb.PrepareSecondaryResponse{SecondaryAddress: res.SecondaryAddress, SecondaryQemuVersion: res.SecondaryQEMUVersion,
		Ports: &pb.ProtectionPorts{Migration: uint32(res.MigrationPort), Nbd: uint32(res.NBDPort), Mirror: req.GetPorts().GetMirror(), Compare: req.GetPorts().GetCompare()}}, nil
}

// TearDownSecondary stops the secondary of a generation; idempotent.
func (s *PeerServer) TearDownSecondary(ctx context.Context, req *pb.TearDownSecondaryRequest) (*pb.TearDownSecondaryResponse, error) {
	r, err := s.target(ctx, req.GetPairName(), "")
	if err != nil {
		return nil, err
	}
	if err := r.peerTearDown(ctx, req.GetEpoch(), int(req.GetGeneration())); err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	return &pb.TearDownSecondaryResponse{}, nil
}

var handOverFromProto = map[pb.HandOverReason]HandOverKind{
	pb.HandOverReason_HAND_OVER_REASON_PRIMARY_FAILED: HandOverFailed, pb.HandOverReason_HAND_OVER_REASON_PLANNED: HandOverPlanned,
	pb.HandOverReason_HAND_OVER_REASON_FORCED: HandOverForced,
}

// HandOver makes the receiver's secondary take over at once (its primary is dead or stopped).
// It returns when the takeover has started: the lease is asked for, and the failover follows.
func (s *PeerServer) HandOver(ctx context.Context, req *pb.HandOverRequest) (*pb.HandOverResponse, error) {
	kind, ok := handOverFromProto[req.GetReason()]
	if !ok {
		return nil, status.Error(codes.InvalidArgument, "reason: want PLANNED, PRIMARY_FAILED or FORCED")
	}
	r, err := s.target(ctx, req.GetPairName(), "")
	if err != nil {
		return nil, err
	}
	if err := r.peerHandOver(ctx, req.GetEpoch(), kind, req.GetDetail()); err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	return &pb.HandOverResponse{Epoch: r.epoch()}, nil
}
