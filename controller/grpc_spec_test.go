package controller

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

func bootSettleSpec(b *durationpb.Duration) *pb.PairSpec {
	return &pb.PairSpec{
		Name: "db1", MemoryMib: 128, Vcpus: 1, Machine: "pc", Accel: pb.Accel_ACCEL_TCG, DiskSizeBytes: 1 << 20,
		Nic:       &pb.Nic{Mac: "52:54:00:12:34:56", Model: "e1000", Backend: pb.NicBackend_NIC_BACKEND_SOCKET},
		Tunables:  &pb.Tunables{BootSettle: b},
		Primary:   &pb.Placement{Host: "127.0.0.1", DiskPath: "/d/a", NetSocket: "/s/a"},
		Secondary: &pb.Placement{Host: "127.0.0.1", DiskPath: "/d/b", NetSocket: "/s/b"},
	}
}

// boot_settle: unset takes the default (15 s under TCG), zero means none, a duration is kept,
// and each survives the trip back to the API; a negative one is refused, naming the field.
func TestBootSettleFromProto(t *testing.T) {
	for _, tc := range []struct {
		in   *durationpb.Duration
		want time.Duration // after the spec's defaults
	}{
		{nil, 15 * time.Second},
		{durationpb.New(0), -1},
		{durationpb.New(40 * time.Second), 40 * time.Second},
	} {
		pc, err := PairConfigFromProto(bootSettleSpec(tc.in))
		if err != nil {
			t.Fatalf("%v: %v", tc.in, err)
		}
		if got := pc.Spec.WithDefaults().Tunables.BootSettle; got != tc.want {
			t.Errorf("boot_settle %v: %v, want %v", tc.in, got, tc.want)
		}
		back, err := PairConfigFromProto(PairSpecToProto(pc))
		if err != nil {
			t.Fatal(err)
		}
		if got := back.Spec.WithDefaults().Tunables.BootSettle; got != tc.want {
			t.Errorf("boot_settle %v after a round trip: %v, want %v", tc.in, got, tc.want)
		}
	}
	_, err := PairConfigFromProto(bootSettleSpec(durationpb.New(-time.Second)))
	if err == nil || !strings.Contains(err.Error(), "tunables.boot_settle") {
		t.Fatalf("negative boot_settle: err %v, want one naming tunables.boot_settle", err)
	}
}
