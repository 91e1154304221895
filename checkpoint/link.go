package checkpoint

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The migration connection of a COLO pair carries every checkpoint (the primary's request,
// RAM and device state; the secondary's three replies) and nothing between checkpoints: QEMU
// has no COLO heartbeat. So the time since data last arrived on it tells whether the two QEMUs
// still exchange checkpoints, which is what lockstep's agents judge a peer by when its agent is
// silent. The agent opens both ends of the connection itself and keeps a copy of its end; an
// agent that restarts finds its copy again in its QEMU's file descriptors.

// LinkActivity is what TCP_INFO tells of a migration connection.
type LinkActivity struct {
	// Open: the connection is established (the peer has neither closed nor reset it).
	Open bool
	// SinceData is the time since data last arrived; SinceAck since the peer last acknowledged
	// ours.
	SinceData, SinceAck time.Duration
}

// ReadLinkActivity reads TCP_INFO of f, this process's copy of a migration connection.
func ReadLinkActivity(f *os.File) (LinkActivity, error) {
	sc, err := f.SyscallConn()
	if err != nil {
		return LinkActivity{}, err
	}
	var info *unix.TCPInfo
	var ierr error
	if err := sc.Control(func(fd uintptr) { info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		return LinkActivity{}, err
	}
	if ierr != nil {
		return LinkActivity{}, ierr
	}
	const established = 1 // TCP_ESTABLISHED
	return LinkActivity{Open: info.State == established,
		SinceData: time.Duration(info.Last_data_recv) * time.Millisecond,
		SinceAck:  time.Duration(info.Last_ack_recv) * time.Millisecond}, nil
}

// LinkAddrs are the two ends of a migration connection, as seen from one side.
type LinkAddrs struct {
	Local, Remote string
}

// SocketAddrs returns the local and remote addresses of a connected TCP socket.
func SocketAddrs(f *os.File) (LinkAddrs, error) {
	sc, err := f.SyscallConn()
	if err != nil {
		return LinkAddrs{}, err
	}
	var out LinkAddrs
	var serr error
	err = sc.Control(func(fd uintptr) { out, serr = fdAddrs(int(fd)) })
	if err != nil {
		return LinkAddrs{}, err
	}
	return out, serr
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	case *unix.SockaddrInet6:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	}
	return ""
}

func fdAddrs(fd int) (LinkAddrs, error) {
	l, err := unix.Getsockname(fd)
	if err != nil {
		return LinkAddrs{}, err
	}
	r, err := unix.Getpeername(fd)
	if err != nil {
		return LinkAddrs{}, err
	}
	return LinkAddrs{Local: sockaddrString(l), Remote: sockaddrString(r)}, nil
}

// FindSocket returns a copy of the TCP socket with addresses want among the file descriptors of
// the VM's QEMU process (pidfd_getfd), for an agent that lost its own copy when it restarted.
func (v *VM) FindSocket(want LinkAddrs) (*os.File, error) {
	pid := v.PID()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(pidfd)
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || !strings.HasPrefix(target, "socket:") {
			continue
		}
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fd, err := unix.PidfdGetfd(pidfd, n, 0)
		if err != nil {
			continue
		}
		got, err := fdAddrs(fd)
		if err == nil && got == want {
			return os.NewFile(uintptr(fd), "migration"), nil
		}
		unix.Close(fd)
	}
	return nil, errors.New("no socket of QEMU pid " + strconv.Itoa(pid) + " connects " + want.Local + " to " + want.Remote)
}

// Frozen reports whether the VM's QEMU is stopped by a signal (SIGSTOP): /proc's state T.
func (v *VM) Frozen() bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", v.PID()))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 || i+2 >= len(b) {
		return false
	}
	return b[i+2] == 'T'
}
