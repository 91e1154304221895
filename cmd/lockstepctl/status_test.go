package main

import (
	"bytes"
	"strings"
	"testing"

	pb "github.com/lockstepvm/lockstep/proto/lockstep/v1"
)

// The status table shows a two-host pair's fencing epoch and says when the store or the peer
// agent is unreachable; a single-host pair (epoch 0) shows none of it.
func TestStatusTableTwoHosts(t *testing.T) {
	for _, tc := range []struct {
		name     string
		st       *pb.PairStatus
		want     []string
		wantNone []string
	}{
		{"store down", &pb.PairStatus{State: pb.PairState_PAIR_STATE_PROTECTED, Epoch: 9, StoreReachable: false, Peer: &pb.PeerStatus{Reachable: true}},
			[]string{"epoch:", "9", "store:", "UNREACHABLE (the pair runs on", "peer agent:", "reachable"}, nil},
		{"peer lost", &pb.PairStatus{State: pb.PairState_PAIR_STATE_DEGRADED, Epoch: 12, StoreReachable: true, Peer: &pb.PeerStatus{}},
			[]string{"epoch:", "12", "store:", "reachable", "peer agent:", "UNREACHABLE"}, nil},
		{"single host", &pb.PairStatus{State: pb.PairState_PAIR_STATE_PROTECTED, StoreReachable: true, Peer: &pb.PeerStatus{Reachable: true}},
			nil, []string{"epoch:", "store:", "peer agent:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			a := &app{output: "table", out: &out}
			if err := a.printStatus(&pb.Pair{Spec: &pb.PairSpec{Name: "db1"}, Status: tc.st}); err != nil {
				t.Fatal(err)
			}
			for _, w := range tc.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("status lacks %q:\n%s", w, out.String())
				}
			}
			for _, w := range tc.wantNone {
				if strings.Contains(out.String(), w) {
					t.Errorf("status of a single-host pair shows %q:\n%s", w, out.String())
				}
			}
		})
	}
}
