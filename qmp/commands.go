package qmp

import (
	"context"
	"os"
	"sort"
)

// RunState is QEMU's run state as reported by query-status ("running", "paused", "colo",
// "inmigrate", "postmigrate", "finish-migrate", ...). Values newer QEMUs add are kept as they are.
type RunState string

// Run states lockstep acts on.
const (
	RunStateRunning       RunState = "running"
	RunStatePaused        RunState = "paused"
	RunStateColo          RunState = "colo"
	RunStateInMigrate     RunState = "inmigrate"
	RunStatePostMigrate   RunState = "postmigrate"
	RunStateFinishMigrate RunState = "finish-migrate"
	RunStatePreLaunch     RunState = "prelaunch"
	RunStateShutdown      RunState = "shutdown"
)

// Status is the reply of query-status.
type Status struct {
	Running bool     `json:"running"`
	Status  RunState `json:"status"`
}

// QueryStatus returns the VM's run state.
func (c *Client) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	err := c.Execute(ctx, "query-status", nil, &s)
	return s, err
}

// QueryVersion returns QEMU's version.
func (c *Client) QueryVersion(ctx context.Context) (VersionInfo, error) {
	var v VersionInfo
	err := c.Execute(ctx, "query-version", nil, &v)
	return v, err
}

// ColoMode is a COLO role: "none", "primary" or "secondary".
type ColoMode string

// COLO modes.
const (
	ColoModeNone      ColoMode = "none"
	ColoModePrimary   ColoMode = "primary"
	ColoModeSecondary ColoMode = "secondary"
)

// ColoExitReason says why COLO ended: "none", "request", "error" or "processing".
type ColoExitReason string

// COLO exit reasons.
const (
	ColoExitNone       ColoExitReason = "none"
	ColoExitRequest    ColoExitReason = "request"
	ColoExitError      ColoExitReason = "error"
	ColoExitProcessing ColoExitReason = "processing"
)

// ColoStatus is the reply of query-colo-status.
type ColoStatus struct {
	Mode     ColoMode       `json:"mode"`
	LastMode ColoMode       `json:"last-mode"`
	Reason   ColoExitReason `json:"reason"`
}

// QueryColoStatus returns the COLO state of this QEMU.
func (c *Client) QueryColoStatus(ctx context.Context) (ColoStatus, error) {
	var s ColoStatus
	err := c.Execute(ctx, "query-colo-status", nil, &s)
	return s, err
}

// MigrationStatus is the status of a migration ("none", "setup", "active", "colo", "completed",
// "failed", "pre-switchover", "device", ...). Values newer QEMUs add are kept as they are.
type MigrationStatus string

// Migration statuses lockstep acts on.
const (
	MigrationNone          MigrationStatus = "none"
	MigrationSetup         MigrationStatus = "setup"
	MigrationActive        MigrationStatus = "active"
	MigrationColo          MigrationStatus = "colo"
	MigrationCompleted     MigrationStatus = "completed"
	MigrationFailed        MigrationStatus = "failed"
	MigrationCancelled     MigrationStatus = "cancelled"
	MigrationPreSwitchover MigrationStatus = "pre-switchover"
	MigrationDevice        MigrationStatus = "device"
)

// MigrationRAM holds the RAM statistics of query-migrate (absent during COLO on old QEMUs).
type MigrationRAM struct {
	Transferred      uint64  `json:"transferred"`
	Remaining        uint64  `json:"remaining"`
	Total            uint64  `json:"total"`
	Duplicate        uint64  `json:"duplicate"`
	Normal           uint64  `json:"normal"`
	NormalBytes      uint64  `json:"normal-bytes"`
	DirtyPagesRate   uint64  `json:"dirty-pages-rate"`
	MBps             float64 `json:"mbps"`
	DirtySyncCount   uint64  `json:"dirty-sync-count"`
	PagesPerSecond   uint64  `json:"pages-per-second"`
	PrecopyBytes     uint64  `json:"precopy-bytes"`
	DowntimeBytes    uint64  `json:"downtime-bytes"`
	PostcopyBytes    uint64  `json:"postcopy-bytes"`
	DirtySyncMissing uint64  `json:"dirty-sync-missed-zero-copy"`
}

// MigrationInfo is the reply of query-migrate.
type MigrationInfo struct {
	Status      MigrationStatus `json:"status"`
	RAM         *MigrationRAM   `json:"ram,omitempty"`
	TotalTimeMS uint64          `json:"total-time,omitempty"`
	DowntimeMS  uint64          `json:"downtime,omitempty"`
	SetupTimeMS uint64          `json:"setup-time,omitempty"`
	ErrorDesc   string          `json:"error-desc,omitempty"`
}

// QueryMigrate returns the state of the outgoing or incoming migration.
func (c *Client) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var m MigrationInfo
	err := c.Execute(ctx, "query-migrate", nil, &m)
	return m, err
}

// Migration capabilities COLO uses.
const (
	CapXColo                 = "x-colo"
	CapEvents                = "events"
	CapReturnPath            = "return-path"
	CapPauseBeforeSwitchover = "pause-before-switchover"
)

// MigrationCapability is one capability and its state.
type MigrationCapability struct {
	Capability string `json:"capability"`
	State      bool   `json:"state"`
}

// MigrateSetCapabilities sets migration capabilities.
func (c *Client) MigrateSetCapabilities(ctx context.Context, caps map[string]bool) error {
	list := make([]MigrationCapability, 0, len(caps))
	for _, name := range sortedKeys(caps) {
		list = append(list, MigrationCapability{Capability: name, State: caps[name]})
	}
	return c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil)
}

// QueryMigrateCapabilities returns every migration capability this QEMU knows and its state.
func (c *Client) QueryMigrateCapabilities(ctx context.Context) ([]MigrationCapability, error) {
	var list []MigrationCapability
	err := c.Execute(ctx, "query-migrate-capabilities", nil, &list)
	return list, err
}

// MigrationParameters are the tunables of migrate-set-parameters; nil fields are left unchanged.
type MigrationParameters struct {
	XCheckpointDelay *uint32 `json:"x-checkpoint-delay,omitempty"`
	MaxBandwidth     *uint64 `json:"max-bandwidth,omitempty"`
	DowntimeLimit    *uint64 `json:"downtime-limit,omitempty"`
	// TLSCreds names the tls-creds-x509 object of an encrypted migration ("" turns TLS off);
	// TLSHostname is what the outgoing side checks the incoming side's certificate against;
	// TLSAuthz names the object that authorizes the outgoing side's certificate.
	TLSCreds    *string `json:"tls-creds,omitempty"`
	TLSHostname *string `json:"tls-hostname,omitempty"`
	TLSAuthz    *string `json:"tls-authz,omitempty"`
}

// MigrateSetParameters sets migration parameters. During COLO a new x-checkpoint-delay is taken
// at once and triggers a checkpoint.
func (c *Client) MigrateSetParameters(ctx context.Context, p MigrationParameters) error {
	return c.Execute(ctx, "migrate-set-parameters", p, nil)
}

// Migrate starts an outgoing migration to uri ("tcp:HOST:PORT", "fd:NAME", ...).
func (c *Client) Migrate(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateIncoming starts listening for an incoming migration (QEMU started with -incoming defer).
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// MigrateContinue resumes a migration paused in state (e.g. "pre-switchover").
func (c *Client) MigrateContinue(ctx context.Context, state MigrationStatus) error {
	return c.Execute(ctx, "migrate-continue", map[string]any{"state": state}, nil)
}

// MigrateCancel cancels the outgoing migration.
func (c *Client) MigrateCancel(ctx context.Context) error {
	return c.Execute(ctx, "migrate_cancel", nil, nil)
}

// ObjectAdd creates a QOM object with flat arguments: props sit beside qom-type and id, the form
// of QEMU 6.0 and newer.
func (c *Client) ObjectAdd(ctx context.Context, qomType, id string, props map[string]any) error {
	args := make(map[string]any, len(props)+2)
	for k, v := range props {
		args[k] = v
	}
	args["qom-type"] = qomType
	args["id"] = id
	return c.Execute(ctx, "object-add", args, nil)
}

// ObjectDel deletes a QOM object.
func (c *Client) ObjectDel(ctx context.Context, id string) error {
	return c.Execute(ctx, "object-del", map[string]any{"id": id}, nil)
}

// ChardevAdd creates a character device; backend is the ChardevBackend union value, e.g.
// {"type":"socket","data":{...}}.
func (c *Client) ChardevAdd(ctx context.Context, id string, backend any) error {
	return c.Execute(ctx, "chardev-add", map[string]any{"id": id, "backend": backend}, nil)
}

// ChardevRemove deletes a character device.
func (c *Client) ChardevRemove(ctx context.Context, id string) error {
	return c.Execute(ctx, "chardev-remove", map[string]any{"id": id}, nil)
}

// BlockdevAdd adds a block node; opts are the BlockdevOptions (driver, node-name, ...).
func (c *Client) BlockdevAdd(ctx context.Context, opts map[string]any) error {
	return c.Execute(ctx, "blockdev-add", opts, nil)
}

// BlockdevDel deletes a block node.
func (c *Client) BlockdevDel(ctx context.Context, nodeName string) error {
	return c.Execute(ctx, "blockdev-del", map[string]any{"node-name": nodeName}, nil)
}

// XBlockdevChangeAdd adds node as a new child of parent (a quorum).
func (c *Client) XBlockdevChangeAdd(ctx context.Context, parent, node string) error {
	return c.Execute(ctx, "x-blockdev-change", map[string]any{"parent": parent, "node": node}, nil)
}

// XBlockdevChangeDel removes child (e.g. "children.1") from parent.
func (c *Client) XBlockdevChangeDel(ctx context.Context, parent, child string) error {
	return c.Execute(ctx, "x-blockdev-change", map[string]any{"parent": parent, "child": child}, nil)
}

// NBDServerStart starts QEMU's NBD server on host:port.
func (c *Client) NBDServerStart(ctx context.Context, host, port string) error {
	return c.Execute(ctx, "nbd-server-start", map[string]any{
		"addr": map[string]any{"type": "inet", "data": map[string]any{"host": host, "port": port}},
	}, nil)
}

// NBDServerAdd exports a block device (by device or node name) over the NBD server.
func (c *Client) NBDServerAdd(ctx context.Context, device string, writable bool) error {
	return c.Execute(ctx, "nbd-server-add", map[string]any{"device": device, "writable": writable}, nil)
}

// NBDServerStop stops the NBD server and its exports.
func (c *Client) NBDServerStop(ctx context.Context) error {
	return c.Execute(ctx, "nbd-server-stop", nil, nil)
}

// BlockdevMirror starts a mirror job; args are blockdev-mirror's arguments (job-id, device,
// target, sync, auto-dismiss, ...).
func (c *Client) BlockdevMirror(ctx context.Context, args map[string]any) error {
	return c.Execute(ctx, "blockdev-mirror", args, nil)
}

// BlockJobCancel cancels a block job; for a ready mirror it completes the switch-free way.
func (c *Client) BlockJobCancel(ctx context.Context, device string, force bool) error {
	return c.Execute(ctx, "block-job-cancel", map[string]any{"device": device, "force": force}, nil)
}

// BlockJobDismiss removes a concluded job.
func (c *Client) BlockJobDismiss(ctx context.Context, id string) error {
	return c.Execute(ctx, "block-job-dismiss", map[string]any{"id": id}, nil)
}

// BlockJobInfo is one entry of query-block-jobs.
type BlockJobInfo struct {
	Type   string `json:"type"`
	Device string `json:"device"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Busy   bool   `json:"busy"`
	Paused bool   `json:"paused"`
	Speed  int64  `json:"speed"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
	Error  string `json:"error,omitempty"`
}

// QueryBlockJobs lists the block jobs.
func (c *Client) QueryBlockJobs(ctx context.Context) ([]BlockJobInfo, error) {
	var jobs []BlockJobInfo
	err := c.Execute(ctx, "query-block-jobs", nil, &jobs)
	return jobs, err
}

// XColoLostHeartbeat tells COLO that the peer is gone: this side fails over.
func (c *Client) XColoLostHeartbeat(ctx context.Context) error {
	return c.Execute(ctx, "x-colo-lost-heartbeat", nil, nil)
}

// YankInstance names what yank cuts: {"type":"migration"}, {"type":"chardev","id":...},
// {"type":"block-node","node-name":...}.
type YankInstance struct {
	Type     string `json:"type"`
	ID       string `json:"id,omitempty"`
	NodeName string `json:"node-name,omitempty"`
}

// Yank cuts the network connections of the given instances, out of band when OOB was
// negotiated, so that it works while an in-band command hangs on them.
func (c *Client) Yank(ctx context.Context, instances ...YankInstance) error {
	if instances == nil {
		instances = []YankInstance{} // QEMU wants an array, never null
	}
	args := map[string]any{"instances": instances}
	if c.oob {
		return c.ExecuteOOB(ctx, "yank", args, nil)
	}
	return c.Execute(ctx, "yank", args, nil)
}

// AnnounceSelf makes the NICs send gratuitous RARP frames so that switches learn where the
// guest's MAC is now: 5 rounds, 50 ms after the call, then 150, 250, ... ms apart.
func (c *Client) AnnounceSelf(ctx context.Context) error {
	return c.Execute(ctx, "announce-self", map[string]any{"initial": 50, "max": 550, "rounds": 5, "step": 100}, nil)
}

// ChardevInfo is one entry of query-chardev.
type ChardevInfo struct {
	Label        string `json:"label"`
	Filename     string `json:"filename"`
	FrontendOpen bool   `json:"frontend-open"`
}

// QueryChardev lists the character devices. A connected socket chardev's filename shows its
// peer after "<->"; a server waiting for its client starts with "disconnected:".
func (c *Client) QueryChardev(ctx context.Context) ([]ChardevInfo, error) {
	var out []ChardevInfo
	err := c.Execute(ctx, "query-chardev", nil, &out)
	return out, err
}

// Stop pauses the VM.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes the VM. Never call it while the run state is "colo".
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit makes QEMU exit.
func (c *Client) Quit(ctx context.Context) error { return c.Execute(ctx, "quit", nil, nil) }

// QomSet sets a QOM property.
func (c *Client) QomSet(ctx context.Context, path, property string, value any) error {
	return c.Execute(ctx, "qom-set", map[string]any{"path": path, "property": property, "value": value}, nil)
}

// QomGet reads a QOM property into result.
func (c *Client) QomGet(ctx context.Context, path, property string, result any) error {
	return c.Execute(ctx, "qom-get", map[string]any{"path": path, "property": property}, result)
}

// GetFD passes f to QEMU under name, for "fd:NAME" URIs and fd= options.
func (c *Client) GetFD(ctx context.Context, name string, f *os.File) error {
	return c.ExecuteWithFiles(ctx, "getfd", map[string]any{"fdname": name}, nil, f)
}

// CloseFD closes a descriptor passed with GetFD that QEMU did not consume.
func (c *Client) CloseFD(ctx context.Context, name string) error {
	return c.Execute(ctx, "closefd", map[string]any{"fdname": name}, nil)
}

// HumanMonitorCommand runs an HMP command (for forms QMP lacks on old QEMUs, e.g. drive_add).
func (c *Client) HumanMonitorCommand(ctx context.Context, line string) (string, error) {
	var out string
	err := c.Execute(ctx, "human-monitor-command", map[string]any{"command-line": line}, &out)
	return out, err
}

// Event names lockstep watches.
const (
	EventStop             = "STOP"
	EventResume           = "RESUME"
	EventColoExit         = "COLO_EXIT"
	EventMigration        = "MIGRATION"
	EventMigrationPass    = "MIGRATION_PASS"
	EventQuorumReportBad  = "QUORUM_REPORT_BAD"
	EventQuorumFailure    = "QUORUM_FAILURE"
	EventBlockJobError    = "BLOCK_JOB_ERROR"
	EventJobStatusChange  = "JOB_STATUS_CHANGE"
	EventBlockJobReady    = "BLOCK_JOB_READY"
	EventBlockJobComplete = "BLOCK_JOB_COMPLETED"
	EventBlockJobCancel   = "BLOCK_JOB_CANCELLED"
	EventShutdown         = "SHUTDOWN"
)

// ColoExitData is the data of a COLO_EXIT event.
type ColoExitData struct {
	Mode   ColoMode       `json:"mode"`
	Reason ColoExitReason `json:"reason"`
}

// MigrationEventData is the data of a MIGRATION event.
type MigrationEventData struct {
	Status MigrationStatus `json:"status"`
}

// JobStatusChangeData is the data of a JOB_STATUS_CHANGE event.
type JobStatusChangeData struct {
	ID     string `json:"id"`
	Status string `json:"status"`
}

func sortedKeys(m map[string]bool) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
