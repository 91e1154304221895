package checkpoint_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func validSpec() checkpoint.Spec {
	return checkpoint.Spec{
		Name: "db1", MemoryMiB: 256, VCPUs: 1, Machine: "pc", Accel: "tcg",
		DiskSize: 64 << 20,
		NIC:      checkpoint.NIC{MAC: "52:54:00:12:34:56", Backend: "socket"},
		QEMU:     []string{"qemu-system-x86_64"}, QEMUVersion: checkpoint.Version{Major: 11, Minor: 1},
	}.WithDefaults()
}

func TestSpecValidation(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*checkpoint.Spec)
		field  string
	}{
		{"valid", func(*checkpoint.Spec) {}, ""},
		{"bad name", func(s *checkpoint.Spec) { s.Name = "a b" }, "name"},
		{"empty name", func(s *checkpoint.Spec) { s.Name = "" }, "name"},
		{"tiny memory", func(s *checkpoint.Spec) { s.MemoryMiB = 8 }, "memory"},
		{"no vcpus", func(s *checkpoint.Spec) { s.VCPUs = 0 }, "vcpus"},
		{"q35", func(s *checkpoint.Spec) { s.Machine = "q35" }, "machine"},
		{"accel", func(s *checkpoint.Spec) { s.Accel = "hvf" }, "accel"},
		{"initrd without kernel", func(s *checkpoint.Spec) { s.Initrd = "/x" }, "kernel"},
		{"disk size", func(s *checkpoint.Spec) { s.DiskSize = 1000 }, "disk_size"},
		{"mac", func(s *checkpoint.Spec) { s.NIC.MAC = "52:54:00:12:34" }, "nic.mac"},
		{"nic model", func(s *checkpoint.Spec) { s.NIC.Model = "ne2k" }, "nic.model"},
		{"tap without name", func(s *checkpoint.Spec) { s.NIC.Backend = "tap" }, "nic.tap"},
		{"backend", func(s *checkpoint.Spec) { s.NIC.Backend = "vde" }, "nic.backend"},
		{"old qemu", func(s *checkpoint.Spec) { s.QEMUVersion = checkpoint.Version{Major: 6, Minor: 2} }, "qemu_version"},
		{"unknown qemu", func(s *checkpoint.Spec) { s.QEMUVersion = checkpoint.Version{} }, "qemu_version"},
		{"delay", func(s *checkpoint.Spec) { s.Tunables.CheckpointDelay = time.Millisecond }, "checkpoint_delay"},
		{"compare timeout", func(s *checkpoint.Spec) { s.Tunables.CompareTimeout = 2 * time.Hour }, "compare_timeout"},
		{"boot settle", func(s *checkpoint.Spec) { s.Tunables.BootSettle = 11 * time.Minute }, "boot_settle"},
		{"no boot settle", func(s *checkpoint.Spec) { s.Tunables.BootSettle = -1 }, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := validSpec()
			tc.mutate(&s)
			err := s.Validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("valid spec refused: %v", err)
				}
				return
			}
			if !errors.Is(err, checkpoint.ErrInvalidSpec) {
				t.Fatalf("err %v does not wrap ErrInvalidSpec", err)
			}
			var fe *checkpoint.FieldError
			if !errors.As(err, &fe) || fe.Field != tc.field {
				t.Fatalf("err %v does not name field %s", err, tc.field)
			}
		})
	}
}

// The boot settle defaults to DefaultBootSettleTCG under TCG and to none under KVM; an explicit
// none (negative) stays none; the time left counts from the QEMU's start.
func TestBootSettle(t *testing.T) {
	s := validSpec()
	if s.Tunables.BootSettle != checkpoint.DefaultBootSettleTCG {
		t.Fatalf("tcg default %v, want %v", s.Tunables.BootSettle, checkpoint.DefaultBootSettleTCG)
	}
	kvm := validSpec()
	kvm.Accel, kvm.Tunables.BootSettle = "kvm", 0
	if b := kvm.WithDefaults().Tunables.BootSettle; b != 0 {
		t.Fatalf("kvm default %v, want none", b)
	}
	none := validSpec()
	none.Tunables.BootSettle = -1
	if b := none.WithDefaults().Tunables.BootSettle; b != -1 {
		t.Fatalf("explicit none became %v", b)
	}
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		spec checkpoint.Spec
		ran  time.Duration
		want time.Duration
	}{
		{s, 0, 15 * time.Second},
		{s, 4 * time.Second, 11 * time.Second},
		{s, 15 * time.Second, 0},
		{s, time.Hour, 0},
		{none.WithDefaults(), 0, 0},
		{kvm.WithDefaults(), 0, 0},
	} {
		if got := tc.spec.BootSettleLeft(start, start.Add(tc.ran)); got != tc.want {
			t.Errorf("settle %v, ran %v: left %v, want %v", tc.spec.Tunables.BootSettle, tc.ran, got, tc.want)
		}
	}
}

func TestSideValidation(t *testing.T) {
	s := validSpec()
	dir := t.TempDir()
	disk := filepath.Join(dir, "d.raw")
	if err := os.WriteFile(disk, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	err := s.ValidateSide(checkpoint.RoleSecondary, checkpoint.Side{Host: "nohost", RunDir: "rel", Disk: disk, NetSocket: "x"})
	for _, field := range []string{"secondary.host", "secondary.run_dir", "secondary.disk", "secondary.active", "secondary.net_socket"} {
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("error %v does not name %s", err, field)
		}
	}
	if err := checkpoint.ValidatePorts(checkpoint.Ports{Migration: 1, NBD: 1, Mirror: 3, Compare: 4, CompareIn: 5, CompareOut: 70000}); err == nil ||
		!strings.Contains(err.Error(), "ports.nbd") || !strings.Contains(err.Error(), "ports.compare_out") {
		t.Errorf("ports error %v", err)
	}
}

// A bad spec starts no process: Launch refuses before it creates anything.
func TestLaunchBadSpecStartsNothing(t *testing.T) {
	s := validSpec()
	s.Machine = "q35"
	run := filepath.Join(t.TempDir(), "run")
	_, err := checkpoint.Launch(context.Background(), checkpoint.LaunchConfig{
		Spec: s, Role: checkpoint.RolePrimary,
		Side: checkpoint.Side{Host: "127.0.0.1", RunDir: run, Disk: "/nonexistent", NetSocket: "127.0.0.1:1"},
	})
	var fe *checkpoint.FieldError
	if !errors.As(err, &fe) || fe.Field != "machine" {
		t.Fatalf("Launch: %v", err)
	}
	if _, err := os.Stat(run); !os.IsNotExist(err) {
		t.Fatalf("Launch created the run folder for a bad spec (%v)", err)
	}
}

func hasSeq(args []string, seq ...string) bool {
	for i := 0; i+len(seq) <= len(args); i++ {
		if slices.Equal(args[i:i+len(seq)], seq) {
			return true
		}
	}
	return false
}

func TestCommandLines(t *testing.T) {
	s := validSpec()
	side := checkpoint.Side{Host: "127.0.0.1", RunDir: "/run/ls/a", Disk: "/img/d,1.raw", NetSocket: "127.0.0.1:5000"}
	pa := checkpoint.PrimaryArgs(s, side)
	for _, want := range [][]string{
		{"-machine", "pc"}, {"-accel", "tcg"}, {"-m", "256"},
		{"-qmp", "unix:/run/ls/a/qmp.sock,server=on,wait=off"},
		{"-netdev", "socket,id=hn0,connect=127.0.0.1:5000"},
		{"-device", "e1000,id=e0,netdev=hn0,mac=52:54:00:12:34:56"},
		{"-drive", "if=ide,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=/img/d,,1.raw,children.0.driver=raw"},
	} {
		if !hasSeq(pa, want...) {
			t.Errorf("primary args lack %q:\n%q", want, pa)
		}
	}
	ports := checkpoint.Ports{Migration: 1, NBD: 2, Mirror: 3, Compare: 4, CompareIn: 5, CompareOut: 6}
	sside := checkpoint.Side{Host: "127.0.0.1", RunDir: "/run/ls/b", Disk: "/img/p.raw", Active: "/img/a.qcow2", Hidden: "/img/h.qcow2", NetSocket: "127.0.0.1:5001"}
	sa := checkpoint.SecondaryArgs(s, sside, "10.1.1.1", ports)
	for _, want := range [][]string{
		{"-chardev", "socket,id=red0,host=10.1.1.1,port=3,reconnect-ms=100"},
		{"-chardev", "socket,id=red1,host=10.1.1.1,port=4,reconnect-ms=100"},
		{"-chardev", "null,id=sink0"},
		{"-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0,outdev=sink0"},
		{"-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1"},
		{"-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all"},
		{"-drive", "if=none,id=parent0,file.filename=/img/p.raw,driver=raw"},
		{"-incoming", "tcp:127.0.0.1:1"},
	} {
		if !hasSeq(sa, want...) {
			t.Errorf("secondary args lack %q:\n%q", want, sa)
		}
	}
	// QEMU 7.2 takes reconnect in seconds; a tap's own frames go to the sink as well (a bridge
	// floods broadcasts to the secondary's tap too).
	s.QEMUVersion = checkpoint.Version{Major: 7, Minor: 2}
	s.NIC = checkpoint.NIC{MAC: s.NIC.MAC, Model: "e1000", Backend: "tap", Tap: "tap0"}
	sa = checkpoint.SecondaryArgs(s, sside, "10.1.1.1", ports)
	if !hasSeq(sa, "-chardev", "socket,id=red0,host=10.1.1.1,port=3,reconnect=1") {
		t.Errorf("7.2 secondary args: %q", sa)
	}
	if !hasSeq(sa, "-chardev", "null,id=sink0") || !hasSeq(sa, "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0,outdev=sink0") ||
		!hasSeq(sa, "-netdev", "tap,id=hn0,ifname=tap0,script=no,downscript=no,vhost=off") {
		t.Errorf("tap secondary args: %q", sa)
	}
}

func ctx10(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, s *qmptest.Server) *qmp.Client {
	c, err := qmp.Dial(ctx10(t), "unix", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSequenceRunNamesFailingStep(t *testing.T) {
	var events []checkpoint.StepEvent
	ran := 0
	seq := checkpoint.Sequence{Name: "demo", Steps: []checkpoint.Step{
		{Name: "one", Run: func(context.Context) error { ran++; return nil }},
		{Name: "two", Run: func(context.Context) error { ran++; return &qmp.Error{Class: "GenericError", Desc: "boom"} }},
		{Name: "three", Run: func(context.Context) error { ran++; return nil }},
	}}
	finally := false
	seq.Finally = func() { finally = true }
	_, err := seq.Run(context.Background(), nil, func(e checkpoint.StepEvent) { events = append(events, e) })
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Sequence != "demo" || se.Step != "two" {
		t.Fatalf("err %v", err)
	}
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Desc != "boom" {
		t.Fatalf("QEMU's answer lost: %v", err)
	}
	if ran != 2 || !finally {
		t.Fatalf("ran %d steps, finally %v", ran, finally)
	}
	var phases []string
	for _, e := range events {
		phases = append(phases, e.Step+":"+string(e.Phase))
	}
	want := []string{"one:started", "one:done", "two:started", "two:failed"}
	if !slices.Equal(phases, want) {
		t.Fatalf("events %v, want %v", phases, want)
	}
}

// With KeepGoing (clean-up sequences) every step runs; the error names the first failed step,
// keeps QEMU's answer and counts the other failures.
func TestSequenceKeepGoing(t *testing.T) {
	var ran []string
	step := func(name string, err error) checkpoint.Step {
		return checkpoint.Step{Name: name, Run: func(context.Context) error { ran = append(ran, name); return err }}
	}
	seq := checkpoint.Sequence{Name: "clean", KeepGoing: true, Steps: []checkpoint.Step{
		step("one", nil),
		step("two", &qmp.Error{Class: "GenericError", Desc: "boom"}),
		step("three", nil),
		step("four", &qmp.Error{Class: "GenericError", Desc: "bang"}),
	}}
	_, err := seq.Run(context.Background(), nil, nil)
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Step != "two" || !strings.Contains(err.Error(), "boom (and 1 more steps failed)") {
		t.Fatalf("err %v", err)
	}
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Desc != "boom" {
		t.Fatalf("QEMU's answer lost: %v", err)
	}
	if !slices.Equal(ran, []string{"one", "two", "three", "four"}) {
		t.Fatalf("ran %v", ran)
	}
	seq.Steps = seq.Steps[:1]
	if _, err := seq.Run(context.Background(), nil, nil); err != nil {
		t.Fatalf("clean run: %v", err)
	}
}

func TestStepDeadline(t *testing.T) {
	seq := checkpoint.Sequence{Name: "slow", Steps: []checkpoint.Step{
		{Name: "hang", Timeout: 20 * time.Millisecond, Run: func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }},
	}}
	_, err := seq.Run(context.Background(), nil, nil)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), `step "hang": no answer within 20ms`) {
		t.Fatalf("err %v", err)
	}
}

// The failover sequences send QEMU exactly the documented commands, in order, and tolerate
// objects already gone, so that they can be re-run after a partial failure.
func TestFailoverSequences(t *testing.T) {
	s := qmptest.New(t)
	for _, cmd := range []string{"x-blockdev-change", "blockdev-del", "x-colo-lost-heartbeat", "nbd-server-stop", "chardev-remove", "yank"} {
		s.Handle(cmd, qmptest.Return(struct{}{}))
	}
	s.Handle("object-del", func(c *qmptest.Conn, r *qmptest.Request) {
		var a struct{ ID string }
		_ = r.DecodeArgs(&a)
		if a.ID == "m0" {
			c.ReplyError(r, "GenericError", "object 'm0' not found")
			return
		}
		c.Reply(r, struct{}{})
	})
	c := dial(t, s)
	g := checkpoint.Generation{N: 3}
	seq := checkpoint.FailoverAsPrimary(c, g)
	if _, err := seq.Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range s.Requests()[1:] {
		got = append(got, r.Command+" "+compactArgs(r.Args))
	}
	want := []string{
		`x-blockdev-change {"child":"children.1","parent":"colo-disk0"}`,
		`blockdev-del {"node-name":"nbd3"}`,
		`object-del {"id":"comp0"}`, `object-del {"id":"iothread1"}`, `object-del {"id":"m0"}`,
		`object-del {"id":"redire0"}`, `object-del {"id":"redire1"}`,
		`x-colo-lost-heartbeat `,
		`chardev-remove {"id":"compare0-0"}`, `chardev-remove {"id":"compare0"}`, `chardev-remove {"id":"compare_out0"}`,
		`chardev-remove {"id":"compare_out"}`, `chardev-remove {"id":"mirror0"}`, `chardev-remove {"id":"compare1"}`,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("failover-as-primary sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	s2 := qmptest.New(t)
	for _, cmd := range []string{"x-colo-lost-heartbeat", "nbd-server-stop", "chardev-remove", "object-del", "yank", "announce-self"} {
		s2.Handle(cmd, qmptest.Return(struct{}{}))
	}
	c2 := dial(t, s2)
	names := checkpoint.FailoverAsSecondary(c2, true).StepNames()
	if _, err := checkpoint.FailoverAsSecondary(c2, true).Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	wantNames := []string{"secondary: yank migration and channels", "secondary: nbd-server-stop", "secondary: x-colo-lost-heartbeat",
		"secondary: object-del f2", "secondary: object-del f1", "secondary: announce-self",
		"secondary: object-del rew0", "secondary: chardev-remove red1", "secondary: chardev-remove red0"}
	if !slices.Equal(names, wantNames) {
		t.Fatalf("steps %v", names)
	}
	yanks := s2.RequestsFor("yank")
	if len(yanks) != 3 || !yanks[0].OOB {
		t.Fatalf("yanks %d (oob %v)", len(yanks), len(yanks) > 0 && yanks[0].OOB)
	}
	// A real failure (not "not found") stops the sequence and names the step.
	s2.Handle("x-colo-lost-heartbeat", qmptest.Fail("GenericError", "VM is not in COLO mode"))
	_, err := checkpoint.FailoverAsSecondary(c2, false).Run(ctx10(t), nil, nil)
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Step != "secondary: x-colo-lost-heartbeat" || !strings.Contains(err.Error(), "not in COLO mode") {
		t.Fatalf("err %v", err)
	}
}

func compactArgs(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return strings.ReplaceAll(strings.ReplaceAll(string(b), " ", ""), "\n", "")
}

func ev(name string, at time.Time, data string) *qmp.Event {
	e := &qmp.Event{Name: name, Time: at}
	if data != "" {
		e.Data = []byte(data)
	}
	return e
}

func TestObserver(t *testing.T) {
	o := checkpoint.NewObserver(200 * time.Millisecond)
	t0 := time.Unix(1000, 0)
	// Before COLO, STOP/RESUME are not checkpoints.
	o.Observe(ev("STOP", t0, ""))
	o.Observe(ev("RESUME", t0.Add(time.Second), ""))
	o.Observe(ev("MIGRATION", t0.Add(2*time.Second), `{"status":"colo"}`))
	start := t0.Add(2 * time.Second)
	// 10 timer checkpoints every 200 ms with pauses 10..100 ms, then 2 early ones 50 ms apart.
	at := start
	for i := 1; i <= 10; i++ {
		at = at.Add(200 * time.Millisecond)
		o.Observe(ev("STOP", at, ""))
		o.Observe(ev("RESUME", at.Add(time.Duration(i)*10*time.Millisecond), ""))
	}
	for i := 0; i < 2; i++ {
		at = at.Add(120 * time.Millisecond)
		o.Observe(ev("STOP", at, ""))
		o.Observe(ev("RESUME", at.Add(5*time.Millisecond), ""))
	}
	st := o.Stats()
	if st.Checkpoints != 12 || st.Early != 2 || st.Timer != 10 {
		t.Fatalf("counts %+v", st)
	}
	if st.PauseMax != 100*time.Millisecond || st.PauseP50 != 40*time.Millisecond || st.PauseP99 != 100*time.Millisecond {
		t.Fatalf("pauses p50 %v p99 %v max %v", st.PauseP50, st.PauseP99, st.PauseMax)
	}
	if !st.InColo || st.Rate < 4 || st.Rate > 6 {
		t.Fatalf("rate %v colo %v", st.Rate, st.InColo)
	}
	o.Observe(ev("COLO_EXIT", at.Add(time.Second), `{"mode":"primary","reason":"error"}`))
	st = o.Stats()
	if st.InColo || st.ColoExit == nil || st.ColoExit.Reason != qmp.ColoExitError {
		t.Fatalf("after COLO_EXIT %+v", st)
	}
	o.Observe(ev("STOP", at.Add(2*time.Second), ""))
	o.Observe(ev("RESUME", at.Add(3*time.Second), ""))
	if o.Stats().Checkpoints != 12 {
		t.Fatal("a stop after COLO ended counted as a checkpoint")
	}
}

// The protect sequence stops at a refused step, names it, and sends nothing after it.
func TestProtectStopsAtRefusedStep(t *testing.T) {
	prim := qmptest.New(t)
	sec := qmptest.New(t)
	schema := `[{"name":"query-migrate-capabilities","meta-type":"command","arg-type":"9"},{"name":"blockdev-add","meta-type":"command","arg-type":"0"},{"name":"0","meta-type":"object","members":[],"variants":[{"case":"nbd","type":"1"}]}]`
	for _, srv := range []*qmptest.Server{prim, sec} {
		srv.Handle("query-version", qmptest.Return(map[string]any{"qemu": map[string]int{"major": 11, "minor": 1, "micro": 3}}))
		srv.Handle("query-qmp-schema", func(c *qmptest.Conn, r *qmptest.Request) {
			c.Reply(r, json.RawMessage(schema))
		})
		srv.Handle("query-migrate-capabilities", qmptest.Return([]qmp.MigrationCapability{{Capability: "x-colo"}, {Capability: "return-path"}, {Capability: "events"}, {Capability: "pause-before-switchover"}}))
		srv.Handle("migrate-set-capabilities", qmptest.Return(struct{}{}))
	}
	sec.Handle("nbd-server-start", qmptest.Fail("GenericError", "Failed to bind socket: Address already in use"))
	p, s := dial(t, prim), dial(t, sec)
	seq := checkpoint.StartProtection(checkpoint.ProtectConfig{Spec: validSpec(), Gen: checkpoint.Generation{N: 1}, Primary: p, Secondary: s})
	_, err := seq.Run(ctx10(t), nil, nil)
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Step != "secondary: nbd-server-start" || !strings.Contains(err.Error(), "Address already in use") {
		t.Fatalf("err %v", err)
	}
	caps := sec.RequestsFor("migrate-set-capabilities")
	if len(caps) != 1 || !strings.Contains(string(caps[0].Args), "return-path") {
		t.Fatalf("secondary capabilities %v", caps)
	}
	for _, r := range prim.Requests() {
		switch r.Command {
		case "qmp_capabilities", "query-version", "query-qmp-schema", "query-migrate-capabilities":
		default:
			t.Errorf("primary got %s after the sequence failed", r.Command)
		}
	}
}

// AbortProtection cancels the migration and waits for it to stop, force-cancels the resync job
// and dismisses it, then takes everything of the generation off the primary without ending
// COLO (there was none); what the failed attempt never created is no error.
func TestAbortProtection(t *testing.T) {
	s := qmptest.New(t)
	for _, cmd := range []string{"migrate_cancel", "x-blockdev-change", "blockdev-del", "object-del", "block-job-cancel", "block-job-dismiss"} {
		s.Handle(cmd, qmptest.Return(struct{}{}))
	}
	migrating := 2
	s.Handle("query-migrate", func(c *qmptest.Conn, r *qmptest.Request) {
		if migrating > 0 {
			migrating--
			c.Reply(r, map[string]any{"status": "cancelling"})
			return
		}
		c.Reply(r, map[string]any{"status": "cancelled"})
	})
	jobPolls := 0
	s.Handle("query-block-jobs", func(c *qmptest.Conn, r *qmptest.Request) {
		jobPolls++
		status := "aborting"
		if jobPolls > 1 {
			status = "concluded"
		}
		c.Reply(r, []map[string]any{{"device": "resync4", "type": "mirror", "status": status}})
	})
	s.Handle("chardev-remove", func(c *qmptest.Conn, r *qmptest.Request) {
		c.ReplyError(r, "GenericError", "Chardev 'x' not found")
	})
	c := dial(t, s)
	if _, err := checkpoint.AbortProtection(c, checkpoint.Generation{N: 4}).Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range s.Requests()[1:] {
		if r.Command == "query-migrate" || r.Command == "query-block-jobs" || r.Command == "chardev-remove" {
			continue
		}
		got = append(got, r.Command+" "+compactArgs(r.Args))
	}
	want := []string{
		`migrate_cancel `,
		`block-job-cancel {"device":"resync4","force":true}`,
		`block-job-dismiss {"id":"resync4"}`,
		`x-blockdev-change {"child":"children.1","parent":"colo-disk0"}`,
		`blockdev-del {"node-name":"nbd4"}`,
		`object-del {"id":"comp0"}`, `object-del {"id":"iothread1"}`, `object-del {"id":"m0"}`,
		`object-del {"id":"redire0"}`, `object-del {"id":"redire1"}`,
	}
	if !slices.Equal(got, want) {
		t.Fatalf("abort-protection sent\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if migrating != 0 || jobPolls != 2 {
		t.Fatalf("did not wait: %d migration polls left, %d job polls", migrating, jobPolls)
	}
	for _, r := range s.Requests() {
		if r.Command == "x-colo-lost-heartbeat" {
			t.Fatal("abort-protection ended COLO")
		}
	}
}

// An attempt that failed before the replica joined the quorum leaves no child to remove (QEMU
// answers "does not have child"), and a refused step must not leave the chardevs and objects
// behind: the next attempt would fail at "chardev-add ... already exists" forever.
func TestAbortProtectionGoesOnPastRefusals(t *testing.T) {
	s := qmptest.New(t)
	for _, cmd := range []string{"migrate_cancel", "object-del", "block-job-cancel", "chardev-remove"} {
		s.Handle(cmd, qmptest.Return(struct{}{}))
	}
	s.Handle("query-migrate", qmptest.Return(map[string]any{"status": "failed"}))
	s.Handle("query-block-jobs", qmptest.Return([]map[string]any{}))
	s.Handle("x-blockdev-change", func(c *qmptest.Conn, r *qmptest.Request) {
		c.ReplyError(r, "GenericError", "Node 'colo-disk0' does not have child 'children.1'")
	})
	s.Handle("blockdev-del", func(c *qmptest.Conn, r *qmptest.Request) {
		c.ReplyError(r, "GenericError", "Node nbd4 is in use")
	})
	c := dial(t, s)
	_, err := checkpoint.AbortProtection(c, checkpoint.Generation{N: 4}).Run(ctx10(t), nil, nil)
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Step != "primary: blockdev-del nbd4" {
		t.Fatalf("err %v, want the refused blockdev-del named", err)
	}
	removed := map[string]bool{}
	for _, r := range s.Requests() {
		if r.Command == "chardev-remove" || r.Command == "object-del" {
			removed[compactArgs(r.Args)] = true
		}
	}
	for _, id := range []string{"mirror0", "compare0", "compare1", "compare0-0", "compare_out", "compare_out0"} {
		if !removed[`{"id":"`+id+`"}`] {
			t.Errorf("chardev %s left behind after the refused step (removed %v)", id, removed)
		}
	}
	if !removed[`{"id":"comp0"}`] || !removed[`{"id":"m0"}`] {
		t.Errorf("objects left behind: removed %v", removed)
	}
}
