package controller

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// PeerServer is the gRPC adapter of PeerService over a ClusterAgent: the agent of a pair's other
// host calls it. Requests are events of the pair's HostPolicy; one with a stale fencing epoch is
// refused with FailedPrecondition and a StaleEpoch detail, and changes nothing.
type PeerServer struct {
	pb.UnimplementedPeerServiceServer
	Agent *ClusterAgent
}

func (s *PeerServer) refuse(r *hostRunner, reqEpoch uint64, err error) error {
	if errors.Is(err, ErrStaleEpoch) {
		st := status.New(codes.FailedPrecondition, err.Error())
		if d, derr := st.WithDetails(&pb.StaleEpoch{RequestEpoch: reqEpoch, CurrentEpoch: r.status().Epoch}); derr == nil {
			return d.Err()
		}
		return st.Err()
	}
	return toGRPC(err)
}

// Heartbeat exchanges the two sides' views of a pair.
func (s *PeerServer) Heartbeat(ctx context.Context, req *pb.HeartbeatRequest) (*pb.HeartbeatResponse, error) {
	r, err := s.Agent.runner(req.GetPairName())
	if err != nil {
		return nil, toGRPC(err)
	}
	rep, err := r.call(HPeerRequest{View: viewFromProto(req.GetSender(), req.GetEpoch())})
	if err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	return &pb.HeartbeatResponse{Epoch: rep.view.Epoch, Receiver: viewToProto(s.Agent.cfg.Host, rep.view), StoreDownConfirmation: rep.view.Confirm}, nil
}

// PrepareSecondary starts a secondary for the sender's primary and returns once it waits for
// the migration stream.
func (s *PeerServer) PrepareSecondary(ctx context.Context, req *pb.PrepareSecondaryRequest) (*pb.PrepareSecondaryResponse, error) {
	r, err := s.Agent.runner(req.GetPairName())
	if err != nil {
		return nil, toGRPC(err)
	}
	if req.GetGeneration() == 0 || req.GetPorts().GetMirror() == 0 || req.GetPorts().GetCompare() == 0 || req.GetPrimaryAddress() == "" {
		return nil, status.Error(codes.InvalidArgument, "generation, primary_address, ports.mirror and ports.compare are required")
	}
	rep, err := r.callWith(hostCall{ev: HPrepare{Gen: int(req.GetGeneration()), Epoch: req.GetEpoch()}, req: req})
	if err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	select {
	case res := <-rep.prep:
		if res.err != nil {
			return nil, status.Error(codes.Aborted, "preparing the secondary: "+res.err.Error())
		}
		return res.resp, nil
	case <-ctx.Done():
		return nil, toGRPC(ctx.Err())
	}
}

// TearDownSecondary stops the secondary of a generation; idempotent.
func (s *PeerServer) TearDownSecondary(ctx context.Context, req *pb.TearDownSecondaryRequest) (*pb.TearDownSecondaryResponse, error) {
	r, err := s.Agent.runner(req.GetPairName())
	if err != nil {
		return nil, toGRPC(err)
	}
	if _, err := r.call(HTearDown{Gen: int(req.GetGeneration())}); err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	return &pb.TearDownSecondaryResponse{}, nil
}

// HandOver makes the receiver's secondary take over at once (its primary is dead or stopped).
// It returns when the takeover has started: the lease is asked for, and the failover follows.
func (s *PeerServer) HandOver(ctx context.Context, req *pb.HandOverRequest) (*pb.HandOverResponse, error) {
	r, err := s.Agent.runner(req.GetPairName())
	if err != nil {
		return nil, toGRPC(err)
	}
	if _, err := r.call(HHandOver{Epoch: req.GetEpoch()}); err != nil {
		return nil, s.refuse(r, req.GetEpoch(), err)
	}
	return &pb.HandOverResponse{Epoch: r.status().Epoch}, nil
}
