package lockstepv1_test

import (
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	lockstepv1 "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func sampleStatus() *lockstepv1.PairStatus {
	last := time.Date(2025, 1, 2, 3, 4, 5, 600, time.UTC)
	return &lockstepv1.PairStatus{
		State:           lockstepv1.PairState_PAIR_STATE_PROTECTED,
		StateReason:     "secondary in COLO",
		StateChangeTime: timestamppb.New(last.Add(-time.Minute)),
		PrimaryHost:     "host-a",
		SecondaryHost:   "host-b",
		Primary:         &lockstepv1.SideStatus{Running: true, ColoMode: lockstepv1.ColoMode_COLO_MODE_PRIMARY, QemuVersion: "11.1.3"},
		Secondary:       &lockstepv1.SideStatus{Running: true, ColoMode: lockstepv1.ColoMode_COLO_MODE_SECONDARY, QemuVersion: "11.1.3"},
		CheckpointStats: &lockstepv1.CheckpointStats{
			Count:               1234,
			EarlyCount:          56,
			RatePerSecond:       5.25,
			PauseP50:            durationpb.New(25 * time.Millisecond),
			PauseP99:            durationpb.New(120 * time.Millisecond),
			PauseMax:            durationpb.New(140 * time.Millisecond),
			LastCheckpointTime:  timestamppb.New(last),
			MeanCheckpointBytes: 1 << 20,
		},
		LastFailover: &lockstepv1.FailoverSummary{
			Trigger:   lockstepv1.FailoverTrigger_FAILOVER_TRIGGER_AUTOMATIC,
			Reason:    "primary QEMU exited: killed",
			Sequence:  "failover-secondary",
			Duration:  durationpb.New(27 * time.Millisecond),
			FromHost:  "host-b",
			ToHost:    "host-a",
			Succeeded: true,
			StartTime: timestamppb.New(last.Add(-time.Hour)),
		},
		Peer:           &lockstepv1.PeerStatus{Reachable: true, LastHeartbeatTime: timestamppb.New(last)},
		StoreReachable: true,
		Epoch:          7,
		Generation:     3,
		CurrentStep: &lockstepv1.StepProgress{
			Sequence: "reprotect", Step: "primary: migrate", Index: 17, Total: 30,
			Phase: lockstepv1.StepPhase_STEP_PHASE_STARTED,
		},
		Tunables: &lockstepv1.Tunables{CheckpointDelay: durationpb.New(200 * time.Millisecond)},
	}
}

func TestPairStatusRoundTrip(t *testing.T) {
	in := sampleStatus()
	b, err := proto.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out := new(lockstepv1.PairStatus)
	if err := proto.Unmarshal(b, out); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, out) {
		t.Fatalf("round trip changed the status:\n in: %v\nout: %v", in, out)
	}
	if got := out.GetCheckpointStats().GetPauseP99().AsDuration(); got != 120*time.Millisecond {
		t.Errorf("pause p99 = %v, want 120ms", got)
	}
	if got := out.GetLastFailover().GetStartTime().AsTime(); !got.Equal(time.Date(2025, 1, 2, 2, 4, 5, 600, time.UTC)) {
		t.Errorf("last failover start = %v", got)
	}
	// Unset messages read as zero values through the getters.
	if out.GetResync().GetLength() != 0 || out.GetResync() != nil {
		t.Errorf("resync = %v, want unset", out.GetResync())
	}
}

func TestPairEventOneof(t *testing.T) {
	events := []*lockstepv1.PairEvent{
		{Event: &lockstepv1.PairEvent_Status{Status: sampleStatus()}},
		{Event: &lockstepv1.PairEvent_StateChange{StateChange: &lockstepv1.StateChange{
			FromState: lockstepv1.PairState_PAIR_STATE_PROTECTED,
			ToState:   lockstepv1.PairState_PAIR_STATE_FAILING_OVER,
			Reason:    "primary QEMU exited",
		}}},
		{Event: &lockstepv1.PairEvent_Step{Step: &lockstepv1.StepProgress{
			Sequence: "failover-secondary", Step: "secondary: x-colo-lost-heartbeat", Index: 2, Total: 5,
			Phase: lockstepv1.StepPhase_STEP_PHASE_FAILED, Elapsed: durationpb.New(3 * time.Millisecond),
			Error: "GenericError: no COLO",
		}}},
		{Event: &lockstepv1.PairEvent_Resync{Resync: &lockstepv1.ResyncProgress{Offset: 1 << 20, Length: 64 << 20}}},
	}
	for _, ev := range events {
		ev.Time = timestamppb.Now()
		b, err := proto.Marshal(&lockstepv1.WatchPairResponse{Event: ev})
		if err != nil {
			t.Fatal(err)
		}
		var resp lockstepv1.WatchPairResponse
		if err := proto.Unmarshal(b, &resp); err != nil {
			t.Fatal(err)
		}
		got := resp.GetEvent()
		if !proto.Equal(got, ev) {
			t.Fatalf("round trip changed the event:\n in: %v\nout: %v", ev, got)
		}
		switch e := got.GetEvent().(type) {
		case *lockstepv1.PairEvent_Status:
			if e.Status.GetEpoch() != 7 || got.GetStateChange() != nil {
				t.Errorf("status event: %v", got)
			}
		case *lockstepv1.PairEvent_StateChange:
			if got.GetStateChange().GetToState() != lockstepv1.PairState_PAIR_STATE_FAILING_OVER || got.GetStatus() != nil {
				t.Errorf("state change event: %v", got)
			}
		case *lockstepv1.PairEvent_Step:
			if e.Step.GetPhase() != lockstepv1.StepPhase_STEP_PHASE_FAILED || e.Step.GetError() == "" {
				t.Errorf("step event: %v", got)
			}
		case *lockstepv1.PairEvent_Resync:
			if e.Resync.GetOffset() != 1<<20 {
				t.Errorf("resync event: %v", got)
			}
		default:
			t.Errorf("unexpected oneof case %T", e)
		}
	}
	// Setting another case replaces the previous one.
	ev := events[1]
	ev.Event = &lockstepv1.PairEvent_CheckpointStats{CheckpointStats: &lockstepv1.CheckpointStats{Count: 9}}
	if ev.GetStateChange() != nil || ev.GetCheckpointStats().GetCount() != 9 {
		t.Errorf("oneof holds %v", ev.GetEvent())
	}
}

func TestAutoReprotectDefaultsOn(t *testing.T) {
	var nilSpec *lockstepv1.PairSpec
	off := false
	for _, c := range []struct {
		spec *lockstepv1.PairSpec
		want bool
	}{
		{nilSpec, true},
		{&lockstepv1.PairSpec{}, true},
		{&lockstepv1.PairSpec{AutoReprotect: proto.Bool(true)}, true},
		{&lockstepv1.PairSpec{AutoReprotect: &off}, false},
	} {
		// Presence survives the wire: an explicit false stays false, unset stays unset.
		b, err := proto.Marshal(c.spec)
		if err != nil {
			t.Fatal(err)
		}
		var out lockstepv1.PairSpec
		if err := proto.Unmarshal(b, &out); err != nil {
			t.Fatal(err)
		}
		if got := out.AutoReprotectEnabled(); got != c.want || c.spec.AutoReprotectEnabled() != c.want {
			t.Errorf("AutoReprotectEnabled(%v) = %v, want %v", c.spec, got, c.want)
		}
	}
}
