package main

import (
	"errors"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/lockstepvm/lockstep/pairspec"
)

// usageError is bad usage or bad input: exit code 2. An empty message has been printed already.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// specError is a spec file refused before it reached the agent: exit code 2.
type specError struct {
	file string
	err  error
}

func (e *specError) Error() string { return fmt.Sprintf("spec %s: %v", e.file, e.err) }

func (e *specError) Unwrap() error { return e.err }

// agentSpecError is the agent's refusal of a spec that came from a file, so that its field
// violations can be shown at their place in the file.
type agentSpecError struct {
	file string
	pair *pairspec.Pair // nil for a spec in the old format
	err  error
}

func (e *agentSpecError) Error() string { return e.err.Error() }

func (e *agentSpecError) Unwrap() error { return e.err }

// errReported is an operation that failed (exit 1) whose details were printed already.
var errReported = errors.New("reported")

// report prints err and returns the exit code for it: the one place where errors become exit
// codes.
func (a *app) report(err error) int {
	if err == nil {
		return exitOK
	}
	if errors.Is(err, errReported) {
		return exitFailed
	}
	var ue usageError
	if errors.As(err, &ue) {
		if ue.msg != "" {
			fmt.Fprintf(a.errOut, "lockstepctl: %s\n", ue.msg)
		}
		return exitUsage
	}
	var se *specError
	if errors.As(err, &se) {
		var fes pairspec.Errors
		if errors.As(se.err, &fes) {
			fmt.Fprintf(a.errOut, "lockstepctl: spec %s refused:\n", se.file)
			for _, fe := range fes {
				fmt.Fprintf(a.errOut, "  %s:%d:%d: %s: %s\n", se.file, fe.Line, fe.Column, fe.Field, fe.Reason)
			}
		} else {
			fmt.Fprintf(a.errOut, "lockstepctl: %v\n", se)
		}
		return exitUsage
	}
	var ase *agentSpecError
	errors.As(err, &ase)
	src := err
	if ase != nil {
		src = ase.err
	}
	st, ok := status.FromError(src)
	if !ok {
		fmt.Fprintf(a.errOut, "lockstepctl: %v\n", err)
		return exitFailed
	}
	fmt.Fprintf(a.errOut, "lockstepctl: %s\n", st.Message())
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				fmt.Fprintf(a.errOut, "  %s\n", ase.describe(v.GetField(), v.GetDescription()))
			}
		}
	}
	switch st.Code() {
	case codes.InvalidArgument, codes.NotFound, codes.AlreadyExists:
		return exitUsage
	case codes.Unavailable:
		fmt.Fprintf(a.errOut, "  is lockstepd running and serving %s? (--addr or $LOCKSTEP_ADDR)\n", a.addr)
		if strings.HasPrefix(a.addr, "tcp://") && a.tlsCert == "" {
			fmt.Fprintln(a.errOut, "  an agent with mutual TLS needs --tls-cert, --tls-key and --tls-ca")
		}
	}
	return exitFailed
}

// describe writes one of the agent's field violations: for a spec from a lockstep.dev/v1 file,
// with the field's name in that format and its place in the file.
func (e *agentSpecError) describe(field, desc string) string {
	if e == nil || e.pair == nil {
		return fmt.Sprintf("%s: %s", field, desc)
	}
	human := specField(field)
	if human == "" {
		return fmt.Sprintf("%s: %s", field, desc)
	}
	line, col := e.pair.Position(human)
	return fmt.Sprintf("%s:%d:%d: %s: %s (the agent's %s)", e.file, line, col, human, desc, field)
}

// agentFields maps the field names the agent's refusals use to the lockstep.dev/v1 names.
var agentFields = map[string]string{
	"name": "metadata.name", "memory": "spec.memory", "memory_mib": "spec.memory", "vcpus": "spec.vcpus", "machine": "spec.machine",
	"accel": "spec.accel", "kernel": "spec.boot.kernel", "initrd": "spec.boot.initrd", "append": "spec.boot.cmdline",
	"disk_size": "spec.disk.size", "disk_size_bytes": "spec.disk.size", "nic": "spec.nic", "nic.mac": "spec.nic.mac", "nic.model": "spec.nic.model",
	"nic.backend": "spec.nic.backend", "nic.tap": "spec.nic.tap", "nic.bridge": "spec.nic.bridge", "qemu": "spec.qemuCommand",
	"qemu_command": "spec.qemuCommand", "qemu_version": "spec.qemuCommand", "qemu_img_command": "spec.qemuImgCommand",
	"checkpoint_delay": "spec.checkpointDelay", "tunables.checkpoint_delay": "spec.checkpointDelay",
	"compare_timeout": "spec.compareTimeout", "tunables.compare_timeout": "spec.compareTimeout",
	"boot_settle": "spec.bootSettle", "tunables.boot_settle": "spec.bootSettle",
	"tunables.max_bandwidth_bytes_per_second": "spec.maxBandwidth",
}

// sideFields maps the agent's names of a placement's fields.
var sideFields = map[string]string{"": "", "host": "address", "address": "address", "disk": "disk.path", "disk_path": "disk.path",
	"disk_format": "disk.format", "net_socket": "netSocket"}

// specField is the lockstep.dev/v1 path of an agent's field name ("spec.sides[0].disk"), or ""
// when it has none.
func specField(agent string) string {
	f := strings.TrimPrefix(agent, "spec.")
	if h, ok := agentFields[f]; ok {
		return h
	}
	for prefix, side := range map[string]string{"sides[0]": "primary", "sides[1]": "secondary", "primary": "primary", "secondary": "secondary"} {
		rest, ok := strings.CutPrefix(f, prefix)
		if !ok || (rest != "" && rest[0] != '.') {
			continue
		}
		if h, ok := sideFields[strings.TrimPrefix(rest, ".")]; ok {
			if h == "" {
				return "spec." + side
			}
			return "spec." + side + "." + h
		}
	}
	return ""
}
