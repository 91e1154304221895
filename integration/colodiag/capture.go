// Package colodiag finds out why a COLO pair checkpoints: it records the frames that reach
// colo-compare (a packet capture of the primary's COLO channels), replays colo-compare's
// comparison of QEMU 11.1 over them, and attributes each checkpoint in the primary's trace to a
// cause: the timer, or the packet pair that did not match and why.
//
// It is a diagnostic for tests and benchmarks, not part of the agent: the capture needs root and
// costs a copy of every frame of the watched interface.
package colodiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Frame is one captured Ethernet frame.
type Frame struct {
	// Time is the kernel's receive timestamp.
	Time time.Time
	// Out is set for a frame this interface sent (PACKET_OUTGOING): on loopback every frame
	// shows up twice, once sent and once received; on a tap, a frame toward QEMU is sent.
	Out  bool
	Data []byte
}

// Capture records the frames of one interface until Stop.
type Capture struct {
	fd   int
	keep func(eth []byte, out bool) bool
	stop chan struct{}
	done chan struct{}

	mu     sync.Mutex
	frames []Frame
	drops  uint32
	err    error
}

// StartCapture opens a packet socket on the interface ifname and records its frames that keep
// selects (nil: all). enter, when not nil, runs its argument in the network namespace that holds
// the interface (netlab's Node.Do); the socket stays there.
func StartCapture(ifname string, enter func(func()) error, keep func(eth []byte, out bool) bool) (*Capture, error) {
	var fd int
	var err error
	open := func() { fd, err = openPacketSocket(ifname) }
	if enter != nil {
		if eerr := enter(open); eerr != nil {
			return nil, eerr
		}
	} else {
		open()
	}
	if err != nil {
		return nil, err
	}
	c := &Capture{fd: fd, keep: keep, stop: make(chan struct{}), done: make(chan struct{})}
	go c.run() // owned by the Capture: ends at Stop
	return c, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func openPacketSocket(ifname string) (int, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		return -1, fmt.Errorf("capture: %w", err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		return -1, fmt.Errorf("capture: packet socket: %w", err)
	}
	fail := func(what string, err error) (int, error) {
		unix.Close(fd)
		return -1, fmt.Errorf("capture on %s: %s: %w", ifname, what, err)
	}
	// Before the bind: frames of the bound interface are queued from the bind on, and the
	// first ones must not wait behind a small default buffer.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20); err != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 16<<20)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
		return fail("SO_TIMESTAMPNS", err)
	}
	// The reader wakes up every 100 ms to see whether it should stop.
	tv := unix.Timeval{Usec: 100000}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return fail("SO_RCVTIMEO", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		return fail("bind", err)
	}
	return fd, nil
}

func (c *Capture) run() {
	defer close(c.done)
	buf := make([]byte, 1<<16+64)
	oob := make([]byte, 256)
	for {
		select {
		case <-c.stop:
			return
		default:
		}
		n, oobn, flags, from, err := unix.Recvmsg(c.fd, buf, oob, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			return
		}
		if flags&unix.MSG_TRUNC != 0 {
			c.mu.Lock()
			c.drops++
			c.mu.Unlock()
			continue
		}
		ts := time.Now()
		if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, cm := range cms {
				if cm.Header.Level == unix.SOL_SOCKET && cm.Header.Type == unix.SCM_TIMESTAMPNS && len(cm.Data) >= 16 {
					sec := int64(binary.NativeEndian.Uint64(cm.Data[0:8]))
					nsec := int64(binary.NativeEndian.Uint64(cm.Data[8:16]))
					ts = time.Unix(sec, nsec)
				}
			}
		}
		out := false
		if ll, ok := from.(*unix.SockaddrLinklayer); ok {
			out = ll.Pkttype == unix.PACKET_OUTGOING
		}
		data := buf[:n]
		if c.keep != nil && !c.keep(data, out) {
			continue
		}
		c.mu.Lock()
		c.frames = append(c.frames, Frame{Time: ts, Out: out, Data: append([]byte(nil), data...)})
		c.mu.Unlock()
	}
}

// Stop ends the capture and returns its frames in the order the kernel delivered them, and
// an error if the capture lost frames or failed.
func (c *Capture) Stop() ([]Frame, error) {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
	st, serr := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS)
	unix.Close(c.fd)
	c.mu.Lock()
	defer c.mu.Unlock()
	var err error
	switch {
	case c.err != nil:
		err = fmt.Errorf("capture: %w", c.err)
	case serr == nil && st.Drops > 0:
		err = fmt.Errorf("capture: the kernel dropped %d frames", st.Drops)
	case c.drops > 0:
		err = fmt.Errorf("capture: %d frames longer than the buffer", c.drops)
	}
	return c.frames, err
}

// Frames returns a copy of the frames recorded so far.
func (c *Capture) Frames() []Frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Frame(nil), c.frames...)
}
