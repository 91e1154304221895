package logsvc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// tempDevice returns a zeroed file device of the given number of slots.
func tempDevice(t *testing.T, slots int64) (*FileDevice, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, slots*SlotSize); err != nil {
		t.Fatal(err)
	}
	d, err := OpenDevice(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, path
}

func payload(n uint64) []byte { return []byte(fmt.Sprintf("payload %d with spaces", n)) }

func appendN(t *testing.T, l *Log, from, to uint64) {
	t.Helper()
	for n := from; n <= to; n++ {
		if err := l.Append(n, payload(n)); err != nil {
			t.Fatalf("append %d: %v", n, err)
		}
	}
}

func expected(n uint64) wire.Summary {
	s := wire.Summary{Count: n, Last: n, Checksum: wire.EmptyChecksum}
	for i := uint64(1); i <= n; i++ {
		s.Checksum = s.Checksum.Add(i, payload(i))
	}
	return s
}

func TestRecordEncoding(t *testing.T) {
	slot := make([]byte, SlotSize)
	p := bytes.Repeat([]byte("x"), wire.MaxPayload)
	encodeRecord(slot, 42, 7, p)
	got, ok := decodeRecord(slot, 42, 7)
	if !ok || !bytes.Equal(got, p) {
		t.Fatalf("decode of a fresh record failed: ok=%v", ok)
	}
	if _, ok := decodeRecord(slot, 43, 7); ok {
		t.Error("record accepted under another format id")
	}
	if _, ok := decodeRecord(slot, 42, 8); ok {
		t.Error("record accepted at another number")
	}
	slot[recordHeader+100] ^= 1
	if _, ok := decodeRecord(slot, 42, 7); ok {
		t.Error("record with a flipped payload bit accepted")
	}
}

func TestAppendRecoverAndReformat(t *testing.T) {
	dev, path := tempDevice(t, 64)
	l, err := Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Summary(); got != expected(0) {
		t.Fatalf("fresh log summary %v, want %v", got, expected(0))
	}
	appendN(t, l, 1, 20)
	if got := l.Summary(); got != expected(20) {
		t.Fatalf("summary %v, want %v", got, expected(20))
	}
	ds, err := l.DiskSummary()
	if err != nil || ds != expected(20) {
		t.Fatalf("disk summary %v, %v; want %v", ds, err, expected(20))
	}

	// A new process on the same disk recovers every record and goes on.
	dev.Close()
	dev2, err := OpenDevice(path)
	if err != nil {
		t.Fatal(err)
	}
	defer dev2.Close()
	l2, err := Open(dev2)
	if err != nil {
		t.Fatal(err)
	}
	if got := l2.Summary(); got != expected(20) {
		t.Fatalf("recovered summary %v, want %v", got, expected(20))
	}
	for i, r := range l2.Records() {
		if r.N != uint64(i+1) || !bytes.Equal(r.Payload, payload(r.N)) {
			t.Fatalf("recovered record %d = %d %q", i+1, r.N, r.Payload)
		}
	}
	appendN(t, l2, 21, 25)

	// Destroying the superblock reformats: the old records, still in their
	// slots, must not come back.
	if _, err := dev2.WriteAt(make([]byte, SlotSize), 0); err != nil {
		t.Fatal(err)
	}
	l3, err := Open(dev2)
	if err != nil {
		t.Fatal(err)
	}
	if got := l3.Summary(); got != expected(0) {
		t.Fatalf("after reformat: %v, want an empty log", got)
	}
	if err := l3.Append(1, []byte("new")); err != nil {
		t.Fatal(err)
	}
	ds, err = l3.DiskSummary()
	if err != nil || ds.Count != 1 {
		t.Fatalf("disk summary after reformat %v, %v; want 1 record", ds, err)
	}
}

func TestSequenceErrors(t *testing.T) {
	dev, _ := tempDevice(t, 16)
	l, err := Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 1, 3)
	for _, n := range []uint64{0, 1, 3, 5, 100} {
		err := l.Append(n, []byte("x"))
		var seq *SequenceError
		if !errors.As(err, &seq) || seq.Want != 4 || seq.Got != n {
			t.Errorf("append %d: got %v, want a sequence error wanting 4", n, err)
		}
	}
	if err := l.Append(4, bytes.Repeat([]byte("y"), wire.MaxPayload+1)); err == nil {
		t.Error("oversized payload accepted")
	}
	if err := l.Append(4, []byte("a\nb")); err == nil {
		t.Error("payload with a newline accepted")
	}
	if got := l.Summary(); got != expected(3) {
		t.Fatalf("rejections changed the log: %v", got)
	}
	ds, err := l.DiskSummary()
	if err != nil || ds != expected(3) {
		t.Fatalf("rejections changed the disk: %v, %v", ds, err)
	}
}

func TestDiskFull(t *testing.T) {
	dev, _ := tempDevice(t, 4) // superblock + 3 records
	l, err := Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	if l.Capacity() != 3 {
		t.Fatalf("capacity %d, want 3", l.Capacity())
	}
	appendN(t, l, 1, 3)
	if err := l.Append(4, []byte("x")); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("append past the end: %v, want ErrDiskFull", err)
	}
	if got := l.Summary(); got != expected(3) {
		t.Fatalf("summary %v after a full disk", got)
	}
}

func TestDiskSummaryReadsTheDisk(t *testing.T) {
	dev, _ := tempDevice(t, 32)
	l, err := Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 1, 10)
	// Corrupt record 6 behind the log's back: the memory summary still
	// covers 10 records, the disk summary only the 5 valid ones before it.
	if _, err := dev.WriteAt([]byte{0xff}, 6*SlotSize+recordHeader); err != nil {
		t.Fatal(err)
	}
	if got := l.Summary(); got != expected(10) {
		t.Fatalf("memory summary %v", got)
	}
	ds, err := l.DiskSummary()
	if err != nil || ds != expected(5) {
		t.Fatalf("disk summary %v, %v; want %v", ds, err, expected(5))
	}
}

func TestMemoryOnly(t *testing.T) {
	l, err := Open(nil)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 1, 5)
	if got := l.Summary(); got != expected(5) {
		t.Fatalf("summary %v", got)
	}
	if _, err := l.DiskSummary(); !errors.Is(err, ErrNoDisk) {
		t.Fatalf("disk summary without a disk: %v", err)
	}
}

// failingDevice fails its syncs on demand.
type failingDevice struct {
	*FileDevice
	failSync bool
}

func (d *failingDevice) Sync() error {
	if d.failSync {
		return errors.New("injected sync failure")
	}
	return d.FileDevice.Sync()
}

func TestSyncFailureLeavesLogUnchanged(t *testing.T) {
	fd, _ := tempDevice(t, 16)
	dev := &failingDevice{FileDevice: fd}
	l, err := Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	appendN(t, l, 1, 2)
	dev.failSync = true
	if err := l.Append(3, payload(3)); err == nil {
		t.Fatal("append acknowledged although its sync failed")
	}
	if got := l.Summary(); got != expected(2) {
		t.Fatalf("failed append changed the log: %v", got)
	}
	dev.failSync = false
	appendN(t, l, 3, 4)
	if got := l.Summary(); got != expected(4) {
		t.Fatalf("summary %v", got)
	}
}
