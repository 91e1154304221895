package controller

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/lockstepvm/lockstep/checkpoint"
	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// PairServer is the gRPC adapter of PairService over an Agent: it converts requests, calls
// the agent and converts errors to codes at the edge. No policy lives here.
type PairServer struct {
	pb.UnimplementedPairServiceServer
	Agent *Agent
}

// toGRPC maps the agent's errors to gRPC codes.
func toGRPC(err error) error {
	if err == nil {
		return nil
	}
	var fe *checkpoint.FieldError
	switch {
	case errors.Is(err, ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ErrExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, ErrWrongState):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, ErrStaleEpoch):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.As(err, &fe):
		st := status.New(codes.InvalidArgument, err.Error())
		br := &errdetails.BadRequest{}
		for _, f := range fieldErrors(err) {
			br.FieldViolations = append(br.FieldViolations, &errdetails.BadRequest_FieldViolation{Field: "spec." + f.Field, Description: f.Reason})
		}
		if d, derr := st.WithDetails(br); derr == nil {
			return d.Err()
		}
		return st.Err()
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return status.FromContextError(err).Err()
	}
	return status.Error(codes.Internal, err.Error())
}

// fieldErrors unpacks every FieldError in err.
func fieldErrors(err error) []*checkpoint.FieldError {
	var out []*checkpoint.FieldError
	var walk func(error)
	walk = func(e error) {
		var fe *checkpoint.FieldError
		if errors.As(e, &fe) && e == error(fe) {
			out = append(out, fe)
			return
		}
		if m, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range m.Unwrap() {
				walk(x)
			}
			return
		}
		if u := errors.Unwrap(e); u != nil {
			walk(u)
		}
	}
	walk(err)
	return out
}

func bad(field, format string, a ...any) error {
	return &checkpoint.FieldError{Field: field, Reason: fmt.Sprintf(format, a...)}
}

// PairConfigFromProto converts a PairSpec; conversion problems name the field.
func PairConfigFromProto(s *pb.PairSpec) (PairConfig, error) {
	if s == nil {
		return PairConfig{}, bad("spec", "missing")
	}
	var pc PairConfig
	sp := &pc.Spec
	sp.Name = s.GetName()
	if s.GetMemoryMib() > 1<<20 {
		return pc, bad("memory_mib", "%d is too large", s.GetMemoryMib())
	}
	sp.MemoryMiB, sp.VCPUs, sp.Machine = int(s.GetMemoryMib()), int(s.GetVcpus()), s.GetMachine()
	switch s.GetAccel() {
	case pb.Accel_ACCEL_UNSPECIFIED, pb.Accel_ACCEL_AUTO:
		sp.Accel = "auto"
	case pb.Accel_ACCEL_KVM:
		sp.Accel = "kvm"
	case pb.Accel_ACCEL_TCG:
		sp.Accel = "tcg"
	default:
		return pc, bad("accel", "unknown value %d", s.GetAccel())
	}
	sp.Kernel, sp.Initrd, sp.Append = s.GetKernel(), s.GetInitrd(), s.GetAppend()
	if s.GetDiskSizeBytes() > 1<<50 {
		return pc, bad("disk_size_bytes", "%d is too large", s.GetDiskSizeBytes())
	}
	sp.DiskSize = int64(s.GetDiskSizeBytes())
	n := s.GetNic()
	sp.NIC = checkpoint.NIC{MAC: n.GetMac(), Model: n.GetModel(), Tap: n.GetTap(), Bridge: n.GetBridge()}
	switch n.GetBackend() {
	case pb.NicBackend_NIC_BACKEND_TAP:
		sp.NIC.Backend = "tap"
	case pb.NicBackend_NIC_BACKEND_BRIDGE:
		sp.NIC.Backend = "bridge"
	case pb.NicBackend_NIC_BACKEND_SOCKET:
		sp.NIC.Backend = "socket"
	default:
		return pc, bad("nic.backend", "want TAP, BRIDGE or SOCKET")
	}
	sp.QEMU, sp.QEMUImg = s.GetQemuCommand(), s.GetQemuImgCommand()
	if t := s.GetTunables(); t != nil {
		sp.Tunables.CheckpointDelay = t.GetCheckpointDelay().AsDuration()
		sp.Tunables.CompareTimeout = t.GetCompareTimeout().AsDuration()
		sp.Tunables.MaxBandwidth = t.GetMaxBandwidthBytesPerSecond()
		sp.Tunables.NoRewriter = t.GetNoRewriter()
		m, err := replicationTLSFromProto(t.GetReplicationTls())
		if err != nil {
			return pc, err
		}
		sp.Tunables.ReplicationTLS = m
		if b := t.GetBootSettle(); b != nil {
			if err := b.CheckValid(); err != nil {
				return pc, bad("tunables.boot_settle", "%v", err)
			}
			switch d := b.AsDuration(); {
			case d < 0:
				return pc, bad("tunables.boot_settle", "%v: want zero or more", d)
			case d == 0:
				sp.Tunables.BootSettle = -1 // explicitly none
			default:
				sp.Tunables.BootSettle = d
			}
		}
	}
	for i, pl := range []*pb.Placement{s.GetPrimary(), s.GetSecondary()} {
		field := []string{"primary", "secondary"}[i]
		if pl == nil {
			return pc, bad(field, "missing placement")
		}
		host := pl.GetAddress()
		if host == "" {
			host = pl.GetHost()
		}
		pc.Sides[i] = SideConfig{Host: host, Disk: pl.GetDiskPath(), NetSocket: pl.GetNetSocket()}
		switch f := pl.GetDiskFormat(); f {
		case "", "raw":
		case "qcow2":
			pc.Sides[i].DiskFormat = f
		default:
			return pc, bad(field+".disk_format", "%q: want raw or qcow2", f)
		}
		if pl.GetAddress() != "" && pl.GetHost() != "" && pl.GetHost() != pl.GetAddress() {
			pc.Sides[i].Agent = pl.GetHost() // host names the agent, address its data address
		}
	}
	pc.NoAutoReprotect = !s.AutoReprotectEnabled()
	switch s.GetRestartPolicy() {
	case pb.RestartPolicy_RESTART_POLICY_UNSPECIFIED, pb.RestartPolicy_RESTART_POLICY_ALWAYS:
	case pb.RestartPolicy_RESTART_POLICY_NEVER:
		pc.RestartPolicy = RestartNever
	default:
		return pc, bad("restart_policy", "unknown value %d", s.GetRestartPolicy())
	}
	return pc, nil
}

// PairSpecToProto converts a PairConfig back.
func PairSpecToProto(pc PairConfig) *pb.PairSpec {
	sp := pc.Spec
	acc := map[string]pb.Accel{"auto": pb.Accel_ACCEL_AUTO, "kvm": pb.Accel_ACCEL_KVM, "tcg": pb.Accel_ACCEL_TCG}[sp.Accel]
	be := map[string]pb.NicBackend{"tap": pb.NicBackend_NIC_BACKEND_TAP, "bridge": pb.NicBackend_NIC_BACKEND_BRIDGE, "socket": pb.NicBackend_NIC_BACKEND_SOCKET}[sp.NIC.Backend]
	auto := !pc.NoAutoReprotect
	out := &pb.PairSpec{
		Name: sp.Name, MemoryMib: uint32(sp.MemoryMiB), Vcpus: uint32(sp.VCPUs), Machine: sp.Machine, Accel: acc,
		Kernel: sp.Kernel, Initrd: sp.Initrd, Append: sp.Append, DiskSizeBytes: uint64(sp.DiskSize),
		Nic:         &pb.Nic{Mac: sp.NIC.MAC, Model: sp.NIC.Model, Backend: be, Tap: sp.NIC.Tap, Bridge: sp.NIC.Bridge},
		QemuCommand: sp.QEMU, QemuImgCommand: sp.QEMUImg, Tunables: tunablesToProto(sp.Tunables),
		AutoReprotect: &auto, RestartPolicy: pb.RestartPolicy_RESTART_POLICY_ALWAYS,
	}
	if pc.RestartPolicy == RestartNever {
		out.RestartPolicy = pb.RestartPolicy_RESTART_POLICY_NEVER
	}
	pl := func(sc SideConfig) *pb.Placement {
		host := sc.Host
		if sc.Agent != "" {
			host = sc.Agent
		}
		return &pb.Placement{Host: host, Address: sc.Host, DiskPath: sc.Disk, DiskFormat: sc.DiskFormat, NetSocket: sc.NetSocket}
	}
	out.Primary, out.Secondary = pl(pc.Sides[0]), pl(pc.Sides[1])
	return out
}

// bootSettleToProto keeps the three meanings apart: unset (the default), zero (explicitly none,
// negative here) and a duration.
func bootSettleToProto(d time.Duration) *durationpb.Duration {
	switch {
	case d == 0:
		return nil
	case d < 0:
		return durationpb.New(0)
	default:
		return durationpb.New(d)
	}
}

func replicationTLSFromProto(m pb.ReplicationTls) (checkpoint.TLSMode, error) {
	switch m {
	case pb.ReplicationTls_REPLICATION_TLS_UNSPECIFIED, pb.ReplicationTls_REPLICATION_TLS_AUTO:
		return checkpoint.TLSAuto, nil
	case pb.ReplicationTls_REPLICATION_TLS_ON:
		return checkpoint.TLSOn, nil
	case pb.ReplicationTls_REPLICATION_TLS_OFF:
		return checkpoint.TLSOff, nil
	}
	return "", bad("tunables.replication_tls", "unknown value %d", m)
}

func replicationTLSToProto(m checkpoint.TLSMode) pb.ReplicationTls {
	switch m {
	case checkpoint.TLSOn:
		return pb.ReplicationTls_REPLICATION_TLS_ON
	case checkpoint.TLSOff:
		return pb.ReplicationTls_REPLICATION_TLS_OFF
	}
	return pb.ReplicationTls_REPLICATION_TLS_AUTO
}

func tunablesToProto(t checkpoint.Tunables) *pb.Tunables {
	return &pb.Tunables{CheckpointDelay: durationpb.New(t.CheckpointDelay), CompareTimeout: durationpb.New(t.CompareTimeout),
		MaxBandwidthBytesPerSecond: t.MaxBandwidth, NoRewriter: t.NoRewriter, BootSettle: bootSettleToProto(t.BootSettle),
		ReplicationTls: replicationTLSToProto(t.ReplicationTLS)}
}

var stateToProto = map[State]pb.PairState{
	StateStopped: pb.PairState_PAIR_STATE_STOPPED, StateStarting: pb.PairState_PAIR_STATE_STARTING,
	StateProtecting: pb.PairState_PAIR_STATE_PROTECTING, StateProtected: pb.PairState_PAIR_STATE_PROTECTED,
	StateDegraded: pb.PairState_PAIR_STATE_DEGRADED, StateFailingOver: pb.PairState_PAIR_STATE_FAILING_OVER,
	StateReprotecting: pb.PairState_PAIR_STATE_REPROTECTING, StateFailed: pb.PairState_PAIR_STATE_FAILED,
}

func coloMode(s string) pb.ColoMode {
	switch s {
	case "primary":
		return pb.ColoMode_COLO_MODE_PRIMARY
	case "secondary":
		return pb.ColoMode_COLO_MODE_SECONDARY
	case "none":
		return pb.ColoMode_COLO_MODE_NONE
	}
	return pb.ColoMode_COLO_MODE_UNSPECIFIED
}

func statsToProto(st checkpoint.Stats) *pb.CheckpointStats {
	out := &pb.CheckpointStats{Count: st.Checkpoints, EarlyCount: st.Early, RatePerSecond: st.Rate,
		PauseP50: durationpb.New(st.PauseP50), PauseP99: durationpb.New(st.PauseP99), PauseMax: durationpb.New(st.PauseMax),
		PauseMean: durationpb.New(st.PauseAvg), LastCheckpointBytes: st.BytesLast, MeanCheckpointBytes: st.BytesAvg}
	if !st.Last.IsZero() {
		out.LastCheckpointTime = timestamppb.New(st.Last)
	}
	return out
}

func stepToProto(e *checkpoint.StepEvent) *pb.StepProgress {
	if e == nil {
		return nil
	}
	ph := map[checkpoint.StepPhase]pb.StepPhase{checkpoint.StepStarted: pb.StepPhase_STEP_PHASE_STARTED,
		checkpoint.StepDone: pb.StepPhase_STEP_PHASE_DONE, checkpoint.StepFailed: pb.StepPhase_STEP_PHASE_FAILED}[e.Phase]
	out := &pb.StepProgress{Sequence: e.Sequence, Step: e.Step, Index: uint32(e.Index), Total: uint32(e.Total), Phase: ph, Elapsed: durationpb.New(e.Elapsed)}
	if e.Err != nil {
		out.Error = e.Err.Error()
	}
	return out
}

func failoverToProto(f *FailoverRecord, pc PairConfig) *pb.FailoverSummary {
	if f == nil {
		return nil
	}
	return &pb.FailoverSummary{StartTime: timestamppb.New(f.At), Reason: f.Why, Sequence: f.Sequence,
		Duration: durationpb.New(f.Took), Succeeded: f.FailedStep == "" && f.Error == "", FailedStep: f.FailedStep, Error: f.Error,
		Trigger: f.Trigger}
}

// StatusToProto converts a status.
func StatusToProto(s Status, pc PairConfig) *pb.PairStatus {
	out := &pb.PairStatus{
		State: stateToProto[s.State], StateReason: s.Reason, PrimaryHost: s.PrimaryHost, SecondaryHost: s.SecondaryHost,
		Generation: uint64(s.Generation), CheckpointStats: statsToProto(s.Checkpoints),
		Resync:       &pb.ResyncProgress{Offset: uint64(max(s.ResyncOffset, 0)), Length: uint64(max(s.ResyncLength, 0))},
		LastFailover: failoverToProto(s.LastFailover, pc), CurrentStep: stepToProto(s.Step),
		Tunables: tunablesToProto(pc.Spec.Tunables), StoreReachable: s.StoreReachable,
		Peer: &pb.PeerStatus{Reachable: s.PeerReachable}, Epoch: s.Epoch,
	}
	if !s.LastHeartbeat.IsZero() {
		out.Peer.LastHeartbeatTime = timestamppb.New(s.LastHeartbeat)
	}
	if !s.Changed.IsZero() {
		out.StateChangeTime = timestamppb.New(s.Changed)
	}
	p, q := s.PrimarySide, s.PrimarySide.Other()
	out.Primary = &pb.SideStatus{Running: s.ColoMode[p] != "", ColoMode: coloMode(s.ColoMode[p]), QemuVersion: s.QEMUVersion[p]}
	out.Secondary = &pb.SideStatus{Running: s.ColoMode[q] != "", ColoMode: coloMode(s.ColoMode[q]), QemuVersion: s.QEMUVersion[q]}
	return out
}

func (s *PairServer) pair(name string) (*pb.Pair, error) {
	st, err := s.Agent.Get(name)
	if err != nil {
		return nil, err
	}
	pc, err := s.Agent.Config(name)
	if err != nil {
		return nil, err
	}
	return &pb.Pair{Spec: PairSpecToProto(pc), Status: StatusToProto(st, pc)}, nil
}

// CreatePair validates the spec and starts the pair.
func (s *PairServer) CreatePair(ctx context.Context, req *pb.CreatePairRequest) (*pb.CreatePairResponse, error) {
	pc, err := PairConfigFromProto(req.GetSpec())
	if err != nil {
		return nil, toGRPC(err)
	}
	if req.GetDryRun() {
		checked, err := s.Agent.DryRunCreate(pc)
		if err != nil {
			return nil, toGRPC(err)
		}
		return &pb.CreatePairResponse{Pair: &pb.Pair{Spec: PairSpecToProto(checked)}}, nil
	}
	if _, err := s.Agent.Create(pc); err != nil {
		return nil, toGRPC(err)
	}
	p, err := s.pair(pc.Spec.Name)
	return &pb.CreatePairResponse{Pair: p}, toGRPC(err)
}

// GetPair returns a pair's spec and status.
func (s *PairServer) GetPair(ctx context.Context, req *pb.GetPairRequest) (*pb.GetPairResponse, error) {
	p, err := s.pair(req.GetName())
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.GetPairResponse{Pair: p}, nil
}

// ListPairs returns every pair.
func (s *PairServer) ListPairs(ctx context.Context, req *pb.ListPairsRequest) (*pb.ListPairsResponse, error) {
	out := &pb.ListPairsResponse{}
	for _, st := range s.Agent.List() {
		if p, err := s.pair(st.Name); err == nil {
			out.Pairs = append(out.Pairs, p)
		}
	}
	return out, nil
}

// DeletePair stops a pair and forgets it.
func (s *PairServer) DeletePair(ctx context.Context, req *pb.DeletePairRequest) (*pb.DeletePairResponse, error) {
	return &pb.DeletePairResponse{}, toGRPC(s.Agent.Delete(req.GetName()))
}

// WatchPair streams the pair's status, then its changes.
func (s *PairServer) WatchPair(req *pb.WatchPairRequest, stream pb.PairService_WatchPairServer) error {
	events, err := s.Agent.Watch(stream.Context(), req.GetName())
	if err != nil {
		return toGRPC(err)
	}
	pc, _ := s.Agent.Config(req.GetName())
	for ev := range events {
		pe := &pb.PairEvent{Time: timestamppb.New(ev.Time)}
		switch ev.Kind {
		case EventStatus:
			pe.Event = &pb.PairEvent_Status{Status: StatusToProto(*ev.Status, pc)}
		case EventState:
			pe.Event = &pb.PairEvent_StateChange{StateChange: &pb.StateChange{FromState: stateToProto[ev.From], ToState: stateToProto[ev.To], Reason: ev.Reason}}
		case EventStep:
			pe.Event = &pb.PairEvent_Step{Step: stepToProto(ev.Step)}
		case EventCheckpoints:
			pe.Event = &pb.PairEvent_CheckpointStats{CheckpointStats: statsToProto(*ev.Stats)}
		case EventResync:
			pe.Event = &pb.PairEvent_Resync{Resync: &pb.ResyncProgress{Offset: uint64(max(ev.Resync[0], 0)), Length: uint64(max(ev.Resync[1], 0))}}
		case EventFailover:
			pe.Event = &pb.PairEvent_Failover{Failover: failoverToProto(ev.Failover, pc)}
		default:
			continue
		}
		if err := stream.Send(&pb.WatchPairResponse{Event: pe}); err != nil {
			return err
		}
	}
	if stream.Context().Err() != nil {
		return nil
	}
	return status.Error(codes.NotFound, fmt.Sprintf("pair %q went away", req.GetName()))
}

// Failover runs a planned switchover or a forced failover and returns when it has finished.
func (s *PairServer) Failover(ctx context.Context, req *pb.FailoverRequest) (*pb.FailoverResponse, error) {
	forced := false
	switch req.GetMode() {
	case pb.FailoverMode_FAILOVER_MODE_UNSPECIFIED, pb.FailoverMode_FAILOVER_MODE_PLANNED:
	case pb.FailoverMode_FAILOVER_MODE_FORCED:
		forced = true
	default:
		return nil, status.Error(codes.InvalidArgument, "mode: want PLANNED or FORCED")
	}
	fctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	rec, err := s.Agent.Failover(fctx, req.GetName(), forced, req.GetReason())
	if err != nil {
		return nil, toGRPC(err)
	}
	p, err := s.pair(req.GetName())
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.FailoverResponse{Failover: failoverToProto(rec, PairConfig{}), Status: p.Status}, nil
}

// Reprotect protects a degraded pair now.
func (s *PairServer) Reprotect(ctx context.Context, req *pb.ReprotectRequest) (*pb.ReprotectResponse, error) {
	if err := s.Agent.Reprotect(req.GetName()); err != nil {
		return nil, toGRPC(err)
	}
	p, err := s.pair(req.GetName())
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.ReprotectResponse{Status: p.Status}, nil
}

// SetParameters changes tunables at run time.
func (s *PairServer) SetParameters(ctx context.Context, req *pb.SetParametersRequest) (*pb.SetParametersResponse, error) {
	var t checkpoint.Tunables
	if req.CheckpointDelay != nil {
		if err := req.CheckpointDelay.CheckValid(); err != nil {
			return nil, toGRPC(bad("checkpoint_delay", "%v", err))
		}
		t.CheckpointDelay = req.CheckpointDelay.AsDuration()
		if t.CheckpointDelay <= 0 {
			return nil, toGRPC(bad("checkpoint_delay", "must be positive"))
		}
	}
	if req.CompareTimeout != nil {
		t.CompareTimeout = req.CompareTimeout.AsDuration()
	}
	if req.MaxBandwidthBytesPerSecond != nil {
		t.MaxBandwidth = req.GetMaxBandwidthBytesPerSecond()
	}
	if m := req.GetReplicationTls(); m != pb.ReplicationTls_REPLICATION_TLS_UNSPECIFIED {
		mode, err := replicationTLSFromProto(m)
		if err != nil {
			return nil, toGRPC(bad("replication_tls", "unknown value %d", m))
		}
		if mode == checkpoint.TLSAuto {
			mode = "auto" // (TLSAuto is the empty value: "unchanged" in a Tunables of changes)
		}
		t.ReplicationTLS = mode
	}
	if err := s.Agent.SetParameters(ctx, req.GetName(), t); err != nil {
		return nil, toGRPC(err)
	}
	pc, err := s.Agent.Config(req.GetName())
	if err != nil {
		return nil, toGRPC(err)
	}
	return &pb.SetParametersResponse{Tunables: tunablesToProto(pc.Spec.Tunables)}, nil
}

// mergeTunables applies the run-time changes in t (its non-zero fields) to spec; the compare
// timeout cannot change at run time.
func mergeTunables(spec checkpoint.Spec, t checkpoint.Tunables) (checkpoint.Spec, error) {
	if t.CheckpointDelay != 0 {
		spec.Tunables.CheckpointDelay = t.CheckpointDelay
	}
	if t.MaxBandwidth != 0 {
		spec.Tunables.MaxBandwidth = t.MaxBandwidth
	}
	if t.CompareTimeout != 0 {
		return spec, &checkpoint.FieldError{Field: "compare_timeout", Reason: "takes effect at the next protection only; not changeable at run time"}
	}
	switch t.ReplicationTLS {
	case "": // unchanged
	case "auto":
		spec.Tunables.ReplicationTLS = checkpoint.TLSAuto
	default:
		spec.Tunables.ReplicationTLS = t.ReplicationTLS
	}
	if err := spec.Validate(); err != nil {
		return spec, err
	}
	return spec, nil
}

// applyTunables sets the run-time tunables of spec on a protected primary's QEMU.
func applyTunables(ctx context.Context, vm *checkpoint.VM, spec checkpoint.Spec) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return checkpoint.SetRunTimeTunables(cctx, vm, spec)
}
