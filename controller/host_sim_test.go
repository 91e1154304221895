package controller

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"pgregory.net/rapid"
)

// A simulated world of two agents' HostPolicies, a coordination store with leases, the network
// between them, and the VMs, for the property tests. The world is deliberately harsh: the
// store answers at once (so a lease's expiry is as early as the policy can assume), while the
// replies and heartbeats arrive late or never.

type vmState int

const (
	vmNone vmState = iota
	vmRunning
	vmFrozen
)

type simVM struct {
	state   vmState
	primary bool // releases guest output (alone, or through COLO)
	colo    bool // a primary whose output goes through COLO with the secondary of gen
	gen     int
	log     []int // the records this VM has acknowledged, in order
}

type simHost struct {
	name  string
	pol   *HostPolicy
	alive bool
	vm    simVM
}

type simMsg struct {
	at int
	to int
	ev HostEvent
}

type simWorld struct {
	t       *rapid.T
	now     int
	cfg     HostConfig
	hosts   [2]*simHost
	storeUp bool
	toStore [2]bool
	linkAB  bool
	// The store.
	holder string
	epoch  uint64
	expiry int
	rev    uint64
	record PrimaryRecord
	// The network and pending work.
	msgs  []simMsg
	trace []string
	// What the clients saw: every acknowledged record, in order.
	client  []int
	nextRec int
	noDelay bool
}

func newSimWorld(t *rapid.T, cfg HostConfig) *simWorld {
	w := &simWorld{t: t, cfg: cfg, storeUp: true, toStore: [2]bool{true, true}, linkAB: true}
	for i, n := range []string{"a", "b"} {
		p, err := NewHostPolicy(cfg, n)
		if err != nil {
			t.Fatal(err)
		}
		w.hosts[i] = &simHost{name: n, pol: p, alive: true}
	}
	return w
}

func (w *simWorld) logf(format string, a ...any) {
	w.trace = append(w.trace, fmt.Sprintf("%4d ", w.now)+fmt.Sprintf(format, a...))
}

func (w *simWorld) fail(format string, a ...any) {
	tail := w.trace
	if len(tail) > 80 {
		tail = tail[len(tail)-80:]
	}
	w.t.Fatalf("%s\ntrace (last %d lines):\n%s", fmt.Sprintf(format, a...), len(tail), strings.Join(tail, "\n"))
}

func (w *simWorld) reachStore(i int) bool { return w.storeUp && w.toStore[i] && w.hosts[i].alive }

func (w *simWorld) delay() int {
	if w.noDelay {
		return 0
	}
	return rapid.IntRange(0, 1).Draw(w.t, "delay")
}

func (w *simWorld) send(to int, ev HostEvent, after int) {
	w.msgs = append(w.msgs, simMsg{at: w.now + after, to: to, ev: ev})
}

// step feeds an event to host i and carries out the actions.
func (w *simWorld) step(i int, ev HostEvent) {
	h := w.hosts[i]
	if !h.alive {
		return
	}
	before := h.pol.Role()
	acts, err := h.pol.Step(ev)
	routine := true
	for _, a := range acts {
		switch a.(type) {
		case ActHProbeStore, ActHRenew:
		default:
			routine = false
		}
	}
	if !routine || err != nil || before != h.pol.Role() {
		w.logf("%s %T%+v -> %s err=%v  [%s ep=%d held=%v fenced=%v colo=%v]", h.name, ev, ev, actsString(acts), err, h.pol.Role(), h.pol.Epoch(), h.pol.Holds(), h.pol.Fenced(), h.pol.Colo())
	}
	for _, a := range acts {
		w.do(i, a)
	}
}

func actsString(acts []HostAction) string {
	var b []string
	for _, a := range acts {
		b = append(b, fmt.Sprintf("%T%+v", a, a))
	}
	return "[" + strings.Join(b, " ") + "]"
}

func (w *simWorld) storeFree() bool { return w.holder == "" || w.now >= w.expiry }

// do carries out one action of host i, as the agent would.
func (w *simWorld) do(i int, a HostAction) {
	h, peer := w.hosts[i], 1-i
	switch a := a.(type) {
	case ActHAcquire:
		if !w.reachStore(i) {
			w.send(i, HStoreDown{}, 1+w.delay())
			return
		}
		if w.storeFree() {
			w.rev++
			w.holder, w.epoch, w.expiry = h.name, w.rev, w.now+w.cfg.LeaseTTL
			w.logf("store: %s acquires epoch %d (record %+v)", h.name, w.epoch, w.record)
			w.send(i, HLeaseAcquired{Epoch: w.epoch, SentAt: a.SentAt, Prev: w.record}, w.delay())
		} else {
			w.send(i, HLeaseHeld{Holder: LeaseHolder{Holder: w.holder, Epoch: w.epoch}}, w.delay())
		}
	case ActHRenew:
		if !w.reachStore(i) {
			w.send(i, HStoreDown{}, 1+w.delay())
			return
		}
		if !w.storeFree() && w.holder == h.name && w.epoch == h.pol.LeaseEpoch() {
			w.expiry = w.now + w.cfg.LeaseTTL
			w.send(i, HLeaseRenewed(a), w.delay())
		} else {
			w.send(i, HLeaseLost{}, w.delay())
		}
	case ActHRelease:
		if w.reachStore(i) && w.holder == h.name && w.epoch == a.Epoch {
			w.holder = ""
		}
	case ActHProbeStore:
		if !w.reachStore(i) {
			w.send(i, HStoreDown{}, 1+w.delay())
			return
		}
		lh := LeaseHolder{}
		if !w.storeFree() {
			lh = LeaseHolder{Holder: w.holder, Epoch: w.epoch}
		}
		w.send(i, HStoreOK{Holder: lh}, w.delay())
	case ActHMark:
		if w.reachStore(i) && !w.storeFree() && w.holder == h.name && w.epoch == a.Rec.Epoch {
			w.record = a.Rec
			w.send(i, HMarked(a), w.delay())
		}
	case ActHBoot:
		h.vm = simVM{state: vmRunning, primary: true}
		w.send(i, HBooted{}, 1+w.delay())
	case ActHPrepare:
		h.vm = simVM{state: vmRunning, gen: a.Gen}
		w.send(i, HPrepared(a), 1+w.delay())
	case ActHProtect:
		if !w.linkAB || !w.hosts[peer].alive {
			w.send(i, HProtectFailed{Gen: a.Gen, Err: "peer unreachable"}, 2)
			return
		}
		w.step(peer, HPrepare(a))
		w.msgs = append(w.msgs, simMsg{at: w.now + 2 + w.delay(), to: i, ev: simProtectDone{gen: a.Gen}})
	case ActHFence:
		if h.vm.state == vmRunning {
			h.vm.state = vmFrozen
		}
	case ActHUnfence:
		if h.vm.state == vmFrozen {
			h.vm.state = vmRunning
		}
	case ActHKill:
		h.vm = simVM{}
	case ActHSwitchover:
		h.vm = simVM{}
	case ActHTakeOver:
		if !w.reachStore(i) || w.storeFree() || w.holder != h.name || w.epoch != a.Rec.Epoch {
			w.send(i, HTakeoverFailed{Err: "store", StoreDown: true}, 1)
			return
		}
		w.record = a.Rec
		if h.vm.state == vmNone {
			w.send(i, HTakeoverFailed{Err: "no secondary"}, 1)
			return
		}
		h.vm.primary, h.vm.colo = true, false
		w.send(i, HTakeoverDone{}, 1+w.delay())
	case ActHGoAlone:
		if !w.reachStore(i) || w.storeFree() || w.holder != h.name || w.epoch != a.Rec.Epoch {
			w.send(i, HAloneFailed{Err: "store", StoreDown: true}, 1)
			return
		}
		w.record = a.Rec
		if h.vm.state == vmNone {
			w.send(i, HAloneFailed{Err: "no primary"}, 1)
			return
		}
		h.vm.colo = false
		w.send(i, HAloneDone{}, 1+w.delay())
	case ActHHandOver:
		if w.linkAB && w.hosts[peer].alive {
			w.step(peer, HHandOver{Epoch: a.Epoch})
		}
	case ActHTearDownPeer:
		if w.linkAB && w.hosts[peer].alive {
			w.step(peer, HTearDown(a))
		}
	default:
		w.fail("unknown action %T", a)
	}
}

// simProtectDone completes a protection: the world checks that it can (both VMs, the link).
type simProtectDone struct{ gen int }

func (simProtectDone) isHostEvent() {}

func (w *simWorld) deliver(m simMsg) {
	i := m.to
	h := w.hosts[i]
	if !h.alive {
		return
	}
	switch ev := m.ev.(type) {
	case simProtectDone:
		p := w.hosts[1-i]
		if w.linkAB && p.alive && p.vm.state == vmRunning && !p.vm.primary && p.vm.gen == ev.gen && h.vm.state == vmRunning && h.vm.primary {
			h.vm.colo, h.vm.gen = true, ev.gen
			p.vm.log = slices.Clone(h.vm.log)
			w.step(i, HProtected{Gen: ev.gen})
		} else {
			w.step(i, HProtectFailed{Gen: ev.gen, Err: "no secondary"})
		}
	case simHeartbeat:
		if !w.linkAB {
			return
		}
		// The receiver answers with its view and, maybe, its confirmation.
		w.step(i, HPeerRequest{View: ev.view})
		if !h.alive {
			return
		}
		v := h.pol.View()
		v.Confirm = h.pol.Confirm(ev.view)
		w.msgs = append(w.msgs, simMsg{at: w.now + w.delay(), to: 1 - i, ev: simHeartbeatReply{sentAt: ev.sentAt, view: v}})
	case simHeartbeatReply:
		if !w.linkAB {
			return
		}
		w.step(i, HPeerReply{SentAt: ev.sentAt, View: ev.view})
	default:
		w.step(i, m.ev)
	}
}

type simHeartbeat struct {
	sentAt int
	view   PeerView
}

func (simHeartbeat) isHostEvent() {}

type simHeartbeatReply struct {
	sentAt int
	view   PeerView
}

func (simHeartbeatReply) isHostEvent() {}

// releasing reports whether host i's VM can put guest output on the wire now.
func (w *simWorld) releasing(i int) bool {
	vm := w.hosts[i].vm
	if vm.state != vmRunning || !vm.primary {
		return false
	}
	if !vm.colo {
		return true
	}
	// Through COLO: only what the secondary produced too, so only with it there.
	p := w.hosts[1-i].vm
	return w.linkAB && p.state == vmRunning && !p.primary && p.gen == vm.gen
}

// advance runs one tick: messages due, heartbeats, the policies' ticks, the VMs' output, and
// the safety checks.
func (w *simWorld) advance() {
	w.now++
	due := w.msgs[:0:0]
	rest := w.msgs[:0:0]
	for _, m := range w.msgs {
		if m.at <= w.now {
			due = append(due, m)
		} else {
			rest = append(rest, m)
		}
	}
	w.msgs = rest
	for _, m := range due {
		w.deliver(m)
	}
	for i := range w.hosts {
		w.step(i, HTick{})
	}
	for i, h := range w.hosts {
		if h.alive && w.linkAB {
			w.msgs = append(w.msgs, simMsg{at: w.now + w.delay(), to: 1 - i, ev: simHeartbeat{sentAt: h.pol.Now(), view: h.pol.View()}})
		}
	}
	// The guest acknowledges one record per tick on the side that releases output.
	n := 0
	for i, h := range w.hosts {
		if !w.releasing(i) {
			continue
		}
		n++
		if !slices.Equal(h.vm.log[:min(len(h.vm.log), len(w.client))], w.client) || len(h.vm.log) < len(w.client) {
			w.fail("fork: %s acknowledges with %d records while clients saw %d acknowledged (a lost or forked history)", h.name, len(h.vm.log), len(w.client))
		}
		w.nextRec++
		h.vm.log = append(h.vm.log, w.nextRec)
		w.client = slices.Clone(h.vm.log)
		if h.vm.colo {
			w.hosts[1-i].vm.log = slices.Clone(h.vm.log) // the checkpoint
		}
		if !h.pol.Releasing() {
			w.fail("%s's VM releases output but its policy does not allow it", h.name)
		}
	}
	if n > 1 {
		w.fail("two VMs release output at once")
	}
}

// hostSimConfig: heartbeat timeout 5 ticks, lease 10, margin 2.
var hostSimConfig = HostConfig{HeartbeatTimeout: 5, LeaseTTL: 10, FenceMargin: 2, RenewEvery: 2, AcquireEvery: 3,
	StandDownAfter: 25, AutoReprotect: true, RetryTicks: 3, MaxRetryTicks: 12}

// runUntilProtected starts the pair on a and runs until both are in COLO.
func (w *simWorld) runUntilProtected(limit int) {
	w.step(0, HStart{})
	for k := 0; k < limit; k++ {
		w.advance()
		if w.protected() {
			return
		}
	}
	w.fail("the pair was not protected within %d ticks", limit)
}

func (w *simWorld) protected() bool {
	for i := range w.hosts {
		p, s := w.hosts[i], w.hosts[1-i]
		if p.alive && s.alive && p.pol.Role() == RolePrimary && p.pol.Colo() && s.pol.Role() == RoleSecondary && w.releasing(i) {
			return true
		}
	}
	return false
}

// TestHostPolicyProperties: random failures of one side (its QEMU, its host, its links), store
// outages, delays and lost messages never let two VMs release output at once and never fork
// the acknowledged history; and when the failing side's QEMUs never crash, healing everything
// brings the pair back, protected.
func TestHostPolicyProperties(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		w := newSimWorld(rt, hostSimConfig)
		w.runUntilProtected(60)
		victim := rapid.IntRange(0, 1).Draw(rt, "victim")
		crashes := rapid.Bool().Draw(rt, "crashes")
		steps := rapid.IntRange(20, 250).Draw(rt, "steps")
		for k := 0; k < steps; k++ {
			switch ev := rapid.IntRange(0, 30).Draw(rt, "env"); ev {
			case 1:
				w.linkAB = false
				w.logf("env: cut a-b")
			case 2:
				w.linkAB = true
				w.logf("env: heal a-b")
			case 3:
				w.toStore[victim] = false
				w.logf("env: cut %s-store", w.hosts[victim].name)
			case 4:
				w.toStore[victim] = true
				w.logf("env: heal %s-store", w.hosts[victim].name)
			case 5:
				w.storeUp = false
				w.logf("env: store down")
			case 6:
				w.storeUp = true
				w.logf("env: store up")
			case 7:
				for i := range w.hosts {
					if w.hosts[i].pol.Role() == RolePrimary {
						w.logf("env: operator switchover on %s", w.hosts[i].name)
						w.step(i, HSwitchover{})
					}
				}
			case 8:
				if crashes && w.hosts[victim].vm.state != vmNone {
					w.logf("env: %s's QEMU crashes", w.hosts[victim].name)
					w.hosts[victim].vm = simVM{}
					w.step(victim, HLocalFailed{Why: "exited"})
				}
			case 9:
				if crashes && w.hosts[victim].alive {
					w.logf("env: host %s lost", w.hosts[victim].name)
					w.hosts[victim].alive = false
					w.hosts[victim].vm = simVM{}
				}
			case 10:
				if !w.hosts[victim].alive {
					w.restart(victim)
				}
			}
			w.advance()
		}
		// Heal everything; the pair must come back if the failing side's QEMUs never crashed.
		w.linkAB, w.storeUp, w.toStore = true, true, [2]bool{true, true}
		if !w.hosts[victim].alive {
			w.restart(victim)
		}
		w.logf("env: all healed")
		for k := 0; k < 150 && !w.protected(); k++ {
			w.advance()
		}
		if !crashes && !w.protected() {
			w.fail("the pair is not protected 150 ticks after everything healed: a=%s b=%s", w.hosts[0].pol.Role(), w.hosts[1].pol.Role())
		}
	})
}

func (w *simWorld) restart(i int) {
	p, err := NewHostPolicy(w.cfg, w.hosts[i].name)
	if err != nil {
		w.t.Fatal(err)
	}
	w.hosts[i] = &simHost{name: w.hosts[i].name, pol: p, alive: true}
	w.logf("env: host %s back (a fresh agent, no VM)", w.hosts[i].name)
}

// TestHostPolicyStoreOutage: with both sides healthy and in COLO, an outage of the store alone
// (however long) fails nothing over and keeps the guest's output flowing: the secondary's
// confirmations stand in for the lease.
func TestHostPolicyStoreOutage(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		w := newSimWorld(rt, hostSimConfig)
		w.runUntilProtected(60)
		for k := rapid.IntRange(0, 20).Draw(rt, "before"); k > 0; k-- {
			w.advance()
		}
		w.storeUp = false
		w.logf("env: store down")
		outage := rapid.IntRange(20, 300).Draw(rt, "outage")
		for k := 0; k < outage; k++ {
			before := len(w.client)
			w.advance()
			if !w.protected() {
				w.fail("store outage: the pair left COLO at tick %d of the outage: a=%s b=%s", k, w.hosts[0].pol.Role(), w.hosts[1].pol.Role())
			}
			if len(w.client) == before && k > 0 {
				w.fail("store outage: no output released at tick %d of the outage", k)
			}
		}
		w.storeUp = true
		w.logf("env: store up")
		for k := 0; k < 50; k++ {
			w.advance()
		}
		if !w.protected() {
			w.fail("the pair is not protected 50 ticks after the store came back")
		}
		for _, h := range w.hosts {
			if h.pol.Failovers() != 0 {
				w.fail("%s failed over during a store outage", h.name)
			}
		}
	})
}
