package qmp_test

import (
	"compress/gzip"
	"context"
	"encoding/json"
	"os"
	"testing"

	"github.com/lockstepvm/lockstep/qmp"
	"github.com/lockstepvm/lockstep/qmp/qmptest"
)

func u32(v uint32) *uint32 { return &v }
func u64(v uint64) *uint64 { return &v }

// Each typed call sends exactly QEMU's command name and argument form.
func TestTypedCallsSendQEMUForms(t *testing.T) {
	tests := []struct {
		name    string
		call    func(ctx context.Context, c *qmp.Client) error
		command string
		args    string
	}{
		{"query-status", func(ctx context.Context, c *qmp.Client) error { _, err := c.QueryStatus(ctx); return err }, "query-status", ""},
		{"query-version", func(ctx context.Context, c *qmp.Client) error { _, err := c.QueryVersion(ctx); return err }, "query-version", ""},
		{"query-colo-status", func(ctx context.Context, c *qmp.Client) error { _, err := c.QueryColoStatus(ctx); return err }, "query-colo-status", ""},
		{"query-migrate", func(ctx context.Context, c *qmp.Client) error { _, err := c.QueryMigrate(ctx); return err }, "query-migrate", ""},
		{"capabilities", func(ctx context.Context, c *qmp.Client) error {
			return c.MigrateSetCapabilities(ctx, map[string]bool{qmp.CapXColo: true, qmp.CapReturnPath: true})
		}, "migrate-set-capabilities", `{"capabilities":[{"capability":"return-path","state":true},{"capability":"x-colo","state":true}]}`},
		{"parameters", func(ctx context.Context, c *qmp.Client) error {
			return c.MigrateSetParameters(ctx, qmp.MigrationParameters{XCheckpointDelay: u32(200), MaxBandwidth: u64(1 << 30)})
		}, "migrate-set-parameters", `{"x-checkpoint-delay":200,"max-bandwidth":1073741824}`},
		{"migrate", func(ctx context.Context, c *qmp.Client) error { return c.Migrate(ctx, "tcp:127.0.0.1:4444") }, "migrate", `{"uri":"tcp:127.0.0.1:4444"}`},
		{"migrate-incoming", func(ctx context.Context, c *qmp.Client) error { return c.MigrateIncoming(ctx, "tcp:127.0.0.1:4444") }, "migrate-incoming", `{"uri":"tcp:127.0.0.1:4444"}`},
		{"migrate-continue", func(ctx context.Context, c *qmp.Client) error {
			return c.MigrateContinue(ctx, qmp.MigrationPreSwitchover)
		}, "migrate-continue", `{"state":"pre-switchover"}`},
		{"object-add flat", func(ctx context.Context, c *qmp.Client) error {
			return c.ObjectAdd(ctx, "filter-mirror", "m0", map[string]any{"netdev": "hn0", "queue": "tx", "outdev": "mirror0", "status": "off"})
		}, "object-add", `{"id":"m0","netdev":"hn0","outdev":"mirror0","qom-type":"filter-mirror","queue":"tx","status":"off"}`},
		{"object-del", func(ctx context.Context, c *qmp.Client) error { return c.ObjectDel(ctx, "comp0") }, "object-del", `{"id":"comp0"}`},
		{"chardev-add", func(ctx context.Context, c *qmp.Client) error {
			return c.ChardevAdd(ctx, "red0", map[string]any{"type": "null", "data": map[string]any{}})
		}, "chardev-add", `{"backend":{"data":{},"type":"null"},"id":"red0"}`},
		{"chardev-remove", func(ctx context.Context, c *qmp.Client) error { return c.ChardevRemove(ctx, "red0") }, "chardev-remove", `{"id":"red0"}`},
		{"blockdev-add", func(ctx context.Context, c *qmp.Client) error {
			return c.BlockdevAdd(ctx, map[string]any{"driver": "nbd", "node-name": "nbd0", "export": "parent0"})
		}, "blockdev-add", `{"driver":"nbd","export":"parent0","node-name":"nbd0"}`},
		{"blockdev-del", func(ctx context.Context, c *qmp.Client) error { return c.BlockdevDel(ctx, "nbd0") }, "blockdev-del", `{"node-name":"nbd0"}`},
		{"x-blockdev-change add", func(ctx context.Context, c *qmp.Client) error { return c.XBlockdevChangeAdd(ctx, "colo-disk0", "nbd0") }, "x-blockdev-change", `{"node":"nbd0","parent":"colo-disk0"}`},
		{"x-blockdev-change del", func(ctx context.Context, c *qmp.Client) error {
			return c.XBlockdevChangeDel(ctx, "colo-disk0", "children.1")
		}, "x-blockdev-change", `{"child":"children.1","parent":"colo-disk0"}`},
		{"nbd-server-start", func(ctx context.Context, c *qmp.Client) error { return c.NBDServerStart(ctx, "127.0.0.1", "9999") }, "nbd-server-start", `{"addr":{"data":{"host":"127.0.0.1","port":"9999"},"type":"inet"}}`},
		{"nbd-server-add", func(ctx context.Context, c *qmp.Client) error { return c.NBDServerAdd(ctx, "parent0", true) }, "nbd-server-add", `{"device":"parent0","writable":true}`},
		{"nbd-server-stop", func(ctx context.Context, c *qmp.Client) error { return c.NBDServerStop(ctx) }, "nbd-server-stop", ""},
		{"blockdev-mirror", func(ctx context.Context, c *qmp.Client) error {
			return c.BlockdevMirror(ctx, map[string]any{"job-id": "resync", "device": "colo-disk0", "target": "nbd1", "sync": "full", "auto-dismiss": false})
		}, "blockdev-mirror", `{"auto-dismiss":false,"device":"colo-disk0","job-id":"resync","sync":"full","target":"nbd1"}`},
		{"block-job-cancel", func(ctx context.Context, c *qmp.Client) error { return c.BlockJobCancel(ctx, "resync", false) }, "block-job-cancel", `{"device":"resync","force":false}`},
		{"block-job-dismiss", func(ctx context.Context, c *qmp.Client) error { return c.BlockJobDismiss(ctx, "resync") }, "block-job-dismiss", `{"id":"resync"}`},
		{"query-block-jobs", func(ctx context.Context, c *qmp.Client) error { _, err := c.QueryBlockJobs(ctx); return err }, "query-block-jobs", ""},
		{"x-colo-lost-heartbeat", func(ctx context.Context, c *qmp.Client) error { return c.XColoLostHeartbeat(ctx) }, "x-colo-lost-heartbeat", ""},
		{"stop", func(ctx context.Context, c *qmp.Client) error { return c.Stop(ctx) }, "stop", ""},
		{"cont", func(ctx context.Context, c *qmp.Client) error { return c.Cont(ctx) }, "cont", ""},
		{"qom-set", func(ctx context.Context, c *qmp.Client) error { return c.QomSet(ctx, "/objects/m0", "status", "on") }, "qom-set", `{"path":"/objects/m0","property":"status","value":"on"}`},
		{"yank", func(ctx context.Context, c *qmp.Client) error {
			return c.Yank(ctx, qmp.YankInstance{Type: "block-node", NodeName: "nbd0"}, qmp.YankInstance{Type: "chardev", ID: "red0"})
		}, "yank", `{"instances":[{"type":"block-node","node-name":"nbd0"},{"type":"chardev","id":"red0"}]}`},
		{"announce-self", func(ctx context.Context, c *qmp.Client) error { return c.AnnounceSelf(ctx) }, "announce-self", `{"initial":50,"max":550,"rounds":5,"step":100}`},
		{"yank nothing", func(ctx context.Context, c *qmp.Client) error { return c.Yank(ctx) }, "yank", `{"instances":[]}`},
		{"hmp", func(ctx context.Context, c *qmp.Client) error {
			_, err := c.HumanMonitorCommand(ctx, "drive_del replication0")
			return err
		}, "human-monitor-command", `{"command-line":"drive_del replication0"}`},
	}
	s := qmptest.New(t)
	for _, tc := range tests {
		s.Handle(tc.command, qmptest.Return(struct{}{}))
	}
	s.Handle("query-block-jobs", qmptest.Return([]any{}))
	s.Handle("human-monitor-command", qmptest.Return(""))
	c := dial(t, s)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := len(s.Requests())
			if err := tc.call(ctxT(t), c); err != nil {
				t.Fatalf("call: %v", err)
			}
			reqs := s.Requests()[before:]
			if len(reqs) != 1 {
				t.Fatalf("%d requests sent", len(reqs))
			}
			if reqs[0].Command != tc.command {
				t.Errorf("command %q, want %q", reqs[0].Command, tc.command)
			}
			if got := compact(reqs[0].Args); got != tc.args {
				t.Errorf("args %s\n want %s", got, tc.args)
			}
		})
	}
}

// Enum values that a newer QEMU adds decode as plain strings, never as errors.
func TestUnknownEnumValuesDecode(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("query-status", qmptest.Return(map[string]any{"running": false, "status": "future-state", "singlestep": false}))
	s.Handle("query-colo-status", qmptest.Return(map[string]any{"mode": "tertiary", "last-mode": "none", "reason": "cosmic-ray"}))
	s.Handle("query-migrate", qmptest.Return(map[string]any{"status": "wormhole", "ram": map[string]any{"transferred": 42}}))
	c := dial(t, s)
	st, err := c.QueryStatus(ctxT(t))
	if err != nil || st.Status != "future-state" {
		t.Errorf("query-status: %+v %v", st, err)
	}
	cs, err := c.QueryColoStatus(ctxT(t))
	if err != nil || cs.Mode != "tertiary" || cs.Reason != "cosmic-ray" {
		t.Errorf("query-colo-status: %+v %v", cs, err)
	}
	mi, err := c.QueryMigrate(ctxT(t))
	if err != nil || mi.Status != "wormhole" || mi.RAM == nil || mi.RAM.Transferred != 42 {
		t.Errorf("query-migrate: %+v %v", mi, err)
	}
}

type recordedSchema struct {
	Version qmp.VersionInfo `json:"version"`
	Schema  json.RawMessage `json:"schema"`
}

func loadSchema(t *testing.T, name string) recordedSchema {
	t.Helper()
	f, err := os.Open("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var r recordedSchema
	if err := json.NewDecoder(zr).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return r
}

// The probe reads the forms that differ between QEMU releases from their real schemas, recorded
// from Debian 12's QEMU 7.2.22 and trixie-backports' 11.1.3 (`-M none`).
func TestFeaturesFromRealSchemas(t *testing.T) {
	tests := []struct {
		file                                 string
		version                              string
		reconnectMS, reconnect, channels, rp bool
		hasCaps                              []string
		hasCommands                          []string
	}{
		{file: "schema-7.2.json.gz", version: "7.2.22", reconnect: true,
			hasCaps:     []string{"x-colo", "return-path", "events", "pause-before-switchover"},
			hasCommands: []string{"x-colo-lost-heartbeat", "query-colo-status", "x-blockdev-change", "yank", "blockdev-mirror"}},
		{file: "schema-11.1.json.gz", version: "11.1.3", reconnectMS: true, channels: true, rp: true,
			hasCaps:     []string{"x-colo", "return-path", "events", "pause-before-switchover"},
			hasCommands: []string{"x-colo-lost-heartbeat", "query-colo-status", "x-blockdev-change", "yank", "blockdev-mirror"}},
	}
	for _, tc := range tests {
		t.Run(tc.version, func(t *testing.T) {
			r := loadSchema(t, tc.file)
			f, err := qmp.FeaturesFromSchema(r.Version, r.Schema)
			if err != nil {
				t.Fatal(err)
			}
			if f.Version.String() != tc.version {
				t.Errorf("version %s", f.Version)
			}
			if f.ChardevReconnectMS != tc.reconnectMS || f.ChardevReconnect != tc.reconnect {
				t.Errorf("reconnect-ms %v reconnect %v, want %v %v", f.ChardevReconnectMS, f.ChardevReconnect, tc.reconnectMS, tc.reconnect)
			}
			if f.MigrateChannels != tc.channels {
				t.Errorf("MigrateChannels %v", f.MigrateChannels)
			}
			if f.ObjectAddProps {
				t.Error("ObjectAddProps true; both take flat object-add")
			}
			if !f.BlockdevAddNBD {
				t.Error("BlockdevAddNBD false")
			}
			if f.ColoNeedsReturnPath != tc.rp {
				t.Errorf("ColoNeedsReturnPath %v", f.ColoNeedsReturnPath)
			}
			for _, cp := range tc.hasCaps {
				if !f.HasCapability(cp) {
					t.Errorf("capability %s missing", cp)
				}
			}
			for _, cmd := range tc.hasCommands {
				if !f.HasCommand(cmd) {
					t.Errorf("command %s missing", cmd)
				}
			}
			if f.HasCommand("no-such-command") || f.HasCapability("no-such-cap") {
				t.Error("unknown names reported present")
			}
		})
	}
}

func TestFeaturesProbedOncePerConnection(t *testing.T) {
	r := loadSchema(t, "schema-11.1.json.gz")
	s := qmptest.New(t)
	s.Handle("query-version", qmptest.Return(r.Version))
	s.Handle("query-qmp-schema", qmptest.Return(r.Schema))
	s.Handle("query-migrate-capabilities", qmptest.Return([]qmp.MigrationCapability{{Capability: "x-colo"}, {Capability: "some-new-cap"}}))
	c := dial(t, s)
	for i := 0; i < 3; i++ {
		f, err := c.Features(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		if !f.HasCapability("some-new-cap") || !f.ChardevReconnectMS {
			t.Fatalf("features %+v", f)
		}
	}
	if n := len(s.RequestsFor("query-qmp-schema")); n != 1 {
		t.Errorf("schema read %d times, want once", n)
	}
}

func TestFeaturesProbeFailureNotCached(t *testing.T) {
	s := qmptest.New(t)
	s.Handle("query-version", qmptest.Return(map[string]any{"qemu": map[string]int{"major": 9}}))
	s.Handle("query-qmp-schema", qmptest.Return("not a list"))
	c := dial(t, s)
	if _, err := c.Features(ctxT(t)); err == nil {
		t.Fatal("a malformed schema was accepted")
	}
	s.Handle("query-qmp-schema", qmptest.Return([]any{}))
	s.Handle("query-migrate-capabilities", qmptest.Return([]any{}))
	f, err := c.Features(ctxT(t))
	if err != nil || f.Version.QEMU.Major != 9 {
		t.Fatalf("second probe: %+v %v", f, err)
	}
}
