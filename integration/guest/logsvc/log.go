// Package logsvc is the workload service of the test guest: an append-only
// log of numbered records kept in memory and on a raw block device, served
// over TCP with the protocol of package wire.
//
// It lives apart from the workload's main package so that unit tests can run
// the real service in-process, with a temporary file as its disk.
package logsvc

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// Errors returned by Log.
var (
	// ErrNoDisk: the log runs memory-only, so there is no disk to read.
	ErrNoDisk = errors.New("no disk")
	// ErrDiskFull: the device has no slot left for the next record.
	ErrDiskFull = errors.New("disk full")
)

// SequenceError rejects a record whose number is not the next one.
type SequenceError struct {
	Want, Got uint64
}

func (e *SequenceError) Error() string {
	return fmt.Sprintf("out of sequence: want %d, got %d", e.Want, e.Got)
}

// Record is one entry of the log.
type Record struct {
	N       uint64
	Payload []byte
}

// Log is the record log. It is safe for concurrent use; appends are
// serialised, so records reach the disk in order.
type Log struct {
	mu      sync.Mutex
	dev     Device // nil: memory-only
	id      uint64 // format id of dev's superblock
	slot    []byte // scratch slot for appends, guarded by mu
	records []Record
}

// Open returns the log stored on dev, recovering its records, or an empty
// memory-only log when dev is nil. A device without a valid superblock is
// formatted: it then holds an empty log.
func Open(dev Device) (*Log, error) {
	l := &Log{dev: dev, slot: make([]byte, SlotSize)}
	if dev == nil {
		return l, nil
	}
	if dev.Size() < 2*SlotSize {
		return nil, fmt.Errorf("device of %d bytes is too small for a log", dev.Size())
	}
	if _, err := dev.ReadAt(l.slot, 0); err != nil {
		return nil, fmt.Errorf("read superblock: %w", err)
	}
	id, ok := decodeSuper(l.slot)
	if !ok {
		// The clock, not crypto/rand: early in the guest's boot getrandom may
		// block, and the id only has to differ from the previous format's.
		id = uint64(time.Now().UnixNano())
		encodeSuper(l.slot, id)
		if _, err := dev.WriteAt(l.slot, 0); err != nil {
			return nil, fmt.Errorf("write superblock: %w", err)
		}
		if err := dev.Sync(); err != nil {
			return nil, fmt.Errorf("sync superblock: %w", err)
		}
		l.id = id
		return l, nil
	}
	l.id = id
	err := scan(dev, id, func(n uint64, payload []byte) {
		l.records = append(l.records, Record{N: n, Payload: clone(payload)})
	})
	if err != nil {
		return nil, fmt.Errorf("recover log: %w", err)
	}
	return l, nil
}

// HasDisk reports whether the log is stored on a device.
func (l *Log) HasDisk() bool { return l.dev != nil }

// Capacity is the number of records the device can hold, or 0 when the log
// is memory-only.
func (l *Log) Capacity() uint64 {
	if l.dev == nil {
		return 0
	}
	return uint64(l.dev.Size()/SlotSize - 1)
}

// Append adds record n to the log. n must be the number of the newest record
// plus one. With a device, the record is written and synced before Append
// returns; on any error the log is unchanged.
func (l *Log) Append(n uint64, payload []byte) error {
	if err := wire.CheckPayload(payload); err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	want := uint64(len(l.records)) + 1
	if n != want {
		return &SequenceError{Want: want, Got: n}
	}
	if l.dev != nil {
		if n > l.Capacity() {
			return ErrDiskFull
		}
		encodeRecord(l.slot, l.id, n, payload)
		if _, err := l.dev.WriteAt(l.slot, int64(n)*SlotSize); err != nil {
			return fmt.Errorf("write record %d: %w", n, err)
		}
		if err := l.dev.Sync(); err != nil {
			return fmt.Errorf("sync record %d: %w", n, err)
		}
	}
	l.records = append(l.records, Record{N: n, Payload: clone(payload)})
	return nil
}

// Summary summarises the in-memory log, recomputing the checksum over every
// record rather than keeping a running value, so that it checks the log's
// contents.
func (l *Log) Summary() wire.Summary {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := wire.Summary{Checksum: wire.EmptyChecksum}
	for _, r := range l.records {
		s.Count++
		s.Last = r.N
		s.Checksum = s.Checksum.Add(r.N, r.Payload)
	}
	return s
}

// DiskSummary summarises the log as stored on the device, re-reading every
// record. It holds the log's lock, so no append runs meanwhile.
func (l *Log) DiskSummary() (wire.Summary, error) {
	if l.dev == nil {
		return wire.Summary{}, ErrNoDisk
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	super := make([]byte, SlotSize)
	if _, err := l.dev.ReadAt(super, 0); err != nil {
		return wire.Summary{}, fmt.Errorf("read superblock: %w", err)
	}
	if id, ok := decodeSuper(super); !ok || id != l.id {
		return wire.Summary{}, errors.New("superblock lost or replaced")
	}
	s := wire.Summary{Checksum: wire.EmptyChecksum}
	err := scan(l.dev, l.id, func(n uint64, payload []byte) {
		s.Count++
		s.Last = n
		s.Checksum = s.Checksum.Add(n, payload)
	})
	return s, err
}

// Records returns a copy of the in-memory log's records.
func (l *Log) Records() []Record {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]Record, len(l.records))
	copy(out, l.records)
	return out
}

func clone(b []byte) []byte { return append([]byte{}, b...) }
