package qmp

import (
	"context"
	"encoding/json"
	"fmt"
)

// Features is what one QEMU supports, read once per connection from query-version,
// query-qmp-schema and query-migrate-capabilities. Callers pick command forms from it instead of
// from version numbers wherever the schema can tell.
type Features struct {
	Version VersionInfo
	// Commands holds the name of every QMP command.
	Commands map[string]bool
	// Events holds the name of every QMP event.
	Events map[string]bool
	// MigrationCapabilities holds the name of every migration capability.
	MigrationCapabilities map[string]bool
	// ChardevReconnectMS: socket chardevs take "reconnect-ms" (QEMU 9.2 and newer).
	ChardevReconnectMS bool
	// ChardevReconnect: socket chardevs take "reconnect" in seconds (removed in QEMU 10.0).
	ChardevReconnect bool
	// ObjectAddProps: object-add still takes the pre-6.0 nested "props" form.
	ObjectAddProps bool
	// MigrateChannels: migrate and migrate-incoming take "channels" besides "uri".
	MigrateChannels bool
	// BlockdevAddNBD: blockdev-add can create an nbd client node (else HMP drive_add is needed).
	BlockdevAddNBD bool
	// ColoNeedsReturnPath: x-colo must be set together with return-path. QEMU 11.1 refuses x-colo
	// without it; 7.2 was tested without it. The schema cannot tell, so it goes by version:
	// every QEMU from 8.0 on gets return-path, which COLO has always accepted.
	ColoNeedsReturnPath bool
}

// HasCommand reports whether QEMU knows the command.
func (f *Features) HasCommand(name string) bool { return f.Commands[name] }

// HasCapability reports whether QEMU knows the migration capability.
func (f *Features) HasCapability(name string) bool { return f.MigrationCapabilities[name] }

// schemaEntry is one SchemaInfo of query-qmp-schema; only the fields the probe reads.
type schemaEntry struct {
	Name     string `json:"name"`
	MetaType string `json:"meta-type"`
	ArgType  string `json:"arg-type"`
	Members  []struct {
		Name string `json:"name"`
		Type string `json:"type"`
	} `json:"members"`
	Variants []struct {
		Case string `json:"case"`
		Type string `json:"type"`
	} `json:"variants"`
	Values      []string `json:"values"`
	ElementType string   `json:"element-type"`
}

// Features returns what this QEMU supports, probing on first use and caching the answer for the
// life of the connection. A failed probe is not cached.
func (c *Client) Features(ctx context.Context) (*Features, error) {
	c.mu.Lock()
	f := c.features
	c.mu.Unlock()
	if f != nil {
		return f, nil
	}
	f, err := c.probe(ctx)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.features == nil {
		c.features = f
	}
	f = c.features
	c.mu.Unlock()
	return f, nil
}

func (c *Client) probe(ctx context.Context) (*Features, error) {
	v, err := c.QueryVersion(ctx)
	if err != nil {
		return nil, fmt.Errorf("qmp: feature probe: %w", err)
	}
	var raw json.RawMessage
	if err := c.Execute(ctx, "query-qmp-schema", nil, &raw); err != nil {
		return nil, fmt.Errorf("qmp: feature probe: %w", err)
	}
	f, err := FeaturesFromSchema(v, raw)
	if err != nil {
		return nil, err
	}
	if f.HasCommand("query-migrate-capabilities") {
		caps, err := c.QueryMigrateCapabilities(ctx)
		if err != nil {
			return nil, fmt.Errorf("qmp: feature probe: %w", err)
		}
		for _, cp := range caps {
			f.MigrationCapabilities[cp.Capability] = true
		}
	}
	return f, nil
}

// FeaturesFromSchema derives Features from a version and the raw reply of query-qmp-schema.
// Migration capabilities are taken from the MigrationCapability enum when it can be found.
func FeaturesFromSchema(v VersionInfo, schema json.RawMessage) (*Features, error) {
	var entries []schemaEntry
	if err := json.Unmarshal(schema, &entries); err != nil {
		return nil, fmt.Errorf("%w: query-qmp-schema: %v", ErrMalformed, err)
	}
	f := &Features{
		Version:               v,
		Commands:              map[string]bool{},
		Events:                map[string]bool{},
		MigrationCapabilities: map[string]bool{},
		ColoNeedsReturnPath:   v.AtLeast(8, 0),
	}
	byName := make(map[string]*schemaEntry, len(entries))
	for i := range entries {
		e := &entries[i]
		byName[e.Name] = e
		switch e.MetaType {
		case "command":
			f.Commands[e.Name] = true
		case "event":
			f.Events[e.Name] = true
		}
	}
	// Type names are masked in the introspection output, so forms are found by walking from
	// the commands, whose names are not.
	members := func(typeName string) map[string]string {
		out := map[string]string{}
		e := byName[typeName]
		if e == nil {
			return out
		}
		for _, m := range e.Members {
			out[m.Name] = m.Type
		}
		for _, vr := range e.Variants {
			if ve := byName[vr.Type]; ve != nil {
				for _, m := range ve.Members {
					if _, ok := out[m.Name]; !ok {
						out[m.Name] = m.Type
					}
				}
			}
		}
		return out
	}
	cmdArgs := func(cmd string) map[string]string {
		if e := byName[cmd]; e != nil && e.MetaType == "command" {
			return members(e.ArgType)
		}
		return map[string]string{}
	}
	_, f.ObjectAddProps = cmdArgs("object-add")["props"]
	_, f.MigrateChannels = cmdArgs("migrate")["channels"]

	// blockdev-add: its argument type is BlockdevOptions, a union whose variants include nbd.
	if e := byName["blockdev-add"]; e != nil && e.MetaType == "command" {
		if bo := byName[e.ArgType]; bo != nil {
			for _, vr := range bo.Variants {
				if vr.Case == "nbd" {
					f.BlockdevAddNBD = true
				}
			}
		}
	}

	// migrate-set-capabilities {capabilities: [MigrationCapabilityStatus{capability: enum}]}.
	if arr := byName[cmdArgs("migrate-set-capabilities")["capabilities"]]; arr != nil {
		if enumName, ok := members(arr.ElementType)["capability"]; ok {
			if en := byName[enumName]; en != nil {
				for _, val := range en.Values {
					f.MigrationCapabilities[val] = true
				}
			}
		}
	}

	// chardev-add {backend: ChardevBackend union {socket: {data: ChardevSocket}}}.
	if be := byName[cmdArgs("chardev-add")["backend"]]; be != nil {
		for _, vr := range be.Variants {
			if vr.Case != "socket" {
				continue
			}
			wrapper := members(vr.Type)
			sock := members(wrapper["data"])
			if len(sock) == 0 {
				sock = wrapper
			}
			_, f.ChardevReconnectMS = sock["reconnect-ms"]
			_, f.ChardevReconnect = sock["reconnect"]
		}
	}
	return f, nil
}
