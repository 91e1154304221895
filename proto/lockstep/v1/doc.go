// Package lockstepv1 is the gRPC API of lockstep: PairService for operators and PeerService
// between the two agents of a pair. lockstep.proto documents every call and message; the
// *.pb.go files are generated from it by scripts/proto.sh (make proto) and committed. This file
// is written by hand.
package lockstepv1

// AutoReprotectEnabled reports whether the pair re-protects itself after running unprotected:
// auto_reprotect is on unless set to false. (GetAutoReprotect reports false when it is unset.)
func (x *PairSpec) AutoReprotectEnabled() bool {
	return x == nil || x.AutoReprotect == nil || *x.AutoReprotect
}
