package netlab

import (
	"bytes"
	"net"
	"os"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// openTap attaches to the node's tap device as QEMU does (/dev/net/tun, TUNSETIFF), from inside
// the node's namespace.
func openTap(t *testing.T, n *Node, name string) *os.File {
	t.Helper()
	var f *os.File
	var oerr error
	if err := n.inNS(func() {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			oerr = err
			return
		}
		var req [unix.IFNAMSIZ + 64]byte
		copy(req[:], name)
		*(*uint16)(unsafe.Pointer(&req[unix.IFNAMSIZ])) = unix.IFF_TAP | unix.IFF_NO_PI
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req[0]))); errno != 0 {
			unix.Close(fd)
			oerr = errno
			return
		}
		f = os.NewFile(uintptr(fd), name)
	}); err != nil {
		t.Fatal(err)
	}
	if oerr != nil {
		t.Skipf("cannot attach to a tap device here: %v", oerr)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// A capture on a tap sees the frames the VM side writes, marked as the VM's, with their
// addresses.
func TestCaptureSeesTheVMsFrames(t *testing.T) {
	lab := New(t, Options{})
	a := lab.Node("A")
	tap, err := a.AddTap("vm0")
	if err != nil {
		t.Fatal(err)
	}
	f := openTap(t, a, tap)
	c, err := a.Capture(tap)
	if err != nil {
		t.Fatal(err)
	}
	src, _ := net.ParseMAC("52:54:00:12:34:56")
	frame := append(append(append([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, src...), 0x08, 0x06), make([]byte, 46)...) // an ARP-typed frame
	deadline := time.Now().Add(5 * time.Second)
	var got []Frame
	for time.Now().Before(deadline) {
		if _, err := f.Write(frame); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		got = c.Frames()
		if len(got) > 0 {
			break
		}
	}
	frames, err := c.Stop()
	if err != nil {
		t.Fatal(err)
	}
	var mine int
	for _, fr := range frames {
		if fr.FromVM && bytes.Equal(fr.Src, src) && fr.Type == 0x0806 {
			mine++
		}
	}
	if mine == 0 {
		t.Fatalf("the capture saw %d frames, none from the VM's side with its MAC: %+v", len(frames), frames)
	}
}
