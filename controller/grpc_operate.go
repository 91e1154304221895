package controller

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// StopPair stops a pair and keeps it.
func (s *PairServer) StopPair(ctx context.Context, req *pb.StopPairRequest) (*pb.StopPairResponse, error) {
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if _, err := s.Agent.Stop(sctx, req.GetName()); err != nil {
		return nil, toGRPC(err)
	}
	p, err := s.pair(req.GetName())
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.StopPairResponse{Status: p.Status}, nil
}

// StartPair boots a stopped or failed pair again.
func (s *PairServer) StartPair(ctx context.Context, req *pb.StartPairRequest) (*pb.StartPairResponse, error) {
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if _, err := s.Agent.Start(sctx, req.GetName()); err != nil {
		return nil, toGRPC(err)
	}
	p, err := s.pair(req.GetName())
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.StartPairResponse{Status: p.Status}, nil
}

// Drill kills the QEMU of a protected pair's primary or secondary.
func (s *PairServer) Drill(ctx context.Context, req *pb.DrillRequest) (*pb.DrillResponse, error) {
	var secondary bool
	switch req.GetTarget() {
	case pb.DrillTarget_DRILL_TARGET_PRIMARY:
	case pb.DrillTarget_DRILL_TARGET_SECONDARY:
		secondary = true
	default:
		return nil, status.Error(codes.InvalidArgument, "target: want PRIMARY or SECONDARY")
	}
	k, err := s.Agent.Drill(ctx, req.GetName(), secondary)
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.DrillResponse{Host: k.Host, Pid: int64(k.PID), KillTime: timestamppb.New(k.At)}, nil
}

// Console relays the primary's serial console both ways until either end closes.
func (s *PairServer) Console(stream grpc.BidiStreamingServer[pb.ConsoleRequest, pb.ConsoleResponse]) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	if first.GetName() == "" {
		return status.Error(codes.InvalidArgument, "name: the first message names the pair")
	}
	ctx := stream.Context()
	conn, err := s.Agent.Console(ctx, first.GetName())
	if err != nil {
		return toGRPC(err)
	}
	defer conn.Close()
	// An empty first response: attached.
	if err := stream.Send(&pb.ConsoleResponse{}); err != nil {
		return err
	}
	// Input: the client's messages to the serial port, until it closes its side; the
	// goroutine ends when Recv fails, which it does once the stream ends.
	go func() {
		in := first.GetInput()
		for {
			if len(in) > 0 {
				if _, err := conn.Write(in); err != nil {
					return
				}
			}
			m, err := stream.Recv()
			if err != nil {
				return
			}
			in = m.GetInput()
		}
	}()
	// Output: what the guest writes, until the console or the stream ends.
	go func() {
		<-ctx.Done()
		conn.Close()
	}()
	buf := make([]byte, 4096)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if serr := stream.Send(&pb.ConsoleResponse{Output: append([]byte(nil), buf[:n]...)}); serr != nil {
				return serr
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return status.FromContextError(ctx.Err()).Err()
			}
			return status.Error(codes.Unavailable, "console: the primary's serial console closed (its QEMU ended?)")
		}
	}
}
