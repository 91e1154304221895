package checkpoint_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/checkpoint"
	"github.com/lockstepvm/lockstep/qmp"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

// fakeProbe makes srv answer the feature probe like a QEMU of the given version with every COLO
// capability.
func fakeProbe(srv *qmptest.Server, major, minor, micro int) {
	schema := `[{"name":"query-migrate-capabilities","meta-type":"command","arg-type":"9"},{"name":"blockdev-add","meta-type":"command","arg-type":"0"},{"name":"0","meta-type":"object","members":[],"variants":[{"case":"nbd","type":"1"}]}]`
	srv.Handle("query-version", qmptest.Return(map[string]any{"qemu": map[string]int{"major": major, "minor": minor, "micro": micro}}))
	srv.Handle("query-qmp-schema", func(c *qmptest.Conn, r *qmptest.Request) {
		c.Reply(r, json.RawMessage(schema))
	})
	srv.Handle("query-migrate-capabilities", qmptest.Return([]qmp.MigrationCapability{{Capability: "x-colo"}, {Capability: "return-path"}, {Capability: "events"}, {Capability: "pause-before-switchover"}}))
}

// fakePrimary is a primary QEMU that goes through a whole protection: the resync becomes ready,
// the secondary's channels are connected, migration pauses before switchover and reaches colo.
func fakePrimary(t *testing.T) *qmptest.Server {
	srv := qmptest.New(t)
	fakeProbe(srv, 11, 1, 3)
	for _, cmd := range []string{"chardev-add", "blockdev-add", "object-add", "migrate-set-capabilities", "migrate-set-parameters",
		"qom-set", "block-job-dismiss", "x-blockdev-change"} {
		srv.Handle(cmd, qmptest.Return(struct{}{}))
	}
	srv.Handle("getfd", func(c *qmptest.Conn, r *qmptest.Request) {
		for _, f := range r.Files {
			f.Close()
		}
		c.Reply(r, struct{}{})
	})
	now := time.Now()
	replyThen := func(event string, data any) qmptest.Handler {
		return func(c *qmptest.Conn, r *qmptest.Request) {
			c.Reply(r, struct{}{})
			c.Event(event, data, now)
		}
	}
	srv.Handle("blockdev-mirror", replyThen("JOB_STATUS_CHANGE", map[string]string{"id": "resync1", "status": "ready"}))
	srv.Handle("query-block-jobs", qmptest.Return([]qmp.BlockJobInfo{{Device: "resync1", Len: 64 << 20, Offset: 64 << 20, Ready: true}}))
	srv.Handle("query-chardev", qmptest.Return([]qmp.ChardevInfo{
		{Label: "mirror0", Filename: "tcp:127.0.0.1:1,server=on <-> 127.0.0.1:50001"},
		{Label: "compare1", Filename: "tcp:127.0.0.1:2,server=on <-> 127.0.0.1:50002"},
	}))
	srv.Handle("migrate", replyThen("MIGRATION", map[string]string{"status": "pre-switchover"}))
	srv.Handle("block-job-cancel", replyThen("JOB_STATUS_CHANGE", map[string]string{"id": "resync1", "status": "concluded"}))
	srv.Handle("migrate-continue", replyThen("MIGRATION", map[string]string{"status": "colo"}))
	return srv
}

// fakeSecondary is a secondary QEMU that accepts its part of a protection.
func fakeSecondary(t *testing.T, major, minor, micro int) *qmptest.Server {
	srv := qmptest.New(t)
	fakeProbe(srv, major, minor, micro)
	for _, cmd := range []string{"migrate-set-capabilities", "nbd-server-start", "nbd-server-add", "migrate-incoming"} {
		srv.Handle(cmd, qmptest.Return(struct{}{}))
	}
	srv.Handle("getfd", func(c *qmptest.Conn, r *qmptest.Request) {
		for _, f := range r.Files {
			f.Close()
		}
		c.Reply(r, struct{}{})
	})
	srv.Handle("query-colo-status", qmptest.Return(qmp.ColoStatus{Mode: qmp.ColoModeSecondary}))
	return srv
}

// sent lists the commands srv received after qmp_capabilities, with their arguments, leaving
// out query-block-jobs (the resync's progress poll, whose count depends on timing).
func sent(srv *qmptest.Server) []string {
	var out []string
	for _, r := range srv.Requests() {
		if r.Command == "qmp_capabilities" || r.Command == "query-block-jobs" {
			continue
		}
		verb := ""
		if r.OOB {
			verb = "oob "
		}
		out = append(out, strings.TrimSpace(verb+r.Command+" "+compactArgs(r.Args)))
	}
	return out
}

func pipeFile(t *testing.T) *os.File {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	w.Close()
	return r
}

func protectionGen() checkpoint.Generation {
	return checkpoint.Generation{N: 1, PrimaryHost: "10.0.0.1", SecondaryHost: "10.0.0.2",
		Ports: checkpoint.Ports{NBD: 2001, Mirror: 2002, Compare: 2003, CompareIn: 2004, CompareOut: 2005}}
}

// The primary's commands of a protection, whoever drives the secondary.
var wantPrimaryProtection = []string{
	`query-version`, `query-qmp-schema`, `query-migrate-capabilities`,
	`chardev-add {"backend":{"data":{"addr":{"data":{"host":"10.0.0.1","port":"2002"},"type":"inet"},"server":true,"wait":false},"type":"socket"},"id":"mirror0"}`,
	`chardev-add {"backend":{"data":{"addr":{"data":{"host":"10.0.0.1","port":"2003"},"type":"inet"},"server":true,"wait":false},"type":"socket"},"id":"compare1"}`,
	`chardev-add {"backend":{"data":{"addr":{"data":{"host":"127.0.0.1","port":"2004"},"type":"inet"},"server":true,"wait":false},"type":"socket"},"id":"compare0"}`,
	`chardev-add {"backend":{"data":{"addr":{"data":{"host":"127.0.0.1","port":"2004"},"type":"inet"},"server":false},"type":"socket"},"id":"compare0-0"}`,
	`chardev-add {"backend":{"data":{"addr":{"data":{"host":"127.0.0.1","port":"2005"},"type":"inet"},"server":true,"wait":false},"type":"socket"},"id":"compare_out"}`,
	`chardev-add {"backend":{"data":{"addr":{"data":{"host":"127.0.0.1","port":"2005"},"type":"inet"},"server":false},"type":"socket"},"id":"compare_out0"}`,
	`blockdev-add {"detect-zeroes":"on","driver":"nbd","export":"parent0","node-name":"nbd1","server":{"host":"10.0.0.2","port":"2001","type":"inet"}}`,
	`blockdev-mirror {"auto-dismiss":false,"device":"colo-disk0","job-id":"resync1","sync":"full","target":"nbd1"}`,
	`query-chardev`,
	`object-add {"id":"m0","netdev":"hn0","outdev":"mirror0","qom-type":"filter-mirror","queue":"tx","status":"off"}`,
	`object-add {"id":"redire0","indev":"compare_out","netdev":"hn0","qom-type":"filter-redirector","queue":"rx","status":"off"}`,
	`object-add {"id":"redire1","netdev":"hn0","outdev":"compare0","qom-type":"filter-redirector","queue":"rx","status":"off"}`,
	`object-add {"id":"iothread1","qom-type":"iothread"}`,
	`object-add {"compare_timeout":100,"expired_scan_cycle":20,"id":"comp0","iothread":"iothread1","outdev":"compare_out0","primary_in":"compare0-0","qom-type":"colo-compare","secondary_in":"compare1"}`,
	`migrate-set-capabilities {"capabilities":[{"capability":"events","state":true},{"capability":"pause-before-switchover","state":true},{"capability":"return-path","state":true},{"capability":"x-colo","state":true}]}`,
	`migrate-set-parameters {"x-checkpoint-delay":200,"tls-creds":""}`,
	`getfd {"fdname":"mig1"}`,
	`migrate {"uri":"fd:mig1"}`,
	`qom-set {"path":"/objects/m0","property":"status","value":"on"}`,
	`qom-set {"path":"/objects/redire0","property":"status","value":"on"}`,
	`qom-set {"path":"/objects/redire1","property":"status","value":"on"}`,
	`block-job-cancel {"device":"resync1","force":false}`,
	`block-job-dismiss {"id":"resync1"}`,
	`x-blockdev-change {"node":"nbd1","parent":"colo-disk0"}`,
	`migrate-continue {"state":"pre-switchover"}`,
}

// The secondary's commands of a protection, from PrepareSecondary and IncomingMigration.
var wantSecondaryPreparation = []string{
	`query-version`, `query-qmp-schema`, `query-migrate-capabilities`,
	`migrate-set-capabilities {"capabilities":[{"capability":"return-path","state":true},{"capability":"x-colo","state":true}]}`,
	`nbd-server-start {"addr":{"data":{"host":"10.0.0.2","port":"2001"},"type":"inet"}}`,
	`nbd-server-add {"device":"parent0","writable":true}`,
}

func checkSent(t *testing.T, who string, got, want []string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s got\n%s\nwant\n%s", who, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// Driving both QEMUs sends each the same commands as the split form does, the secondary's
// before the primary's, and checks the secondary's COLO status itself.
func TestProtectLocalCommands(t *testing.T) {
	prim, sec := fakePrimary(t), fakeSecondary(t, 11, 1, 3)
	p, s := dial(t, prim), dial(t, sec)
	dialed, accepted := 0, 0
	seq := checkpoint.StartProtection(checkpoint.ProtectConfig{
		Spec: validSpec(), Gen: protectionGen(), Primary: p, Secondary: s,
		DialMigration:   func(context.Context) (*os.File, error) { dialed++; return pipeFile(t), nil },
		AcceptMigration: func(context.Context) (*os.File, error) { accepted++; return pipeFile(t), nil },
	})
	if _, err := seq.Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	if dialed != 1 || accepted != 1 {
		t.Fatalf("dialed %d, accepted %d", dialed, accepted)
	}
	checkSent(t, "primary", sent(prim), wantPrimaryProtection)
	wantSec := append(slices.Clone(wantSecondaryPreparation), `getfd {"fdname":"mig1"}`, `migrate-incoming {"uri":"fd:mig1"}`, `query-colo-status`)
	checkSent(t, "secondary", sent(sec), wantSec)
	names := seq.StepNames()
	if names[len(names)-1] != "secondary: query-colo-status" {
		t.Fatalf("last step %q", names[len(names)-1])
	}
}

// PrepareSecondary sends the secondary its part of the protection and nothing else; the
// version is then known without asking QEMU again; IncomingMigration passes the socket.
func TestPrepareSecondaryCommands(t *testing.T) {
	sec := fakeSecondary(t, 11, 1, 3)
	s := dial(t, sec)
	g := protectionGen()
	seq := checkpoint.PrepareSecondary(s, g)
	if seq.Name != "prepare-secondary" {
		t.Fatalf("name %q", seq.Name)
	}
	wantNames := []string{"secondary: probe QEMU", "secondary: migrate-set-capabilities", "secondary: nbd-server-start", "secondary: nbd-server-add parent0"}
	if !slices.Equal(seq.StepNames(), wantNames) {
		t.Fatalf("steps %q", seq.StepNames())
	}
	if _, err := seq.Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	checkSent(t, "secondary", sent(sec), wantSecondaryPreparation)
	n := len(sec.Requests())
	v, err := checkpoint.QEMUVersion(ctx10(t), s)
	if err != nil || v != "11.1.3" {
		t.Fatalf("version %q %v", v, err)
	}
	if len(sec.Requests()) != n {
		t.Fatal("QEMUVersion asked QEMU again after the probe")
	}
	f := pipeFile(t)
	defer f.Close()
	if err := checkpoint.IncomingMigration(ctx10(t), s, g, f); err != nil {
		t.Fatal(err)
	}
	reqs := sec.Requests()[n:]
	if len(reqs) != 2 || reqs[0].Command != "getfd" || compactArgs(reqs[0].Args) != `{"fdname":"mig1"}` ||
		reqs[1].Command != "migrate-incoming" || compactArgs(reqs[1].Args) != `{"uri":"fd:mig1"}` {
		t.Fatalf("incoming migration sent %v", sent(sec)[len(wantSecondaryPreparation):])
	}
	if err := checkpoint.SecondaryInColo(ctx10(t), s); err != nil {
		t.Fatal(err)
	}
	// A refusal names the side.
	sec.Handle("migrate-incoming", qmptest.Fail("GenericError", "The incoming migration has already been started"))
	if err := checkpoint.IncomingMigration(ctx10(t), s, g, f); err == nil || !strings.Contains(err.Error(), "secondary: ") ||
		!strings.Contains(err.Error(), "already been started") {
		t.Fatalf("err %v", err)
	}
}

// Without the secondary's QMP, protection sends the primary exactly its commands, dials the
// migration connection, never accepts it, and ends with ConfirmSecondary.
func TestProtectPrimaryOnly(t *testing.T) {
	for _, reprotect := range []bool{false, true} {
		prim := fakePrimary(t)
		prim.Handle("object-del", qmptest.Return(struct{}{}))
		p := dial(t, prim)
		dialed, confirmed := 0, 0
		cfg := checkpoint.ProtectConfig{
			Spec: validSpec(), Gen: protectionGen(), Primary: p, SecondaryVersion: "11.1.3",
			DialMigration:    func(context.Context) (*os.File, error) { dialed++; return pipeFile(t), nil },
			ConfirmSecondary: func(context.Context) error { confirmed++; return nil },
		}
		seq := checkpoint.StartProtection(cfg)
		want := wantPrimaryProtection
		if reprotect {
			seq = checkpoint.Reprotect(cfg)
			want = slices.Insert(slices.Clone(want), 3, `object-del {"id":"rew0"}`)
		}
		for _, name := range seq.StepNames() {
			if strings.HasPrefix(name, "secondary:") && name != "secondary: confirm colo" {
				t.Errorf("primary-only sequence has step %q", name)
			}
		}
		if names := seq.StepNames(); names[len(names)-1] != "secondary: confirm colo" {
			t.Errorf("last step %q", names[len(names)-1])
		}
		if _, err := seq.Run(ctx10(t), nil, nil); err != nil {
			t.Fatal(err)
		}
		if dialed != 1 || confirmed != 1 {
			t.Fatalf("dialed %d, confirmed %d", dialed, confirmed)
		}
		checkSent(t, seq.Name, sent(prim), want)
	}

	// A failed confirmation fails the sequence at its step.
	prim := fakePrimary(t)
	p := dial(t, prim)
	seq := checkpoint.StartProtection(checkpoint.ProtectConfig{
		Spec: validSpec(), Gen: protectionGen(), Primary: p,
		DialMigration:    func(context.Context) (*os.File, error) { return pipeFile(t), nil },
		ConfirmSecondary: func(context.Context) error { return errors.New("secondary reports COLO mode \"none\"") },
	})
	_, err := seq.Run(ctx10(t), nil, nil)
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Step != "secondary: confirm colo" {
		t.Fatalf("err %v", err)
	}

	// Without ConfirmSecondary, "primary: wait colo" is the last step.
	names := checkpoint.StartProtection(checkpoint.ProtectConfig{Primary: p}).StepNames()
	if names[len(names)-1] != "primary: wait colo" {
		t.Fatalf("last step %q", names[len(names)-1])
	}
}

// Primary-only protection refuses a secondary of another QEMU version, and a configuration
// that nothing could connect to the secondary, before sending anything but the probe.
func TestProtectPrimaryOnlyRefusals(t *testing.T) {
	dialer := func(context.Context) (*os.File, error) { t.Error("dialed"); return nil, errors.New("no") }
	tests := []struct {
		name string
		cfg  checkpoint.ProtectConfig
		want []string
		sent []string
	}{
		{"version mismatch", checkpoint.ProtectConfig{SecondaryVersion: "10.0.2", DialMigration: dialer},
			[]string{"11.1.3", "10.0.2", "same version"}, []string{"query-version", "query-qmp-schema", "query-migrate-capabilities"}},
		{"no DialMigration", checkpoint.ProtectConfig{SecondaryVersion: "11.1.3"},
			[]string{"DialMigration"}, nil},
		{"AcceptMigration without secondary", checkpoint.ProtectConfig{DialMigration: dialer,
			AcceptMigration: func(context.Context) (*os.File, error) { return nil, nil }},
			[]string{"AcceptMigration"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			prim := fakePrimary(t)
			cfg := tc.cfg
			cfg.Spec, cfg.Gen, cfg.Primary = validSpec(), protectionGen(), dial(t, prim)
			_, err := checkpoint.StartProtection(cfg).Run(ctx10(t), nil, nil)
			var se *checkpoint.StepError
			if !errors.As(err, &se) || se.Step != "probe QEMUs" {
				t.Fatalf("err %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			checkSent(t, "primary", sent(prim), tc.sent)
		})
	}
	// Driving both, the secondary's probed version is what counts.
	prim, sec := fakePrimary(t), fakeSecondary(t, 10, 0, 2)
	_, err := checkpoint.StartProtection(checkpoint.ProtectConfig{Spec: validSpec(), Gen: protectionGen(), Primary: dial(t, prim), Secondary: dial(t, sec),
		SecondaryVersion: "11.1.3"}).Run(ctx10(t), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "primary runs QEMU 11.1.3, secondary 10.0.2") {
		t.Fatalf("err %v", err)
	}
}

// FailoverAsPrimaryYank cuts the migration, the replica's NBD client and the channels to the
// secondary out of band, one instance at a time, then runs FailoverAsPrimary's steps and waits
// for the guest to run, without ever sending cont.
func TestFailoverAsPrimaryYank(t *testing.T) {
	srv := qmptest.New(t)
	for _, cmd := range []string{"x-blockdev-change", "blockdev-del", "object-del", "x-colo-lost-heartbeat", "chardev-remove"} {
		srv.Handle(cmd, qmptest.Return(struct{}{}))
	}
	// One instance is unknown (migration already over): the others are still cut.
	srv.Handle("yank", func(c *qmptest.Conn, r *qmptest.Request) {
		if strings.Contains(string(r.Args), "migration") {
			c.ReplyError(r, "DeviceNotFound", "Instance 'migration' not found")
			return
		}
		c.Reply(r, struct{}{})
	})
	// The guest comes back a moment after COLO ended, as QEMU restarts it asynchronously.
	var statusCalls atomic.Int32
	srv.Handle("query-status", func(c *qmptest.Conn, r *qmptest.Request) {
		st := qmp.Status{Status: qmp.RunStateColo}
		if statusCalls.Add(1) >= 3 {
			st = qmp.Status{Running: true, Status: qmp.RunStateRunning}
		}
		c.Reply(r, st)
	})
	c := dial(t, srv)
	g := checkpoint.Generation{N: 3}
	seq := checkpoint.FailoverAsPrimaryYank(c, g)
	plain := checkpoint.FailoverAsPrimary(c, g).StepNames()
	wantNames := append(append([]string{"primary: yank migration and channels"}, plain...), "primary: wait running")
	if !slices.Equal(seq.StepNames(), wantNames) {
		t.Fatalf("steps %q", seq.StepNames())
	}
	if _, err := seq.Run(ctx10(t), nil, nil); err != nil {
		t.Fatal(err)
	}
	got := sent(srv)
	want := []string{
		`oob yank {"instances":[{"type":"migration"}]}`,
		`oob yank {"instances":[{"type":"block-node","node-name":"nbd3"}]}`,
		`oob yank {"instances":[{"type":"chardev","id":"mirror0"}]}`,
		`oob yank {"instances":[{"type":"chardev","id":"compare1"}]}`,
		`x-blockdev-change {"child":"children.1","parent":"colo-disk0"}`,
		`blockdev-del {"node-name":"nbd3"}`,
		`object-del {"id":"comp0"}`, `object-del {"id":"iothread1"}`, `object-del {"id":"m0"}`,
		`object-del {"id":"redire0"}`, `object-del {"id":"redire1"}`,
		`x-colo-lost-heartbeat`,
		`chardev-remove {"id":"compare0-0"}`, `chardev-remove {"id":"compare0"}`, `chardev-remove {"id":"compare_out0"}`,
		`chardev-remove {"id":"compare_out"}`, `chardev-remove {"id":"mirror0"}`, `chardev-remove {"id":"compare1"}`,
		`query-status`, `query-status`, `query-status`,
	}
	checkSent(t, "failover-as-primary (yank)", got, want)

	// A guest that stays stopped fails the last step, naming its state; nothing resumes it.
	srv.Handle("query-status", qmptest.Return(qmp.Status{Status: qmp.RunStatePaused}))
	// The budget covers the steps before the wait too; under -race on a busy machine 300 ms
	// sometimes ran out before the first query-status, which then reported the deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := checkpoint.FailoverAsPrimaryYank(c, g).Run(ctx, nil, nil)
	var se *checkpoint.StepError
	if !errors.As(err, &se) || se.Step != "primary: wait running" || !strings.Contains(err.Error(), `run state "paused"`) {
		t.Fatalf("err %v", err)
	}
	if n := len(srv.RequestsFor("cont")); n != 0 {
		t.Fatalf("sent cont %d times", n)
	}
}
