// Package pairspec is the pair spec that people write: a versioned manifest (apiVersion
// lockstep.dev/v1, kind Pair) in plain words and units (accel: tcg, memory: 512Mi, disk: {size:
// 64Gi}, checkpointDelay: 200ms), decoded strictly (an unknown or misspelt field is refused
// with its line and column, and every refusal names its field) and mapped to and from the API's
// protobuf PairSpec. Encoding a Pair gives the same format back, so that a pair printed by
// `lockstepctl get -o yaml` can be created again from that output.
//
// The package depends on the API's protobuf only: the CLI uses it, and the agent validates
// again whatever it is sent.
package pairspec

import "time"

// APIVersion is the version of the format this package reads and writes.
const APIVersion = "lockstep.dev/v1"

// Kinds of documents.
const (
	KindPair     = "Pair"
	KindPairList = "PairList"
)

// Pair is a protected VM as a manifest: what the operator asks for (Spec) and, on output only,
// how it is doing (Status). Status is ignored when a Pair is decoded, as kubectl ignores the
// status of what it creates.
type Pair struct {
	APIVersion string   `yaml:"apiVersion" json:"apiVersion"`
	Kind       string   `yaml:"kind" json:"kind"`
	Metadata   Metadata `yaml:"metadata" json:"metadata"`
	Spec       Spec     `yaml:"spec" json:"spec"`
	Status     *Status  `yaml:"status,omitempty" json:"status,omitempty" decode:"ignore"`

	// at locates a field in the document the Pair was decoded from.
	at func(field string) (line, col int)
}

// Position is where field (a path such as spec.disk.size) is in the document the Pair was
// decoded from, or where its nearest parent is; 0, 0 for a Pair that was not decoded.
func (p *Pair) Position(field string) (line, col int) {
	if p.at == nil {
		return 0, 0
	}
	return p.at(field)
}

// PairList is several pairs, as `lockstepctl get` without a name prints them.
type PairList struct {
	APIVersion string `yaml:"apiVersion" json:"apiVersion"`
	Kind       string `yaml:"kind" json:"kind"`
	Items      []Pair `yaml:"items" json:"items"`
}

// Metadata names the pair.
type Metadata struct {
	// Name is unique among pairs: 1-63 letters, digits, '-' or '_', starting with a letter or
	// digit.
	Name string `yaml:"name" json:"name"`
}

// Spec is what both QEMUs of the pair share, and where each side runs. Unset fields take the
// defaults noted on each.
type Spec struct {
	// Memory is the guest's memory, a whole number of MiB from 64Mi to 1Ti; 512Mi by default.
	Memory Bytes `yaml:"memory,omitempty" json:"memory,omitempty"`
	// VCPUs is the number of virtual CPUs, 1 to 255; 1 by default.
	VCPUs uint32 `yaml:"vcpus,omitempty" json:"vcpus,omitempty"`
	// Machine is the QEMU machine type: "pc", the default and the only one accepted (q35
	// crashes the COLO secondary at its first checkpoint on QEMU 7.2).
	Machine string `yaml:"machine,omitempty" json:"machine,omitempty"`
	// Accel is the accelerator: auto (the default: kvm when /dev/kvm opens, tcg otherwise),
	// kvm or tcg.
	Accel string `yaml:"accel,omitempty" json:"accel,omitempty"`
	// Boot boots a kernel directly; unset, the guest boots from its disk.
	Boot *Boot `yaml:"boot,omitempty" json:"boot,omitempty"`
	// Disk is the VM's disk: its size, and where its image is on each side.
	Disk Disk `yaml:"disk" json:"disk"`
	// NIC is the guest's network card and how it reaches the host's network.
	NIC NIC `yaml:"nic" json:"nic"`
	// QEMUCommand is the command prefix that runs qemu-system-x86_64; [qemu-system-x86_64] by
	// default.
	QEMUCommand []string `yaml:"qemuCommand,omitempty" json:"qemuCommand,omitempty"`
	// QEMUImgCommand is the command prefix that runs qemu-img; [qemu-img] by default.
	QEMUImgCommand []string `yaml:"qemuImgCommand,omitempty" json:"qemuImgCommand,omitempty"`
	// Tunables are the COLO knobs, written at the level of the spec.
	Tunables `yaml:",inline"`
	// AutoReprotect says whether the agents protect the pair again by themselves once it runs
	// unprotected and a secondary can be had; true by default.
	AutoReprotect *bool `yaml:"autoReprotect,omitempty" json:"autoReprotect,omitempty"`
	// RestartPolicy is what the agents do when the only running copy of the VM dies: always
	// (the default) boots it again, cold, from the disk of the side that ran it last; never
	// leaves the pair failed until "lockstepctl start".
	RestartPolicy string `yaml:"restartPolicy,omitempty" json:"restartPolicy,omitempty"`
	// Primary is where the side that starts as primary runs.
	Primary Placement `yaml:"primary" json:"primary"`
	// Secondary is where the side that starts as secondary runs.
	Secondary Placement `yaml:"secondary" json:"secondary"`
}

// Boot is a kernel booted directly (QEMU's -kernel, -initrd and -append).
type Boot struct {
	Kernel  string `yaml:"kernel,omitempty" json:"kernel,omitempty"`
	Initrd  string `yaml:"initrd,omitempty" json:"initrd,omitempty"`
	Cmdline string `yaml:"cmdline,omitempty" json:"cmdline,omitempty"`
}

// Disk is the pair's disk. Every image of the pair has Size (the replication driver requires
// equal sizes). Path and Format apply to both sides unless a placement names its own.
type Disk struct {
	// Size is the virtual size, a multiple of 512 bytes: 64Gi, 1Ti, 67108864.
	Size Bytes `yaml:"size" json:"size"`
	// Path is the image's path on each host (the primary's image, the secondary's replica).
	Path string `yaml:"path,omitempty" json:"path,omitempty"`
	// Format is raw (the default) or qcow2.
	Format string `yaml:"format,omitempty" json:"format,omitempty"`
}

// NIC is the guest's network card and its host backend. The backend follows from what is set:
// tap (a tap interface), bridge (a Linux bridge, through qemu-bridge-helper), or backend: socket
// (a QEMU socket netdev joined to a hub through each placement's netSocket; single-machine
// tests).
type NIC struct {
	// MAC is six hex pairs separated by ':', the same on both sides.
	MAC string `yaml:"mac" json:"mac"`
	// Model is e1000 (the default), rtl8139 or virtio-net-pci.
	Model string `yaml:"model,omitempty" json:"model,omitempty"`
	// Backend is tap, bridge or socket; it may be left out when tap or bridge is set.
	Backend string `yaml:"backend,omitempty" json:"backend,omitempty"`
	// Tap is the tap interface's name.
	Tap string `yaml:"tap,omitempty" json:"tap,omitempty"`
	// Bridge is the bridge's name.
	Bridge string `yaml:"bridge,omitempty" json:"bridge,omitempty"`
}

// Tunables are the COLO knobs of a pair; unset ones take their defaults.
type Tunables struct {
	// CheckpointDelay is the longest time between two checkpoints, 10ms to 1h; 200ms by
	// default. A packet mismatch triggers a checkpoint sooner.
	CheckpointDelay Duration `yaml:"checkpointDelay,omitempty" json:"checkpointDelay,omitempty"`
	// CompareTimeout is how long colo-compare holds a primary packet that has no secondary twin
	// yet, 10ms to 1m; 3s by default.
	CompareTimeout Duration `yaml:"compareTimeout,omitempty" json:"compareTimeout,omitempty"`
	// MaxBandwidth caps the checkpoint stream, in bytes per second (100Mi/s, 1G/s); unset
	// leaves QEMU's default.
	MaxBandwidth BytesPerSecond `yaml:"maxBandwidth,omitempty" json:"maxBandwidth,omitempty"`
	// Rewriter is QEMU's filter-rewriter on the secondary, on by default: it lets TCP
	// connections opened between two checkpoints survive a failover. Fixed at creation.
	Rewriter *bool `yaml:"rewriter,omitempty" json:"rewriter,omitempty"`
	// BootSettle is how long a primary that booted the guest runs before its first protection
	// starts, at most 10m. Unset: 15s under TCG, none under KVM; 0s (or none): none. Fixed at
	// creation.
	BootSettle *Duration `yaml:"bootSettle,omitempty" json:"bootSettle,omitempty"`
	// ReplicationTLS says whether the channels between the pair's two QEMUs (the checkpoint
	// stream, the disk writes over NBD, the mirrored and compared network traffic) run over TLS
	// with the hosts' certificates: auto (the default: encrypted when the sides run on two
	// hosts), on or off.
	ReplicationTLS string `yaml:"replicationTLS,omitempty" json:"replicationTLS,omitempty"`
}

// Placement is where one side of the pair runs.
type Placement struct {
	// Host names the agent that runs this side, as that agent names itself (on a single host,
	// its IP address will do).
	Host string `yaml:"host" json:"host"`
	// Address is the IP address this side listens on for its peer's data channels; Host when
	// unset (which then must be an IP address).
	Address string `yaml:"address,omitempty" json:"address,omitempty"`
	// Disk overrides spec.disk's path or format for this side.
	Disk *PlacementDisk `yaml:"disk,omitempty" json:"disk,omitempty"`
	// NetSocket is the host:port of this side's hub port; required with nic.backend: socket.
	NetSocket string `yaml:"netSocket,omitempty" json:"netSocket,omitempty"`
}

// PlacementDisk is one side's own disk image.
type PlacementDisk struct {
	Path   string `yaml:"path,omitempty" json:"path,omitempty"`
	Format string `yaml:"format,omitempty" json:"format,omitempty"`
}

// Status is how a pair is doing, as the agent reports it (output only).
type Status struct {
	State        string      `yaml:"state" json:"state"`
	Reason       string      `yaml:"reason,omitempty" json:"reason,omitempty"`
	Since        *time.Time  `yaml:"since,omitempty" json:"since,omitempty"`
	Primary      *SideStatus `yaml:"primary,omitempty" json:"primary,omitempty"`
	Secondary    *SideStatus `yaml:"secondary,omitempty" json:"secondary,omitempty"`
	Generation   uint64      `yaml:"generation" json:"generation"`
	Epoch        uint64      `yaml:"epoch,omitempty" json:"epoch,omitempty"`
	StoreReached bool        `yaml:"storeReachable" json:"storeReachable"`
	Peer         *PeerStatus `yaml:"peer,omitempty" json:"peer,omitempty"`
	Checkpoints  *Checkpoint `yaml:"checkpoints,omitempty" json:"checkpoints,omitempty"`
	Resync       *Resync     `yaml:"resync,omitempty" json:"resync,omitempty"`
	CurrentStep  *Step       `yaml:"currentStep,omitempty" json:"currentStep,omitempty"`
	LastFailover *Failover   `yaml:"lastFailover,omitempty" json:"lastFailover,omitempty"`
	Tunables     *Tunables   `yaml:"tunables,omitempty" json:"tunables,omitempty"`
}

// SideStatus is one QEMU of the pair.
type SideStatus struct {
	Host        string `yaml:"host,omitempty" json:"host,omitempty"`
	Running     bool   `yaml:"running" json:"running"`
	Colo        string `yaml:"colo,omitempty" json:"colo,omitempty"`
	QEMUVersion string `yaml:"qemuVersion,omitempty" json:"qemuVersion,omitempty"`
}

// PeerStatus is the agent's link to the pair's other agent.
type PeerStatus struct {
	Reachable     bool       `yaml:"reachable" json:"reachable"`
	LastHeartbeat *time.Time `yaml:"lastHeartbeat,omitempty" json:"lastHeartbeat,omitempty"`
}

// Checkpoint is the checkpoint statistics of the current protection generation.
type Checkpoint struct {
	Count uint64 `yaml:"count" json:"count"`
	// Mismatch counts the checkpoints a packet mismatch triggered (sooner than the delay).
	Mismatch  uint64     `yaml:"mismatch" json:"mismatch"`
	PerSecond float64    `yaml:"perSecond" json:"perSecond"`
	PauseP50  Duration   `yaml:"pauseP50,omitempty" json:"pauseP50,omitempty"`
	PauseP99  Duration   `yaml:"pauseP99,omitempty" json:"pauseP99,omitempty"`
	PauseMax  Duration   `yaml:"pauseMax,omitempty" json:"pauseMax,omitempty"`
	PauseMean Duration   `yaml:"pauseMean,omitempty" json:"pauseMean,omitempty"`
	Last      *time.Time `yaml:"last,omitempty" json:"last,omitempty"`
	LastBytes uint64     `yaml:"lastBytes,omitempty" json:"lastBytes,omitempty"`
	MeanBytes uint64     `yaml:"meanBytes,omitempty" json:"meanBytes,omitempty"`
}

// Resync is the progress of the copy of the primary's disk to a joining secondary.
type Resync struct {
	CopiedBytes uint64 `yaml:"copiedBytes" json:"copiedBytes"`
	TotalBytes  uint64 `yaml:"totalBytes" json:"totalBytes"`
}

// Step is one step of a named COLO sequence.
type Step struct {
	Sequence string   `yaml:"sequence" json:"sequence"`
	Step     string   `yaml:"step" json:"step"`
	Index    uint32   `yaml:"index" json:"index"`
	Total    uint32   `yaml:"total" json:"total"`
	Phase    string   `yaml:"phase,omitempty" json:"phase,omitempty"`
	Elapsed  Duration `yaml:"elapsed,omitempty" json:"elapsed,omitempty"`
	Error    string   `yaml:"error,omitempty" json:"error,omitempty"`
}

// Failover is one failover of the pair.
type Failover struct {
	Started    *time.Time `yaml:"started,omitempty" json:"started,omitempty"`
	Trigger    string     `yaml:"trigger,omitempty" json:"trigger,omitempty"`
	Reason     string     `yaml:"reason,omitempty" json:"reason,omitempty"`
	Sequence   string     `yaml:"sequence,omitempty" json:"sequence,omitempty"`
	Took       Duration   `yaml:"took,omitempty" json:"took,omitempty"`
	From       string     `yaml:"from,omitempty" json:"from,omitempty"`
	To         string     `yaml:"to,omitempty" json:"to,omitempty"`
	Succeeded  bool       `yaml:"succeeded" json:"succeeded"`
	FailedStep string     `yaml:"failedStep,omitempty" json:"failedStep,omitempty"`
	Error      string     `yaml:"error,omitempty" json:"error,omitempty"`
}
