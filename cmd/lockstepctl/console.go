package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// escapeChar ends a console session: ^], as virsh console and telnet have it.
const escapeChar = 0x1d

func (a *app) newConsoleCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "console PAIR",
		Short: "Attach to the primary's serial console (^] to leave)",
		Long: `Attach to the serial console of the pair's primary, interactively, as "virsh console" does:
the terminal is put in raw mode, what you type goes to the guest's serial port and what the
guest writes comes back. ^] (Ctrl and ]) leaves; so does the end of standard input. The
console follows the VM: after a failover, attach again.`,
		Example:           `  lockstepctl console db1`,
		Args:              pairArgs,
		ValidArgsFunction: a.completePairs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := a.dial(); err != nil {
				return err
			}
			return a.console(args[0])
		},
	}
}

// console copies standard input to the console and the console to standard output until ^],
// the end of standard input, the console's end or a signal.
func (a *app) console(name string) error {
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGHUP)
	defer cancel()
	s, err := a.ops.Console(ctx, name)
	if err != nil {
		return err
	}
	if f, ok := a.in.(*os.File); ok {
		if restore, err := makeRaw(int(f.Fd())); err == nil {
			defer restore()
		}
	}
	fmt.Fprintf(a.errOut, "Connected to the serial console of %s; the escape character is ^]\r\n", name)
	inDone := make(chan error, 1)
	// Standard input to the console. This goroutine ends at ^], the end of input, or a failed
	// Send once the stream's context is cancelled; a Read that blocks on a terminal ends with
	// the process. It writes to nothing but the stream.
	go func() {
		buf := make([]byte, 4096)
		for {
			n, rerr := a.in.Read(buf)
			chunk := buf[:n]
			esc := bytes.IndexByte(chunk, escapeChar)
			if esc >= 0 {
				chunk = chunk[:esc]
			}
			if len(chunk) > 0 {
				if err := s.Send(bytes.Clone(chunk)); err != nil {
					inDone <- err
					return
				}
			}
			if esc >= 0 || rerr != nil {
				_ = s.CloseSend()
				inDone <- nil
				return
			}
		}
	}()
	// The console to standard output, until the stream ends; cancelling ctx ends it, and
	// console waits for it before it returns.
	outDone := make(chan error, 1)
	go func() {
		for {
			p, err := s.Recv()
			if err != nil {
				if errors.Is(err, io.EOF) || ctx.Err() != nil {
					err = nil
				}
				outDone <- err
				return
			}
			if _, err := a.out.Write(p); err != nil {
				outDone <- err
				return
			}
		}
	}()
	select {
	case err = <-inDone:
		cancel()
		if oerr := <-outDone; err == nil {
			err = oerr
		}
	case err = <-outDone:
	case <-ctx.Done():
		err = <-outDone
	}
	fmt.Fprintf(a.errOut, "\r\nDisconnected from %s.\r\n", name)
	return err
}

// makeRaw puts the terminal fd in raw mode, as cfmakeraw(3) does, and returns how to restore it;
// an error when fd is no terminal.
func makeRaw(fd int) (func(), error) {
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	raw := *old
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Oflag &^= unix.OPOST
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	raw.Cflag &^= unix.CSIZE | unix.PARENB
	raw.Cflag |= unix.CS8
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, err
	}
	return func() { _ = unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}
