package pairspec

import (
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

var accelToProto = map[string]pb.Accel{"": pb.Accel_ACCEL_UNSPECIFIED, "auto": pb.Accel_ACCEL_AUTO, "kvm": pb.Accel_ACCEL_KVM, "tcg": pb.Accel_ACCEL_TCG}

var restartToProto = map[string]pb.RestartPolicy{"": pb.RestartPolicy_RESTART_POLICY_UNSPECIFIED,
	"always": pb.RestartPolicy_RESTART_POLICY_ALWAYS, "never": pb.RestartPolicy_RESTART_POLICY_NEVER}

var backendToProto = map[string]pb.NicBackend{"": pb.NicBackend_NIC_BACKEND_UNSPECIFIED, "tap": pb.NicBackend_NIC_BACKEND_TAP,
	"bridge": pb.NicBackend_NIC_BACKEND_BRIDGE, "socket": pb.NicBackend_NIC_BACKEND_SOCKET}

// ToProto converts the Pair's name and spec to the API's PairSpec. It converts any Pair; one
// that Validate refuses gives a PairSpec the agent refuses too.
func (p *Pair) ToProto() *pb.PairSpec {
	s := &p.Spec
	out := &pb.PairSpec{
		Name: p.Metadata.Name, MemoryMib: mibOf(s.Memory), Vcpus: s.VCPUs, Machine: s.Machine, Accel: accelToProto[s.Accel],
		DiskSizeBytes: uint64(s.Disk.Size),
		Nic:           &pb.Nic{Mac: s.NIC.MAC, Model: s.NIC.Model, Backend: backendToProto[s.NIC.backend()], Tap: s.NIC.Tap, Bridge: s.NIC.Bridge},
		QemuCommand:   s.QEMUCommand, QemuImgCommand: s.QEMUImgCommand,
		Tunables:      s.Tunables.toProto(),
		AutoReprotect: s.AutoReprotect, RestartPolicy: restartToProto[s.RestartPolicy],
	}
	if b := s.Boot; b != nil {
		out.Kernel, out.Initrd, out.Append = b.Kernel, b.Initrd, b.Cmdline
	}
	pl := func(pl *Placement) *pb.Placement {
		path, format := s.diskOf(pl)
		addr := pl.Address
		if addr == "" {
			addr = pl.Host // the agent's own reading of an unset address, written out
		}
		return &pb.Placement{Host: pl.Host, Address: addr, DiskPath: path, DiskFormat: format, NetSocket: pl.NetSocket}
	}
	out.Primary, out.Secondary = pl(&s.Primary), pl(&s.Secondary)
	return out
}

func (t *Tunables) toProto() *pb.Tunables {
	if *t == (Tunables{}) {
		return nil
	}
	out := &pb.Tunables{MaxBandwidthBytesPerSecond: uint64(t.MaxBandwidth)}
	if t.CheckpointDelay != 0 {
		out.CheckpointDelay = durationpb.New(t.CheckpointDelay.D())
	}
	if t.CompareTimeout != 0 {
		out.CompareTimeout = durationpb.New(t.CompareTimeout.D())
	}
	if t.Rewriter != nil && !*t.Rewriter {
		out.NoRewriter = true
	}
	if t.BootSettle != nil {
		out.BootSettle = durationpb.New(t.BootSettle.D())
	}
	out.ReplicationTls = replicationTLSToProto[t.ReplicationTLS]
	return out
}

var replicationTLSToProto = map[string]pb.ReplicationTls{"": pb.ReplicationTls_REPLICATION_TLS_UNSPECIFIED,
	"auto": pb.ReplicationTls_REPLICATION_TLS_AUTO, "on": pb.ReplicationTls_REPLICATION_TLS_ON, "off": pb.ReplicationTls_REPLICATION_TLS_OFF}

// enumWord is an enum value's name in plain words: PAIR_STATE_FAILING_OVER is failing-over.
func enumWord(name, prefix string) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(name, prefix), "_", "-"))
}

// FromProto converts a PairSpec (and, when set, the pair's status) into a Pair. A disk path or
// format that both sides share is written once, as spec.disk's.
func FromProto(spec *pb.PairSpec, status *pb.PairStatus) *Pair {
	p := &Pair{APIVersion: APIVersion, Kind: KindPair, Metadata: Metadata{Name: spec.GetName()}}
	s := &p.Spec
	s.Memory = Bytes(uint64(spec.GetMemoryMib()) * MiB)
	s.VCPUs, s.Machine = spec.GetVcpus(), spec.GetMachine()
	if a := spec.GetAccel(); a != pb.Accel_ACCEL_UNSPECIFIED {
		s.Accel = enumWord(a.String(), "ACCEL_")
	}
	if spec.GetKernel() != "" || spec.GetInitrd() != "" || spec.GetAppend() != "" {
		s.Boot = &Boot{Kernel: spec.GetKernel(), Initrd: spec.GetInitrd(), Cmdline: spec.GetAppend()}
	}
	s.Disk.Size = Bytes(spec.GetDiskSizeBytes())
	n := spec.GetNic()
	s.NIC = NIC{MAC: n.GetMac(), Model: n.GetModel(), Tap: n.GetTap(), Bridge: n.GetBridge()}
	if b := n.GetBackend(); b != pb.NicBackend_NIC_BACKEND_UNSPECIFIED {
		s.NIC.Backend = enumWord(b.String(), "NIC_BACKEND_")
		if s.NIC.backendImplied() {
			s.NIC.Backend = ""
		}
	}
	s.QEMUCommand, s.QEMUImgCommand = spec.GetQemuCommand(), spec.GetQemuImgCommand()
	s.Tunables = tunablesFromProto(spec.GetTunables())
	if spec.AutoReprotect != nil {
		v := spec.GetAutoReprotect()
		s.AutoReprotect = &v
	}
	if r := spec.GetRestartPolicy(); r != pb.RestartPolicy_RESTART_POLICY_UNSPECIFIED {
		s.RestartPolicy = enumWord(r.String(), "RESTART_POLICY_")
	}
	a, b := spec.GetPrimary(), spec.GetSecondary()
	if a.GetDiskPath() == b.GetDiskPath() {
		s.Disk.Path = a.GetDiskPath()
	}
	if a.GetDiskFormat() == b.GetDiskFormat() {
		s.Disk.Format = a.GetDiskFormat()
	}
	pl := func(x *pb.Placement) Placement {
		out := Placement{Host: x.GetHost(), NetSocket: x.GetNetSocket()}
		if x.GetAddress() != x.GetHost() {
			out.Address = x.GetAddress()
		}
		d := &PlacementDisk{}
		if x.GetDiskPath() != s.Disk.Path {
			d.Path = x.GetDiskPath()
		}
		if x.GetDiskFormat() != s.Disk.Format {
			d.Format = x.GetDiskFormat()
		}
		if *d != (PlacementDisk{}) {
			out.Disk = d
		}
		return out
	}
	s.Primary, s.Secondary = pl(a), pl(b)
	if status != nil {
		p.Status = StatusFromProto(status)
	}
	return p
}

// backendImplied reports whether Backend follows from Tap or Bridge, so that it need not be
// written.
func (n *NIC) backendImplied() bool {
	switch n.Backend {
	case "tap":
		return n.Tap != "" && n.Bridge == ""
	case "bridge":
		return n.Bridge != "" && n.Tap == ""
	}
	return false
}

func tunablesFromProto(t *pb.Tunables) Tunables {
	var out Tunables
	if t == nil {
		return out
	}
	out.CheckpointDelay = Duration(t.GetCheckpointDelay().AsDuration())
	out.CompareTimeout = Duration(t.GetCompareTimeout().AsDuration())
	out.MaxBandwidth = BytesPerSecond(t.GetMaxBandwidthBytesPerSecond())
	if t.GetNoRewriter() {
		f := false
		out.Rewriter = &f
	}
	if b := t.GetBootSettle(); b != nil {
		d := Duration(b.AsDuration())
		out.BootSettle = &d
	}
	if m := t.GetReplicationTls(); m != pb.ReplicationTls_REPLICATION_TLS_UNSPECIFIED {
		out.ReplicationTLS = enumWord(m.String(), "REPLICATION_TLS_")
	}
	return out
}

func timeOf(t *timestamppb.Timestamp) *time.Time {
	if t == nil {
		return nil
	}
	v := t.AsTime().UTC()
	return &v
}

// StateWord is a pair state in plain words: protected, failing-over.
func StateWord(s pb.PairState) string { return enumWord(s.String(), "PAIR_STATE_") }

// StatusFromProto converts a PairStatus into its plain form.
func StatusFromProto(st *pb.PairStatus) *Status {
	out := &Status{
		State: StateWord(st.GetState()), Reason: st.GetStateReason(), Since: timeOf(st.GetStateChangeTime()),
		Generation: st.GetGeneration(), Epoch: st.GetEpoch(), StoreReached: st.GetStoreReachable(),
	}
	side := func(host string, s *pb.SideStatus) *SideStatus {
		if s == nil && host == "" {
			return nil
		}
		out := &SideStatus{Host: host, Running: s.GetRunning(), QEMUVersion: s.GetQemuVersion()}
		if m := s.GetColoMode(); m != pb.ColoMode_COLO_MODE_UNSPECIFIED {
			out.Colo = enumWord(m.String(), "COLO_MODE_")
		}
		return out
	}
	out.Primary, out.Secondary = side(st.GetPrimaryHost(), st.Primary), side(st.GetSecondaryHost(), st.Secondary)
	if pe := st.GetPeer(); pe != nil {
		out.Peer = &PeerStatus{Reachable: pe.GetReachable(), LastHeartbeat: timeOf(pe.GetLastHeartbeatTime())}
	}
	if cs := st.GetCheckpointStats(); cs != nil {
		out.Checkpoints = CheckpointsFromProto(cs)
	}
	if r := st.GetResync(); r.GetLength() > 0 {
		out.Resync = &Resync{CopiedBytes: r.GetOffset(), TotalBytes: r.GetLength()}
	}
	out.CurrentStep = StepFromProto(st.GetCurrentStep())
	out.LastFailover = FailoverFromProto(st.GetLastFailover())
	if t := st.GetTunables(); t != nil {
		tu := tunablesFromProto(t)
		out.Tunables = &tu
	}
	return out
}

// CheckpointsFromProto converts checkpoint statistics.
func CheckpointsFromProto(cs *pb.CheckpointStats) *Checkpoint {
	return &Checkpoint{
		Count: cs.GetCount(), Mismatch: cs.GetEarlyCount(), PerSecond: cs.GetRatePerSecond(),
		PauseP50: Duration(cs.GetPauseP50().AsDuration()), PauseP99: Duration(cs.GetPauseP99().AsDuration()),
		PauseMax: Duration(cs.GetPauseMax().AsDuration()), PauseMean: Duration(cs.GetPauseMean().AsDuration()),
		Last: timeOf(cs.GetLastCheckpointTime()), LastBytes: cs.GetLastCheckpointBytes(), MeanBytes: cs.GetMeanCheckpointBytes(),
	}
}

// StepFromProto converts a step's progress; nil for none.
func StepFromProto(s *pb.StepProgress) *Step {
	if s == nil {
		return nil
	}
	out := &Step{Sequence: s.GetSequence(), Step: s.GetStep(), Index: s.GetIndex(), Total: s.GetTotal(),
		Elapsed: Duration(s.GetElapsed().AsDuration()), Error: s.GetError()}
	if ph := s.GetPhase(); ph != pb.StepPhase_STEP_PHASE_UNSPECIFIED {
		out.Phase = enumWord(ph.String(), "STEP_PHASE_")
	}
	return out
}

// FailoverFromProto converts a failover summary; nil for none.
func FailoverFromProto(f *pb.FailoverSummary) *Failover {
	if f == nil {
		return nil
	}
	out := &Failover{Started: timeOf(f.GetStartTime()), Reason: f.GetReason(), Sequence: f.GetSequence(),
		Took: Duration(f.GetDuration().AsDuration()), From: f.GetFromHost(), To: f.GetToHost(), Succeeded: f.GetSucceeded(),
		FailedStep: f.GetFailedStep(), Error: f.GetError()}
	if t := f.GetTrigger(); t != pb.FailoverTrigger_FAILOVER_TRIGGER_UNSPECIFIED {
		out.Trigger = enumWord(t.String(), "FAILOVER_TRIGGER_")
	}
	return out
}
