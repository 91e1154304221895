package qmp_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/lockstepvm/lockstep/qmp"
)

func TestDecode(t *testing.T) {
	tests := []struct {
		name    string
		line    string
		kind    qmp.Kind
		wantErr bool
		check   func(t *testing.T, m *qmp.Message)
	}{
		{name: "greeting", line: `{"QMP": {"version": {"qemu": {"micro": 3, "minor": 1, "major": 11}, "package": "x"}, "capabilities": ["oob"]}}`, kind: qmp.KindGreeting,
			check: func(t *testing.T, m *qmp.Message) {
				if m.Greeting.Version.String() != "11.1.3" || !m.Greeting.HasCapability("oob") {
					t.Errorf("%+v", m.Greeting)
				}
			}},
		{name: "return with id", line: `{"return": {"status": "colo"}, "id": "ls-7"}`, kind: qmp.KindReturn,
			check: func(t *testing.T, m *qmp.Message) {
				if string(m.ID) != `"ls-7"` || string(m.Return) != `{"status": "colo"}` {
					t.Errorf("%s %s", m.ID, m.Return)
				}
			}},
		{name: "empty return", line: `{"return": {}}`, kind: qmp.KindReturn},
		{name: "error", line: `{"error": {"class": "GenericError", "desc": "There's a migration process in progress"}, "id": 3}`, kind: qmp.KindError,
			check: func(t *testing.T, m *qmp.Message) {
				if m.Err.Class != "GenericError" || !strings.Contains(m.Err.Desc, "migration process") || string(m.ID) != "3" {
					t.Errorf("%+v", m.Err)
				}
			}},
		{name: "event", line: `{"timestamp": {"seconds": 1700000000, "microseconds": 250}, "event": "COLO_EXIT", "data": {"mode": "secondary", "reason": "error"}}`, kind: qmp.KindEvent,
			check: func(t *testing.T, m *qmp.Message) {
				if !m.Event.Time.Equal(time.Unix(1700000000, 250000)) {
					t.Errorf("time %v", m.Event.Time)
				}
				var d qmp.ColoExitData
				if err := m.Event.DecodeData(&d); err != nil || d.Mode != qmp.ColoModeSecondary {
					t.Errorf("%+v %v", d, err)
				}
			}},
		{name: "trailing CRLF", line: "{\"return\": 1}\r\n", kind: qmp.KindReturn},
		{name: "empty", line: ``, wantErr: true},
		{name: "not json", line: `hello`, wantErr: true},
		{name: "array", line: `[1,2]`, wantErr: true},
		{name: "truncated", line: `{"return": {`, wantErr: true},
		{name: "nothing known", line: `{"foo": 1}`, wantErr: true},
		{name: "return and error", line: `{"return": {}, "error": {"class": "X", "desc": ""}}`, wantErr: true},
		{name: "error without class", line: `{"error": {"desc": "x"}}`, wantErr: true},
		{name: "event without name", line: `{"event": ""}`, wantErr: true},
		{name: "greeting without version", line: `{"QMP": {}}`, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, err := qmp.Decode([]byte(tc.line))
			if tc.wantErr {
				if err == nil || !errors.Is(err, qmp.ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.Kind != tc.kind {
				t.Fatalf("kind %v, want %v", m.Kind, tc.kind)
			}
			if tc.check != nil {
				tc.check(t, m)
			}
		})
	}
}

// Decode never panics, classifies every accepted line as exactly one kind with its fields set,
// and never aliases its input.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}`,
		`{"return": {}, "id": "ls-1"}`,
		`{"return": [{"capability": "x-colo", "state": false}], "id": 5}`,
		`{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}, "id": "ls-2"}`,
		`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`,
		`{"event": "MIGRATION", "data": {"status": "colo"}, "timestamp": {"seconds": 1, "microseconds": 999999}}`,
		`{"return": "\u00e9\n"}`,
		`{"id": null, "return": null}`,
		`{}`, `[]`, `null`, `{"return"`, "\xff\xfe",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		orig := append([]byte(nil), line...)
		m, err := qmp.Decode(line)
		if err != nil {
			if !errors.Is(err, qmp.ErrMalformed) {
				t.Fatalf("error does not wrap ErrMalformed: %v", err)
			}
			return
		}
		switch m.Kind {
		case qmp.KindGreeting:
			if m.Greeting == nil {
				t.Fatal("greeting without Greeting")
			}
		case qmp.KindReturn:
			if m.Return == nil || !json.Valid(m.Return) {
				t.Fatalf("return %q", m.Return)
			}
		case qmp.KindError:
			if m.Err == nil || m.Err.Class == "" {
				t.Fatal("error without class")
			}
		case qmp.KindEvent:
			if m.Event == nil || m.Event.Name == "" {
				t.Fatal("event without name")
			}
		default:
			t.Fatalf("kind %v", m.Kind)
		}
		for i := range line {
			line[i] = 'X'
		}
		if m.Kind == qmp.KindReturn && !json.Valid(m.Return) {
			t.Fatal("the message aliases the input buffer")
		}
		copy(line, orig)
	})
}
