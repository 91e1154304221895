package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Kind says what a message from QEMU is.
type Kind int

// The kinds of message QEMU sends on a QMP connection.
const (
	KindGreeting Kind = iota + 1
	KindReturn
	KindError
	KindEvent
)

func (k Kind) String() string {
	switch k {
	case KindGreeting:
		return "greeting"
	case KindReturn:
		return "return"
	case KindError:
		return "error"
	case KindEvent:
		return "event"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// ErrMalformed is wrapped by every error about a message that is not valid QMP.
var ErrMalformed = errors.New("qmp: malformed message")

// Message is one decoded message from QEMU. It owns all of its bytes: nothing in it is reused by
// later reads.
type Message struct {
	Kind Kind
	// ID is the raw JSON of the id of a return or error; empty when QEMU sent none.
	ID json.RawMessage
	// Return is the raw JSON of a successful command's result.
	Return json.RawMessage
	// Err is set for KindError.
	Err *Error
	// Event is set for KindEvent.
	Event *Event
	// Greeting is set for KindGreeting.
	Greeting *Greeting
}

// Event is an asynchronous QMP event with QEMU's own timestamp.
type Event struct {
	Name string
	Data json.RawMessage
	// Time is QEMU's timestamp of the event (seconds and microseconds since the epoch).
	Time time.Time
}

// DecodeData decodes the event's data into v.
func (e *Event) DecodeData(v any) error {
	if len(e.Data) == 0 {
		return fmt.Errorf("qmp: event %s has no data", e.Name)
	}
	if err := json.Unmarshal(e.Data, v); err != nil {
		return fmt.Errorf("qmp: decoding data of event %s: %w", e.Name, err)
	}
	return nil
}

// Greeting is what QEMU says first on a new QMP connection.
type Greeting struct {
	Version      VersionInfo
	Capabilities []string
}

// HasCapability reports whether the greeting offered capability c (for example "oob").
func (g *Greeting) HasCapability(c string) bool {
	for _, x := range g.Capabilities {
		if x == c {
			return true
		}
	}
	return false
}

// VersionInfo is QEMU's version as reported by the greeting and query-version.
type VersionInfo struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	Package string `json:"package"`
}

// String formats the version as "major.minor.micro".
func (v VersionInfo) String() string {
	return fmt.Sprintf("%d.%d.%d", v.QEMU.Major, v.QEMU.Minor, v.QEMU.Micro)
}

// AtLeast reports whether the version is major.minor or newer.
func (v VersionInfo) AtLeast(major, minor int) bool {
	if v.QEMU.Major != major {
		return v.QEMU.Major > major
	}
	return v.QEMU.Minor >= minor
}

// wire is the union of every field a QMP server message may carry.
type wire struct {
	QMP *struct {
		Version      *VersionInfo `json:"version"`
		Capabilities []string     `json:"capabilities"`
	} `json:"QMP"`
	Return    json.RawMessage `json:"return"`
	Error     *wireError      `json:"error"`
	Event     *string         `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	ID json.RawMessage `json:"id"`
}

type wireError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Decode parses one QMP message sent by QEMU. The returned Message does not alias line.
func Decode(line []byte) (*Message, error) {
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return nil, fmt.Errorf("%w: not a JSON object: %s", ErrMalformed, excerpt(line))
	}
	var w wire
	if err := json.Unmarshal(line, &w); err != nil {
		return nil, fmt.Errorf("%w: %v: %s", ErrMalformed, err, excerpt(line))
	}
	// json.Unmarshal copies into RawMessage fields, so the message owns its bytes.
	m := &Message{ID: w.ID}
	n := 0
	if w.QMP != nil {
		n++
		if w.QMP.Version == nil {
			return nil, fmt.Errorf("%w: greeting without version: %s", ErrMalformed, excerpt(line))
		}
		m.Kind = KindGreeting
		m.Greeting = &Greeting{Version: *w.QMP.Version, Capabilities: w.QMP.Capabilities}
	}
	if w.Return != nil {
		n++
		m.Kind = KindReturn
		m.Return = w.Return
	}
	if w.Error != nil {
		n++
		if w.Error.Class == "" {
			return nil, fmt.Errorf("%w: error without class: %s", ErrMalformed, excerpt(line))
		}
		m.Kind = KindError
		m.Err = &Error{Class: w.Error.Class, Desc: w.Error.Desc}
	}
	if w.Event != nil {
		n++
		if *w.Event == "" {
			return nil, fmt.Errorf("%w: event without name: %s", ErrMalformed, excerpt(line))
		}
		m.Kind = KindEvent
		ev := &Event{Name: *w.Event, Data: w.Data}
		if w.Timestamp != nil {
			ev.Time = time.Unix(w.Timestamp.Seconds, w.Timestamp.Microseconds*1000)
		}
		m.Event = ev
	}
	if n != 1 {
		return nil, fmt.Errorf("%w: want exactly one of QMP, return, error, event: %s", ErrMalformed, excerpt(line))
	}
	return m, nil
}

func excerpt(b []byte) string {
	const max = 120
	if len(b) > max {
		return fmt.Sprintf("%q... (%d bytes)", b[:max], len(b))
	}
	return fmt.Sprintf("%q", b)
}
