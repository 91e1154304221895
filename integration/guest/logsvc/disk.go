package logsvc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"syscall"
	"unsafe"

	"github.com/lockstepvm/lockstep/integration/guest/wire"
)

// The disk layout: the device is an array of SlotSize-byte slots, without a
// file system, so the guest needs no mkfs and a test image is just a file of
// zeros.
//
//	slot 0, the superblock:
//	  [0:8]   magic "LSGLOG01"
//	  [8:16]  format id, little-endian uint64
//	  [16:20] slot size, little-endian uint32
//	  [20:24] CRC-32 (IEEE) of bytes [0:20]
//	slot n (n >= 1), record n:
//	  [0:4]   magic "LSR1"
//	  [4:12]  format id of the superblock it was written under
//	  [12:20] n, little-endian uint64
//	  [20:22] payload length, little-endian uint16
//	  [22:26] CRC-32 (IEEE) of bytes [0:22] followed by the payload
//	  [26:]   payload, then zeros
//
// The log on the disk is the longest run of valid records 1, 2, 3, ...: a slot
// whose magic, format id, number or CRC does not match ends it. The format id
// is chosen anew whenever a disk without a valid superblock is formatted, so
// records left over from an earlier format never count.
const (
	// SlotSize is the size of one slot on the disk, the logical sector size
	// of an IDE disk, so one record is one sector write.
	SlotSize = 512

	superMagic   = "LSGLOG01"
	recordMagic  = "LSR1"
	recordHeader = 26
)

// A record and its header must fit in one slot.
var _ [SlotSize - recordHeader - wire.MaxPayload]struct{}

// Device is the block storage the log lives on: /dev/sda in the guest, a
// temporary file in unit tests.
type Device interface {
	io.ReaderAt
	io.WriterAt
	// Sync makes every completed write durable.
	Sync() error
	// Size is the capacity of the device in bytes.
	Size() int64
}

// FileDevice is a Device backed by a block device or a regular file.
type FileDevice struct {
	f    *os.File
	size int64
	// direct reads the same file with O_DIRECT, so that re-reading records
	// for a disk query sees what the device holds rather than the guest's
	// page cache. It is nil where O_DIRECT is not supported (tmpfs).
	direct *os.File
}

// OpenDevice opens the block device or file at path for reading and writing.
func OpenDevice(path string) (*FileDevice, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	// Stat reports 0 bytes for a block device; seeking to the end works for both.
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("size of %s: %w", path, err)
	}
	d := &FileDevice{f: f, size: size}
	if df, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0); err == nil {
		d.direct = df
	}
	return d, nil
}

// Direct reports whether reads bypass the page cache.
func (d *FileDevice) Direct() bool { return d.direct != nil }

// ReadAt reads len(p) bytes at off. With O_DIRECT, off and len(p) must be
// multiples of SlotSize, which every read of the log is.
func (d *FileDevice) ReadAt(p []byte, off int64) (int, error) {
	if d.direct == nil || off%SlotSize != 0 || len(p)%SlotSize != 0 {
		return d.f.ReadAt(p, off)
	}
	// O_DIRECT needs a buffer aligned to the logical block size; 4096 covers
	// every disk. Go's heap does not move objects, so the alignment holds.
	const align = 4096
	raw := make([]byte, len(p)+align)
	skip := int(align-uintptr(unsafe.Pointer(&raw[0]))%align) % align
	buf := raw[skip : skip+len(p)]
	n, err := d.direct.ReadAt(buf, off)
	copy(p, buf[:n])
	return n, err
}

// WriteAt writes p at off.
func (d *FileDevice) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }

// Sync flushes the written data to the device (fsync).
func (d *FileDevice) Sync() error { return d.f.Sync() }

// Size is the capacity of the device in bytes, as seen at open.
func (d *FileDevice) Size() int64 { return d.size }

// Close closes the device.
func (d *FileDevice) Close() error {
	var err error
	if d.direct != nil {
		err = d.direct.Close()
	}
	return errors.Join(d.f.Close(), err)
}

// encodeSuper fills slot with a superblock for format id.
func encodeSuper(slot []byte, id uint64) {
	clear(slot)
	copy(slot[0:8], superMagic)
	binary.LittleEndian.PutUint64(slot[8:16], id)
	binary.LittleEndian.PutUint32(slot[16:20], SlotSize)
	binary.LittleEndian.PutUint32(slot[20:24], crc32.ChecksumIEEE(slot[0:20]))
}

// decodeSuper returns the format id of a valid superblock.
func decodeSuper(slot []byte) (uint64, bool) {
	if string(slot[0:8]) != superMagic ||
		binary.LittleEndian.Uint32(slot[16:20]) != SlotSize ||
		binary.LittleEndian.Uint32(slot[20:24]) != crc32.ChecksumIEEE(slot[0:20]) {
		return 0, false
	}
	return binary.LittleEndian.Uint64(slot[8:16]), true
}

// encodeRecord fills slot with record n under format id.
func encodeRecord(slot []byte, id, n uint64, payload []byte) {
	clear(slot)
	copy(slot[0:4], recordMagic)
	binary.LittleEndian.PutUint64(slot[4:12], id)
	binary.LittleEndian.PutUint64(slot[12:20], n)
	binary.LittleEndian.PutUint16(slot[20:22], uint16(len(payload)))
	copy(slot[recordHeader:], payload)
	crc := crc32.ChecksumIEEE(slot[0:22])
	crc = crc32.Update(crc, crc32.IEEETable, payload)
	binary.LittleEndian.PutUint32(slot[22:26], crc)
}

// decodeRecord returns the payload of slot if it holds a valid record n
// under format id. The payload aliases slot.
func decodeRecord(slot []byte, id, n uint64) ([]byte, bool) {
	if string(slot[0:4]) != recordMagic ||
		binary.LittleEndian.Uint64(slot[4:12]) != id ||
		binary.LittleEndian.Uint64(slot[12:20]) != n {
		return nil, false
	}
	l := int(binary.LittleEndian.Uint16(slot[20:22]))
	if l > wire.MaxPayload {
		return nil, false
	}
	payload := slot[recordHeader : recordHeader+l]
	crc := crc32.ChecksumIEEE(slot[0:22])
	crc = crc32.Update(crc, crc32.IEEETable, payload)
	if crc != binary.LittleEndian.Uint32(slot[22:26]) {
		return nil, false
	}
	return payload, true
}

// scanBatch is how many slots one read of a scan covers.
const scanBatch = 128

// scan calls fn for records 1, 2, 3, ... of format id on dev until the first
// slot that holds no valid next record, or the end of the device. The payload
// passed to fn is only valid during the call.
func scan(dev Device, id uint64, fn func(n uint64, payload []byte)) error {
	slots := dev.Size() / SlotSize
	buf := make([]byte, scanBatch*SlotSize)
	n := uint64(1)
	for first := int64(1); first < slots; first += scanBatch {
		count := min(int64(scanBatch), slots-first)
		b := buf[:count*SlotSize]
		if _, err := dev.ReadAt(b, first*SlotSize); err != nil {
			return fmt.Errorf("read slots %d-%d: %w", first, first+count-1, err)
		}
		for i := int64(0); i < count; i++ {
			payload, ok := decodeRecord(b[i*SlotSize:(i+1)*SlotSize], id, n)
			if !ok {
				return nil
			}
			fn(n, payload)
			n++
		}
	}
	return nil
}
