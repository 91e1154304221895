package controller

import (
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	"github.com/lockstepvm/lockstep/checkpoint"
)

// conflicts returns one FieldError for each resource of pc that another pair already uses:
// its MAC (anywhere: the pairs of one store share their networks), and on each host its sides
// run on, a disk image (of either side), a tap device or a hub port. Listen ports are not
// among them: the agents pick free ports at every protection. Two sides of pc itself on one
// host may not share a disk or a hub port either.
func conflicts(pc PairConfig, others map[string]PairConfig) []error {
	var errs []error
	names := make([]string, 0, len(others))
	for n := range others {
		if n != pc.Spec.Name {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	mac := strings.ToLower(pc.Spec.NIC.MAC)
	for _, n := range names {
		o := others[n]
		if mac != "" && strings.ToLower(o.Spec.NIC.MAC) == mac {
			errs = append(errs, &checkpoint.FieldError{Field: "nic.mac", Reason: fmt.Sprintf("%s is the MAC of pair %q", pc.Spec.NIC.MAC, n)})
		}
		for i, sd := range pc.Sides {
			for j, od := range o.Sides {
				if sd.Agent != od.Agent {
					continue
				}
				if samePath(sd.Disk, od.Disk) {
					errs = append(errs, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].disk", i), Reason: fmt.Sprintf("%s on host %s is the disk of pair %q (its %s side)", sd.Disk, sd.Agent, n, Side(j))})
				}
				if sd.NetSocket != "" && pc.Spec.NIC.Backend == "socket" && o.Spec.NIC.Backend == "socket" && sd.NetSocket == od.NetSocket {
					errs = append(errs, &checkpoint.FieldError{Field: fmt.Sprintf("sides[%d].net_socket", i), Reason: fmt.Sprintf("hub port %s on host %s is that of pair %q (its %s side)", sd.NetSocket, sd.Agent, n, Side(j))})
				}
			}
		}
		if t := pc.Spec.NIC.Tap; t != "" && pc.Spec.NIC.Backend == "tap" && o.Spec.NIC.Backend == "tap" && o.Spec.NIC.Tap == t && shareHost(pc, o) {
			errs = append(errs, &checkpoint.FieldError{Field: "nic.tap", Reason: fmt.Sprintf("tap device %s is that of pair %q on the same host", t, n)})
		}
	}
	if pc.Sides[0].Agent == pc.Sides[1].Agent {
		if samePath(pc.Sides[0].Disk, pc.Sides[1].Disk) {
			errs = append(errs, &checkpoint.FieldError{Field: "sides[1].disk", Reason: fmt.Sprintf("%s is also the primary's disk, on the same host", pc.Sides[1].Disk)})
		}
		if pc.Spec.NIC.Backend == "socket" && pc.Sides[0].NetSocket != "" && pc.Sides[0].NetSocket == pc.Sides[1].NetSocket {
			errs = append(errs, &checkpoint.FieldError{Field: "sides[1].net_socket", Reason: fmt.Sprintf("hub port %s is also the primary's, on the same host", pc.Sides[1].NetSocket)})
		}
	}
	return errs
}

func samePath(a, b string) bool {
	return a != "" && b != "" && filepath.Clean(a) == filepath.Clean(b)
}

// shareHost reports whether a and b have a side on the same host.
func shareHost(a, b PairConfig) bool {
	for _, x := range a.Sides {
		for _, y := range b.Sides {
			if x.Agent == y.Agent {
				return true
			}
		}
	}
	return false
}
