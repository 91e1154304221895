// Command lockstepctl is the operator's CLI of lockstep: it talks to a lockstepd agent over its
// gRPC API (never to QEMU). Each command lives in a file of its own (create.go, get.go, ...);
// root.go holds the global flags and errors.go the one place where errors become exit codes.
package main

import (
	"io"
	"os"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1 // the operation failed
	exitUsage  = 2 // bad usage or bad input
)

const defaultAddr = "unix:///run/lockstep/lockstepd.sock"

func main() {
	os.Exit(runWith(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run runs lockstepctl with args and no standard input, and returns its exit code.
func run(args []string, stdout, stderr io.Writer) int {
	return runWith(args, eofReader{}, stdout, stderr)
}

// runWith runs lockstepctl with args, reading standard input from stdin.
func runWith(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	a := &app{in: stdin, out: stdout, errOut: stderr}
	return a.execute(args)
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
