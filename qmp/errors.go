package qmp

import (
	"errors"
	"fmt"
)

// Error is a failure reported by QEMU in answer to a command. errors.As finds it in every error
// returned by Execute and the typed calls.
type Error struct {
	// Class is QEMU's error class, e.g. "GenericError", "CommandNotFound", "DeviceNotFound".
	Class string
	// Desc is QEMU's human-readable description.
	Desc string
}

func (e *Error) Error() string { return fmt.Sprintf("qmp: %s: %s", e.Class, e.Desc) }

// CommandError names the command that QEMU refused along with QEMU's answer.
type CommandError struct {
	Command string
	Err     error
}

func (e *CommandError) Error() string { return fmt.Sprintf("qmp %s: %v", e.Command, e.Err) }

func (e *CommandError) Unwrap() error { return e.Err }

var (
	// ErrClosed is wrapped by the error of every call that could not complete because the
	// connection was closed or lost.
	ErrClosed = errors.New("qmp: connection closed")
	// ErrNotQMP is returned by Dial when the peer's greeting is not a QMP greeting.
	ErrNotQMP = errors.New("qmp: peer is not a QMP server")
	// ErrNoOOB is returned by ExecuteOOB when out-of-band execution was not negotiated.
	ErrNoOOB = errors.New("qmp: out-of-band execution not negotiated")
	// ErrNoFDPassing is returned when file descriptors are passed over a non-unix connection.
	ErrNoFDPassing = errors.New("qmp: file descriptor passing needs a unix socket")
)

// IsClass reports whether err carries a QEMU error of the given class.
func IsClass(err error, class string) bool {
	var qe *Error
	return errors.As(err, &qe) && qe.Class == class
}

// ErrSubscriptionClosed is returned by a Subscription after its Close.
var ErrSubscriptionClosed = errors.New("qmp: subscription closed")
