package integration

import (
	"os"
	"strconv"
	"syscall"
)

// The tests run under `flock /work/qemu.lock go test ...`, and flock(1) hands its lock to the
// command as an open descriptor without close-on-exec. Go closes none of the descriptors it
// inherited when it starts a program, so every QEMU, agent and tool a test starts would hold
// the lock too, and one that outlived its test (a test killed by its timeout, a QEMU whose
// parent died) would keep every other engineer's tests waiting on the lock until someone kills
// it. Marking the inherited descriptors close-on-exec keeps the lock with the test process.
func init() {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		syscall.CloseOnExec(fd)
	}
}
