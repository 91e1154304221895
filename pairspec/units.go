package pairspec

import (
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"strings"
	"time"
)

// Units of sizes.
const (
	KiB = 1 << 10
	MiB = 1 << 20
	GiB = 1 << 30
	TiB = 1 << 40
)

// Bytes is a size in bytes, written as a whole number with an optional unit: binary (Ki, Mi, Gi,
// Ti, Pi, Ei, optionally followed by B) or decimal (k, M, G, T, P, E, optionally followed by B);
// a bare number is bytes.
type Bytes uint64

// BytesPerSecond is a rate, written as Bytes with an optional "/s": 100Mi/s.
type BytesPerSecond uint64

// Duration is a time span written as Go writes it: 200ms, 3s, 1m30s; a bare 0 is zero.
type Duration time.Duration

var byteUnits = []struct {
	suffix string
	mult   uint64
}{
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"Pi", 1 << 50}, {"Ei", 1 << 60},
	{"k", 1e3}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}, {"P", 1e15}, {"E", 1e18},
}

// ParseBytes reads a size such as 512Mi, 64GiB, 1G or 4096.
func ParseBytes(s string) (Bytes, error) {
	num := strings.TrimSpace(s)
	num = strings.TrimSuffix(num, "B")
	mult := uint64(1)
	for _, u := range byteUnits {
		if strings.HasSuffix(num, u.suffix) {
			num, mult = strings.TrimSuffix(num, u.suffix), u.mult
			break
		}
	}
	if num == "" || strings.TrimLeft(num, "0123456789") != "" {
		return 0, fmt.Errorf("%q: want a whole number with an optional unit, e.g. 512Mi, 64Gi or 4096", s)
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is too large", s)
	}
	hi, lo := bits.Mul64(n, mult)
	if hi != 0 {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return Bytes(lo), nil
}

// String writes b with the largest binary unit that divides it, else the largest decimal one,
// else as a bare number of bytes.
func (b Bytes) String() string {
	v := uint64(b)
	units := []string{"Ki", "Mi", "Gi", "Ti", "Pi", "Ei"}
	if v == 0 {
		return "0"
	}
	if v%1024 != 0 {
		if v%1000 != 0 {
			return strconv.FormatUint(v, 10)
		}
		dec := []string{"k", "M", "G", "T", "P", "E"}
		i := -1
		for v%1000 == 0 && i < len(dec)-1 {
			v /= 1000
			i++
		}
		return strconv.FormatUint(v, 10) + dec[i]
	}
	i := -1
	for v%1024 == 0 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return strconv.FormatUint(v, 10) + units[i]
}

func (b *Bytes) parseScalar(value, tag string) error {
	v, err := ParseBytes(value)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// MarshalYAML writes b with a unit, or as a bare number.
func (b Bytes) MarshalYAML() (any, error) {
	s := b.String()
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		return n, nil
	}
	return s, nil
}

// MarshalJSON writes b as a string with a unit, as Kubernetes writes quantities.
func (b Bytes) MarshalJSON() ([]byte, error) { return json.Marshal(b.String()) }

// ParseBytesPerSecond reads a rate such as 100Mi/s or 125000000.
func ParseBytesPerSecond(s string) (BytesPerSecond, error) {
	b, err := ParseBytes(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil {
		return 0, fmt.Errorf("%q: want bytes per second, e.g. 100Mi/s or 125M/s", s)
	}
	return BytesPerSecond(b), nil
}

// String writes r as bytes per second.
func (r BytesPerSecond) String() string { return Bytes(r).String() + "/s" }

func (r *BytesPerSecond) parseScalar(value, tag string) error {
	v, err := ParseBytesPerSecond(value)
	if err != nil {
		return err
	}
	*r = v
	return nil
}

// MarshalYAML writes r as bytes per second.
func (r BytesPerSecond) MarshalYAML() (any, error) { return r.String(), nil }

// MarshalJSON writes r as bytes per second.
func (r BytesPerSecond) MarshalJSON() ([]byte, error) { return json.Marshal(r.String()) }

// ParseDuration reads a Go duration (200ms, 1m30s) or a bare 0.
func ParseDuration(s string) (Duration, error) {
	s = strings.TrimSpace(s)
	if s == "0" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		if _, ferr := strconv.ParseFloat(s, 64); ferr == nil {
			return 0, fmt.Errorf("%q has no unit: want e.g. 200ms, 3s or 1m", s)
		}
		return 0, fmt.Errorf("%q: want a duration such as 200ms, 3s or 1m", s)
	}
	return Duration(d), nil
}

// D is d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String writes d as Go does.
func (d Duration) String() string { return time.Duration(d).String() }

func (d *Duration) parseScalar(value, tag string) error {
	v, err := ParseDuration(value)
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// MarshalYAML writes d as Go does.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// MarshalJSON writes d as Go does.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// mibOf returns b in MiB, saturating at MaxUint32.
func mibOf(b Bytes) uint32 {
	m := uint64(b) / MiB
	if m > math.MaxUint32 {
		return math.MaxUint32
	}
	return uint32(m)
}
