package controller

import (
	"errors"
	"os/exec"
	"runtime"
	"syscall"
)

// spawner starts QEMUs that die with the agent. In two-host mode a QEMU must never outlive the
// agent that renews its lease and would freeze it: a primary left running by a dead agent
// would go on releasing output after its lease expired and the peer took over. Linux delivers
// the parent-death signal when the *thread* that forked the child ends, so every start happens
// on one goroutine locked to its thread for the agent's whole life.
type spawner struct {
	reqs chan spawnReq
	quit chan struct{}
	done chan struct{}
}

type spawnReq struct {
	cmd   *exec.Cmd
	reply chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq), quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		// Never unlocked: when this goroutine returns, its thread ends with it, and so do the
		// QEMUs it started, which is what the agent stopping means in two-host mode.
		runtime.LockOSThread()
		for {
			select {
			case r := <-s.reqs:
				if r.cmd.SysProcAttr == nil {
					r.cmd.SysProcAttr = &syscall.SysProcAttr{}
				}
				r.cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
				r.reply <- r.cmd.Start()
			case <-s.quit:
				return
			}
		}
	}()
	return s
}

// start starts cmd on the spawner's thread.
func (s *spawner) start(cmd *exec.Cmd) error {
	reply := make(chan error, 1)
	select {
	case s.reqs <- spawnReq{cmd: cmd, reply: reply}:
		return <-reply
	case <-s.done:
		return errors.New("the agent is stopping: not starting QEMU")
	}
}

// stop ends the spawner's thread: QEMUs it started get SIGKILL.
func (s *spawner) stop() {
	close(s.quit)
	<-s.done
}
