package wire

import (
	"encoding/binary"
	"hash/fnv"
	"strings"
	"testing"
)

func TestChecksumMatchesFNV(t *testing.T) {
	records := [][]byte{[]byte("a"), nil, []byte("with spaces "), []byte(strings.Repeat("x", MaxPayload))}
	h := fnv.New64a()
	c := EmptyChecksum
	if uint64(c) != h.Sum64() {
		t.Fatalf("EmptyChecksum %x, FNV-1a of nothing %x", uint64(c), h.Sum64())
	}
	for i, p := range records {
		n := uint64(i + 1)
		var hdr [12]byte
		binary.BigEndian.PutUint64(hdr[:8], n)
		binary.BigEndian.PutUint32(hdr[8:], uint32(len(p)))
		h.Write(hdr[:])
		h.Write(p)
		c = c.Add(n, p)
		if uint64(c) != h.Sum64() {
			t.Fatalf("after record %d: %x, want %x", n, uint64(c), h.Sum64())
		}
	}
	// Moving a byte across a record boundary changes the checksum.
	a := EmptyChecksum.Add(1, []byte("ab")).Add(2, []byte("c"))
	b := EmptyChecksum.Add(1, []byte("a")).Add(2, []byte("bc"))
	if a == b {
		t.Fatal("checksum ignores record boundaries")
	}
}

func TestSummaryRoundTrip(t *testing.T) {
	s := Summary{Count: 3, Last: 3, Checksum: 0x00ab}
	if got := s.Line(); got != "S 3 3 00000000000000ab\n" {
		t.Fatalf("Line() = %q", got)
	}
	back, err := ParseSummary(s.Line())
	if err != nil || back != s {
		t.Fatalf("ParseSummary(%q) = %v, %v", s.Line(), back, err)
	}
	for _, bad := range []string{"", "S 1 1", "A 1", "S x 1 00000000000000ab", "S 1 1 ab", "S 1 1 zz000000000000ab"} {
		if _, err := ParseSummary(bad); err == nil {
			t.Errorf("ParseSummary(%q) accepted", bad)
		}
	}
}

func TestWriteRoundTrip(t *testing.T) {
	for _, p := range []string{"", "x", " lead and trail ", strings.Repeat("y", MaxPayload)} {
		line := AppendWrite(nil, 42, []byte(p))
		if line[len(line)-1] != '\n' {
			t.Fatalf("no LF: %q", line)
		}
		n, got, err := ParseWrite(line[:len(line)-1])
		if err != nil || n != 42 || string(got) != p {
			t.Fatalf("ParseWrite(%q) = %d %q %v", line, n, got, err)
		}
	}
	for _, bad := range []string{"W", "W ", "W 1", "W x y", "W -1 y", "Q 1 y", "W  1 y"} {
		if _, _, err := ParseWrite([]byte(bad)); err == nil {
			t.Errorf("ParseWrite(%q) accepted", bad)
		}
	}
	if CheckPayload([]byte("a\nb")) == nil || CheckPayload(make([]byte, MaxPayload+1)) == nil {
		t.Error("CheckPayload accepts a newline or an oversized payload")
	}
	if err := CheckPayload(make([]byte, MaxPayload)); err != nil {
		t.Errorf("CheckPayload rejects a payload of MaxPayload bytes: %v", err)
	}
}
