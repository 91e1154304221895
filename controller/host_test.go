package controller

import (
	"errors"
	"testing"
)

// Peer requests a side cannot take are refused with the right error and change nothing.
func TestHostPolicyRefusals(t *testing.T) {
	newSecondary := func(t *testing.T) *HostPolicy {
		h, err := NewHostPolicy(hostSimConfig, "b")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.Step(HPrepare{Gen: 1, Epoch: 7}); err != nil {
			t.Fatal(err)
		}
		h.Step(HPeerReply{SentAt: 0, View: PeerView{Role: RolePrimary, Epoch: 7, Gen: 1, Colo: true, StoreOK: true}})
		if h.Role() != RoleSecondary {
			t.Fatalf("role %s, want secondary", h.Role())
		}
		return h
	}
	for _, tc := range []struct {
		name string
		ev   HostEvent
		want error
	}{
		{"prepare with a stale epoch", HPrepare{Gen: 2, Epoch: 6}, ErrStaleEpoch},
		{"hand-over with a stale epoch", HHandOver{Epoch: 6}, ErrStaleEpoch},
		{"switchover asked of a secondary", HSwitchover{}, ErrWrongState},
		{"start asked of a secondary", HStart{}, ErrWrongState},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newSecondary(t)
			before := h.View()
			acts, err := h.Step(tc.ev)
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			if len(acts) != 0 || h.View() != before {
				t.Fatalf("a refused request changed things: actions %v, view %+v -> %+v", acts, before, h.View())
			}
		})
	}
	t.Run("hand-over to an idle side", func(t *testing.T) {
		h, _ := NewHostPolicy(hostSimConfig, "b")
		if _, err := h.Step(HHandOver{Epoch: 1}); !errors.Is(err, ErrWrongState) {
			t.Fatalf("error %v, want ErrWrongState", err)
		}
	})
	t.Run("bad timings", func(t *testing.T) {
		c := hostSimConfig
		c.FenceMargin = c.LeaseTTL
		if _, err := NewHostPolicy(c, "a"); err == nil {
			t.Fatal("a fence margin as long as the lease was accepted")
		}
	})
}
