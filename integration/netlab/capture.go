package netlab

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Frame is one Ethernet frame a capture saw.
type Frame struct {
	Time time.Time
	// FromVM: the frame came from the VM behind the tap (QEMU wrote it), not from the node.
	FromVM   bool
	Src, Dst net.HardwareAddr
	Type     uint16 // EtherType
	Len      int
}

// Capture records the frames crossing a tap device of a node, until Stop.
type Capture struct {
	fd     int
	wg     sync.WaitGroup
	mu     sync.Mutex
	closed bool
	frames []Frame
	err    error
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Capture starts recording the frames on the node's device dev (a tap: frames the VM sends
// arrive on it as received).
func (n *Node) Capture(dev string) (*Capture, error) {
	ifi, err := n.interfaceIndex(dev)
	if err != nil {
		return nil, err
	}
	var fd int
	var serr error
	if err := n.inNS(func() {
		fd, serr = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if serr != nil {
			return
		}
		serr = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi})
		if serr != nil {
			unix.Close(fd)
		}
	}); err != nil {
		return nil, err
	}
	if serr != nil {
		return nil, fmt.Errorf("netlab: capture on %s in %s: %w", dev, n.name, serr)
	}
	// Reads wake up now and then to see whether Stop was called.
	tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	c := &Capture{fd: fd}
	c.wg.Add(1)
	go c.read()
	return c, nil
}

func (n *Node) interfaceIndex(dev string) (int, error) {
	var idx int
	var ierr error
	if err := n.inNS(func() {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			ierr = err
			return
		}
		idx = ifi.Index
	}); err != nil {
		return 0, err
	}
	if ierr != nil {
		return 0, fmt.Errorf("netlab: %s in %s: %w", dev, n.name, ierr)
	}
	return idx, nil
}

func (c *Capture) read() {
	defer c.wg.Done()
	buf := make([]byte, 65536)
	for {
		nr, from, err := unix.Recvfrom(c.fd, buf, 0)
		c.mu.Lock()
		closed := c.closed
		c.mu.Unlock()
		if closed {
			return
		}
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			c.mu.Lock()
			c.err = err
			c.mu.Unlock()
			return
		}
		if nr < 14 {
			continue
		}
		ll, _ := from.(*unix.SockaddrLinklayer)
		f := Frame{Time: time.Now(), Len: nr, Dst: append(net.HardwareAddr(nil), buf[0:6]...), Src: append(net.HardwareAddr(nil), buf[6:12]...),
			Type: uint16(buf[12])<<8 | uint16(buf[13])}
		f.FromVM = ll == nil || ll.Pkttype != unix.PACKET_OUTGOING
		c.mu.Lock()
		c.frames = append(c.frames, f)
		c.mu.Unlock()
	}
}

// Frames returns what the capture saw so far.
func (c *Capture) Frames() []Frame {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Frame(nil), c.frames...)
}

// Stop ends the capture and returns every frame it saw, and the error that ended it early if
// one did.
func (c *Capture) Stop() ([]Frame, error) {
	c.mu.Lock()
	already := c.closed
	c.closed = true
	c.mu.Unlock()
	c.wg.Wait()
	if !already {
		unix.Close(c.fd)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames, c.err
}
