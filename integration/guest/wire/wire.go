// Package wire defines the line protocol of the test guest's workload service
// and the checksum that both ends compute over its log of records.
//
// The service keeps one append-only log of records numbered 1, 2, 3, ... and
// speaks a line-based text protocol over TCP (default port 7777). Every request
// and every reply is one line ending in a single LF ("\n"); no CR is stripped.
//
//	W <n> <payload>\n   append record n with the given payload
//	                    -> A <n>\n          record n is in the log and on disk (fsynced)
//	                    -> E <reason>\n     rejected, the log is unchanged
//	Q\n                 summary of the in-memory log
//	                    -> S <count> <last> <checksum>\n
//	D\n                 the same summary, recomputed by re-reading the records from the disk
//	                    -> S <count> <last> <checksum>\n, or E <reason>\n without a disk
//	P\n                 ping
//	                    -> P\n
//
// n is a decimal uint64 and must be exactly last+1, where last is the number
// of the log's newest record (0 for an empty log); any other n gets an E reply.
// The payload is every byte after the single space that follows n, up to the
// LF: it may contain spaces and may be empty, must not contain LF, and is at
// most MaxPayload bytes long. Any other request line gets an E reply and the
// connection stays usable. count and last are decimal; checksum is 16
// lower-case hex digits (see Checksum). Replies come in the order of the
// requests, so a client may pipeline.
package wire

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// DefaultPort is the TCP port the workload service listens on in the guest.
const DefaultPort = 7777

// MaxPayload is the largest payload a record may carry. It is fixed by the
// service's disk layout (one 512-byte slot per record, header included).
const MaxPayload = 480

// MaxLine is the longest request line the service accepts, LF included.
const MaxLine = 512

// FNV-1a 64 parameters; see Checksum.
const (
	fnvOffset64 = 0xcbf29ce484222325
	fnvPrime64  = 0x100000001b3
)

// Checksum is the checksum of a sequence of records: FNV-1a 64 computed over
// the concatenation, for every record in log order, of n as 8 bytes
// big-endian, len(payload) as 4 bytes big-endian, and the payload bytes.
// The checksum of the empty log is EmptyChecksum, the FNV-1a 64 offset basis;
// hash/fnv.New64a fed the same bytes yields the same value.
//
// Chaining the records into one stream makes the checksum depend on their
// order and their boundaries, so a lost, duplicated, reordered or altered
// record changes it.
type Checksum uint64

// EmptyChecksum is the checksum of a log without records.
const EmptyChecksum Checksum = fnvOffset64

// Add returns the checksum of the records summed by c followed by record n
// with the given payload.
func (c Checksum) Add(n uint64, payload []byte) Checksum {
	h := uint64(c)
	var hdr [12]byte
	for i := 0; i < 8; i++ {
		hdr[i] = byte(n >> (56 - 8*i))
	}
	l := uint32(len(payload))
	for i := 0; i < 4; i++ {
		hdr[8+i] = byte(l >> (24 - 8*i))
	}
	for _, b := range hdr {
		h ^= uint64(b)
		h *= fnvPrime64
	}
	for _, b := range payload {
		h ^= uint64(b)
		h *= fnvPrime64
	}
	return Checksum(h)
}

// String formats c as the protocol does: 16 lower-case hex digits.
func (c Checksum) String() string { return fmt.Sprintf("%016x", uint64(c)) }

// Summary describes a log: how many records it holds, the number of its
// newest record and the checksum over all of them.
type Summary struct {
	Count    uint64
	Last     uint64
	Checksum Checksum
}

// Line formats s as a reply line, LF included.
func (s Summary) Line() string {
	return fmt.Sprintf("S %d %d %s\n", s.Count, s.Last, s.Checksum)
}

// String formats s for humans and logs.
func (s Summary) String() string {
	return fmt.Sprintf("count=%d last=%d checksum=%s", s.Count, s.Last, s.Checksum)
}

// ParseSummary parses an S reply line, with or without its LF.
func ParseSummary(line string) (Summary, error) {
	f := strings.Fields(strings.TrimSuffix(line, "\n"))
	if len(f) != 4 || f[0] != "S" {
		return Summary{}, fmt.Errorf("wire: malformed summary %q", line)
	}
	count, err1 := strconv.ParseUint(f[1], 10, 64)
	last, err2 := strconv.ParseUint(f[2], 10, 64)
	sum, err3 := strconv.ParseUint(f[3], 16, 64)
	if err := errors.Join(err1, err2, err3); err != nil || len(f[3]) != 16 {
		return Summary{}, fmt.Errorf("wire: malformed summary %q", line)
	}
	return Summary{Count: count, Last: last, Checksum: Checksum(sum)}, nil
}

// CheckPayload reports why payload cannot be sent in a W request, or nil.
func CheckPayload(payload []byte) error {
	if len(payload) > MaxPayload {
		return fmt.Errorf("wire: payload of %d bytes exceeds %d", len(payload), MaxPayload)
	}
	for _, b := range payload {
		if b == '\n' {
			return errors.New("wire: payload contains a newline")
		}
	}
	return nil
}

// AppendWrite appends the W request line for record n to dst.
func AppendWrite(dst []byte, n uint64, payload []byte) []byte {
	dst = append(dst, 'W', ' ')
	dst = strconv.AppendUint(dst, n, 10)
	dst = append(dst, ' ')
	dst = append(dst, payload...)
	return append(dst, '\n')
}

// ParseWrite parses a W request line without its LF into n and payload.
// The payload aliases line.
func ParseWrite(line []byte) (n uint64, payload []byte, err error) {
	if len(line) < 2 || line[0] != 'W' || line[1] != ' ' {
		return 0, nil, errors.New("not a W request")
	}
	rest := line[2:]
	sp := -1
	for i, b := range rest {
		if b == ' ' {
			sp = i
			break
		}
	}
	if sp <= 0 {
		return 0, nil, errors.New("the W request needs <n> <payload>")
	}
	n, err = strconv.ParseUint(string(rest[:sp]), 10, 64)
	if err != nil {
		return 0, nil, fmt.Errorf("bad record number %q", rest[:sp])
	}
	return n, rest[sp+1:], nil
}
