package checkpoint

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Object and node names of the COLO wiring; the sequences refer to them.
const (
	NetdevID      = "hn0"
	QuorumNode    = "colo-disk0"
	ReplicaNode   = "parent0" // secondary: the replica exported over NBD
	ReplicationID = "childs0" // secondary: the replication driver node
	SinkChardev   = "sink0"   // secondary: where the hub's direct copies of input go (socket backend)
	QuorumChild1  = "children.1"
	chMirror      = "mirror0"
	chCompare     = "compare1"
	chCompareIn   = "compare0"
	chCompareIn0  = "compare0-0"
	chCompareOut  = "compare_out"
	chCompareOut0 = "compare_out0"
	objMirror     = "m0"
	objRedirIn    = "redire0"
	objRedirOut   = "redire1"
	objIOThread   = "iothread1"
	objCompare    = "comp0"
	secRed0       = "red0"
	secRed1       = "red1"
	secF1         = "f1"
	secF2         = "f2"
	secRewriter   = "rew0"
)

// QMPSocket returns the path of the QMP socket of the QEMU whose runtime folder is dir.
func QMPSocket(dir string) string { return filepath.Join(dir, "qmp.sock") }

// ConsoleSocket returns the path of the serial console's socket of the QEMU whose runtime
// folder is dir: one client at a time reads what the guest writes and types to it. Everything
// the guest writes is also in ConsoleLog, connected or not.
func ConsoleSocket(dir string) string { return filepath.Join(dir, "console.sock") }

// ConsoleLog returns the path of the serial console's log of the QEMU whose runtime folder
// is dir.
func ConsoleLog(dir string) string { return filepath.Join(dir, "console.log") }

func accelArg(a string) string {
	switch a {
	case "auto":
		if f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0); err == nil {
			f.Close()
			return "kvm"
		}
		return "tcg"
	default:
		return a
	}
}

// commonArgs are the arguments both sides share: machine, CPU, memory, boot, NIC device.
func commonArgs(s Spec, role Role, side Side) []string {
	args := []string{
		"-name", s.Name + "-" + string(role),
		"-machine", s.Machine,
		"-accel", accelArg(s.Accel),
		"-m", strconv.Itoa(s.MemoryMiB),
		"-smp", strconv.Itoa(s.VCPUs),
		"-nodefaults", "-display", "none",
		"-qmp", "unix:" + QMPSocket(side.RunDir) + ",server=on,wait=off",
		"-chardev", fmt.Sprintf("socket,id=serial0,path=%s,server=on,wait=off,logfile=%s,logappend=on",
			escapeOpt(ConsoleSocket(side.RunDir)), escapeOpt(ConsoleLog(side.RunDir))),
		"-serial", "chardev:serial0",
		"-pidfile", filepath.Join(side.RunDir, "qemu.pid"),
	}
	if s.Kernel != "" {
		args = append(args, "-kernel", s.Kernel)
		if s.Initrd != "" {
			args = append(args, "-initrd", s.Initrd)
		}
		if s.Append != "" {
			args = append(args, "-append", s.Append)
		}
	}
	var netdev string
	switch s.NIC.Backend {
	case "tap":
		netdev = fmt.Sprintf("tap,id=%s,ifname=%s,script=no,downscript=no,vhost=off", NetdevID, s.NIC.Tap)
	case "bridge":
		netdev = fmt.Sprintf("bridge,id=%s,br=%s", NetdevID, s.NIC.Bridge)
	case "socket":
		netdev = fmt.Sprintf("socket,id=%s,connect=%s", NetdevID, side.NetSocket)
	}
	args = append(args,
		"-netdev", netdev,
		"-device", fmt.Sprintf("%s,id=e0,netdev=%s,mac=%s", s.NIC.Model, NetdevID, strings.ToLower(s.NIC.MAC)),
	)
	return args
}

func diskFormat(side Side) string {
	if side.DiskFormat == "" {
		return "raw"
	}
	return side.DiskFormat
}

// PrimaryArgs returns the arguments (after the QEMU command prefix) of a primary that boots
// unprotected: its disk is a quorum of one child, so that protection can add the secondary's
// replica as a second child without restarting it. The COLO network channels and filters are
// added at protection time (StartProtection).
func PrimaryArgs(s Spec, side Side) []string {
	args := commonArgs(s, RolePrimary, side)
	args = append(args,
		"-drive", fmt.Sprintf("if=ide,id=%s,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=%s,children.0.driver=%s",
			QuorumNode, escapeOpt(side.Disk), diskFormat(side)),
	)
	return args
}

// SecondaryArgs returns the arguments of a secondary that waits for the primary on
// side.Host:ports.Migration, or for a migration connection passed to it later when
// ports.Migration is 0. primaryHost is where the primary listens for the mirror and compare
// channels of this generation.
func SecondaryArgs(s Spec, side Side, primaryHost string, ports Ports) []string {
	args := commonArgs(s, RoleSecondary, side)
	// The secondary starts before the primary's channel servers exist and retries until they
	// do: as often as the QEMU allows (QEMU 7.2 counts in whole seconds).
	reconnect := "reconnect=1"
	if s.QEMUVersion.AtLeast(9, 2) {
		reconnect = "reconnect-ms=100"
	}
	f1 := fmt.Sprintf("filter-redirector,id=%s,netdev=%s,queue=tx,indev=%s%s", secF1, NetdevID, secRed0, vnetOpt(s))
	// Only the primary's mirrored copy of the guest's input may reach the secondary's guest.
	// Its own backend delivers frames too: every frame on the test hub, and on a bridge the
	// broadcasts and any frame flooded before the bridge learnt the guest's MAC; each would
	// arrive twice. f1 sends them to a null chardev; at failover f1 goes and the backend's
	// frames reach the guest.
	args = append(args, "-chardev", "null,id="+SinkChardev)
	f1 += ",outdev=" + SinkChardev
	args = append(args, secondaryTLSArgs(side)...) // tls.go
	args = append(args,
		"-chardev", fmt.Sprintf("socket,id=%s,host=%s,port=%d,%s", secRed0, primaryHost, ports.Mirror, reconnect)+secondaryChardevTLS(side),
		"-chardev", fmt.Sprintf("socket,id=%s,host=%s,port=%d,%s", secRed1, primaryHost, ports.Compare, reconnect)+secondaryChardevTLS(side),
		"-object", f1,
		"-object", fmt.Sprintf("filter-redirector,id=%s,netdev=%s,queue=rx,outdev=%s%s", secF2, NetdevID, secRed1, vnetOpt(s)),
	)
	if !s.Tunables.NoRewriter {
		args = append(args, "-object", fmt.Sprintf("filter-rewriter,id=%s,netdev=%s,queue=all%s", secRewriter, NetdevID, vnetOpt(s)))
	}
	args = append(args,
		"-drive", fmt.Sprintf("if=none,id=%s,file.filename=%s,driver=%s", ReplicaNode, escapeOpt(side.Disk), diskFormat(side)),
		"-drive", fmt.Sprintf("if=none,id=%s,driver=replication,mode=secondary,file.driver=qcow2,top-id=%s,"+
			"file.file.filename=%s,file.backing.driver=qcow2,file.backing.file.filename=%s,file.backing.backing=%s",
			ReplicationID, QuorumNode, escapeOpt(side.Active), escapeOpt(side.Hidden), ReplicaNode),
		"-drive", fmt.Sprintf("if=ide,id=%s,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0=%s", QuorumNode, ReplicationID),
	)
	if ports.Migration == 0 {
		// The agent accepts the migration connection itself and hands it over with
		// migrate-incoming fd: (see ProtectConfig.AcceptMigration).
		args = append(args, "-incoming", "defer")
	} else {
		args = append(args, "-incoming", fmt.Sprintf("tcp:%s:%d", side.Host, ports.Migration))
	}
	return args
}

// VnetHdr reports whether the guest's NIC exchanges frames with its backend behind a
// virtio-net header: a virtio-net NIC on a tap (lockstep leaves the tap's vnet_hdr at QEMU's
// default, on where the kernel has it) or on a bridge (QEMU's bridge helper always opens the
// tap with it). Every COLO filter and colo-compare must then be told (vnet_hdr_support), or
// they take the header for the start of the Ethernet frame and no packet ever compares equal.
// The e1000 and rtl8139 models never use the header, whatever the backend offers.
func VnetHdr(s Spec) bool {
	return s.NIC.Model == "virtio-net-pci" && (s.NIC.Backend == "tap" || s.NIC.Backend == "bridge")
}

// vnetOpt is the filters' command-line option for VnetHdr.
func vnetOpt(s Spec) string {
	if VnetHdr(s) {
		return ",vnet_hdr_support=on"
	}
	return ""
}

// escapeOpt doubles commas, QEMU's escape inside an option value.
func escapeOpt(v string) string { return strings.ReplaceAll(v, ",", ",,") }
